"""Read decisions by PostgreSQL role, guards and their audit trail, with real clients.

One database (the encryption test schema) behind one pgcloak whose policy says
``default_read: deny``, reveals everything to ``rp_app_rw``, and masks e-mail and phone
but denies ssn to ``rp_support``; guards ``unbounded_select: deny`` and
``max_pii_rows: 3``. The login roles get their rules through membership only:

* ``rp_writer``   member of rp_app_rw: writes the data (so it is encrypted), reads plaintext;
* ``rp_agent``    member of rp_support (not rp_app_rw): masked e-mail and phone, no ssn;
* ``rp_outsider`` member of rp_readers, a role the policy does not name: default_read (deny);
* ``rp_senior``   member of both rp_support and rp_app_rw: the most permissive wins (reveal);
* ``rp_nested``   member of rp_tier2, itself a member of rp_support: masked like an agent.

PostgreSQL grants the table privileges (through the group roles); pgcloak learns the
memberships when a session starts, so every role exists before the first connection.

What is checked, always on both sides (through pgcloak, and directly on PostgreSQL):

* reveal: plaintext through pgcloak, ciphertext in the table;
* mask: ``a***@example.com`` / ``****99``; look-ups by e-mail and phone still find the row;
* static deny (SELECT list, ``SELECT *``, RETURNING): 42501 before the statement reaches
  PostgreSQL (a ``nextval`` probe and an UPDATE's side effect show it never ran);
* result-time deny by the envelope's key id (a view the planner cannot see through):
  42501, with psycopg (simple and extended), asyncpg (extended, prepared) and psql;
* result-time deny of envelopes inside composite values (whole rows, row_to_json, arrays);
* the session stays usable after every refusal, inside a transaction after ROLLBACK too;
  a refusal before the statement runs fails the transaction, a result cut short is an
  error for the client only (the README's "Who reads what"), in pipelines and
  multi-statement Queries too;
* memberships are asked when a session starts (a GRANT counts from the next session);
* guards: unbounded_select (42501) and max_pii_rows (54000, also for COPY TO STDOUT);
* audit: each refusal is a ``refusal`` event with its SQLSTATE and reason, no plaintext
  anywhere in the trail, ``pgcloak audit verify`` says OK;
* a policy edit changes what a running agent session sees on its next statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env

from pgcloak.audit.sinks import iter_file_lines
from pgcloak.crypto.envelope import ENVELOPE_PREFIX_TEXT
from pgcloak.demo.postgres import TemporaryPostgres
from pgcloak.policy import load_policy
from proxyctl import ThreadedProxy, make_settings

PSQL = shutil.which("psql")
EMAIL, PHONE, SSN = (f"{USERS}.{c}" for c in ("email", "phone", "ssn"))
WAIT = 10.0

# -- roles ------------------------------------------------------------------------------
APP_RW, SUPPORT, READERS, TIER2 = "rp_app_rw", "rp_support", "rp_readers", "rp_tier2"
GROUPS = (APP_RW, SUPPORT, READERS, TIER2)


@dataclass(frozen=True)
class Login:
    user: str
    password: str
    member_of: tuple[str, ...]


WRITER = Login("rp_writer", "writer-secret", (APP_RW,))
AGENT = Login("rp_agent", "agent-secret", (SUPPORT,))
OUTSIDER = Login("rp_outsider", "outsider-secret", (READERS,))
SENIOR = Login("rp_senior", "senior-secret", (SUPPORT, APP_RW))
NESTED = Login("rp_nested", "nested-secret", (TIER2,))
LOGINS = (WRITER, AGENT, OUTSIDER, SENIOR, NESTED)


def read_policy(*, support_email: str = "mask", support_phone: str = "mask", audit: str = "") -> str:
    """The policy under test; ``support_email`` / ``support_phone`` are what rp_support
    gets for users.email / users.phone."""
    return (
        "version: 1\n"
        "tables:\n"
        "  public.users:\n"
        "    email: {encrypt: true, index: exact, normalize: email}\n"
        "    phone: {encrypt: true, index: exact, normalize: phone}\n"
        "    ssn:   {encrypt: true}\n"
        "default_read: deny\n"
        "roles:\n"
        f"  {APP_RW}: {{read: reveal}}\n"
        f"  {SUPPORT}:\n"
        f"    read: {{users.email: {support_email}, users.phone: {support_phone}, users.ssn: deny}}\n"
        "guards: {unbounded_select: deny, max_pii_rows: 3}\n"
        f"{audit}"
    )


#: An audit section for the tests that read the trail (relative: in the proxy's working
#: directory, the policy's directory here).
AUDIT = (
    "audit:\n"
    "  sink: file:trail/audit.jsonl\n"
    "  statements: pii\n"
    "  seal_interval: 3600\n"
    "  fsync: never\n"
    "  on_audit_failure: refuse\n"
)


# -- data -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    name: str
    email: str
    phone: str | None
    ssn: str | None
    masked_email: str
    masked_phone: str | None


ALICE = Person("Alice", "alice@example.com", "+1 555 010 9999", "123-45-6789", "a***@example.com", "****99")
# a one-character local part shows no character; fewer than six digits show none
BEA = Person("Bea", "b@example.com", "12-345", None, "***@example.com", "****")
CAROL = Person("Carol", "carol@example.com", "+44 20 7946 0958", "987-65-4321", "c***@example.com", "****58")
DAVE = Person("Dave", "dave@example.com", None, None, "d***@example.com", None)
ERIN = Person("Erin", "erin@example.com", "+1 555 010 1234", "111-22-3333", "e***@example.com", "****34")
PEOPLE = (ALICE, BEA, CAROL, DAVE, ERIN)  # 5 rows; 3 of them with an ssn

#: Every plaintext test value, in the spellings a leak could take.
PLAINTEXTS = sorted(
    {p.email for p in PEOPLE}
    | {p.email.upper() for p in PEOPLE}
    | {p.phone for p in PEOPLE if p.phone}
    | {d for p in PEOPLE if p.phone and len(d := "".join(c for c in p.phone if c.isdigit())) >= 8}
    | {p.ssn for p in PEOPLE if p.ssn}
    | {p.ssn.replace("-", "") for p in PEOPLE if p.ssn}
)

#: The protected values as clients with a reveal role see them.
PII_VALUES = {v for p in PEOPLE for v in (p.email, p.phone, p.ssn) if v is not None}


@dataclass
class RoleEnv:
    """The encryption environment (owner ``app``) plus the login roles and seeded rows."""

    enc: EncEnv
    ids: dict[str, int] = field(default_factory=dict)

    def id(self, person: Person) -> int:
        return self.ids[person.name]

    @property
    def dbname(self) -> str:
        return self.enc.dbname

    def psy(
        self, who: Login, proxy: ThreadedProxy | None = None, *, app: str = "rp-test", **kwargs: Any
    ) -> psycopg.Connection[Any]:
        """psycopg 3 through pgcloak as ``who`` (autocommit unless told otherwise)."""
        p = proxy or self.enc.proxy
        kwargs.setdefault("autocommit", True)
        dsn = p.dsn(who.user, who.password, self.dbname, application_name=app)
        return psycopg.connect(dsn, connect_timeout=10, **kwargs)

    async def apg(self, who: Login, proxy: ThreadedProxy | None = None) -> asyncpg.Connection:
        """asyncpg (extended protocol, binary results) through pgcloak as ``who``."""
        p = proxy or self.enc.proxy
        return await asyncpg.connect(
            **p.kwargs(who.user, who.password, self.dbname), ssl=False, timeout=10
        )

    def psql(self, who: Login, script: str) -> subprocess.CompletedProcess[str]:
        """``script`` through pgcloak with psql: unaligned, tuples only, verbose errors
        (``ERROR:  42501: ...``), going on after errors."""
        assert PSQL is not None, "psql is not on PATH"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        environ |= {
            "PGHOST": self.enc.proxy.host,
            "PGPORT": str(self.enc.proxy.port),
            "PGUSER": who.user,
            "PGPASSWORD": who.password,
            "PGDATABASE": self.dbname,
            "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": "rp-psql",
        }
        return subprocess.run(
            [PSQL, "-X", "-q", "-A", "-t", "-v", "VERBOSITY=verbose", "-f", "-"],
            input=script, env=environ, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def stored(self, person: Person) -> tuple[Any, ...]:
        """(email, phone, ssn, name) of ``person`` as PostgreSQL holds them."""
        return self.enc.raw_one(
            "SELECT email, phone, ssn, name FROM users WHERE id = %s", self.id(person)
        )

    def assert_ciphertext(self, person: Person) -> None:
        email, phone, ssn, name = self.stored(person)
        self.enc.assert_stored(email, person.email, USERS, "email")
        self.enc.assert_stored(phone, person.phone, USERS, "phone")
        self.enc.assert_stored(ssn, person.ssn, USERS, "ssn")
        assert name == person.name

    def probe(self) -> tuple[int, bool]:
        """The probe sequence's state: it moves only if a statement calling nextval() ran."""
        return self.enc.raw_one("SELECT last_value, is_called FROM rp_probe")


