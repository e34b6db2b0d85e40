"""The login phase cannot hold pgcloak's resources: timeouts, the connection limit, resets.

Everything between accept and the session's first ReadyForQuery (SSLRequest and the TLS
handshake, the StartupMessage, the SASL or password exchange) is bounded by
``client_login_timeout``; every connection holds one of the ``max_client_connections``
slots from accept, logged in or not; PostgreSQL giving up on a login (its
``authentication_timeout``) ends the client's session too. Raw sockets throughout: no
driver stalls on purpose.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from pgcloak.wire.messages import ErrorResponse
from pgcloak.wire.startup import SSLRequest, StartupMessage
from proxyctl import ThreadedProxy

WAIT = 10.0  # upper bound for anything that should happen "promptly"

MakeProxy = Callable[..., AbstractContextManager[ThreadedProxy]]


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def until_closed(sock: socket.socket | ssl.SSLSocket, timeout: float = WAIT) -> bytes:
    """Everything the proxy sends until it closes the connection (fails on a timeout)."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except (ConnectionResetError, ssl.SSLEOFError):
        return got
    except TimeoutError:
        pass
    raise AssertionError(f"still open after {timeout}s; received {got!r}")


def errors(data: bytes) -> list[ErrorResponse]:
    """The ErrorResponses among whole messages ``data``."""
    out = []
    while len(data) >= 5:
        (n,) = struct.unpack_from("!I", data, 1)
        if data[:1] == b"E":
            out.append(ErrorResponse.decode(data[5 : 1 + n]))
        data = data[1 + n :]
    return out


def one_fatal(data: bytes) -> ErrorResponse:
    found = errors(data)
    assert len(found) == 1, data
    assert found[0].severity == "FATAL", found[0]
    return found[0]


