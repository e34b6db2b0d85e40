"""Differential cases: the same statements through pgcloak and straight to PostgreSQL.

Every statement of ``CASES`` runs in order on two psycopg connections, one through the
proxy and one direct, each in a schema of its own (``options=-c search_path=...``, so
the start-up packet's options are relayed too). For every statement we compare what
the client saw, byte for byte where the protocol has bytes: every result's status and
command tag, field names, type OIDs, type modifiers and formats, the raw values, the
error fields, notices, notifications, the reported ParameterStatus values and the
transaction status from ReadyForQuery. Things that differ legitimately between two
sessions (backend PIDs, table OIDs, clocks) are never selected.

The list runs twice: with psycopg's text cursor (simple Query protocol when there are
no parameters) and with a binary cursor (always the extended protocol, binary results).
"""

from __future__ import annotations

import contextlib
import pprint
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as psql

from pgcloak.crypto.keys import generate_master_key, master_key_to_text
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres


@dataclass(frozen=True)
class Case:
    sql: str
    params: tuple[Any, ...] | None = None
    error: str | None = None  # the SQLSTATE PostgreSQL must answer with, if any
    simple_only: bool = False  # several statements in one string: simple protocol only


CASES: list[Case] = [
    # DDL
    Case("CREATE TABLE diff_t (id int PRIMARY KEY, name text NOT NULL, amount numeric(12,4), "
         "created date, tags text[], data jsonb, raw bytea)"),
    Case("CREATE INDEX diff_t_name ON diff_t (name)"),
    Case("ALTER TABLE diff_t ADD COLUMN score float8 DEFAULT 0.5"),
    # DML and RETURNING
    Case("INSERT INTO diff_t (id, name, amount, created, tags, data, raw) VALUES "
         "(1, 'alpha', 1.5, '2024-01-01', '{a,b}', '{\"k\": 1}', '\\x00ff00'), "
         "(2, 'béta ☃ 🐘', NULL, NULL, NULL, NULL, NULL), "
         "(3, 'gamma', -0.0001, '1999-12-31', '{}', '[]', '')"),
    Case("INSERT INTO diff_t (id, name) VALUES (4, 'delta'), (5, 'epsilon') RETURNING id, upper(name), score"),
    Case("SELECT * FROM diff_t ORDER BY id"),
    Case("UPDATE diff_t SET amount = amount * 3 WHERE amount IS NOT NULL RETURNING id, amount"),
    Case("DELETE FROM diff_t WHERE id = 5 RETURNING *"),
    Case("UPDATE diff_t SET name = name WHERE false"),
    Case("INSERT INTO diff_t (id, name) VALUES (1, 'duplicate')", error="23505"),
    Case("INSERT INTO diff_t (id, name) VALUES (6, NULL)", error="23502"),
    Case("INSERT INTO diff_t (id, name) VALUES (%s, %s) RETURNING name", params=(7, "from params ü")),
    Case("INSERT INTO diff_t (id, name) VALUES (7, 'again') ON CONFLICT (id) DO UPDATE SET name = "
         "excluded.name || '!' RETURNING id, name"),
    # Errors
    Case("SELECT 1/0", error="22012"),
    Case("SELECT * FROM diff_missing", error="42P01"),
    Case("SELEC 1", error="42601"),
    Case("SELECT 'abc'::int", error="22P02"),
    Case("SELECT nonexistent_column FROM diff_t", error="42703"),
    Case("DO $$ BEGIN RAISE EXCEPTION 'custom %%', 42 USING ERRCODE = 'P0001', DETAIL = 'the detail', "
         "HINT = 'the hint'; END $$", error="P0001"),
    # Queries
    Case("WITH RECURSIVE fib(n, a, b) AS (SELECT 1, 0::numeric, 1::numeric UNION ALL "
         "SELECT n + 1, b, a + b FROM fib WHERE n < 90) SELECT n, a FROM fib ORDER BY n"),
    Case("WITH moved AS (UPDATE diff_t SET score = score + 1 WHERE id < 3 RETURNING id, score) "
         "SELECT * FROM moved ORDER BY id"),
    Case("SELECT id, sum(id) OVER (ORDER BY id), row_number() OVER (ORDER BY id DESC), "
         "lag(name) OVER (ORDER BY id), rank() OVER (PARTITION BY amount IS NULL ORDER BY id) "
         "FROM diff_t ORDER BY id"),
    Case("SELECT NULL, NULL::int, ''::text, 'NULL', NULL::text[], ARRAY[NULL, 1]"),
    Case("SELECT 'ünïcødé ☃ 🐘', length('🐘'), octet_length('🐘'), 'tab\tnewline\nquote''', E'\\\\'"),
    Case("SELECT 0.1 + 0.2, 0.1::float8 + 0.2::float8, 1.0 / 3.0, (2::numeric ^ 200), 'NaN'::numeric, "
         "'-Infinity'::float8, 1e-300::float8, 123456789.123456789::numeric(20,5), "
         "(-32768)::int2, 9223372036854775807::int8, 3.4028235e38::float4"),
    Case("SELECT 9223372036854775807::int8 + 1", error="22003"),
    Case("SELECT count(*), sum(g), avg(g), min(g), max(g) FROM generate_series(1, 100000) g"),
    Case("SELECT g, g * g, md5(g::text) FROM generate_series(1, 2000) g"),
    Case("SELECT '\\x00010203ff'::bytea, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, "
         "interval '1 year 2 months 3 days 04:05:06.789', true, false, '192.168.0.1/24'::inet, "
         "int4range(1, 10), '{1.5, NULL, -2}'::numeric[], '{\"a\": [1, {\"b\": null}]}'::jsonb, "
         "'2024-02-29 13:14:15.123456+05:30'::timestamptz, '23:59:59.999999'::time, point(1.5, -2)"),
    Case("VALUES (1, 'one'), (2, 'two'), (3, NULL)"),
    Case("TABLE diff_t ORDER BY id LIMIT 2"),
    Case("SELECT repeat('x', 200000) AS big, repeat('☃', 50000) AS big_unicode"),
    Case("SELECT %s::int + %s::int AS total, %s::text AS t, %s::numeric AS n, %s::bytea AS b",
         params=(40, 2, "paramètre", 1.25, b"\x00\x01")),
    # Views
    Case("CREATE VIEW diff_v AS SELECT id, name FROM diff_t WHERE id < 3"),
    Case("SELECT * FROM diff_v ORDER BY id"),
    Case("DROP VIEW diff_v"),
    # SHOW / SET and ParameterStatus
    Case("SHOW DateStyle"),
    Case("SET DateStyle = 'SQL, DMY'"),
    Case("SET TimeZone = 'America/New_York'"),
    Case("SELECT '2024-03-04'::date, '2024-07-01 12:00:00+00'::timestamptz, current_setting('TimeZone')"),
    Case("SET application_name = 'diff ☃'"),
    Case("SET IntervalStyle = 'iso_8601'"),
    Case("SELECT interval '1 day 02:03:04'"),
    Case("SET no_such_setting = 1", error="42704"),
    Case("RESET ALL"),
    Case("SHOW TimeZone"),
    # Prepared statements at the SQL level
    Case("PREPARE diff_q(int) AS SELECT id, name FROM diff_t WHERE id = $1"),
    Case("EXECUTE diff_q(1)"),
    Case("EXECUTE diff_q(99)"),
    Case("PREPARE diff_q(int) AS SELECT 1", error="42P05"),
    Case("DEALLOCATE diff_q"),
    Case("EXECUTE diff_q(1)", error="26000"),
    # Explicit transactions, savepoints, aborted state
    Case("BEGIN"),
    Case("INSERT INTO diff_t (id, name) VALUES (10, 'in tx')"),
    Case("SAVEPOINT s1"),
    Case("INSERT INTO diff_t (id, name) VALUES (11, 'rolled back to savepoint')"),
    Case("SELECT 1/0", error="22012"),
    Case("SELECT 1", error="25P02"),
    Case("ROLLBACK TO SAVEPOINT s1"),
    Case("SELECT id, name FROM diff_t WHERE id >= 10 ORDER BY id"),
    Case("COMMIT"),
    Case("BEGIN ISOLATION LEVEL REPEATABLE READ"),
    Case("DELETE FROM diff_t"),
    Case("ROLLBACK"),
    Case("SELECT count(*) FROM diff_t"),
    Case("COMMIT"),  # no transaction in progress: a WARNING, not an error
    # Notices and notifications
    Case("DO $$ BEGIN RAISE NOTICE 'note %%', 42; RAISE WARNING 'careful'; RAISE INFO 'fyi'; END $$"),
    Case("LISTEN diff_channel"),
    Case("NOTIFY diff_channel, 'payload ☃'"),
    Case("SELECT pg_notify('diff_channel', 'second'), pg_notify('diff_channel', '')"),
    Case("UNLISTEN *"),
    # Empty queries
    Case(""),
    Case(";"),
    Case("-- only a comment"),
    # Several statements in one Query message
    Case("SELECT 1 AS a; SELECT 'two' AS b, 2.5 AS c; UPDATE diff_t SET score = 1 WHERE id = 1", simple_only=True),
    Case("INSERT INTO diff_t (id, name) VALUES (50, 'multi'); SELECT 1/0; INSERT INTO diff_t (id, name) "
         "VALUES (51, 'never')", error="22012", simple_only=True),
    Case("SELECT count(*) FROM diff_t WHERE id >= 50"),
    Case("BEGIN; INSERT INTO diff_t (id, name) VALUES (60, 'explicit'); COMMIT; SELECT name FROM diff_t WHERE id = 60",
         simple_only=True),
    Case("EXPLAIN (COSTS OFF) SELECT * FROM diff_t WHERE id = 1"),
    # The table the protected proxy's policy names (empty, shared by both sides): these
    # statements are planned by pgcloak and the answers must still be PostgreSQL's.
    Case("SELECT count(*), max(id) FROM diff_pii"),
    Case("SELECT id, email FROM diff_pii WHERE email = 'someone@example.com'"),
    Case("SELECT t.id, p.email FROM diff_t t LEFT JOIN diff_pii p ON p.id = t.id ORDER BY t.id"),
    Case("SELECT 'mentions diff_pii in a literal' AS mention"),
    Case("UPDATE diff_pii SET email = 'x@example.com' WHERE id = -1"),
    Case("BEGIN"),  # rows written inside a transaction are invisible to the other side
    Case("INSERT INTO diff_pii (id, email) VALUES (1, 'ann@example.com'), (2, NULL) RETURNING id, email"),
    Case("INSERT INTO diff_pii (id, email) VALUES (%s, %s) RETURNING email", params=(3, "bob@example.com")),
    Case("SELECT id, email FROM diff_pii WHERE email = 'ann@example.com'"),
    Case("SELECT id, email FROM diff_pii WHERE email = %s", params=("bob@example.com",)),
    Case("SELECT id, email FROM diff_pii ORDER BY id"),
    Case("ROLLBACK"),
    Case("TRUNCATE diff_t"),
    Case("DROP TABLE diff_t"),
    Case("SELECT * FROM diff_t", error="42P01"),
]  # fmt: skip

