"""The audit trail as real clients produce it through pgcloak (issue #4, item 5).

Every test starts its own in-process pgcloak in front of one shared database (the
encryption test schema: ``users`` with protected email/phone/ssn/name/loyalty_id), with a
policy whose ``audit:`` section sends the trail to a fresh directory. So a test sees
exactly the events its own clients caused, and the assertions can be exact:

* the events of each statement kind (insert/select/update/delete/COPY, refusals),
  per ``audit.statements`` mode (pii, all, writes), with rows and durations;
* connection events: authenticated (TLS or not), auth_failed (relay auth: PostgreSQL's
  28P01; pgcloak's own SCRAM), disconnected with totals;
* pipelined extended batches: rows and errors attributed to the right statement;
* no inserted or looked-up value anywhere in the audit files or the proxy's log;
* ``pgcloak audit who-accessed`` (CLI) lists exactly the events that looked a person up;
* ``pgcloak audit verify`` (CLI) passes a clean trail and names each kind of tampering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env, policy_yaml, unique
from raw_wire import COPY_DONE, SYNC, bind, copy_data, execute, parse, read_messages, types

from pgcloak.audit.sinks import iter_file_lines
from pgcloak.audit.verify import verify
from pgcloak.demo.postgres import TemporaryPostgres
from proxyctl import SubprocessProxy, ThreadedProxy, make_settings

PSQL = shutil.which("psql")
USERS = "public.users"
EMAIL, PHONE, SSN, NAME = (f"{USERS}.{c}" for c in ("email", "phone", "ssn", "name"))
#: The test policy of the encryption tests, with users.name encrypted too.
POLICY = policy_yaml(extra_users="    name: {encrypt: true}\n")
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
CLIENT = re.compile(r"^127\.0\.0\.1:\d+$")
WAIT = 10.0


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def env(
    pg: TemporaryPostgres, pg_app_user: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EncEnv]:
    """The shared database (and a master key); each test runs its own audited proxy."""
    with encryption_env(
        pg, pg_app_user, tmp_path_factory.mktemp("audit_trail"), "audit", policy=POLICY
    ) as e:
        yield e


def audit_section(**overrides: Any) -> str:
    """The policy's ``audit:`` block. The sink path is relative: in the proxy's working
    directory (``audited`` starts it in ``directory``)."""
    audit: dict[str, Any] = {
        "sink": "file:trail/audit.jsonl",
        "statements": "pii",
        "seal_interval": 3600,
        "fsync": "never",
        "on_audit_failure": "allow",
    }
    audit.update(overrides)
    return "audit:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in audit.items())


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def read_records(files: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for p in files for line in iter_file_lines(p) if line.strip()]


def trail_files(directory: Path) -> list[Path]:
    """Audit files, rotated ones (``.<timestamp>`` suffix) first; never the spill file."""
    found = [p for p in directory.rglob("*.jsonl*") if p.is_file() and ".spill" not in p.name]
    return sorted(found, key=lambda p: (p.suffix == ".jsonl", p.name))


def key_env(env: EncEnv) -> dict[str, str]:
    """The environment for a pgcloak CLI child: the master key, nothing of PG*."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return base | {"PGCLOAK_MASTER_KEY": env.key_text}


