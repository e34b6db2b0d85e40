"""A plain TCP byte relay on uvloop: the floor for any Python PostgreSQL proxy.

No parsing at all: every byte from the client goes to the backend and back, SSLRequest
included (the benchmark's clients use sslmode=disable). What it does do is what any
proxy must do too, so the comparison with pgcloak is fair:

* one asyncio Protocol per side, each writing straight into the other's transport;
* flow control: when a side's write buffer passes its high-water mark the *other*
  side stops reading (``pause_reading``) until the buffer drains (``resume_writing``);
* half-close is passed on (``write_eof``), a close or reset closes the peer after its
  buffered data is flushed;
* ``--workers N`` pre-forks N processes that each listen on the same port with
  SO_REUSEPORT, as ``pgcloak run --workers N`` does.

    python bench/relay.py --listen 127.0.0.1:6500 --backend 127.0.0.1:5432 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import cast

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class _Side(asyncio.Protocol):
    """One TCP connection of a relayed pair; ``peer`` is the other one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.closed = False
        self.pending: list[bytes] = []  # data that arrived before the peer was linked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its API.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if not peer.closed:
                peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return False  # nobody to tell: close ourselves
        if peer.eof or not peer.transport.can_write_eof():
            peer.transport.close()
            return False
        peer.transport.write_eof()
        return True  # keep our write side open for the peer's remaining data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.close()  # flushes what is buffered, then closes

    # Our write buffer is full: stop reading from the side that fills it.
    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()


class _ClientSide(_Side):
    """The accepted connection; opens the backend connection before reading anything."""

    def __init__(self, backend: tuple[str, int], tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self.backend = backend
        self.tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # until the backend is connected
        task = asyncio.get_running_loop().create_task(self._connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        server = _Side()
        try:
            await loop.create_connection(lambda: server, *self.backend)
        except OSError as exc:
            print(f"relay: backend {self.backend[0]}:{self.backend[1]}: {exc}", file=sys.stderr)
            self.transport.abort()
            return
        if self.closed:  # the client left while we were connecting
            assert server.transport is not None
            server.transport.close()
            return
        server.peer, self.peer = self, server
        if self.pending:
            assert server.transport is not None
            server.transport.write(b"".join(self.pending))
            self.pending.clear()
        if server.pending:  # the backend spoke first (PostgreSQL never does, but still)
            self.transport.write(b"".join(server.pending))
            server.pending.clear()
        if server.closed:  # ... and hung up already
            self.transport.close()
            return
        self.transport.resume_reading()


async def serve(
    listen: tuple[str, int], backend: tuple[str, int], sock: socket.socket | None = None
) -> None:
    """Relay until SIGTERM/SIGINT; then close the listener and every open connection."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    clients: list[_ClientSide] = []

    def accept() -> _ClientSide:
        client = _ClientSide(backend, tasks)
        clients.append(client)
        if len(clients) > 256:  # forget finished pairs now and then
            clients[:] = [c for c in clients if not c.closed]
        return client

    if sock is not None:
        server = await loop.create_server(accept, sock=sock, backlog=1024)
    else:
        server = await loop.create_server(
            accept, listen[0], listen[1], backlog=1024, reuse_address=True
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for client in clients:
        for side in (client, client.peer):
            if side is not None and side.transport is not None:
                side.transport.abort()
    for task in list(tasks):
        task.cancel()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 1.0)


def _parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _reuseport_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _run(listen: tuple[str, int], backend: tuple[str, int], sock: socket.socket | None) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pgcloak dependency
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(listen, backend, sock))
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_parse_addr, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--backend", type=_parse_addr, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    args = parser.parse_args(argv)
    listen: tuple[str, int] = args.listen
    backend: tuple[str, int] = args.backend
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.workers == 1:
        return _run(listen, backend, None)

    # A bound (not listening) SO_REUSEPORT socket reserves the port, even if it was 0;
    # every worker then binds and listens on its own socket for the same port.
    reserve = _reuseport_socket(*listen)
    port = reserve.getsockname()[1]
    children: list[int] = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reserve.close()
                sock = _reuseport_socket(listen[0], port)
                sock.listen(1024)
                code = _run((listen[0], port), backend, sock)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = 0
    for child in children:
        _, wait_status = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(wait_status)
    reserve.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
