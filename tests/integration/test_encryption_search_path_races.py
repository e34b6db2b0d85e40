"""Where pgcloak's idea of the search_path could part from PostgreSQL's: it must not.

A review of the first search_path support found these: pipelined batches that fail, SET
LOCAL across batches, savepoints, COMMIT/ROLLBACK AND CHAIN, PREPARE TRANSACTION, SET
ROLE with "$user", SET SCHEMA, DO blocks, redefined and unexecuted statements, raw
protocol orderings. pgcloak now asks PostgreSQL for the path after any of them, and
refuses what it planned while the path was unknown.

The policy protects crm."Contacts"."Email"; public."Contacts" is unprotected. Each
scenario ends with :func:`probe`: an unqualified INSERT through pgcloak, then a direct
read: plaintext in crm."Contacts" would be a failure (a refusal is fine, as is ciphertext
in either table).
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from contacts_fixtures import contacts_env
from encryption_fixtures import EncEnv, unique
from raw_wire import (
    COPY_DONE,
    SYNC,
    bind,
    copy_data,
    execute,
    message,
    parse,
    query,
    raw,
    read_messages,
    types,
)

from pgcloak.demo.postgres import TemporaryPostgres


@pytest.fixture(scope="session")
def pg() -> Iterator[TemporaryPostgres]:
    """A server of this module's own: PREPARE TRANSACTION needs max_prepared_transactions."""
    server = TemporaryPostgres(settings={"max_prepared_transactions": 5})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_app_user(pg):
    return pg.create_login("app", "app-secret", "appdb")


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with contacts_env(pg, pg_app_user, tmp_path_factory.mktemp("rev_sp"), "rsp") as e:
        yield e


def probe(env: EncEnv, conn: psycopg.Connection, commit: bool = False) -> str:
    email, note = unique("rv"), uuid.uuid4().hex[:12]
    conn.execute('INSERT INTO "Contacts" ("Email", note) VALUES (%s, %s)', (email, note))
    pg_path = conn.execute("SELECT current_schemas(false)::text").fetchone()[0]
    if commit:
        conn.execute("COMMIT")
    crm = env.raw('SELECT "Email" FROM crm."Contacts" WHERE note = %s', note)
    pub = env.raw('SELECT "Email" FROM public."Contacts" WHERE note = %s', note)
    if crm:
        state = "crm:PLAINTEXT" if crm[0][0] == email else "crm:encrypted"
    else:
        state = "public:" + ("plaintext" if pub[0][0] == email else "encrypted")
    assert pg_path
    return state


def safe(state: str) -> None:
    assert state != "crm:PLAINTEXT", "FAIL-OPEN: plaintext stored in protected crm.Contacts"


def connect(env: EncEnv, **kw) -> psycopg.Connection:
    return env.psy(**kw)


