"""The hash chain: canonical serialization, MACs, links, seals."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcloak.audit.chain import (
    GENESIS,
    Chain,
    ChainedRecord,
    canonical,
    compute_mac,
    mac_ok,
    make_chain_id,
)
from pgcloak.audit.events import SessionInfo, statement_event

KEY = bytes(range(32))
INFO = SessionInfo(session="s1", user="app", database="db", client="127.0.0.1:1", worker=0)


def _event(fp: str = "SELECT 1", ts: datetime | None = None) -> dict[str, object]:
    return statement_event(INFO, kind="select", fingerprint=fp, ts=ts)


def test_canonical_form_is_stable() -> None:
    obj = {"b": 1, "a": "é", "c": [1, 2.5, None, True], "d": {"z": 1, "y": "\u2028"}}
    assert canonical(obj) == '{"a":"é","b":1,"c":[1,2.5,null,true],"d":{"y":"\u2028","z":1}}'.encode()
    assert canonical(dict(reversed(list(obj.items())))) == canonical(obj)
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


def test_mac_is_hmac_sha256_of_the_canonical_record_without_mac() -> None:
    record = {"seq": 1, "chain": "c", "prev": GENESIS, "type": "seal", "mac": "ignored"}
    body = b'{"chain":"c","prev":"' + GENESIS.encode() + b'","seq":1,"type":"seal"}'
    assert compute_mac(KEY, record) == hmac.new(KEY, body, hashlib.sha256).hexdigest()
    # A fixed vector: changing the canonical form or the MAC would break old trails.
    assert compute_mac(KEY, record) == (
        "1bdfe5abb3baa922526def58e50a8817b33639ccba77d3dec4df0d582e64a3db"
    )


def test_chain_links_records() -> None:
    chain = Chain(KEY, "w0-test", worker=0)
    records = [chain.append(_event(f"SELECT {i}")) for i in range(5)]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].record["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after.record["prev"] == before.record["mac"]
    for r in records:
        assert r.chain == "w0-test"
        assert mac_ok(KEY, r.record)
        body = {k: v for k, v in r.record.items() if k != "mac"}
        assert r.line == canonical(body).decode()[:-1] + f',"mac":"{r.record["mac"]}"}}'
        assert "\n" not in r.line
        assert json.loads(r.line) == r.record
        assert ChainedRecord.from_line(r.line + "\n").record == r.record


def test_the_event_is_not_modified() -> None:
    event = _event()
    before = dict(event)
    Chain(KEY, "c").append(event)
    assert event == before


def test_chain_refuses_chain_fields_and_short_keys() -> None:
    chain = Chain(KEY, "c")
    event = _event()
    event["seq"] = 7
    with pytest.raises(ValueError):
        chain.append(event)
    with pytest.raises(ValueError):
        Chain(b"short", "c")


def test_any_change_breaks_the_mac() -> None:
    record = Chain(KEY, "c").append(_event()).record
    for field in ("user", "fingerprint", "seq", "prev", "chain", "ts"):
        changed = dict(record)
        changed[field] = "x" if not isinstance(record[field], int) else record[field] + 1
        assert not mac_ok(KEY, changed), field
    assert not mac_ok(b"another key of 32 bytes ........", record)
    assert not mac_ok(KEY, {k: v for k, v in record.items() if k != "mac"})


def test_seals_count_records_since_the_last_seal() -> None:
    chain = Chain(KEY, "c", worker=3)
    for _ in range(3):
        chain.append(_event())
    seal = chain.seal("periodic")
    assert seal.record["type"] == "seal" and seal.record["count"] == 3
    assert seal.record["worker"] == 3
    chain.append(_event())
    assert chain.seal("shutdown").record["count"] == 1
    assert chain.seal("shutdown").record["count"] == 0


def test_chain_id_names_worker_and_start() -> None:
    cid = make_chain_id(4, datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    assert cid.startswith("w4-20240501T120000.000000Z-")
    assert make_chain_id(None) != make_chain_id(None)


@given(
    fp=st.text(),
    user=st.one_of(st.none(), st.text()),
    rows=st.one_of(st.none(), st.integers(min_value=0, max_value=2**62)),
    ms=st.one_of(st.none(), st.floats(min_value=0, max_value=1e9, allow_nan=False)),
)
def test_lines_round_trip_and_verify(fp: str, user: str | None, rows: int | None, ms: float | None) -> None:
    # Lone surrogates cannot be written as UTF-8; the wire layer never produces them.
    fp = fp.encode("utf-8", "replace").decode("utf-8")
    if user is not None:
        user = user.encode("utf-8", "replace").decode("utf-8")
    info = SessionInfo(session="s", user=user)
    event = statement_event(info, kind="select", fingerprint=fp, rows=rows, duration_ms=ms)
    record = Chain(KEY, "c").append(event)
    parsed = json.loads(record.line)
    assert mac_ok(KEY, parsed)
    assert parsed == record.record


@pytest.mark.parametrize(
    "event",
    [
        # a dict in no particular key order, nested lookups with several keys
        {"type": "statement", "lookups": {"z.y.x": ["b"], "a.b": ["c", "a"]}, "id": "1",
         "fingerprint": 'SELECT "é" \\ \n\t\x00\x1f\u2028\ud7ff\U0001f600', "rows": 2**70,
         "duration_ms": 1e-7, "worker": None, "tls": True, "pii": [], "big": 1.5e300},
        {"ts": "t", "type": "seal", "count": 0, "reason": "shutdown", "worker": 3, "id": "x"},
        {"type": "statement", "b": -0.0, "a": 0.1 + 0.2, "c": [1, [2, {"k": None}]]},
    ],
)
def test_the_line_is_the_canonical_serialization(event: dict[str, object]) -> None:
    record = Chain(KEY, 'w0-"quoted"\\').append(event)
    body = {k: v for k, v in record.record.items() if k != "mac"}
    assert record.line.encode() == canonical(body)[:-1] + f',"mac":"{record.record["mac"]}"}}'.encode()
    assert mac_ok(KEY, json.loads(record.line))


@pytest.mark.parametrize(
    "bad",
    [{"x": float("nan")}, {"x": float("inf")}, {"x": "\ud800"}, {"x": object()}, {"x": {1, 2}}],
)
def test_an_unserializable_event_leaves_the_chain_as_it_was(bad: dict[str, object]) -> None:
    chain = Chain(KEY, "c")
    first = chain.append(_event())
    with pytest.raises((TypeError, ValueError)):
        chain.append({"type": "statement", **bad})
    cyclic: dict[str, object] = {"type": "statement"}
    cyclic["self"] = [cyclic]
    with pytest.raises(ValueError):
        chain.append(cyclic)
    second = chain.append(_event())
    assert (chain.next_seq, second.seq, second.record["prev"]) == (3, 2, first.record["mac"])
