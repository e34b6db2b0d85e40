"""Where a relative audit sink and its spill file land: pgcloak's working directory,
never the policy file's directory (in a container that is a read-only mount, while the
image's working directory, /var/lib/pgcloak, is the writable volume)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgcloak.audit.sinks import resolve_paths
from pgcloak.backfill.trail import Trail
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key
from pgcloak.policy import load_policy, parse_policy
from pgcloak.session.protection import Protection
from pgcloak.session.server import make_audit_log

TABLES = """version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
"""


def _audit(section: str = "") -> str:
    return TABLES + (f"audit:\n{section}" if section else "")


@pytest.mark.parametrize(
    ("section", "sink", "spill_dir"),
    [
        ("", "file:{cwd}/pgcloak-audit.jsonl", None),  # the default sink
        ("  sink: file:audit.jsonl\n", "file:{cwd}/audit.jsonl", None),
        ("  sink: file:trail/audit.jsonl\n  spill_dir: spill\n", "file:{cwd}/trail/audit.jsonl", "{cwd}/spill"),
        ("  sink: file:/var/log/a.jsonl\n  spill_dir: /s\n", "file:/var/log/a.jsonl", "/s"),
        ("  sink: stdout\n  spill_dir: spill\n", "stdout", "{cwd}/spill"),
        ("  sink: stdout\n", "stdout", None),
    ],
)
def test_relative_paths_are_resolved_against_the_working_directory(
    section: str, sink: str, spill_dir: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = resolve_paths(parse_policy(_audit(section), "/etc/pgcloak/policy/policy.yaml").audit)
    assert config.sink == sink.format(cwd=tmp_path)
    assert config.spill_dir == (None if spill_dir is None else spill_dir.format(cwd=tmp_path))


def test_the_proxys_trail_and_spill_are_in_the_working_directory_not_the_policys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's trail, as `pgcloak run` starts it with the policy mounted elsewhere."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "work").mkdir()
    path = tmp_path / "policy" / "policy.yaml"
    path.write_text(_audit("  sink: file:audit.jsonl\n"))
    monkeypatch.chdir(tmp_path / "work")
    log = make_audit_log(Protection.build(load_policy(path), Keyring(generate_master_key())))
    assert log.sink.description.endswith(f"{tmp_path}/work/audit.jsonl")
    assert log.spill.path == tmp_path / "work" / "audit.spill.jsonl"
    monkeypatch.chdir(tmp_path)  # resolved once: a later change of directory moves nothing
    assert log.spill.path == tmp_path / "work" / "audit.spill.jsonl"


@pytest.mark.parametrize(
    "sink", ["file:audit.jsonl", "postgresql://audit@127.0.0.1:5432/appdb?table=pgcloak_audit", "stdout"]
)
def test_a_backfill_never_shares_the_proxys_spill_file(
    sink: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes appending to (and replaying) one spill file would mix their chains:
    the backfill's is its own, whatever the sink (a table sink is the proxy's very own)."""
    path = tmp_path / "policy.yaml"
    path.write_text(_audit(f'  sink: "{sink}"\n  spill_dir: spill\n'))
    monkeypatch.chdir(tmp_path)
    policy, keyring = load_policy(path), Keyring(generate_master_key())
    proxy = make_audit_log(Protection.build(policy, keyring))
    backfill = Trail(policy, keyring, rotate=False, dry_run=False)
    assert backfill.log.spill.path != proxy.spill.path
    assert backfill.log.spill.path.parent == proxy.spill.path.parent == tmp_path / "spill"
