"""Typed protocol 3.0 messages: one frozen dataclass per entry of the "Message Formats" page.

Each class has ``decode(body)`` (body = the bytes after the 5-byte header) and
``encode()`` (the whole message, header included). The session decodes only the
messages it must inspect or change and forwards everything else as the original
bytes, so the codec is exact rather than clever:

* ``encode(decode(body))`` reproduces the original bytes. Strings are decoded as
  UTF-8 with ``surrogateescape``, which maps any client encoding's bytes back to
  themselves.
* Decoding a malformed body raises :class:`ProtocolError` and nothing else, because
  the bytes come from an untrusted peer and the session turns that one exception
  into an 08P01 error for the client.
* Encoding refuses strings that cannot go on the wire (an embedded NUL would let
  text that reached an error message split one field into several).

Integer fields follow PostgreSQL's own readers: counts are unsigned int16 (the server
reads them with ``pq_getmsgint``), OIDs are unsigned int32, format codes, attribute
numbers, type sizes and modifiers are signed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Self, TypeAlias

from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import frame
from pgcloak.wire.startup import MAX_CANCEL_KEY_LENGTH

__all__ = [
    "Authentication",
    "AuthenticationCleartextPassword",
    "AuthenticationGSS",
    "AuthenticationGSSContinue",
    "AuthenticationKerberosV5",
    "AuthenticationMD5Password",
    "AuthenticationMessage",
    "AuthenticationOk",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "AuthenticationSSPI",
    "BackendKeyData",
    "BackendMessage",
    "Bind",
    "BindComplete",
    "Close",
    "CloseComplete",
    "CommandComplete",
    "CopyBothResponse",
    "CopyData",
    "CopyDone",
    "CopyFail",
    "CopyInResponse",
    "CopyOutResponse",
    "DataRow",
    "Describe",
    "EmptyQueryResponse",
    "ErrorResponse",
    "Execute",
    "FieldDescription",
    "Flush",
    "FrontendMessage",
    "FunctionCall",
    "FunctionCallResponse",
    "GSSResponse",
    "Message",
    "NegotiateProtocolVersion",
    "NoData",
    "NoticeResponse",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "Parse",
    "ParseComplete",
    "PasswordMessage",
    "PortalSuspended",
    "Query",
    "ReadyForQuery",
    "RowDescription",
    "SASLInitialResponse",
    "SASLResponse",
    "Sync",
    "Terminate",
    "decode_backend",
    "decode_frontend",
    "error_response",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I32_I32 = struct.Struct("!ii")
_FIELD_TAIL = struct.Struct("!IhIhih")  # RowDescription: everything after the name
_u16_from = _U16.unpack_from
_i32_from = _I32.unpack_from
_field_tail_from = _FIELD_TAIL.unpack_from
_pack_u16 = _U16.pack
_pack_i32 = _I32.pack


# --------------------------------------------------------------------------- helpers


def _as_bytes(body: Buffer) -> bytes:
    # One copy up front lets every reader use bytes.find and cheap slicing.
    return body if type(body) is bytes else bytes(body)


def _cstr(body: bytes, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated string at ``pos``; return it and the offset after the NUL."""
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("invalid string in message: missing NUL terminator")
    return body[pos:end].decode("utf-8", "surrogateescape"), end + 1


def _last_cstr(body: bytes, pos: int = 0) -> str:
    """Read a string that must end exactly at the end of the body."""
    text, end = _cstr(body, pos)
    if end != len(body):
        raise ProtocolError("invalid message format: bytes after the last string")
    return text


