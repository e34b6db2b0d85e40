"""Prepared statements follow the search_path (and policy edits) as PostgreSQL's do.

PostgreSQL analyses a prepared statement again, silently, when the search_path changes.
pgcloak does the same: a statement bound after the rules changed, whose text now plans
differently, is prepared again under an internal name and the client's Bind sent there.
Before, drivers that do not prepare again on 0A000 (psycopg) failed on every execution.

The policy protects ``crm."Contacts"."Email"``; this module adds an unprotected
``public."Contacts"`` of the same shape. Every check has both sides: what PostgreSQL
holds (read directly) and what the client reads back through pgcloak. The raw-protocol
tests check that the replies to pgcloak's own Parse and Close never reach the client,
in every ordering of the client's own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from contacts_fixtures import (
    contacts_env,
    in_crm_encrypted,
    in_public_plain,
    internal_statements,
    stored,
    wait_for_policy,
)
from encryption_fixtures import EncEnv, policy_yaml, unique
from raw_wire import SYNC, bind, execute, message, parse, query, raw

INSERT = 'INSERT INTO "Contacts" ("Email", note) VALUES (%s, %s)'
LOOKUP = 'SELECT note FROM "Contacts" WHERE "Email" = %s'


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with contacts_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_rp"), "rp") as e:
        yield e


def _note() -> str:
    return uuid.uuid4().hex[:12]


def _internal(conn: psycopg.Connection) -> int:
    return len(internal_statements(conn))


def test_psycopg_prepared_statements_follow_the_path(env: EncEnv) -> None:
    with env.psy(prepare_threshold=0) as conn:
        conn.execute("SET search_path = crm, public")
        e1, n1 = unique("rp"), _note()
        conn.execute(INSERT, (e1, n1))  # prepared here, for crm
        assert conn.execute(LOOKUP, (e1,)).fetchall() == [(n1,)]
        conn.execute("SET search_path = public")
        # The same prepared statements now reach public."Contacts", unprotected.
        e2, n2 = unique("rp"), _note()
        conn.execute(INSERT, (e2, n2))
        assert conn.execute(LOOKUP, (e1,)).fetchall() == []
        assert conn.execute(LOOKUP, (e2,)).fetchall() == [(n2,)]
        for _ in range(3):  # prepared again once, not at every execution
            assert conn.execute(LOOKUP, (e2,)).fetchall() == [(n2,)]
        assert _internal(conn) == 2
        conn.execute("SET search_path = crm")
        e3, n3 = unique("rp"), _note()
        conn.execute(INSERT, (e3, n3))
        assert conn.execute(LOOKUP, (e3,)).fetchall() == [(n3,)]
        assert conn.execute(LOOKUP, (e1,)).fetchall() == [(n1,)]
        conn.execute("SET search_path = public")
        assert conn.execute(LOOKUP, (e2,)).fetchall() == [(n2,)]
        assert _internal(conn) == 2
    in_crm_encrypted(env, e1, n1)
    in_public_plain(env, e2, n2)
    in_crm_encrypted(env, e3, n3)


def test_prepared_again_in_a_transaction_block(env: EncEnv) -> None:
    """asyncpg prepares again on 0A000 only outside a transaction; now it need not."""

    email, note = unique("rpa"), _note()

    async def run() -> tuple[list[str], list[str]]:
        conn = await env.apg()
        try:
            await conn.execute("SET search_path = public")
            await conn.execute(INSERT.replace("%s", "$1", 1).replace("%s", "$2"), email, note)  # cached
            async with conn.transaction():
                await conn.execute("SET LOCAL search_path = crm")
                await conn.execute(INSERT.replace("%s", "$1", 1).replace("%s", "$2"), email, note + "c")
                inside = [r[0] for r in await conn.fetch(LOOKUP.replace("%s", "$1"), email)]
            outside = [r[0] for r in await conn.fetch(LOOKUP.replace("%s", "$1"), email)]
            return inside, outside
        finally:
            await conn.close()

    inside, outside = asyncio.run(run())
    # (The notes are random hex: one of them may end in "c" too.)
    assert inside == [note + "c"] and outside == [note]
    in_crm_encrypted(env, email, note + "c")
    in_public_plain(env, email, note)


def test_our_replies_never_reach_the_client(env: EncEnv) -> None:
    note = _note()
    with env.psy() as conn:
        sql = f"INSERT INTO \"Contacts\" (\"Email\", note) VALUES ('raw-{note}@example.com', '{note}')"
        assert [t for t, _ in raw(conn, parse("s1", sql) + SYNC, 1)] == ["1", "Z"]
        assert [t for t, _ in raw(conn, query("SET search_path = crm"), 1)][-1] == "Z"
        # Prepared again (a Parse of pgcloak's own before the Bind): no ParseComplete.
        got = raw(conn, bind("", "s1") + execute("") + SYNC, 1)
        assert [t for t, _ in got] == ["2", "C", "Z"]
        # Closing it closes pgcloak's too: one CloseComplete, the client's.
        assert [t for t, _ in raw(conn, message(b"C", b"Ss1\0") + SYNC, 1)] == ["3", "Z"]
        assert _internal(conn) == 0
    in_crm_encrypted(env, f"raw-{note}@example.com", note)


def test_our_parse_among_the_clients_pipelined_parses(env: EncEnv) -> None:
    """The client's own ParseComplete and CloseComplete, before and after ours, in one
    batch and across batches still in flight, each arrive where the client expects."""
    note = _note()
    email = f"pipe-{note}@example.com"
    with env.psy() as conn:
        sql = f"INSERT INTO \"Contacts\" (\"Email\", note) VALUES ('{email}', '{note}')"
        raw(conn, parse("s1", sql) + SYNC, 1)
        raw(conn, query("SET search_path = crm"), 1)
        batch1 = parse("a1", "SELECT 1") + bind("", "a1") + execute("") + SYNC
        batch2 = (
            parse("a2", "SELECT 2")
            + message(b"C", b"Sa1\0")
            + bind("", "s1")
            + execute("")
            + parse("a3", "SELECT 3")
            + bind("", "a3")
            + execute("")
            + SYNC
        )
        got = [t for t, _ in raw(conn, batch1 + batch2, 2)]
        assert got == ["1", "2", "D", "C", "Z", "1", "3", "2", "C", "1", "2", "D", "C", "Z"]
        conn.execute("SELECT 1")  # still in step
    in_crm_encrypted(env, email, note)


def test_a_failed_reprepare_reaches_the_client_and_is_tried_again(env: EncEnv) -> None:
    with env.direct() as direct:
        direct.execute('ALTER TABLE crm."Contacts" ADD COLUMN region text')
    insert = 'INSERT INTO "Contacts" ("Email", note, region) VALUES (%s, %s, %s)'
    with env.psy(prepare_threshold=0) as conn:
        conn.execute("SET search_path = crm")
        e0, n0 = unique("rpf"), _note()
        conn.execute(insert, (e0, n0, "eu"))
        # public."Contacts" has no region: PostgreSQL refuses the statement prepared again,
        # as it refuses the client's own statement when it analyses it again.
        conn.execute("SET search_path = public")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute(insert, (unique("rpf"), _note(), "eu"))
        assert _internal(conn) == 0
        conn.execute("SET search_path = crm")  # the client's statement is fine here
        e1, n1 = unique("rpf"), _note()
        conn.execute(insert, (e1, n1, "eu"))
        with env.direct() as direct:
            direct.execute('ALTER TABLE public."Contacts" ADD COLUMN region text')
        conn.execute("SET search_path = public")
        e2, n2 = unique("rpf"), _note()
        conn.execute(insert, (e2, n2, "us"))  # prepared again, now with success
        assert _internal(conn) == 1
    in_crm_encrypted(env, e0, n0)
    in_crm_encrypted(env, e1, n1)
    in_public_plain(env, e2, n2)


def test_an_error_earlier_in_the_batch_skips_our_parse(env: EncEnv) -> None:
    with env.psy(prepare_threshold=0) as conn:
        conn.execute("SET search_path = crm")
        conn.execute(INSERT, (unique("rpe"), _note()))
        conn.execute("SET search_path = public")
        skipped = _note()
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT 1/0")
                conn.execute(INSERT, (unique("rpe"), skipped))  # Parse of ours skipped too
        email, note = unique("rpe"), _note()
        conn.execute(INSERT, (email, note))  # prepared again, this time for real
        assert conn.execute(LOOKUP, (email,)).fetchall() == [(note,)]
    assert stored(env, "public", skipped) == [] and stored(env, "crm", skipped) == []
    in_public_plain(env, email, note)


def test_a_policy_edit_prepares_psycopg_statements_again(env: EncEnv) -> None:
    """The policy starts without crm."Contacts"; once it is protected, a statement psycopg
    prepared before encrypts (before: 0A000 "prepare it again" at every execution)."""
    crm = '  crm."Contacts":\n    \'"Email"\': {encrypt: true, index: exact, normalize: email}\n'
    bare = policy_yaml().replace(crm, "")
    assert bare != policy_yaml()
    # It stores plaintext while the column is not protected.
    plain_rows = 'DELETE FROM crm."Contacts" WHERE "Email" LIKE \'%@example.com\''
    with env.without_check('crm."Contacts"', "Contacts_Email_pgcloak_check", plain_rows):
        env.write_policy(bare)
        try:
            wait_for_policy(env, protected=False)
            with env.psy(prepare_threshold=0) as conn:
                conn.execute("SET search_path = crm")
                before, n0 = unique("rpp"), _note()
                conn.execute(INSERT, (before, n0))
                env.write_policy(policy_yaml())
                wait_for_policy(env, protected=True)
                after, n1 = unique("rpp"), _note()
                conn.execute(INSERT, (after, n1))
                assert conn.execute(LOOKUP, (after,)).fetchall() == [(n1,)]
        finally:
            env.write_policy(policy_yaml())
            wait_for_policy(env, protected=True)
        assert stored(env, "crm", n0) == [(before,)]  # written before the edit: as it came
        in_crm_encrypted(env, after, n1)


def test_client_names_with_our_prefix_are_refused(env: EncEnv) -> None:
    with env.psy() as conn:
        got = raw(conn, parse("pgcloak_reprepared_7", "SELECT 1") + SYNC, 1)
        assert got[0][0] == "E"
        fields = dict((f[:1].decode(), f[1:].decode()) for f in got[0][1].split(b"\0") if f)
        assert fields["C"] == "42939"
        assert [t for t, _ in raw(conn, parse("mine", "SELECT 1") + SYNC, 1)] == ["1", "Z"]