PARAMETERS = ("application_name", "DateStyle", "TimeZone", "IntervalStyle", "standard_conforming_strings",
              "client_encoding", "server_encoding", "integer_datetimes", "is_superuser", "session_authorization")  # fmt: skip

ERROR_FIELDS = ("severity_nonlocalized", "sqlstate", "message_primary", "message_detail", "message_hint",
                "statement_position", "context", "schema_name", "table_name", "column_name", "constraint_name")  # fmt: skip


class Recorder:
    """One side: a connection and everything its client saw, statement by statement."""

    kind = "direct"

    def __init__(self, dsn: str, schema: str, pii_table: str) -> None:
        self.schema = schema
        self.pii_table = pii_table
        self.channel = f"{schema}_channel"  # both sides share one database: not one channel
        self.conn = psycopg.connect(
            dsn, autocommit=True, options=f"-c search_path={schema}", application_name="pgcloak-diff",
            connect_timeout=10,
        )  # fmt: skip
        self.notices: list[tuple[str | None, ...]] = []
        self.notifies: list[tuple[str, str, bool]] = []
        self.conn.add_notice_handler(
            lambda d: self.notices.append(
                (d.severity_nonlocalized, d.sqlstate, d.message_primary, d.message_detail)
            )
        )
        self.conn.add_notify_handler(
            lambda n: self.notifies.append(
                (
                    n.channel.replace(self.channel, "diff_channel"),
                    n.payload,
                    n.pid == self.conn.info.backend_pid,
                )
            )
        )

    def run(self, case: Case, binary: bool) -> dict[str, Any]:
        self.notices.clear()
        self.notifies.clear()
        cur = self.conn.cursor(binary=binary)
        out: dict[str, Any] = {}
        query = case.sql.replace("diff_channel", self.channel).replace("diff_pii", self.pii_table)
        try:
            if case.params is None:
                cur.execute(query.replace("%%", "%"))
            else:
                cur.execute(query, case.params)
        except psycopg.Error as exc:
            out["error"] = {f: self._unschema(getattr(exc.diag, f)) for f in ERROR_FIELDS}
        else:
            results = []
            while True:
                results.append(self._result(cur))
                if not cur.nextset():
                    break
            out["results"] = results
        out["notices"] = list(self.notices)
        out["notifies"] = list(self.notifies)
        out["transaction_status"] = self.conn.info.transaction_status.name
        out["parameters"] = {p: self.conn.info.parameter_status(p) for p in PARAMETERS}
        return out

    def _unschema(self, value: str | None) -> str | None:
        """Each side has its own schema: name it the same way on both."""
        if value is None:
            return None
        value = value.replace(self.schema, "<schema>").replace(self.pii_table, "diff_pii")
        return value.replace(self.pii_table.rpartition(".")[2], "diff_pii")

    @staticmethod
    def _result(cur: psycopg.Cursor[Any]) -> dict[str, Any]:
        res = cur.pgresult
        assert res is not None
        fields = [
            (res.fname(i), res.ftype(i), res.fmod(i), res.fformat(i), res.fsize(i))
            for i in range(res.nfields)
        ]
        rows = [[res.get_value(r, c) for c in range(res.nfields)] for r in range(res.ntuples)]
        return {
            "status": res.status,
            "command": res.command_status,
            "rowcount": cur.rowcount,
            "fields": fields,
            "rows": rows,
        }

    def close(self) -> None:
        self.conn.close()


