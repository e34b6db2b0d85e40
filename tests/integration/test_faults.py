"""Error paths of the proxy: broken clients, vanishing backends, odd start-up packets, cancel.

Every case asserts what the client sees (SQLSTATE, a closed socket, a working retry)
and that the proxy cleans up after itself: its session set shrinks back to what the
healthy bystanders hold, and the PostgreSQL backend of a broken session goes away.

Byte-level cases use :class:`RawClient`, a blocking socket that speaks just enough of
protocol 3.0 (SCRAM included, via pgcloak's own ScramClient) to get an authenticated
session and then send what no driver would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from pgcloak.session.scram import ScramClient
from pgcloak.wire.messages import (
    BackendKeyData,
    ErrorResponse,
    Query,
    SASLInitialResponse,
    SASLResponse,
)
from pgcloak.wire.startup import CancelRequest, GSSENCRequest, StartupMessage
from proxyctl import ProxyBase, SubprocessProxy, ThreadedProxy

WAIT = 10.0  # upper bound for anything that should happen "promptly"


# ------------------------------------------------------------------------ helpers


def wait_until(
    predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class ServerError(Exception):
    def __init__(self, error: ErrorResponse) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class RawClient:
    """A blocking protocol-3.0 client on a bare socket."""

    def __init__(self, host: str, port: int, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()
        self.key: BackendKeyData | None = None

    @classmethod
    def to(cls, p: ProxyBase) -> RawClient:
        return cls(p.host, p.port)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes read")
            self.buf += chunk

    def read_byte(self) -> bytes:
        self._fill(1)
        out = bytes(self.buf[:1])
        del self.buf[:1]
        return out

    def read(self) -> tuple[bytes, bytes]:
        """One message: (type byte, body)."""
        self._fill(5)
        length = struct.unpack_from("!I", self.buf, 1)[0]
        self._fill(1 + length)
        t, body = bytes(self.buf[:1]), bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return t, body

    def read_error(self) -> ErrorResponse:
        """Skip to the next ErrorResponse (notices and leftovers of a result may come first)."""
        while True:
            t, body = self.read()
            if t == b"E":
                return ErrorResponse.decode(body)

    def closed_by_peer(self) -> bool:
        """Read until EOF (True) or a timeout (False); whatever arrives is discarded."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    def login(self, login: DbLogin, application_name: str = "pgcloak-raw") -> None:
        params = {
            "user": login.user,
            "database": login.dbname,
            "application_name": application_name,
        }
        self.send(StartupMessage(params).encode())
        self.authenticate(login.password)

    def authenticate(self, password: str) -> None:
        """Answer the server's authentication requests until ReadyForQuery."""
        scram: ScramClient | None = None
        while True:
            t, body = self.read()
            if t == b"R":
                code = struct.unpack_from("!i", body)[0]
                if code == 10:
                    scram = ScramClient(password=password)
                    mechanism, data = scram.client_first()
                    self.send(SASLInitialResponse(mechanism, data).encode())
                elif code == 11:
                    assert scram is not None
                    self.send(SASLResponse(scram.handle_server_first(body[4:])).encode())
                elif code == 12:
                    assert scram is not None
                    scram.handle_server_final(body[4:])
                else:
                    assert code == 0, f"unexpected authentication request {code}"
            elif t == b"K":
                self.key = BackendKeyData.decode(body)
            elif t == b"E":
                raise ServerError(ErrorResponse.decode(body))
            elif t == b"Z":
                return

    def query(self, sql: str) -> list[list[bytes | None]]:
        """Simple query; the rows of its (last) result as raw text values."""
        self.send(Query(sql).encode())
        rows: list[list[bytes | None]] = []
        error: ErrorResponse | None = None
        while True:
            t, body = self.read()
            if t == b"D":
                rows.append(_data_row(body))
            elif t == b"T":
                rows = []
            elif t == b"E":
                error = ErrorResponse.decode(body)
            elif t == b"Z":
                if error is not None:
                    raise ServerError(error)
                return rows


def _data_row(body: bytes) -> list[bytes | None]:
    n = struct.unpack_from("!h", body)[0]
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        size = struct.unpack_from("!i", body, pos)[0]
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + size])
            pos += size
    return out


