"""The admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP/1.1.

It runs on the proxy's own event loop on purpose: a liveness probe must fail when that
loop is stuck, which a server in another thread would hide. HTTP is parsed by h11 (a
sans-IO library); every connection serves one request and is closed, with a few
seconds' deadline and h11's bound on the request head, so a slow or hostile client
costs nothing. GET and HEAD only: nothing here changes the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h11
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pgcloak.admin.metrics import ProxyState, make_registry, readiness

__all__ = ["AdminServer"]

log = logging.getLogger("pgcloak.admin")
#: Seconds a client has to send its request.
_DEADLINE = 5.0
_MAX_HEAD = 16 * 1024
_TEXT = "text/plain; charset=utf-8"
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 12\r\nconnection: close\r\n\r\nbad request\n"
)


class AdminServer:
    """Serves the admin endpoints for one proxy process (one worker)."""

    def __init__(self, host: str, port: int, state: ProxyState, worker: int | None = None) -> None:
        self.host = host
        self._port = port
        self._state = state
        self._registry = make_registry(state, worker)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self._port, reuse_address=True)
        log.info("admin listening", extra={"address": f"{self.host}:{self.port}"})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for one request (no IO; tests call it too)."""
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            ready, why = readiness(self._state)
            return (200 if ready else 503), _TEXT, (why + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, _TEXT, b"not found: try /healthz, /readyz or /metrics\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            try:
                async with asyncio.timeout(_DEADLINE):
                    request = await _read_request(conn, reader)
            except h11.RemoteProtocolError:
                writer.write(_BAD_REQUEST)  # malformed or oversized head: h11 cannot answer it
                await writer.drain()
                return
            if request is None:
                return
            method = request.method.decode("ascii", "replace")
            status, ctype, body = self.route(method, request.target.decode("ascii", "replace"))
            headers = [
                ("content-type", ctype),
                ("content-length", str(len(body))),
                ("connection", "close"),
                ("cache-control", "no-store"),
            ]
            if status == 405:
                headers.append(("allow", "GET, HEAD"))
            out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if method != "HEAD":
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            writer.write(out)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The request head, or None if the client went away first. A head over
    ``_MAX_HEAD`` bytes is refused however the bytes arrive (h11 checks its bound only
    while the head is incomplete)."""
    received = 0
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            received += len(data)
            if received > _MAX_HEAD:
                raise h11.RemoteProtocolError("request head too large", 431)
            conn.receive_data(data)  # b"" marks the end of the stream
            continue
        return None  # ConnectionClosed or PAUSED
