"""Framing: message boundaries from headers only, in whole, split and oversized buffers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import (
    DEFAULT_MAX_MESSAGE,
    MAX_STARTUP_PACKET,
    frame,
    iter_messages,
    scan,
    scan_marked,
    startup_packet_length,
)

MSGS = [
    frame(b"Q", b"SELECT 1\x00"),
    frame(b"S", b""),
    frame(b"D", b"\x00\x01\x00\x00\x00\x03abc"),
    frame(b"Z", b"I"),
]
STREAM = b"".join(MSGS)


def header(type_byte: bytes, length: int) -> bytes:
    return type_byte + struct.pack("!I", length)


def test_frame_layout() -> None:
    assert frame(b"Z", b"I") == b"Z\x00\x00\x00\x05I"
    assert frame(b"S", b"") == b"S\x00\x00\x00\x04"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_scan_and_iter_whole_stream(kind: type) -> None:
    buf = kind(STREAM)
    assert scan(buf, DEFAULT_MAX_MESSAGE) == len(STREAM)
    spans = list(iter_messages(buf))
    assert [bytes(STREAM[s - 5 : e]) for _, s, e in spans] == MSGS
    assert [t for t, _, _ in spans] == [ord("Q"), ord("S"), ord("D"), ord("Z")]


def test_scan_empty_and_partial_headers() -> None:
    assert scan(b"", 100) == 0
    for cut in range(1, 5):
        assert scan(STREAM[:cut], 100) == 0
    assert list(iter_messages(STREAM[:4])) == []


def test_scan_stops_at_every_partial_message() -> None:
    offsets = [0]
    for raw in MSGS:
        offsets.append(offsets[-1] + len(raw))
    for cut in range(len(STREAM) + 1):
        expected = max(o for o in offsets if o <= cut)
        assert scan(STREAM[:cut], 100) == expected
        assert sum(1 for _ in iter_messages(STREAM[:cut])) == offsets.index(expected)


def test_iter_messages_window() -> None:
    first, second = len(MSGS[0]), len(MSGS[0]) + len(MSGS[1])
    spans = list(iter_messages(STREAM, first, second))
    assert spans == [(ord("S"), first + 5, second)]
    # An end inside a message yields nothing for it.
    assert list(iter_messages(STREAM, 0, first - 1)) == []


def test_byte_at_a_time() -> None:
    buf = bytearray()
    got: list[bytes] = []
    for i in range(len(STREAM)):
        buf += STREAM[i : i + 1]
        end = scan(buf, 100)
        got.extend(bytes(buf[s - 5 : e]) for _, s, e in iter_messages(buf, 0, end))
        del buf[:end]
    assert got == MSGS
    assert not buf


def test_length_over_max_raises_with_only_the_header() -> None:
    with pytest.raises(ProtocolError) as info:
        scan(header(b"D", 1001), 1000)
    assert info.value.sqlstate == "08P01"
    assert "1001" in info.value.message
    # Exactly the maximum is fine: it just waits for the body.
    assert scan(header(b"D", 1000), 1000) == 0


def test_length_over_max_after_complete_messages() -> None:
    with pytest.raises(ProtocolError):
        scan(STREAM + header(b"D", DEFAULT_MAX_MESSAGE + 1), DEFAULT_MAX_MESSAGE)


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_raises(length: int) -> None:
    with pytest.raises(ProtocolError):
        scan(header(b"Q", length), 100)


def test_huge_unsigned_length_raises() -> None:
    with pytest.raises(ProtocolError):
        scan(b"Q\xff\xff\xff\xff", DEFAULT_MAX_MESSAGE)


def test_startup_packet_length() -> None:
    assert startup_packet_length(b"") is None
    assert startup_packet_length(b"\x00\x00\x00") is None
    assert startup_packet_length(b"\x00\x00\x00\x08") == 8
    assert startup_packet_length(struct.pack("!I", MAX_STARTUP_PACKET)) == MAX_STARTUP_PACKET
    for bad in (0, 4, 7, MAX_STARTUP_PACKET + 1, 2**32 - 1):
        with pytest.raises(ProtocolError) as info:
            startup_packet_length(struct.pack("!I", bad))
        assert info.value.sqlstate == "08P01"
        assert "startup packet" in info.value.message


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0x20, 0x7E), st.binary(max_size=30)), min_size=0, max_size=10),
    st.lists(st.integers(1, 9), min_size=1, max_size=20),
)
def test_any_chunking_yields_the_same_messages(
    parts: list[tuple[int, bytes]], chunks: list[int]
) -> None:
    msgs = [frame(bytes((t,)), body) for t, body in parts]
    stream = b"".join(msgs)
    buf = bytearray()
    got: list[tuple[int, bytes]] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = chunks[i % len(chunks)]
        i += 1
        buf += stream[pos : pos + step]
        pos += step
        end = scan(buf, 1000)
        got.extend((t, bytes(buf[s:e])) for t, s, e in iter_messages(buf, 0, end))
        del buf[:end]
    assert got == parts
    assert not buf


_KINDS = st.sampled_from([b"D", b"C", b"Z", b"2", b"T", b"E", b"N"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_KINDS, st.binary(max_size=12)), max_size=12),
    st.integers(0, 5),
)
def test_scan_marked_lists_what_a_full_walk_finds(messages: list[tuple[bytes, bytes]], cut: int) -> None:
    whole = b"".join(frame(t, body) for t, body in messages)
    buf = whole[: len(whole) - cut] if cut else whole
    marked = frozenset(b"CZE")
    end, marks, tail = scan_marked(buf, DEFAULT_MAX_MESSAGE, marked)
    assert end == scan(buf, DEFAULT_MAX_MESSAGE)
    expected = []
    rows = 0
    for kind, start, stop in iter_messages(buf, 0, end):
        if kind == ord("D"):
            rows += 1
        elif kind in marked:
            expected.append((kind, start - 5, stop, rows))
            rows = 0
    assert (marks, tail) == (expected, rows)


def test_scan_marked_refuses_a_bad_length_like_scan() -> None:
    with pytest.raises(ProtocolError):
        scan_marked(frame(b"C", b"SELECT 1\x00") + header(b"D", 2), DEFAULT_MAX_MESSAGE, frozenset(b"C"))
