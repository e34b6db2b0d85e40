"""Message and startup-packet codec: every message whole, split, and exact on the wire.

Modeled on h11's tests/test_io.py: a table of (message, expected behaviour) drives
round trips, byte-at-a-time framing and trailing-byte cases, and a few hand-written
byte strings pin the encoding to what PostgreSQL actually sends.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.wire import messages as m
from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import iter_messages, scan
from pgcloak.wire.startup import (
    CANCEL_REQUEST_CODE,
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)

LATIN1_NAME = "caf\udce9"  # b"caf\xe9": a LATIN1 client's bytes, not valid UTF-8

FRONTEND: list[m.FrontendMessage] = [
    m.Query("SELECT 1"),
    m.Query(""),
    m.Query(f"SELECT '{LATIN1_NAME}', 'żółw'"),
    m.Parse("", "SELECT $1, $2", (23, 4294967295)),
    m.Parse("stmt_1", "SELECT 1", ()),
    m.Bind("", "", (), (), ()),
    m.Bind("p1", "s1", (0, 1), (b"42", None, b"", b"\x00\xff"), (1,)),
    m.Execute("", 0),
    m.Execute("p1", -1),
    m.Execute("p1", 2147483647),
    m.Describe("S", "s1"),
    m.Describe("P", ""),
    m.Close("S", ""),
    m.Close("P", "p1"),
    m.Sync(),
    m.Flush(),
    m.Terminate(),
    m.CopyData(b"1\tsecret\n"),
    m.CopyData(b""),
    m.CopyDone(),
    m.CopyFail("client gave up"),
    m.FunctionCall(952, (1,), (b"\x00\x00\x00\x01", None), 1),
    m.FunctionCall(4294967295, (), (), 0),
    m.PasswordMessage(b"hunter2\x00"),
    m.PasswordMessage(b"n,,n=,r=abc"),
]

BACKEND: list[m.BackendMessage] = [
    m.AuthenticationOk(),
    m.AuthenticationKerberosV5(),
    m.AuthenticationCleartextPassword(),
    m.AuthenticationMD5Password(b"\x01\x02\xfe\xff"),
    m.AuthenticationGSS(),
    m.AuthenticationGSSContinue(b"token"),
    m.AuthenticationSSPI(),
    m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    m.AuthenticationSASL(()),
    m.AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096"),
    m.AuthenticationSASLFinal(b"v=c2lnbmF0dXJl"),
    m.ParameterStatus("server_version", "17.2"),
    m.ParameterStatus("application_name", ""),
    m.BackendKeyData(4242, b"\x00\x01\x02\x03"),
    m.BackendKeyData(-1, bytes(range(32))),
    m.ReadyForQuery("I"),
    m.ReadyForQuery("T"),
    m.ReadyForQuery("E"),
    m.RowDescription(()),
    m.RowDescription(
        (
            m.FieldDescription("id", 16384, 1, 23, 4, -1, 0),
            m.FieldDescription(LATIN1_NAME, 4294967295, -7, 25, -1, 65540, 1),
        )
    ),
    m.DataRow(()),
    m.DataRow((b"1", None, b"", "żółw".encode())),
    m.CommandComplete("SELECT 3"),
    m.CommandComplete("INSERT 0 1"),
    m.EmptyQueryResponse(),
    m.ParseComplete(),
    m.BindComplete(),
    m.CloseComplete(),
    m.NoData(),
    m.PortalSuspended(),
    m.ParameterDescription(()),
    m.ParameterDescription((23, 25, 4294967295)),
    m.NotificationResponse(77, "jobs", '{"id": 1}'),
    m.NotificationResponse(77, "jobs", ""),
    m.CopyInResponse(0, (0, 0)),
    m.CopyOutResponse(1, (1,)),
    m.CopyBothResponse(0, ()),
    m.CopyData(b"row\n"),
    m.CopyDone(),
    m.FunctionCallResponse(b"\x00\x00\x00\x2a"),
    m.FunctionCallResponse(b""),
    m.FunctionCallResponse(None),
    m.NegotiateProtocolVersion(0, ("_pq_.compression",)),
    m.NegotiateProtocolVersion(2, ()),
    m.ErrorResponse.make("42P01", 'relation "x" does not exist'),
    m.ErrorResponse.make("28P01", "auth failed", "FATAL", detail="d", hint="h"),
    m.ErrorResponse((("S", "ERROR"), ("C", "XX000"), ("M", LATIN1_NAME), ("\xff", "odd"))),
    m.ErrorResponse(()),
    m.NoticeResponse.make("01000", "just so you know", "WARNING"),
]

#: 'p' messages that only the session can tell apart; each decodes with its own class.
PASSWORD_LIKE: list[m.Message] = [
    m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"),
    m.SASLInitialResponse("SCRAM-SHA-256", b""),
    m.SASLInitialResponse("SCRAM-SHA-256", None),
    m.SASLResponse(b"c=biws,r=abc,p=xyz"),
    m.GSSResponse(b"\x60\x82token"),
    m.PasswordMessage.of("s3cret"),
]


def split(raw: bytes) -> tuple[int, bytes]:
    assert raw[1:5] == struct.pack("!I", len(raw) - 1)
    return raw[0], raw[5:]


def ids(msg: object) -> str:
    return type(msg).__name__


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", FRONTEND, ids=ids)
def test_frontend_round_trip(msg: m.FrontendMessage) -> None:
    raw = msg.encode()
    type_byte, body = split(raw)
    for buf in (body, memoryview(body), bytearray(body)):
        decoded = m.decode_frontend(type_byte, buf)
        assert decoded == msg
        assert decoded.encode() == raw
    assert type(msg).decode(body) == msg


@pytest.mark.parametrize("msg", BACKEND, ids=ids)
def test_backend_round_trip(msg: m.BackendMessage) -> None:
    raw = msg.encode()
    type_byte, body = split(raw)
    for buf in (body, memoryview(body), bytearray(body)):
        decoded = m.decode_backend(type_byte, buf)
        assert decoded == msg
        assert decoded.encode() == raw
    assert type(msg).decode(body) == msg


@pytest.mark.parametrize("msg", PASSWORD_LIKE, ids=ids)
def test_password_family_round_trip(msg: m.Message) -> None:
    raw = msg.encode()
    type_byte, body = split(raw)
    assert type_byte == ord("p")
    # The stream decoder cannot know the exchange: it hands back the raw body ...
    generic = m.decode_frontend(type_byte, body)
    assert generic == m.PasswordMessage(body)
    assert generic.encode() == raw
    # ... which the session re-decodes as what it expects.
    assert type(msg).decode(body) == msg
    assert type(msg).decode(memoryview(body)) == msg


def test_every_message_class_is_covered() -> None:
    covered = {type(x) for x in [*FRONTEND, *BACKEND, *PASSWORD_LIKE]}
    public = {
        cls
        for name, cls in vars(m).items()
        if isinstance(cls, type)
        and issubclass(cls, m.Message)
        and not name.startswith("_")
        and name not in {"Message", "Authentication"}
    }
    assert public - covered == set()


@pytest.mark.parametrize("msg", [*FRONTEND, *BACKEND, *PASSWORD_LIKE], ids=ids)
def test_messages_are_frozen_and_slotted(msg: m.Message) -> None:
    assert not hasattr(msg, "__dict__")
    fields = dataclasses.fields(msg)  # type: ignore[arg-type]
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, fields[0].name, None)


# --------------------------------------------------------------------------- exact bytes


def test_known_bytes() -> None:
    assert m.ReadyForQuery("I").encode() == b"Z\x00\x00\x00\x05I"
    assert m.Sync().encode() == b"S\x00\x00\x00\x04"
    assert m.Terminate().encode() == b"X\x00\x00\x00\x04"
    assert m.Query("SELECT 1").encode() == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert m.CommandComplete("SELECT 1").encode() == b"C\x00\x00\x00\x0dSELECT 1\x00"
    assert m.DataRow((b"1",)).encode() == b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"
    assert m.DataRow((None,)).encode() == b"D\x00\x00\x00\x0a\x00\x01\xff\xff\xff\xff"
    assert m.AuthenticationOk().encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.AuthenticationMD5Password(b"abcd").encode() == b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"
    assert m.Execute("", 0).encode() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert m.Describe("P", "").encode() == b"D\x00\x00\x00\x06P\x00"
    assert m.BackendKeyData(1, b"\x00\x00\x00\x02").encode() == (
        b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02"
    )


def test_known_row_description_select_1() -> None:
    # What PostgreSQL sends for `SELECT 1`.
    raw = (
        b"T\x00\x00\x00\x21\x00\x01?column?\x00"
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
    )
    msg = m.decode_backend(raw[0], raw[5:])
    assert msg == m.RowDescription((m.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),))
    assert msg.encode() == raw


def test_known_sasl_offer() -> None:
    raw = b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    msg = m.decode_backend(raw[0], raw[5:])
    assert msg == m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert msg.encode() == raw


def test_known_error_response_from_postgres() -> None:
    body = (
        b'SERROR\x00VERROR\x00C42P01\x00Mrelation "nope" does not exist\x00P15\x00'
        b"Fparse_relation.c\x00L1449\x00RparserOpenTable\x00\x00"
    )
    msg = m.decode_backend(ord("E"), body)
    assert isinstance(msg, m.ErrorResponse)
    assert msg.code == "42P01"
    assert msg.severity == "ERROR"
    assert msg.message == 'relation "nope" does not exist'
    assert msg.get("P") == "15"
    assert msg.get("D") is None
    assert msg.encode()[5:] == body


def test_bind_known_layout() -> None:
    raw = m.Bind("", "s", (1,), (b"\x00\x00\x00\x07", None), ()).encode()
    assert raw == (
        b"B\x00\x00\x00\x1b"
        b"\x00s\x00"  # portal "", statement "s"
        b"\x00\x01\x00\x01"  # one param format: binary
        b"\x00\x02\x00\x00\x00\x04\x00\x00\x00\x07\xff\xff\xff\xff"  # two values
        b"\x00\x00"  # no result formats
    )


def test_non_utf8_strings_survive_byte_for_byte() -> None:
    body = b"SELECT '\xe9t\xe9', '\x80\xff'\x00"  # LATIN1 bytes, invalid as UTF-8
    msg = m.decode_frontend(ord("Q"), body)
    assert isinstance(msg, m.Query)
    assert msg.encode()[5:] == body


# --------------------------------------------------------------------------- helpers and properties


def test_error_and_notice_accessors() -> None:
    err = m.ErrorResponse.make("23505", "duplicate key", detail="Key (id)=(1)", hint="h")
    assert err.fields == (
        ("S", "ERROR"),
        ("V", "ERROR"),
        ("C", "23505"),
        ("M", "duplicate key"),
        ("D", "Key (id)=(1)"),
        ("H", "h"),
    )
    assert (err.code, err.message, err.severity, err.get("D")) == (
        "23505",
        "duplicate key",
        "ERROR",
        "Key (id)=(1)",
    )
    localized = m.NoticeResponse((("S", "AVISO"), ("M", "x")))
    assert localized.severity == "AVISO"
    assert localized.code == ""
    notice: m.Message = m.NoticeResponse.make("01000", "x")
    assert notice != m.ErrorResponse.make("01000", "x")


def test_error_response_helper_matches_dataclass() -> None:
    assert (
        m.error_response("08P01", "bad") == m.ErrorResponse.make("08P01", "bad", "FATAL").encode()
    )
    assert m.error_response("28000", "no", "ERROR", detail="why") == (
        m.ErrorResponse.make("28000", "no", "ERROR", detail="why").encode()
    )


def test_error_response_helper_never_raises_and_never_splits_fields() -> None:
    raw = m.error_response("42000", "bad input 'a\x00Cinjected'\ud800 " + LATIN1_NAME)
    msg = m.decode_backend(raw[0], raw[5:])
    assert isinstance(msg, m.ErrorResponse)
    assert [letter for letter, _ in msg.fields] == ["S", "V", "C", "M"]
    assert msg.code == "42000"
    assert "\x00" not in msg.message


def test_password_message_helpers() -> None:
    msg = m.PasswordMessage.of("pässword")
    assert msg.data == "pässword".encode() + b"\x00"
    assert msg.password == "pässword"
    assert m.PasswordMessage(b"no-terminator").password == "no-terminator"
    with pytest.raises(ProtocolError):
        m.PasswordMessage.of("a\x00b")


@pytest.mark.parametrize(
    "build",
    [
        lambda: m.Query("a\x00b"),
        lambda: m.Query("\ud800"),
        lambda: m.Parse("", "x", (-1,)),
        lambda: m.Bind("", "", (70000,), (), ()),
        lambda: m.Describe("SP", ""),
        lambda: m.Close("ł", ""),
        lambda: m.ReadyForQuery(""),
        lambda: m.AuthenticationMD5Password(b"abc"),
        lambda: m.AuthenticationSASL(("",)),
        lambda: m.BackendKeyData(1, b""),
        lambda: m.BackendKeyData(1, b"x" * 257),
        lambda: m.BackendKeyData(2**31, b"abcd"),
        lambda: m.CopyInResponse(256, ()),
        lambda: m.ErrorResponse((("\x00", "x"),)),
        lambda: m.ErrorResponse((("CC", "x"),)),
        lambda: m.ParameterDescription((2**32,)),
        lambda: m.DataRow((b"x",) * 65536),
        lambda: m.NegotiateProtocolVersion(2**31, ()),
    ],
)
def test_encode_refuses_what_cannot_be_sent(build: Callable[[], m.Message]) -> None:
    with pytest.raises(ProtocolError):
        build().encode()


# --------------------------------------------------------------------------- malformed bodies

FRONT_BAD = [
    ("Q", b""),
    ("Q", b"SELECT 1"),
    ("Q", b"SELECT 1\x00x"),
    ("P", b"\x00SELECT 1\x00"),
    ("P", b"\x00SELECT 1\x00\x00\x01\x00\x00"),
    ("P", b"\x00SELECT 1\x00\x00\x00x"),
    ("B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
    ("B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05abc\x00\x00"),  # value overruns
    ("B", b"\x00\x00\x00\x01"),  # formats truncated
    ("B", b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"),  # trailing byte
    ("B", b"\x00"),
    ("E", b"\x00\x00\x00\x00"),
    ("E", b"\x00\x00\x00\x00\x00\x00"),
    ("D", b""),
    ("D", b"X\x00"),
    ("D", b"S"),
    ("C", b"Sname\x00more"),
    ("S", b"\x00"),
    ("H", b"x"),
    ("X", b"\x00"),
    ("c", b"\x00"),
    ("f", b"reason"),
    ("F", b"\x00\x00\x00\x01\x00\x00\x00\x00"),
    ("F", b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00"),
    ("F", b"\x00\x00"),
    ("Z", b""),
    ("\x00", b""),
]

BACK_BAD = [
    ("R", b""),
    ("R", b"\x00\x00\x00"),
    ("R", b"\x00\x00\x00\x00x"),  # Ok with data
    ("R", b"\x00\x00\x00\x01"),  # unknown code
    ("R", b"\xff\xff\xff\xff"),
    ("R", b"\x00\x00\x00\x05abc"),  # short salt
    ("R", b"\x00\x00\x00\x05abcde"),
    ("R", b"\x00\x00\x00\x0aSCRAM"),
    ("R", b"\x00\x00\x00\x0aSCRAM\x00"),
    ("R", b"\x00\x00\x00\x0aSCRAM\x00\x00x"),
    ("S", b"name\x00"),
    ("S", b"name\x00value\x00x"),
    ("K", b"\x00\x00\x00\x01"),
    ("K", b"\x00\x00" + b"x" * 300),
    ("Z", b""),
    ("Z", b"X"),
    ("Z", b"II"),
    ("T", b"\x00\x01id\x00" + b"\x00" * 17),
    ("T", b"\x00\x01id"),
    ("T", b"\x00\x00\x00"),
    ("T", b"\x00"),
    ("D", b""),
    ("D", b"\x00\x01\x00\x00\x00\x02a"),
    ("D", b"\x00\x01\x80\x00\x00\x00"),  # negative length other than -1
    ("D", b"\x00\x01\xff\xff\xff\xff\x00"),  # trailing
    ("D", b"\xff\xff"),  # 65535 columns announced, none present
    ("C", b"SELECT 1"),
    ("I", b"\x00"),
    ("1", b"x"),
    ("t", b"\x00\x01\x00\x00\x00"),
    ("t", b"\x00\x01\x00\x00\x00\x17\x00"),
    ("t", b"\x00"),
    ("A", b"\x00\x00\x00"),
    ("A", b"\x00\x00\x00\x01chan\x00"),
    ("G", b""),
    ("G", b"\x00\x00\x01"),
    ("H", b"\x00\x00\x01\x00\x00\x00"),
    ("V", b""),
    ("V", b"\x00\x00\x00\x05abc"),
    ("V", b"\xff\xff\xff\xffx"),
    ("V", b"\xff\xff\xff\xfe"),
    ("v", b"\x00\x00\x00\x00"),
    ("v", b"\x00\x00\x00\x00\xff\xff\xff\xff"),
    ("v", b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00"),
    ("v", b"\x00\x00\x00\x00\x7f\xff\xff\xff"),
    ("v", b"\x00\x00\x00\x00\x00\x00\x00\x00x"),
    ("E", b""),
    ("E", b"SERROR\x00"),
    ("E", b"SERROR"),
    ("E", b"\x00\x00"),
    ("N", b"Mx\x00\x00\x00"),
    ("Q", b""),
]


@pytest.mark.parametrize(("kind", "body"), FRONT_BAD)
def test_frontend_malformed(kind: str, body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_frontend(ord(kind), body)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(("kind", "body"), BACK_BAD)
def test_backend_malformed(kind: str, body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_backend(ord(kind), body)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (m.SASLInitialResponse, b"SCRAM-SHA-256"),
        (m.SASLInitialResponse, b"SCRAM-SHA-256\x00\x00\x00"),
        (m.SASLInitialResponse, b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc"),
        (m.SASLInitialResponse, b"SCRAM-SHA-256\x00\x00\x00\x00\x01abc"),
        (m.SASLInitialResponse, b"SCRAM-SHA-256\x00\xff\xff\xff\xffx"),
        (m.SASLInitialResponse, b"SCRAM-SHA-256\x00\xff\xff\xff\xfe"),
        (m.AuthenticationMD5Password, b"\x00\x00\x00\x03"),  # a subclass checks its code
        (m.AuthenticationOk, b"\x00\x00\x00\x03"),
        (m.AuthenticationSASLFinal, b"\x00\x00\x00\x0bdata"),
        (m.AuthenticationSASLContinue, b"\x00\x00"),
    ],
)
def test_specific_decoders_malformed(cls: type[m.Message], body: bytes) -> None:
    with pytest.raises(ProtocolError):
        cls.decode(body)


def test_authentication_base_dispatches() -> None:
    msg = m.Authentication.decode(b"\x00\x00\x00\x0bchallenge")
    assert msg == m.AuthenticationSASLContinue(b"challenge")


# --------------------------------------------------------------------------- startup packets


REAL_STARTUP = (
    b"\x00\x00\x00\x68\x00\x03\x00\x00"
    b"user\x00alice\x00database\x00shop\x00application_name\x00psql\x00"
    b"client_encoding\x00UTF8\x00options\x00-c search_path=app\x00\x00"
)


def test_real_startup_message() -> None:
    msg = decode_startup(REAL_STARTUP)
    assert isinstance(msg, StartupMessage)
    assert msg.protocol == PROTOCOL_3_0
    assert list(msg.params) == [
        "user",
        "database",
        "application_name",
        "client_encoding",
        "options",
    ]
    assert (msg.user, msg.database, msg.application_name) == ("alice", "shop", "psql")
    assert msg.params["options"] == "-c search_path=app"
    assert msg.encode() == REAL_STARTUP
    assert decode_startup(memoryview(REAL_STARTUP)) == msg


def test_startup_defaults() -> None:
    msg = StartupMessage({"user": "bob", "database": "", "replication": "database"})
    assert (msg.database, msg.application_name) == ("bob", "")
    assert msg.params["replication"] == "database"
    assert decode_startup(msg.encode()) == msg
    assert StartupMessage({"user": "u"}).encode() == (
        b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"
    )


def test_request_packets_exact_bytes() -> None:
    assert SSLRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert GSSENCRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert CancelRequest(77, b"\x00\x00\x00\x09").encode() == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x4d\x00\x00\x00\x09"
    )
    for packet in (SSLRequest(), GSSENCRequest(), CancelRequest(77, b"abcd")):
        assert decode_startup(packet.encode()) == packet


def test_cancel_request_protocol_3_2_long_key() -> None:
    msg = CancelRequest(12345, bytes(range(256)))
    assert decode_startup(msg.encode()) == msg
    with pytest.raises(ProtocolError):
        CancelRequest(1, bytes(257)).encode()
    with pytest.raises(ProtocolError):
        CancelRequest(1, b"").encode()


def startup(code: int, body: bytes) -> bytes:
    return struct.pack("!II", 8 + len(body), code) + body


@pytest.mark.parametrize(
    ("packet", "sqlstate"),
    [
        (b"", "08P01"),
        (b"\x00\x00\x00\x08\x00\x03", "08P01"),
        (b"\x00\x00\x00\x07\x00\x03\x00\x00", "08P01"),  # length below 8
        (b"\x00\x00\x00\x09\x00\x03\x00\x00\x00\x00", "08P01"),  # prefix disagrees
        (startup(PROTOCOL_3_0, b"user\x00alice\x00"), "08P01"),  # no terminator
        (startup(PROTOCOL_3_0, b"user\x00alice\x00\x00\x00"), "08P01"),
        (startup(PROTOCOL_3_0, b"user\x00\x00"), "08P01"),  # odd list
        (startup(PROTOCOL_3_0, b"user\x00alice"), "08P01"),
        (startup(PROTOCOL_3_0, b"user\x00a\x00user\x00b\x00\x00"), "08P01"),  # duplicate
        (startup(PROTOCOL_3_0, b""), "08P01"),
        (startup(PROTOCOL_3_0, b"\x00"), "28000"),  # no user
        (startup(PROTOCOL_3_0, b"database\x00x\x00\x00"), "28000"),
        (startup(PROTOCOL_3_0, b"user\x00\x00\x00"), "28000"),
        (startup(2 << 16, b"user\x00alice\x00\x00"), "0A000"),
        (startup(4 << 16, b"user\x00alice\x00\x00"), "0A000"),
        (startup((1234 << 16) | 5681, b""), "08P01"),  # unknown request code
        (startup(80877103, b"\x00"), "08P01"),  # SSLRequest with a body
        (startup(80877104, b"\x00"), "08P01"),
        (startup(CANCEL_REQUEST_CODE, b"\x00\x00\x00\x01"), "08P01"),  # no key
        (startup(CANCEL_REQUEST_CODE, b"\x00\x00"), "08P01"),
        (startup(CANCEL_REQUEST_CODE, b"\x00\x00\x00\x01" + bytes(257)), "08P01"),
        (startup(PROTOCOL_3_0, b"x" * 10_000 + b"\x00"), "08P01"),  # over the size limit
    ],
)
def test_startup_malformed(packet: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_startup(packet)
    assert info.value.sqlstate == sqlstate


def test_unsupported_protocol_message_is_postgres_like() -> None:
    with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 2\.0"):
        decode_startup(startup(2 << 16, b"user\x00alice\x00\x00"))


def test_startup_minor_versions_pass_through() -> None:
    msg = decode_startup(startup((3 << 16) | 2, b"user\x00a\x00_pq_.x\x00y\x00\x00"))
    assert isinstance(msg, StartupMessage)
    assert msg.protocol == 196610
    assert msg.params["_pq_.x"] == "y"


def test_startup_encode_refusals() -> None:
    for params in ({"user": "a\x00b"}, {"": "x"}, {"user": "\ud800"}):
        with pytest.raises(ProtocolError):
            StartupMessage(params).encode()


# --------------------------------------------------------------------------- streams (h11 style)


def feed(stream: bytes, chunk: int, decode: Callable[[int, bytes], m.Message]) -> list[m.Message]:
    """Push ``stream`` into a buffer ``chunk`` bytes at a time, decoding what completes."""
    buf = bytearray()
    out: list[m.Message] = []
    for i in range(0, len(stream), chunk):
        buf += stream[i : i + chunk]
        end = scan(buf, 1 << 20)
        out.extend(decode(t, bytes(buf[s:e])) for t, s, e in iter_messages(buf, 0, end))
        del buf[:end]
    assert not buf
    return out


@pytest.mark.parametrize(
    ("messages", "decode"),
    [(FRONTEND, m.decode_frontend), (BACKEND, m.decode_backend)],
    ids=["frontend", "backend"],
)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 16])
def test_stream_in_chunks(
    messages: list[m.Message], decode: Callable[[int, bytes], m.Message], chunk: int
) -> None:
    stream = b"".join(x.encode() for x in messages)
    assert feed(stream, chunk, decode) == messages


@pytest.mark.parametrize(
    ("messages", "decode"),
    [(FRONTEND, m.decode_frontend), (BACKEND, m.decode_backend)],
    ids=["frontend", "backend"],
)
def test_stream_with_trailing_partial_message(
    messages: list[m.Message], decode: Callable[[int, bytes], m.Message]
) -> None:
    whole = b"".join(x.encode() for x in messages)
    for msg in messages:
        raw = msg.encode()
        for cut in range(len(raw)):
            stream = whole + raw[:cut]
            end = scan(stream, 1 << 20)
            assert end == len(whole)
            # iter_messages alone also stops before the partial message.
            assert sum(1 for _ in iter_messages(stream)) == len(messages)
        stream = whole + raw[:-1]
        got = [
            decode(t, stream[s:e]) for t, s, e in iter_messages(stream, 0, scan(stream, 1 << 20))
        ]
        assert got == messages


# --------------------------------------------------------------------------- hypothesis

# Strings that can be on the wire: no NUL; lone surrogates only as surrogateescape bytes.
wire_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00")
    | st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)]),
    max_size=20,
)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
values = st.lists(st.none() | st.binary(max_size=20), max_size=12).map(tuple)
formats = st.lists(int16, max_size=6).map(tuple)

HYPO = settings(max_examples=80, deadline=None)


@HYPO
@given(wire_text, wire_text, formats, values, formats)
def test_bind_round_trip(
    portal: str,
    statement: str,
    pf: tuple[int, ...],
    params: tuple[bytes | None, ...],
    rf: tuple[int, ...],
) -> None:
    msg = m.Bind(portal, statement, pf, params, rf)
    raw = msg.encode()
    assert m.decode_frontend(raw[0], raw[5:]) == msg


@HYPO
@given(values)
def test_data_row_round_trip(row: tuple[bytes | None, ...]) -> None:
    msg = m.DataRow(row)
    raw = msg.encode()
    assert m.decode_backend(raw[0], memoryview(raw)[5:]) == msg


field_descriptions = st.builds(
    m.FieldDescription, wire_text, uint32, int16, uint32, int16, int32, int16
)


@HYPO
@given(st.lists(field_descriptions, max_size=8).map(tuple))
def test_row_description_round_trip(fields: tuple[m.FieldDescription, ...]) -> None:
    msg = m.RowDescription(fields)
    raw = msg.encode()
    assert m.decode_backend(raw[0], raw[5:]) == msg


@HYPO
@given(
    st.lists(
        st.tuples(st.characters(min_codepoint=1, max_codepoint=255), wire_text), max_size=10
    ).map(tuple),
    st.booleans(),
)
def test_error_notice_round_trip(fields: tuple[tuple[str, str], ...], notice: bool) -> None:
    msg = m.NoticeResponse(fields) if notice else m.ErrorResponse(fields)
    raw = msg.encode()
    assert m.decode_backend(raw[0], raw[5:]) == msg


@HYPO
@given(wire_text, wire_text, st.sampled_from(["ERROR", "FATAL", "PANIC"]), st.none() | wire_text)
def test_error_response_helper_round_trip(
    code: str, message: str, severity: str, detail: str | None
) -> None:
    raw = m.error_response(code, message, severity, detail)
    assert raw == m.ErrorResponse.make(code, message, severity, detail).encode()


param_names = wire_text.filter(lambda s: s != "")


@HYPO
@given(
    st.dictionaries(param_names, wire_text, max_size=8),
    wire_text.filter(bool),
    st.integers(0, 0xFFFF),
)
def test_startup_round_trip(params: dict[str, str], user: str, minor: int) -> None:
    params = {"user": user, **params} if "user" not in params else params
    if not params["user"]:
        params["user"] = user
    msg = StartupMessage(params, (3 << 16) | minor)
    raw = msg.encode()
    decoded = decode_startup(raw)
    assert decoded == msg
    assert isinstance(decoded, StartupMessage)
    assert list(decoded.params) == list(params)
    assert decoded.encode() == raw


@HYPO
@given(int32, st.binary(min_size=1, max_size=256))
def test_cancel_and_key_data_round_trip(pid: int, secret: bytes) -> None:
    assert decode_startup(CancelRequest(pid, secret).encode()) == CancelRequest(pid, secret)
    raw = m.BackendKeyData(pid, secret).encode()
    assert m.decode_backend(raw[0], raw[5:]) == m.BackendKeyData(pid, secret)


@HYPO
@given(st.binary(max_size=40))
def test_any_bytes_strings_round_trip(raw: bytes) -> None:
    """surrogateescape makes every byte string (minus NUL) survive decode/encode."""
    raw = raw.replace(b"\x00", b"")
    body = raw + b"\x00" + raw + b"\x00"
    msg = m.decode_backend(ord("S"), body)
    assert msg.encode()[5:] == body
