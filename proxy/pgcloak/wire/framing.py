"""Message boundaries of protocol 3.0, without decoding bodies.

Every regular message is ``type (1 byte) | length (int32, includes itself) | body``.
The startup-phase packets (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest)
have no type byte: ``length (int32) | code (int32) | body``.

The session walks a buffer with :func:`scan`, which only reads headers, so a message
that nobody changes is forwarded as the very bytes that arrived. A declared length
over the configured maximum raises :class:`ProtocolError` before anything is
allocated for it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pgcloak.wire.errors import ProtocolError

_LEN = struct.Struct("!I")
_TYPED_HEADER = struct.Struct("!cI")
_unpack_len = _LEN.unpack_from

#: PostgreSQL refuses startup packets over this size (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
#: Default ceiling for one regular message; PostgreSQL's own limit is 1 GiB.
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024


def scan(buf: bytes | bytearray | memoryview, max_message: int) -> int:
    """Return the end offset of the last complete message at the start of ``buf``.

    Only headers are read. Raises :class:`ProtocolError` for a length below 4 or
    above ``max_message`` (checked as soon as the 5-byte header is present).
    """
    pos = 0
    n = len(buf)
    while n - pos >= 5:
        length = _unpack_len(buf, pos + 1)[0]
        if length < 4 or length > max_message:
            raise ProtocolError.bad_length(buf[pos : pos + 1], length, max_message)
        end = pos + 1 + length
        if end > n:
            break
        pos = end
    return pos


#: One listed message of :func:`scan_marked`: (type, start, end, DataRows before it).
Mark = tuple[int, int, int, int]
_DATA_ROW = 0x44


def scan_marked(
    buf: bytes | bytearray | memoryview, max_message: int, marked: frozenset[int]
) -> tuple[int, list[Mark], int]:
    """:func:`scan`, also listing the complete messages whose type is in ``marked``.

    Returns ``(end, marks, rows)``: ``end`` as :func:`scan` returns it; for each marked
    message ``(type, start, end, n)`` where ``n`` counts the DataRows since the previous
    marked message (or the start); ``rows`` the DataRows after the last one. A session
    that follows the server's replies (the audit trail) then needs no second walk.
    """
    pos = 0
    n = len(buf)
    marks: list[Mark] = []
    rows = 0
    while n - pos >= 5:
        length = _unpack_len(buf, pos + 1)[0]
        if length < 4 or length > max_message:
            raise ProtocolError.bad_length(buf[pos : pos + 1], length, max_message)
        end = pos + 1 + length
        if end > n:
            break
        t = buf[pos]
        if t == _DATA_ROW:
            rows += 1
        elif t in marked:
            marks.append((t, pos, end, rows))
            rows = 0
        pos = end
    return pos, marks, rows


def iter_messages(
    buf: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """Yield ``(type, body_start, body_end)`` for the complete messages in ``buf[start:end]``.

    The caller has already checked boundaries with :func:`scan`.
    """
    stop = len(buf) if end is None else end
    pos = start
    while pos + 5 <= stop:
        length = _unpack_len(buf, pos + 1)[0]
        nxt = pos + 1 + length
        if length < 4 or nxt > stop:
            return
        yield buf[pos], pos + 5, nxt
        pos = nxt


def startup_packet_length(buf: bytes | bytearray | memoryview) -> int | None:
    """Length of the untyped startup-phase packet at the start of ``buf``, or None if unknown yet.

    Raises :class:`ProtocolError` for lengths PostgreSQL would refuse.
    """
    if len(buf) < 4:
        return None
    length: int = _unpack_len(buf, 0)[0]
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError.bad_length(b"", length, MAX_STARTUP_PACKET)
    return length


def frame(type_byte: bytes, body: bytes) -> bytes:
    """Build one typed message from its type byte and body."""
    return _TYPED_HEADER.pack(type_byte, len(body) + 4) + body
