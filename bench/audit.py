"""Audit benchmark: what does writing the audit trail cost on a PII workload?

The PII workload of ``bench/pii.py`` (insert a user, look one up by email, select one by
id: three statements on encrypted columns per transaction) through two pgcloak
processes that differ only in their policy's ``audit:`` section:

    audit-on    audit enabled with the file sink (statements: pii, the defaults otherwise:
                fsync every second, queue 10000, batches of 1000): every PII statement
                is an event, chained with HMAC-SHA256 and appended to a JSON-lines file
    audit-off   ``audit: {enabled: false}``: no trail at all
    audit-off-2 a second audit-off, the A/A control (not run by default): how far two
                identical proxies differ in this run, i.e. the noise in a ratio
    audit-on-py audit-on with the trail's C parts off: the same code in Python
                (``PGCLOAK_PURE_PYTHON=1``; not run by default: what the C parts save)
    direct      PostgreSQL itself (not run by default; for reference)

Each target has a database of its own with the same encrypted ``users`` table, seeded
through the target. The runs are interleaved (round-robin per mode, rotating the
first target) in the simple, extended and prepared protocols.

The project's target (issue #4; printed as PASS/MISS, timings never fail the run):
audit-on >= 0.90x audit-off in every mode. After the run the proxies are stopped
(SIGTERM: the shutdown seal) and the trail is checked with ``pgcloak audit verify``;
its event count is compared with the PII statements pgbench reports.

    python bench/audit.py --quick          # 3 s per run, 1 round: a smoke run
    python bench/audit.py                  # 10 s per run, 2 rounds
    python bench/audit.py --json audit.json
    python bench/audit.py --probe          # and what each of the trail's calls costs in place
    python bench/audit.py --pool a.json b.json   # judge the target on several runs' rounds

The verdict is judged on the rounds' paired ratios (bench/paired.py): PASS or MISS when
the 95 % interval of their geometric mean lies on one side of 0.90x, "unsure" when the
rounds cannot tell, which on a 2-core machine two rounds often cannot.

The exit status is 0 whatever happens (a target that fails is reported in the notes),
130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from common import (
    HOST,
    BenchTarget,
    Endpoint,
    PgbenchResult,
    StartError,
    fmt_num,
    fmt_ratio,
    generate_master_key,
    interleave,
    pgbench_path,
    print_table,
    ratio,
    run_pgbench,
    scratch_dir,
    start_postgres,
    terminate_on_sigterm,
    tool_version,
)
from paired import estimate, verdict
from pgcloak.demo.postgres import TemporaryPostgres
from pii import (
    MODES,
    PII_STATEMENTS,
    ROLE,
    SetupError,
    Spec,
    check_seeded,
    create_schema,
    seed,
    start_target,
    verify_encrypted,
    workload_script,
)

ALL_TARGETS = ("audit-on", "audit-off", "audit-off-2", "audit-on-py", "direct")
DEFAULT_TARGETS = ("audit-on", "audit-off")
#: audit-on / audit-off must reach this in every mode (issue #4, item 6).
GOAL = 0.90
#: pgbench's application_name (common.Endpoint.env): its statements, not the set-up's.
PGBENCH_APP = "pgcloak-bench"

SPECS = {
    "audit-on": Spec(
        "audit-on",
        "audit_on",
        "protect",
        "pgcloak, users.email/phone encrypted, audit trail to a file (statements: pii)",
    ),
    "audit-off": Spec(
        "audit-off",
        "audit_off",
        "protect",
        "pgcloak, users.email/phone encrypted, audit: {enabled: false}",
    ),
    "audit-off-2": Spec(
        "audit-off-2",
        "audit_off_2",
        "protect",
        "a second audit-off, the A/A control: how far two identical proxies differ in this run",
    ),
    "audit-on-py": Spec(
        "audit-on-py",
        "audit_on_py",
        "protect",
        "audit-on with the trail's per-statement code in Python (PGCLOAK_PURE_PYTHON=1), not C",
    ),
    "direct": Spec("direct", "audit_direct", None, "PostgreSQL itself, plain users table"),
}
#: Environment of a target's pgcloak beyond the usual.
TARGET_ENV = {"audit-on-py": {"PGCLOAK_PURE_PYTHON": "1"}}

POLICY = """\
# bench/audit.py: {key}
version: 1
tables:
  public.users:
    email: {{encrypt: true, index: exact, normalize: email}}
    phone: {{encrypt: true, index: exact, normalize: phone}}
