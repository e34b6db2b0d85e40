"""Audit events: exact field sets, no place for a literal value, validation."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.audit.events import (
    COMMON_FIELDS,
    BuiltEvent,
    InvalidEventError,
    SessionInfo,
    connection_event,
    format_ts,
    gap_event,
    now_ts,
    refusal_event,
    seal_event,
    should_record,
    statement_event,
    validate_event,
)
from pgcloak.audit.log import AuditLog
from pgcloak.audit.templates import StatementTemplate
from pgcloak.audit.verify import verify
from pgcloak.policy import Audit

INFO = SessionInfo(
    session="s-1", user="app", database="appdb", application_name="psql",
    client="127.0.0.1:5555", worker=2,
)
IDX = "Qm9ndXNJbmRleFZhbHVlMQ"  # shaped like a blind index (22 base64url chars)
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _statement(**kw: object) -> dict[str, object]:
    args: dict[str, object] = {
        "kind": "select",
        "fingerprint": "SELECT id FROM users WHERE email = $1",
        "tables": ["public.users"],
        "columns_read": ["public.users.email"],
        "lookups": {"public.users.email": [IDX]},
        "rows": 1,
        "duration_ms": 1.2345,
    }
    args.update(kw)
    event = statement_event(INFO, **args)  # type: ignore[arg-type]
    validate_event(event)
    return event


def test_statement_event_has_exactly_the_documented_fields() -> None:
    event = _statement()
    assert set(event) == set(COMMON_FIELDS) | {
        "kind", "fingerprint", "tables", "columns_read", "columns_written", "pii",
        "masked", "lookups", "rows", "decision", "reason", "sqlstate", "duration_ms",
    }
    assert event["type"] == "statement"
    assert event["masked"] == []  # every column read was revealed
    assert TS_RE.match(event["ts"])
    assert re.fullmatch(r"[0-9a-f]{32}", event["id"])
    assert event["pii"] == ["public.users.email"]  # defaults to columns read + written
    assert event["duration_ms"] in (1.234, 1.235)  # rounded to microseconds
    assert (event["session"], event["user"], event["worker"]) == ("s-1", "app", 2)
    assert event["decision"] == "allow"


def test_event_ids_are_unique_and_ts_is_utc_with_microseconds() -> None:
    ids = {_statement()["id"] for _ in range(200)}
    assert len(ids) == 200
    when = datetime(2024, 5, 1, 12, 0, 0, 123, tzinfo=UTC)
    assert _statement(ts=when)["ts"] == "2024-05-01T12:00:00.000123Z"


def test_connection_events() -> None:
    ok = connection_event(INFO, action="authenticated", tls=True)
    assert ok["type"] == "connection" and ok["action"] == "authenticated" and ok["tls"] is True
    bye = connection_event(
        INFO, action="disconnected", tls=False, duration_ms=12.5, bytes_in=100, bytes_out=2000,
        statements=3,
    )
    assert (bye["bytes_in"], bye["bytes_out"], bye["statements"]) == (100, 2000, 3)
    failed = connection_event(INFO, action="auth_failed", tls=True, sqlstate="28P01",
                              reason="password authentication failed")
    assert failed["sqlstate"] == "28P01"
    for event in (ok, bye, failed):
        validate_event(event)
    with pytest.raises(InvalidEventError):
        validate_event(connection_event(INFO, action="bogus", tls=True))  # type: ignore[arg-type]


def test_refusal_is_always_deny() -> None:
    event = refusal_event(INFO, kind="select", fingerprint="SELECT ssn FROM users",
                          reason="unbounded select of PII", sqlstate="42501",
                          columns_read=["public.users.ssn"])
    assert event["type"] == "refusal" and event["decision"] == "deny" and event["rows"] is None
    event["decision"] = "allow"
    with pytest.raises(InvalidEventError):
        validate_event(event)


def test_builders_have_no_parameter_for_a_value() -> None:
    with pytest.raises(TypeError):
        statement_event(INFO, kind="select", fingerprint="x", value="alice@example.com")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        statement_event(INFO, kind="select", fingerprint="x", params=["alice@example.com"])  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        connection_event(INFO, action="authenticated", tls=True, password="pw")  # type: ignore[call-arg]


@pytest.mark.parametrize("field", ["value", "values", "params", "literal", "sql", "row"])
def test_unknown_fields_are_refused_without_echoing_the_value(field: str) -> None:
    event = _statement()
    event[field] = "alice@example.com"
    with pytest.raises(InvalidEventError) as info:
        validate_event(event)
    assert field in str(info.value)
    assert "alice" not in str(info.value)


@pytest.mark.parametrize("field", ["seq", "chain", "prev", "mac"])
def test_chain_fields_are_refused(field: str) -> None:
    event = _statement()
    event[field] = 1
    with pytest.raises(InvalidEventError):
        validate_event(event)


@pytest.mark.parametrize(
    "plaintext", ["alice@example.com", "+1 555 0100", "5550100", "123-45-6789", "alice", ""]
)
def test_lookups_only_take_blind_index_shaped_values(plaintext: str) -> None:
    with pytest.raises(InvalidEventError) as info:
        _statement(lookups={"public.users.email": [plaintext]})
    assert plaintext not in str(info.value) or plaintext == ""


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("rows", -1),
        ("rows", "3"),
        ("rows", True),
        ("duration_ms", float("nan")),
        ("kind", "SELECT"),
        ("columns_read", ["email"]),  # not a key id
        ("columns_read", "public.users.email"),  # not a list
        ("masked", ["email"]),  # not a key id
        ("masked", None),
        ("tables", [""]),
        ("sqlstate", "bad"),
        ("ts", "2024-05-01 12:00:00"),
        ("worker", -1),
    ],
)
def test_wrong_types_are_refused(field: str, bad: object) -> None:
    event = _statement()
    event[field] = bad
    with pytest.raises(InvalidEventError, match=field):
        validate_event(event)


def test_missing_field_is_refused() -> None:
    event = _statement()
    del event["rows"]
    with pytest.raises(InvalidEventError, match="missing"):
        validate_event(event)
    with pytest.raises(InvalidEventError, match="type"):
        validate_event({"type": "nonsense"})


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(InvalidEventError):
        _statement(ts=datetime(2024, 1, 1))


def test_system_events() -> None:
    now = datetime.now(UTC)
    gap = gap_event(count=3, worker=None, first_ts=now, last_ts=now)
    assert gap["type"] == "gap" and gap["count"] == 3 and "session" not in gap
    seal = seal_event(reason="shutdown", count=0, worker=1)
    assert seal["type"] == "seal" and seal["reason"] == "shutdown"
    validate_event(gap)
    validate_event(seal)
    with pytest.raises(InvalidEventError):
        validate_event(gap_event(count=0, worker=None, first_ts=now, last_ts=now))


@pytest.mark.parametrize(
    ("mode", "kind", "pii", "expected"),
    [
        ("pii", "select", True, True),
        ("pii", "insert", False, False),
        ("writes", "insert", False, True),
        ("writes", "select", False, False),
        ("writes", "select", True, True),
        ("all", "select", False, True),
    ],
)
def test_should_record(mode: str, kind: str, pii: bool, expected: bool) -> None:
    assert should_record(mode, kind, pii) is expected  # type: ignore[arg-type]


# --------------------------------------------------------------------------- vouching
# The builders vouch for the events they make (emit() then skips validating them); an
# event that was changed, or built from a bad argument, is validated like any dict.


def _log(tmp_path: Path) -> AuditLog:
    """An AuditLog that is never started: emit() only queues."""
    return AuditLog(Audit(sink=f"file:{tmp_path}/audit.jsonl"), bytes(range(32)))


def test_builders_vouch_for_what_they_build() -> None:
    now = datetime.now(UTC)
    for event in (
        _statement(),
        _statement(lookups={"public.users.email": [IDX], "public.users.phone": [IDX]}),
        refusal_event(INFO, kind="select", fingerprint="x", reason="r", sqlstate="42501"),
        connection_event(INFO, action="disconnected", tls=False, duration_ms=3.5, bytes_in=1,
                         bytes_out=2, statements=0, ts=now),
        statement_event(SessionInfo(session="s"), kind="insert", fingerprint="",
                        columns_written=["public.users.email"], rows=0, sqlstate="23505"),
    ):
        assert isinstance(event, BuiltEvent) and event.vouched, event
        assert list(event) == sorted(event)  # insertion order: the canonical sort is one pass
        validate_event(event)


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e.__setitem__("value", "alice@example.com"),
        lambda e: e.__setitem__("rows", 2),
        lambda e: e.__delitem__("rows"),
        lambda e: e.update(value="alice@example.com"),
        lambda e: e.setdefault("value", "alice@example.com"),
        lambda e: e.pop("rows"),
        lambda e: e.popitem(),
        lambda e: e.__ior__({"value": "alice@example.com"}),
        lambda e: e.clear(),
    ],
)
def test_changing_a_built_event_withdraws_the_vouching(change: Any, tmp_path: Path) -> None:
    event = _statement()
    change(event)
    assert isinstance(event, BuiltEvent) and not event.vouched
    log = _log(tmp_path)
    if set(event) == set(_statement()) and event.get("rows") == 2:
        log.emit(event)  # still valid: validated, then taken
        assert log.queue_depth == 1
    else:
        with pytest.raises(InvalidEventError):
            log.emit(event)
        assert log.queue_depth == 0 and log.metrics.emitted == 0


def test_copies_of_a_built_event_are_plain_dicts() -> None:
    event = _statement()
    for copy in (dict(event), event.copy(), event | {}, {**event}):
        assert type(copy) is dict and copy == event


def test_a_bad_argument_is_not_vouched_for_and_emit_refuses_it(tmp_path: Path) -> None:
    log = _log(tmp_path)
    bad = [
        statement_event(INFO, kind="select", fingerprint="x",
                        lookups={"public.users.email": ["alice@example.com"]}),
        statement_event(INFO, kind="SELECT", fingerprint="x"),
        statement_event(INFO, kind="select", fingerprint="x", columns_read=["email"]),
        statement_event(INFO, kind="select", fingerprint="x", rows=-1),
        statement_event(INFO, kind="select", fingerprint="x", rows=True),
        statement_event(INFO, kind="select", fingerprint="x", duration_ms=float("nan")),
        statement_event(INFO, kind="select", fingerprint="x", sqlstate="bad"),
        statement_event(INFO, kind="select", fingerprint="x", decision="maybe"),  # type: ignore[arg-type]
        statement_event(INFO, kind="select", fingerprint="x", tables=[""]),
        statement_event(SessionInfo(session="s", worker=-1), kind="select", fingerprint="x"),
        statement_event(SessionInfo(session="s", user=7), kind="select", fingerprint="x"),  # type: ignore[arg-type]
        connection_event(INFO, action="bogus", tls=True),  # type: ignore[arg-type]
        connection_event(INFO, action="authenticated", tls=1),  # type: ignore[arg-type]
        connection_event(INFO, action="disconnected", tls=True, bytes_in=-5),
    ]
    for event in bad:
        assert isinstance(event, BuiltEvent) and not event.vouched, event
        with pytest.raises(InvalidEventError) as info:
            log.emit(event)
        assert "alice" not in str(info.value)
    assert log.queue_depth == 0 and log.metrics.emitted == 0


def test_an_emitted_event_is_frozen(tmp_path: Path) -> None:
    log = _log(tmp_path)
    event = _statement()
    log.emit(event)
    assert isinstance(event, BuiltEvent) and not event.vouched
    with pytest.raises(TypeError):
        event["value"] = "alice@example.com"
    with pytest.raises(TypeError):
        del event["rows"]
    with pytest.raises(TypeError):
        event.update(rows=3)
    assert "value" not in event and event["rows"] == 1
    log.emit(event)  # again: validated (it still is valid) and copied
    assert log.queue_depth == 2 and log.metrics.emitted == 2


def _bad_or(good: st.SearchStrategy[Any], *bad: Any) -> st.SearchStrategy[Any]:
    return st.one_of(good, st.sampled_from(bad))


_TEXT = st.one_of(st.none(), st.text(max_size=8))
_KEY_IDS = st.lists(
    _bad_or(st.sampled_from(["public.users.email", "users.phone", "a.b.c.d"]),
            "email", "", "a..b", 3, None, "x" * 70 + ".y"),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    user=_bad_or(_TEXT, 1, b"app"),
    worker=_bad_or(st.one_of(st.none(), st.integers(0, 10)), -1, True, "0"),
    kind=_bad_or(st.sampled_from(["select", "insert", "select_insert"]), "SELECT", "", "a+b", 1),
    fingerprint=_bad_or(st.text(max_size=10), None, 1),
    tables=st.lists(_bad_or(st.sampled_from(["public.users", "t"]), "", 1), max_size=2),
    read=_KEY_IDS,
    written=_KEY_IDS,
    pii=st.one_of(st.none(), _KEY_IDS),
    lookups=st.one_of(
        st.none(),
        st.dictionaries(
            _bad_or(st.sampled_from(["public.users.email", "users.phone"]), "email"),
            st.lists(_bad_or(st.just(IDX), "alice@example.com", "short", 5), max_size=2),
            max_size=2,
        ),
    ),
    rows=_bad_or(st.one_of(st.none(), st.integers(0, 10**12)), -1, True, "3", 1.5),
    decision=_bad_or(st.sampled_from(["allow", "deny"]), "maybe", None),
    reason=_bad_or(_TEXT, 5),
    sqlstate=_bad_or(st.sampled_from([None, "42501", "XX000"]), "bad", "4250", 42501),
    duration_ms=_bad_or(st.one_of(st.none(), st.floats(0, 1e9), st.integers(0, 10**6)),
                        -1.0, float("nan"), float("inf")),
)
def test_a_vouched_event_is_always_a_valid_one(**kw: Any) -> None:
    info = SessionInfo(session="s", user=kw.pop("user"), worker=kw.pop("worker"))
    kw["columns_read"], kw["columns_written"] = kw.pop("read"), kw.pop("written")
    try:
        event = statement_event(info, **kw)
    except (TypeError, ValueError):  # not even buildable (e.g. float("x"), unhashable)
        return
    assert isinstance(event, BuiltEvent)
    try:
        validate_event(event)
        valid = True
    except InvalidEventError:
        valid = False
    assert valid or not event.vouched  # never vouched for an invalid event
    assert event.vouched or not valid  # and a valid one takes the fast path


def test_now_ts_is_utc_with_microseconds() -> None:
    before = datetime.now(UTC)
    ts = now_ts()
    after = datetime.now(UTC)
    assert TS_RE.match(ts)
    when = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(milliseconds=1) <= when <= after + timedelta(milliseconds=1)
    assert format_ts(when) == ts


@given(st.one_of(st.floats(0, 1e12, allow_nan=False), st.integers(0, 10**9)))
def test_durations_are_rounded_to_microseconds(value: float) -> None:
    event = statement_event(INFO, kind="select", fingerprint="x", duration_ms=value)
    ms = event["duration_ms"]
    assert type(ms) is float and abs(ms - value) <= 0.0005 + abs(value) * 1e-15
    text = json.dumps(ms)
    assert json.loads(text) == ms and len(text.split(".")[1].split("e")[0]) <= 3


async def test_the_writer_drops_a_queued_statement_whose_values_fail_the_checks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sessions queue raw values (a tuple per statement) and the writer checks them: a
    lookup shaped like PII or a negative row count is logged (never the value), counted
    lost, and the trail keeps its other events, still a valid chain."""
    log = _log(tmp_path)
    await log.start()
    template = StatementTemplate(INFO, kind="select", fingerprint="SELECT 1")
    log.emit_statement((template, {"public.users.email": ["alice@example.com"]}, 1.0, 1.5, 0, 1, None))
    log.emit_statement((template, None, 1.0, 1.5, 0, -3, None))
    log.emit_statement((template, {"public.users.email": [IDX]}, 1.0, 1.0005, 1_700_000_000_123_456_789, 2, None))
    # Undecodable statement text (a lone surrogate in the fingerprint) cannot be written.
    odd = StatementTemplate(INFO, kind="select", fingerprint="SELECT '\udcff'")
    log.emit_statement((odd, None, 1.0, 1.5, 0, 1, None))
    await log.aclose()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    statements = [json.loads(line) for line in lines if '"type":"statement"' in line]
    assert [(e["rows"], e["lookups"], e["duration_ms"], e["ts"]) for e in statements] == [
        (2, {"public.users.email": [IDX]}, 0.5, "2023-11-14T22:13:20.123456Z")
    ]
    assert log.metrics.lost == 3
    assert caplog.text.count("audit event rejected") == 2 and "alice" not in caplog.text
    assert caplog.text.count("audit event cannot be serialized") == 1 and "\udcff" not in caplog.text
    assert verify([("trail", lines)], bytes(range(32))).ok  # type: ignore[arg-type]