def pgcloak_cli(env: EncEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgcloak.cli", *args],
        env=key_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Audited:
    """A pgcloak of its own in front of the shared database, auditing to ``directory``."""

    env: EncEnv
    proxy: ThreadedProxy
    directory: Path

    @property
    def login(self) -> Any:
        return self.env.login

    def psy(
        self, app: str, *, password: str | None = None, **params: str
    ) -> psycopg.Connection[Any]:
        dsn = self.proxy.dsn(
            self.login.user,
            password or self.login.password,
            self.login.dbname,
            application_name=app,
            **params,
        )
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)

    async def apg(self, app: str, *, password: str | None = None) -> asyncpg.Connection:
        return await asyncpg.connect(
            **self.proxy.kwargs(
                self.login.user, password or self.login.password, self.login.dbname
            ),
            ssl=False,
            timeout=10,
            server_settings={"application_name": app},
        )

    def psql(self, app: str, script: str) -> subprocess.CompletedProcess[str]:
        """``script`` through pgcloak with psql (simple protocol), going on after errors."""
        assert PSQL is not None
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        environ |= {
            "PGHOST": self.proxy.host,
            "PGPORT": str(self.proxy.port),
            "PGUSER": self.login.user,
            "PGPASSWORD": self.login.password,
            "PGDATABASE": self.login.dbname,
            "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": app,
        }
        return subprocess.run(
            [PSQL, "-X", "-q", "-A", "-t", "-f", "-"],
            input=script,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def settle(self) -> None:
        """Every session closed (so its disconnect event exists) and every event written."""
        wait_until(lambda: self.proxy.session_count == 0, "the proxy's sessions to end")
        server = self.proxy.server
        assert server is not None and server.audit is not None
        self.proxy.call(server.audit.flush, 10)

    def records(self) -> list[dict[str, Any]]:
        self.settle()
        return read_records(trail_files(self.directory))

    def events(self, app: str | None = None, *types: str) -> list[dict[str, Any]]:
        """Session events (of ``types``, default all) of the sessions named ``app``."""
        return [
            r
            for r in self.records()
            if r["type"] not in ("seal", "gap")
            and (app is None or r["application_name"] == app)
            and (not types or r["type"] in types)
        ]

    def stop(self) -> None:
        self.proxy.stop()


@contextlib.contextmanager
def audited(env: EncEnv, directory: Path, **settings: Any) -> Iterator[Audited]:
    """pgcloak with the test policy plus ``audit:`` (``audit=dict(...)``) and ``settings``."""
    audit = settings.pop("audit", {})
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.yaml"
    policy.write_text(POLICY + audit_section(**audit), encoding="utf-8")
    tls = env.pg.tls_files
    base: dict[str, Any] = {
        "backend": f"postgresql://{env.pg.host}:{env.pg.port}",
        "client_tls_cert": str(tls.server_cert),
        "client_tls_key": str(tls.server_key),
        "backend_tls_ca": str(tls.ca_cert),
        "drain_timeout": 0,
        "policy": str(policy),
        "master_key": env.key_text,
    }
    base.update(settings)
    with ThreadedProxy(make_settings(**base), cwd=directory) as proxy:
        yield Audited(env, proxy, directory)


def project(event: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {f: event[f] for f in fields}


STATEMENT_FACTS = (
    "kind",
    "tables",
    "columns_read",
    "columns_written",
    "rows",
    "decision",
    "sqlstate",
)


def check_common(events: list[dict[str, Any]], env: EncEnv, app: str) -> None:
    """What every session event carries, and that a session's events share it."""
    assert events
    sessions = {e["session"] for e in events}
    assert len(sessions) == 1, sessions
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    for e in events:
        assert TS.match(e["ts"]), e["ts"]
        assert e["user"] == env.login.user
        assert e["database"] == env.login.dbname
        assert e["application_name"] == app
        assert CLIENT.match(e["client"]), e["client"]
        assert e["worker"] is None
        if e["type"] in ("statement", "refusal"):
            assert isinstance(e["fingerprint"], str) and e["fingerprint"]
            assert e["pii"] == sorted(set(e["columns_read"]) | set(e["columns_written"]))


# --------------------------------------------------------------------------- statements


def test_statement_events_of_each_kind(env: EncEnv, tmp_path: Path) -> None:
    """pii mode: one event per PII statement, with its facts, rows and duration; nothing
    for statements that touch no protected column; refusals always; then verify OK."""
    emails = [unique("kind") for _ in range(4)]
    with audited(env, tmp_path) as a:
        with a.psy("kinds") as conn:
            ids = [
                conn.execute(
                    "INSERT INTO users (email, phone, ssn, name) VALUES (%s, %s, %s, %s) RETURNING id",
                    (emails[0], "+1 202 555 0101", "078-05-1101", "Kind One"),
                ).fetchone()[0]  # type: ignore[index]
            ]
            ids += [
                r[0]
                for r in conn.execute(
                    "INSERT INTO users (email, name) VALUES (%s, %s), (%s, %s) RETURNING id",
                    (emails[1], "Kind Two", emails[2], "Kind Three"),
                ).fetchall()
            ]
            got = conn.execute(
                "SELECT email, name FROM users WHERE id = ANY(%s) ORDER BY id", (ids,)
            ).fetchall()
            assert got == [
                (emails[0], "Kind One"),
                (emails[1], "Kind Two"),
                (emails[2], "Kind Three"),
            ]
            assert (
                conn.execute(
                    "UPDATE users SET ssn = %s WHERE id = ANY(%s)", ("000-00-0000", ids[:2])
                ).rowcount
                == 2
            )
            assert conn.execute("DELETE FROM users WHERE email = %s", (emails[2],)).rowcount == 1
            with conn.cursor().copy("COPY users (email, phone) FROM STDIN") as copy:
                copy.write_row((emails[3], "+1 202 555 0104"))
                copy.write_row((unique("kind"), "+1 202 555 0105"))
            id_list = ", ".join(str(i) for i in ids)
            with conn.cursor().copy(
                f"COPY (SELECT email FROM users WHERE id IN ({id_list}) ORDER BY id) TO STDOUT"
            ) as copy:
                assert list(copy.rows()) == [(emails[0],), (emails[1],)]
            # Not PII: no event in pii mode.
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute(
                "INSERT INTO plain_contacts (email, phone) VALUES (%s, %s)",
                ("plain@example.com", "1"),
            )
            assert conn.execute("SELECT count(*) FROM plain_contacts").fetchone()[0] >= 1  # type: ignore[index]
            # A refusal: LIKE on an encrypted column.
            with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
                conn.execute("SELECT id FROM users WHERE email LIKE %s", ("kind-%",))
            assert refused.value.sqlstate == "0A000"
            # The session is still usable, and the next statement is attributed correctly.
            assert conn.execute(
                "SELECT phone FROM users WHERE email = %s", (emails[0],)
            ).fetchall() == [("+1 202 555 0101",)]
        events = a.events("kinds")
    check_common(events, env, "kinds")
    assert [e["type"] for e in events] == [
        "connection",
        *["statement"] * 7,
        "refusal",
        "statement",
        "connection",
    ]

    first, *statements, last = events
    assert project(first, "action", "tls", "bytes_in", "statements") == {
        "action": "authenticated",
        "tls": False,
        "bytes_in": None,
        "statements": None,
    }
    facts = [project(e, *STATEMENT_FACTS) for e in statements]
    allow = {"decision": "allow", "sqlstate": None}
    assert facts == [
        {
            "kind": "insert",
            "tables": [USERS],
            "columns_read": [],
            "columns_written": [EMAIL, NAME, PHONE, SSN],
            "rows": 1,
            **allow,
        },
        {
            "kind": "insert",
            "tables": [USERS],
            "columns_read": [],
            "columns_written": [EMAIL, NAME],
            "rows": 2,
            **allow,
        },
        {
            "kind": "select",
            "tables": [USERS],
            "columns_read": [EMAIL, NAME],
            "columns_written": [],
            "rows": 3,
            **allow,
        },
        {
            "kind": "update",
            "tables": [USERS],
            "columns_read": [],
            "columns_written": [SSN],
            "rows": 2,
            **allow,
        },
        {
            "kind": "delete",
            "tables": [USERS],
            "columns_read": [],
            "columns_written": [],
            "rows": 1,
            **allow,
        },
        {
            "kind": "copy_in",
            "tables": [USERS],
            "columns_read": [],
            "columns_written": [EMAIL, PHONE],
            "rows": 2,
            **allow,
        },
        {
            "kind": "copy_out",
            "tables": [USERS],
            "columns_read": [EMAIL],
            "columns_written": [],
            "rows": 2,
            **allow,
        },
        {
            "kind": "select",
            "tables": [USERS],
            "columns_read": [],
            "columns_written": [],
            "rows": None,
            "decision": "deny",
            "sqlstate": "0A000",
        },
        {
            "kind": "select",
            "tables": [USERS],
            "columns_read": [PHONE],
            "columns_written": [],
            "rows": 1,
            **allow,
        },
    ]
    for e in statements:
        if e["type"] == "statement":
            assert isinstance(e["duration_ms"], float | int) and 0 <= e["duration_ms"] < 10_000, e
            assert e["reason"] is None
    # Lookups hold the blind index of the value searched for, never the value.
    delete, refusal, lookup = statements[4], statements[7], statements[8]
    assert delete["lookups"] == {EMAIL: [env.index_of(USERS, "email", emails[2])]}
    assert lookup["lookups"] == {EMAIL: [env.index_of(USERS, "email", emails[0])]}
    assert (
        refusal["type"] == "refusal"
        and refusal["decision"] == "deny"
        and refusal["sqlstate"] == "0A000"
    )
    assert refusal["rows"] is None and refusal["kind"] == "select" and refusal["tables"] == [USERS]
    assert "LIKE" in refusal["reason"] and EMAIL in refusal["reason"]
    assert "kind-" not in json.dumps(refusal)

    assert last["action"] == "disconnected" and last["tls"] is False
    assert last["statements"] == 12  # every Execute or Query counts: PII or not, refused or not
    assert last["bytes_in"] > 0 and last["bytes_out"] > last["bytes_in"] // 10
    assert last["duration_ms"] > 0 and last["reason"] == "client closed"

    files = trail_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["trail/audit.jsonl"]
    report = verify([(str(p), iter_file_lines(p)) for p in files], env.keyring.audit_key())
    assert report.ok, report.first_problem
    (chain,) = report.chains.values()
    assert chain.sealed and chain.events == len(events)


def _mode_workload(a: Audited, app: str, email: str) -> None:
    with a.psy(app) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute(
            "INSERT INTO plain_contacts (email, phone) VALUES (%s, %s)", (f"{app}@example.com", app)
        )
        assert (
            conn.execute(
                "UPDATE plain_contacts SET phone = %s WHERE email = %s",
                (app + "2", f"{app}@example.com"),
            ).rowcount
            == 1
        )
        assert (
            conn.execute(
                "DELETE FROM plain_contacts WHERE email = %s", (f"{app}@example.com",)
            ).rowcount
            == 1
        )
        conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))
        assert conn.execute("SELECT id FROM users WHERE email = %s", (email,)).rowcount == 1


