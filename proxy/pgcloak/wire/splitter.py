"""Streaming message splitter: forward untouched bytes as they come, capture the rest.

A proxy that buffers every message before forwarding it adds latency and memory for
large results. This splitter walks message headers across chunk boundaries and, for
each message, decides by its type byte whether it is *passed* (its bytes are forwarded
as soon as they arrive, even mid-message) or *captured* (buffered whole and handed to
the session, which may rewrite it). Only captured messages are ever held in memory,
so memory is bounded by the largest captured message, which is checked against the
configured maximum from its 5-byte header before anything is buffered.

``feed`` returns ``None`` when the whole chunk is pass-through: the caller then writes
the chunk object it received, with no copy. Otherwise it returns segments in stream
order: ``(PASS, bytes)`` to forward and ``(type_byte, message)`` for a captured whole
message (header included).
"""

from __future__ import annotations

import struct

from pgcloak.wire.errors import ProtocolError

PASS = -1
_unpack_len = struct.Struct("!I").unpack_from

Segment = tuple[int, bytes]


class Splitter:
    """Sans-IO header walker for one direction of a session."""

    __slots__ = ("_cap", "_cap_need", "_cap_type", "_head", "_remaining", "capture", "max_message")

    def __init__(self, capture: frozenset[int] = frozenset(), max_message: int = 1 << 30) -> None:
        #: Message type bytes to capture whole; may be replaced between feeds.
        self.capture = capture
        self.max_message = max_message
        self._remaining = 0  # bytes left of a message being passed through
        self._head = b""  # an incomplete header held back (< 5 bytes)
        self._cap: bytearray | None = None  # a message being captured
        self._cap_need = 0
        self._cap_type = 0

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ended exactly at a message boundary."""
        return self._remaining == 0 and self._cap is None and not self._head

    def feed(self, data: bytes) -> list[Segment] | None:
        """Split one received chunk; see the module docstring for the result."""
        remaining = self._remaining
        n = len(data)
        if remaining:
            if n <= remaining:
                self._remaining = remaining - n
                return None
            self._remaining = 0
            pos = remaining
        elif self._cap is not None or self._head:
            return self._feed_slow(data)
        else:
            pos = 0
        capture = self.capture
        limit = self.max_message
        out: list[Segment] | None = None
        run_start = 0
        while pos < n:
            if n - pos < 5:
                self._head = data[pos:]
                break
            length = _unpack_len(data, pos + 1)[0]
            if length < 4 or length > limit:
                raise ProtocolError.bad_length(data[pos : pos + 1], length, limit)
            end = pos + 1 + length
            t = data[pos]
            if t in capture:
                if out is None:
                    out = []
                if pos > run_start:
                    out.append((PASS, data[run_start:pos]))
                if end <= n:
                    out.append((t, data[pos:end]))
                    pos = run_start = end
                    continue
                self._cap = bytearray(data[pos:])
                self._cap_need = end - n
                self._cap_type = t
                return out
            if end > n:
                self._remaining = end - n
                pos = n
                break
            pos = end
        if out is None:
            if pos == n:
                return None
            return [(PASS, data[:pos])] if pos else []
        if pos > run_start:
            out.append((PASS, data[run_start:pos]))
        return out

    def _feed_slow(self, data: bytes) -> list[Segment]:
        """Continue a captured message or a held-back header, then resume normally."""
        out: list[Segment] = []
        cap = self._cap
        if cap is not None:
            need = self._cap_need
            if len(data) < need:
                cap += data
                self._cap_need = need - len(data)
                return out
            cap += data[:need]
            out.append((self._cap_type, bytes(cap)))
            self._cap = None
            self._cap_need = 0
            data = data[need:]
        else:
            data = self._head + data
            self._head = b""
        if data:
            rest = self.feed(data)
            if rest is None:
                out.append((PASS, data))
            else:
                out.extend(rest)
        return out
