"""bench/audit.py's round-by-round ratios: each round's runs paired, failed runs left out.

The bench prints these next to its verdict (how many rounds met the target alone), so a
pairing off by one round or a failed run counted as zero would mislead the reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # (bench/ is not a package; only for these imports)
try:
    import audit
    from common import BenchTarget, Endpoint, PgbenchResult
finally:
    sys.path.remove(str(BENCH))


def _target(key: str, tps: dict[str, list[float | None]]) -> BenchTarget:
    target = BenchTarget(key, key, Endpoint("127.0.0.1", 1, "u", "p", "d"))
    for mode, values in tps.items():
        for round_no, value in enumerate(values):
            error = None if value is not None else "pgbench failed"
            target.add(PgbenchResult(key, mode, round_no, tps=value, error=error))
    return target


def test_rounds_are_paired_by_round_and_failed_runs_left_out() -> None:
    on = _target("audit-on", {"simple": [90.0, 80.0, 100.0], "extended": [50.0, None], "prepared": []})
    off = _target("audit-off", {"simple": [100.0, 100.0, 80.0], "extended": [100.0, 100.0]})
    aa = _target("audit-off-2", {"simple": [110.0, 100.0, 80.0]})
    found = audit._round_ratios(
        {t.key: t for t in (on, off, aa)},
        [("audit-on / audit-off", "audit-on", "audit-off"), ("audit-off-2 / audit-off", "audit-off-2", "audit-off")],
    )
    assert found["audit-on / audit-off"] == {"simple": [0.9, 0.8, 1.25], "extended": [0.5], "prepared": []}
    assert found["audit-off-2 / audit-off"]["simple"] == [1.1, 1.0, 1.0]
    # A ratio whose targets were not selected is not reported.
    assert set(audit._round_ratios({"audit-on": on}, [("x", "audit-on", "audit-off")])) == set()
