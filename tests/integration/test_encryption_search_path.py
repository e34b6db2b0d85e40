"""Unqualified table names follow the session's search_path, with real clients.

The test policy protects ``crm."Contacts"."Email"`` (a schema other than ``public``), and
this module adds an unprotected ``public."Contacts"`` of the same shape. An application
that reaches ``crm`` through its ``search_path`` and writes ``INSERT INTO "Contacts"``
must get ciphertext stored (before, pgcloak read every unqualified name as ``public``
and let the value through in clear). Every check has both sides: what PostgreSQL holds
(read directly) and what the client reads back through pgcloak.

The path is learned at session start (``options=-c search_path=...``, ``ALTER ROLE ...
SET search_path``) and asked again after ``SET``, ``SET LOCAL``, ``RESET``, ``set_config``,
``DO`` and transaction blocks that commit or roll back; a change sent with other
statements in one Query is refused (0A000) and the session keeps serving.
``test_encryption_search_path_races.py`` has the harder orderings.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from contacts_fixtures import contacts_env
from encryption_fixtures import EncEnv, unique

CONTACTS = 'crm."Contacts"'
KEY_TABLE = "crm.Contacts"


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with contacts_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_sp"), "sp") as e:
        yield e


def _note() -> str:
    return uuid.uuid4().hex[:12]


def _stored(env: EncEnv, schema: str, note: str) -> str:
    return str(env.raw_one(f'SELECT "Email" FROM {schema}."Contacts" WHERE note = %s', note))


def _insert(conn: psycopg.Connection, email: str, note: str) -> None:
    conn.execute('INSERT INTO "Contacts" ("Email", note) VALUES (%s, %s)', (email, note))


def _assert_encrypted_in_crm(env: EncEnv, email: str, note: str) -> None:
    env.assert_stored(_stored(env, "crm", note), email, table=KEY_TABLE, column="Email")
    assert env.raw('SELECT 1 FROM public."Contacts" WHERE note = %s', note) == []


@pytest.mark.parametrize("prepare", [False, True], ids=["unnamed", "prepared"])
def test_set_search_path_then_unqualified_insert_is_encrypted(env: EncEnv, prepare: bool) -> None:
    email, note = unique("sp"), _note()
    with env.psy(prepare_threshold=0 if prepare else None) as conn:
        conn.execute("SET search_path TO crm, public")
        _insert(conn, email, note)
        # The look-up by the blind index finds it, unqualified, and decrypts it.
        row = conn.execute('SELECT "Email", note FROM "Contacts" WHERE "Email" = %s', (email,)).fetchone()
        assert row == (email, note)
    _assert_encrypted_in_crm(env, email, note)


def test_simple_protocol_set_and_client_side_literals(env: EncEnv) -> None:
    email, note = unique("spq"), _note()
    with env.psy(cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute('SET search_path = "crm"')
        _insert(conn, email, note)
        assert conn.execute('SELECT note FROM "Contacts" WHERE "Email" = %s', (email,)).fetchall() == [(note,)]
    _assert_encrypted_in_crm(env, email, note)


def test_startup_options_search_path_is_learned(env: EncEnv) -> None:
    email, note = unique("spo"), _note()
    with psycopg.connect(env.proxy_dsn(), autocommit=True, options="-c search_path=crm,public") as conn:
        _insert(conn, email, note)
    _assert_encrypted_in_crm(env, email, note)


def test_role_default_search_path_is_learned(env: EncEnv) -> None:
    email, note = unique("spr"), _note()
    role, db = env.login.user, env.login.dbname
    env.pg.run_sql(f'ALTER ROLE "{role}" IN DATABASE "{db}" SET search_path = crm, public')
    try:
        with env.psy() as conn:
            _insert(conn, email, note)
            # RESET returns to the session's default (crm here), not to "public".
            conn.execute("SET search_path = public")
            conn.execute("RESET search_path")
            email2, note2 = unique("spr"), _note()
            _insert(conn, email2, note2)
    finally:
        env.pg.run_sql(f'ALTER ROLE "{role}" IN DATABASE "{db}" RESET search_path')
    _assert_encrypted_in_crm(env, email, note)
    _assert_encrypted_in_crm(env, email2, note2)


def test_rolled_back_set_is_undone_and_committed_set_kept(env: EncEnv) -> None:
    with env.psy() as conn:
        conn.execute("SET search_path = crm")
        # A SET in a block that rolls back is undone: still crm afterwards.
        conn.execute("BEGIN")
        conn.execute("SET search_path = public")
        conn.execute("ROLLBACK")
        email, note = unique("sprb"), _note()
        _insert(conn, email, note)
        _assert_encrypted_in_crm(env, email, note)
        # A block that fails, then ends, is rolled back too.
        conn.execute("BEGIN")
        conn.execute("SET search_path = public")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("COMMIT")  # PostgreSQL answers ROLLBACK
        email, note = unique("sprb"), _note()
        _insert(conn, email, note)
        _assert_encrypted_in_crm(env, email, note)
        # One that commits keeps it: public."Contacts" is not protected.
        conn.execute("BEGIN")
        conn.execute("SET search_path = public")
        conn.execute("COMMIT")
        plain, note = unique("sppub"), _note()
        _insert(conn, plain, note)
        assert _stored(env, "public", note) == plain


def test_set_local_ends_with_the_block(env: EncEnv) -> None:
    email, note = unique("spl"), _note()
    plain, plain_note = unique("spl"), _note()
    with env.psy() as conn:
        with conn.transaction():
            conn.execute("SET LOCAL search_path = crm")
            _insert(conn, email, note)
        _insert(conn, plain, plain_note)  # back to "$user", public
    _assert_encrypted_in_crm(env, email, note)
    assert _stored(env, "public", plain_note) == plain


def test_pipelined_batch_that_fails_undoes_its_set(env: EncEnv) -> None:
    """An extended-protocol batch is one implicit transaction: an error anywhere in it
    rolls back a SET search_path sent in it, even one that ran before the error."""
    with env.psy() as conn:
        conn.execute("SET search_path = crm")
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SET search_path = public")
                conn.execute("SELECT 1/0")
        assert conn.execute("SHOW search_path").fetchone() == ("crm",)
        email, note = unique("sppf"), _note()
        _insert(conn, email, note)
    _assert_encrypted_in_crm(env, email, note)


def test_pipelined_set_local_applies_to_its_batch(env: EncEnv) -> None:
    """SET LOCAL in an extended-protocol batch lasts until the batch's Sync."""
    email, note = unique("sppl"), _note()
    plain, plain_note = unique("sppl"), _note()
    with env.psy() as conn:
        with conn.pipeline():
            conn.execute("SET LOCAL search_path = crm")
            _insert(conn, email, note)
        _insert(conn, plain, plain_note)
    _assert_encrypted_in_crm(env, email, note)
    assert _stored(env, "public", plain_note) == plain