def _enc(text: str) -> bytes:
    """Encode a string field with its terminator, refusing what cannot round-trip."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"string {text!r} cannot be encoded") from exc
    if b"\x00" in raw:
        raise ProtocolError(f"string {text!r} contains a NUL byte")
    return raw + b"\x00"


def _byte1(char: str) -> bytes:
    """Encode a one-byte code field (status, kind, field letter)."""
    if len(char) != 1 or ord(char) > 0xFF:
        raise ProtocolError(f"invalid one-byte code {char!r}")
    return bytes((ord(char),))


def _end(body: bytes, pos: int) -> None:
    if pos != len(body):
        raise ProtocolError("invalid message format: trailing bytes")


def _i16_array(body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """Read ``int16 n`` followed by n signed int16 values."""
    n = _u16_from(body, pos)[0]
    pos += 2
    return struct.unpack_from(f"!{n}h", body, pos), pos + 2 * n


def _pack_i16_array(values: tuple[int, ...]) -> bytes:
    return _pack_u16(len(values)) + struct.pack(f"!{len(values)}h", *values)


def _values(body: bytes, pos: int) -> tuple[tuple[bytes | None, ...], int]:
    """Read ``int16 n`` then n ``int32 length | bytes`` values (-1 = NULL).

    This is the hot path of DataRow and Bind: struct reads at offsets, one slice per value.
    """
    n = _u16_from(body, pos)[0]
    pos += 2
    size = len(body)
    out: list[bytes | None] = []
    append = out.append
    for _ in range(n):
        length = _i32_from(body, pos)[0]
        pos += 4
        if length < 0:
            if length != -1:
                raise ProtocolError(f"invalid value length {length}")
            append(None)
            continue
        end = pos + length
        if end > size:
            raise ProtocolError("insufficient data left in message")
        append(body[pos:end])
        pos = end
    return tuple(out), pos


def _pack_values(values: tuple[bytes | None, ...]) -> bytes:
    parts = [_pack_u16(len(values))]
    append = parts.append
    for value in values:
        if value is None:
            append(b"\xff\xff\xff\xff")
        else:
            append(_pack_i32(len(value)))
            append(value)
    return b"".join(parts)


def _truncated(cls: type[Message]) -> ProtocolError:
    """The error for a struct read past the end of the body (raise it ``from`` that error)."""
    return ProtocolError(f"invalid {cls.__name__} message: insufficient data left in message")


# --------------------------------------------------------------------------- bases


class Message:
    """Common base: every message knows its type byte, encodes itself, decodes a body."""

    __slots__ = ()
    TYPE: ClassVar[bytes]

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: Buffer) -> Message:
        raise NotImplementedError


class _Empty(Message):
    """A message whose body is empty (Sync, ParseComplete, ...)."""

    __slots__ = ()

    def encode(self) -> bytes:
        return frame(self.TYPE, b"")

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        if len(body) != 0:
            raise ProtocolError(f"invalid {cls.__name__} message: expected an empty body")
        return cls()


@dataclass(frozen=True, slots=True)
class _Raw(Message):
    """A message whose whole body is opaque bytes (CopyData, SASLResponse, ...)."""

    data: bytes

    def encode(self) -> bytes:
        return frame(self.TYPE, bytes(self.data))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(bytes(body))


class _Text(Message):
    """A message whose body is one string (Query, CommandComplete, CopyFail)."""

    __slots__ = ()

    def _text(self) -> str:
        raise NotImplementedError

    def encode(self) -> bytes:
        return frame(self.TYPE, _enc(self._text()))


# --------------------------------------------------------------------------- shared


@dataclass(frozen=True, slots=True)
class CopyData(_Raw):
    """A chunk of COPY data, in either direction."""

    TYPE: ClassVar[bytes] = b"d"


@dataclass(frozen=True, slots=True)
class CopyDone(_Empty):
    """End of COPY data, in either direction."""

    TYPE: ClassVar[bytes] = b"c"


# --------------------------------------------------------------------------- frontend


@dataclass(frozen=True, slots=True)
class Query(_Text):
    """Simple query: one or more statements as text."""

    sql: str
    TYPE: ClassVar[bytes] = b"Q"

    def _text(self) -> str:
        return self.sql

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(_last_cstr(_as_bytes(body)))


@dataclass(frozen=True, slots=True)
class Parse(Message):
    """Extended protocol: prepare ``query`` as statement ``name`` ("" = unnamed)."""

    name: str
    query: str
    param_types: tuple[int, ...] = ()
    TYPE: ClassVar[bytes] = b"P"

    def encode(self) -> bytes:
        n = len(self.param_types)
        try:
            types = _pack_u16(n) + struct.pack(f"!{n}I", *self.param_types)
        except struct.error as exc:
            raise ProtocolError(f"invalid Parse parameter types: {exc}") from exc
        return frame(self.TYPE, _enc(self.name) + _enc(self.query) + types)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        try:
            name, pos = _cstr(b, 0)
            query, pos = _cstr(b, pos)
            n = _u16_from(b, pos)[0]
            types: tuple[int, ...] = struct.unpack_from(f"!{n}I", b, pos + 2)
        except struct.error as exc:
            raise _truncated(cls) from exc
        _end(b, pos + 2 + 4 * n)
        return cls(name, query, types)


@dataclass(frozen=True, slots=True)
class Bind(Message):
    """Extended protocol: bind parameter values to a prepared statement, making a portal.

    ``param_formats`` and ``result_formats`` are as sent: empty means all text, one
    entry applies to all, otherwise one per parameter/column.
    """

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]
    TYPE: ClassVar[bytes] = b"B"

    def encode(self) -> bytes:
        try:
            body = b"".join(
                (
                    _enc(self.portal),
                    _enc(self.statement),
                    _pack_i16_array(self.param_formats),
                    _pack_values(self.params),
                    _pack_i16_array(self.result_formats),
                )
            )
        except struct.error as exc:
            raise ProtocolError(f"invalid Bind field: {exc}") from exc
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        try:
            portal, pos = _cstr(b, 0)
            statement, pos = _cstr(b, pos)
            param_formats, pos = _i16_array(b, pos)
            params, pos = _values(b, pos)
            result_formats, pos = _i16_array(b, pos)
        except struct.error as exc:
            raise _truncated(cls) from exc
        _end(b, pos)
        return cls(portal, statement, param_formats, params, result_formats)


@dataclass(frozen=True, slots=True)
class Execute(Message):
    """Extended protocol: run a portal; ``max_rows`` 0 means no limit."""

    portal: str
    max_rows: int = 0
    TYPE: ClassVar[bytes] = b"E"

    def encode(self) -> bytes:
        try:
            return frame(self.TYPE, _enc(self.portal) + _pack_i32(self.max_rows))
        except struct.error as exc:
            raise ProtocolError(f"invalid Execute max_rows: {exc}") from exc

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        portal, pos = _cstr(b, 0)
        if len(b) - pos != 4:
            raise ProtocolError("invalid Execute message: expected an int32 row limit")
        return cls(portal, _i32_from(b, pos)[0])


@dataclass(frozen=True, slots=True)
class _Target(Message):
    """Describe and Close: a kind byte ('S' statement, 'P' portal) and a name."""

    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(self.TYPE, _byte1(self.kind) + _enc(self.name))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        if not b or b[0] not in b"SP":
            raise ProtocolError(f"invalid {cls.__name__} message subtype")
        return cls(chr(b[0]), _last_cstr(b, 1))


@dataclass(frozen=True, slots=True)
class Describe(_Target):
    """Extended protocol: ask for a statement's ('S') or portal's ('P') description."""

    TYPE: ClassVar[bytes] = b"D"


@dataclass(frozen=True, slots=True)
class Close(_Target):
    """Extended protocol: close a statement ('S') or portal ('P')."""

    TYPE: ClassVar[bytes] = b"C"


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    """Extended protocol: end of a pipeline step; errors are skipped until here."""

    TYPE: ClassVar[bytes] = b"S"


@dataclass(frozen=True, slots=True)
class Flush(_Empty):
    """Ask the server to send what it has buffered."""

    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):
    """The client is closing the connection."""

    TYPE: ClassVar[bytes] = b"X"


@dataclass(frozen=True, slots=True)
class CopyFail(_Text):
    """The client aborts COPY FROM STDIN with a reason."""

    message: str
    TYPE: ClassVar[bytes] = b"f"

    def _text(self) -> str:
        return self.message

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(_last_cstr(_as_bytes(body)))


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    """The legacy fast-path function call (still used by large-object clients)."""

    oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int = 0
    TYPE: ClassVar[bytes] = b"F"

    def encode(self) -> bytes:
        try:
            body = b"".join(
                (
                    _U32.pack(self.oid),
                    _pack_i16_array(self.arg_formats),
                    _pack_values(self.args),
                    _I16.pack(self.result_format),
                )
            )
        except struct.error as exc:
            raise ProtocolError(f"invalid FunctionCall field: {exc}") from exc
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        try:
            oid = _U32.unpack_from(b, 0)[0]
            arg_formats, pos = _i16_array(b, 4)
            args, pos = _values(b, pos)
            result_format = _I16.unpack_from(b, pos)[0]
        except struct.error as exc:
            raise _truncated(cls) from exc
        _end(b, pos + 2)
        return cls(oid, arg_formats, args, result_format)


@dataclass(frozen=True, slots=True)
class PasswordMessage(_Raw):
    """A 'p' message as received: its meaning depends on the authentication exchange.

    The session knows which request it relayed and re-decodes the body with
    :class:`SASLInitialResponse`, :class:`SASLResponse` or :class:`GSSResponse`;
    for cleartext and MD5 it is a NUL-terminated password.
    """

    TYPE: ClassVar[bytes] = b"p"

    @property
    def password(self) -> str:
        data = self.data[:-1] if self.data.endswith(b"\x00") else self.data
        return data.decode("utf-8", "surrogateescape")

    @classmethod
    def of(cls, password: str) -> Self:
        return cls(_enc(password))


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    """First SASL message: the chosen mechanism and its optional initial response."""

    mechanism: str
    data: bytes | None
    TYPE: ClassVar[bytes] = b"p"

    def encode(self) -> bytes:
        if self.data is None:
            tail = b"\xff\xff\xff\xff"
        else:
            tail = _pack_i32(len(self.data)) + bytes(self.data)
        return frame(self.TYPE, _enc(self.mechanism) + tail)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        mechanism, pos = _cstr(b, 0)
        if len(b) - pos < 4:
            raise ProtocolError("invalid SASLInitialResponse message: missing data length")
        length = _i32_from(b, pos)[0]
        pos += 4
        if length == -1:
            _end(b, pos)
            return cls(mechanism, None)
        if length != len(b) - pos:
            raise ProtocolError("invalid SASLInitialResponse message: wrong data length")
        return cls(mechanism, b[pos:])


@dataclass(frozen=True, slots=True)
class SASLResponse(_Raw):
    """A later SASL message (e.g. SCRAM client-final-message)."""

    TYPE: ClassVar[bytes] = b"p"


@dataclass(frozen=True, slots=True)
class GSSResponse(_Raw):
    """A GSSAPI or SSPI token from the client."""

    TYPE: ClassVar[bytes] = b"p"


# --------------------------------------------------------------------------- backend: auth


class Authentication(Message):
    """Base of the 'R' messages; :meth:`decode` dispatches on the int32 request code."""

    __slots__ = ()
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int]

    def _payload(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.TYPE, _pack_i32(self.CODE) + self._payload())

    @classmethod
    def decode(cls, body: Buffer) -> Authentication:
        """Decode any 'R' message into the subclass its code names (subclasses check it)."""
        return _decode_authentication(body)

    @classmethod
    def _check(cls, body: Buffer) -> bytes:
        """For a concrete subclass's decode: the body with its code checked."""
        b = _as_bytes(body)
        if len(b) < 4 or _i32_from(b, 0)[0] != cls.CODE:
            raise ProtocolError(f"not an {cls.__name__} message")
        return b


