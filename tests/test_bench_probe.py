"""bench/audit_probe: the trail's calls it times still exist and are counted.

bench/audit.py --probe starts the audit-on proxy with this sitecustomize; a renamed method
would make that proxy fail to start, or count nothing. So a child Python with the probe
on its path runs the session's calls (audit_micro's prepared-statement loop) and a whole
trail to a file (audit_micro's end-to-end run), and the totals it writes at exit must
name every call with the counts those runs make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

CHILD = """
import sys
sys.path.insert(0, {bench!r})
import audit_micro
audit_micro.session_statements(True, 40)
audit_micro.run_e2e("probe", 25, 5, None, 1)
"""


def test_the_probe_counts_the_trails_calls(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    env = {k: v for k, v in os.environ.items() if k != "PGCLOAK_PURE_PYTHON"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH / "audit_probe"), env.get("PYTHONPATH", "")) if p)
    env["PGCLOAK_BENCH_PROBE"] = str(out)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(bench=str(BENCH))],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (written,) = tmp_path.glob("probe.json.*")  # one file per process, named by its pid
    probe = json.loads(written.read_text(encoding="utf-8"))
    calls = probe["calls"]
    # The session loop: one Bind, Execute, Sync and reply per statement (and the reply to
    # its Parse first, with its Sync).
    assert calls["bind"] == calls["execute"] == 40
    assert calls["sync"] == calls["reply"] == 41
    assert calls["query"] == 0  # wrapped (a simple Query's call), and not on this path
    # The end-to-end run: 25 statements queued, chained with the trail's own records (the
    # shutdown seal), written to the file and fsync'd at close.
    assert calls["emit_statement"] == 25
    assert probe["chained"] > 25 and calls["chain"] >= 1
    assert calls["file.write"] >= 1 and calls["file.fsync"] >= 1
    assert all(probe["nanos"][name] > 0 for name in ("reply", "chain", "file.write"))
    assert 0 < probe["wrapper_ns"] < 10_000