class HealthyClient(threading.Thread):
    """A bystander running small queries in a loop on one connection the whole time."""

    def __init__(self, p: ProxyBase, login: DbLogin) -> None:
        super().__init__(name="healthy-client", daemon=True)
        self.conn = psycopg.connect(
            p.dsn(login.user, login.password, login.dbname, application_name="pgcloak-healthy"),
            autocommit=True,
            connect_timeout=10,
        )
        row = self.conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        self.backend_pid: int = row[0]
        self.queries = 0
        self.errors: list[BaseException] = []
        self._halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            i += 1
            try:
                row = self.conn.execute("select %s::int * 2, repeat('h', 100)", (i,)).fetchone()
                assert row == (2 * i, "h" * 100), row
            except BaseException as exc:  # reported by finish()
                self.errors.append(exc)
                return
            self.queries += 1
            time.sleep(0.002)

    def halt(self) -> None:
        self._halt.set()
        self.join(WAIT)

    def finish(self) -> None:
        """Stop the loop and assert every query succeeded on the original connection."""
        self.halt()
        assert not self.is_alive(), "healthy client hung"
        try:
            assert not self.errors, f"healthy client failed: {self.errors!r}"
            assert self.queries >= 5, f"healthy client ran only {self.queries} queries"
            row = self.conn.execute("select pg_backend_pid()").fetchone()
            assert row == (self.backend_pid,), "healthy client was reconnected or moved"
        finally:
            self.conn.close()


@contextlib.contextmanager
def healthy_bystander(p: ThreadedProxy, login: DbLogin) -> Iterator[HealthyClient]:
    client = HealthyClient(p, login)
    client.start()
    wait_until(lambda: client.queries >= 3, what="the healthy client to run")
    try:
        yield client
    except BaseException:
        client.halt()
        client.conn.close()
        raise
    # Let it run a little past the fault, then check it.
    baseline = client.queries
    with contextlib.suppress(AssertionError):
        wait_until(lambda: client.queries >= baseline + 3 or bool(client.errors), 5)
    client.finish()


@pytest.fixture
def fresh_proxy(make_proxy: Callable[..., Any]) -> Iterator[ThreadedProxy]:
    """A proxy of this test's own, so its session count is ours to check."""
    with make_proxy() as p:
        yield p


# ------------------------------------------------------------- extended protocol errors


def test_pipeline_syntax_error_recovers_at_sync(
    pgcloak: ThreadedProxy, pg_app_user: DbLogin
) -> None:
    login = pg_app_user
    with psycopg.connect(
        pgcloak.dsn(login.user, login.password, login.dbname), autocommit=True
    ) as conn:
        conn.execute("create temp table pipe_t (id int)")
        with conn.pipeline() as pipeline:
            conn.execute("insert into pipe_t values (%s)", (1,))
            pipeline.sync()
            # One implicit transaction up to the next Sync: the error aborts it, and
            # PostgreSQL (not the proxy) skips the rest of it.
            # psycopg raises the error at the Sync or, when the reply is already in, at
            # the next execute (timing): collect what each step raises.
            raised: list[psycopg.Error] = []
            for step in (
                lambda: conn.execute("insert into pipe_t values (%s)", (2,)),
                lambda: conn.execute("selec 'oops'"),
                lambda: conn.execute("insert into pipe_t values (%s)", (3,)),
                pipeline.sync,
            ):
                try:
                    step()
                except psycopg.Error as exc:
                    raised.append(exc)
            assert raised and isinstance(raised[0], psycopg.errors.SyntaxError), raised
            assert raised[0].sqlstate == "42601"
            # After the Sync the pipeline is usable again; 2 and 3 never took effect.
            conn.execute("insert into pipe_t values (%s)", (4,))
            pipeline.sync()
        rows = conn.execute("select id from pipe_t order by id").fetchall()
        assert rows == [(1,), (4,)]
        assert conn.execute("select 'still fine'").fetchone() == ("still fine",)


# ---------------------------------------------------------------- backend killed mid-query


def _terminate_sql(pg: TemporaryPostgres, pid: int) -> None:
    assert pg.run_sql(f"select pg_terminate_backend({pid})") == "t"


def _terminate_signal(pg: TemporaryPostgres, pid: int) -> None:
    # SIGTERM to a backend is what pg_terminate_backend does; never SIGKILL (that
    # sends the postmaster into crash recovery and disrupts every other test).
    os.kill(pid, signal.SIGTERM)