def pii_policy(table: str) -> str:
    return (
        "version: 1\n"
        "tables:\n"
        f"  public.{table}:\n"
        "    email: {encrypt: true, index: exact, normalize: email}\n"
        "default_read: reveal\n"
        "guards: {unbounded_select: allow, max_pii_rows: null}\n"
    )


@pytest.fixture(params=["relay", "protected"])
def sides(
    request, pgcloak, make_proxy, pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path: Path
) -> Iterator[tuple[Recorder, Recorder]]:
    """(through pgcloak, direct). ``relay``: the shared proxy, no policy. ``protected``: a
    proxy with a policy (over a table of its own), so every statement takes the
    protected path: captured client messages, SQL planning, whole-message results."""
    login = pg_app_user
    tag = uuid.uuid4().hex[:8]
    schemas = {"proxy": f"diff_proxy_{tag}", "direct": f"diff_direct_{tag}"}
    pii = f"diff_pii_{tag}"
    direct_dsn = pg.dsn(login.user, login.password, login.dbname)
    with contextlib.ExitStack() as stack:
        if request.param == "relay":
            proxy = pgcloak
        else:
            policy = tmp_path / "policy.yaml"
            policy.write_text(pii_policy(pii), encoding="utf-8")
            key = master_key_to_text(generate_master_key())
            proxy = stack.enter_context(make_proxy(policy=str(policy), master_key=key))
        admin = stack.enter_context(psycopg.connect(direct_dsn, autocommit=True))
        for schema in schemas.values():
            admin.execute(psql.SQL("CREATE SCHEMA {}").format(psql.Identifier(schema)))
        admin.execute(
            psql.SQL("CREATE TABLE public.{} (id int, email text)").format(psql.Identifier(pii))
        )
        proxied = Recorder(
            proxy.dsn(login.user, login.password, login.dbname), schemas["proxy"], f"public.{pii}"
        )
        proxied.kind = request.param
        direct = Recorder(direct_dsn, schemas["direct"], f"public.{pii}")
        try:
            yield proxied, direct
        finally:
            proxied.close()
            direct.close()
            for schema in schemas.values():
                admin.execute(psql.SQL("DROP SCHEMA {} CASCADE").format(psql.Identifier(schema)))
            admin.execute(psql.SQL("DROP TABLE public.{}").format(psql.Identifier(pii)))


