"""Running pgcloak for tests: in-process (own thread and event loop) or as `pgcloak run`.

The in-process proxy gets its own thread so that tests can block on subprocess
clients (psql, pgbench) without starving it. A client call that blocks in C while
holding the GIL (psycopg's legacy ``conn.cancel()``) starves it anyway: test those
against a SubprocessProxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pgcloak.config import Settings, load_settings
from pgcloak.session.server import ProxyServer, install_event_loop_policy


def make_settings(**overrides: Any) -> Settings:
    """Settings from keyword arguments only: no file, no PGCLOAK_* environment."""
    overrides.setdefault("listen", "127.0.0.1:0")
    return load_settings(None, overrides, environ={})


def dsn(host: str, port: int, user: str, password: str | None, dbname: str, **params: str) -> str:
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
    query = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in params.items())
    return f"postgresql://{auth}@{host}:{port}/{quote(dbname, safe='')}" + (f"?{query}" if query else "")


class ProxyBase:
    host = "127.0.0.1"
    port: int

    def dsn(self, user: str, password: str | None, dbname: str = "postgres", **params: str) -> str:
        params.setdefault("sslmode", "disable")
        return dsn(self.host, self.port, user, password, dbname, **params)

    def kwargs(self, user: str, password: str | None, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": user, "password": password, "database": dbname}


class ThreadedProxy(ProxyBase):
    """pgcloak's ProxyServer on a uvloop loop in a daemon thread.

    ``cwd``: the working directory it starts in, where a relative audit sink (the
    default one included) and spill directory land, as for ``pgcloak run``; the test
    process's own one is restored once it listens (the server keeps the directory it
    started in). Without it, a new temporary directory."""

    def __init__(self, settings: Settings, cwd: Path | None = None) -> None:
        self.settings = settings
        # a directory of its own by default (removed at stop): a test never leaves a
        # trail in the repository
        self._own_cwd = cwd is None
        self.cwd = cwd if cwd is not None else Path(tempfile.mkdtemp(prefix="pgcloak-proxy-"))
        self.server: ProxyServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ThreadedProxy:
        install_event_loop_policy()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pgcloak-proxy", daemon=True)
        with contextlib.chdir(self.cwd):
            self._thread.start()
            if not self._ready.wait(20):
                raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self.server = ProxyServer(self.settings)
            self._loop.run_until_complete(self.server.start())
            self.port = self.server.port
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a coroutine function on the proxy's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(60)

    @property
    def session_count(self) -> int:
        assert self.server is not None
        return len(self.server.sessions)

    def stop(self, drain_timeout: float = 0.0) -> None:
        if self._loop is None or self.server is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self.call(self.server.shutdown, drain_timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        if self._own_cwd:
            shutil.rmtree(self.cwd, ignore_errors=True)

    def __enter__(self) -> ThreadedProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SubprocessProxy(ProxyBase):
    """`pgcloak run` as a child process, its log captured in a file.

    It runs in ``cwd``, by default its log's directory (a test's scratch directory, never
    the repository): a relative audit sink or spill directory lands there."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.port = free_port()
        self.args = ["--listen", f"127.0.0.1:{self.port}", *args]
        self.log_path = log_path
        self.cwd = cwd if cwd is not None else log_path.parent
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> SubprocessProxy:
        cmd = [sys.executable, "-m", "pgcloak.cli", "run", *self.args]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgcloak exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"pgcloak did not listen: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> SubprocessProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def proxy(**overrides: Any) -> Iterator[ThreadedProxy]:
    with ThreadedProxy(make_settings(**overrides)) as p:
        yield p
