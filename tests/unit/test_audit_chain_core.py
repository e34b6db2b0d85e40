"""The audit chain's loop in C (pgcloak/audit/_chain_core.c) against the Python loop.

The C loop takes the plain case and hands anything else back; the Python loop
(``Chain._completed_in_python``) is the reference. Both must write the same bytes, refuse
the same items with the same errors and leave the chain in the same state, whatever the
batch holds.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.audit import chain as chain_module
from pgcloak.audit.chain import ACCELERATED, Chain, ChainedRecord, mac_ok
from pgcloak.audit.events import InvalidEventError, SessionInfo
from pgcloak.audit.templates import StatementTemplate
from pgcloak.audit.verify import verify

KEY = bytes(range(32))
INFO = SessionInfo(session="7-1", user="app", database="shop", application_name="api", client="10.0.0.7:5100")
EMAIL = "public.users.email"
INDEX = "mV3cX0pQyqJ8rM2tTq9oXw"
POOL = "0123456789abcdef" * 16  # 8 event ids: batches draw new pools too


def test_the_c_loop_is_built_here() -> None:
    """CI builds it (setup.py): a silent fallback to Python would hide a broken build."""
    assert ACCELERATED
    assert issubclass(ChainedRecord, chain_module._core.Record)


def _draws() -> Any:
    """A deterministic stand-in for os.urandom's event-id pools, the same for both loops."""
    state = {"n": 0}

    def draw() -> str:
        state["n"] += 1
        return f"{state['n'] % 16:x}" * 64  # two ids a pool: the draw path runs often

    return draw


def _chain(name: str) -> Chain:
    chain = Chain(KEY, name)
    chain._ids.pool, chain._ids.pos = POOL, 0
    return chain


def _run(items: list[Any], *, python: bool) -> tuple[Chain, list[ChainedRecord], list[Exception]]:
    chain = _chain("w0-core")
    out: list[ChainedRecord] = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(chain_module._EventIds, "draw", staticmethod(_draws()))
        if python:
            refused = chain._completed_in_python(items, out)
        else:
            refused = chain.append_completed_many(items, out)
    return chain, out, refused


def _same(items: list[Any]) -> list[ChainedRecord]:
    c_chain, c_out, c_refused = _run(items, python=False)
    p_chain, p_out, p_refused = _run(items, python=True)
    for c_record, p_record in zip(c_out, p_out, strict=False):
        assert c_record.data.decode() == p_record.data.decode()
    assert len(c_out) == len(p_out)
    assert [(r.seq, r.chain, r.mac, r.ts, r.type) for r in c_out] == [
        (r.seq, r.chain, r.mac, r.ts, r.type) for r in p_out
    ]
    assert [type(e) for e in c_refused] == [type(e) for e in p_refused]
    assert [str(e) for e in c_refused if isinstance(e, InvalidEventError)] == [
        str(e) for e in p_refused if isinstance(e, InvalidEventError)
    ]
    assert (c_chain.next_seq, c_chain.prev, c_chain.since_seal, c_chain._ids.pos, c_chain._ids.pool) == (
        p_chain.next_seq,
        p_chain.prev,
        p_chain.since_seal,
        p_chain._ids.pos,
        p_chain._ids.pool,
    )
    return c_out


TEMPLATES = [
    StatementTemplate(INFO, kind="select", fingerprint="SELECT id FROM users WHERE email = ?", columns_read=[EMAIL]),
    StatementTemplate(INFO, kind="insert", fingerprint="INSERT INTO users (email) VALUES (?) — é ☃ 𝄞", columns_written=[EMAIL]),
    StatementTemplate(INFO, kind="select", fingerprint="SELECT '\udcff'"),  # not Unicode: refused
]