roles:
  {role}: {{read: reveal}}
{audit}"""

AUDIT_ON = 'audit:\n  statements: pii\n  sink: "file:{path}"\n'
AUDIT_OFF = "audit:\n  enabled: false\n"


#: bench/audit_probe: a sitecustomize timing the trail's calls inside the audit-on proxy.
PROBE_DIR = Path(__file__).resolve().parent / "audit_probe"
#: The trail's calls on the event loop per statement or reply, as the probe names them (its
#: ``emit_statement`` runs inside ``reply``, so it is shown but not added again).
LOOP_CALLS = ("bind", "execute", "sync", "query", "reply", "backend", "chain")
IO_CALLS = ("file.write", "file.fsync")


def _target_env(key: str, probe_in: Path | None) -> dict[str, str] | None:
    """The target's environment beyond the usual: TARGET_ENV, and the probe for audit-on."""
    env = dict(TARGET_ENV.get(key, {}))
    if probe_in is not None and key == "audit-on":
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROBE_DIR), os.environ.get("PYTHONPATH", "")) if p
        )
        env["PGCLOAK_BENCH_PROBE"] = str(probe_in / "probe-audit-on.json")
    return env or None


def read_probe(scratch: Path) -> dict[str, Any] | None:
    """The probe's totals over the audit-on proxy's processes (one file per process)."""
    files = sorted(scratch.glob("probe-audit-on.json.*"))
    if not files:
        return None
    total: dict[str, Any] = {"calls": {}, "nanos": {}, "chained": 0, "wrapper_ns": 0.0}
    for path in files:
        one = json.loads(path.read_text(encoding="utf-8"))
        for part in ("calls", "nanos"):
            for name, value in one[part].items():
                total[part][name] = total[part].get(name, 0) + value
        total["chained"] += one["chained"]
        total["wrapper_ns"] = max(total["wrapper_ns"], one["wrapper_ns"])
    return total


def _pooled_cpu(target: BenchTarget) -> float | None:
    """The target's CPU per transaction (µs) over all its measured runs, every mode."""
    runs = [r for runs in target.results.values() for r in runs if r.ok and r.cpu_seconds is not None]
    count = sum(r.transactions or 0 for r in runs)
    return sum(r.cpu_seconds or 0.0 for r in runs) * 1e6 / count if count else None