KILLERS = {"pg_terminate_backend": _terminate_sql, "sigterm": _terminate_signal}


def _wait_for_sleep(pg: TemporaryPostgres, pid: int) -> None:
    wait_until(
        lambda: (
            pg.run_sql(f"select wait_event from pg_stat_activity where pid = {pid}") == "PgSleep"
        ),
        what="the backend to be inside pg_sleep",
    )


@pytest.mark.parametrize("killer", sorted(KILLERS))
async def test_backend_killed_mid_query_asyncpg(
    pgcloak: ThreadedProxy, pg: TemporaryPostgres, pg_app_user: DbLogin, killer: str
) -> None:
    login = pg_app_user
    kwargs = pgcloak.kwargs(login.user, login.password, login.dbname)
    conn = await asyncpg.connect(**kwargs, ssl=False)
    try:
        pid = await conn.fetchval("select pg_backend_pid()")
        task = asyncio.ensure_future(conn.fetchval("select pg_sleep(30)"))
        await asyncio.to_thread(_wait_for_sleep, pg, pid)
        started = time.monotonic()
        await asyncio.to_thread(KILLERS[killer], pg, pid)
        # PostgreSQL's FATAL reaches the client before the connection closes.
        with pytest.raises(asyncpg.ConnectionDoesNotExistError, match="administrator command"):
            await asyncio.wait_for(task, WAIT)
        assert time.monotonic() - started < 5
    finally:
        conn.terminate()
    again = await asyncpg.connect(**kwargs, ssl=False)
    try:
        assert await again.fetchval("select 6 * 7") == 42
    finally:
        await again.close()


@pytest.mark.parametrize("killer", sorted(KILLERS))
def test_backend_killed_mid_query_psycopg(
    pgcloak: ThreadedProxy, pg: TemporaryPostgres, pg_app_user: DbLogin, killer: str
) -> None:
    login = pg_app_user
    dsn = pgcloak.dsn(login.user, login.password, login.dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = conn.info.backend_pid
        killed_at: list[float] = []

        def kill() -> None:
            _wait_for_sleep(pg, pid)
            killed_at.append(time.monotonic())
            KILLERS[killer](pg, pid)

        thread = threading.Thread(target=kill, daemon=True)
        thread.start()
        try:
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select pg_sleep(30)")
            assert killed_at, "the query failed before the kill"
            assert time.monotonic() - killed_at[0] < 5
        finally:
            thread.join(WAIT)
        assert "terminating connection" in str(info.value)
        assert conn.closed or conn.broken
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 6 * 7").fetchone() == (42,)


# ----------------------------------------------- broken clients next to a healthy one


def _authenticated(p: ProxyBase, login: DbLogin, app: str) -> RawClient:
    raw = RawClient.to(p)
    raw.login(login, application_name=app)
    assert raw.query("select 1") == [[b"1"]]
    return raw


def fault_garbage_before_startup(
    p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str
) -> None:
    blob = bytearray(random.Random(20240611).randbytes(200))
    blob[0] = 0xA5  # the "length" of the would-be startup packet is then far over 10000
    with RawClient.to(p) as raw:
        raw.send(bytes(blob))
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "08P01")
        assert raw.closed_by_peer()


def fault_garbage_after_auth(
    p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str
) -> None:
    # A whole message of random bytes with a type byte no client may send: the proxy
    # forwards it (the type is not its business) and PostgreSQL ends the session.
    junk = random.Random(7).randbytes(195)
    with _authenticated(p, login, app) as raw:
        raw.send(b"\xfe" + struct.pack("!I", 4 + len(junk)) + junk)
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "08P01")
        assert raw.closed_by_peer()
    wait_until(lambda: not pg.backend_pids(app), what="the backend to exit")


def fault_truncated_then_close(
    p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str
) -> None:
    raw = _authenticated(p, login, app)
    assert pg.backend_pids(app)
    raw.send(b"Q" + struct.pack("!I", 1000) + b"select 1")  # 992 bytes short
    raw.close()
    wait_until(lambda: not pg.backend_pids(app), what="the backend to exit")


def fault_absurd_length(p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str) -> None:
    with _authenticated(p, login, app) as raw:
        raw.send(b"Q" + (2**31 - 1).to_bytes(4, "big"))
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "08P01")
        assert "2147483647" in error.message
        assert raw.closed_by_peer()
    wait_until(lambda: not pg.backend_pids(app), what="the backend to exit")


