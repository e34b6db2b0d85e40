"""Statements prepared again by pgcloak, in every ordering of the client's messages.

Each test is one ordering, written with the raw protocol so that it is exact: the
replies to pgcloak's own Parse and Close never reach the client, the client's own all
do, the session's count of batches stays the server's (COPY, errors, the search_path
probe), and no statement runs under the wrong plan (plaintext in crm."Contacts").

Same set-up as test_encryption_reprepare.py: the policy protects crm."Contacts"."Email";
public."Contacts" has the same shape and is not protected. The session starts with the
default search_path (which resolves to public).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import threading
import time
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
)
from encryption_fixtures import EncEnv
from raw_wire import (
    SYNC,
    bind,
    bind_params,
    close_statement,
    describe_statement,
    execute,
    message,
    parse,
    query,
    raw,
    read_messages,
    sqlstates,
    types,
)

from pgcloak.session import session as session_module

PARAMS_INSERT = 'INSERT INTO "Contacts" ("Email", note) VALUES ($1, $2)'
FLUSH = message(b"H", b"")
#: An error at Bind (1/0 is folded when planned): the rest of the batch is skipped.
FAIL = parse("", "SELECT 1/0") + bind("", "") + execute("")


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with contacts_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_rr"), "rr") as e:
        yield e


# -- helpers ------------------------------------------------------------------------------
def _note() -> str:
    return uuid.uuid4().hex[:12]


def _email(note: str) -> str:
    return f"rr-{note}@example.com"


def _literal_insert(note: str) -> str:
    return f"INSERT INTO \"Contacts\" (\"Email\", note) VALUES ('{_email(note)}', '{note}')"








def execute_rows(portal: str, rows: int) -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", rows))




def _in_crm_encrypted(env: EncEnv, note: str) -> None:
    in_crm_encrypted(env, _email(note), note)


def _in_public_plain(env: EncEnv, note: str) -> None:
    in_public_plain(env, _email(note), note)


def _internal(conn: psycopg.Connection) -> int:
    return len(internal_statements(conn))


def _stale(conn: psycopg.Connection, name: str, sql: str) -> None:
    """``name`` prepared under the default path (public), then the path set to crm."""
    assert types(raw(conn, parse(name, sql) + SYNC, 1)) == ["1", "Z"]
    assert types(raw(conn, query("SET search_path = crm"), 1)) == ["C", "Z"]


def _without_check(env: EncEnv) -> contextlib.AbstractContextManager[None]:
    """crm."Contacts" without pgcloak's CHECK constraint: what pgcloak itself sends is
    stored as it came."""
    return env.without_check(
        'crm."Contacts"', "Contacts_Email_pgcloak_check", 'DELETE FROM crm."Contacts" WHERE "Email" LIKE \'%@example.com\''
    )


# =========================================================================================
# Orderings a review found wrong in the first version (2ac1480), each fixed
# =========================================================================================
def test_our_close_skipped_by_an_error_is_sent_again(env: EncEnv) -> None:
    """The client closes a re-prepared statement in a batch that failed earlier: the
    server skips both Closes (the client's and pgcloak's). pgcloak's is sent again with
    the client's next Parse or Close, so internal statements do not pile up."""
    with env.psy() as conn:
        for i in range(3):
            note = _note()
            name = f"leak{i}"
            raw(conn, query("SET search_path = public"), 1)
            _stale(conn, name, _literal_insert(note))
            assert types(raw(conn, bind("", name) + execute("") + SYNC, 1)) == ["2", "C", "Z"]
            _in_crm_encrypted(env, note)
            failing = FAIL + close_statement(name) + SYNC
            assert types(raw(conn, failing, 1)) == ["1", "E", "Z"]
        # Another Parse and Close: every chance to close what is due.
        assert types(
            raw(conn, parse("other", "SELECT 1") + close_statement("other") + SYNC, 1)
        ) == ["1", "3", "Z"]
        assert _internal(conn) == 0, internal_statements(conn)