class _AuthNoData(Authentication):
    """An authentication request with nothing after the code."""

    __slots__ = ()

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = cls._check(body)
        if len(b) != 4:
            raise ProtocolError(f"invalid {cls.__name__} message: unexpected data")
        return cls()


@dataclass(frozen=True, slots=True)
class _AuthData(Authentication):
    """An authentication request carrying opaque bytes (GSS/SASL continuation)."""

    data: bytes

    def _payload(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(cls._check(body)[4:])


@dataclass(frozen=True, slots=True)
class AuthenticationOk(_AuthNoData):
    """Authentication succeeded."""

    CODE: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5(_AuthNoData):
    """Kerberos V5 (unsupported since PostgreSQL 9.4, still a defined code)."""

    CODE: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(_AuthNoData):
    """The server wants the password in clear text."""

    CODE: ClassVar[int] = 3


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Authentication):
    """The server wants md5(md5(password + user) + salt)."""

    salt: bytes
    CODE: ClassVar[int] = 5

    def _payload(self) -> bytes:
        if len(self.salt) != 4:
            raise ProtocolError("MD5 salt must be 4 bytes")
        return bytes(self.salt)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = cls._check(body)
        if len(b) != 8:
            raise ProtocolError("invalid AuthenticationMD5Password message: salt is not 4 bytes")
        return cls(b[4:])


