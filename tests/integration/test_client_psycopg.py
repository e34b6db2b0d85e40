"""psycopg 3 through pgcloak: pipeline mode, COPY, server-side cursors, notifies, cancel,
prepared statements, binary results and the async connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.pq import Format
from psycopg.types.json import Jsonb

from pgcloak.demo.postgres import DbLogin
from proxyctl import SubprocessProxy


def connect(proxy, login: DbLogin, **kwargs) -> psycopg.Connection:
    params = {
        k: kwargs.pop(k) for k in ("sslmode", "channel_binding", "application_name") if k in kwargs
    }
    return psycopg.connect(
        proxy.dsn(login.user, login.password, login.dbname, **params), connect_timeout=10, **kwargs
    )


@pytest.fixture
def conn(pgcloak, pg_app_user) -> Iterator[psycopg.Connection]:
    with connect(pgcloak, pg_app_user, autocommit=True) as c:
        yield c


@pytest.fixture
def table(conn: psycopg.Connection) -> Iterator[str]:
    name = f"pg3_{uuid.uuid4().hex[:10]}"
    yield name
    conn.rollback()
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def test_pipeline_many_inserts_and_selects(conn: psycopg.Connection, table: str):
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    with conn.pipeline() as p:
        cur = conn.cursor()
        for i in range(500):
            cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
        counts = [
            conn.execute(f"SELECT count(*) FROM {table} WHERE id < %s", (n,))
            for n in (10, 100, 500)
        ]
        many = conn.cursor()
        many.executemany(
            f"INSERT INTO {table} VALUES (%s, %s) RETURNING id * 2",
            [(i, "m") for i in range(500, 600)],
            returning=True,
        )
        p.sync()
        doubled = []
        while True:
            doubled.append(many.fetchone()[0])
            if not many.nextset():
                break
        total = conn.execute(f"SELECT count(*), sum(id) FROM {table}")
    assert [c.fetchone() for c in counts] == [(10,), (100,), (500,)]
    assert doubled == [2 * i for i in range(500, 600)]
    assert total.fetchone() == (600, sum(range(600)))


def test_pipeline_error_discards_until_sync(conn: psycopg.Connection, table: str):
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    with pytest.raises(errors.UniqueViolation):
        with conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.execute(f"INSERT INTO {table} VALUES (2)")  # skipped: the pipeline is aborted
    # Everything up to the pipeline's Sync is one implicit transaction: the first insert
    # is rolled back with it, and the third never ran.
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    with conn.pipeline() as p:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        p.sync()  # a transaction of its own
        kept = conn.execute(f"SELECT count(*) FROM {table}")
    assert kept.fetchone() == (1,)
    with pytest.raises(errors.UniqueViolation):
        with conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (3)")
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([1],)
    with conn.pipeline():
        first = conn.execute("SELECT 1")
        second = conn.execute("SELECT 'after'")
    assert (first.fetchone(), second.fetchone()) == ((1,), ("after",))


def test_copy_from_stdin_and_to_stdout(conn: psycopg.Connection, table: str):
    conn.execute(
        f"CREATE TABLE {table} (id int, name text, amount numeric, data bytea, ts timestamptz)"
    )
    ts = dt.datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=dt.UTC)
    rows = [
        (i, f"näme\t{i}\n\\", Decimal(i) / 8, bytes([0, i % 256, 255]), ts) for i in range(5000)
    ]
    rows.append((5000, None, None, None, None))
    with conn.cursor() as cur:
        with cur.copy(f"COPY {table} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 5001
        with cur.copy(
            f"COPY {table} (id, name, amount, data, ts) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "text", "numeric", "bytea", "timestamptz"])
            for row in rows[:100]:
                copy.write_row((row[0] + 10_000, *row[1:]))
        assert cur.rowcount == 100
        assert conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (
            5101, sum(range(5001)) + sum(range(10_000, 10_100)),
        )  # fmt: skip

        with cur.copy(
            f"COPY (SELECT * FROM {table} WHERE id <= 5000 ORDER BY id) TO STDOUT"
        ) as copy:
            copy.set_types(["int4", "text", "numeric", "bytea", "timestamptz"])
            out = list(copy.rows())
        assert out == rows
        with cur.copy(
            f"COPY (SELECT * FROM {table} WHERE id >= 10000 ORDER BY id) TO STDOUT (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "text", "numeric", "bytea", "timestamptz"])
            binary_out = list(copy.rows())
        assert binary_out == [(r[0] + 10_000, *r[1:]) for r in rows[:100]]
        with cur.copy(
            "COPY (SELECT g, 'x' FROM generate_series(1, 3) g) TO STDOUT (FORMAT CSV)"
        ) as copy:
            raw = b"".join(bytes(chunk) for chunk in copy)
        assert raw == b"1,x\n2,x\n3,x\n"
    assert conn.execute("SELECT 'after copy'").fetchone() == ("after copy",)


def test_copy_from_stdin_error_is_reported_and_rolled_back(conn: psycopg.Connection, table: str):
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    with pytest.raises(errors.UniqueViolation):
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for i in (1, 2, 3, 2, 4):
                copy.write_row((i,))
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    with pytest.raises(ZeroDivisionError):
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            copy.write_row((1,))
            raise ZeroDivisionError  # psycopg sends CopyFail, then re-raises
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_server_side_cursor_with_itersize(pgcloak, pg_app_user):
    with connect(pgcloak, pg_app_user) as conn:  # named cursors need a transaction
        with conn.cursor(name="ssc_test") as cur:
            cur.itersize = 137
            cur.execute("SELECT g, repeat('x', g % 50) FROM generate_series(1, 10000) g ORDER BY g")
            assert [d.name for d in cur.description] == ["g", "repeat"]
            rows = list(cur)
        assert rows == [(g, "x" * (g % 50)) for g in range(1, 10001)]
        with conn.cursor(name="ssc_manual", scrollable=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            assert cur.fetchmany(3) == [(1,), (2,), (3,)]
            cur.scroll(500, mode="absolute")
            assert cur.fetchone() == (501,)
            assert len(cur.fetchall()) == 499
            declared = conn.execute("SELECT name FROM pg_cursors ORDER BY name").fetchall()
            assert ("ssc_manual",) in declared
        conn.commit()


def test_notifies_between_two_connections(pgcloak, pg_app_user, conn: psycopg.Connection):
    channel = f"pg3_chan_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    with connect(pgcloak, pg_app_user, autocommit=True) as other:
        sender = other.info.backend_pid
        for payload in ("one", "twö ☃", ""):
            other.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    got = [(n.channel, n.payload, n.pid) for n in conn.notifies(timeout=5, stop_after=3)]
    assert got == [(channel, "one", sender), (channel, "twö ☃", sender), (channel, "", sender)]
    # Notifications that arrive with a query's results are seen too.
    conn.execute(sql.SQL("NOTIFY {}, 'self'").format(sql.Identifier(channel)))
    got = [(n.payload, n.pid) for n in conn.notifies(timeout=5, stop_after=1)]
    assert got == [("self", conn.info.backend_pid)]


def _cancel_later(conn: psycopg.Connection, method: str, delay: float = 0.5) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: (time.sleep(delay), getattr(conn, method)()), daemon=True
    )
    thread.start()
    return thread


@pytest.fixture(scope="module")
def pgcloak_process(pg, tmp_path_factory) -> Iterator[SubprocessProxy]:
    """`pgcloak run` in a child process.

    Needed for psycopg's legacy ``cancel()``: it calls libpq's blocking PQcancel()
    without releasing the GIL, so an in-process (threaded) proxy could never answer it.
    """
    tls = pg.tls_files
    args = [
        "--backend", f"postgresql://{pg.host}:{pg.port}",
        "--client-tls-cert", str(tls.server_cert),
        "--client-tls-key", str(tls.server_key),
        "--backend-tls-ca", str(tls.ca_cert),
        "--drain-timeout", "0",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("pgcloak-run") / "pgcloak.log"
    with SubprocessProxy(args, log) as proc:
        yield proc


def _assert_cancel_works(proxy, login: DbLogin, method: str, sslmode: str) -> None:
    with connect(proxy, login, autocommit=True, sslmode=sslmode, channel_binding="disable") as conn:
        assert conn.pgconn.ssl_in_use == (sslmode == "require")
        pid = conn.info.backend_pid
        started = time.monotonic()
        thread = _cancel_later(conn, method)
        with pytest.raises(errors.QueryCanceled, match="canceling statement due to user request"):
            conn.execute("SELECT pg_sleep(10)")
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - started < 8
        assert conn.execute("SELECT 'still usable', pg_backend_pid()").fetchone() == (
            "still usable",
            pid,
        )


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_cancel_safe_during_pg_sleep(pgcloak, pg_app_user, sslmode: str):
    _assert_cancel_works(pgcloak, pg_app_user, "cancel_safe", sslmode)


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_cancel_through_pgcloak_run(pgcloak_process, pg_app_user, method: str, sslmode: str):
    _assert_cancel_works(pgcloak_process, pg_app_user, method, sslmode)


def test_cancel_inside_transaction_then_rollback(
    pgcloak, pg_app_user, table: str, conn: psycopg.Connection
):
    conn.execute(f"CREATE TABLE {table} (id int)")
    with connect(pgcloak, pg_app_user) as tx:
        tx.execute(f"INSERT INTO {table} VALUES (1)")
        thread = _cancel_later(tx, "cancel_safe", 0.3)
        with pytest.raises(errors.QueryCanceled):
            tx.execute("SELECT pg_sleep(10)")
        thread.join(10)
        with pytest.raises(errors.InFailedSqlTransaction):
            tx.execute("SELECT 1")
        tx.rollback()
        assert tx.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_prepared_statements(pgcloak, pg_app_user, table: str, conn: psycopg.Connection):
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    query = f"INSERT INTO {table} VALUES (%s, %s) RETURNING id, v"
    for i in range(5):
        assert conn.execute(query, (i, f"p{i}"), prepare=True).fetchone() == (i, f"p{i}")
    prepared = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE statement = %s",
        (query.replace("%s", "$1", 1).replace("%s", "$2"),),
    ).fetchall()
    assert len(prepared) == 1 and prepared[0][0].startswith("_pg3_"), prepared

    with connect(pgcloak, pg_app_user, autocommit=True, prepare_threshold=0) as eager:
        select = f"SELECT v FROM {table} WHERE id = %s"
        assert [eager.execute(select, (i,)).fetchone() for i in range(5)] == [
            (f"p{i}",) for i in range(5)
        ]
        names = eager.execute(
            "SELECT name FROM pg_prepared_statements WHERE statement = %s",
            (select.replace("%s", "$1"),),
        ).fetchall()
        assert len(names) == 1 and names[0][0].startswith("_pg3_")
        star = f"SELECT * FROM {table} WHERE id = %s"
        assert eager.execute(star, (3,)).fetchone() == (3, "p3")
        # After DDL psycopg drops its prepared statements (DEALLOCATE ALL) and prepares
        # again: the new row type arrives through the proxy.
        eager.execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7")
        assert eager.execute(star, (3,)).fetchone() == (3, "p3", 7)
        assert eager.execute(select, (4,)).fetchone() == ("p4",)
        live = eager.execute("SELECT statement FROM pg_prepared_statements ORDER BY statement")
        assert {row[0] for row in live} >= {star.replace("%s", "$1"), select.replace("%s", "$1")}


def test_binary_cursor(conn: psycopg.Connection):
    values = (
        2**62, Decimal("-0.000000000000000000001"), b"\x00\x00zero\x00", dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        uuid.UUID(int=2**128 - 1), [1, None, 3], ["ü", None, ""], "ünï ☃ 🐘", dt.date(2038, 1, 19), 0.1, None,
    )  # fmt: skip
    with conn.cursor(binary=True) as cur:
        cur.execute(
            "SELECT %b::int8, %b::numeric, %b::bytea, %b::timestamptz, %b::uuid, %b::int4[], %b::text[], "
            "%b::text, %b::date, %b::float8, %b::int2, %s::jsonb",
            (*values, Jsonb({"a": [1, "ü"], "n": None})),
        )
        assert cur.pgresult is not None
        assert {cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)} == {Format.BINARY}
        row = cur.fetchone()
        assert row == (*values, {"a": [1, "ü"], "n": None})
        cur.execute("SELECT g::int8, md5(g::text)::bytea FROM generate_series(1, 20000) g")
        rows = cur.fetchall()
        assert rows == [
            (g, hashlib.md5(str(g).encode()).hexdigest().encode()) for g in range(1, 20001)
        ]


async def test_async_connection(pgcloak, pg_app_user):
    name = f"pg3a_{uuid.uuid4().hex[:10]}"
    aconn = await psycopg.AsyncConnection.connect(
        pgcloak.dsn(pg_app_user.user, pg_app_user.password, pg_app_user.dbname), autocommit=True
    )
    async with aconn:
        await aconn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        try:
            async with aconn.transaction():
                cur = aconn.cursor()
                await cur.executemany(
                    f"INSERT INTO {name} VALUES (%s, %s)", [(i, f"a{i}") for i in range(200)]
                )
            async with aconn.pipeline():
                a = await aconn.execute(f"SELECT count(*) FROM {name}")
                b = await aconn.execute(f"SELECT v FROM {name} WHERE id = %s", (199,))
            assert (await a.fetchone(), await b.fetchone()) == ((200,), ("a199",))
            async with aconn.cursor(binary=True) as bcur:
                await bcur.execute(f"SELECT sum(id)::int8 FROM {name}")
                assert await bcur.fetchone() == (sum(range(200)),)
            async with aconn.cursor() as ccur:
                async with ccur.copy(
                    f"COPY (SELECT * FROM {name} ORDER BY id LIMIT 3) TO STDOUT"
                ) as copy:
                    copy.set_types(["int4", "text"])
                    assert [r async for r in copy.rows()] == [(0, "a0"), (1, "a1"), (2, "a2")]
            with pytest.raises(errors.UndefinedTable):
                await aconn.execute("SELECT * FROM no_such_table_pg3a")
            assert await (await aconn.execute("SELECT 'ok'")).fetchone() == ("ok",)
        finally:
            await aconn.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
async def aconn_pair(
    pgcloak, pg_app_user
) -> AsyncIterator[tuple[psycopg.AsyncConnection, psycopg.AsyncConnection]]:
    dsn = pgcloak.dsn(pg_app_user.user, pg_app_user.password, pg_app_user.dbname)
    a = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    b = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_async_notifies_and_cancel(aconn_pair):
    listener, sender = aconn_pair
    channel = f"pg3a_chan_{uuid.uuid4().hex[:8]}"
    await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    await sender.execute("SELECT pg_notify(%s, 'async ☃')", (channel,))
    got = [(n.channel, n.payload) async for n in listener.notifies(timeout=5, stop_after=1)]
    assert got == [(channel, "async ☃")]

    async def cancel_soon() -> None:
        await asyncio.sleep(0.4)
        await sender.cancel_safe()

    task = asyncio.create_task(cancel_soon())
    with pytest.raises(errors.QueryCanceled):
        await sender.execute("SELECT pg_sleep(10)")
    await task
    assert await (await sender.execute("SELECT 42")).fetchone() == (42,)
