"""asyncpg through pgcloak: extended protocol, binary types, COPY, LISTEN/NOTIFY, cancel."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import psycopg
import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres


async def connect(proxy, login: DbLogin, **kwargs) -> asyncpg.Connection:
    kwargs.setdefault("ssl", False)
    return await asyncpg.connect(
        **proxy.kwargs(login.user, login.password, login.dbname), timeout=10, **kwargs
    )


@pytest.fixture
async def conn(pgcloak, pg_app_user) -> AsyncIterator[asyncpg.Connection]:
    c = await connect(pgcloak, pg_app_user)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def table(conn: asyncpg.Connection) -> AsyncIterator[str]:
    name = f"apg_{uuid.uuid4().hex[:10]}"
    yield name
    await conn.execute(f"DROP TABLE IF EXISTS {name}")


def direct(pg: TemporaryPostgres, login: DbLogin) -> psycopg.Connection:
    """A connection straight to PostgreSQL, bypassing the proxy."""
    return psycopg.connect(
        pg.dsn(login.user, login.password, login.dbname), autocommit=True, connect_timeout=10
    )


async def test_prepared_statement_reused_with_different_args(conn: asyncpg.Connection):
    sql = "SELECT $1::int8 * 2 AS doubled, upper($2::text) AS shout"
    stmt = await conn.prepare(sql)
    assert [a.name for a in stmt.get_attributes()] == ["doubled", "shout"]
    assert [t.name for t in stmt.get_parameters()] == ["int8", "text"]
    for i in (1, -7, 2**40):
        row = await stmt.fetchrow(i, f"v{i}-☃")  # the server's locale is C: upper() is ASCII-only
        assert (row["doubled"], row["shout"]) == (2 * i, f"V{i}-☃")
    assert await stmt.fetchval(21, "x") == 42
    # The named statement lives on the backend behind the proxy.
    names = await conn.fetch("SELECT name FROM pg_prepared_statements WHERE statement = $1", sql)
    assert [n["name"] for n in names] == [stmt.get_name()]
    rows = await conn.fetch("SELECT g, g * g FROM generate_series(1, $1) g", 5)
    assert [tuple(r) for r in rows] == [(g, g * g) for g in range(1, 6)]


async def test_binary_types_round_trip(conn: asyncpg.Connection, table: str):
    values = {
        "i8": -(2**63),
        "num": Decimal("12345678901234567890.123456789012345678"),
        "b": b"\x00\x01\xff\x00binary\x00" + bytes(range(256)),
        "ts": dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.UTC),
        "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "j": json.dumps({"k": [1, 2, {"z": None}], "ü": "ünïcødé ☃ 🐘"}),
        "arr": [[1, 2, 3], [4, None, 6]],
        "tarr": ["a", "", None, 'quote"d', "comma,", "🐘"],
        "t": "ünïcødé ☃ 🐘 \t\n\\ end",
        "d": dt.date(1999, 12, 31),
        "f8": 1.0000000000000002,
        "bo": True,
        "iv": dt.timedelta(days=3, seconds=7, microseconds=5),
    }
    await conn.execute(
        f"""CREATE TABLE {table} (i8 int8, num numeric, b bytea, ts timestamptz, u uuid, j jsonb,
            arr int4[], tarr text[], t text, d date, f8 float8, bo bool, iv interval)"""
    )
    cols = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    await conn.execute(
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({placeholders})", *values.values()
    )
    row = await conn.fetchrow(f"SELECT * FROM {table}")
    got = dict(row)
    assert json.loads(got.pop("j")) == json.loads(values["j"])
    expected = {k: v for k, v in values.items() if k != "j"}
    assert got == expected
    # Same values as parameters only (no table): binary in, binary out.
    echoed = await conn.fetchrow(
        "SELECT $1::int8, $2::numeric, $3::bytea, $4::timestamptz, $5::uuid, $6::text",
        values["i8"], values["num"], values["b"], values["ts"], values["u"], values["t"],
    )  # fmt: skip
    assert tuple(echoed) == (
        values["i8"],
        values["num"],
        values["b"],
        values["ts"],
        values["u"],
        values["t"],
    )
    # And the server saw the right bytes, not just a symmetric round trip.
    assert (
        await conn.fetchval(f"SELECT md5(b) FROM {table}") == hashlib.md5(values["b"]).hexdigest()
    )
    assert await conn.fetchval(f"SELECT octet_length(t) FROM {table}") == len(values["t"].encode())
    assert await conn.fetchval(f"SELECT j->>'ü' FROM {table}") == "ünïcødé ☃ 🐘"


async def test_copy_records_to_table_then_count_and_sum(conn: asyncpg.Connection, table: str):
    await conn.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, label text, amount numeric(12,2), data bytea)"
    )
    records = [
        (i, f"row-{i}-ü", Decimal(i) / 4, bytes([i % 256, 0, 255])) for i in range(1, 20_001)
    ]
    status = await conn.copy_records_to_table(table, records=records)
    assert status == "COPY 20000"
    row = await conn.fetchrow(
        f"SELECT count(*), sum(id), sum(amount), count(DISTINCT label), sum(get_byte(data, 0)) FROM {table}"
    )
    assert tuple(row) == (
        20_000,
        sum(range(1, 20_001)),
        sum(Decimal(i) / 4 for i in range(1, 20_001)),
        20_000,
        sum(i % 256 for i in range(1, 20_001)),
    )
    # copy_to_table from a file-like object: COPY FROM STDIN in CSV.
    csv = io.BytesIO("".join(f'{i},"csv, {i}",1.00,\n' for i in range(20_001, 20_101)).encode())
    assert await conn.copy_to_table(table, source=csv, format="csv") == "COPY 100"
    assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE label LIKE 'csv, %'") == 100


async def test_copy_from_query_to_bytesio(conn: asyncpg.Connection):
    out = io.BytesIO()
    status = await conn.copy_from_query(
        "SELECT g, 'line ' || g, CASE WHEN g % 2 = 0 THEN NULL ELSE 'ü' END FROM generate_series(1, $1) g",
        3000,
        output=out,
        format="csv",
    )
    assert status == "COPY 3000"
    expected = "".join(f"{g},line {g},{'' if g % 2 == 0 else 'ü'}\n" for g in range(1, 3001))
    assert out.getvalue().decode() == expected
    # The connection carries on normally after COPY OUT.
    assert await conn.fetchval("SELECT 'after copy'") == "after copy"


async def test_listen_notify_between_two_proxied_connections(
    pgcloak, pg_app_user, conn: asyncpg.Connection
):
    channel = f"chan_{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
    await conn.add_listener(
        channel, lambda _c, pid, chan, payload: received.put_nowait((pid, chan, payload))
    )
    other = await connect(pgcloak, pg_app_user)
    try:
        sender_pid = await other.fetchval("SELECT pg_backend_pid()")
        await other.execute("SELECT pg_notify($1, $2)", channel, "hello ☃")
        first = await asyncio.wait_for(received.get(), 5)
        async with other.transaction():  # delivered only at commit
            await other.execute(f"NOTIFY {channel}, 'in transaction'")
            await asyncio.sleep(0.2)
            assert received.empty()
        second = await asyncio.wait_for(received.get(), 5)
    finally:
        await other.close()
    assert first == (sender_pid, channel, "hello ☃")
    assert second == (sender_pid, channel, "in transaction")


async def test_cancelled_query_is_cancelled_on_the_server(pgcloak, pg, pg_app_user):
    app_name = f"apg-cancel-{uuid.uuid4().hex[:8]}"
    conn = await connect(pgcloak, pg_app_user, server_settings={"application_name": app_name})
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), 0.5)
        # asyncpg sent a CancelRequest through the proxy; the backend stops sleeping.
        with direct(pg, pg_app_user) as d:
            for _ in range(100):
                state = d.execute(
                    "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                if state is not None and state[0] == "idle":
                    break
                await asyncio.sleep(0.05)
            assert state == ("idle", "SELECT pg_sleep(10)")
        assert await conn.fetchval("SELECT 'usable again'") == "usable again"
        # The same session, not a reconnect.
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert time.monotonic() - started < 8
    finally:
        await conn.close()


async def test_cancel_over_tls_client_leg(pgcloak, pg, pg_app_user):
    ctx = ssl.create_default_context(cafile=str(pg.ca_file))
    conn = await connect(pgcloak, pg_app_user, ssl=ctx)
    try:
        assert (
            await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        )
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(10)"), 0.5)
        assert await conn.fetchval("SELECT 1") == 1
        assert time.monotonic() - started < 8
    finally:
        await conn.close()


async def test_transaction_rollback_drops_rows(conn: asyncpg.Connection, table: str):
    await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
    with pytest.raises(RuntimeError, match="boom"):
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (2, 'dropped')")
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 2
            raise RuntimeError("boom")
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {table} VALUES (3, 'outer')")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():  # a savepoint
                await conn.execute(f"INSERT INTO {table} VALUES (4, 'inner')")
                await conn.execute(f"INSERT INTO {table} VALUES (1, 'duplicate')")
    rows = await conn.fetch(f"SELECT id, v FROM {table} ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "kept"), (3, "outer")]
    assert not conn.is_in_transaction()


async def test_executemany(conn: asyncpg.Connection, table: str):
    await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text, n numeric)")
    args = [(i, f"v{i}" * (i % 5), Decimal(f"{i}.{i}")) for i in range(1, 1001)]
    await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", args)
    row = await conn.fetchrow(f"SELECT count(*), sum(id), sum(n), sum(length(v)) FROM {table}")
    assert tuple(row) == (
        1000,
        sum(range(1, 1001)),
        sum(Decimal(f"{i}.{i}") for i in range(1, 1001)),
        sum(len(f"v{i}" * (i % 5)) for i in range(1, 1001)),
    )
    # A failing executemany is atomic: nothing of it stays.
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, 'x', 0)", [(2000,), (2001,), (5,)])
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1000


async def test_large_result(conn: asyncpg.Connection):
    rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 200000) g")
    assert len(rows) == 200_000
    assert sum(r[0] for r in rows) == 200_000 * 200_001 // 2
    digest = hashlib.sha256("".join(r[1] for r in rows).encode()).hexdigest()
    expected = hashlib.sha256(
        "".join(hashlib.md5(str(g).encode()).hexdigest() for g in range(1, 200_001)).encode()
    )
    assert digest == expected.hexdigest()


async def test_large_values_cross_many_reads(conn: asyncpg.Connection):
    blob = bytes(range(256)) * (24 * 1024)  # 6 MiB, zero bytes included
    assert await conn.fetchval("SELECT md5($1::bytea)", blob) == hashlib.md5(blob).hexdigest()
    assert await conn.fetchval("SELECT $1::bytea", blob) == blob
    text = "☃" * 1_000_000
    assert await conn.fetchval("SELECT length($1::text)", text) == 1_000_000
    assert await conn.fetchval("SELECT repeat('ab', 2000000)") == "ab" * 2_000_000


async def test_errors_keep_the_connection_usable(conn: asyncpg.Connection):
    with pytest.raises(asyncpg.UndefinedTableError) as info:
        await conn.fetch("SELECT * FROM no_such_table_apg")
    assert info.value.sqlstate == "42P01"
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.fetchval("SELECT 1 / $1::int", 0)
    with pytest.raises(asyncpg.PostgresSyntaxError) as syntax:
        await conn.prepare("SELEC 1")
    assert syntax.value.position == "1"
    assert await conn.fetchval("SELECT $1::int + 1", 41) == 42


async def test_cursor_iteration_in_transaction(conn: asyncpg.Connection):
    async with conn.transaction():
        seen = [
            r[0]
            async for r in conn.cursor("SELECT g FROM generate_series(1, 5000) g", prefetch=333)
        ]
        cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
        assert [r[0] for r in await cur.fetch(10)] == list(range(1, 11))
        await cur.forward(80)
        assert [r[0] for r in await cur.fetch(20)] == list(range(91, 101))
    assert seen == list(range(1, 5001))
