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
        # Relative (the default too): in the working directory, as the proxy's trail;
        # never next to the policy file (a read-only mount in a container).
        (None, "file:{cwd}/pgcloak-audit.backfill.jsonl"),
        ("file:logs/audit.jsonl", "file:{cwd}/logs/audit.backfill.jsonl"),
        ("file:/var/log/pgcloak/trail", "file:/var/log/pgcloak/trail.backfill"),
        ("stdout", "stderr"),  # stdout carries the report
        ("stderr", "stderr"),
        ("postgresql://audit@db/app?table=pgcloak_audit", "postgresql://audit@db/app?table=pgcloak_audit"),
    ],
)
def test_the_backfill_writes_beside_the_proxys_trail(
    sink: str | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = TABLES + (f"audit:\n  sink: {sink}\n" if sink else "")
    config = backfill_audit_config(parse_policy(text, "/etc/pgcloak/policy.yaml"))
    assert config.sink == expected.format(cwd=tmp_path)


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


def test_a_policy_read_from_a_file_elsewhere_does_not_move_the_trail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgcloak.policy import load_policy

    (tmp_path / "policy").mkdir()
    (tmp_path / "work").mkdir()
    path = tmp_path / "policy" / "p.yaml"
    path.write_text(TABLES + "audit:\n  sink: file:audit.jsonl\n  spill_dir: spill\n")
    monkeypatch.chdir(tmp_path / "work")
    config = backfill_audit_config(load_policy(path))
    assert config.sink == f"file:{tmp_path}/work/audit.backfill.jsonl"
    assert config.spill_dir == f"{tmp_path}/work/spill"