def test_failed_extended_copy_then_a_pipelined_stale_bind(env: EncEnv) -> None:
    """An extended-protocol COPY FROM STDIN that fails (here: no such table) never enters
    copy-in mode, so its Sync is answered: it counts as a batch (only a CopyInResponse
    makes the Syncs sent meanwhile not count), and the ParseComplete of pgcloak's Parse
    in the next batch is still hidden."""
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        failing = parse("c", "COPY no_such_table FROM STDIN") + bind("", "c") + execute("") + SYNC
        stale = bind("", "s1") + execute("") + SYNC
        got = raw(conn, failing + stale, 2)
        assert types(got) == ["1", "2", "E", "Z", "2", "C", "Z"]
        assert _internal(conn) == 1
        assert conn.execute("SELECT 1").fetchone() == (1,)
    _in_crm_encrypted(env, note)


def test_set_rolled_back_in_a_batch_with_a_failed_copy(env: EncEnv) -> None:
    """A batch sets search_path = public and then fails (its COPY FROM STDIN names no
    table): PostgreSQL rolls the SET back, the path stays crm. pgcloak counts the batch's
    Sync (the COPY never started), asks the path again, and plans the next statements for
    crm: nothing is stored in plaintext in public."Contacts". (Before the fix, the Sync
    was not counted and both rows went to public in clear.)"""
    note, stale = _note(), _note()
    with env.psy() as conn:
        assert types(raw(conn, query("SET search_path = crm"), 1)) == ["C", "Z"]
        assert types(raw(conn, parse("s1", _literal_insert(stale)) + SYNC, 1)) == ["1", "Z"]
        batch = (
            parse("", "SET search_path = public")
            + bind("", "")
            + execute("")
            + parse("", "COPY no_such_table FROM STDIN")
            + bind("", "")
            + execute("")
            + SYNC
        )
        assert types(raw(conn, batch, 1)) == ["1", "2", "C", "1", "2", "E", "Z"]
        got = raw(
            conn,
            parse("", _literal_insert(note))
            + bind("", "")
            + execute("")
            + bind("", "s1")
            + execute("")
            + SYNC,
            1,
        )
        assert types(got) == ["1", "2", "C", "2", "C", "Z"], sqlstates(got)
        assert conn.execute("SHOW search_path").fetchone() == ("crm",)
    assert stored(env, "public", note) == [], "stored in plaintext in public.Contacts, not in crm"
    assert stored(env, "public", stale) == [], "stored in plaintext in public.Contacts, not in crm"
    _in_crm_encrypted(env, note)
    _in_crm_encrypted(env, stale)


def test_close_sent_right_after_a_path_change_keeps_its_close_complete(env: EncEnv) -> None:
    """A Query that changes the path, then a Close before the client's next Sync: the
    Close makes the batch half sent (as Parse, Bind, Describe and Execute do), so pgcloak
    does not ask the path in the middle of it, and the client gets its CloseComplete."""
    with env.psy() as conn:
        assert types(raw(conn, parse("a1", "SELECT 1") + SYNC, 1)) == ["1", "Z"]
        got = raw(conn, query("SET search_path = crm") + close_statement("a1"), 1)
        got += raw(conn, SYNC, 1)
        assert types(got) == ["C", "Z", "3", "Z"]