def test_cases_are_varied_enough():
    assert len(CASES) >= 40
    assert sum(c.error is not None for c in CASES) >= 10
    assert any(c.simple_only for c in CASES) and any(c.params for c in CASES)


@pytest.mark.parametrize("binary", [False, True], ids=["text-simple", "binary-extended"])
def test_same_answers_through_proxy_and_direct(sides: tuple[Recorder, Recorder], binary: bool):
    proxied, direct = sides
    assert proxied.conn.info.backend_pid != direct.conn.info.backend_pid
    ran = 0
    for number, case in enumerate(CASES):
        if binary and case.simple_only:
            continue
        expected = direct.run(case, binary)
        got = proxied.run(case, binary)
        where = f"case {number}: {case.sql[:80]!r}"
        # The direct answer is what the case says it is (so the comparison means something).
        if case.error is None:
            assert "error" not in expected, f"{where}: PostgreSQL answered {expected['error']}"
        else:
            assert expected.get("error", {}).get("sqlstate") == case.error, f"{where}: {expected}"
        if got != expected:
            differing = {k: {"proxy": got.get(k), "direct": expected.get(k)} for k in got.keys() | expected.keys()
                         if got.get(k) != expected.get(k)}  # fmt: skip
            pytest.fail(f"{where}\n{pprint.pformat(differing, width=120)}")
        ran += 1
    assert ran >= 40