@dataclass(frozen=True, slots=True)
class AuthenticationGSS(_AuthNoData):
    """Start GSSAPI negotiation."""

    CODE: ClassVar[int] = 7


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue(_AuthData):
    """A GSSAPI or SSPI token from the server."""

    CODE: ClassVar[int] = 8


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI(_AuthNoData):
    """Start SSPI negotiation."""

    CODE: ClassVar[int] = 9


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Authentication):
    """Start SASL: the mechanisms the server offers, in its order of preference."""

    mechanisms: tuple[str, ...]
    CODE: ClassVar[int] = 10

    def _payload(self) -> bytes:
        if "" in self.mechanisms:
            raise ProtocolError("an empty SASL mechanism name would end the list early")
        return b"".join(_enc(m) for m in self.mechanisms) + b"\x00"

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = cls._check(body)
        mechanisms: list[str] = []
        pos = 4
        while True:
            name, pos = _cstr(b, pos)
            if not name:
                break
            mechanisms.append(name)
        _end(b, pos)
        return cls(tuple(mechanisms))


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(_AuthData):
    """A SASL challenge (e.g. SCRAM server-first-message)."""

    CODE: ClassVar[int] = 11


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(_AuthData):
    """SASL outcome data (e.g. SCRAM server-final-message)."""

    CODE: ClassVar[int] = 12