def fault_absurd_length_during_auth(
    p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str
) -> None:
    with RawClient.to(p) as raw:
        raw.send(StartupMessage({"user": login.user, "database": login.dbname}).encode())
        t, _ = raw.read()
        assert t == b"R"
        raw.send(b"p" + (2**31 - 1).to_bytes(4, "big"))
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "08P01")
        assert raw.closed_by_peer()


def fault_half_close(p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str) -> None:
    with _authenticated(p, login, app) as raw:
        raw.send(Query("select pg_sleep(0.2)").encode())
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.closed_by_peer(), "the proxy kept a half-closed session open"
    wait_until(lambda: not pg.backend_pids(app), what="the backend to exit")


def fault_reset_while_streaming(
    p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str
) -> None:
    raw = _authenticated(p, login, app)
    # ~10 GB: the backend must not be left producing it after the client is gone.
    raw.send(Query("select repeat('x', 1000) from generate_series(1, 10000000)").encode())
    got = 0
    while got < (1 << 20):  # the result is streaming
        got += len(raw.sock.recv(1 << 16))
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST
    wait_until(lambda: not pg.backend_pids(app), 5, what="the streaming backend to exit")


def fault_backend_terminated(
    p: ThreadedProxy, login: DbLogin, pg: TemporaryPostgres, app: str
) -> None:
    with _authenticated(p, login, app) as raw:
        assert pg.kill_backends(application_name=app) == 1
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "57P01")
        assert raw.closed_by_peer()


FAULTS: dict[str, Callable[[ThreadedProxy, DbLogin, TemporaryPostgres, str], None]] = {
    "garbage_before_startup": fault_garbage_before_startup,
    "garbage_after_auth": fault_garbage_after_auth,
    "truncated_then_close": fault_truncated_then_close,
    "absurd_length": fault_absurd_length,
    "absurd_length_during_auth": fault_absurd_length_during_auth,
    "half_close": fault_half_close,
    "reset_while_streaming": fault_reset_while_streaming,
    "backend_terminated": fault_backend_terminated,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_leaves_healthy_client_and_no_leaked_session(
    fresh_proxy: ThreadedProxy, pg: TemporaryPostgres, pg_app_user: DbLogin, fault: str
) -> None:
    p = fresh_proxy
    app = f"pgcloak-fault-{fault}"
    with healthy_bystander(p, pg_app_user):
        assert p.session_count == 1
        FAULTS[fault](p, pg_app_user, pg, app)
        wait_until(lambda: p.session_count == 1, what="the broken session to be dropped")
        assert not pg.backend_pids(app)
    wait_until(lambda: p.session_count == 0, what="the healthy session to end")


def _memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def test_absurd_length_allocates_nothing(
    pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path: Path
) -> None:
    args = ["--backend", f"postgresql://{pg.host}:{pg.port}", "--drain-timeout", "0"]
    with SubprocessProxy(args, tmp_path / "pgcloak.log") as p:
        assert p.proc is not None
        pid = p.proc.pid
        with _authenticated(p, pg_app_user, "pgcloak-absurd-warmup"):
            pass
        # Reset the peak-RSS counter so VmHWM measures only what follows.
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = _memory_kib(pid)
        for length in (2**31 - 1, 2**32 - 1, 300 * 1024 * 1024):
            with _authenticated(p, pg_app_user, "pgcloak-absurd") as raw:
                raw.send(b"Q" + length.to_bytes(4, "big") + b"select")
                error = raw.read_error()
                assert error.code == "08P01"
                assert raw.closed_by_peer()
        after = _memory_kib(pid)
        grown = max(after["VmHWM"], after["VmRSS"]) - before["VmRSS"]
        assert grown < 10 * 1024, f"proxy RSS grew by {grown} KiB: {before} -> {after}"
        assert p.proc.poll() is None


# ------------------------------------------------------------------ start-up packets


def test_startup_packet_over_10000_bytes_is_08p01(pgcloak: ThreadedProxy) -> None:
    packet = StartupMessage({"user": "app", "options": "x" * 10_050}).encode()
    assert len(packet) > 10_000
    with RawClient.to(pgcloak) as raw:
        raw.send(packet)
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "08P01")
        assert raw.closed_by_peer()