def read_message(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One whole message: (type, body)."""
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        assert chunk, "closed"
        head += chunk
    (n,) = struct.unpack_from("!I", head, 1)
    body = b""
    while len(body) < n - 4:
        chunk = sock.recv(n - 4 - len(body))
        assert chunk, "closed"
        body += chunk
    return head[:1], body


def startup(login: DbLogin) -> bytes:
    return StartupMessage({"user": login.user, "database": login.dbname}).encode()


def raw(p: ThreadedProxy) -> socket.socket:
    return socket.create_connection((p.host, p.port), timeout=WAIT)


def tls(p: ThreadedProxy) -> ssl.SSLSocket:
    """A client-side TLS connection (SSLRequest, 'S', handshake), certificate not checked."""
    sock = raw(p)
    sock.sendall(SSLRequest().encode())
    assert sock.recv(1) == b"S"
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(sock)


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed client or a middlebox does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def login_ok(p: ThreadedProxy, login: DbLogin) -> None:
    with psycopg.connect(p.dsn(login.user, login.password, login.dbname), connect_timeout=5) as c:
        assert c.execute("select 1").fetchone() == (1,)


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


# ------------------------------------------------------------------ TLS handshake resets


@pytest.mark.parametrize("how", ["reset", "garbage"])
def test_client_failing_its_tls_handshake_leaves_no_session(
    make_proxy: MakeProxy, pg_app_user: DbLogin, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake fails inside start_tls (ConnectionResetError, or ssl.SSLError for bytes
    that are no ClientHello); pgcloak must not write its FATAL into the dead transport
    (RuntimeError: the session was never finished) nor plaintext into a TLS handshake."""
    with make_proxy() as p, caplog.at_level("ERROR"):
        for _ in range(3):
            s = raw(p)
            s.sendall(SSLRequest().encode())
            assert s.recv(1) == b"S"
            if how == "reset":
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
                time.sleep(0.1)
                reset(s)
            else:
                s.sendall(b"\x16\x03\x01\x00\x05hello, not TLS" + b"\0" * 100)
                got = until_closed(s)
                assert b"E" not in got[:1], "a plaintext ErrorResponse in the TLS handshake"
                s.close()
        wait_until(lambda: p.session_count == 0, what="the failed handshakes' sessions to end")
        login_ok(p, pg_app_user)
    assert "exception was never retrieved" not in caplog.text


# --------------------------------------------------- PostgreSQL giving up on a login


@pytest.fixture
def pg_authentication_timeout_1s(pg: TemporaryPostgres) -> Iterator[None]:
    """PostgreSQL drops a login that takes more than 1 s (it logs it, sends nothing)."""
    pg.run_sql("ALTER SYSTEM SET authentication_timeout = '1s'")
    pg.run_sql("SELECT pg_reload_conf()")
    wait_until(lambda: pg.run_sql("SHOW authentication_timeout").strip() == "1s", what="the reload")
    try:
        yield
    finally:
        pg.run_sql("ALTER SYSTEM RESET authentication_timeout")
        pg.run_sql("SELECT pg_reload_conf()")


@pytest.mark.usefixtures("pg_authentication_timeout_1s")
@pytest.mark.parametrize("auth_mode", ["relay", "scram"])
def test_postgresql_giving_up_on_a_stalled_login_ends_it_and_frees_its_slot(
    make_proxy: MakeProxy, pg: TemporaryPostgres, pg_app_user: DbLogin, auth_mode: str, tmp_path: Path
) -> None:
    """The client sends its StartupMessage, gets AuthenticationSASL and goes silent.
    PostgreSQL closes the backend connection after its authentication_timeout (relay: it
    waits for the SASL answer; scram: pgcloak has not sent it a StartupMessage yet); the
    session ends with 08006 and its max_client_connections slot is free again, long
    before pgcloak's own client_login_timeout."""
    extra: dict[str, Any] = {}
    if auth_mode == "scram":
        verifier = pg.run_sql(f"select rolpassword from pg_authid where rolname = '{pg_app_user.user}'").strip()
        userlist = tmp_path / "userlist.txt"
        userlist.write_text(f'"{pg_app_user.user}" "{verifier}"\n')
        extra = {"auth_file": str(userlist)}
    with make_proxy(auth_mode=auth_mode, max_client_connections=1, client_login_timeout=60, **extra) as p:
        with raw(p) as s:
            s.sendall(startup(pg_app_user))
            t, body = read_message(s)
            assert (t, body[:4]) == (b"R", struct.pack("!I", 10))  # AuthenticationSASL: now go silent
            started = time.monotonic()
            error = one_fatal(until_closed(s))
            assert error.code == "08006", error
            assert time.monotonic() - started < 8
        wait_until(lambda: p.session_count == 0, what="the session to end")
        login_ok(p, pg_app_user)  # the only slot is free


# ------------------------------------------------------------------ client_login_timeout


def _userlist(pg: TemporaryPostgres, login: DbLogin, tmp_path: Path) -> str:
    verifier = pg.run_sql(f"select rolpassword from pg_authid where rolname = '{login.user}'").strip()
    path = tmp_path / "userlist.txt"
    path.write_text(f'"{login.user}" "{verifier}"\n')
    return str(path)


def _stall(p: ThreadedProxy, login: DbLogin, phase: str) -> socket.socket | ssl.SSLSocket:
    """A client that stops at ``phase`` of its login."""
    if phase == "nothing":
        return raw(p)
    if phase == "ssl_request":
        s = raw(p)
        s.sendall(SSLRequest().encode())
        assert s.recv(1) == b"S"
        return s  # and no ClientHello
    if phase == "half_startup":
        s = raw(p)
        s.sendall(startup(login)[:12])
        return s
    sock = tls(p) if phase.startswith("tls") else raw(p)
    if phase == "tls":
        return sock
    sock.sendall(startup(login))
    t, body = read_message(sock)
    assert (t, body[:4]) == (b"R", struct.pack("!I", 10))  # AuthenticationSASL: no answer
    return sock


@pytest.mark.parametrize(
    ("phase", "auth_mode"),
    [
        ("nothing", "relay"),
        ("ssl_request", "relay"),
        ("half_startup", "relay"),
        ("tls", "relay"),
        ("sasl", "relay"),
        ("tls_sasl", "relay"),
        ("sasl", "scram"),
    ],
)
def test_a_login_stalled_anywhere_ends_at_client_login_timeout(
    make_proxy: MakeProxy, pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path: Path, phase: str, auth_mode: str
) -> None:
    """PostgreSQL's authentication_timeout is its default 60 s here: pgcloak's own 1 s ends
    the login, with FATAL 08P01 where the client can read it (not in a TLS handshake)."""
    extra: dict[str, Any] = {"auth_file": _userlist(pg, pg_app_user, tmp_path)} if auth_mode == "scram" else {}
    with make_proxy(auth_mode=auth_mode, client_login_timeout=1, **extra) as p:
        started = time.monotonic()
        with _stall(p, pg_app_user, phase) as s:
            got = until_closed(s)
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 6, elapsed
        if phase == "ssl_request":
            assert got == b"", "plaintext written where the client expects a TLS handshake"
        else:
            error = one_fatal(got)
            assert error.code == "08P01", error
            assert error.message == "canceling authentication due to timeout"
        wait_until(lambda: p.session_count == 0, what="the session to end")
        assert p.server is not None and p.server.login_timeouts == 1
        if phase in ("sasl", "tls_sasl"):
            assert not pg.backend_pids(), "PostgreSQL still has the timed-out login's backend"
        login_ok(p, pg_app_user)  # a login well within the timeout is untouched
        assert p.server.login_timeouts == 1


def test_connections_hold_slots_from_accept_and_are_bounded(make_proxy: MakeProxy, pg_app_user: DbLogin) -> None:
    """Silent connections count against max_client_connections; as many again are read
    (so they get a readable 53300 after their StartupMessage); past twice the limit a
    connection is closed at once. The login timeout frees them all."""
    with make_proxy(max_client_connections=2, client_login_timeout=3) as p, sockets() as silent:
        silent += [raw(p), raw(p)]
        wait_until(lambda: p.session_count == 2, what="the silent connections")
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            login_ok(p, pg_app_user)
        wait_until(lambda: p.session_count == 2, what="the refused client to go")
        silent += [raw(p), raw(p)]  # the overflow: read, not refused yet
        wait_until(lambda: p.session_count == 4, what="the overflow connections")
        with raw(p) as past:
            assert until_closed(past, 2) == b""  # past twice the limit: closed unread
        assert p.session_count == 4
        for s in silent:
            assert one_fatal(until_closed(s)).code == "08P01"
        wait_until(lambda: p.session_count == 0, what="the timed-out sessions to end")
        assert p.server is not None and p.server.login_timeouts == 4
        login_ok(p, pg_app_user)


def test_overflow_connection_gets_in_when_a_slot_frees(make_proxy: MakeProxy, pg_app_user: DbLogin) -> None:
    """Accepted while the proxy was full, logging in after a slot freed: it is served."""
    with make_proxy(max_client_connections=1) as p:
        holder = raw(p)
        wait_until(lambda: p.session_count == 1, what="the slot to be taken")
        with raw(p) as late:
            wait_until(lambda: p.session_count == 2, what="the overflow connection")
            holder.close()
            wait_until(lambda: p.session_count == 1, what="the slot to free")
            late.sendall(startup(pg_app_user))
            t, body = read_message(late)
            assert (t, body[:4]) == (b"R", struct.pack("!I", 10))


async def test_cancel_request_reaches_postgresql_when_every_slot_is_taken(
    make_proxy: MakeProxy, pg_app_user: DbLogin
) -> None:
    """The CancelRequest comes on a connection of its own, accepted as overflow."""
    login = pg_app_user
    with make_proxy(max_client_connections=1) as p:
        conn = await asyncpg.connect(**p.kwargs(login.user, login.password, login.dbname), ssl=False)
        try:
            with pytest.raises(TimeoutError):  # asyncpg sends a CancelRequest on its timeout
                await conn.fetchval("select pg_sleep(30)", timeout=0.5)
            started = time.monotonic()
            assert await conn.fetchval("select 1", timeout=5) == 1
            assert time.monotonic() - started < 3, "the sleep was not cancelled"
        finally:
            await conn.close()