lookup_value = st.from_regex(r"\A[A-Za-z0-9_-]{16,40}\Z") | st.sampled_from(
    ["short", INDEX + "\n", INDEX + "é", "x" * 129, "alice@example.com", 7]
)
lookups = st.none() | st.dictionaries(
    st.sampled_from([EMAIL, "public.users.phone", "not a key id", 'app."Weird %s".col']),
    st.lists(lookup_value, max_size=3),
    max_size=2,
)
seconds = st.floats(0, 1e6) | st.sampled_from([math.nan, math.inf, -1.0, 1e10, 0.0, -0.0, 2.5e-7, 1.0005e-3])
item = st.tuples(
    st.sampled_from(TEMPLATES),
    lookups,
    st.floats(0, 1e6),  # started
    seconds,  # how long it ran
    st.integers(-(10**18), 9 * 10**18) | st.sampled_from([0, 1_700_000_000_000_000_000, 2**70]),
    st.none() | st.integers(-3, 10**12) | st.sampled_from([2**64, True, 1.0, "7"]),
    st.none() | st.sampled_from(["23505", "XX000", "40P01", "ABCDE\n", "abcde", "2350", "É2350", 23505]),
).map(lambda t: (t[0], t[1], t[2], t[2] + t[3], t[4], t[5], t[6]))
odd_item = st.sampled_from(
    [
        (TEMPLATES[0], None, 1.0),  # not a Completed
        [TEMPLATES[0], None, 1.0, 2.0, 0, 1, None],  # a list, not a tuple
        (TEMPLATES[0], None, 1, 2, 0, 1, None),  # int clock readings
        (TEMPLATES[0], None, 1.0, None, 0, 1, None),
        (object(), None, 1.0, 2.0, 0, 1, None),
    ]
)


@settings(max_examples=400, deadline=None)
@given(batch=st.lists(item | odd_item, max_size=12))
def test_the_c_loop_writes_what_the_python_loop_writes(batch: list[Any]) -> None:
    out = _same(batch)
    for record in out:
        assert mac_ok(KEY, json.loads(record.data))


