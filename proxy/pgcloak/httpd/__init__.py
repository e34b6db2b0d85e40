"""One request per connection over HTTP/1.1, for pgcloak's small HTTP endpoints.

The admin endpoints and the sidecar injector answer a handful of requests a minute;
what matters is that a slow, huge or malformed request costs the proxy nothing. So:
h11 (a sans-IO HTTP library) parses, every connection serves one request and is
closed, the head and the body are bounded, and the whole request has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

__all__ = ["Handler", "HttpServer", "Reply", "Request", "serve_connection"]

log = logging.getLogger("pgcloak.httpd")

_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 12\r\nconnection: close\r\n\r\nbad request\n"
)
_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 18\r\nconnection: close\r\n\r\nrequest too large\n"
)
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string
    body: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Reply]]


class _TooLarge(Exception):
    pass


class HttpServer:
    """A listener answering each connection with :func:`serve_connection`."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        max_body: int = 0,
        deadline: float = 5.0,
    ) -> None:
        self.name = name
        self.host = host
        self._port = port
        self._handler = handler
        self._tls = tls
        self._max_body = max_body
        self._deadline = deadline
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self._port,
            ssl=self._tls,
            ssl_handshake_timeout=self._deadline if self._tls is not None else None,
            reuse_address=True,
        )
        log.info(f"{self.name} listening", extra={"address": f"{self.host}:{self.port}"})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(
            reader, writer, self._handler, max_body=self._max_body, deadline=self._deadline
        )


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    *,
    max_head: int = 16 * 1024,
    max_body: int = 0,
    deadline: float = 5.0,
) -> None:
    """Read one request (head at most ``max_head`` bytes, body at most ``max_body``),
    answer it with ``handler``, close. A client that is too slow is dropped unanswered."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    try:
        try:
            async with asyncio.timeout(deadline):
                request = await _read(conn, reader, max_head, max_body)
        except h11.RemoteProtocolError:
            writer.write(_BAD_REQUEST)
            await writer.drain()
            return
        except _TooLarge:
            writer.write(_TOO_LARGE)
            await writer.drain()
            return
        if request is None:
            return
        reply = await handler(request)
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("connection", "close"),
            ("cache-control", "no-store"),
            *reply.headers,
        ]
        out = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if request.method != "HEAD":
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _read(conn: h11.Connection, reader: asyncio.StreamReader, max_head: int, max_body: int) -> Request | None:
    """The request, or None if the client went away first. The head is bounded however
    its bytes arrive (h11 checks its own bound only while the head is incomplete)."""
    received = 0
    head: h11.Request | None = None
    body: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            received += len(data)
            if head is None and received > max_head:
                raise h11.RemoteProtocolError("request head too large", 431)
            conn.receive_data(data)  # b"" marks the end of the stream
            continue
        if isinstance(event, h11.Request):
            head = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > max_body:
                raise _TooLarge
            continue
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                raise _TooLarge
            body.append(bytes(event.data))
            continue
        if isinstance(event, h11.EndOfMessage) and head is not None:
            target = head.target.decode("ascii", "replace")
            return Request(head.method.decode("ascii", "replace"), target.split("?", 1)[0], b"".join(body))
        return None  # ConnectionClosed or PAUSED