def test_startup_packet_of_exactly_the_limit_is_read(
    pgcloak: ThreadedProxy, pg_app_user: DbLogin
) -> None:
    params = {"user": pg_app_user.user, "database": pg_app_user.dbname, "application_name": "x"}
    filler = 10_000 - len(StartupMessage(params).encode())
    params["application_name"] = "x" * (1 + filler)
    packet = StartupMessage(params).encode()
    assert len(packet) == 10_000
    with RawClient.to(pgcloak) as raw:
        raw.send(packet)
        raw.authenticate(pg_app_user.password)
        assert raw.query("select 1") == [[b"1"]]


def test_protocol_2_is_0a000(pgcloak: ThreadedProxy) -> None:
    body = b"user\x00app\x00database\x00appdb\x00\x00"
    with RawClient.to(pgcloak) as raw:
        raw.send(struct.pack("!II", 8 + len(body), 2 << 16) + body)
        error = raw.read_error()
        assert (error.severity, error.code) == ("FATAL", "0A000")
        assert "2.0" in error.message
        assert raw.closed_by_peer()


def test_gssenc_request_answered_n_then_startup_works(
    pgcloak: ThreadedProxy, pg_app_user: DbLogin
) -> None:
    with RawClient.to(pgcloak) as raw:
        raw.send(GSSENCRequest().encode())
        assert raw.read_byte() == b"N"
        raw.send(
            StartupMessage({"user": pg_app_user.user, "database": pg_app_user.dbname}).encode()
        )
        t, body = raw.read()
        assert t == b"R" and struct.unpack_from("!i", body)[0] == 10  # AuthenticationSASL
        assert b"SCRAM-SHA-256\x00" in body
        raw.buf[:0] = b"R" + struct.pack("!I", 4 + len(body)) + body  # let login() see it again
        raw.authenticate(pg_app_user.password)
        assert raw.query("select current_user") == [[b"app"]]


# ----------------------------------------------------------------------------- cancel


def _send_cancel(p: ProxyBase, pid: int, secret: bytes) -> None:
    with RawClient.to(p) as canceller:
        canceller.send(CancelRequest(pid, secret).encode())
        # PostgreSQL answers nothing and closes; so does the proxy.
        assert canceller.sock.recv(1024) == b""


def test_cancel_with_wrong_key_is_harmless(pgcloak: ThreadedProxy, pg_app_user: DbLogin) -> None:
    with RawClient.to(pgcloak) as raw:
        raw.login(pg_app_user, application_name="pgcloak-cancel-wrong")
        assert raw.key is not None
        wrong = bytes(b ^ 0xFF for b in raw.key.secret)
        raw.send(Query("select pg_sleep(1), 'done'").encode())
        time.sleep(0.2)
        _send_cancel(pgcloak, raw.key.pid, wrong)
        _send_cancel(pgcloak, raw.key.pid + 1_000_000, raw.key.secret)
        rows: list[list[bytes | None]] = []
        while True:
            t, body = raw.read()
            assert t != b"E", ErrorResponse.decode(body)
            if t == b"D":
                rows.append(_data_row(body))
            if t == b"Z":
                break
        assert rows == [[b"", b"done"]]  # not cancelled: the sleep ran its course
        assert raw.query("select 'usable'") == [[b"usable"]]


def test_cancel_with_right_key_cancels(pgcloak: ThreadedProxy, pg_app_user: DbLogin) -> None:
    with RawClient.to(pgcloak) as raw:
        raw.login(pg_app_user, application_name="pgcloak-cancel-right")
        assert raw.key is not None
        raw.send(Query("select pg_sleep(10)").encode())
        time.sleep(0.2)
        started = time.monotonic()
        _send_cancel(pgcloak, raw.key.pid, raw.key.secret)
        error = raw.read_error()
        assert (error.severity, error.code) == ("ERROR", "57014")
        assert time.monotonic() - started < 2
        assert raw.read() == (b"Z", b"I")
        assert raw.query("select 'usable'") == [[b"usable"]]


def test_cancel_from_psycopg(pgcloak: ThreadedProxy, pg_app_user: DbLogin) -> None:
    login = pg_app_user
    with psycopg.connect(
        pgcloak.dsn(login.user, login.password, login.dbname), autocommit=True
    ) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(10)")
        finally:
            timer.join(WAIT)
        assert time.monotonic() - started < 3
        assert conn.execute("select 1").fetchone() == (1,)