def test_the_c_loop_takes_the_usual_batch_without_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inserts, lookups (one column, known key), failures and refusals: all in C."""
    Chain(KEY, "warm").append_completed_many([(TEMPLATES[0], {EMAIL: [INDEX]}, 1.0, 1.5, 0, 1, None)], [])

    def refuse(*args: object) -> list[Exception]:
        raise AssertionError("handed to the Python loop")

    items: list[Any] = [
        (TEMPLATES[1], None, 10.0, 10.25, 1_700_000_000_123_456_789, 1, None),
        (TEMPLATES[0], {EMAIL: [INDEX, INDEX[::-1]]}, 10.0, 10.001, 1_700_000_000_123_456_789, 0, None),
        (TEMPLATES[0], {EMAIL: ["alice@example.com"]}, 10.0, 10.001, 1_700_000_000_000_000_000, 0, None),
        (TEMPLATES[1], None, 10.0, 10.5, 1_700_000_000_000_000_000, None, "23505"),
        (TEMPLATES[1], None, 10.0, 9.0, 1_700_000_000_000_000_000, 1, None),
        (TEMPLATES[2], None, 10.0, 10.5, 1_700_000_000_000_000_000, 1, None),
    ]
    expected = _same(items)
    chain, out = _chain("w0-core"), []
    monkeypatch.setattr(Chain, "_completed_in_python", refuse)
    refused = chain.append_completed_many(items, out)
    assert [type(e) for e in refused] == [InvalidEventError, InvalidEventError, UnicodeEncodeError]
    assert "alice" not in str(refused[0])
    assert [r.seq for r in out] == [1, 2, 3]
    got = [json.loads(r.data) for r in out]
    assert [g["rows"] for g in got] == [1, 0, None] and got[2]["sqlstate"] == "23505"
    assert got[1]["lookups"] == {EMAIL: [INDEX, INDEX[::-1]]}
    assert [r.data.count(b"\n") for r in out] == [1, 1, 1] and len(out) == len(expected)
    assert verify([("trail", [r.line for r in out] + [chain.seal("shutdown").line])], KEY).ok  # type: ignore[arg-type]


def test_records_made_in_c_are_chained_records() -> None:
    chain = _chain("w0-rec")
    out: list[ChainedRecord] = []
    chain.append_completed_many([(TEMPLATES[0], {EMAIL: [INDEX]}, 1.0, 1.5, 0, 3, None)], out)
    (record,) = out
    assert type(record) is ChainedRecord
    assert record.line == record.data[:-1].decode() and record.record["rows"] == 3
    assert record.record["ts"] == record.ts == "1970-01-01T00:00:00.000000Z"
    assert (record.seq, record.type, record.chain, record.record["mac"]) == (1, "statement", "w0-rec", record.mac)
    record.mac = "changed"  # the fields stay plain, writable attributes (tests tamper with them)
    assert record.mac == "changed"
    del out, record
    gc.collect()


def test_a_sqlstate_or_lookup_ending_in_a_newline_is_refused() -> None:
    """``$`` in the old patterns matched before a final newline, which a line cannot hold."""
    chain = _chain("w0-nl")
    out: list[ChainedRecord] = []
    refused = chain._completed_in_python(
        [
            (TEMPLATES[1], None, 1.0, 1.5, 0, None, "ABCDE\n"),
            (TEMPLATES[0], {EMAIL: [INDEX + "\n"]}, 1.0, 1.5, 0, 1, None),
        ],
        out,
    )
    assert [str(e) for e in refused] == [
        "statement event: invalid value for field 'sqlstate'",
        "statement event: invalid value for field 'lookups'",
    ]
    assert out == []


@pytest.mark.parametrize("key", [bytes(range(16)), bytes(range(64)), bytes(range(65)), bytes(range(200))])
@pytest.mark.parametrize("message", [b"", b"{}", b"x" * 55, b"x" * 64, "é☃𝄞".encode() * 300])
def test_the_c_hmac_is_hmac_sha256(key: bytes, message: bytes) -> None:
    """Keys past the 64-byte block are hashed first (RFC 2104), as hmac.new does."""
    assert chain_module._core.Hmac(key).hexdigest(message) == hmac.new(key, message, hashlib.sha256).hexdigest()


def test_records_are_not_tracked_by_the_garbage_collector() -> None:
    out: list[ChainedRecord] = []
    _chain("w0-gc").append_completed_many([(TEMPLATES[0], None, 1.0, 1.5, 0, 3, None)], out)
    assert not gc.is_tracked(out[0])


def test_what_python_code_does_during_a_batch_cannot_pull_the_template_from_under_it() -> None:
    """Drawing event ids runs Python code in the middle of an item; here it gives the
    template new parts (freeing the old ones). The item is written with the parts it
    started with (found by review: the C loop had borrowed them)."""
    template = StatementTemplate(INFO, kind="select", fingerprint="SELECT 2", columns_read=[EMAIL])
    template.parts = tuple((p + "\x01")[:-1] for p in template.parts)  # held by the template alone
    first = template.parts

    class Ids:
        __slots__ = ("pool", "pos")

        def __init__(self) -> None:
            self.pool, self.pos = "", 0

        def draw(self) -> str:
            template.parts = tuple((p + "\x01")[:-1] for p in template.parts)
            junk = [tuple(range(i, i + 11)) for i in range(2100)]  # reuse the freed tuple's memory
            del junk
            return "ab" * 4096

    chain = Chain(KEY, "w0-parts")
    chain._ids = Ids()  # type: ignore[assignment]
    out: list[ChainedRecord] = []
    assert chain.append_completed_many([(template, None, 1.0, 1.5, 0, 1, None)], out) == []
    assert out[0].data.startswith(first[0].encode()) and mac_ok(KEY, json.loads(out[0].data))


def test_edge_cases_found_by_review_match_the_python_loop() -> None:
    odd_key = "public.users.em\udcffail"  # a key id that cannot be written: refused, not the batch's end
    items: list[Any] = [(TEMPLATES[0], {odd_key: [INDEX]}, 1.0, 1.5, 0, 1, None)] * 2
    items.append((TEMPLATES[0], {EMAIL: [INDEX]}, 1.0, 1.5, 0, 1, None))
    assert len(_same(items)) == 1
    for seq in (2**63 - 1, 2**63):  # past 64 bits: Python's, the same bytes
        c_chain, p_chain = Chain(KEY, "w0-big", next_seq=seq), Chain(KEY, "w0-big", next_seq=seq)
        c_out: list[ChainedRecord] = []
        p_out: list[ChainedRecord] = []
        batch = [(TEMPLATES[1], None, 1.0, 1.5, 0, 1, None)] * 2
        c_chain.append_completed_many(batch, c_out)
        p_chain._completed_in_python(batch, p_out)
        assert [r.seq for r in c_out] == [seq, seq + 1] == [r.seq for r in p_out]
        assert json.loads(c_out[1].data)["seq"] == seq + 1 and mac_ok(KEY, json.loads(c_out[1].data))
    with pytest.raises(ValueError, match="start"):
        chain_module._core.chain_completed(_chain("w0-x"), [], -1, [], [])
    with pytest.raises(TypeError):
        chain_module._core.configure(chain_module._core.Record, InvalidEventError, set(), {}, "x")


def test_durations_are_written_as_python_writes_them() -> None:
    """The C loop formats a duration by integer arithmetic instead of repr's algorithm:
    every whole-microsecond value must come out as repr(round(ms * 1000) / 1000) does."""
    rng = random.Random(23)
    seconds = [0.0, 5e-7, 4.999999e-7, 1.5e-6, 2.5e-6, 1e-3, 0.1, 0.123456789, 1.0, 59.9999995]
    seconds += [999_999_999.9999994, 999_999_999.999, 123_456_789.123456, 1e-9, 7e-6, 0.00105]
    seconds += [rng.uniform(0, 10 ** rng.randint(-6, 9)) for _ in range(3000)]
    seconds += [rng.randint(0, 10**15) / 1e9 for _ in range(1000)]  # whole microseconds and halves
    items = [(TEMPLATES[0], None, 0.0, s, 0, 1, None) for s in seconds]
    out = _same(items)
    assert len(out) == len(items)
    written = [r.data.split(b'"duration_ms":', 1)[1].split(b",", 1)[0] for r in out]
    assert written[:2] == [b"0.0", b"0.0"]
    assert written[5:9] == [b"1.0", b"100.0", b"123.457", b"1000.0"]
    assert written[10] == b"999999999999.999"


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["tuple", "dict", "str", "list", "tuple-subclass"]), max_size=12),
    start=st.integers(0, 14),
)
def test_where_a_run_of_statements_ends_is_found_as_python_finds_it(kinds: list[str], start: int) -> None:
    """The writer chains a batch's statements (tuples) in runs, between seals and dict events."""

    class Subclass(tuple[int, ...]):
        pass

    make = {"tuple": lambda: (1,), "dict": dict, "str": lambda: "periodic", "list": list, "tuple-subclass": lambda: Subclass((1,))}
    items = [make[k]() for k in kinds]
    expected = chain_module._tuple_run_end(items, start)
    assert chain_module._core.tuple_run_end(items, start) == expected
    assert expected == next((i for i in range(start, len(items)) if kinds[i] != "tuple"), len(items))


def test_a_run_end_refuses_what_the_writer_never_passes() -> None:
    with pytest.raises(ValueError):
        chain_module._core.tuple_run_end([], -1)
    with pytest.raises(ValueError):
        chain_module._tuple_run_end([], -1)
    with pytest.raises(TypeError):
        chain_module._core.tuple_run_end((), 0)