def _create_roles(pg: TemporaryPostgres) -> None:
    _drop_roles(pg)
    sql = [
        f"CREATE ROLE {APP_RW} NOLOGIN;",
        f"CREATE ROLE {SUPPORT} NOLOGIN;",
        f"CREATE ROLE {READERS} NOLOGIN;",
        f"CREATE ROLE {TIER2} NOLOGIN IN ROLE {SUPPORT};",
    ]
    for who in LOGINS:
        sql.append(
            f"CREATE ROLE {who.user} LOGIN PASSWORD '{who.password}' "
            f"IN ROLE {', '.join(who.member_of)};"
        )
    pg.run_sql("\n".join(sql))


def _drop_roles(pg: TemporaryPostgres) -> None:
    names = ", ".join([*(w.user for w in LOGINS), TIER2, *GROUPS])
    pg.run_sql(f"DROP ROLE IF EXISTS {names};")


#: Run as the table owner (``app``) directly on PostgreSQL.
OWNER_DDL = f"""
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO {APP_RW};
GRANT USAGE ON SEQUENCE users_id_seq TO {APP_RW};
GRANT SELECT, UPDATE ON users TO {SUPPORT};
GRANT SELECT ON users TO {READERS};
CREATE VIEW user_ssn AS SELECT id, ssn FROM users;
CREATE VIEW user_pii AS SELECT id, email, phone, ssn FROM users;
GRANT SELECT ON user_ssn, user_pii TO {APP_RW}, {SUPPORT}, {READERS};
CREATE SEQUENCE rp_probe;
GRANT USAGE, SELECT ON SEQUENCE rp_probe TO PUBLIC;
"""


@pytest.fixture(scope="module")
def env(
    pg: TemporaryPostgres, pg_app_user: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RoleEnv]:
    _create_roles(pg)
    try:
        with encryption_env(
            pg, pg_app_user, tmp_path_factory.mktemp("read_policy"), "readpolicy",
            policy=read_policy(),
        ) as e:  # fmt: skip
            # index_of / assert_stored must use the policy pgcloak enforces here
            e = dataclasses.replace(e, policy=load_policy(e.policy_path))
            with e.direct() as conn:
                conn.execute(OWNER_DDL)
            rp = RoleEnv(e)
            with rp.psy(WRITER) as conn:
                for p in PEOPLE:
                    row = conn.execute(
                        "INSERT INTO users (email, phone, ssn, name) VALUES (%s, %s, %s, %s) "
                        "RETURNING id",
                        (p.email, p.phone, p.ssn, p.name),
                    ).fetchone()
                    assert row is not None
                    rp.ids[p.name] = row[0]
            yield rp
    finally:
        _drop_roles(pg)


# -- helpers ------------------------------------------------------------------------------
def refused(
    conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None, sqlstate: str,
    *needles: str, prepare: bool | None = None,
) -> str:  # fmt: skip
    """Run ``sql``; it must fail with ``sqlstate`` and a message naming every needle.
    Returns the message. No plaintext test value may be in it."""
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params, prepare=prepare)
    err = info.value
    message = err.diag.message_primary or str(err)
    assert err.sqlstate == sqlstate, f"{sql!r}: got {err.sqlstate} {message!r}"
    for needle in needles:
        assert needle in message, f"{sql!r}: {needle!r} not in {message!r}"
    leaked = [v for v in PLAINTEXTS if v in str(err)]
    assert not leaked, (sql, leaked, str(err))
    return message


def apg_refused(err: BaseException, sqlstate: str, *needles: str) -> None:
    assert isinstance(err, asyncpg.PostgresError), repr(err)
    assert err.sqlstate == sqlstate, f"got {err.sqlstate} {err!s}"
    for needle in needles:
        assert needle in str(err), f"{needle!r} not in {err!s}"
    leaked = [v for v in PLAINTEXTS if v in str(err)]
    assert not leaked, leaked


def copy_out(conn: psycopg.Connection[Any], sql: str) -> tuple[list[tuple[Any, ...]], psycopg.Error | None]:
    """Rows of ``COPY ... TO STDOUT`` received before the end or an error, and the error."""
    rows: list[tuple[Any, ...]] = []
    try:
        with conn.cursor() as cur, cur.copy(sql) as copy:
            rows.extend(copy.rows())
    except psycopg.Error as exc:
        return rows, exc
    return rows, None


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "ERROR:" in line]