# -- scenarios ---------------------------------------------------------------------
def test_set_schema_alias(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET SCHEMA 'crm'")
        safe(probe(env, conn))


def test_pipeline_error_before_set(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT 1/0")
                conn.execute("SET search_path = public")
        safe(probe(env, conn))


def test_set_then_error_in_batch(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SET search_path = public")
                conn.execute("SELECT 1/0")
        safe(probe(env, conn))


def test_set_local_in_batch_without_begin(env: EncEnv) -> None:
    email, note = unique("rvl"), uuid.uuid4().hex[:12]
    with connect(env) as conn:
        with conn.pipeline():
            conn.execute("SET LOCAL search_path = crm")
            conn.execute('INSERT INTO "Contacts" ("Email", note) VALUES (%s, %s)', (email, note))
    crm = env.raw('SELECT "Email" FROM crm."Contacts" WHERE note = %s', note)
    assert crm and crm[0][0] != email, "SET LOCAL in the batch: the row belongs in crm, encrypted"


def test_set_role_dollar_user(env: EncEnv) -> None:
    env.pg.run_sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='crm') THEN CREATE ROLE crm; END IF; END $$"
    )
    env.pg.run_sql("GRANT crm TO app")
    env.pg.run_sql('GRANT USAGE ON SCHEMA crm TO crm; GRANT ALL ON crm."Contacts" TO crm; GRANT ALL ON ALL SEQUENCES IN SCHEMA crm TO crm', dbname=env.dbname)
    with connect(env) as conn:
        conn.execute("SET ROLE crm")
        safe(probe(env, conn))


def test_sql_prepare_then_set_then_execute(env: EncEnv) -> None:
    """PostgreSQL analyses the statement again for the new path; pgcloak sends EXECUTE as
    the statement itself, planned for the path now: the value is encrypted for crm."""
    with connect(env) as conn:
        conn.execute('PREPARE p(text, text) AS INSERT INTO "Contacts" ("Email", note) VALUES ($1, $2)')
        conn.execute("SET search_path = crm")
        email, note = unique("rvp"), uuid.uuid4().hex[:12]
        conn.execute(f"EXECUTE p('{email}', '{note}')")
    env.assert_stored(env.raw_one('SELECT "Email" FROM crm."Contacts" WHERE note = %s', note), email, "crm.Contacts", "Email")


def test_savepoint_rollback_to(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        conn.execute("BEGIN")
        conn.execute("SAVEPOINT s")
        conn.execute("SET search_path = public")
        conn.execute("ROLLBACK TO s")
        safe(probe(env, conn, commit=True))


def test_failed_set_in_aborted_subxact(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        conn.execute("BEGIN")
        conn.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SET search_path = public")
        conn.execute("ROLLBACK TO s")
        safe(probe(env, conn, commit=True))


def test_rollback_and_chain(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        conn.execute("BEGIN")
        conn.execute("SET search_path = public")
        conn.execute("ROLLBACK AND CHAIN")
        safe(probe(env, conn, commit=True))


def test_commit_and_chain_then_rollback(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("BEGIN")
        conn.execute("SET search_path = crm")
        conn.execute("COMMIT AND CHAIN")
        conn.execute("ROLLBACK")
        safe(probe(env, conn))


def test_commit_begin_in_one_query(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("BEGIN")
        conn.execute("SET search_path = crm")
        conn.execute("COMMIT; BEGIN")
        conn.execute("ROLLBACK")
        safe(probe(env, conn))


def test_prepare_transaction(env: EncEnv) -> None:
    gid = "rv" + uuid.uuid4().hex[:8]
    with connect(env) as conn:
        conn.execute("BEGIN")
        conn.execute("SET search_path = crm")
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
        try:
            state = probe(env, conn)
        finally:
            with env.direct() as d:
                d.execute(f"ROLLBACK PREPARED '{gid}'")
        safe(state)


def test_pipelined_batches_error_then_set(env: EncEnv) -> None:
    """Two Sync batches flushed together: batch 1 fails, batch 2 sets the path."""
    with connect(env) as conn:
        raw(conn, parse("", "SELECT 1/0") + bind("", "") + execute("") + SYNC
            + parse("", "SET search_path = crm") + bind("", "") + execute("") + SYNC, 2)
        safe(probe(env, conn))


def test_pipelined_batches_ok_then_failing_set(env: EncEnv) -> None:
    """batch 1 fine, batch 2 = SET public + error (rolled back): PG stays crm."""
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        raw(conn, parse("", "SELECT 1") + bind("", "") + execute("") + SYNC
            + parse("", "SET search_path = public") + bind("", "") + execute("")
            + parse("", "SELECT 1/0") + bind("", "") + execute("") + SYNC, 2)
        safe(probe(env, conn))


def test_bind_without_execute(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        raw(conn, parse("s1", "SET search_path = public") + bind("p1", "s1") + SYNC, 1)
        safe(probe(env, conn))


def test_portal_execution_order(env: EncEnv) -> None:
    with connect(env) as conn:
        raw(conn, parse("a", "SET search_path = crm") + parse("b", "SET search_path = public")
            + bind("pa", "a") + bind("pb", "b") + execute("pb") + execute("pa") + SYNC, 1)
        safe(probe(env, conn))


def test_simple_query_pipelined_begin_set_rollback(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        raw(conn, query("BEGIN") + query("SET search_path = public") + query("ROLLBACK"), 3)
        safe(probe(env, conn))


@pytest.mark.parametrize(
    "sql",
    ['SET search_path = U&"\\0063rm"', "SELECT U&\"set\\005fconfig\"(U&'search\\005fpath', 'crm', false)"],
)
def test_unicode_escaped_names_are_refused_and_the_path_stays(env: EncEnv, sql: str) -> None:
    # pgcloak reads names as written: U&"..." identifiers are refused (0A000), so the
    # path they would have set is never in doubt.
    with connect(env) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(sql)
        assert probe(env, conn) == "public:plaintext"  # public."Contacts" is not protected here


def test_do_block_set_config(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("DO $$ BEGIN PERFORM set_config('search_path', 'crm', false); END $$")
        safe(probe(env, conn))


def test_named_parse_redefinition(env: EncEnv) -> None:
    """PostgreSQL refuses to redefine a named statement (42P05) and keeps the first text;
    pgcloak records the second text's change."""
    with connect(env) as conn:
        raw(conn, parse("s", "SET search_path = crm") + SYNC, 1)
        raw(conn, parse("s", "SET search_path = public") + SYNC, 1)
        raw(conn, bind("", "s") + execute("") + SYNC, 1)
        safe(probe(env, conn))


def test_protocol_prepared_insert_across_set(env: EncEnv) -> None:
    email, note = unique("rvq"), uuid.uuid4().hex[:12]
    with connect(env, prepare_threshold=0) as conn:
        q = 'INSERT INTO "Contacts" ("Email", note) VALUES (%s, %s)'
        conn.execute(q, ("a-" + email, note + "p"))
        conn.execute("SET search_path = crm")
        # Prepared for public."Contacts": PostgreSQL analyses it again for crm, and so
        # does pgcloak (the statement is prepared again, encrypting for crm).
        conn.execute(q, (email, note))
        rows = conn.execute('SELECT note FROM "Contacts" WHERE "Email" = %s', (email,)).fetchall()
        conn.execute("SET search_path = public")
        assert conn.execute('SELECT note FROM "Contacts" WHERE "Email" = %s', (email,)).fetchall() == []
        conn.execute("SET search_path = crm")
        again = conn.execute('SELECT note FROM "Contacts" WHERE "Email" = %s', (email,)).fetchall()
    crm = env.raw('SELECT "Email" FROM crm."Contacts" WHERE note = %s', note)
    assert rows == again == [(note,)]
    assert crm and crm[0][0] != email
    assert env.raw('SELECT "Email" FROM public."Contacts" WHERE note = %s', note + "p") == [("a-" + email,)]


def _ins_sql(email: str, note: str) -> str:
    return f"INSERT INTO \"Contacts\" (\"Email\", note) VALUES ('{email}', '{note}')"


def _check(env: EncEnv, email: str, note: str) -> None:
    crm = env.raw('SELECT "Email" FROM crm."Contacts" WHERE note = %s', note)
    pub = env.raw('SELECT "Email" FROM public."Contacts" WHERE note = %s', note)
    # Planned while the path was unknown (pipelined past a change): refused, or stored safely.
    assert not (crm and crm[0][0] == email), "FAIL-OPEN"
    assert not pub or pub[0][0] == email


def test_set_local_batch_then_next_batch_pipelined(env: EncEnv) -> None:
    email, note = unique("rvb"), uuid.uuid4().hex[:12]
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        raw(conn, parse("", "SET LOCAL search_path = public") + bind("", "") + execute("") + SYNC
            + parse("", _ins_sql(email, note)) + bind("", "") + execute("") + SYNC, 2)
    _check(env, email, note)


def test_set_local_simple_query_pipelined(env: EncEnv) -> None:
    email, note = unique("rvc"), uuid.uuid4().hex[:12]
    with connect(env) as conn:
        conn.execute("SET search_path = crm")
        raw(conn, query("SET LOCAL search_path = public") + query(_ins_sql(email, note)), 2)
    _check(env, email, note)


# -- found by a second review: the probe itself ------------------------------------------
def _read_until(conn: psycopg.Connection, kind: str) -> list[tuple[str, bytes]]:
    return read_messages(conn, lambda out: any(t == kind for t, _ in out))


def test_sql_level_execute_of_a_change(env: EncEnv) -> None:
    with connect(env) as conn:
        conn.execute("PREPARE sp AS SELECT set_config('search_path', 'crm', false)")
        conn.execute("EXECUTE sp")
        assert probe(env, conn) == "crm:encrypted"


def test_probe_takes_no_snapshot(env: EncEnv) -> None:
    """SET TRANSACTION must come before the block's first query: the probe is none."""
    with connect(env) as conn:
        conn.execute("BEGIN")
        conn.execute("SET LOCAL search_path = crm")
        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        assert probe(env, conn, commit=True) == "crm:encrypted"


def test_probe_waits_for_an_unsynced_extended_batch(env: EncEnv) -> None:
    """A portal suspended in a batch without Sync survives: the probe waits for the Sync."""
    with connect(env) as conn:
        fd = conn.pgconn.socket
        limited = message(b"E", b"\0" + struct.pack("!i", 2))
        os.write(fd, query("SET search_path = crm") + parse("", "SELECT generate_series(1, 5)") + bind("", "") + limited + message(b"H", b""))
        _read_until(conn, "s")
        os.write(fd, limited + SYNC)
        out = _read_until(conn, "Z")
        assert not any(t == "E" for t, _ in out), out
        assert [t for t, _ in out].count("D") == 2
        assert probe(env, conn) == "crm:encrypted"


def test_extended_copy_in_does_not_lose_count(env: EncEnv) -> None:
    """PostgreSQL ignores the Sync a client sends during COPY FROM STDIN: pgcloak must not
    count it (else it would wait for a ReadyForQuery that never comes, and never ask)."""
    with connect(env) as conn:
        fd = conn.pgconn.socket
        os.write(fd, parse("", 'COPY public."Contacts" (note) FROM STDIN') + bind("", "") + execute("") + SYNC)
        _read_until(conn, "G")
        os.write(fd, message(b"d", b"x\n") + message(b"c", b"") + SYNC)
        _read_until(conn, "Z")
        conn.execute("SET search_path = crm")
        assert probe(env, conn) == "crm:encrypted"


def test_function_that_changes_the_path_cannot_leak(env: EncEnv) -> None:
    """pgcloak cannot see a function change the path; the name it resolved is sent
    qualified, so PostgreSQL writes where pgcloak encrypted for (here: public)."""
    env.pg.run_sql(
        "CREATE OR REPLACE FUNCTION public.go_tenant() RETURNS void LANGUAGE sql "
        "AS $$ SELECT pg_catalog.set_config('search_path', 'crm', false) $$",
        dbname=env.dbname,
    )
    with connect(env) as conn:
        conn.execute("SELECT public.go_tenant()")
        assert conn.execute("SHOW search_path").fetchone() == ("crm",)
        assert probe(env, conn) == "public:plaintext"  # the unprotected table, as pgcloak planned


def test_extended_copy_with_a_leading_comment_keeps_the_batch_count(env: EncEnv) -> None:
    """An extended-protocol COPY FROM STDIN into an unprotected table whose text starts
    with a comment is still a COPY: the Sync PostgreSQL ignores in copy-in mode is not
    counted, so after a search_path change the path is asked again as usual (before the
    fix, the count stayed one too high and every unqualified protected name was refused)."""
    with env.psy() as conn:
        start = (
            parse("", "/* bulk load */ COPY plain_contacts (email) FROM STDIN")
            + bind("", "")
            + execute("")
            + SYNC
        )
        os.write(conn.pgconn.socket, start)
        got = read_messages(conn, lambda out: "G" in types(out) or "Z" in types(out))
        assert types(got)[-1] == "G", got
        os.write(conn.pgconn.socket, copy_data("r2-comment@example.com\n") + COPY_DONE + SYNC)
        assert types(read_messages(conn, lambda out: "Z" in types(out))) == ["C", "Z"]
        assert types(raw(conn, query("SET search_path = public"), 1)) == ["C", "Z"]
        email = unique("aftercopy")
        conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))  # 0A000 when the count drifted
    rows = env.raw("SELECT email FROM users WHERE left(email, 22) = %s", env.index_of("public.users", "email", email))
    assert len(rows) == 1
    env.assert_stored(rows[0][0], email)
