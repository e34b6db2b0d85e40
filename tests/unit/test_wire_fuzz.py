"""Fuzz properties: whatever bytes a peer sends, only ProtocolError escapes the codec.

The session catches exactly one exception type to answer 08P01 and close; an
IndexError or struct.error from a crafted message would instead kill the task
without a reply, so these properties guard that contract.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcloak.wire import messages as m
from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import iter_messages, scan
from pgcloak.wire.startup import CANCEL_REQUEST_CODE, PROTOCOL_3_0, decode_startup

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FRONT_TYPES = sorted(set(b"QPBEDCSHXdcfFp"))
BACK_TYPES = sorted(set(b"RSKZTDCI123nstAGHWdcVvEN"))
ALL_TYPES = sorted(set(FRONT_TYPES) | set(BACK_TYPES) | set(b"\x00zY"))

#: Valid seeds for mutation: a malformed variant of a real message reaches deeper code
#: than random bytes do.
SEEDS: list[tuple[int, bytes]] = [
    (ord(raw[:1]), raw[5:])
    for raw in (
        m.Bind("p", "s", (0, 1), (b"abc", None, b""), (1, 0)).encode(),
        m.Parse("s", "SELECT $1", (23, 25)).encode(),
        m.Execute("p", 10).encode(),
        m.Describe("S", "s").encode(),
        m.FunctionCall(1, (1,), (b"xy", None), 1).encode(),
        m.RowDescription((m.FieldDescription("a", 1, 1, 23, 4, -1, 0),) * 2).encode(),
        m.DataRow((b"1", None, b"abc")).encode(),
        m.ErrorResponse.make("42P01", "nope", detail="d").encode(),
        m.AuthenticationSASL(("SCRAM-SHA-256",)).encode(),
        m.AuthenticationMD5Password(b"salt").encode(),
        m.NegotiateProtocolVersion(2, ("_pq_.a", "_pq_.b")).encode(),
        m.ParameterDescription((23, 25)).encode(),
        m.CopyOutResponse(0, (0, 0)).encode(),
        m.NotificationResponse(1, "c", "p").encode(),
        m.FunctionCallResponse(b"x").encode(),
        m.BackendKeyData(1, b"abcd").encode(),
        m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x").encode(),
    )
]


def decode_both(type_byte: int, body: bytes | memoryview) -> None:
    """Decode as either side; whatever decodes must re-encode to the very same bytes."""
    for decode in (m.decode_frontend, m.decode_backend):
        try:
            msg = decode(type_byte, body)
        except ProtocolError:
            continue
        assert msg.encode()[5:] == bytes(body)


def decode_p_family(body: bytes) -> None:
    decoders: list[Callable[[bytes], m.Message]] = [
        m.SASLInitialResponse.decode,
        m.SASLResponse.decode,
        m.GSSResponse.decode,
        m.Authentication.decode,
    ]
    for decode in decoders:
        try:
            msg = decode(body)
        except ProtocolError:
            continue
        assert msg.encode()[5:] == body


@FUZZ
@given(st.binary(max_size=200))
def test_random_stream_through_scan_and_decoders(data: bytes) -> None:
    try:
        end = scan(data, 64)
    except ProtocolError:
        return
    view = memoryview(data)
    for type_byte, start, stop in iter_messages(data, 0, end):
        decode_both(type_byte, view[start:stop])


@FUZZ
@given(st.sampled_from(ALL_TYPES), st.binary(max_size=64))
def test_random_body_for_every_type(type_byte: int, body: bytes) -> None:
    decode_both(type_byte, body)
    decode_p_family(body)


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.integers(0, 200),
    st.binary(max_size=4),
)
def test_mutated_valid_messages(
    seed: tuple[int, bytes], flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    type_byte, body = seed
    mutated = bytearray(body)
    for pos, value in flips:
        if mutated:
            mutated[pos % len(mutated)] = value
    for candidate in (bytes(mutated), bytes(mutated[:cut]), bytes(mutated) + tail):
        decode_both(type_byte, candidate)
        decode_p_family(candidate)


@FUZZ
@given(st.binary(max_size=80))
def test_random_startup_packets(data: bytes) -> None:
    for packet in (
        data,
        struct.pack("!I", len(data) + 4) + data,
        struct.pack("!II", len(data) + 8, PROTOCOL_3_0) + data,
        struct.pack("!II", len(data) + 8, CANCEL_REQUEST_CODE) + data,
    ):
        with contextlib.suppress(ProtocolError):
            decode_startup(packet)


@FUZZ
@given(st.lists(st.binary(max_size=12), max_size=8), st.integers(0, 3))
def test_startup_shaped_packets(fields: list[bytes], extra_nuls: int) -> None:
    body = b"".join(f + b"\x00" for f in fields) + b"\x00" * extra_nuls
    packet = struct.pack("!II", len(body) + 8, PROTOCOL_3_0) + body
    with contextlib.suppress(ProtocolError):
        decode_startup(packet)