def sections(stdout: str) -> dict[str, list[str]]:
    """Lines printed after each ``\\echo ==name==``."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("==") and line.endswith("=="):
            current = out.setdefault(line.strip("="), [])
        else:
            current.append(line)
    return out


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def replace_file(path: Path, text: str) -> None:
    """Replace a policy file atomically (as editors and ConfigMaps do)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def own_proxy(env: RoleEnv, directory: Path, policy: str, **settings: Any) -> Iterator[ThreadedProxy]:
    """A pgcloak of its own (policy file ``directory/policy.yaml``) in front of the
    module's database, with the module's master key."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(policy, encoding="utf-8")
    tls = env.enc.pg.tls_files
    base: dict[str, Any] = {
        "backend": f"postgresql://{env.enc.pg.host}:{env.enc.pg.port}",
        "client_tls_cert": str(tls.server_cert),
        "client_tls_key": str(tls.server_key),
        "backend_tls_ca": str(tls.ca_cert),
        "drain_timeout": 0,
        "policy": str(path),
        "master_key": env.enc.key_text,
    }
    base.update(settings)
    with ThreadedProxy(make_settings(**base), cwd=directory) as proxy:
        yield proxy


# -- set-up -------------------------------------------------------------------------------
def test_roles_memberships_and_logins(env: RoleEnv) -> None:
    """The fixture's roles exist with the memberships the policy relies on, and every
    login works through pgcloak (unprotected columns for everyone)."""
    membership = env.enc.pg.run_sql(
        "SELECT r.rolname || ':' || g.rolname FROM pg_roles r, pg_roles g "
        f"WHERE r.rolname LIKE 'rp\\_%' AND g.rolname IN ('{APP_RW}', '{SUPPORT}') "
        "AND pg_has_role(r.oid, g.oid, 'MEMBER') ORDER BY 1"
    ).splitlines()
    assert membership == sorted(
        [
            f"{APP_RW}:{APP_RW}", f"{SUPPORT}:{SUPPORT}", f"{TIER2}:{SUPPORT}",
            f"{WRITER.user}:{APP_RW}", f"{AGENT.user}:{SUPPORT}", f"{SENIOR.user}:{APP_RW}",
            f"{SENIOR.user}:{SUPPORT}", f"{NESTED.user}:{SUPPORT}",
        ]
    )  # fmt: skip
    for who in LOGINS:
        with env.psy(who) as conn:
            assert conn.execute("SELECT session_user").fetchone() == (who.user,)
            assert conn.execute(
                "SELECT id, name FROM users WHERE id = %s", (env.id(ALICE),)
            ).fetchone() == (env.id(ALICE), "Alice")
    assert env.enc.raw_one("SELECT count(*) FROM users") == len(PEOPLE)


# -- reveal -------------------------------------------------------------------------------
def test_reveal_role_reads_plaintext_and_postgres_holds_ciphertext(env: RoleEnv) -> None:
    with env.psy(WRITER) as conn, env.psy(SENIOR) as senior:
        for p in PEOPLE:
            q = "SELECT email, phone, ssn, name FROM users WHERE id = %s"
            assert conn.execute(q, (env.id(p),)).fetchone() == (p.email, p.phone, p.ssn, p.name)
            # member of rp_support (ssn: deny) and rp_app_rw (reveal): the most permissive wins
            assert senior.execute(q, (env.id(p),)).fetchone() == (p.email, p.phone, p.ssn, p.name)
            env.assert_ciphertext(p)
        # look-ups by any spelling of the e-mail and the phone
        assert conn.execute(
            "SELECT id, ssn FROM users WHERE email = %s", (" ALICE@Example.COM ",)
        ).fetchone() == (env.id(ALICE), ALICE.ssn)
        assert conn.execute(
            "SELECT email FROM users WHERE phone = %s", ("+44 (20) 7946-0958",)
        ).fetchone() == (CAROL.email,)
        # RETURNING reveals too; the stored row is ciphertext
        email = "frank@example.com"
        row = conn.execute(
            "INSERT INTO users (email, phone, ssn, name) VALUES (%s, %s, %s, %s) "
            "RETURNING id, email, phone, ssn",
            (email, "+1 555 010 7777", "555-66-7777", "Frank"),
        ).fetchone()
        assert row is not None
        try:
            assert row[1:] == (email, "+1 555 010 7777", "555-66-7777")
            stored = env.enc.raw_one("SELECT email, phone, ssn FROM users WHERE id = %s", row[0])
            env.enc.assert_stored(stored[0], email, USERS, "email")
            env.enc.assert_stored(stored[1], "+1 555 010 7777", USERS, "phone")
            env.enc.assert_stored(stored[2], "555-66-7777", USERS, "ssn")
        finally:
            conn.execute("DELETE FROM users WHERE id = %s", (row[0],))
    assert env.enc.raw_one("SELECT count(*) FROM users") == len(PEOPLE)


async def test_reveal_role_with_asyncpg(env: RoleEnv) -> None:
    conn = await env.apg(WRITER)
    try:
        find = await conn.prepare("SELECT id, email, phone, ssn FROM users WHERE email = $1")
        for p in PEOPLE:
            row = await find.fetchrow(p.email.upper())
            assert row is not None and tuple(row) == (env.id(p), p.email, p.phone, p.ssn)
        rows = await conn.fetch(
            "SELECT ssn FROM users WHERE id = ANY($1::bigint[]) ORDER BY id",
            [env.id(ALICE), env.id(CAROL), env.id(ERIN)],
        )
        assert [r["ssn"] for r in rows] == [ALICE.ssn, CAROL.ssn, ERIN.ssn]
    finally:
        await conn.close()
    for p in PEOPLE:
        env.assert_ciphertext(p)


def test_memberships_are_read_when_a_session_starts(env: RoleEnv) -> None:
    """A GRANT of rp_app_rw to the agent counts for the sessions that start after it
    (the most permissive of rp_support and rp_app_rw: reveal), and stops counting after
    the REVOKE: memberships are asked per session, not remembered per user."""
    q = "SELECT email, phone, ssn FROM users WHERE id = %s"
    alice = env.id(ALICE)
    with env.psy(AGENT) as conn:
        refused(conn, q, (alice,), "42501", SSN)
    env.enc.pg.run_sql(f"GRANT {APP_RW} TO {AGENT.user}")
    try:
        with env.psy(AGENT) as conn:
            assert conn.execute(q, (alice,)).fetchone() == (ALICE.email, ALICE.phone, ALICE.ssn)
    finally:
        env.enc.pg.run_sql(f"REVOKE {APP_RW} FROM {AGENT.user}")
    with env.psy(AGENT) as conn:
        refused(conn, q, (alice,), "42501", SSN)
        assert conn.execute("SELECT email FROM users WHERE id = %s", (alice,)).fetchone() == (
            ALICE.masked_email,
        )


# -- mask ---------------------------------------------------------------------------------
def test_mask_role_sees_masked_values_and_can_look_up(env: RoleEnv) -> None:
    with env.psy(AGENT) as agent, env.psy(NESTED) as nested:
        for p in PEOPLE:
            q = "SELECT id, email, phone, name FROM users WHERE id = %s"
            expected = (env.id(p), p.masked_email, p.masked_phone, p.name)
            assert agent.execute(q, (env.id(p),)).fetchone() == expected
            # a member of a member of rp_support gets the same
            assert nested.execute(q, (env.id(p),)).fetchone() == expected
            env.assert_ciphertext(p)
        # look-ups by e-mail (any spelling) and by phone still find the row, returned masked
        assert agent.execute(
            "SELECT id, email FROM users WHERE email = %s", ("Alice@EXAMPLE.com",)
        ).fetchone() == (env.id(ALICE), ALICE.masked_email)
        assert agent.execute(
            "SELECT id, phone FROM users WHERE phone = %s", ("+15550109999",)
        ).fetchone() == (env.id(ALICE), ALICE.masked_phone)
        assert agent.execute(
            "SELECT count(*) FROM users WHERE email = ANY(%s)", ([BEA.email, CAROL.email],)
        ).fetchone() == (2,)
        # the same statement, prepared (extended protocol, named statement)
        for _ in range(3):
            assert agent.execute(
                "SELECT email FROM users WHERE email = %s", (CAROL.email,), prepare=True
            ).fetchone() == (CAROL.masked_email,)
        # through a view the planner cannot see into: masked by the envelope's key id
        assert agent.execute(
            "SELECT email, phone FROM user_pii WHERE id = %s", (env.id(ERIN),)
        ).fetchone() == (ERIN.masked_email, ERIN.masked_phone)
    # directly, the view holds ciphertext
    email, phone = env.enc.raw_one("SELECT email, phone FROM user_pii WHERE id = %s", env.id(ERIN))
    env.enc.assert_stored(email, ERIN.email, USERS, "email")
    env.enc.assert_stored(phone, ERIN.phone, USERS, "phone")


async def test_mask_role_with_asyncpg(env: RoleEnv) -> None:
    conn = await env.apg(AGENT)
    try:
        row = await conn.fetchrow(
            "SELECT id, email, phone, name FROM users WHERE email = $1", ALICE.email
        )
        assert row is not None
        assert tuple(row) == (env.id(ALICE), ALICE.masked_email, ALICE.masked_phone, "Alice")
        stmt = await conn.prepare("SELECT email, phone FROM users WHERE phone = $1")
        assert tuple(await stmt.fetchrow("12345")) == (BEA.masked_email, BEA.masked_phone)
        assert tuple(await stmt.fetchrow("+1 555 010 1234")) == (ERIN.masked_email, "****34")
        rows = await conn.fetch(
            "SELECT email FROM user_pii WHERE id = ANY($1::bigint[]) ORDER BY id",
            [env.id(CAROL), env.id(DAVE)],
        )
        assert [r["email"] for r in rows] == [CAROL.masked_email, DAVE.masked_email]
    finally:
        await conn.close()


# -- deny, statically -------------------------------------------------------------------
def test_static_deny_for_support(env: RoleEnv) -> None:
    alice = env.id(ALICE)
    with env.psy(AGENT) as agent:
        for sql in (
            "SELECT ssn FROM users WHERE id = %s",
            "SELECT * FROM users WHERE id = %s",
            "SELECT u.name, u.ssn FROM users u WHERE u.id = %s",
            "WITH s AS (SELECT ssn FROM users WHERE id = %s) SELECT * FROM s",
        ):
            refused(agent, sql, (alice,), "42501", "permission denied", SSN)
            # the session goes on
            assert agent.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
        # refused before it reaches PostgreSQL: the statement never ran
        before = env.probe()
        refused(agent, "SELECT ssn, nextval('rp_probe') FROM users WHERE id = %s", (alice,),
                "42501", "permission denied", SSN)  # fmt: skip
        refused(agent, "SELECT ssn, nextval('rp_probe') FROM users WHERE id = %s", (alice,),
                "42501", "permission denied", SSN, prepare=True)  # fmt: skip
        assert env.probe() == before
        for returning in ("ssn", "*"):
            refused(agent, f"UPDATE users SET name = 'touched' WHERE id = %s RETURNING {returning}",
                    (alice,), "42501", "permission denied", SSN)  # fmt: skip
            assert env.stored(ALICE)[3] == "Alice", "the refused UPDATE ran"
        # masked columns of the same table stay readable in the same session
        assert agent.execute("SELECT email FROM users WHERE id = %s", (alice,)).fetchone() == (
            ALICE.masked_email,
        )
    # inside an explicit transaction: refused, ROLLBACK, and the session goes on
    with env.psy(AGENT, autocommit=False) as agent:
        assert agent.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
        refused(agent, "SELECT ssn FROM users WHERE id = %s", (alice,), "42501", SSN)
        agent.rollback()
        assert agent.execute("SELECT email FROM users WHERE id = %s", (alice,)).fetchone() == (
            ALICE.masked_email,
        )
        agent.commit()
    env.assert_ciphertext(ALICE)


def test_static_deny_by_default_read_for_outsider(env: RoleEnv) -> None:
    alice = env.id(ALICE)
    with env.psy(OUTSIDER) as outsider:
        assert outsider.execute("SELECT id, name FROM users WHERE id = 1").fetchone() == (1, "Alice")
        assert outsider.execute("SELECT id, name FROM users WHERE id = %s", (alice,)).fetchone() == (alice, "Alice")
        refused(outsider, "SELECT email FROM users WHERE id = %s", (alice,), "42501", "permission denied", EMAIL)
        assert outsider.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
        refused(outsider, "SELECT phone FROM users WHERE id = %s", (alice,), "42501", "permission denied", PHONE)
        refused(outsider, "SELECT ssn FROM users WHERE id = %s", (alice,), "42501", "permission denied", SSN)
        refused(outsider, "SELECT * FROM users WHERE id = %s", (alice,), "42501", "permission denied")
        before = env.probe()
        refused(outsider, "SELECT email, nextval('rp_probe') FROM users WHERE id = %s", (alice,),
                "42501", "permission denied", EMAIL)  # fmt: skip
        assert env.probe() == before
        assert outsider.execute("SELECT count(*) FROM users").fetchone() == (len(PEOPLE),)
    with env.psy(OUTSIDER, autocommit=False) as outsider:
        refused(outsider, "SELECT email FROM users WHERE id = %s", (alice,), "42501", EMAIL)
        outsider.rollback()
        assert outsider.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
        outsider.commit()


async def test_static_deny_with_asyncpg(env: RoleEnv) -> None:
    alice = env.id(ALICE)
    conn = await env.apg(OUTSIDER)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetchrow("SELECT email FROM users WHERE id = $1", alice)
        apg_refused(info.value, "42501", "permission denied", EMAIL)
        assert await conn.fetchval("SELECT name FROM users WHERE id = $1", alice) == "Alice"
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.prepare("SELECT id, phone FROM users WHERE id = $1")
        apg_refused(info.value, "42501", "permission denied", PHONE)
        tr = conn.transaction()
        await tr.start()
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT * FROM users WHERE id = $1", alice)
        apg_refused(info.value, "42501", "permission denied")
        await tr.rollback()
        assert await conn.fetchval("SELECT name FROM users WHERE id = $1", alice) == "Alice"
    finally:
        await conn.close()
    conn = await env.apg(AGENT)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetchrow("SELECT email, ssn FROM users WHERE email = $1", ALICE.email)
        apg_refused(info.value, "42501", "permission denied", SSN)
        assert await conn.fetchval("SELECT email FROM users WHERE email = $1", ALICE.email) == ALICE.masked_email
    finally:
        await conn.close()


# -- deny, at result time -----------------------------------------------------------------
def test_result_time_deny_through_a_view(env: RoleEnv) -> None:
    alice, dave = env.id(ALICE), env.id(DAVE)
    with env.psy(AGENT) as agent:
        for prepare in (False, True):  # simple-ish (unnamed) and named prepared statements
            refused(agent, "SELECT ssn FROM user_ssn WHERE id = %s", (alice,), "42501",
                    "permission denied", SSN, prepare=prepare)  # fmt: skip
            assert agent.execute("SELECT id FROM user_ssn WHERE id = %s", (alice,)).fetchone() == (alice,)
        # a NULL carries no envelope: nothing to refuse
        assert agent.execute("SELECT id, ssn FROM user_ssn WHERE id = %s", (dave,)).fetchone() == (dave, None)
        refused(agent, "SELECT email, ssn FROM user_pii WHERE id = %s", (env.id(CAROL),), "42501",
                "permission denied", SSN)  # fmt: skip
        assert agent.execute("SELECT email FROM user_pii WHERE id = %s", (alice,)).fetchone() == (
            ALICE.masked_email,
        )
    with env.psy(AGENT, autocommit=False) as agent:
        refused(agent, "SELECT ssn FROM user_ssn WHERE id = %s", (alice,), "42501", SSN)
        agent.rollback()
        assert agent.execute("SELECT id FROM user_ssn WHERE id = %s", (alice,)).fetchone() == (alice,)
        agent.commit()
    with env.psy(OUTSIDER) as outsider:
        refused(outsider, "SELECT email FROM user_pii WHERE id = %s", (alice,), "42501",
                "permission denied", EMAIL)  # fmt: skip
        assert outsider.execute("SELECT id FROM user_pii WHERE id = %s", (alice,)).fetchone() == (alice,)
    with env.psy(WRITER) as writer:
        assert writer.execute("SELECT ssn FROM user_ssn WHERE id = %s", (alice,)).fetchone() == (ALICE.ssn,)
    # both sides: directly, the view returns the ciphertext
    env.enc.assert_stored(env.enc.raw_one("SELECT ssn FROM user_ssn WHERE id = %s", alice), ALICE.ssn, USERS, "ssn")


async def test_result_time_deny_with_asyncpg_extended_protocol(env: RoleEnv) -> None:
    alice, carol, dave = env.id(ALICE), env.id(CAROL), env.id(DAVE)
    conn = await env.apg(AGENT)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT ssn FROM user_ssn WHERE id = $1", alice)
        apg_refused(info.value, "42501", "permission denied", SSN)
        assert await conn.fetchval("SELECT count(*) FROM user_ssn WHERE id = $1", alice) == 1
        # one prepared statement: refused or not by the value each execution returns
        stmt = await conn.prepare("SELECT id, ssn FROM user_ssn WHERE id = $1")
        assert tuple(await stmt.fetchrow(dave)) == (dave, None)
        with pytest.raises(asyncpg.PostgresError) as info:
            await stmt.fetchrow(carol)
        apg_refused(info.value, "42501", "permission denied", SSN)
        assert tuple(await stmt.fetchrow(dave)) == (dave, None)
        row = await conn.fetchrow("SELECT email, phone FROM user_pii WHERE id = $1", alice)
        assert tuple(row) == (ALICE.masked_email, ALICE.masked_phone)
        tr = conn.transaction()
        await tr.start()
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetchval("SELECT ssn FROM user_ssn WHERE id = $1", carol)
        apg_refused(info.value, "42501", "permission denied", SSN)
        await tr.rollback()
        assert await conn.fetchval("SELECT email FROM user_pii WHERE id = $1", carol) == CAROL.masked_email
    finally:
        await conn.close()
    writer = await env.apg(WRITER)
    try:
        assert await writer.fetchval("SELECT ssn FROM user_ssn WHERE id = $1", carol) == CAROL.ssn
    finally:
        await writer.close()


def test_deny_covers_envelopes_inside_composite_values(env: RoleEnv) -> None:
    """A whole-row reference or row_to_json() carries the stored values inside one text
    value. On a protected table the planner refuses it for everyone (0A000: the values
    would come back encrypted). Through a view it cannot see into, the envelope is still
    in the result: a role denied the column gets 42501, not the envelope (nor its blind
    index)."""
    alice = env.id(ALICE)
    with env.psy(AGENT) as agent:
        for sql in (
            "SELECT row_to_json(s) FROM user_ssn s WHERE id = %s",
            "SELECT s FROM user_ssn s WHERE id = %s",
            "SELECT ARRAY[ssn] FROM user_ssn WHERE id = %s",
        ):
            refused(agent, sql, (alice,), "42501", "permission denied", SSN)
            assert agent.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
    with env.psy(OUTSIDER) as outsider:
        refused(outsider, "SELECT row_to_json(p) FROM user_pii p WHERE id = %s", (alice,), "42501", "permission denied")
        assert outsider.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
    for who in (AGENT, OUTSIDER, WRITER):
        with env.psy(who) as conn:
            for sql in ("SELECT u FROM users u WHERE id = %s", "SELECT row_to_json(u) FROM users u WHERE id = %s"):
                refused(conn, sql, (alice,), "0A000", "whole-row reference", EMAIL)
            assert conn.execute("SELECT count(u) FROM users u WHERE id = %s", (alice,)).fetchone() == (1,)


def test_values_inside_other_values_come_back_as_stored_only_when_built_out_of_sight(env: RoleEnv) -> None:
    """What the README says of values inside other values: ``ARRAY[ssn]`` (or
    ``array_agg``, ``ROW``, JSON) on the protected table is refused for every role
    (0A000), reveal included; the same built over a view pgcloak cannot see into comes
    back as stored (ciphertext, never plaintext) to a role that may read every value."""
    alice = env.id(ALICE)
    with env.psy(WRITER) as writer:
        for sql in (
            "SELECT ARRAY[ssn] FROM users WHERE id = %s",
            "SELECT array_agg(ssn) FROM users WHERE id = %s",
            "SELECT json_build_object('s', ssn) FROM users WHERE id = %s",
        ):
            refused(writer, sql, (alice,), "0A000", SSN)
        row = writer.execute("SELECT ARRAY[ssn] FROM user_ssn WHERE id = %s", (alice,)).fetchone()
        assert row is not None and len(row[0]) == 1
        assert row[0][0].startswith(ENVELOPE_PREFIX_TEXT) and ALICE.ssn not in row[0][0]
        assert writer.execute("SELECT ssn FROM user_ssn WHERE id = %s", (alice,)).fetchone() == (ALICE.ssn,)


async def test_a_copy_in_after_a_cut_short_result_does_not_hang(env: RoleEnv) -> None:
    """The client is told its Query failed at the refused result and waits for
    ReadyForQuery; the server reaches the COPY FROM STDIN after it and waits for data.
    pgcloak ends that COPY for the client (CopyFail), so both go on."""
    alice = env.id(ALICE)
    conn = await env.apg(AGENT)
    try:
        await conn.execute("CREATE TEMP TABLE copied (x int)")
        for cut in (f"SELECT ssn FROM user_ssn WHERE id = {alice}", "SELECT email FROM user_pii WHERE id > 0"):
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncio.wait_for(conn.execute(f"{cut}; COPY copied FROM STDIN"), 20)
            assert info.value.sqlstate in ("42501", "54000"), info.value
            assert await asyncio.wait_for(conn.fetchval("SELECT count(*) FROM copied"), 20) == 0
    finally:
        await conn.close()


def test_a_result_cut_short_in_a_batch_is_an_error_for_the_client_only(env: RoleEnv) -> None:
    """What the README says of a result pgcloak cuts short (a denied value in a view,
    max_pii_rows): the client gets the error, but PostgreSQL ran the statement, and the
    statements sent after it in the same batch (a pipeline before its Sync, a Query
    holding several statements) still run. The session is in step afterwards: the next
    pipeline and the next Query get their own results."""
    alice, bea = env.id(ALICE), env.id(BEA)
    update = f"UPDATE users SET name = 'batched' WHERE id = {bea}"
    name = "SELECT name FROM users WHERE id = %s"

    def reset() -> None:
        with env.enc.direct() as conn:
            conn.execute("UPDATE users SET name = %s WHERE id = %s", (BEA.name, bea))

    try:
        with env.psy(AGENT) as agent:
            with pytest.raises(psycopg.Error) as info:
                with agent.pipeline():
                    agent.execute("SELECT ssn FROM user_ssn WHERE id = %s", (alice,))
                    agent.execute(update)
            assert info.value.sqlstate == "42501", info.value
            assert SSN in str(info.value)
            assert env.stored(BEA)[3] == "batched"  # documented: the rest of the batch ran
            reset()
            with agent.pipeline():
                first = agent.execute(name, (alice,))
                second = agent.execute("SELECT email FROM user_pii WHERE id = %s", (bea,))
            assert first.fetchall() == [("Alice",)] and second.fetchall() == [(BEA.masked_email,)]

            with pytest.raises(psycopg.Error) as info:
                agent.execute(f"SELECT ssn FROM user_ssn WHERE id = {alice}; {update}".encode(), prepare=False)
            assert info.value.sqlstate == "42501", info.value
            assert env.stored(BEA)[3] == "batched"
            reset()
            assert agent.execute(name, (alice,)).fetchone() == ("Alice",)
        with env.psy(WRITER) as writer:
            with pytest.raises(psycopg.Error) as info:
                writer.execute(f"SELECT email FROM users WHERE id > 0; {update}".encode(), prepare=False)
            assert info.value.sqlstate == "54000", info.value
            assert env.stored(BEA)[3] == "batched"
            reset()
            assert writer.execute("SELECT email FROM users WHERE id = %s", (bea,)).fetchone() == (BEA.email,)
    finally:
        reset()


@pytest.mark.parametrize(
    ("who", "sql", "sqlstate", "failed"),
    [
        pytest.param(AGENT, "SELECT ssn FROM users WHERE id = %s", "42501", True, id="static"),
        pytest.param(AGENT, "SELECT ssn FROM user_ssn WHERE id = %s", "42501", False, id="result-time"),
        pytest.param(WRITER, "SELECT email FROM users WHERE id >= %s", "54000", False, id="max_pii_rows"),
    ],
)
def test_a_refusal_inside_a_transaction_block(
    env: RoleEnv, who: Login, sql: str, sqlstate: str, failed: bool
) -> None:
    """A statement refused before it runs fails the transaction as PostgreSQL's own
    errors do (25P02 until it ends; COMMIT answers ROLLBACK). A result cut short is an
    error for the client only (README): the transaction is still open and the client
    decides; here it rolls back, and what it did before the refusal is undone."""
    alice, bea = env.id(ALICE), env.id(BEA)
    try:
        with env.psy(who, autocommit=False) as conn:
            conn.execute("UPDATE users SET name = 'in-txn' WHERE id = %s", (bea,))
            refused(conn, sql, (alice,), sqlstate)
            status = psycopg.pq.TransactionStatus
            if failed:
                assert conn.info.transaction_status == status.INERROR
                with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                    conn.execute("SELECT name FROM users WHERE id = %s", (bea,))
                assert conn.execute("COMMIT").statusmessage == "ROLLBACK"
            else:
                assert conn.info.transaction_status == status.INTRANS
                assert conn.execute("SELECT name FROM users WHERE id = %s", (bea,)).fetchone() == ("in-txn",)
                conn.rollback()
            assert conn.execute("SELECT name FROM users WHERE id = %s", (bea,)).fetchone() == ("Bea",)
            conn.commit()
        assert env.stored(BEA)[3] == "Bea"
    finally:
        with env.enc.direct() as conn:
            conn.execute("UPDATE users SET name = %s WHERE id = %s", (BEA.name, bea))


def test_mask_and_deny_with_psql(env: RoleEnv) -> None:
    alice, bea = env.id(ALICE), env.id(BEA)
    script = f"""