def test_statements_mode_all_records_every_statement(env: EncEnv, tmp_path: Path) -> None:
    with audited(env, tmp_path, audit={"statements": "all"}) as a:
        _mode_workload(a, "mode-all", unique("all"))
        if PSQL is not None:
            done = a.psql("mode-all-psql", "SELECT 41 + 1;\n")
            assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
        events = a.events("mode-all", "statement")
        simple = a.events("mode-all-psql", "statement")
    assert [(e["kind"], e["rows"], e["decision"]) for e in events] == [
        ("select", 1, "allow"),
        ("insert", 1, "allow"),
        ("update", 1, "allow"),
        ("delete", 1, "allow"),
        ("insert", 1, "allow"),
        ("select", 1, "allow"),
    ]
    # Statements naming no protected table touch no PII (and are not parsed at all).
    assert all(e["pii"] == [] and e["lookups"] == {} for e in events[:4])
    assert events[4]["columns_written"] == [EMAIL] and events[5]["lookups"].keys() == {EMAIL}
    if PSQL is not None:
        assert [(e["kind"], e["rows"]) for e in simple] == [("select", 1)]


def test_statements_mode_writes_records_writes_and_pii_reads(env: EncEnv, tmp_path: Path) -> None:
    with audited(env, tmp_path, audit={"statements": "writes"}) as a:
        _mode_workload(a, "mode-writes", unique("writes"))
        events = a.events("mode-writes", "statement")
    # SELECT 1 is neither a write nor PII: the only statement without an event.
    assert [(e["kind"], e["rows"]) for e in events] == [
        ("insert", 1),
        ("update", 1),
        ("delete", 1),
        ("insert", 1),
        ("select", 1),
    ]
    assert [e["pii"] for e in events] == [[], [], [], [EMAIL], []]


def test_statements_mode_writes_records_copy_and_multi_statement_writes(
    env: EncEnv, tmp_path: Path
) -> None:
    """COPY FROM is a write; so is a simple Query holding a write among other statements."""
    with audited(env, tmp_path, audit={"statements": "writes"}) as a:
        with (
            a.psy("writes-copy") as conn,
            conn.cursor().copy("COPY plain_contacts (email, phone) FROM STDIN") as copy,
        ):
            copy.write_row(("copy@example.com", "1"))
            copy.write_row(("copy2@example.com", "2"))
        if PSQL is not None:
            done = a.psql(
                "writes-multi",
                "SELECT 1 \\; INSERT INTO plain_contacts (email) VALUES ('multi@example.com') \\; SELECT 2;\n"
                "SELECT 3; SELECT 4;\n",
            )
            assert done.returncode == 0, done.stderr
        copies = a.events("writes-copy", "statement")
        multi = a.events("writes-multi", "statement")
    assert [(e["kind"], e["tables"], e["rows"]) for e in copies] == [
        ("copy", ["public.plain_contacts"], 2)
    ]
    if PSQL is not None:
        # One Query, one event; its rows are the sum over its statements (1 + 1 + 1).
        assert [(e["kind"], e["rows"]) for e in multi] == [("select_insert", 3)]  # not SELECT 3, 4


