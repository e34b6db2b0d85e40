"""A big CopyData into a protected COPY is encrypted in slices, the event loop free between them.

psql sends COPY data in small messages; other drivers send one message of megabytes.
pgcloak once encrypted such a message in one go on its event loop (about 1 s per 8 MB),
and every other session of the process waited meanwhile, not a byte relayed. Now it
encrypts a slice at a time, each sent on as a CopyData of its own, and the session's
later messages wait their turn.

The big message is written by hand on a psycopg connection's socket after login
(psycopg cuts what ``Copy.write`` gets into messages of 128 KiB, asyncpg's
``copy_to_table`` cuts too). Meanwhile another session through the same proxy asks
``SELECT 1`` in a loop (:class:`Probe`): its worst wait must stay far below the time the
COPY took, a check of fairness, not a benchmark. Rows are checked on both sides:
plaintext through pgcloak, ciphertext straight from PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from raw_wire import (
    COPY_DONE,
    SYNC,
    bind,
    execute,
    message,
    parse,
    query,
    read_messages,
    sqlstates,
    types,
)

#: Rows in a big message: about 10 MB of COPY data, more than a second of encryption (a
#: slow runner takes longer for the COPY and for each slice alike: the bounds are ratios).
ROWS = 120_000
WAIT = 120.0
COPY_SQL = "COPY users (name, email, phone) FROM STDIN"


@pytest.fixture(scope="module")
def env(pg: Any, pg_app_user: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_slices"), "slices") as e:
        yield e


class Probe:
    """Another session through the same proxy, asking ``SELECT 1`` in a loop on a thread:
    the longest any one of them waited while it ran."""

    def __init__(self, env: EncEnv) -> None:
        self.conn = env.psy()
        self.worst = 0.0
        self.count = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="select-1-probe", daemon=True)

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                started = time.perf_counter()
                assert self.conn.execute("SELECT 1").fetchone() == (1,)
                self.worst = max(self.worst, time.perf_counter() - started)
                self.count += 1
        except BaseException as exc:  # reported by assert_fair
            self.error = exc

    def __enter__(self) -> Probe:
        self._thread.start()
        wait_until(lambda: self.count >= 3 or self.error is not None, "the probe's first answers")
        self.worst = 0.0  # what counts is what happens from now on
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(WAIT)
        self.conn.close()

    def assert_fair(self, total: float) -> None:
        """No ``SELECT 1`` waited anywhere near the ``total`` time the big COPY took."""
        assert self.error is None, self.error
        assert self.count >= 5, f"only {self.count} answers"
        assert self.worst < total / 3, f"a SELECT 1 waited {self.worst:.3f}s of the COPY's {total:.3f}s"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _tag() -> str:
    return "slices-" + uuid.uuid4().hex[:10]


def _row(tag: str, i: int) -> tuple[str, str, str]:
    return f"{tag}-{i}", f"{tag}-{i}@example.com", f"+1 415 555 {i % 10_000:04d}"


def _payload(tag: str, rows: int, bad: bytes = b"") -> bytes:
    """``rows`` rows in COPY text format, ``bad`` (a line) in the middle of them."""
    lines = ["\t".join(_row(tag, i)) + "\n" for i in range(rows)]
    middle = rows // 2
    return "".join(lines[:middle]).encode() + bad + "".join(lines[middle:]).encode()


def _send(conn: psycopg.Connection[Any], data: bytes) -> None:
    """All of ``data`` on the connection's socket (libpq keeps it non-blocking)."""
    fd = conn.pgconn.socket
    view = memoryview(data)
    while view:
        _, writable, _ = select.select([], [fd], [], WAIT)
        assert writable, "the proxy stopped reading"
        with contextlib.suppress(BlockingIOError):
            view = view[os.write(fd, view) :]


def _readies(conn: psycopg.Connection[Any], n: int) -> list[tuple[str, bytes]]:
    return read_messages(conn, lambda out: types(out).count("Z") >= n, timeout=WAIT)