def test_asyncpg_extended_protocol(env: EncEnv) -> None:
    email, note = unique("spa"), _note()

    async def run() -> list[tuple[str, str]]:
        conn = await env.apg()
        try:
            await conn.fetch("SET search_path TO crm")  # Parse/Bind/Execute
            await conn.execute('INSERT INTO "Contacts" ("Email", note) VALUES ($1, $2)', email, note)
            rows = await conn.fetch('SELECT "Email", note FROM "Contacts" WHERE "Email" = $1', email)
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [(email, note)]
    _assert_encrypted_in_crm(env, email, note)


def test_set_config_and_do_are_followed(env: EncEnv) -> None:
    """Changes only PostgreSQL can tell the result of: pgcloak asks it afterwards."""
    with env.psy() as conn:
        conn.execute("SELECT set_config('search_path', 'crm', false)")
        email, note = unique("spc"), _note()
        _insert(conn, email, note)
        _assert_encrypted_in_crm(env, email, note)
        conn.execute("SET search_path = public")
        conn.execute("DO $$ BEGIN PERFORM pg_catalog.set_config('search_path', 'crm', false); END $$")
        email, note = unique("spd"), _note()
        _insert(conn, email, note)
        _assert_encrypted_in_crm(env, email, note)


def test_change_sent_with_other_statements_is_refused(env: EncEnv) -> None:
    with env.psy(cursor_factory=psycopg.ClientCursor) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="search_path"):
            conn.execute("SET search_path = crm; SELECT 1")
        # Nothing changed, and the session still serves.
        assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
        email, note = unique("spx"), _note()
        conn.execute('INSERT INTO crm."Contacts" ("Email", note) VALUES (%s, %s)', (email, note))
    env.assert_stored(_stored(env, "crm", note), email, table=KEY_TABLE, column="Email")