def print_probe(probe: dict[str, Any], transactions: int, cpu_diff: float | None, plain: bool) -> dict[str, Any]:
    """The probe's table: per call, per transaction, and their sum against the CPU difference."""
    calls, nanos, wrapper = probe["calls"], probe["nanos"], probe["wrapper_ns"]
    tx = max(transactions, 1)
    rows: list[list[str]] = []
    per_tx: dict[str, float] = {}
    for name in (*LOOP_CALLS, "emit_statement", *IO_CALLS):
        n = calls.get(name, 0)
        if not n:
            continue
        # Event-loop calls lose the wrapper's own time; the IO thread's are CPU, per batch.
        own = nanos[name] - (n * wrapper if name not in IO_CALLS else 0)
        unit = own / probe["chained"] if name in ("chain", *IO_CALLS) and probe["chained"] else own / n
        per_tx[name] = own / tx / 1000
        label = "ns per event" if name in ("chain", *IO_CALLS) else "ns per call"
        shown = f"  ({name}, inside reply)" if name == "emit_statement" else name
        rows.append([shown, f"{n / tx:.2f}", f"{unit:,.0f} {label}", fmt_num(per_tx[name], 1)])
    loop = sum(v for k, v in per_tx.items() if k in LOOP_CALLS)
    io = sum(v for k, v in per_tx.items() if k in IO_CALLS)
    rows.append(["on the event loop", "", "", fmt_num(loop, 1)])
    rows.append(["on the IO thread", "", "", fmt_num(io, 1)])
    rows.append(["CPU audit-on - audit-off, all modes", "", "", fmt_num(cpu_diff, 1)])
    print_table(
        f"The trail's calls inside audit-on (--probe; {tx:,} transactions, all modes and the "
        f"warm-up; the wrapper's {wrapper:.0f} ns per call taken off)",
        ["call", "per tx", "cost", "µs per tx"],
        rows,
        plain=plain,
    )
    return {"per_tx_us": per_tx, "loop_us": loop, "io_us": io, "calls": calls, "nanos": nanos}


def write_policy(key: str, scratch: Path) -> tuple[Path, Path | None]:
    """The target's policy file and, for audit-on and audit-on-py, the trail file it writes."""
    trail = scratch / f"trail-{key}" / "audit.jsonl" if key.startswith("audit-on") else None
    audit = AUDIT_ON.format(path=trail) if trail is not None else AUDIT_OFF
    path = scratch / f"policy-{key}.yaml"
    path.write_text(POLICY.format(key=key, role=ROLE, audit=audit))
    return path, trail


# --------------------------------------------------------------------------- the trail