def _until_closed(conn: psycopg.Connection[Any]) -> list[tuple[str, bytes]]:
    """The messages pgcloak sends until it closes the connection."""
    fd = conn.pgconn.socket
    buf = b""
    deadline = time.monotonic() + WAIT
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the connection stayed open"
        try:
            chunk = os.read(fd, 65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        buf += chunk
    out = []
    while len(buf) >= 5:
        n = int.from_bytes(buf[1:5], "big")
        out.append((chr(buf[0]), buf[5 : n + 1]))
        buf = buf[n + 1 :]
    return out


def _tags(msgs: list[tuple[str, bytes]]) -> list[str]:
    """The CommandComplete tags among ``msgs``."""
    return [body.rstrip(b"\0").decode() for t, body in msgs if t == "C"]


def _begin_copy(conn: psycopg.Connection[Any]) -> None:
    os.write(conn.pgconn.socket, query(COPY_SQL))
    msgs = read_messages(conn, lambda out: any(t in "GEZ" for t, _ in out))
    assert types(msgs)[-1] == "G", msgs


def _big_copy(env: EncEnv, tag: str, rows: int) -> float:
    """One COPY of ``rows`` rows in one CopyData message while a probe asks SELECT 1:
    the seconds the COPY took, from its data sent to its ReadyForQuery."""
    data = message(b"d", _payload(tag, rows)) + COPY_DONE
    with env.psy() as conn, Probe(env) as probe:
        _begin_copy(conn)
        started = time.perf_counter()
        _send(conn, data)
        replies = _readies(conn, 1)
        total = time.perf_counter() - started
    assert not sqlstates(replies), replies
    assert _tags(replies) == [f"COPY {rows}"]
    probe.assert_fair(total)
    return total


def _slicing(env: EncEnv) -> bool:
    """Whether one of the proxy's sessions is encrypting a CopyData slice by slice."""
    server = env.proxy.server
    assert server is not None
    return any(getattr(s, "_slicing", None) is not None for s in list(server.sessions))


def _stored_count(env: EncEnv, tag: str) -> int:
    return int(env.raw_one("SELECT count(*) FROM users WHERE name LIKE %s", f"{tag}-%"))


def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was logged as an error (an internal error, a task's exception)."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- 1. every row arrives, encrypted ---------------------------------------------------------


def test_a_big_copy_data_is_stored_encrypted_row_for_row(env: EncEnv) -> None:
    tag = _tag()
    _big_copy(env, tag, ROWS)
    expected = [_row(tag, i) for i in range(ROWS)]
    with env.psy() as conn:
        seen = conn.execute(
            "SELECT name, email, phone FROM users WHERE name LIKE %s ORDER BY id", (f"{tag}-%",)
        ).fetchall()
    assert seen == expected
    stored = env.raw("SELECT name, email, phone FROM users WHERE name LIKE %s ORDER BY id", f"{tag}-%")
    assert [r[0] for r in stored] == [r[0] for r in expected]
    assert not [r for r in stored if "@example.com" in r[1] or " 555 " in r[2]], "plaintext reached the database"
    for i in [*range(0, ROWS, 997), ROWS - 1]:
        _, email, phone = expected[i]
        env.assert_stored(stored[i][1], email)
        env.assert_stored(stored[i][2], phone, column="phone")


# -- 2. other sessions are served meanwhile -------------------------------------------------


def test_other_sessions_are_served_while_a_big_copy_data_is_encrypted(env: EncEnv) -> None:
    # The COPY must take long enough for the probe's bound to mean something: a faster
    # machine gets more rows.
    rows = ROWS
    for _ in range(3):
        tag = _tag()
        total = _big_copy(env, tag, rows)  # asserts the probe's worst wait < total / 3
        assert _stored_count(env, tag) == rows
        if total > 1.0:
            break
        rows *= 2
    assert total > 1.0, f"{rows} rows took {total:.3f}s only"


def test_a_login_is_answered_while_a_big_copy_data_is_encrypted(env: EncEnv) -> None:
    # A login is a dozen round trips, each one waiting for a slice or two: a bigger COPY
    # for the same ratio.
    tag, rows = _tag(), 2 * ROWS
    data = message(b"d", _payload(tag, rows)) + COPY_DONE
    with env.psy() as conn:
        _begin_copy(conn)
        started = time.perf_counter()
        _send(conn, data)
        wait_until(lambda: _slicing(env), "the slices to start", 30)
        login = time.perf_counter()
        with env.psy() as other:
            assert other.execute("SELECT 1").fetchone() == (1,)
        login = time.perf_counter() - login
        replies = _readies(conn, 1)
        total = time.perf_counter() - started
    assert _tags(replies) == [f"COPY {rows}"]
    assert login < total / 3, f"a login took {login:.3f}s of the COPY's {total:.3f}s"


# -- 3. the session's later messages keep their order ----------------------------------------


def test_messages_pipelined_after_a_big_copy_data_wait_for_it(env: EncEnv) -> None:
    tag = _tag()
    last_name, last_email, last_phone = _row(tag, ROWS - 1)
    payload = _payload(tag, ROWS)
    cut = len(payload) // 3 + 7  # two big messages, a record across them
    with env.psy() as conn, Probe(env) as probe:
        started = time.perf_counter()
        _send(
            conn,
            query(COPY_SQL)
            + message(b"d", payload[:cut])
            + message(b"d", payload[cut:])
            + COPY_DONE
            + query(f"SELECT email, phone FROM users WHERE name = '{last_name}'")
            + query(f"SELECT count(*) FROM users WHERE name LIKE '{tag}-%'"),
        )
        replies = _readies(conn, 3)
        total = time.perf_counter() - started
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)
    probe.assert_fair(total)
    assert not sqlstates(replies), replies
    assert [t for t in types(replies) if t not in "NS"] == ["G", "C", "Z", "T", "D", "C", "Z", "T", "D", "C", "Z"]
    assert _tags(replies) == [f"COPY {ROWS}", "SELECT 1", "SELECT 1"]
    rows = [body for t, body in replies if t == "D"]
    assert last_email.encode() in rows[0] and last_phone.encode() in rows[0]  # revealed
    assert str(ROWS).encode() in rows[1]
    [(email,)] = env.raw("SELECT email FROM users WHERE name = %s", last_name)
    env.assert_stored(email, last_email)


def test_an_extended_protocol_copy_pipelined_with_a_big_copy_data_keeps_its_order(env: EncEnv) -> None:
    tag = _tag()
    last_name, last_email, _ = _row(tag, ROWS - 1)
    with env.psy() as conn, Probe(env) as probe:
        started = time.perf_counter()
        _send(
            conn,
            parse("", COPY_SQL) + bind("", "") + execute("")
            + message(b"d", _payload(tag, ROWS)) + COPY_DONE + SYNC
            + parse("", f"SELECT email FROM users WHERE name = '{last_name}'") + bind("", "") + execute("") + SYNC,
        )  # fmt: skip
        replies = _readies(conn, 2)
        total = time.perf_counter() - started
    probe.assert_fair(total)
    assert not sqlstates(replies), replies
    assert _tags(replies) == [f"COPY {ROWS}", "SELECT 1"]
    [row] = [body for t, body in replies if t == "D"]
    assert last_email.encode() in row
    assert _stored_count(env, tag) == ROWS


def test_a_slow_postgresql_holds_the_slices_back(env: EncEnv) -> None:
    # PostgreSQL reading slower than pgcloak encrypts: the slices wait for PostgreSQL's leg
    # to drain instead of piling up in pgcloak's memory (the message's ciphertext is
    # twice its size).
    tag = _tag()
    data = message(b"d", _payload(tag, ROWS)) + COPY_DONE
    server = env.proxy.server
    assert server is not None

    async def buffered() -> int:
        """What pgcloak holds for PostgreSQL, in the session that holds most."""
        transports = [s.backend.transport for s in list(server.sessions) if s.backend is not None]
        return max((t.get_write_buffer_size() for t in transports if t is not None), default=0)

    with env.direct() as conn:
        conn.execute(
            "CREATE FUNCTION slow_copy() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.id % 100 = 0 THEN PERFORM pg_sleep(0.001); END IF; RETURN NEW; END $$;"
            "CREATE TRIGGER slow_copy BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION slow_copy()"
        )
    try:
        with env.psy() as conn:
            _begin_copy(conn)
            _send(conn, data)
            most = 0
            while not select.select([conn.pgconn.socket], [], [], 0.01)[0]:
                most = max(most, env.proxy.call(buffered))
            replies = _readies(conn, 1)
    finally:
        with env.direct() as conn:
            conn.execute("DROP TRIGGER slow_copy ON users; DROP FUNCTION slow_copy()")
    assert _tags(replies) == [f"COPY {ROWS}"], replies
    assert most < 2 << 20, f"{most} bytes held for PostgreSQL"


# -- 4. a refusal in the middle: as for a small message ---------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"bad\tbad@example.com\tnot a phone\n",  # the phone normalizer refuses it
        b"bad\tbad-\xff@example.com\t+1 415 555 0000\n",  # not UTF-8
        b"bad\tbad@example.com\t+1 415 555 0000\r",  # a CR line end among LF ones
    ],
    ids=["refused-value", "not-utf8", "mixed-line-ends"],
)
def test_a_refusal_in_the_middle_of_a_big_copy_data_is_the_small_ones(env: EncEnv, bad: bytes) -> None:
    outcomes = []
    for rows in (4, ROWS):
        tag = _tag()
        with env.psy() as conn:
            _begin_copy(conn)
            _send(conn, message(b"d", _payload(tag, rows, bad)) + COPY_DONE)
            replies = _readies(conn, 1)
            # The session goes on, as after any failed COPY.
            assert conn.execute("SELECT 'after'").fetchone() == ("after",)
        errors = [body for t, body in replies if t == "E"]
        assert len(errors) == 1 and b"@example.com" not in errors[0], replies
        assert _stored_count(env, tag) == 0
        outcomes.append((sqlstates(replies), [t for t in types(replies) if t not in "NS"]))
    small, big = outcomes
    assert big == small
    assert small[1] == ["E", "Z"]