def test_differential_sanity_checks(sides: tuple[Recorder, Recorder]):
    """A few answers spelled out, so that a proxy and a server that both misbehave the
    same way (e.g. both sides accidentally the proxy) would still be noticed."""
    proxied, direct = sides
    assert proxied.conn.info.port != direct.conn.info.port
    for side in (proxied, direct):
        out = side.run(Case("SELECT 1 AS a; SELECT 'two' AS b", simple_only=True), binary=False)
        assert [r["rows"] for r in out["results"]] == [[[b"1"]], [[b"two"]]]
        assert [r["fields"][0][:2] for r in out["results"]] == [(b"a", 23), (b"b", 25)]
        out = side.run(Case("SELECT 1/0"), binary=True)
        assert out["error"]["sqlstate"] == "22012"
        assert out["error"]["message_primary"] == "division by zero"
        out = side.run(Case("DO $$ BEGIN RAISE NOTICE 'hi'; END $$"), binary=False)
        assert out["notices"] == [("NOTICE", "00000", "hi", None)]
        assert out["results"][0]["command"] == b"DO"


def test_protected_side_really_encrypts(sides: tuple[Recorder, Recorder]):
    """The protected variant is not a relay in disguise: what it writes is ciphertext."""
    proxied, direct = sides
    insert = Case("INSERT INTO diff_pii (id, email) VALUES (99, 'zed@example.com') RETURNING email")
    assert proxied.run(insert, binary=False)["results"][0]["rows"] == [[b"zed@example.com"]]
    try:
        stored = direct.run(Case("SELECT email FROM diff_pii WHERE id = 99"), binary=False)[
            "results"
        ][0]["rows"]
        seen = proxied.run(
            Case("SELECT email FROM diff_pii WHERE email = 'zed@example.com'"), binary=False
        )
        assert seen["results"][0]["rows"] == [[b"zed@example.com"]]
        if proxied.kind == "relay":
            assert stored == [[b"zed@example.com"]]
        else:
            assert len(stored) == 1 and stored[0][0] is not None
            assert b"zed" not in stored[0][0] and len(stored[0][0]) > 40
    finally:
        direct.run(Case("DELETE FROM diff_pii WHERE id = 99"), binary=False)
