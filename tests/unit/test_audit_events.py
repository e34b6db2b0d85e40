"""Audit events: exact field sets, no place for a literal value, validation."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from pgcloak.audit.events import (
    COMMON_FIELDS,
    InvalidEventError,
    SessionInfo,
    connection_event,
    gap_event,
    refusal_event,
    seal_event,
    should_record,
    statement_event,
    validate_event,
)

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
        "lookups", "rows", "decision", "reason", "sqlstate", "duration_ms",
    }
    assert event["type"] == "statement"
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
