"""Startup-phase packets: the untyped ``length | code | body`` frames a client sends first.

These packets have no type byte, so the first int32 after the length (the "code")
says what they are: a protocol version (StartupMessage) or one of three magic
request codes. Framing is :func:`pgcloak.wire.framing.startup_packet_length`; this
module only decodes a complete packet (length prefix included) and encodes one.

Errors follow PostgreSQL's ``ProcessStartupPacket``: malformed packets are
08P01 protocol_violation, a major version other than 3 is 0A000
feature_not_supported, a missing user name is 28000.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import startup_packet_length

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_CANCEL_KEY_LENGTH",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "decode_startup",
]

PROTOCOL_3_0 = 196608  # (3 << 16) | 0
PROTOCOL_3_2 = 196610  # (3 << 16) | 2: variable-length cancel keys
CANCEL_REQUEST_CODE = 80877102  # (1234 << 16) | 5678
SSL_REQUEST_CODE = 80877103  # (1234 << 16) | 5679
GSSENC_REQUEST_CODE = 80877104  # (1234 << 16) | 5680
#: Protocol 3.2 lets the secret key grow up to this many bytes (3.0 always sends 4).
MAX_CANCEL_KEY_LENGTH = 256

_MAGIC_MAJOR = 1234
_HEAD = struct.Struct("!II")
_CANCEL_HEAD = struct.Struct("!IIi")


def _encode_str(value: str, what: str) -> bytes:
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"startup {what} {value!r} cannot be encoded") from exc
    if b"\x00" in raw:
        raise ProtocolError(f"startup {what} {value!r} contains a NUL byte")
    return raw


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a plain connection: protocol version and ``name=value`` params.

    ``params`` keeps the client's order so re-encoding reproduces its bytes; ``options``,
    ``replication`` and ``_pq_.*`` are ordinary strings here, interpreting them is the
    session's business.
    """

    params: dict[str, str]
    protocol: int = PROTOCOL_3_0

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        """The database name; PostgreSQL uses the user name when it is absent or empty."""
        return self.params.get("database") or self.user

    @property
    def application_name(self) -> str:
        return self.params.get("application_name", "")

    def encode(self) -> bytes:
        parts: list[bytes] = []
        for name, value in self.params.items():
            if not name:
                raise ProtocolError("startup parameter name is empty")
            parts.append(_encode_str(name, "parameter name"))
            parts.append(_encode_str(value, "parameter value"))
        parts.append(b"")
        body = b"\x00".join(parts) + b"\x00"
        return _HEAD.pack(len(body) + 8, self.protocol) + body


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Asks the server to switch to TLS before the StartupMessage."""

    CODE: ClassVar[int] = SSL_REQUEST_CODE

    def encode(self) -> bytes:
        return _HEAD.pack(8, self.CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Asks the server to switch to GSSAPI encryption before the StartupMessage."""

    CODE: ClassVar[int] = GSSENC_REQUEST_CODE

    def encode(self) -> bytes:
        return _HEAD.pack(8, self.CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a fresh connection to cancel the query of backend ``pid``.

    ``secret`` is the key from BackendKeyData: 4 bytes in protocol 3.0, up to 256 in 3.2.
    """

    pid: int
    secret: bytes

    CODE: ClassVar[int] = CANCEL_REQUEST_CODE

    def encode(self) -> bytes:
        if not 0 < len(self.secret) <= MAX_CANCEL_KEY_LENGTH:
            raise ProtocolError(f"invalid cancel key length {len(self.secret)}")
        return _CANCEL_HEAD.pack(12 + len(self.secret), self.CODE, self.pid) + bytes(self.secret)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(packet: bytes | bytearray | memoryview) -> StartupPacket:
    """Decode one complete startup-phase packet, 4-byte length prefix included.

    Raises :class:`ProtocolError` for anything PostgreSQL would refuse at this stage.
    """
    data = bytes(packet)
    if len(data) < 8:
        raise ProtocolError("incomplete startup packet")
    length = startup_packet_length(data)
    if length != len(data):
        raise ProtocolError(f"startup packet declares {length} bytes but has {len(data)}")
    code = _HEAD.unpack_from(data)[1]
    major, minor = code >> 16, code & 0xFFFF
    if major == _MAGIC_MAJOR:
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            if length != 8:
                raise ProtocolError("invalid length of encryption request packet")
            return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            if not 12 < length <= 12 + MAX_CANCEL_KEY_LENGTH:
                raise ProtocolError("invalid length of cancel request packet")
            pid = _CANCEL_HEAD.unpack_from(data)[2]
            return CancelRequest(pid, data[12:])
        raise ProtocolError(f"unknown startup request code {major}.{minor}")
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2",
            "0A000",
        )
    return StartupMessage(_decode_params(data), code)


def _decode_params(data: bytes) -> dict[str, str]:
    """Parse ``name\\0value\\0 ... \\0`` starting after the 8-byte header."""
    if len(data) == 8 or data[-1] != 0:
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    # Every field ends with a NUL; the final NUL is the terminator, which leaves an
    # empty last element after the split and must sit right after a complete pair.
    fields = data[8:-1].split(b"\x00")
    if fields[-1] != b"":
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    fields.pop()
    if len(fields) % 2:
        raise ProtocolError("invalid startup packet layout: parameter name without a value")
    params: dict[str, str] = {}
    for i in range(0, len(fields), 2):
        name = fields[i].decode("utf-8", "surrogateescape")
        if not name:
            raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
        if name in params:
            # PostgreSQL lets the last one win; a privacy proxy refuses the ambiguity.
            raise ProtocolError(f"duplicate startup parameter {name!r}")
        params[name] = fields[i + 1].decode("utf-8", "surrogateescape")
    if not params.get("user"):
        raise ProtocolError("no PostgreSQL user name specified in startup packet", "28000")
    return params