# -- 5. a connection gone in the middle of the slices ----------------------------------------


def test_a_client_gone_in_the_middle_of_a_big_copy_data_ends_its_session(
    env: EncEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcloak")
    tag = _tag()
    data = message(b"d", _payload(tag, ROWS))  # no CopyDone: the client vanishes
    server = env.proxy.server
    assert server is not None
    with Probe(env) as probe:
        sessions, clients = env.proxy.session_count, server.clients
        conn = env.psy()
        pid = conn.info.backend_pid
        _begin_copy(conn)
        started = time.perf_counter()
        _send(conn, data)
        wait_until(lambda: _slicing(env), "the slices to start", 30)
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_until(lambda: env.proxy.session_count == sessions, "the session to end")
        total = time.perf_counter() - started
        assert server.clients == clients  # its slot is free
        assert probe.conn.execute("SELECT 1").fetchone() == (1,)
    probe.assert_fair(total)
    wait_until(lambda: not env.raw("SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid), "its backend to end")
    assert _stored_count(env, tag) == 0
    _quiet(caplog)
    assert "client closed" in [getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "session closed"]


def test_postgresql_gone_in_the_middle_of_a_big_copy_data_ends_the_session(
    env: EncEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcloak")
    tag = _tag()
    data = message(b"d", _payload(tag, ROWS)) + COPY_DONE
    server = env.proxy.server
    assert server is not None
    with Probe(env) as probe:
        sessions, clients = env.proxy.session_count, server.clients
        with env.psy() as conn:
            pid = conn.info.backend_pid
            _begin_copy(conn)
            _send(conn, data)
            wait_until(lambda: _slicing(env), "the slices to start", 30)
            env.raw("SELECT pg_terminate_backend(%s)", pid)
            replies = _until_closed(conn)
        wait_until(lambda: env.proxy.session_count == sessions, "the session to end")
        assert server.clients == clients
        assert probe.conn.execute("SELECT 1").fetchone() == (1,)
    assert "57P01" in sqlstates(replies), replies
    assert _stored_count(env, tag) == 0
    _quiet(caplog)
    assert "backend closed" in [getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "session closed"]