def test_pii_mode_records_protected_values_read_through_views_functions_and_cursors(
    env: EncEnv, tmp_path: Path
) -> None:
    """The plan of ``SELECT * FROM people`` names no protected column, yet pgcloak decrypts
    what the view returns (the values carry their key ids): recorded, with the columns
    the values came from. A statement returning no protected value is still not."""
    with env.direct() as d:
        d.execute("CREATE OR REPLACE VIEW people AS SELECT id, email, phone, 'x'::text AS tag FROM users")
        d.execute(
            "CREATE OR REPLACE FUNCTION phone_of(i bigint) RETURNS text LANGUAGE sql "
            "AS $$ SELECT phone FROM users WHERE id = i $$"
        )
    email = unique("viewread")
    with audited(env, tmp_path) as a:
        with a.psy("via-view") as conn:
            (uid,) = conn.execute(
                "INSERT INTO users (email, phone) VALUES (%s, '555-0188') RETURNING id", (email,)
            ).fetchone()
            assert conn.execute("SELECT email, phone FROM people WHERE id = %s", (uid,)).fetchall() == [
                (email, "555-0188")
            ]
            assert conn.execute("SELECT phone_of(%s)", (uid,)).fetchone() == ("555-0188",)
            assert conn.execute("SELECT tag FROM people WHERE id = %s", (uid,)).fetchone() == ("x",)
            with conn.transaction():
                conn.execute("DECLARE c CURSOR FOR SELECT email FROM people WHERE id = %s", (uid,))
                assert conn.execute("FETCH 1 FROM c").fetchall() == [(email,)]
        events = a.events("via-view", "statement")
    assert [(e["kind"], e["columns_read"], e["rows"]) for e in events] == [
        ("insert", [], 1),
        ("select", [EMAIL, PHONE], 1),  # the view
        ("select", [PHONE], 1),  # the function
        ("other", [EMAIL], 1),  # the FETCH (its DECLARE over the view returns nothing)
    ]
    assert events[0]["columns_written"] == [EMAIL, PHONE]
    assert [e["fingerprint"] for e in events[1:]] == [
        "SELECT email, phone FROM people WHERE id = $1",
        "SELECT phone_of ($1)",
        "FETCH ? FROM c",
    ]
    assert all(e["pii"] == e["columns_read"] for e in events[1:])
    assert all(email not in json.dumps(e) for e in events)


def test_watched_statement_names_every_column_it_returned(env: EncEnv, tmp_path: Path) -> None:
    """A view read whose one row holds 16 e-mail values before an SSN: the statement
    revealed the SSN, so the trail names public.users.ssn (every value's key id is read:
    padding a result cannot hide a column)."""
    email = unique("pad")
    with env.direct() as d:
        d.execute("CREATE OR REPLACE VIEW people_pad AS SELECT id, email, ssn FROM users")
    with audited(env, tmp_path) as a:
        with a.psy("r2-pad") as conn:
            (uid,) = conn.execute(
                "INSERT INTO users (email, ssn) VALUES (%s, '078-05-1120') RETURNING id", (email,)
            ).fetchone()
            padded = ", ".join(["email"] * 16)
            row = conn.execute(f"SELECT {padded}, ssn FROM people_pad WHERE id = %s", (uid,)).fetchone()
            assert row is not None and row[-1] == "078-05-1120"  # revealed to the client
        events = a.events("r2-pad", "statement")
    reads = [e["columns_read"] for e in events if e["kind"] == "select"]
    assert reads == [[EMAIL, SSN]], reads


def test_text_resembling_an_envelope_is_no_protected_value(env: EncEnv, tmp_path: Path) -> None:
    """pii mode records a statement whose plan names no protected column only if its
    result carries protected values. A literal that merely contains ``pgc1:`` (no key id
    can be read from it, none of the policy's) is not one: no event."""
    with audited(env, tmp_path) as a:
        with a.psy("r2-lookalike") as conn:
            assert conn.execute("SELECT 'pgc1:AAAAAAAAAAAA'::text").fetchone() == ("pgc1:AAAAAAAAAAAA",)
            assert conn.execute("SELECT 1").fetchone() == (1,)
        events = a.events("r2-lookalike", "statement")
    assert events == [], [(e["kind"], e["fingerprint"], e["columns_read"]) for e in events]


def test_extended_copy_keeps_the_audit_queue_in_step(env: EncEnv, tmp_path: Path) -> None:
    """An extended-protocol COPY FROM STDIN as libpq sends it: Parse/Bind/Execute/Sync,
    then the data, CopyDone and Sync. PostgreSQL ignores the first Sync (copy-in mode):
    one ReadyForQuery for two Syncs. The audit queue follows that too (CopyInResponse), so
    the statement after the COPY is recorded, with its own rows."""
    email = unique("xcopy")
    with audited(env, tmp_path) as a:
        with a.psy("r2-xcopy") as conn:
            start = parse("", "COPY users (email) FROM STDIN") + bind("", "") + execute("") + SYNC
            os.write(conn.pgconn.socket, start)
            got = read_messages(conn, lambda out: "G" in types(out) or "Z" in types(out))
            assert types(got)[-1] == "G", got
            os.write(conn.pgconn.socket, copy_data(f"{email}\n") + COPY_DONE + SYNC)
            got = read_messages(conn, lambda out: "Z" in types(out))
            assert types(got) == ["C", "Z"], got
            rows = conn.execute("SELECT id FROM users WHERE email = %s", (email,)).fetchall()
            assert len(rows) == 1
        events = a.events("r2-xcopy", "statement")
    assert [(e["kind"], e["rows"]) for e in events] == [("copy_in", 1), ("select", 1)], events


