"""One socket of a session, as an asyncio Protocol.

Two phases. During start-up and authentication the session reads whole packets with
``await`` (few messages, clarity matters). Once the backend says ReadyForQuery the
session sets ``relay`` and every chunk goes straight to the session's relay function
(many messages, speed matters). Flow control: when this socket's write buffer passes
its high-water mark, the peer stops reading, so memory never grows with result size.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import MAX_STARTUP_PACKET, startup_packet_length

_unpack_len = struct.Struct("!I").unpack_from


class ConnectionClosed(Exception):
    """The peer went away while the session waited for its next packet."""


class Endpoint(asyncio.Protocol):
    """A client or backend socket of one session."""

    def __init__(
        self,
        name: str,
        on_lost: Callable[[Endpoint, Exception | None], None],
        on_made: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        #: Set when the session enters the relay phase; receives every chunk.
        self.relay: Callable[[bytes], None] | None = None
        self.closed = False
        self._on_lost = on_lost
        self._buf = bytearray()
        self._eof = False
        #: Set by fail(): why the start-up phase's reads end although this socket is open.
        self._failed: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused_peer = False
        #: The session stopped reading this socket for a reason of its own (a CopyData it
        #: encrypts in slices): the peer's resume_writing leaves it stopped.
        self.reading_held = False
        #: The transport's write buffer is past its high-water mark (pause_writing).
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        if self._on_made is not None:
            self._on_made()

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool:
        # A half-closed peer gets no more answers we could deliver: close our side too.
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._wake()
        self._wake_drained()
        self._on_lost(self, exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.pause_reading()
            self._paused_peer = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drained()
        peer = self.peer
        if (
            self._paused_peer
            and peer is not None
            and peer.transport is not None
            and not peer.closed
            and not peer.reading_held
        ):
            peer.transport.resume_reading()
        self._paused_peer = False

    @property
    def holds_peer(self) -> bool:
        """This socket's full write buffer keeps the peer from being read (resume_writing
        lets it read again)."""
        return self._paused_peer

    async def drained(self) -> None:
        """Until the write buffer is back under its low-water mark (at once if it never
        passed the high one), or the socket is closed: for a writer that makes its own
        data, as the relay's peer-pausing cannot hold it back."""
        while self._writing_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def _wake_drained(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- start-up phase reads ---------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, reason: str) -> None:
        """End the start-up phase's wait on this socket (and any later one) with
        ConnectionClosed: the session's other socket is gone, so what this one would
        send can no longer be answered."""
        self._failed = reason
        self._wake()

    async def _wait_for(self, n: int) -> None:
        while len(self._buf) < n:
            if self._failed is not None:
                raise ConnectionClosed(self._failed)
            if self._eof:
                raise ConnectionClosed(f"{self.name} closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_startup_packet(self) -> bytes:
        """An untyped start-up packet (length included), length checked before buffering."""
        await self._wait_for(4)
        length = startup_packet_length(self._buf)
        assert length is not None and length <= MAX_STARTUP_PACKET
        await self._wait_for(length)
        return self._take(length)

    async def read_message(self, max_size: int) -> tuple[int, bytes]:
        """One typed message: (type byte, body)."""
        await self._wait_for(5)
        length = _unpack_len(self._buf, 1)[0]
        if length < 4 or length > max_size:
            raise ProtocolError.bad_length(self._buf[:1], length, max_size)
        await self._wait_for(1 + length)
        t = self._buf[0]
        body = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return t, body

    async def read_byte(self) -> int:
        await self._wait_for(1)
        return self._take(1)[0]

    def pending(self) -> bytes:
        """Bytes received but not consumed by the start-up phase (handed to the relay)."""
        return self._take(len(self._buf))

    def has_pending(self) -> bool:
        return bool(self._buf)

    def write(self, data: bytes) -> None:
        """Send ``data``, or nothing once the socket is closing: a transport closed under
        us (a TLS handshake that failed never reports connection_lost to this protocol)
        raises on write with uvloop."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