def test_a_batch_arriving_while_the_path_is_asked_does_not_get_our_close_complete(
    env: EncEnv, monkeypatch
) -> None:
    """A pipelining client sends its next batch (closing a re-prepared statement) while
    pgcloak asks the server for the search_path. The held ReadyForQuery, released with
    the probe's reply, is not counted a second time, so the CloseComplete of pgcloak's
    own Close is still hidden. (The backend is stopped while the probe is in flight, to
    make the ordering exact; a fast client hits the same window.)"""
    note = _note()
    with env.psy() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        _stale(conn, "s1", _literal_insert(note))
        assert types(raw(conn, bind("", "s1") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
        asked = threading.Event()
        original = session_module.Session._ask_path

        def ask_path_with_backend_stopped(self, held: bytes, status: int, *args: object) -> None:
            if not asked.is_set():
                os.kill(pid, signal.SIGSTOP)
                asked.set()
            original(self, held, status, *args)

        monkeypatch.setattr(session_module.Session, "_ask_path", ask_path_with_backend_stopped)
        fd = conn.pgconn.socket
        try:
            os.write(fd, query("SET search_path = public"))
            assert asked.wait(5)
            os.write(fd, close_statement("s1") + SYNC)
            time.sleep(0.3)  # pgcloak has read the batch and sent it on
        finally:
            os.kill(pid, signal.SIGCONT)
        got = read_messages(conn, lambda out: types(out).count("Z") >= 2)
        monkeypatch.undo()
        assert types(got) == ["C", "Z", "3", "Z"]
    _in_crm_encrypted(env, note)


def test_a_query_inside_a_failed_extended_batch_keeps_the_replies_in_step(env: EncEnv) -> None:
    """A simple Query sent before the Sync of an extended batch (asyncpg does, after
    Parse/Describe/Flush) runs only if nothing before it fails; here the batch fails, the
    server skips it, and pgcloak's count of batches is one too high from then on. So
    pgcloak stops preparing statements again in that session (a stale statement gets
    PostgreSQL's own "prepare it again", 0A000) rather than risk hiding a reply of the
    client's: every reply the client expects still arrives."""
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        assert types(raw(conn, FAIL + query("SELECT 1") + SYNC, 1)) == ["1", "E", "Z"]
        assert types(raw(conn, FAIL + bind("", "s1") + execute("") + SYNC, 1)) == ["1", "E", "Z"]
        assert types(raw(conn, parse("a", "SELECT 1") + SYNC, 1)) == ["1", "Z"]
        got = raw(conn, bind("", "s1") + execute("") + SYNC, 1)
        assert (types(got), sqlstates(got)) == (["E", "Z"], ["0A000"])
        again = close_statement("s1") + parse("s1", _literal_insert(note)) + bind("", "s1") + execute("") + SYNC
        assert types(raw(conn, again, 1)) == ["3", "1", "2", "C", "Z"]
        assert conn.execute("SELECT 1").fetchone() == (1,)
    _in_crm_encrypted(env, note)


def test_a_query_after_parse_describe_flush_is_followed(env: EncEnv) -> None:
    """asyncpg's order (Parse, Describe, Flush, then a simple Query): nothing fails, the
    count comes out even, and statements are prepared again as usual afterwards."""
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        os.write(conn.pgconn.socket, parse("d", "SELECT 1") + message(b"D", b"Sd\0") + FLUSH)
        assert types(read_messages(conn, lambda out: "T" in types(out))) == ["1", "t", "T"]
        assert types(raw(conn, query("SELECT 2"), 1)) == ["T", "D", "C", "Z"]
        assert types(raw(conn, SYNC, 1)) == ["Z"]
        assert types(raw(conn, bind("", "s1") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
    _in_crm_encrypted(env, note)


def test_client_cannot_replace_our_internal_statement_through_sql(env: EncEnv) -> None:
    """The internal prefix is the client's in no message: a Close of pgcloak's internal
    statement closes nothing, a PREPARE under its name is refused (42939). Before, a
    client could swap in its own statement and have its stale statement's untouched
    values stored in crm."Contacts" in plaintext."""
    note = _note()
    with _without_check(env), env.psy() as conn:
        # s1 prepared under crm (its value encrypted); under public it is prepared again.
        assert types(raw(conn, query("SET search_path = crm"), 1)) == ["C", "Z"]
        assert types(raw(conn, parse("s1", PARAMS_INSERT) + SYNC, 1)) == ["1", "Z"]
        assert types(raw(conn, query("SET search_path = public"), 1)) == ["C", "Z"]
        first = _note()
        got = raw(conn, bind_params("", "s1", [_email(first), first]) + execute("") + SYNC, 1)
        assert types(got) == ["2", "C", "Z"]
        _in_public_plain(env, first)
        (internal,) = internal_statements(conn)
        swap = (
            close_statement(internal)
            + SYNC
            + query(
                f'PREPARE {internal} (text, text) AS INSERT INTO crm."Contacts" ("Email", note) VALUES ($1, $2)'
            )
        )
        got = raw(conn, swap, 2)
        got = raw(conn, bind_params("", "s1", [_email(note), note]) + execute("") + SYNC, 1)
        assert stored(env, "crm", note) == [], "plaintext stored in crm.Contacts"


def test_unnamed_statement_destroyed_by_a_query_stays_destroyed(env: EncEnv) -> None:
    """The unnamed statement, prepared again under an internal name, is destroyed by the
    next simple Query (PostgreSQL's rule), and so is pgcloak's twin: a later Bind of the
    unnamed statement gets 26000, as from PostgreSQL, instead of running again."""
    note = _note()
    with env.psy() as conn:
        batch = (
            parse("", _literal_insert(note))
            + parse("set", "SET search_path = crm")
            + bind("", "set")
            + execute("")
            + bind("", "")
            + execute("")
            + SYNC
        )
        assert types(raw(conn, batch, 1)) == ["1", "1", "2", "C", "2", "C", "Z"]
        assert types(raw(conn, query("SELECT 1"), 1)) == ["T", "D", "C", "Z"]
        got = raw(conn, bind("", "") + execute("") + SYNC, 1)
        assert sqlstates(got) == ["26000"], types(got)
    _in_crm_encrypted(env, note)  # once


# =========================================================================================
# Scenarios checked that behaved correctly
# =========================================================================================
def test_flush_before_the_stale_bind(env: EncEnv) -> None:
    """The client's ParseComplete arrives (Flush) before pgcloak sees the stale Bind."""
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        got = raw(conn, parse("f1", "SELECT 1") + FLUSH, 0)
        got += read_messages(conn, lambda out: len(out) >= 1)
        assert types(got) == ["1"]
        got = raw(conn, bind("", "s1") + FLUSH, 0)
        got += read_messages(conn, lambda out: len(out) >= 1)
        assert types(got) == ["2"]  # ours hidden, even alone in its chunk
        got = raw(conn, execute("") + parse("f2", "SELECT 2") + SYNC, 1)
        assert types(got) == ["C", "1", "Z"]
    _in_crm_encrypted(env, note)


def test_batch_split_over_several_writes(env: EncEnv) -> None:
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        data = parse("w1", "SELECT 1") + bind("", "s1") + execute("") + close_statement("w1") + SYNC
        fd = conn.pgconn.socket
        for i in range(0, len(data), 7):
            os.write(fd, data[i : i + 7])
            time.sleep(0.005)
        got = read_messages(conn, lambda out: "Z" in types(out))
        assert types(got) == ["1", "2", "C", "3", "Z"]
    _in_crm_encrypted(env, note)


def test_copy_in_the_same_batch_before_the_stale_bind(env: EncEnv) -> None:
    note, copied = _note(), _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        copy = (
            parse("", 'COPY "Contacts" ("Email", note) FROM STDIN')
            + bind("", "")
            + execute("")
            + SYNC
        )
        copy += message(b"d", f"{_email(copied)}\t{copied}\n".encode()) + message(b"c", b"")
        got = raw(conn, copy + bind("", "s1") + execute("") + SYNC, 1)
        assert types(got) == ["1", "2", "G", "C", "2", "C", "Z"]
        assert types(raw(conn, parse("n", "SELECT 1") + SYNC, 1)) == ["1", "Z"]
    _in_crm_encrypted(env, note)
    _in_crm_encrypted(env, copied)


def test_error_before_the_stale_bind_then_again(env: EncEnv) -> None:
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        got = raw(conn, FAIL + bind("", "s1") + execute("") + SYNC, 1)
        assert types(got) == ["1", "E", "Z"]
        assert types(raw(conn, bind("", "s1") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
        assert _internal(conn) == 1
    _in_crm_encrypted(env, note)


def test_our_parse_fails(env: EncEnv) -> None:
    """Our Parse refused by the server (public."Contacts" has no such column)."""
    note = _note()
    with env.psy() as conn:
        raw(conn, query("SET search_path = crm"), 1)
        assert types(
            raw(conn, parse("s1", 'SELECT note FROM "Contacts" WHERE id = -1') + SYNC, 1)
        ) == ["1", "Z"]
        with env.direct() as direct:
            direct.execute('ALTER TABLE crm."Contacts" ADD COLUMN IF NOT EXISTS only_crm text')
        sql = f"INSERT INTO \"Contacts\" (\"Email\", note, only_crm) VALUES ('{_email(note)}', '{note}', 'x')"
        assert types(raw(conn, parse("s2", sql) + SYNC, 1)) == ["1", "Z"]
        raw(conn, query("SET search_path = public"), 1)
        got = raw(
            conn,
            parse("p", "SELECT 1") + bind("", "s2") + execute("") + parse("q", "SELECT 2") + SYNC,
            1,
        )
        assert types(got) == ["1", "E", "Z"] and sqlstates(got) == ["42703"]
        assert types(raw(conn, parse("r", "SELECT 3") + SYNC, 1)) == ["1", "Z"]
        assert _internal(conn) == 0
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_describe_and_a_portal_executed_in_pieces(env: EncEnv) -> None:
    notes = [_note() for _ in range(3)]
    with env.psy() as conn:
        for n in notes:
            conn.execute(
                'INSERT INTO crm."Contacts" ("Email", note) VALUES (%s, %s)', (_email(n), n)
            )
        listed = ", ".join(f"'{n}'" for n in notes)
        sql = f'SELECT "Email" FROM "Contacts" WHERE note IN ({listed}) ORDER BY note'
        _stale(conn, "s1", sql)
        got = raw(
            conn, describe_statement("s1") + bind("p1", "s1") + execute_rows("p1", 1) + FLUSH, 0
        )
        got += read_messages(conn, lambda out: "s" in types(out))
        assert types(got) == ["t", "T", "2", "D", "s"]
        # Closing s1 (and pgcloak's statement) leaves the portal: as in PostgreSQL.
        got = raw(
            conn, execute_rows("p1", 1) + close_statement("s1") + execute_rows("p1", 0) + SYNC, 1
        )
        assert types(got) == ["D", "s", "3", "D", "C", "Z"]
        assert _internal(conn) == 0
        rows = [m for t, m in got if t == "D"]
        assert all(b"@example.com" in r for r in rows)


def test_reparse_of_an_existing_name_under_a_new_path(env: EncEnv) -> None:
    """s1 parsed under public, the path set to crm, s1 parsed again (42P05, the first s1
    stays, in pgcloak too): the Bind runs the first s1 as PostgreSQL analyses it again
    for the new path, into crm."Contacts", encrypted."""
    note = _note()
    with env.psy() as conn:
        _stale(conn, "s1", PARAMS_INSERT)
        again = raw(
            conn,
            parse("s1", 'INSERT INTO public."Contacts" ("Email", note) VALUES ($1, $2)') + SYNC,
            1,
        )
        assert sqlstates(again) == ["42P05"]
        got = raw(conn, bind_params("", "s1", [_email(note), note]) + execute("") + SYNC, 1)
        assert types(got) == ["2", "C", "Z"]
    _in_crm_encrypted(env, note)


def test_deallocate_then_use_again(env: EncEnv) -> None:
    note, again = _note(), _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        assert types(raw(conn, bind("", "s1") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
        assert types(raw(conn, query("DEALLOCATE s1"), 1)) == ["C", "Z"]
        assert types(
            raw(conn, parse("s1", _literal_insert(again)) + bind("", "s1") + execute("") + SYNC, 1)
        ) == ["1", "2", "C", "Z"]
        assert _internal(conn) == 0
    _in_crm_encrypted(env, note)
    _in_crm_encrypted(env, again)


def test_deallocate_all_and_discard_all(env: EncEnv) -> None:
    note, n2 = _note(), _note()
    with env.psy() as conn:
        _stale(conn, "s1", _literal_insert(note))
        assert types(raw(conn, bind("", "s1") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
        assert types(raw(conn, query("DEALLOCATE ALL"), 1)) == ["C", "Z"]
        assert _internal(conn) == 0
        raw(conn, query("SET search_path = public"), 1)
        _stale(conn, "s2", _literal_insert(n2))
        assert types(raw(conn, bind("", "s2") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
        assert types(raw(conn, query("DISCARD ALL"), 1)) == ["C", "Z"]
        assert _internal(conn) == 0
        got = raw(conn, parse("s2", "SELECT 1") + bind("", "s2") + execute("") + SYNC, 1)
        assert types(got) == ["1", "2", "D", "C", "Z"]
    _in_crm_encrypted(env, note)
    _in_crm_encrypted(env, n2)


def test_function_call_between_batches(env: EncEnv) -> None:
    note = _note()
    with env.psy() as conn:
        oid = conn.execute("SELECT 'pg_catalog.int4abs'::regproc::oid").fetchone()[0]
        _stale(conn, "s1", _literal_insert(note))
        fcall = message(
            b"F",
            struct.pack("!ihh", oid, 0, 1) + struct.pack("!i", 2) + b"-5" + struct.pack("!h", 0),
        )
        got = raw(
            conn, bind("", "s1") + execute("") + SYNC + fcall + parse("g", "SELECT 1") + SYNC, 3
        )
        assert types(got) == ["2", "C", "Z", "V", "Z", "1", "Z"]
    _in_crm_encrypted(env, note)


def test_many_pipelined_batches(env: EncEnv) -> None:
    notes = [_note() for _ in range(5)]
    with env.psy() as conn:
        raw(conn, query("SET search_path = public"), 1)
        for i, n in enumerate(notes):
            assert types(raw(conn, parse(f"m{i}", _literal_insert(n)) + SYNC, 1)) == ["1", "Z"]
        raw(conn, query("SET search_path = crm"), 1)
        data = b""
        expected: list[str] = []
        for i in range(5):
            data += (
                parse(f"x{i}", "SELECT 1")
                + bind("", f"m{i}")
                + execute("")
                + close_statement(f"x{i}")
                + SYNC
            )
            expected += ["1", "2", "C", "3", "Z"]
        data += close_statement("m0") + close_statement("m1") + SYNC
        expected += ["3", "3", "Z"]
        assert types(raw(conn, data, 6)) == expected
        assert _internal(conn) == 3
    for n in notes:
        _in_crm_encrypted(env, n)


def _audit_events(env: EncEnv, keep) -> list[dict]:
    trail = env.workdir / "pgcloak-audit.jsonl"
    deadline = time.monotonic() + 5
    while True:
        lines = trail.read_text().splitlines() if trail.exists() else []
        events = [
            e
            for e in (json.loads(x) for x in lines if x.strip())
            if e.get("type") == "statement" and keep(e)
        ]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_audit_of_a_statement_prepared_again(env: EncEnv) -> None:
    """The audit trail of a re-prepared statement names the table it really wrote."""
    note = _note()
    with env.psy() as conn:
        raw(conn, query("SET search_path = public"), 1)
        sql = f"INSERT INTO \"Contacts\" (note, \"Email\") VALUES ('{note}', '{_email(note)}')"
        _stale(conn, "s1", sql)
        assert types(raw(conn, bind("", "s1") + execute("") + SYNC, 1)) == ["2", "C", "Z"]
    _in_crm_encrypted(env, note)
    events = _audit_events(
        env,
        lambda e: e.get("fingerprint") == 'INSERT INTO "Contacts" (note, "Email") VALUES (?, ?)',
    )
    assert [(e["tables"], e["columns_written"], e["rows"], e["sqlstate"]) for e in events] == [
        (["crm.Contacts"], ["crm.Contacts.Email"], 1, None)
    ]
