"""bench/paired.py and bench/audit.py --pool: the target judged on paired rounds.

A wrong interval would print PASS where the rounds cannot tell (or MISS where they can),
and a pool that mixed in fixed-rate or probed runs would judge the target on ratios that
say nothing about it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # (bench/ is not a package; only for these imports)
try:
    import audit
    import paired
    from pii import SetupError
finally:
    sys.path.remove(str(BENCH))


def test_t_quantiles_match_the_tables() -> None:
    assert paired.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert paired.t_quantile(5) == pytest.approx(2.571, abs=1e-3)
    assert paired.t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    # Beyond the table: the expansion (exact values 2.021, 1.980, 1.962).
    assert paired.t_quantile(40) == pytest.approx(2.021, abs=1e-3)
    assert paired.t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    assert paired.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    with pytest.raises(ValueError):
        paired.t_quantile(0)


def test_estimate_is_the_geometric_mean_with_a_t_interval() -> None:
    # log ratios -0.1, 0, 0.1: mean 0, sd 0.1, n 3 -> half-width 4.303 * 0.1 / sqrt(3).
    est = paired.estimate([math.exp(-0.1), 1.0, math.exp(0.1)])
    assert est is not None and est.rounds == 3
    assert est.mean == pytest.approx(1.0)
    assert est.low == pytest.approx(math.exp(-0.248434), rel=1e-4)
    assert est.high == pytest.approx(math.exp(0.248434), rel=1e-4)
    # A round at 0.8x and one at 1.25x cancel out (an arithmetic mean would say 1.025x).
    assert paired.estimate([0.8, 1.25]).mean == pytest.approx(1.0)  # type: ignore[union-attr]
    # Identical rounds: nothing to doubt.
    same = paired.estimate([0.93, 0.93, 0.93])
    assert same is not None and same.low == pytest.approx(0.93) and same.high == pytest.approx(0.93)
    one = paired.estimate([0.95])
    assert one is not None and (one.mean, one.low, one.high) == (pytest.approx(0.95), None, None)
    assert paired.estimate([]) is None
    with pytest.raises(ValueError):
        paired.estimate([0.9, 0.0])


def test_more_rounds_of_the_same_spread_narrow_the_interval() -> None:
    few = paired.estimate([0.85, 0.95] * 2)
    many = paired.estimate([0.85, 0.95] * 10)
    assert few is not None and many is not None
    assert few.mean == pytest.approx(many.mean)
    assert few.low is not None and many.low is not None and many.low > few.low


def test_verdict_decides_only_where_the_interval_does() -> None:
    est = paired.RatioEstimate
    assert paired.verdict(est(0.95, 0.91, 0.99, 5), 0.9) == "PASS"
    assert paired.verdict(est(0.95, 0.90, 0.99, 5), 0.9) == "PASS"  # the bound itself
    assert paired.verdict(est(0.85, 0.80, 0.89, 5), 0.9) == "MISS"
    assert paired.verdict(est(0.93, 0.88, 0.97, 5), 0.9) == "unsure, mean meets it"
    assert paired.verdict(est(0.89, 0.84, 0.94, 5), 0.9) == "unsure, mean misses it"
    assert paired.verdict(est(0.95, None, None, 1), 0.9) == "PASS (1 round, no interval)"
    assert paired.verdict(None, 0.9) == "n/a"


def test_goals_use_the_rounds_and_say_nothing_at_a_fixed_rate() -> None:
    rounds = {"simple": [0.95, 0.97, 0.96], "extended": [0.80, 1.05], "prepared": []}
    goals = {g["mode"]: g for g in audit._goals(rounds)}
    assert goals["simple"]["verdict"] == "PASS" and goals["simple"]["rounds_met"] == "3 of 3"
    assert goals["extended"]["verdict"] == "unsure, mean meets it"
    assert goals["extended"]["rounds_met"] == "1 of 2"
    assert goals["prepared"]["verdict"] == "n/a" and goals["prepared"]["ratio"] is None
    rated = audit._goals(rounds, rate=True)
    assert {g["verdict"] for g in rated} == {"n/a (pgbench -R)"}


def _saved(path: Path, tps: dict[str, dict[str, list[float]]], **extra: Any) -> Path:
    runs = [
        {"target": target, "case": mode, "round": i, "tps": value}
        for target, modes in tps.items()
        for mode, values in modes.items()
        for i, value in enumerate(values)
    ]
    meta = {"started": "2026-11-29T18:00:00+0000", "commit": "abc", **extra.pop("meta", {})}
    path.write_text(json.dumps({"meta": meta, "runs": runs, **extra}))
    return path


def test_pool_judges_the_rounds_of_several_runs_together(tmp_path: Path) -> None:
    modes = ("simple", "extended", "prepared")
    a = _saved(
        tmp_path / "a.json",
        {"audit-on": {m: [95.0, 94.0] for m in modes}, "audit-off": {m: [100.0, 100.0] for m in modes}},
    )
    b = _saved(
        tmp_path / "b.json",
        {"audit-on": {m: [188.0, 93.0] for m in modes}, "audit-off": {m: [200.0, 100.0] for m in modes}},
    )
    # Left out: a fixed-rate run (as meta says, or as an older file's verdicts say) and a
    # probed one. Their ratios of 0.5 would drag every mode down to a MISS.
    half = {"audit-on": {m: [50.0, 50.0] for m in modes}, "audit-off": {m: [100.0, 100.0] for m in modes}}
    rated = _saved(tmp_path / "rated.json", half, meta={"rate": 1500})
    older = _saved(tmp_path / "older.json", half, goals=[{"verdict": "n/a (pgbench -R)"}])
    probed = _saved(tmp_path / "probed.json", half, probe={"calls": {}})

    result = audit.pool([a, b, rated, older, probed], plain=True)

    assert result["files"] == [str(a), str(b)]
    assert sorted(result["ratios_by_round"]["prepared"]) == pytest.approx([0.93, 0.94, 0.94, 0.95])
    goals = {g["mode"]: g for g in result["goals"]}
    assert goals["prepared"]["rounds"] == 4
    assert goals["prepared"]["verdict"] == "PASS"
    assert goals["prepared"]["ratio"] == pytest.approx(
        math.exp(sum(math.log(r) for r in (0.93, 0.94, 0.94, 0.95)) / 4)
    )


def test_pool_refuses_a_file_that_is_not_a_saved_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"meta": {}}')
    with pytest.raises(SetupError, match=r"bad\.json"):
        audit.pool([bad], plain=True)