def test_truncate_of_a_protected_table_is_recorded(env: EncEnv, tmp_path: Path) -> None:
    with audited(env, tmp_path, audit={"statements": "writes"}) as a:
        with a.psy("writes-truncate") as conn:
            conn.execute("CREATE TEMP TABLE users (LIKE public.users)")  # pg_temp.users shadows it
            conn.execute("TRUNCATE users")
        events = a.events("writes-truncate", "statement")
    assert "truncate" in [e["kind"] for e in events]


# --------------------------------------------------------------------------- clients


async def test_asyncpg_prepared_statements_and_batches(env: EncEnv, tmp_path: Path) -> None:
    """asyncpg: named prepared statements, executemany (one Sync for many Executes) and a
    statement PostgreSQL rejects, each attributed to its own event."""
    emails = [unique("apg") for _ in range(3)]
    with audited(env, tmp_path) as a:
        conn = await a.apg("apg")
        try:
            await conn.executemany(
                "INSERT INTO users (email, phone) VALUES ($1, $2)",
                [(e, f"+1 202 555 01{i:02d}") for i, e in enumerate(emails)],
            )
            find = await conn.prepare("SELECT id, phone FROM users WHERE email = $1")
            for e in (emails[1], emails[0], "nobody-apg@example.com"):
                await find.fetch(e)
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO users (email) VALUES ($1)", emails[2].upper())
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM users WHERE email = ANY($1::text[])", emails
                )
                == 3
            )
        finally:
            await conn.close()
        events = a.events("apg", "statement")
    index = [env.index_of(USERS, "email", e) for e in (*emails, "nobody-apg@example.com")]
    assert [(e["kind"], e["rows"], e["sqlstate"], e["lookups"].get(EMAIL)) for e in events] == [
        ("insert", 1, None, None),
        ("insert", 1, None, None),
        ("insert", 1, None, None),
        ("select", 1, None, [index[1]]),
        ("select", 1, None, [index[0]]),
        ("select", 0, None, [index[3]]),
        ("insert", None, "23505", None),
        ("select", 1, None, index[:3]),
    ]
    assert events[6]["reason"] == "failed in PostgreSQL" and events[6]["decision"] == "allow"
    assert [e["columns_read"] for e in events[3:6]] == [[PHONE]] * 3


@pytest.mark.skipif(PSQL is None, reason="psql is not installed")
def test_psql_simple_queries_and_refusals(env: EncEnv, tmp_path: Path) -> None:
    """psql: literals in the text (looked up by their blind index), several statements in
    one Query (one event, rows summed), a refusal, then a statement that works."""
    a_mail, b_mail = unique("psql"), unique("psql")
    script = (
        f"INSERT INTO users (email, ssn) VALUES ('{a_mail}', '111-22-3333'), ('{b_mail}', NULL);\n"
        f"INSERT INTO users (email) VALUES ('{unique('psql')}') \\; "
        f"SELECT ssn FROM users WHERE email = '{a_mail.upper()}';\n"
        f"SELECT id FROM users WHERE email LIKE '{a_mail[:8]}%';\n"
        f"UPDATE users SET ssn = '999-99-9999' WHERE email IN ('{a_mail}', '{b_mail}');\n"
        "SELECT 7;\n"
    )
    with audited(env, tmp_path) as a:
        done = a.psql("psql", script)
        events = a.events("psql")
    assert done.stdout.split() == ["111-22-3333", "7"], done.stdout
    assert "0A000" in done.stderr or "LIKE" in done.stderr
    check_common(events, env, "psql")
    facts = [(e["type"], e["kind"], e["rows"], e["decision"], e["sqlstate"]) for e in events[1:-1]]
    assert facts == [
        ("statement", "insert", 2, "allow", None),
        ("statement", "insert_select", 2, "allow", None),
        ("refusal", "select", None, "deny", "0A000"),
        ("statement", "update", 2, "allow", None),
    ]
    ix = lambda v: env.index_of(USERS, "email", v)  # noqa: E731
    assert [e["lookups"] for e in events[1:-1]] == [
        {},
        {EMAIL: [ix(a_mail)]},
        {},
        {EMAIL: [ix(a_mail), ix(b_mail)]},
    ]
    assert events[-1]["action"] == "disconnected" and events[-1]["statements"] == 5


def test_pipelined_batches_attribute_rows_and_errors(env: EncEnv, tmp_path: Path) -> None:
    """psycopg pipeline mode: Executes of PII and non-PII statements queued back to back,
    one failing; rows and the error land on the right events, skipped ones have none."""
    e1, e2 = unique("pipe"), unique("pipe")
    select = "SELECT email, phone FROM users WHERE email = %s"
    with audited(env, tmp_path) as a:
        with a.psy("pipe") as conn:
            conn.execute(
                "INSERT INTO users (email, phone) VALUES (%s, %s), (%s, %s)",
                (e1, "+1 202 555 0191", e2, "+1 202 555 0192"),
            )
            with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline() as p:
                c1 = conn.execute(select, (e1,))
                c2 = conn.execute("SELECT n FROM generate_series(1, 5) AS n")
                c3 = conn.execute("UPDATE users SET name = %s WHERE email = %s", ("Piped", e2))
                p.sync()
                conn.execute("INSERT INTO users (email) VALUES (%s)", (e1,))  # 23505
                conn.execute(select, (e2,))  # skipped: the batch is aborted
                p.sync()
            assert c1.fetchall() == [(e1, "+1 202 555 0191")] and len(c2.fetchall()) == 5
            assert c3.rowcount == 1
            with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
                ok = conn.execute("SELECT name FROM users WHERE email = %s", (e2,))
                conn.execute("SELECT 1 / 0")  # not PII: no event, and not blamed on its neighbours
                conn.execute(select, (e1,))  # skipped
            assert ok.fetchall() == [("Piped",)]
            with conn.pipeline():
                last = conn.execute("SELECT phone FROM users WHERE email = ANY(%s)", ([e1, e2],))
                conn.execute("SELECT 2")
            assert len(last.fetchall()) == 2
        events = a.events("pipe", "statement")
    ix = lambda v: [env.index_of(USERS, "email", v)]  # noqa: E731
    assert [(e["kind"], e["rows"], e["sqlstate"], e["lookups"].get(EMAIL)) for e in events] == [
        ("insert", 2, None, None),
        ("select", 1, None, ix(e1)),
        ("update", 1, None, ix(e2)),
        ("insert", None, "23505", None),
        ("select", 1, None, ix(e2)),
        ("select", 2, None, ix(e1) + ix(e2)),
    ]
    assert events[2]["columns_written"] == [NAME] and events[4]["columns_read"] == [NAME]


