"""pg8000 (pure-Python driver) through pgcloak: parameters, types, transactions, errors."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pg8000.native
import pytest
from pg8000.exceptions import DatabaseError

from pgcloak.demo.postgres import DbLogin


def connect(proxy, login: DbLogin, **kwargs) -> pg8000.native.Connection:
    kwargs.setdefault("ssl_context", False)  # pg8000's None would mean "try TLS"
    return pg8000.native.Connection(
        **proxy.kwargs(login.user, login.password, login.dbname), timeout=20, **kwargs
    )


@pytest.fixture
def con(pgcloak, pg_app_user) -> Iterator[pg8000.native.Connection]:
    c = connect(pgcloak, pg_app_user)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def table(con: pg8000.native.Connection) -> Iterator[str]:
    name = f"p8k_{uuid.uuid4().hex[:10]}"
    yield name
    con.run(f"DROP TABLE IF EXISTS {name}")


def test_queries_with_parameters(con: pg8000.native.Connection):
    assert con.run(
        "SELECT :a::int + :b::int AS total, :s || '!' AS shout", a=40, b=2, s="hé ☃"
    ) == [[42, "hé ☃!"]]
    assert [c["name"] for c in con.columns] == ["total", "shout"]
    assert con.run("SELECT current_user, current_database()") == [["app", "appdb"]]
    rows = con.run("SELECT g FROM generate_series(1, :n) g WHERE g % :m = 0", n=30, m=7)
    assert rows == [[7], [14], [21], [28]]
    assert con.row_count == 4
    assert con.run("SELECT :v::text IS NULL", v=None) == [[True]]


def test_types_round_trip(con: pg8000.native.Connection, table: str):
    con.run(
        f"""CREATE TABLE {table} (id int8, n numeric, b bytea, ts timestamptz, d date, u uuid, j jsonb,
            a int4[], t text, f float8, bo bool)"""
    )
    values = {
        "id": 2**62 + 1,
        "n": Decimal("-98765432109876543210.0123456789"),
        "b": b"\x00zero\x00bytes\xff",
        "ts": dt.datetime(2023, 6, 30, 12, 0, 1, 250000, tzinfo=dt.UTC),
        "d": dt.date(1970, 1, 1),
        "u": uuid.uuid4(),
        "j": {"nested": [1, 2.5, "ü", None, True]},
        "a": [3, 1, 4, 1, 5],
        "t": "ünïcødé ☃ 🐘 'quoted' \"double\"",
        "f": -1.5e300,
        "bo": False,
    }
    cols = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    returned = con.run(f"INSERT INTO {table} ({cols}) VALUES ({params}) RETURNING id", **values)
    assert returned == [[values["id"]]]
    assert con.run(f"SELECT {cols} FROM {table}") == [list(values.values())]
    # The server stored the right bytes (not only a symmetric round trip).
    assert con.run(f"SELECT md5(b), octet_length(t), j->'nested'->>2 FROM {table}") == [
        [hashlib.md5(values["b"]).hexdigest(), len(values["t"].encode()), "ü"]
    ]


def test_transaction_commit_and_rollback(con: pg8000.native.Connection, table: str):
    con.run(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    con.run("START TRANSACTION")
    con.run(f"INSERT INTO {table} VALUES (1), (2)")
    assert con.run(f"SELECT count(*) FROM {table}") == [[2]]
    con.run("ROLLBACK")
    assert con.run(f"SELECT count(*) FROM {table}") == [[0]]
    con.run("START TRANSACTION")
    con.run(f"INSERT INTO {table} VALUES (3)")
    con.run("COMMIT")
    con.run("START TRANSACTION")
    with pytest.raises(DatabaseError) as info:
        con.run(f"INSERT INTO {table} VALUES (3)")
    assert info.value.args[0]["C"] == "23505"
    with pytest.raises(DatabaseError) as aborted:
        con.run("SELECT 1")
    assert aborted.value.args[0]["C"] == "25P02"
    con.run("ROLLBACK")
    assert con.run(f"SELECT array_agg(id) FROM {table}") == [[[3]]]


def test_error_then_working_query(con: pg8000.native.Connection):
    with pytest.raises(DatabaseError) as info:
        con.run("SELECT * FROM no_such_table_p8k")
    err = info.value.args[0]
    assert err["C"] == "42P01"
    assert err["S"] == "ERROR"
    assert err["M"] == 'relation "no_such_table_p8k" does not exist'
    assert con.run("SELECT 'works'") == [["works"]]
    with pytest.raises(DatabaseError) as info:
        con.run("SELECT 1 / :z", z=0)
    assert info.value.args[0]["C"] == "22012"
    assert con.run("SELECT :x::int * 2", x=21) == [[42]]


def test_prepared_statement_and_notices(con: pg8000.native.Connection):
    ps = con.prepare("SELECT :a::int * :b::int")
    try:
        assert [ps.run(a=i, b=i) for i in range(1, 5)] == [[[1]], [[4]], [[9]], [[16]]]
    finally:
        ps.close()
    con.run("DO $$ BEGIN RAISE NOTICE 'hello from %', 'plpgsql'; END $$")
    notice = con.notices[-1]  # raw fields: bytes keys and values
    assert (notice[b"S"], notice[b"C"], notice[b"M"]) == (
        b"NOTICE",
        b"00000",
        b"hello from plpgsql",
    )


def test_large_result_and_listen_notify(pgcloak, pg_app_user, con: pg8000.native.Connection):
    rows = con.run("SELECT g, repeat('z', g % 100) FROM generate_series(1, 50000) g")
    assert len(rows) == 50000
    assert rows[-1] == [50000, ""]
    assert sum(r[0] for r in rows) == 50000 * 50001 // 2
    assert sum(len(r[1]) for r in rows) == sum(g % 100 for g in range(1, 50001))

    channel = f"p8k_{uuid.uuid4().hex[:8]}"
    con.run(f"LISTEN {channel}")
    other = connect(pgcloak, pg_app_user)
    try:
        other.run("SELECT pg_notify(:c, :p)", c=channel, p="pure python")
        sender = other.run("SELECT pg_backend_pid()")[0][0]
    finally:
        other.close()
    # pg8000 only reads notifications while it waits for a result: poll with queries.
    for _ in range(100):
        con.run("SELECT 1")
        if con.notifications:
            break
        time.sleep(0.05)
    assert list(con.notifications) == [(sender, channel, "pure python")]


def test_tls_client_in_relay_mode(pgcloak, make_proxy, pg, pg_app_user):
    """pg8000 over TLS always says it supports channel binding (GS2 flag 'y'): with TLS
    to PostgreSQL too, relay mode refuses that with a clear message, as for libpq."""
    ctx = ssl.create_default_context(cafile=str(pg.ca_file))
    with pytest.raises(DatabaseError) as info:
        connect(pgcloak, pg_app_user, ssl_context=ctx)
    assert info.value.args[0]["C"] == "28000"
    assert "both legs use TLS" in info.value.args[0]["M"]
    with make_proxy(backend_tls_mode="disable") as plain_backend:
        c = connect(
            plain_backend,
            pg_app_user,
            ssl_context=ssl.create_default_context(cafile=str(pg.ca_file)),
        )
        try:
            assert c.run("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == [[False]]
            assert c.run("SELECT :t::text", t="over tls ☃") == [["over tls ☃"]]
        finally:
            c.close()
