"""What cannot work on ciphertext is refused before it reaches PostgreSQL: SQLSTATE
0A000, the protected column named in the message, the connection usable afterwards,
an explicit transaction aborted as by a server error (25P02 until ROLLBACK), and no
plaintext ever stored or even sent.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env, unique
from psycopg import errors

from pgcloak import cli


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_ref"), "ref") as e:
        with e.direct() as d:
            d.execute("INSERT INTO plain_contacts (email, phone) VALUES ('leak@example.com', '555-0000')")
        yield e


SECRET = "refused-secret@example.com"

# (statement with $n, parameters, words the message must contain)
REFUSED: list[tuple[str, tuple[object, ...], tuple[str, ...]]] = [
    ("SELECT id FROM users WHERE email LIKE $1", ("%secret%",), ("users.email", "LIKE")),
    ("SELECT id FROM users WHERE email ILIKE $1", ("%secret%",), ("users.email", "ILIKE")),
    ("SELECT id FROM users WHERE phone BETWEEN $1 AND $2", ("1", "9"), ("users.phone", "range")),
    ("SELECT id FROM users WHERE email > $1", (SECRET,), ("users.email", "range")),
    ("SELECT id, email FROM users ORDER BY email", (), ("users.email", "ORDER BY")),
    ("SELECT email, count(*) FROM users GROUP BY email", (), ("users.email", "GROUP BY")),
    ("SELECT id FROM users WHERE lower(email) = $1", (SECRET,), ("users.email", "lower")),
    ("SELECT id FROM users WHERE email || 'x' = $1", (SECRET,), ("users.email", "concatenation")),
    ("SELECT id FROM users WHERE email = name", (), ("users.email", "unprotected column")),
    ("SELECT id FROM users WHERE ssn = $1", ("078-05-1120",), ("users.ssn", "blind index")),
    ("SELECT u.id FROM users u JOIN users v ON u.email = v.phone", (), ("users.email", "join_group")),
    ("SELECT id FROM users WHERE email IN (SELECT email FROM plain_contacts)", (), ("users.email", "IN (subquery)")),
    ("INSERT INTO users (email) SELECT email FROM plain_contacts", (), ("users.email", "INSERT ... SELECT")),
    ("INSERT INTO users (email) SELECT p.email FROM plain_contacts p", (), ("users.email", "p.email")),
    ("INSERT INTO users (email) VALUES (lower($1))", (SECRET,), ("users.email", "LOWER")),
    ("INSERT INTO users (email) VALUES ($1::varchar(30))", (SECRET,), ("users.email", "cast")),
    ("INSERT INTO users VALUES (DEFAULT, $1)", (SECRET,), ("public.users", "must name its columns")),
    ("UPDATE users u SET email = p.email FROM plain_contacts p WHERE p.phone = $1", ("555-0000",),
     ("users.email", "p.email")),
    ("UPDATE users SET phone = email WHERE id = $1", (1,), ("users.phone", "users.email")),
    ("MERGE INTO users u USING plain_contacts p ON u.email = p.email WHEN NOT MATCHED THEN INSERT (email) "
     "VALUES (p.email)", (), ("public.users", "MERGE")),
    ("SELECT DISTINCT ON (email) id FROM users", (), ("users.email", "DISTINCT ON")),
    ("SELECT DISTINCT email FROM users", (), ("users.email", "SELECT DISTINCT")),
    ("SELECT email FROM users UNION SELECT buyer_email FROM orders", (), ("orders.buyer_email", "UNION")),
]


def ids(cases: list[tuple[str, tuple[object, ...], tuple[str, ...]]]) -> list[str]:
    return [c[0][:40] for c in cases]


@pytest.fixture(scope="module")
async def apg_conn(env: EncEnv):
    conn = await env.apg(server_settings={"application_name": "enc-refusals"})
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize(("sql", "args", "words"), REFUSED, ids=ids(REFUSED))
async def test_refused_extended_protocol(env: EncEnv, apg_conn: asyncpg.Connection, sql: str, args, words):
    with pytest.raises(asyncpg.PostgresError) as err:
        await apg_conn.execute(sql, *args) if args else await apg_conn.fetch(sql)
    assert err.value.sqlstate == "0A000", str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    # the same connection goes on
    assert await apg_conn.fetchval("SELECT $1::int + 1", 41) == 42


async def test_refused_statement_text_never_reaches_postgres(env: EncEnv, apg_conn: asyncpg.Connection):
    probe = f"probe-{uuid.uuid4().hex}@example.com"
    with pytest.raises(asyncpg.PostgresError):
        await apg_conn.execute(f"SELECT id FROM users WHERE email LIKE '{probe}'")
    last = env.raw_one("SELECT query FROM pg_stat_activity WHERE application_name = 'enc-refusals'")
    assert probe not in last and "pgcloak_refused_" in last


@pytest.mark.parametrize(("sql", "args", "words"), REFUSED, ids=ids(REFUSED))
def test_refused_simple_protocol_literals(env: EncEnv, sql: str, args, words):
    with env.psy(cursor_factory=psycopg.ClientCursor) as conn:
        text = sql
        for n in range(len(args), 0, -1):
            text = text.replace(f"${n}", "%s")
        with pytest.raises(errors.FeatureNotSupported) as err:
            conn.execute(text, args or None)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_opaque_statements_naming_a_protected_table(env: EncEnv):
    with env.psy() as conn:
        for sql in (
            "DO $$ BEGIN UPDATE users SET email = 'plain@example.com' WHERE id = 1; END $$",
            "CALL some_proc('users')",
            "COPY users (email) FROM PROGRAM 'echo plain@example.com'",
            "COPY users FROM STDIN",
            "COPY users (email) FROM STDIN (FORMAT binary)",
        ):
            with pytest.raises(errors.FeatureNotSupported) as err:
                conn.execute(sql)
            assert "users" in str(err.value), sql
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # maintenance commands pass, and so do statements naming no protected table
        conn.execute("VACUUM users")
        conn.execute("ANALYZE users")
        conn.execute("DO $$ BEGIN PERFORM 1; END $$")
        with conn.transaction():
            conn.execute("LOCK TABLE users IN SHARE MODE")
    assert env.raw_one("SELECT count(*) FROM users WHERE email = 'plain@example.com'") == 0


def test_refusal_inside_a_transaction_aborts_it(env: EncEnv):
    email = unique("txn")
    with env.psy(autocommit=False) as conn:
        conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))
        with pytest.raises(errors.FeatureNotSupported):
            conn.execute("SELECT id FROM users ORDER BY phone")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT id FROM users WHERE email = %s", (email,))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (0,)
        # a savepoint recovers from a refusal as from any error
        conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))
        conn.execute("SAVEPOINT s")
        with pytest.raises(errors.FeatureNotSupported):
            conn.execute("SELECT id FROM users WHERE email LIKE 'x%'")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.commit()
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email))
    assert len(stored) == 1
    env.assert_stored(stored[0][0], email)


async def test_refusal_inside_asyncpg_transaction(env: EncEnv, apg_conn: asyncpg.Connection):
    email = unique("apgtxn")
    with pytest.raises(asyncpg.FeatureNotSupportedError):
        async with apg_conn.transaction():
            await apg_conn.execute("INSERT INTO users (email) VALUES ($1)", email)
            try:
                await apg_conn.fetch("SELECT id FROM users WHERE phone < $1", "5")
            finally:
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await apg_conn.fetchval("SELECT 1")
    assert await apg_conn.fetchval("SELECT count(*) FROM users WHERE email = $1", email) == 0
    assert await apg_conn.fetchval("SELECT 1") == 1


def test_nothing_in_plaintext(env: EncEnv):
    """After every refusal above, no protected column holds anything but its protected form."""
    rows = env.raw(
        "SELECT email, phone, ssn, loyalty_id FROM users WHERE "
        "(email IS NOT NULL AND email !~ '^[A-Za-z0-9_-]{22}\\.pgc1:') OR "
        "(phone IS NOT NULL AND phone !~ '^[A-Za-z0-9_-]{22}\\.pgc1:') OR "
        "(ssn IS NOT NULL AND ssn !~ '^pgc1:') OR "
        "(loyalty_id IS NOT NULL AND loyalty_id !~ '^[A-Za-z0-9_-]{22}$')"
    )
    assert rows == []
    assert env.raw_one("SELECT count(*) FROM users") > 0


def test_named_statement_redefinition_never_lets_plaintext_through(env: EncEnv):
    """A second Parse of a name is refused (42P05, as PostgreSQL refuses it) and changes
    nothing: Binds run the first definition, which the server still holds, planned as
    pgcloak planned it."""
    email, second, third = unique("redefine"), unique("redefine-sql"), unique("redefine-again")
    with env.psy() as conn:
        pg = conn.pgconn
        assert pg.prepare(b"enc_s1", b"INSERT INTO users (email) VALUES ($1)").status == psycopg.pq.ExecStatus.COMMAND_OK
        again = pg.prepare(b"enc_s1", b"SELECT $1::text")
        assert again.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42P05"
        res = pg.exec_prepared(b"enc_s1", [email.encode()])
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK and res.command_tuples == 1  # the INSERT ran
        # closing the name makes it usable again, and the value is encrypted
        conn.execute("DEALLOCATE enc_s1")
        assert pg.prepare(b"enc_s1", b"INSERT INTO users (email) VALUES ($1)").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pg.exec_prepared(b"enc_s1", [third.encode()]).status == psycopg.pq.ExecStatus.COMMAND_OK
        # SQL-level PREPARE redefined the same way: pgcloak asks PostgreSQL which
        # definition it kept (the first), and EXECUTE encrypts for it.
        conn.execute("PREPARE enc_p1(text) AS INSERT INTO users (email) VALUES ($1)")
        with pytest.raises(errors.DuplicatePreparedStatement):
            conn.execute("PREPARE enc_p1(text) AS SELECT $1")
        conn.execute(f"EXECUTE enc_p1('{second}')")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    for value in (email, second, third):
        stored = env.raw("SELECT email FROM users WHERE email LIKE %s OR left(email, 22) = %s",
                         f"%{value}%", env.index_of(USERS, "email", value))
        assert len(stored) == 1
        env.assert_stored(stored[0][0], value)


# -- writes pgcloak cannot see: held to ciphertext by the CHECK constraints of `policy ddl` ----
def _stored_in_clear(env: EncEnv, email: str) -> list[tuple[object, ...]]:
    return env.raw("SELECT id FROM users WHERE email = %s OR phone = %s", email, email)


def test_writes_through_a_view_or_function_cannot_store_plaintext(env: EncEnv):
    """pgcloak plans the statements it is sent: an updatable view or a function over
    users is not in the policy, so their values pass as they came. The DDL's CHECK
    constraints make PostgreSQL refuse them (23514); nothing is stored."""
    with env.direct() as d:
        d.execute("CREATE OR REPLACE VIEW people AS SELECT id, email, phone FROM users")
        d.execute(
            "CREATE OR REPLACE FUNCTION add_person(e text) RETURNS void LANGUAGE sql "
            "AS $$ INSERT INTO users (email) VALUES (e) $$"
        )
    via_view, via_function, direct = unique("view"), unique("fn"), unique("direct")
    with env.psy() as conn:
        with pytest.raises(errors.CheckViolation) as ei:
            conn.execute("INSERT INTO people (email, phone) VALUES (%s, '555-0100')", (via_view,))
        assert "users_email_pgcloak_check" in str(ei.value)
        with pytest.raises(errors.CheckViolation):
            conn.execute("UPDATE people SET phone = %s WHERE id = (SELECT min(id) FROM users)", (via_view,))
        with pytest.raises(errors.CheckViolation):
            conn.execute("SELECT add_person(%s)", (via_function,))
        # pgcloak's own writes pass the same checks; the session goes on.
        ours = unique("ours")
        conn.execute("INSERT INTO users (email, phone) VALUES (%s, '555-0101')", (ours,))
        assert conn.execute("SELECT phone FROM users WHERE email = %s", (ours,)).fetchall() == [("555-0101",)]
    with env.direct() as d, pytest.raises(errors.CheckViolation):
        d.execute("INSERT INTO users (email) VALUES (%s)", (direct,))
    for email in (via_view, via_function, direct):
        assert _stored_in_clear(env, email) == []
    env.assert_stored(env.raw_one("SELECT email FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", ours)), ours)


def test_ddl_checks_of_two_columns_whose_names_truncate_alike_both_hold(env: EncEnv, tmp_path: Path) -> None:
    """``{table}_{column}_pgcloak_check`` longer than 63 bytes would be truncated by
    PostgreSQL, two such names alike, and the second ALTER's ``DROP CONSTRAINT IF EXISTS``
    would drop the first column's check (found by a review): names that long are cut
    short by pgcloak with a hash, and each protected column keeps a check of its own."""
    table = "customer_relationship_management_contacts"  # 41 characters
    home, work = "emergency_contact_phone_home", "emergency_contact_phone_work"
    policy = tmp_path / "long.yaml"
    policy.write_text(
        "version: 1\ntables:\n"
        f"  public.{table}:\n"
        f"    {home}: {{encrypt: true}}\n"
        f"    {work}: {{encrypt: true}}\n",
        encoding="utf-8",
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["policy", "ddl", str(policy)]) == 0
    with env.direct() as d:
        d.execute(f"DROP TABLE IF EXISTS {table}")
        d.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, {home} text, {work} text)")
        d.execute(out.getvalue())
        checks = d.execute(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
            (table,),
        ).fetchone()
        with pytest.raises(errors.CheckViolation):  # the second column's check
            d.execute(f"INSERT INTO {table} ({work}) VALUES ('555-0100')")
        stored_plain = True
        try:
            d.execute(f"INSERT INTO {table} ({home}) VALUES ('555-0199')")
        except errors.CheckViolation:
            stored_plain = False
    assert checks == (2,), f"one CHECK per protected column expected, found {checks}"
    assert not stored_plain, f"plaintext stored in {table}.{home}: its CHECK was dropped by {work}'s"


def test_client_encodings_pgcloak_cannot_read_are_refused(env: EncEnv) -> None:
    """In SJIS, BIG5, GBK, UHC, GB18030 and JOHAB a character's second byte can be a
    backslash, a quote or a TAB: PostgreSQL converts the text before it parses it, pgcloak
    parses the bytes, so a COPY line or a string literal could be split one way by pgcloak
    and another by PostgreSQL (review of session 13). Statements on protected tables are
    refused under them, and switching to them is refused before it runs."""
    name = unique("sjis")
    with psycopg.connect(env.proxy_dsn(), autocommit=True, client_encoding="SHIFT_JIS_2004") as conn:
        with pytest.raises(errors.FeatureNotSupported):
            conn.execute("SELECT email FROM users WHERE id = 1")
    with psycopg.connect(env.proxy_dsn(), autocommit=True, client_encoding="SJIS") as conn:
        for sql in (
            f"INSERT INTO users (name, email) VALUES ('{name}', '{name}@example.com')",
            "COPY users (name, email) FROM STDIN",
            "SELECT email FROM users WHERE id = 1",
        ):
            with pytest.raises(errors.FeatureNotSupported) as caught:
                conn.execute(sql)
            assert "client encoding SJIS" in str(caught.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # nothing protected: as it is
        conn.execute("SET client_encoding TO 'UTF8'")
        conn.execute("INSERT INTO users (name, email) VALUES (%s, %s)", (name, f"{name}@example.com"))
    with env.psy() as conn:
        for sql in (
            "SET client_encoding TO 'BIG5'",
            "SET NAMES 'sjis'",
            "SELECT set_config('client_encoding', 'GBK', false)",
            "SET client_encoding TO 'S-JIS'",  # PostgreSQL ignores what is not a letter or digit
            "SET client_encoding TO 'SHIFT_JIS_2004'",
            # whatever it sets applies to the COPY data that follows
            "SET client_encoding TO 'UTF8'; COPY users (name, email) FROM STDIN",
        ):
            with pytest.raises(errors.FeatureNotSupported):
                conn.execute(sql)
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        conn.execute("SET client_encoding TO 'LATIN1'")  # every byte of it is what it looks like
        assert conn.execute("SELECT name FROM users WHERE email = %s", (f"{name}@example.com",)).fetchone() == (name,)
    env.assert_stored(env.raw_one("SELECT email FROM users WHERE name = %s", name), f"{name}@example.com")