\\echo ==mask==
SELECT email, phone, name FROM users WHERE email = 'ALICE@example.com';
SELECT email, phone FROM users WHERE id = {bea};
\\echo ==static==
SELECT ssn FROM users WHERE id = {alice};
\\echo ==after_static==
SELECT name FROM users WHERE id = {alice};
\\echo ==view==
SELECT ssn FROM user_ssn WHERE id = {alice};
\\echo ==after_view==
SELECT id FROM user_ssn WHERE id = {alice};
\\echo ==copy==
\\copy (SELECT email, phone FROM users WHERE id = {alice}) TO STDOUT
\\echo ==txn==
BEGIN;
SELECT ssn FROM users WHERE id = {alice};
ROLLBACK;
SELECT email FROM users WHERE id = {bea};
\\echo ==end==
"""
    proc = env.psql(AGENT, script)
    assert proc.returncode == 0, proc.stderr
    out = sections(proc.stdout)
    assert out["mask"] == [f"{ALICE.masked_email}|{ALICE.masked_phone}|Alice", f"{BEA.masked_email}|{BEA.masked_phone}"]
    assert out["static"] == [] and out["view"] == []
    assert out["after_static"] == ["Alice"]
    assert out["after_view"] == [str(alice)]
    assert out["copy"] == [f"{ALICE.masked_email}\t{ALICE.masked_phone}"]
    assert out["txn"] == [BEA.masked_email]
    errors = error_lines(proc.stderr)
    assert len(errors) == 3, proc.stderr
    for line in errors:
        assert "ERROR:  42501: permission denied" in line and SSN in line, line
    leaked = [v for v in PLAINTEXTS if v in proc.stdout + proc.stderr]
    assert not leaked, leaked


# -- guards -------------------------------------------------------------------------------
def test_unbounded_select_guard(env: RoleEnv) -> None:
    first3 = [(p.email,) for p in PEOPLE[:3]]
    with env.psy(WRITER) as conn:
        for sql in (
            "SELECT email FROM users",
            "SELECT id, email FROM users ORDER BY id",
            "SELECT u.phone FROM users u",
            "SELECT s.ssn FROM (SELECT ssn FROM users) s",
        ):
            refused(conn, sql, None, "42501", "unbounded_select")
            assert conn.execute("SELECT count(*) FROM users").fetchone() == (len(PEOPLE),)
        before = env.probe()
        refused(conn, "SELECT email, nextval('rp_probe') FROM users", None, "42501", "unbounded_select")
        assert env.probe() == before, "the refused statement ran"
        # allowed: bounded, or no encrypted column in the result
        assert conn.execute("SELECT email FROM users ORDER BY id LIMIT 3").fetchall() == first3
        assert conn.execute(
            "SELECT email FROM users ORDER BY id FETCH FIRST 2 ROWS ONLY"
        ).fetchall() == first3[:2]
        assert conn.execute(
            "SELECT email FROM users WHERE id = ANY(%s) ORDER BY id", ([env.id(p) for p in PEOPLE[:3]],)
        ).fetchall() == first3
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (len(PEOPLE),)
        assert conn.execute("SELECT id, name FROM users ORDER BY id").fetchall() == [
            (env.id(p), p.name) for p in PEOPLE
        ]
        # LIMIT 10 satisfies this guard; 5 rows with e-mails then meet max_pii_rows (54000)
        refused(conn, "SELECT email FROM users LIMIT 10", None, "54000", "max_pii_rows")
        assert conn.execute("SELECT email FROM users ORDER BY id LIMIT 3").fetchall() == first3


async def test_unbounded_select_guard_with_asyncpg(env: RoleEnv) -> None:
    conn = await env.apg(WRITER)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT email FROM users")
        apg_refused(info.value, "42501", "unbounded_select")
        rows = await conn.fetch("SELECT email FROM users ORDER BY id LIMIT $1", 2)
        assert [r["email"] for r in rows] == [ALICE.email, BEA.email]
        assert await conn.fetchval("SELECT count(*) FROM users") == len(PEOPLE)
    finally:
        await conn.close()


def test_max_pii_rows_guard(env: RoleEnv) -> None:
    ids3 = [env.id(p) for p in PEOPLE[:3]]
    with env.psy(WRITER) as conn:
        for prepare in (False, True):
            refused(conn, "SELECT email FROM users WHERE id > %s", (0,), "54000", "max_pii_rows",
                    prepare=prepare)  # fmt: skip
            assert conn.execute("SELECT name FROM users WHERE id = %s", (env.id(ALICE),)).fetchone() == ("Alice",)
        refused(conn, "SELECT phone FROM users WHERE id > 0 ORDER BY id", None, "54000", "max_pii_rows")
        # three rows pass
        assert conn.execute(
            "SELECT email FROM users WHERE id = ANY(%s) ORDER BY id", (ids3,)
        ).fetchall() == [(p.email,) for p in PEOPLE[:3]]
        # rows without an encrypted value are not counted
        assert conn.execute("SELECT id FROM users WHERE id > 0 ORDER BY id").fetchall() == [
            (env.id(p),) for p in PEOPLE
        ]
        assert conn.execute("SELECT id, ssn FROM users WHERE id > 0 ORDER BY id").fetchall() == [
            (env.id(p), p.ssn) for p in PEOPLE
        ]  # 5 rows, 3 with an ssn
        # COPY TO STDOUT is a result too
        for sql in (
            "COPY (SELECT email FROM users WHERE id > 0) TO STDOUT",
            "COPY (SELECT * FROM users WHERE id > 0) TO STDOUT",
            "COPY (SELECT id, phone FROM users WHERE id > 0) TO STDOUT",
        ):
            rows, err = copy_out(conn, sql)
            assert err is not None, f"{sql}: no error, {len(rows)} rows"
            assert err.sqlstate == "54000", (sql, err.sqlstate, str(err))
            assert "max_pii_rows" in str(err), str(err)
            # the limit counts rows carrying protected values (Dave has no phone)
            assert len([r for r in rows if set(r) & PII_VALUES]) <= 3, (sql, rows)
            assert conn.execute("SELECT count(*) FROM users").fetchone() == (len(PEOPLE),)
        rows, err = copy_out(conn, f"COPY (SELECT email FROM users WHERE id IN ({', '.join(map(str, ids3))}) ORDER BY id) TO STDOUT")
        assert err is None and rows == [(p.email,) for p in PEOPLE[:3]]
        rows, err = copy_out(conn, "COPY (SELECT id, name FROM users ORDER BY id) TO STDOUT")
        assert err is None and rows == [(str(env.id(p)), p.name) for p in PEOPLE]
    # the limit holds in a transaction too, and ROLLBACK leaves the session usable
    with env.psy(WRITER, autocommit=False) as conn:
        refused(conn, "SELECT email FROM users WHERE id > %s", (0,), "54000", "max_pii_rows")
        conn.rollback()
        assert conn.execute("SELECT email FROM users WHERE id = %s", (env.id(ERIN),)).fetchone() == (ERIN.email,)
        conn.commit()


def test_max_pii_rows_counts_values_not_rows(env: RoleEnv) -> None:
    """One row can carry many people's values: a scalar subquery per person, a self-join.
    The limit is on one column's values in a result (review of session 13: all five
    e-mails came back in one row with max_pii_rows: 3)."""
    ids3 = [env.id(p) for p in PEOPLE[:3]]
    subqueries = ", ".join(f"(SELECT email FROM users ORDER BY id LIMIT 1 OFFSET {i})" for i in range(5))
    with env.psy(WRITER) as conn:
        refused(conn, f"SELECT {subqueries}", None, "54000", "public.users.email")
        refused(
            conn,
            "SELECT a.email, b.email FROM users a JOIN users b ON a.id < b.id WHERE a.id = ANY(%s) AND b.id = ANY(%s)",
            (ids3, ids3),
            "54000",
            "max_pii_rows",
        )  # 3 rows, 6 e-mails
        # three people's e-mail, phone and ssn: three values of each column
        rows = conn.execute("SELECT email, phone, ssn FROM users WHERE id = ANY(%s) ORDER BY id", (ids3,)).fetchall()
        assert rows == [(p.email, p.phone, p.ssn) for p in PEOPLE[:3]]


async def test_max_pii_rows_guard_with_asyncpg(env: RoleEnv) -> None:
    conn = await env.apg(WRITER)
    try:
        stmt = await conn.prepare("SELECT email FROM users WHERE id > $1 ORDER BY id")
        with pytest.raises(asyncpg.PostgresError) as info:
            await stmt.fetch(0)
        apg_refused(info.value, "54000", "max_pii_rows")
        # the same statement returning three rows passes
        rows = await stmt.fetch(env.id(BEA))
        assert [r["email"] for r in rows] == [CAROL.email, DAVE.email, ERIN.email]
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT email, phone FROM users WHERE id > $1", 0)
        apg_refused(info.value, "54000", "max_pii_rows")
        assert await conn.fetchval("SELECT ssn FROM users WHERE email = $1", ERIN.email) == ERIN.ssn
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM users WHERE id > $1", 0)]
        assert sorted(ids) == sorted(env.ids.values())
    finally:
        await conn.close()


def test_guards_with_psql(env: RoleEnv) -> None:
    ids3 = ", ".join(str(env.id(p)) for p in PEOPLE[:3])
    script = f"""
