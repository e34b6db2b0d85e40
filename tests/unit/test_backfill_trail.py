"""The backfill's audit chain: where it goes, and what its events say (pure parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgcloak.audit import SessionInfo, validate_event
from pgcloak.backfill.convert import column_jobs
from pgcloak.backfill.runner import ColumnReport, TableReport
from pgcloak.backfill.trail import backfill_audit_config, table_event
from pgcloak.policy import parse_policy

TABLES = """version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    ssn: {encrypt: true}
"""


@pytest.mark.parametrize(
    ("sink", "expected"),
    [
        (None, "file:/etc/pgcloak/pgcloak-audit.backfill.jsonl"),  # the default, next to the policy
        ("file:logs/audit.jsonl", "file:/etc/pgcloak/logs/audit.backfill.jsonl"),
        ("file:/var/log/pgcloak/trail", "file:/var/log/pgcloak/trail.backfill"),
        ("stdout", "stderr"),  # stdout carries the report
        ("stderr", "stderr"),
        ("postgresql://audit@db/app?table=pgcloak_audit", "postgresql://audit@db/app?table=pgcloak_audit"),
    ],
)
def test_the_backfill_writes_beside_the_proxys_trail(sink: str | None, expected: str) -> None:
    text = TABLES + (f"audit:\n  sink: {sink}\n" if sink else "")
    config = backfill_audit_config(parse_policy(text, "/etc/pgcloak/policy.yaml"))
    assert config.sink == expected


def _report(**counts: int) -> TableReport:
    report = TableReport("public.users", {"email": ColumnReport("public.users.email"), "ssn": ColumnReport("public.users.ssn")})
    for what, n in counts.items():
        column, outcome = what.split("_", 1)
        setattr(report.columns[column], outcome, n)
    report.rows_updated = 3
    report.raced = 1
    report.seconds = 0.25
    return report


def test_a_table_event_names_columns_and_counts_only() -> None:
    policy = parse_policy(TABLES)
    jobs = column_jobs(policy, None)["public.users"]
    info = SessionInfo(session="s1", user="owner", database="app", application_name="pgcloak backfill")
    event = table_event(info, _report(email_encrypted=3, ssn_failed=1), jobs, rotate=False, dry_run=False)
    validate_event(event)
    assert event["kind"] == "backfill" and event["tables"] == ["public.users"]
    assert event["columns_read"] == [j.key_id for j in jobs]
    assert event["columns_written"] == [policy.key_id("public.users", "email")]  # ssn: nothing changed
    assert event["rows"] == 3 and event["duration_ms"] == 250.0
    assert event["reason"] == "3 encrypted, 0 stored again, 0 rotated, 1 failed, 1 changed meanwhile"
    assert event["fingerprint"] == "pgcloak backfill public.users"


def test_a_dry_run_writes_no_column() -> None:
    jobs = column_jobs(parse_policy(TABLES), None)["public.users"]
    info = SessionInfo(session="s1")
    event = table_event(info, _report(email_encrypted=3), jobs, rotate=True, dry_run=True)
    validate_event(event)
    assert event["columns_written"] == [] and event["rows"] == 0
    assert event["reason"].startswith("dry run (nothing written): 3 encrypted")
    assert event["fingerprint"] == "pgcloak backfill public.users --rotate --dry-run"


def test_the_source_path_of_a_policy_read_from_a_file(tmp_path: Path) -> None:
    from pgcloak.policy import load_policy

    path = tmp_path / "p.yaml"
    path.write_text(TABLES)
    assert backfill_audit_config(load_policy(path)).sink == f"file:{tmp_path.resolve()}/pgcloak-audit.backfill.jsonl"