def check_trail(trail: Path, master_key: str) -> dict[str, Any]:
    """``pgcloak audit verify`` over the trail, and its events by application."""
    files = sorted(p for p in trail.parent.glob("audit*.jsonl*") if ".spill" not in p.name)
    info: dict[str, Any] = {"files": [str(p) for p in files]}
    if not files:
        info["verify"] = "no audit file"
        return info
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCLOAK_MASTER_KEY"] = master_key
    proc = subprocess.run(
        [sys.executable, "-m", "pgcloak.cli", "audit", "verify", *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    first = (proc.stdout or proc.stderr).strip().splitlines()
    info["verify"] = first[0] if first else f"exit {proc.returncode}"
    info["verify_ok"] = proc.returncode == 0
    by_app: dict[str, int] = {}
    types: dict[str, int] = {}
    size = 0
    for path in files:
        size += path.stat().st_size
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                types[record["type"]] = types.get(record["type"], 0) + 1
                if record["type"] == "statement":
                    app = record.get("application_name") or "-"
                    by_app[app] = by_app.get(app, 0) + 1
    info.update(bytes=size, records_by_type=types, statements_by_application=by_app)
    return info


# --------------------------------------------------------------------------- reporting


def _commit() -> str | None:
    """The checkout's commit (``+`` if it has local changes), so saved runs say what they
    measured; None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "")


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _divide(a: float | None, b: float) -> float | None:
    return None if a is None else a / b


def _round_ratios(
    by_key: dict[str, BenchTarget], defs: Sequence[tuple[str, str, str]]
) -> dict[str, dict[str, list[float]]]:
    """Each ratio per round (rounds where both runs succeeded), by mode."""
    found: dict[str, dict[str, list[float]]] = {}
    for name, num, den in defs:
        if num not in by_key or den not in by_key:
            continue
        found[name] = {}
        for m in MODES:
            tops = {r.round: r.tps for r in by_key[num].results.get(m, []) if r.ok and r.tps}
            bottoms = {r.round: r.tps for r in by_key[den].results.get(m, []) if r.ok and r.tps}
            found[name][m] = [tops[k] / bottoms[k] for k in sorted(tops) if k in bottoms]
    return found


def _report(targets: list[BenchTarget], args: argparse.Namespace) -> dict[str, Any]:
    by_key = {t.key: t for t in targets}

    def tps(key: str, mode: str) -> float | None:
        target = by_key.get(key)
        return target.tps(mode) if target else None

    print_table(
        f"PII workload TPS  ({args.clients} clients, {args.threads} threads, "
        f"{args.seconds:g} s x {args.rounds} round(s)"
        + (f", pgbench -R {args.rate}" if args.rate else "")
        + (f", pgcloak --workers {args.workers}" if args.workers > 1 else "")
        + "; ± = half the range across rounds)",
        ["target", *MODES],
        [[t.key, *(t.cell(m) for m in MODES)] for t in targets],
        plain=args.plain,
    )
    ratio_defs = [
        ("audit-on / audit-off", "audit-on", "audit-off"),
        ("audit-off-2 / audit-off", "audit-off-2", "audit-off"),
        ("audit-on-py / audit-off", "audit-on-py", "audit-off"),
        ("audit-on / audit-on-py", "audit-on", "audit-on-py"),
        ("audit-on / direct", "audit-on", "direct"),
        ("audit-off / direct", "audit-off", "direct"),
    ]
    ratios: dict[str, dict[str, float | None]] = {}
    rows = []
    for name, num, den in ratio_defs:
        if num in by_key and den in by_key:
            ratios[name] = {m: ratio(tps(num, m), tps(den, m)) for m in MODES}
            rows.append([name, *(fmt_ratio(ratios[name][m]) for m in MODES)])
    print_table("TPS ratios", ["ratio", *MODES], rows, plain=args.plain)
    # (At a fixed rate both targets reach the rate: their TPS ratios say nothing.)
    by_round: dict[str, dict[str, list[float]]] = {} if args.rate else _round_ratios(by_key, ratio_defs[:2])
    if by_round and args.rounds > 1:
        print_table(
            "The same ratios round by round (a round's runs of a mode are adjacent in time, so "
            "a slow spell of the machine hits both; how far they scatter is this run's noise)",
            ["ratio", "mode", "rounds", "min", "max"],
            [
                [name, m, " ".join(fmt_ratio(v) for v in values), fmt_ratio(min(values)), fmt_ratio(max(values))]
                for name, per_mode in by_round.items()
                for m, values in per_mode.items()
                if values
            ],
            plain=args.plain,
            right_align_from=3,
        )

    added: dict[str, float | None] = {}
    if "audit-on" in by_key and "audit-off" in by_key and not args.rate:

        def per_tx(key: str, mode: str) -> float | None:
            value = tps(key, mode)
            return None if not value else 1e6 / value

        for m in MODES:
            a, b = per_tx("audit-on", m), per_tx("audit-off", m)
            added[m] = None if a is None or b is None else a - b
        rows = [[t.key, *(fmt_num(per_tx(t.key, m)) for m in MODES)] for t in targets]
        rows.append(["audit-on - audit-off", *(fmt_num(added[m]) for m in MODES)])
        rows.append(
            [
                f"  per audit event (/{PII_STATEMENTS})",
                *(fmt_num(_divide(added[m], PII_STATEMENTS)) for m in MODES),
            ]
        )
        print_table(
            "µs per transaction = 1e6 / TPS (what the saturated bottleneck spends on one "
            f"transaction; the difference is what the trail adds: {PII_STATEMENTS} events per "
            "transaction)",
            ["", *MODES],
            rows,
            plain=args.plain,
        )

    cpu: dict[str, dict[str, float | None]] = {
        t.key: {m: t.cpu_us_per_tx(m) for m in MODES} for t in targets if t.process is not None
    }
    if "audit-on" in cpu and "audit-off" in cpu:
        on, off = cpu["audit-on"], cpu["audit-off"]
        diff = {m: _minus(on[m], off[m]) for m in MODES}
        rows = [[key, *(fmt_num(cpu[key][m]) for m in MODES)] for key in cpu]
        if "audit-on-py" in cpu:
            py = {m: _minus(cpu["audit-on-py"][m], off[m]) for m in MODES}
            rows.append(["audit-on-py - audit-off", *(fmt_num(py[m]) for m in MODES)])
        rows.append(["audit-on - audit-off", *(fmt_num(diff[m]) for m in MODES)])
        rows.append(
            [
                f"  per audit event (/{PII_STATEMENTS})",
                *(fmt_num(_divide(diff[m], PII_STATEMENTS)) for m in MODES),
            ]
        )
        rows.append(["audit-off / audit-on", *(fmt_ratio(ratio(off[m], on[m])) for m in MODES)])
        print_table(
            "pgcloak's own CPU per transaction, µs (user + system, all its threads; steadier "
            "than TPS on a shared machine)",
            ["", *MODES],
            rows,
            plain=args.plain,
        )

    goals = _print_goals(by_round.get("audit-on / audit-off", {}), rate=bool(args.rate), plain=args.plain)
    return {
        "ratios": ratios,
        "ratios_by_round": by_round,
        "added_us_per_transaction": added,
        "cpu_us_per_transaction": cpu,
        "goals": goals,
    }


def _goals(per_mode: dict[str, list[float]], *, rate: bool = False) -> list[dict[str, Any]]:
    """The target per mode, judged on the rounds' paired ratios (bench/paired.py): the
    geometric mean, its 95 % interval, and PASS/MISS only where the interval decides."""
    goals: list[dict[str, Any]] = []
    for mode in MODES:
        rounds = per_mode.get(mode, [])
        est = estimate(rounds)
        # At a fixed rate both targets reach the rate: their TPS ratios say nothing.
        judged = "n/a (pgbench -R)" if rate else verdict(est, GOAL)
        goals.append(
            {
                "goal": f"audit-on >= {GOAL:.2f}x audit-off",
                "mode": mode,
                "ratio": est.mean if est else None,
                "low": est.low if est else None,
                "high": est.high if est else None,
                "rounds": len(rounds),
                "need": GOAL,
                "verdict": judged,
                "rounds_met": f"{sum(v >= GOAL for v in rounds)} of {len(rounds)}" if rounds else "-",
            }
        )
    return goals


def _print_goals(per_mode: dict[str, list[float]], *, rate: bool, plain: bool) -> list[dict[str, Any]]:
    goals = _goals(per_mode, rate=rate)
    print_table(
        "Project target (timings never fail the run). The ratio is the geometric mean of the "
        "rounds' audit-on / audit-off; PASS or MISS when its 95 % interval lies on one side "
        "of the target, 'unsure' when these rounds cannot tell (more --rounds, or --pool "
        "several runs' JSON); the last column counts the rounds that met it alone",
        ["goal", "mode", "ratio", "95 % interval", "need", "verdict", "rounds"],
        [
            [
                g["goal"],
                g["mode"],
                fmt_ratio(g["ratio"]),
                "-" if g["low"] is None else f"{g['low']:.2f}-{g['high']:.2f}x",
                f">= {GOAL:.2f}x",
                g["verdict"],
                g["rounds_met"],
            ]
            for g in goals
        ],
        plain=plain,
        right_align_from=2,
    )
    return goals


def pool(files: Sequence[Path], *, plain: bool = False) -> dict[str, Any]:
    """The target judged on the rounds of several saved runs (``--json`` files) together.

    Left out: runs at a fixed rate (``--rate``: their TPS ratios say nothing) and runs
    with ``--probe`` (the probe slows audit-on)."""
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    rows: list[list[str]] = []
    used: list[str] = []
    for path in files:
        try:
            saved = json.loads(path.read_text())
            meta, runs = saved["meta"], saved["runs"]
            results = [PgbenchResult(**run) for run in runs]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SetupError(f"{path}: not a bench/audit.py --json file ({exc})") from exc
        # (Files from before "rate" was in meta say so in their verdicts.)
        rated = meta.get("rate") or any(
            str(g.get("verdict", "")).startswith("n/a (pgbench -R)") for g in saved.get("goals", [])
        )
        left_out = "pgbench -R" if rated else "--probe" if saved.get("probe") else None
        if left_out:
            started = str(meta.get("started", "?"))
            rows.append([path.name, started, "-", f"left out: {left_out}", "", ""])
            continue
        by_key: dict[str, BenchTarget] = {}
        for r in results:
            if r.target not in by_key:
                by_key[r.target] = BenchTarget(r.target, r.target, Endpoint(HOST, 0, "", "", ""))
            by_key[r.target].add(r)
        found = _round_ratios(by_key, [("on/off", "audit-on", "audit-off")]).get("on/off", {})
        for m in MODES:
            per_mode[m] += found.get(m, [])
        used.append(str(path))
        means = [estimate(found.get(m, [])) for m in MODES]
        rows.append(
            [
                path.name,
                str(meta.get("started", "?")),
                str(meta.get("commit") or "?")[:12],
                *(f"{e.mean:.2f}x ({e.rounds})" if e else "-" for e in means),
            ]
        )
    print_table(
        "Runs pooled (audit-on / audit-off per mode: geometric mean of the run's rounds, "
        "and how many)",
        ["file", "started", "commit", *MODES],
        rows,
        plain=plain,
    )
    goals = _print_goals(per_mode, rate=False, plain=plain)
    return {"files": used, "ratios_by_round": per_mode, "goals": goals}


def _progress(result: PgbenchResult, total: int, done: int) -> None:
    if result.ok:
        detail = f"{result.tps:>9,.0f} tps  {result.latency_ms or 0:7.3f} ms"
        if result.failed:
            detail += f"  {result.failed} failed"
    else:
        detail = f"ERROR {result.error}"
    print(
        f"[{done:>3}/{total}] round {result.round + 1} {result.case:<9} {result.target:<10} {detail}",
        file=sys.stderr,
        flush=True,
    )


def _log_findings(target: BenchTarget, limit: int = 5) -> str | None:
    """Warnings and errors the proxy logged (it runs at --log-level warning)."""
    if target.process is None:
        return None
    try:
        lines = [
            ln for ln in target.process.log_file.read_text(errors="replace").splitlines() if ln
        ]
    except OSError:
        return None
    if not lines:
        return None
    shown = "\n    ".join(ln[:300] for ln in lines[:limit])
    more = f"\n    ... {len(lines) - limit} more line(s)" if len(lines) > limit else ""
    return f"{target.key}: the proxy logged {len(lines)} line(s):\n    {shown}{more}"


# ------------------------------------------------------------------------------ main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The PII workload through pgcloak with the audit file sink on and off, "
        "interleaved: TPS, ratio, and the >= 0.90x target",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, averaged (2)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--seed-rows", type=int, default=10_000, help="users seeded per target (default 10000)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of warm-up per target, split over the modes (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pgcloak run --workers for both targets (default 1: the proxy's one event loop "
        "is then the serial stage every statement passes)",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=0,
        help="pgbench -R: a fixed rate in transactions per second, below saturation; TPS "
        "ratios are then meaningless, but pgcloak's CPU per transaction is steadier",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 round: a smoke run")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="time the trail's calls inside audit-on (bench/audit_probe; makes audit-on slower, "
        "so the run's ratio is not the target's)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="JSON",
        default=None,
        help="measure nothing: judge the target on the rounds of these saved runs (--json "
        "files) together",
    )
    parser.add_argument("--plain", action="store_true", help="plain-text tables even with rich")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3.0, 1
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    args.targets = [t for t in ALL_TARGETS if t in wanted]
    if not {"audit-on", "audit-off"} <= set(args.targets):
        parser.error("audit-on and audit-off are what this benchmark compares; keep both")
    if min(args.seconds, args.rounds, args.clients, args.threads, args.seed_rows, args.workers) < 1:
        parser.error(
            "--seconds, --rounds, --clients, --threads, --seed-rows and --workers must be >= 1"
        )
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    scratch = scratch_dir("pgcloak-bench-audit-")
    pg: TemporaryPostgres | None = None
    targets: list[BenchTarget] = []
    trails: dict[str, Path] = {}
    try:
        print("starting PostgreSQL ...", file=sys.stderr, flush=True)
        pg = start_postgres(clients=args.clients)
        password = secrets.token_urlsafe(16)
        pg.create_role(ROLE, password)
        pgbench = pgbench_path(pg)
        master_key = generate_master_key()

        print("creating databases, starting targets, seeding ...", file=sys.stderr, flush=True)
        for key in args.targets:
            spec = SPECS[key]
            pg.create_database(spec.dbname, owner=ROLE)
            direct = Endpoint(HOST, pg.port, ROLE, password, spec.dbname)
            policy_file: Path | None = None
            if spec.policy is not None:
                policy_file, written = write_policy(key, scratch)
                if written is not None:
                    trails[key] = written
            create_schema(pg, spec, policy_file)
            try:
                target = start_target(
                    spec,
                    pg,
                    direct,
                    policy_file,
                    master_key,
                    scratch,
                    workers=args.workers,
                    env_extra=_target_env(key, scratch if args.probe else None),
                )
            except (StartError, OSError) as exc:
                raise SetupError(f"{key} did not start: {exc}") from exc
            targets.append(target)  # at once, so a failure below still stops it
            try:
                seed(target, args.seed_rows)
                check_seeded(direct, args.seed_rows)
                if spec.policy is not None:
                    verify_encrypted(target.endpoint, direct)
            except psycopg.Error as exc:
                tail = target.process.log_tail(10) if target.process else ""
                raise SetupError(
                    f"{key}: setup or correctness check failed: {exc}"
                    + (f"\nproxy log tail:\n{tail}" if tail else "")
                ) from exc

        script_files: dict[str, str] = {}
        for mode in MODES:
            path = scratch / f"pii-{mode}.sql"
            path.write_text(workload_script(mode, args.seed_rows))
            script_files[mode] = str(path)

        meta: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "postgres": pg.version_string,
            "pgbench": tool_version([pgbench, "--version"]),
            "commit": _commit(),
            "seconds": args.seconds,
            "rounds": args.rounds,
            "rate": args.rate,
            "clients": args.clients,
            "threads": args.threads,
            "seed_rows": args.seed_rows,
            "targets": {t.key: t.description for t in targets},
            "audit_on_policy_audit": AUDIT_ON.format(path="<scratch>/trail-audit-on/audit.jsonl"),
        }
        print(
            f"# {meta['postgres']}; {meta['cpus']} CPUs, load "
            f"{meta['loadavg_at_start'][0]:.2f}; {args.seed_rows:,} seeded users per target",
            flush=True,
        )
        for t in targets:
            print(f"#   {t.key:<10} {t.description}", flush=True)

        def one(
            t: BenchTarget, mode: str, round_no: int, seconds: float, case: str
        ) -> PgbenchResult:
            return run_pgbench(
                pgbench,
                t.endpoint,
                target=t.key,
                case=case,
                round_no=round_no,
                mode=mode,
                clients=args.clients,
                threads=args.threads,
                seconds=seconds,
                builtin=None,
                scripts=[script_files[mode]],
                extra_args=["-R", str(args.rate)] if args.rate else (),
            )

        transactions = {t.key: 0 for t in targets}
        for t in targets:
            for mode in MODES:
                result = one(t, mode, 0, max(1.0, args.warmup / len(MODES)), f"warmup-{mode}")
                transactions[t.key] += result.transactions or 0
                if result.error:
                    notes.append(f"{t.key}: warm-up in {mode} mode: {result.error}")

        total = len(targets) * len(MODES) * args.rounds

        def measured(t: BenchTarget, mode: str, round_no: int) -> PgbenchResult:
            before = t.process.cpu_seconds() if t.process else None
            result = one(t, mode, round_no, args.seconds, mode)
            after = t.process.cpu_seconds() if t.process else None
            if before is not None and after is not None:
                result.cpu_seconds = after - before
            return result

        for done, (t, _mode, _round, result) in enumerate(
            interleave(targets, MODES, args.rounds, measured), 1
        ):
            t.add(result)
            transactions[t.key] += result.transactions or 0
            _progress(result, total, done)

        meta["loadavg_at_end"] = os.getloadavg()
        summary = _report(targets, args)

        # Stop the proxies (SIGTERM: drain, shutdown seal), then check the trail.
        for t in targets:
            if t.process is not None:
                if not t.process.running:
                    notes.append(
                        f"{t.key}: process exited during the run:\n{t.process.log_tail(10)}"
                    )
                t.process.stop()
        probe_info: dict[str, Any] | None = None
        if args.probe:
            probe = read_probe(scratch)
            if probe is None:
                notes.append("--probe: the audit-on proxy wrote no probe file")
            else:
                by_key = {t.key: t for t in targets}
                diff = _minus(_pooled_cpu(by_key["audit-on"]), _pooled_cpu(by_key["audit-off"]))
                probe_info = print_probe(probe, transactions["audit-on"], diff, args.plain)
        trail_info: dict[str, Any] = {}
        for key, trail in trails.items():
            info = trail_info[key] = check_trail(trail, master_key)
            events = info.get("statements_by_application", {}).get(PGBENCH_APP, 0)
            expected = transactions.get(key, 0) * PII_STATEMENTS
            info["pgbench_events"] = events
            info["pgbench_pii_statements"] = expected
            size = info.get("bytes", 0)
            records = sum(info.get("records_by_type", {}).values())
            print(
                f"\nAudit trail of {key}: {info['verify']}\n"
                f"  {records:,} records, {size / 1e6:.1f} MB ({size / max(records, 1):.0f} bytes "
                f"per record); {events:,} statement events from pgbench for the "
                f"{expected:,} PII statements of the transactions it counted"
            )
            if not info.get("verify_ok"):
                notes.append(f"{key}: the trail did not verify: {info['verify']}")
            if events < expected:
                notes.append(
                    f"{key}: {expected - events} PII statement(s) without an event: a proxy bug"
                )

        for t in targets:
            for err in t.errors():
                notes.append(f"{t.key}: {err}")
            finding = _log_findings(t)
            if finding:
                notes.append(finding)
        if notes:
            print("\nNotes:")
            for note in notes:
                print(f"  - {note}")
        if (os.cpu_count() or 1) <= 2:
            print(
                f"\n(only {os.cpu_count()} CPUs shared by pgbench, PostgreSQL and the "
                "target: compare ratios, not absolute numbers)"
            )
        return {
            "meta": meta,
            "tps": {
                t.key: {
                    m: {"mean": t.tps(m), "spread": t.spread(m), "failed": t.failed(m)}
                    for m in MODES
                }
                for t in targets
            },
            **summary,
            "trail": trail_info,
            "probe": probe_info,
            "runs": [r.as_dict() for t in targets for runs in t.results.values() for r in runs],
            "notes": notes,
        }
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        for t in reversed(targets):
            if t.process is not None:
                t.process.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    terminate_on_sigterm()
    try:
        results = pool(args.pool, plain=args.plain) if args.pool else run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    except (SetupError, StartError, RuntimeError, OSError, psycopg.Error) as exc:
        done = "" if args.pool else "\nnothing was measured; everything stopped"
        print(f"\nerror: {exc}{done}", file=sys.stderr)
        return 0
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