\\echo ==unbounded==
SELECT email FROM users;
\\echo ==count==
SELECT count(*) FROM users;
\\echo ==many==
SELECT email FROM users WHERE id > 0;
\\echo ==copy_many==
\\copy (SELECT email FROM users WHERE id > 0) TO STDOUT
\\echo ==copy_table==
\\copy users TO STDOUT
\\echo ==copy_three==
\\copy (SELECT email FROM users WHERE id IN ({ids3}) ORDER BY id) TO STDOUT
\\echo ==end==
SELECT name FROM users WHERE id = {env.id(ALICE)};
"""
    proc = env.psql(WRITER, script)
    assert proc.returncode == 0, proc.stderr
    out = sections(proc.stdout)
    assert out["unbounded"] == [] and out["many"] == []
    assert out["count"] == [str(len(PEOPLE))]
    assert len(out["copy_many"]) <= 3 and out["copy_table"] == [], out
    assert out["copy_three"] == [p.email for p in PEOPLE[:3]]
    assert out["end"] == ["Alice"]
    errors = error_lines(proc.stderr)
    assert len(errors) == 4, proc.stderr
    # the unbounded SELECT and the \copy of the whole table: the guard, before they run
    for line in (errors[0], errors[3]):
        assert "ERROR:  42501:" in line and "unbounded_select" in line, line
    for line in errors[1:3]:
        assert "ERROR:  54000:" in line and "max_pii_rows" in line, line


# -- audit --------------------------------------------------------------------------------
def trail_files(directory: Path) -> list[Path]:
    found = [p for p in directory.rglob("*.jsonl*") if p.is_file() and ".spill" not in p.name]
    return sorted(found, key=lambda p: (p.suffix == ".jsonl", p.name))


def test_refusals_are_audited_without_plaintext(env: RoleEnv, tmp_path: Path) -> None:
    alice = env.id(ALICE)
    with own_proxy(env, tmp_path, read_policy(audit=AUDIT)) as proxy:
        with env.psy(AGENT, proxy, app="rp-audit-agent") as agent:
            assert agent.execute(
                "SELECT email FROM users WHERE email = %s", (ALICE.email,)
            ).fetchone() == (ALICE.masked_email,)
            refused(agent, "SELECT ssn FROM users WHERE id = %s", (alice,), "42501", SSN)
            refused(agent, "SELECT ssn FROM user_ssn WHERE id = %s", (alice,), "42501", SSN)
            assert agent.execute("SELECT name FROM users WHERE id = %s", (alice,)).fetchone() == ("Alice",)
        with env.psy(OUTSIDER, proxy, app="rp-audit-outsider") as outsider:
            refused(outsider, "SELECT email FROM users WHERE id = %s", (alice,), "42501", EMAIL)
        with env.psy(WRITER, proxy, app="rp-audit-writer") as writer:
            refused(writer, "SELECT email FROM users", None, "42501", "unbounded_select")
            refused(writer, "SELECT email FROM users WHERE id > %s", (0,), "54000", "max_pii_rows")
            _, err = copy_out(writer, "COPY users TO STDOUT")  # every row: the guard
            assert err is not None and err.sqlstate == "42501", err
            _, err = copy_out(writer, "COPY (SELECT email FROM users WHERE id > 0) TO STDOUT")
            assert err is not None and err.sqlstate == "54000", err
            assert writer.execute(
                "SELECT phone FROM users WHERE phone = %s", (ALICE.phone,)
            ).fetchone() == (ALICE.phone,)
        wait_until(lambda: proxy.session_count == 0, "the sessions to end")
        proxy.stop()  # flush, shutdown seal
    files = trail_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["trail/audit.jsonl"]
    records = [json.loads(line) for p in files for line in iter_file_lines(p) if line.strip()]
    refusals = [r for r in records if r["type"] == "refusal"]
    got = [(r["user"], r["application_name"], r["sqlstate"], r["decision"]) for r in refusals]
    assert got == [
        (AGENT.user, "rp-audit-agent", "42501", "deny"),  # static
        (AGENT.user, "rp-audit-agent", "42501", "deny"),  # at result time (view)
        (OUTSIDER.user, "rp-audit-outsider", "42501", "deny"),
        (WRITER.user, "rp-audit-writer", "42501", "deny"),  # unbounded_select
        (WRITER.user, "rp-audit-writer", "54000", "deny"),  # max_pii_rows
        (WRITER.user, "rp-audit-writer", "42501", "deny"),  # unbounded_select, COPY of a table
        (WRITER.user, "rp-audit-writer", "54000", "deny"),  # max_pii_rows, COPY
    ], json.dumps(refusals, indent=1)
    reasons = [r["reason"] for r in refusals]
    assert all(isinstance(r, str) and r for r in reasons), reasons
    assert SSN in reasons[0] and SSN in reasons[1] and EMAIL in reasons[2], reasons
    assert "unbounded_select" in reasons[3] and "unbounded_select" in reasons[5], reasons
    assert "max_pii_rows" in reasons[4] and "max_pii_rows" in reasons[6], reasons
    # A result cut short is recorded with the facts of the statement whose result it was
    # (the view's denied value: the columns its values' key ids name; its text names no
    # protected table, so pgcloak did not parse it: no tables).
    facts = [(r["kind"], r["fingerprint"], r["tables"], r["columns_read"]) for r in refusals]
    assert facts[1] == ("select", "SELECT ssn FROM user_ssn WHERE id = $1", [], [SSN])
    assert facts[4] == ("select", "SELECT email FROM users WHERE id > $1", ["public.users"], [EMAIL])
    assert facts[6][:3] == ("copy_out", "COPY (SELECT email FROM users WHERE id > ?) TO STDOUT", ["public.users"])
    # the allowed statements are there too, as statements
    statements = [r for r in records if r["type"] == "statement"]
    assert {r["application_name"] for r in statements} >= {"rp-audit-agent", "rp-audit-writer"}
    # ... saying which columns the session got masked: the agent's email, none of the writer's
    by_app = {(r["application_name"], r["fingerprint"]): r for r in statements}
    # A statement whose result was cut short has its refusal as its event, not also an
    # "allow" with the rows the server sent (the client got fewer, then the error).
    assert ("rp-audit-writer", "SELECT email FROM users WHERE id > $1") not in by_app
    assert ("rp-audit-agent", "SELECT ssn FROM user_ssn WHERE id = $1") not in by_app
    agent_read = by_app[("rp-audit-agent", "SELECT email FROM users WHERE email = $1")]
    assert (agent_read["columns_read"], agent_read["masked"]) == ([EMAIL], [EMAIL])
    writer_read = by_app[("rp-audit-writer", "SELECT phone FROM users WHERE phone = $1")]
    assert (writer_read["columns_read"], writer_read["masked"]) == (["public.users.phone"], [])
    # no plaintext value anywhere in the trail
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    leaked = [v for v in PLAINTEXTS if v in text]
    assert not leaked, leaked
    # and the chain verifies
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ["PGCLOAK_MASTER_KEY"] = env.enc.key_text
    done = subprocess.run(
        [sys.executable, "-m", "pgcloak.cli", "audit", "verify", *map(str, files)],
        env=environ, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK"), done.stdout


async def test_a_refused_lookup_is_found_by_who_accessed(env: RoleEnv, tmp_path: Path) -> None:
    """The help desk may not read SSNs: `SELECT ssn ... WHERE email = ...` is refused
    (42501), but it is still an attempt to read Alice's row, so the refusal carries the
    blind index of the e-mail it looked up (never the e-mail) and `pgcloak audit
    who-accessed --column users.email --value <her e-mail>` lists it: a simple Query, and
    a Parse with the literal in its text. A statement refused at its Parse with a `$1`
    (asyncpg prepares first) never gets the value: it is in the trail, tied to no one."""
    with own_proxy(env, tmp_path, read_policy(audit=AUDIT)) as proxy:
        conn = await env.apg(AGENT, proxy)
        try:
            for sql, args in (
                (f"SELECT ssn FROM users WHERE email = '{ALICE.email.upper()}'", ()),  # no args: a simple Query
                ("SELECT ssn FROM users WHERE email = 'nobody@example.com'", ()),  # someone else
                ("SELECT ssn FROM users WHERE email = $1", (ALICE.email,)),  # refused at Parse, before $1
            ):
                with pytest.raises(asyncpg.PostgresError) as info:
                    await (conn.fetch(sql, *args) if args else conn.execute(sql))
                assert info.value.sqlstate == "42501"
        finally:
            await conn.close()
        with env.psy(AGENT, proxy, app="rp-literal") as agent:  # Parse with the literal
            refused(agent, f"SELECT ssn FROM users WHERE email = '{ALICE.email}'", None, "42501", SSN, prepare=True)
        wait_until(lambda: proxy.session_count == 0, "the sessions to end")
        proxy.stop()
    files = trail_files(tmp_path)
    text = "".join(p.read_text(encoding="utf-8") for p in files)
    assert ALICE.email not in text and ALICE.email.upper() not in text and "nobody@" not in text
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ["PGCLOAK_MASTER_KEY"] = env.enc.key_text

    def who(*extra: str) -> list[tuple[str, str, str]]:
        done = subprocess.run(
            [sys.executable, "-m", "pgcloak.cli", "audit", "who-accessed", "--column", "users.email",
             "--value", ALICE.email, "--policy", str(tmp_path / "policy.yaml"), "--json", *extra, *map(str, files)],
            env=environ, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return [(e["type"], e["sqlstate"], e["fingerprint"]) for e in map(json.loads, done.stdout.splitlines())]

    looked_up = ("refusal", "42501", "SELECT ssn FROM users WHERE email = ?")
    assert who() == [looked_up, looked_up]
    assert ("refusal", "42501", "SELECT ssn FROM users WHERE email = $1") not in who("--include-scans")
    records = [json.loads(line) for p in files for line in iter_file_lines(p) if line.strip()]
    prepared = [r for r in records if r.get("fingerprint") == "SELECT ssn FROM users WHERE email = $1"]
    assert [(r["type"], r["lookups"], r["columns_read"]) for r in prepared] == [("refusal", {}, [SSN])]


# -- reload -------------------------------------------------------------------------------
def test_policy_reload_changes_what_agent_sees(env: RoleEnv, tmp_path: Path) -> None:
    """Editing the policy file (support: users.email reveal) changes what a running
    agent session gets on its next statement, without reconnecting; a second edit
    (users.phone deny) reaches a statement prepared before it; restoring the file
    restores the masks."""
    alice = env.id(ALICE)
    q = "SELECT email, phone FROM users WHERE id = %s"
    masked, revealed = (ALICE.masked_email, ALICE.masked_phone), (ALICE.email, ALICE.masked_phone)
    policy = tmp_path / "policy.yaml"
    with (
        own_proxy(env, tmp_path, read_policy(), policy_poll_interval=0.2) as proxy,
        env.psy(AGENT, proxy) as agent,
    ):
        assert agent.execute(q, (alice,)).fetchone() == masked

        def sees(email: str) -> bool:
            """A new statement on the same session: the e-mail, masked or not."""
            (got,) = agent.execute("SELECT email FROM users WHERE id = %s", (alice,), prepare=False).fetchone() or (None,)
            assert got in (ALICE.masked_email, ALICE.email), got
            return got == email

        replace_file(policy, read_policy(support_email="reveal"))
        wait_until(lambda: sees(ALICE.email), "the agent's session to see the edited policy")
        # only users.email changed: phone still masked, ssn still denied
        assert agent.execute(q, (alice,)).fetchone() == revealed
        assert agent.execute(
            "SELECT email, phone FROM users WHERE email = %s", (CAROL.email,)
        ).fetchone() == (CAROL.email, CAROL.masked_phone)
        refused(agent, "SELECT ssn FROM users WHERE id = %s", (alice,), "42501", SSN)
        with env.psy(AGENT, proxy) as fresh:
            assert fresh.execute(q, (alice,)).fetchone() == revealed
        # a statement prepared before the next edit follows it too (phone: mask -> deny)
        phone = "SELECT phone FROM users WHERE id = %s"
        for _ in range(2):
            assert agent.execute(phone, (alice,), prepare=True).fetchone() == (ALICE.masked_phone,)

        def phone_denied() -> bool:
            try:
                row = agent.execute(phone, (alice,), prepare=True).fetchone()
            except psycopg.errors.InsufficientPrivilege as exc:
                assert PHONE in str(exc), exc
                return True
            assert row == (ALICE.masked_phone,), row
            return False

        replace_file(policy, read_policy(support_email="reveal", support_phone="deny"))
        wait_until(phone_denied, "the prepared statement to follow the edit")
        refused(agent, phone, (alice,), "42501", "permission denied", PHONE, prepare=False)
        assert agent.execute(
            "SELECT email, name FROM users WHERE id = %s", (alice,)
        ).fetchone() == (ALICE.email, "Alice")
        # and back
        replace_file(policy, read_policy())
        wait_until(lambda: sees(ALICE.masked_email), "the agent's session to see the restored policy")
        assert agent.execute(q, (alice,)).fetchone() == masked
        assert agent.execute(phone, (alice,), prepare=True).fetchone() == (ALICE.masked_phone,)
    env.assert_ciphertext(ALICE)