# --------------------------------------------------------------------------- connections


async def test_connection_events_with_relay_auth(env: EncEnv, tmp_path: Path) -> None:
    """Relay auth: PostgreSQL's own 28P01 for a wrong password is an auth_failed event;
    a TLS session is authenticated with tls true and ends with its totals."""
    # Relayed SCRAM cannot cross two TLS legs (channel binding): plain text to PostgreSQL.
    with audited(env, tmp_path, backend_tls_mode="disable") as a:
        with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
            await a.apg("conn-wrong", password="not-the-password")
        assert wrong.value.sqlstate == "28P01"
        with a.psy("conn-tls", sslmode="require") as conn:
            assert conn.pgconn.ssl_in_use
            conn.execute("SELECT email FROM users WHERE email = %s", ("conn@example.com",))
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
        failed = a.events("conn-wrong")
        ok = a.events("conn-tls")
    assert [
        project(e, "type", "action", "user", "database", "tls", "sqlstate") for e in failed
    ] == [
        {
            "type": "connection",
            "action": "auth_failed",
            "user": env.login.user,
            "database": env.login.dbname,
            "tls": False,
            "sqlstate": "28P01",
        }
    ]
    assert failed[0]["reason"] and "not-the-password" not in json.dumps(failed[0])
    assert [
        (e["type"], e.get("action"), e["tls"] if e["type"] == "connection" else None) for e in ok
    ] == [
        ("connection", "authenticated", True),
        ("statement", None, None),
        ("connection", "disconnected", True),
    ]
    check_common(ok, env, "conn-tls")
    bye = ok[-1]
    assert (
        bye["statements"] == 3
        and bye["bytes_in"] > 0
        and bye["bytes_out"] > 0
        and bye["duration_ms"] > 0
    )


async def test_connection_events_with_proxy_side_scram(env: EncEnv, tmp_path: Path) -> None:
    """auth_mode scram: pgcloak checks the password itself; a wrong password and an
    unknown role are auth_failed (28P01), a good login is authenticated."""
    verifier = env.pg.run_sql(
        f"select rolpassword from pg_authid where rolname = '{env.login.user}'"
    ).strip()
    userlist = tmp_path / "userlist.txt"
    userlist.write_text(f'"{env.login.user}" "{verifier}"\n')
    with audited(env, tmp_path / "proxy", auth_mode="scram", auth_file=str(userlist)) as a:
        for user, password in ((env.login.user, "wrong"), ("nobody", "whatever")):
            with pytest.raises(asyncpg.InvalidPasswordError) as info:
                await asyncpg.connect(
                    **a.proxy.kwargs(user, password, env.login.dbname),
                    ssl=False,
                    server_settings={"application_name": "scram-bad"},
                )
            assert info.value.sqlstate == "28P01"
        with a.psy("scram-ok") as conn:
            assert conn.execute("SELECT current_user").fetchone() == (env.login.user,)
        failed = a.events("scram-bad")
        ok = a.events("scram-ok")
    assert [(e["action"], e["user"], e["sqlstate"]) for e in failed] == [
        ("auth_failed", env.login.user, "28P01"),
        ("auth_failed", "nobody", "28P01"),
    ]
    assert [e["action"] for e in ok] == ["authenticated", "disconnected"]


# --------------------------------------------------------------------------- no PII


#: Distinctive values for the protected columns; none may ever reach the audit output.
ZELDA = {
    "email": "Zelda.Quintero-7731@Example.ORG",
    "phone": "+1 (415) 555-0178",
    "ssn": "536-90-4421",
    "name": "Philippa Vandersloot",
    "loyalty_id": "LOYAL-88231-XQ",
}
MARCUS = {
    "email": "marcus.aurelius.4412@example.net",
    "phone": "+44 20 7946 0958",
    "ssn": "219-09-9999",
    "name": "Marcus Ignatius Aurelius",
    "loyalty_id": "LOYAL-55120-ZR",
}


def forms(value: str) -> set[str]:
    """The value, the forms it may take on the way (case, normalization, digits only), and
    every 10-character piece of those (an error message may quote a cut-off excerpt)."""
    digits = re.sub(r"\D", "", value)
    whole = {value, value.strip().lower(), json.dumps(value)[1:-1]}
    if len(digits) >= 7:
        whole |= {digits, "+" + digits}
    pieces = {w[i : i + 10] for w in whole for i in range(len(w) - 9)}
    return whole | pieces