AuthenticationMessage: TypeAlias = (
    AuthenticationOk
    | AuthenticationKerberosV5
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationGSS
    | AuthenticationGSSContinue
    | AuthenticationSSPI
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)

_AUTH_DECODE: dict[int, Callable[[Buffer], AuthenticationMessage]] = {
    AuthenticationOk.CODE: AuthenticationOk.decode,
    AuthenticationKerberosV5.CODE: AuthenticationKerberosV5.decode,
    AuthenticationCleartextPassword.CODE: AuthenticationCleartextPassword.decode,
    AuthenticationMD5Password.CODE: AuthenticationMD5Password.decode,
    AuthenticationGSS.CODE: AuthenticationGSS.decode,
    AuthenticationGSSContinue.CODE: AuthenticationGSSContinue.decode,
    AuthenticationSSPI.CODE: AuthenticationSSPI.decode,
    AuthenticationSASL.CODE: AuthenticationSASL.decode,
    AuthenticationSASLContinue.CODE: AuthenticationSASLContinue.decode,
    AuthenticationSASLFinal.CODE: AuthenticationSASLFinal.decode,
}


def _decode_authentication(body: Buffer) -> AuthenticationMessage:
    if len(body) < 4:
        raise ProtocolError("invalid Authentication message: missing request code")
    code = _i32_from(body, 0)[0]
    decode = _AUTH_DECODE.get(code)
    if decode is None:
        raise ProtocolError(f"unsupported authentication request code {code}")
    return decode(body)


# --------------------------------------------------------------------------- backend: other


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    """A run-time parameter's current value (server_version, client_encoding, ...)."""

    name: str
    value: str
    TYPE: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return frame(self.TYPE, _enc(self.name) + _enc(self.value))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        name, pos = _cstr(b, 0)
        return cls(name, _last_cstr(b, pos))


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    """The backend's pid and cancel key: 4 bytes in protocol 3.0, up to 256 in 3.2."""

    pid: int
    secret: bytes
    TYPE: ClassVar[bytes] = b"K"

    def encode(self) -> bytes:
        if not 0 < len(self.secret) <= MAX_CANCEL_KEY_LENGTH:
            raise ProtocolError(f"invalid cancel key length {len(self.secret)}")
        try:
            return frame(self.TYPE, _pack_i32(self.pid) + bytes(self.secret))
        except struct.error as exc:
            raise ProtocolError(f"invalid BackendKeyData pid: {exc}") from exc

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        if not 4 < len(b) <= 4 + MAX_CANCEL_KEY_LENGTH:
            raise ProtocolError("invalid BackendKeyData message: bad cancel key length")
        return cls(_i32_from(b, 0)[0], b[4:])


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    """The server is idle; ``status`` is 'I' (idle), 'T' (in transaction) or 'E' (failed)."""

    status: str
    TYPE: ClassVar[bytes] = b"Z"

    def encode(self) -> bytes:
        return frame(self.TYPE, _byte1(self.status))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        if len(body) != 1 or body[0] not in b"ITE":
            raise ProtocolError("invalid ReadyForQuery message")
        return cls(chr(body[0]))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    """The columns of the rows that follow."""

    fields: tuple[FieldDescription, ...]
    TYPE: ClassVar[bytes] = b"T"

    def encode(self) -> bytes:
        parts = [_pack_u16(len(self.fields))]
        pack = _FIELD_TAIL.pack
        try:
            for f in self.fields:
                parts.append(_enc(f.name))
                parts.append(
                    pack(f.table_oid, f.column, f.type_oid, f.type_size, f.type_modifier, f.format)
                )
        except struct.error as exc:
            raise ProtocolError(f"invalid RowDescription field: {exc}") from exc
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        fields: list[FieldDescription] = []
        try:
            n = _u16_from(b, 0)[0]
            pos = 2
            for _ in range(n):
                name, pos = _cstr(b, pos)
                fields.append(FieldDescription(name, *_field_tail_from(b, pos)))
                pos += 18
        except struct.error as exc:
            raise _truncated(cls) from exc
        _end(b, pos)
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    """One result row; each value is bytes in its column's format, or None for NULL."""

    values: tuple[bytes | None, ...]
    TYPE: ClassVar[bytes] = b"D"

    def encode(self) -> bytes:
        try:
            return frame(self.TYPE, _pack_values(self.values))
        except struct.error as exc:
            raise ProtocolError(f"invalid DataRow: {exc}") from exc

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        try:
            values, pos = _values(b, 0)
        except struct.error as exc:
            raise _truncated(cls) from exc
        if pos != len(b):
            raise ProtocolError("invalid DataRow message: trailing bytes")
        return cls(values)


