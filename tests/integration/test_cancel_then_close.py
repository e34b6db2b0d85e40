"""A CancelRequest whose client closes (or half-closes) its socket right after sending
it, without waiting for the server's EOF, as tokio-postgres does: PostgreSQL's
postmaster reads the packet whatever the client does next and cancels the query.
pgcloak ended the session on the close and dropped the request (review of session 13).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pg8000.native
import psycopg
import pytest

from pgcloak.demo.postgres import DbLogin


def _cancel_and_close(host: str, port: int, key: bytes, how: str) -> None:
    with socket.create_connection((host, port)) as s:
        s.sendall(struct.pack("!ii", 16, 80877102) + key)
        if how == "half-close":  # write, shutdown(SHUT_WR), read to EOF
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            while s.recv(100):
                pass


def _sleep(host: str, port: int, login: DbLogin, out: dict[str, Any]) -> None:
    conn = pg8000.native.Connection(
        login.user, host=host, port=port, password=login.password, database=login.dbname, ssl_context=None
    )
    out["key"] = conn._backend_key_data
    out["ready"].set()
    started = time.monotonic()
    try:
        conn.run("SELECT pg_sleep(8)")
        out["result"] = "completed"
    except pg8000.native.DatabaseError as exc:
        out["result"] = exc.args[0].get("C") if exc.args and isinstance(exc.args[0], dict) else str(exc)
    out["elapsed"] = time.monotonic() - started
    conn.close()


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_a_cancel_request_is_forwarded_whatever_the_client_does_next(
    pg_app_user: DbLogin, make_proxy: Callable[..., AbstractContextManager[Any]], how: str
) -> None:
    with make_proxy(backend_tls_mode="disable") as proxy:
        out: dict[str, Any] = {"ready": threading.Event()}
        worker = threading.Thread(target=_sleep, args=(proxy.host, proxy.port, pg_app_user, out))
        worker.start()
        assert out["ready"].wait(10)
        time.sleep(0.5)  # the query is running
        _cancel_and_close(proxy.host, proxy.port, out["key"], how)
        worker.join(15)
        assert out.get("result") == "57014", out  # query_canceled
        assert out["elapsed"] < 4, out
        deadline = time.monotonic() + 5
        while (proxy.server.clients or proxy.server.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.server.clients == 0 and not proxy.server.sessions


def test_a_failure_entering_the_relay_ends_the_session_and_frees_its_slot(
    pg: Any, pg_app_user: DbLogin, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session is ready by then: the start-up task's cleanup did not apply, and the
    # slot stayed taken (review of session 13).
    from encryption_fixtures import encryption_env

    from pgcloak.session import session as session_module

    with encryption_env(pg, pg_app_user, tmp_path, "relayfail") as env:

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("made to fail")

        monkeypatch.setattr(session_module, "Rewriter", broken)
        # The client already had its ReadyForQuery: it may read the FATAL XX000, or only
        # the closed connection.
        with pytest.raises(psycopg.Error), env.psy() as conn:
            conn.execute("SELECT 1")
        server = env.proxy.server
        assert server is not None
        deadline = time.monotonic() + 5
        while (server.clients or server.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.clients == 0 and not server.sessions