def test_no_inserted_or_looked_up_value_appears_in_the_trail_or_the_log(
    env: EncEnv, tmp_path: Path
) -> None:
    """Values written and searched for with asyncpg, psycopg (pipelined too) and psql, in
    statements that succeed, fail in PostgreSQL or are refused by pgcloak (a LIKE pattern,
    a text that cannot be tokenized, a phone that is no phone number): grep every audit
    file and the proxy's debug log for every form of every value."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + audit_section(), encoding="utf-8")
    args = [
        "--backend",
        f"postgresql://{env.pg.host}:{env.pg.port}",
        "--backend-tls-mode",
        "disable",
        "--policy",
        str(policy),
        "--log-level",
        "debug",
        "--log-format",
        "json",
    ]
    z, m = ZELDA, MARCUS
    with SubprocessProxy(args, tmp_path / "proxy.log", env=key_env(env)) as proxy:
        login = env.login
        with psycopg.connect(
            proxy.dsn(login.user, login.password, login.dbname, application_name="nopii"),
            autocommit=True,
        ) as conn:
            conn.execute(
                "INSERT INTO users (email, phone, ssn, name, loyalty_id) VALUES (%s, %s, %s, %s, %s)",
                (z["email"], z["phone"], z["ssn"], z["name"], z["loyalty_id"]),
            )
            assert conn.execute(
                "SELECT name, ssn FROM users WHERE email = %s", (z["email"].upper(),)
            ).fetchall() == [(z["name"], z["ssn"])]
            conn.execute("UPDATE users SET ssn = %s WHERE phone = %s", (z["ssn"], "+14155550178"))
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(
                    "INSERT INTO users (email, name) VALUES (%s, %s)",
                    (f" {z['email']} ", z["name"]),
                )
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute(
                    "INSERT INTO users (email, phone) VALUES (%s, %s)", (m["email"], m["name"])
                )
            with conn.pipeline():
                conn.execute("SELECT id FROM users WHERE loyalty_id = %s", (z["loyalty_id"],))
                conn.execute("SELECT email FROM users WHERE phone = %s", (z["phone"],))
            with conn.cursor().copy("COPY users (email, phone, ssn, name) FROM STDIN") as copy:
                copy.write_row((m["email"], m["phone"], m["ssn"], m["name"]))

        async def with_asyncpg() -> None:
            apg = await asyncpg.connect(
                **proxy.kwargs(login.user, login.password, login.dbname),
                ssl=False,
                server_settings={"application_name": "nopii-apg"},
            )
            try:
                assert (
                    await apg.fetchval("SELECT ssn FROM users WHERE email = $1", m["email"])
                    == m["ssn"]
                )
                await apg.execute(
                    "UPDATE users SET loyalty_id = $1 WHERE email = $2", m["loyalty_id"], m["email"]
                )
                assert (
                    await apg.fetchval(
                        "SELECT name FROM users WHERE loyalty_id = $1", m["loyalty_id"]
                    )
                    == m["name"]
                )
            finally:
                await apg.close()

        asyncio.run(with_asyncpg())
        if PSQL is not None:
            environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
                "PGPASSWORD": login.password,
                "PGAPPNAME": "nopii-psql",
                "PGCONNECT_TIMEOUT": "10",
            }
            script = (
                f"SELECT name FROM users WHERE email = '{z['email']}';\n"
                f"SELECT count(*) FROM users WHERE email LIKE '{z['email'][:14]}%';\n"
                f"SELECT id FROM users WHERE email = '{m['email']}' AND id IN ($1,$2);\n"
                f"SELECT id FROM users WHERE name = '{m['name']}' AND AND;\n"
                f"DELETE FROM users WHERE phone = '{m['phone']}' AND ssn = '{m['ssn']}';\n"  # no index: refused
                f"DELETE FROM users WHERE phone = '{m['phone']}';\n"
                f"COPY (SELECT email, phone, ssn, name FROM users WHERE email = '{z['email']}') TO STDOUT;\n"
            )
            done = subprocess.run(
                [
                    PSQL,
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-d",
                    proxy.dsn(login.user, None, login.dbname),
                    "-f",
                    "-",
                ],
                input=script,
                env=environ,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert z["name"] in done.stdout, done.stderr  # it worked: the proxy saw the values
            assert done.stderr.count("ERROR") == 4, done.stderr
        proxy.stop()
        assert proxy.proc is not None and proxy.proc.returncode == 0, proxy.log()

    files = trail_files(tmp_path)
    assert [p.name for p in files] == ["audit.jsonl"]
    records = read_records(files)
    statements = [r for r in records if r["type"] == "statement"]
    refusals = [r for r in records if r["type"] == "refusal"]
    assert len(statements) >= 12 and len(refusals) >= (4 if PSQL else 0), records
    assert any(r["lookups"] for r in statements)  # lookups are there, as blind indexes
    log_text = (tmp_path / "proxy.log").read_text()
    assert '"level": "debug"' in log_text or "session ready" in log_text
    haystacks = {str(p): p.read_text(encoding="utf-8") for p in files} | {"proxy log": log_text}
    leaks = [
        f"{form!r} (from {column}) in {name}"
        for person in (ZELDA, MARCUS)
        for column, value in person.items()
        for form in forms(value)
        for name, text in haystacks.items()
        if form.lower() in text.lower()
    ]
    assert not leaks, leaks


# --------------------------------------------------------------------------- who accessed


def test_who_accessed_lists_exactly_the_events_that_looked_a_person_up(
    env: EncEnv, tmp_path: Path
) -> None:
    """``pgcloak audit who-accessed --column users.email --value V`` (the value is hashed,
    never searched for): every lookup of that person, in any client and any spelling the
    normalizer folds, and nothing else; ``--include-scans`` adds the reads without a lookup."""
    alice, bob = unique("alice"), unique("bob")
    with audited(env, tmp_path) as a:
        with a.psy("who-setup") as conn:  # writes, no lookup
            conn.execute(
                "INSERT INTO users (email, name) VALUES (%s, %s), (%s, %s)", (alice, "A", bob, "B")
            )
        with a.psy("who-alice-1") as conn:
            conn.execute("SELECT name FROM users WHERE email = %s", (alice,))
            conn.execute("SELECT name FROM users WHERE email = %s", (bob,))  # someone else
        with a.psy("who-alice-2") as conn:
            conn.execute(
                "UPDATE users SET name = %s WHERE email = %s", ("A2", f"  {alice.upper()} ")
            )
            conn.execute("SELECT count(*) FROM users WHERE email IN (%s, %s)", (bob, alice))
        with a.psy("who-scan") as conn:
            conn.execute("SELECT email FROM users WHERE id > 0 LIMIT 5")  # a read, no lookup
        with a.psy("who-bob") as conn:
            conn.execute("SELECT name FROM users WHERE email = %s", (bob,))
        a.settle()
        files = trail_files(tmp_path)
        policy = tmp_path / "policy.yaml"

        def who(value: str, *extra: str) -> subprocess.CompletedProcess[str]:
            return pgcloak_cli(
                env,
                "audit",
                "who-accessed",
                "--column",
                "users.email",
                "--value",
                value,
                "--policy",
                str(policy),
                *extra,
                *map(str, files),
            )

        with ThreadPoolExecutor(3) as pool:
            found, text, scans = pool.map(
                lambda argv: who(*argv),
                [(alice, "--json"), (alice.upper(),), (alice, "--json", "--include-scans")],
            )
    assert found.returncode == 0, found.stderr
    listed = [json.loads(line) for line in found.stdout.splitlines()]
    assert [(e["application_name"], e["kind"]) for e in listed] == [
        ("who-alice-1", "select"),
        ("who-alice-2", "update"),
        ("who-alice-2", "select"),
    ]
    assert all(e["user"] == env.login.user and e["client"] for e in listed)
    assert alice not in found.stdout and alice.split("@")[0] not in found.stdout
    assert text.returncode == 0 and text.stdout.rstrip().endswith(
        "3 event(s) for public.users.email"
    )
    assert "MAC-INVALID" not in text.stdout
    listed_scans = {
        (e["application_name"], e["kind"]) for e in map(json.loads, scans.stdout.splitlines())
    }
    # + the write and the read of the column without a lookup; a lookup of Bob reads no email.
    assert listed_scans == {
        ("who-setup", "insert"),
        ("who-alice-1", "select"),
        ("who-alice-2", "update"),
        ("who-alice-2", "select"),
        ("who-scan", "select"),
    }


# --------------------------------------------------------------------------- verify


def _tampered(lines: list[str], how: str) -> tuple[list[str], int]:
    """A tampered copy of a trail and the 1-based line of the first bad record."""
    out = list(lines)
    victim = 4  # a statement event in the middle (0-based)
    record = json.loads(out[victim])
    assert record["type"] == "statement", record
    if how == "edited":
        record["rows"] = (record["rows"] or 0) + 1000
        out[victim] = json.dumps(record)
        return out, victim + 1
    if how == "deleted":
        del out[victim]
        return out, victim + 1  # the record after the hole
    if how == "inserted":
        forged = dict(record, id="f" * 32, rows=0, seq=record["seq"] + 1, prev=record["mac"])
        forged["mac"] = "0" * 64
        out.insert(victim + 1, json.dumps(forged))
        return out, victim + 2
    if how == "reordered":
        out[victim], out[victim + 1] = out[victim + 1], out[victim]
        return out, victim + 1
    if how == "tail_cut":
        return out[:-3], len(out) - 3
    raise AssertionError(how)


def test_verify_cli_passes_a_clean_trail_and_names_each_tampering(
    env: EncEnv, tmp_path: Path
) -> None:
    """``pgcloak audit verify`` (the CLI, with the master key from the environment): OK on
    trails as written; on tampered copies, exit 1 and, per chain, the kind of tampering
    and the file:line and seq of the first bad record. One trail (one chain) per kind of
    tampering, so that one run of the CLI reports all of them."""
    kinds = ("edited", "deleted", "inserted", "reordered", "tail_cut")
    trails: dict[str, Path] = {}
    for how in kinds:
        with audited(env, tmp_path / how) as a:
            with a.psy(f"verify-{how}") as conn:
                for i in range(6):
                    conn.execute(
                        "INSERT INTO users (email, ssn) VALUES (%s, %s)", (unique("verify"), f"{i}")
                    )
            a.stop()  # the shutdown seal
        (trails[how],) = trail_files(tmp_path / how)
    expected: dict[str, tuple[Path, int, int]] = {}
    for how, trail in trails.items():
        lines = trail.read_text().splitlines()
        assert len(lines) == 9 and json.loads(lines[-1])["reason"] == "shutdown"
        bad, line = _tampered(lines, how)
        path = tmp_path / f"{how}-tampered.jsonl"
        path.write_text("\n".join(bad) + "\n")
        expected[how] = (path, line, json.loads(bad[line - 1])["seq"])

    tampered = [str(p) for p, _, _ in expected.values()]
    jobs = [
        ["audit", "verify", *map(str, trails.values())],
        ["audit", "verify", *tampered],
        ["audit", "verify", "--live", str(expected["tail_cut"][0])],
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        clean, failed, live = pool.map(lambda argv: pgcloak_cli(env, *argv), jobs)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("OK: 5 chain(s), 45 record(s) in 5 source(s)"), clean.stdout
    assert clean.stdout.count("sealed at shutdown") == 5

    assert failed.returncode == 1, failed.stdout + failed.stderr
    reported = [
        line.split(": ", 1)[1]
        for line in failed.stdout.splitlines()
        if line.startswith(("FAILED: ", "  also: "))
    ]
    assert len(reported) == len(kinds), failed.stdout
    for (how, (path, line, seq)), problem in zip(expected.items(), reported, strict=True):
        assert problem.startswith(f"{path}:{line}: seq {seq} of chain "), (how, problem)
        assert f": {how.replace('_', ' ')}: " in problem, (how, problem)
    # A live trail (no shutdown seal yet) passes with --live; the open end is a warning.
    assert live.returncode == 0 and "warning:" in live.stdout and "tail cut" in live.stdout, (
        live.stdout
    )