@dataclass(frozen=True, slots=True)
class CommandComplete(_Text):
    """A statement finished; ``tag`` is e.g. "SELECT 3" or "INSERT 0 1"."""

    tag: str
    TYPE: ClassVar[bytes] = b"C"

    def _text(self) -> str:
        return self.tag

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(_last_cstr(_as_bytes(body)))


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_Empty):
    """The query string was empty."""

    TYPE: ClassVar[bytes] = b"I"


@dataclass(frozen=True, slots=True)
class ParseComplete(_Empty):
    TYPE: ClassVar[bytes] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(_Empty):
    TYPE: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(_Empty):
    TYPE: ClassVar[bytes] = b"3"


@dataclass(frozen=True, slots=True)
class NoData(_Empty):
    """Describe of something that returns no rows."""

    TYPE: ClassVar[bytes] = b"n"


@dataclass(frozen=True, slots=True)
class PortalSuspended(_Empty):
    """Execute stopped at its row limit; the portal can be resumed."""

    TYPE: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    """The parameter types of a described statement."""

    type_oids: tuple[int, ...]
    TYPE: ClassVar[bytes] = b"t"

    def encode(self) -> bytes:
        n = len(self.type_oids)
        try:
            return frame(self.TYPE, _pack_u16(n) + struct.pack(f"!{n}I", *self.type_oids))
        except struct.error as exc:
            raise ProtocolError(f"invalid ParameterDescription: {exc}") from exc

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        if len(b) < 2:
            raise ProtocolError("invalid ParameterDescription message: missing count")
        n = _u16_from(b, 0)[0]
        if len(b) != 2 + 4 * n:
            raise ProtocolError("invalid ParameterDescription message: wrong length")
        return cls(struct.unpack_from(f"!{n}I", b, 2))


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    """A NOTIFY delivered to a listening session."""

    pid: int
    channel: str
    payload: str = ""
    TYPE: ClassVar[bytes] = b"A"

    def encode(self) -> bytes:
        try:
            head = _pack_i32(self.pid)
        except struct.error as exc:
            raise ProtocolError(f"invalid NotificationResponse pid: {exc}") from exc
        return frame(self.TYPE, head + _enc(self.channel) + _enc(self.payload))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        if len(b) < 4:
            raise ProtocolError("invalid NotificationResponse message: missing pid")
        channel, pos = _cstr(b, 4)
        return cls(_i32_from(b, 0)[0], channel, _last_cstr(b, pos))


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    """CopyIn/Out/BothResponse: overall format (0 text, 1 binary) and per-column formats."""

    format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        try:
            body = bytes((self.format,)) + _pack_i16_array(self.column_formats)
        except (ValueError, struct.error) as exc:
            raise ProtocolError(f"invalid {type(self).__name__}: {exc}") from exc
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        try:
            formats, pos = _i16_array(b, 1)
        except struct.error as exc:
            raise _truncated(cls) from exc
        _end(b, pos)
        return cls(b[0], formats)


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    """The server is ready for COPY FROM STDIN data."""

    TYPE: ClassVar[bytes] = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    """COPY TO STDOUT data follows."""

    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    """Streaming replication: COPY data flows both ways."""

    TYPE: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    """The result of a FunctionCall; None for NULL."""

    value: bytes | None
    TYPE: ClassVar[bytes] = b"V"

    def encode(self) -> bytes:
        if self.value is None:
            return frame(self.TYPE, b"\xff\xff\xff\xff")
        return frame(self.TYPE, _pack_i32(len(self.value)) + bytes(self.value))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        if len(b) < 4:
            raise ProtocolError("invalid FunctionCallResponse message: missing length")
        length = _i32_from(b, 0)[0]
        if length == -1 and len(b) == 4:
            return cls(None)
        if length != len(b) - 4:
            raise ProtocolError("invalid FunctionCallResponse message: wrong length")
        return cls(b[4:])


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    """The server's newest supported minor version and the ``_pq_.`` options it ignored."""

    newest_minor: int
    unrecognized: tuple[str, ...] = ()
    TYPE: ClassVar[bytes] = b"v"

    def encode(self) -> bytes:
        try:
            head = _I32_I32.pack(self.newest_minor, len(self.unrecognized))
        except struct.error as exc:
            raise ProtocolError(f"invalid NegotiateProtocolVersion: {exc}") from exc
        return frame(self.TYPE, head + b"".join(_enc(o) for o in self.unrecognized))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        if len(b) < 8:
            raise ProtocolError("invalid NegotiateProtocolVersion message: too short")
        minor, n = _I32_I32.unpack_from(b, 0)
        # Each option needs at least its NUL, which bounds n before we loop on it.
        if n < 0 or n > len(b) - 8:
            raise ProtocolError(f"invalid NegotiateProtocolVersion option count {n}")
        options: list[str] = []
        pos = 8
        for _ in range(n):
            option, pos = _cstr(b, pos)
            options.append(option)
        _end(b, pos)
        return cls(minor, tuple(options))


@dataclass(frozen=True, slots=True)
class _Fields(Message):
    """ErrorResponse and NoticeResponse: (field letter, value) pairs in the server's order."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def make(
        cls,
        code: str,
        message: str,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        """Build the fields PostgreSQL always sends (S, V, C, M) plus optional D and H."""
        fields = [("S", severity), ("V", severity), ("C", code), ("M", message)]
        if detail is not None:
            fields.append(("D", detail))
        if hint is not None:
            fields.append(("H", hint))
        return cls(tuple(fields))

    def get(self, field: str) -> str | None:
        """The value of the first field with this letter, or None."""
        for letter, value in self.fields:
            if letter == field:
                return value
        return None

    @property
    def code(self) -> str:
        """The SQLSTATE, or "" when the sender left it out."""
        return self.get("C") or ""

    @property
    def message(self) -> str:
        return self.get("M") or ""

    @property
    def severity(self) -> str:
        """The non-localized severity (V) when present, else the localized one (S)."""
        return self.get("V") or self.get("S") or ""

    def encode(self) -> bytes:
        parts = []
        for letter, value in self.fields:
            if letter == "\x00":
                raise ProtocolError("a NUL field type would end the field list early")
            parts.append(_byte1(letter))
            parts.append(_enc(value))
        parts.append(b"\x00")
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        b = _as_bytes(body)
        fields: list[tuple[str, str]] = []
        pos = 0
        size = len(b)
        while pos < size and b[pos] != 0:
            value, nxt = _cstr(b, pos + 1)
            fields.append((chr(b[pos]), value))
            pos = nxt
        if pos != size - 1:
            raise ProtocolError(f"invalid {cls.__name__} message: bad field list terminator")
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    """An error; the statement (and, for FATAL, the session) is over."""

    TYPE: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    """A warning or notice; processing goes on."""

    TYPE: ClassVar[bytes] = b"N"


# --------------------------------------------------------------------------- dispatch

FrontendMessage: TypeAlias = (
    Query
    | Parse
    | Bind
    | Execute
    | Describe
    | Close
    | Sync
    | Flush
    | Terminate
    | CopyData
    | CopyDone
    | CopyFail
    | FunctionCall
    | PasswordMessage
    | SASLInitialResponse
    | SASLResponse
    | GSSResponse
)

BackendMessage: TypeAlias = (
    AuthenticationMessage
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | RowDescription
    | DataRow
    | CommandComplete
    | EmptyQueryResponse
    | ParseComplete
    | BindComplete
    | CloseComplete
    | NoData
    | PortalSuspended
    | ParameterDescription
    | NotificationResponse
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
    | FunctionCallResponse
    | NegotiateProtocolVersion
    | ErrorResponse
    | NoticeResponse
)

_FRONTEND_DECODE: dict[int, Callable[[Buffer], FrontendMessage]] = {
    Query.TYPE[0]: Query.decode,
    Parse.TYPE[0]: Parse.decode,
    Bind.TYPE[0]: Bind.decode,
    Execute.TYPE[0]: Execute.decode,
    Describe.TYPE[0]: Describe.decode,
    Close.TYPE[0]: Close.decode,
    Sync.TYPE[0]: Sync.decode,
    Flush.TYPE[0]: Flush.decode,
    Terminate.TYPE[0]: Terminate.decode,
    CopyData.TYPE[0]: CopyData.decode,
    CopyDone.TYPE[0]: CopyDone.decode,
    CopyFail.TYPE[0]: CopyFail.decode,
    FunctionCall.TYPE[0]: FunctionCall.decode,
    PasswordMessage.TYPE[0]: PasswordMessage.decode,
}
_BACKEND_DECODE: dict[int, Callable[[Buffer], BackendMessage]] = {
    Authentication.TYPE[0]: _decode_authentication,
    ParameterStatus.TYPE[0]: ParameterStatus.decode,
    BackendKeyData.TYPE[0]: BackendKeyData.decode,
    ReadyForQuery.TYPE[0]: ReadyForQuery.decode,
    RowDescription.TYPE[0]: RowDescription.decode,
    DataRow.TYPE[0]: DataRow.decode,
    CommandComplete.TYPE[0]: CommandComplete.decode,
    EmptyQueryResponse.TYPE[0]: EmptyQueryResponse.decode,
    ParseComplete.TYPE[0]: ParseComplete.decode,
    BindComplete.TYPE[0]: BindComplete.decode,
    CloseComplete.TYPE[0]: CloseComplete.decode,
    NoData.TYPE[0]: NoData.decode,
    PortalSuspended.TYPE[0]: PortalSuspended.decode,
    ParameterDescription.TYPE[0]: ParameterDescription.decode,
    NotificationResponse.TYPE[0]: NotificationResponse.decode,
    CopyInResponse.TYPE[0]: CopyInResponse.decode,
    CopyOutResponse.TYPE[0]: CopyOutResponse.decode,
    CopyBothResponse.TYPE[0]: CopyBothResponse.decode,
    CopyData.TYPE[0]: CopyData.decode,
    CopyDone.TYPE[0]: CopyDone.decode,
    FunctionCallResponse.TYPE[0]: FunctionCallResponse.decode,
    NegotiateProtocolVersion.TYPE[0]: NegotiateProtocolVersion.decode,
    ErrorResponse.TYPE[0]: ErrorResponse.decode,
    NoticeResponse.TYPE[0]: NoticeResponse.decode,
}


def _type_name(type_byte: int) -> str:
    return repr(chr(type_byte)) if 0 <= type_byte <= 0xFF else repr(type_byte)


def decode_frontend(type_byte: int, body: Buffer) -> FrontendMessage:
    """Decode a client message. A 'p' comes back as :class:`PasswordMessage` (raw body)."""
    decode = _FRONTEND_DECODE.get(type_byte)
    if decode is None:
        raise ProtocolError(f"invalid frontend message type {_type_name(type_byte)}")
    return decode(body)


def decode_backend(type_byte: int, body: Buffer) -> BackendMessage:
    """Decode a server message."""
    decode = _BACKEND_DECODE.get(type_byte)
    if decode is None:
        raise ProtocolError(f"invalid backend message type {_type_name(type_byte)}")
    return decode(body)


def _lenient(text: str) -> bytes:
    """Encode proxy-made error text so that sending it can never fail or split a field."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.replace(b"\x00", b"\\0") + b"\x00"


def error_response(
    code: str, message: str, severity: str = "FATAL", detail: str | None = None
) -> bytes:
    """Encoded ErrorResponse for errors the proxy itself reports; never raises.

    Unlike :meth:`ErrorResponse.encode`, a NUL in the text is escaped rather than refused,
    because this runs on error paths where the text may quote client input.
    """
    sev = _lenient(severity)
    parts = [b"S", sev, b"V", sev, b"C", _lenient(code), b"M", _lenient(message)]
    if detail is not None:
        parts += (b"D", _lenient(detail))
    parts.append(b"\x00")
    return frame(b"E", b"".join(parts))
