"""Pass-through benchmark: what does pgcloak cost when no statement touches PII?

One command starts a throwaway PostgreSQL, loads pgbench data, starts every target
in front of it, and runs ``pgbench -S`` (select-only) in the simple, extended and
prepared protocols against each target, interleaved, then at one client for latency.

Targets (all on 127.0.0.1, clients use sslmode=disable):

    direct      PostgreSQL itself
    relay       bench/relay.py: a plain uvloop byte relay, 1 process (the Python floor)
    relay-2w    the same with 2 SO_REUSEPORT worker processes
    pgcloak     pgcloak run, 1 process, no policy (every statement takes the fast path)
    pgcloak-2w  pgcloak run --workers 2
    pgbouncer   PgBouncer, session pooling, 1 process (when it is on PATH)

The project's goals (printed as PASS/MISS; the exit status is 0 whatever the timings):
pgcloak >= 0.90x relay in every mode, and pgcloak-2w >= pgbouncer in every mode.

    python bench/passthrough.py                 # 10 s per run, 2 rounds
    python bench/passthrough.py --quick         # 3 s, 1 round: a smoke run
    python bench/passthrough.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    HOST,
    Endpoint,
    ManagedProcess,
    PgbenchResult,
    StartError,
    fmt_num,
    fmt_ratio,
    init_pgbench_data,
    interleave,
    mean_or_none,
    pgbench_path,
    pgbouncer_version,
    pgcloak_argv,
    print_table,
    ratio,
    relay_argv,
    run_pgbench,
    scratch_dir,
    start_pgbouncer,
    start_postgres,
    terminate_on_sigterm,
    tool_version,
)
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres, free_port

MODES = ("simple", "extended", "prepared")
LATENCY_CASE = "latency"
ALL_TARGETS = ("direct", "relay", "relay-2w", "pgcloak", "pgcloak-2w", "pgbouncer")
RELAY_GOAL = 0.90  # pgcloak (1 worker) >= 0.90x relay (1 worker)


@dataclass
class Target:
    key: str
    description: str
    endpoint: Endpoint
    process: ManagedProcess | None = None
    results: dict[str, list[PgbenchResult]] = field(default_factory=dict)

    def add(self, result: PgbenchResult) -> None:
        self.results.setdefault(result.case, []).append(result)

    def tps(self, case: str) -> float | None:
        return mean_or_none([r.tps if r.ok else None for r in self.results.get(case, [])])

    def latency_ms(self, case: str) -> float | None:
        return mean_or_none([r.latency_ms if r.ok else None for r in self.results.get(case, [])])

    def spread(self, case: str) -> float | None:
        """Half the min..max range of the rounds' tps, as a fraction of their mean."""
        values = [r.tps for r in self.results.get(case, []) if r.ok and r.tps is not None]
        if len(values) < 2:
            return None
        return (max(values) - min(values)) / 2 / statistics.fmean(values)

    def failed(self, case: str) -> int:
        return sum(r.failed for r in self.results.get(case, []))

    def errors(self) -> list[str]:
        return [
            f"{r.case} round {r.round + 1}: {r.error}"
            for runs in self.results.values()
            for r in runs
            if r.error
        ]


# ----------------------------------------------------------------------------- setup


def _start_targets(
    wanted: Sequence[str],
    pg: TemporaryPostgres,
    direct: Endpoint,
    clients: int,
    scratch: Path,
    notes: list[str],
    targets: list[Target],
) -> None:
    """Start the wanted targets, appending each to ``targets`` as soon as it runs.

    (Appending at once means a Ctrl-C half-way still stops what was started.) One
    that fails to start is reported in ``notes`` and left out.
    """
    login = DbLogin(direct.user, direct.password, direct.dbname)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in wanted:
        if key == "direct":
            targets.append(Target(key, f"PostgreSQL {pg.version} on :{pg.port}", direct))
            continue
        port = free_port(HOST)
        log_file = scratch / f"{key}.log"
        try:
            if key in ("relay", "relay-2w"):
                workers = 2 if key.endswith("-2w") else 1
                proc = ManagedProcess(
                    key,
                    relay_argv(port, pg.port, workers=workers),
                    port=port,
                    listeners=workers,
                    log_file=log_file,
                    env=env,
                ).start()
                desc = f"uvloop byte relay, {workers} process{'es' if workers > 1 else ''}"
            elif key in ("pgcloak", "pgcloak-2w"):
                workers = 2 if key.endswith("-2w") else 1
                proc = ManagedProcess(
                    key,
                    pgcloak_argv(port, pg.port, workers=workers),
                    port=port,
                    listeners=workers,
                    log_file=log_file,
                    env=env,
                ).start()
                desc = f"pgcloak run, {workers} worker{'s' if workers > 1 else ''}, no policy"
            elif key == "pgbouncer":
                if shutil.which("pgbouncer") is None:
                    notes.append("pgbouncer: not on PATH, skipped (apt-get install pgbouncer)")
                    continue
                pool = clients + 2
                desc = f"{pgbouncer_version() or 'PgBouncer'}, session pool {pool}, 1 process"
                proc = start_pgbouncer(
                    pg, login, pool_size=pool, workdir=scratch / "pgbouncer", port=port
                )
            else:  # argparse validated the names
                raise ValueError(key)
        except (StartError, OSError, RuntimeError) as exc:
            notes.append(f"{key}: failed to start, left out: {exc}")
            print(f"warning: {key} failed to start: {exc}", file=sys.stderr)
            continue
        targets.append(Target(key, desc, direct.with_port(port), proc))


# ------------------------------------------------------------------------- reporting


def _cell(target: Target, case: str) -> str:
    tps = target.tps(case)
    text = fmt_num(tps)
    spread = target.spread(case)
    if tps is not None and spread is not None:
        text += f" ±{spread * 100:.0f}%"
    if target.failed(case):
        text += f" ({target.failed(case)} failed)"
    return text


def _report(targets: list[Target], args: argparse.Namespace) -> dict[str, Any]:
    by_key = {t.key: t for t in targets}

    def tps(key: str, case: str) -> float | None:
        target = by_key.get(key)
        return target.tps(case) if target else None

    print_table(
        f"pgbench -S  TPS  ({args.clients} clients, {args.threads} threads, "
        f"{args.seconds:g} s x {args.rounds} round(s); ± = half the range across rounds)",
        ["target", *MODES],
        [[t.key, *(_cell(t, m) for m in MODES)] for t in targets],
        plain=args.plain,
    )

    direct_lat = by_key["direct"].latency_ms(LATENCY_CASE) if "direct" in by_key else None
    latency: dict[str, dict[str, float | None]] = {}
    rows = []
    for t in targets:
        lat = t.latency_ms(LATENCY_CASE)
        added = None if lat is None or direct_lat is None else (lat - direct_lat) * 1000
        latency[t.key] = {"latency_ms": lat, "added_us": added, "tps": t.tps(LATENCY_CASE)}
        rows.append(
            [
                t.key,
                fmt_num(lat, 3),
                "-" if t.key == "direct" else fmt_num(added, 0),
                fmt_num(t.tps(LATENCY_CASE)),
            ]
        )
    print_table(
        f"Latency at 1 client (-c 1 -j 1 -M simple, {args.latency_seconds:g} s x {args.rounds})",
        ["target", "avg latency ms", "added µs vs direct", "tps"],
        rows,
        plain=args.plain,
    )

    ratio_defs = [
        ("pgcloak / direct", "pgcloak", "direct"),
        ("pgcloak / relay", "pgcloak", "relay"),
        ("pgcloak / pgbouncer", "pgcloak", "pgbouncer"),
        ("pgcloak-2w / pgbouncer", "pgcloak-2w", "pgbouncer"),
        ("pgcloak-2w / relay-2w", "pgcloak-2w", "relay-2w"),
        ("relay / direct", "relay", "direct"),
        ("pgbouncer / direct", "pgbouncer", "direct"),
    ]
    ratios: dict[str, dict[str, float | None]] = {}
    rows = []
    for name, num, den in ratio_defs:
        if num not in by_key or den not in by_key:
            continue  # a target that was not selected (or did not start)
        ratios[name] = {m: ratio(tps(num, m), tps(den, m)) for m in MODES}
        rows.append([name, *(fmt_ratio(ratios[name][m]) for m in MODES)])
    print_table(
        "TPS ratios (higher is better for the left side)", ["ratio", *MODES], rows, plain=args.plain
    )

    goals: list[dict[str, Any]] = []
    rows = []
    for goal, num, den, need in (
        (f"pgcloak >= {RELAY_GOAL:.2f}x relay", "pgcloak", "relay", RELAY_GOAL),
        ("pgcloak-2w >= pgbouncer", "pgcloak-2w", "pgbouncer", 1.0),
    ):
        for mode in MODES:
            value = ratio(tps(num, mode), tps(den, mode))
            verdict = "n/a" if value is None else ("PASS" if value >= need else "MISS")
            goals.append(
                {"goal": goal, "mode": mode, "ratio": value, "need": need, "verdict": verdict}
            )
            rows.append([goal, mode, fmt_ratio(value), f">= {need:.2f}x", verdict])
    print_table(
        "Project targets (timings never fail the run)",
        ["goal", "mode", "ratio", "need", "verdict"],
        rows,
        plain=args.plain,
        right_align_from=2,
    )

    return {"latency_1_client": latency, "ratios": ratios, "goals": goals}


# ------------------------------------------------------------------------------ main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench -S through direct PostgreSQL, a plain relay, pgcloak and PgBouncer",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, averaged (2)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--scale", type=int, default=5, help="pgbench -i -s (default 5, ~75 MB)")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        help="per 1-client latency run (default: --seconds)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of warm-up per target (default 2, 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 round: a smoke run")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plain", action="store_true", help="plain-text tables even with rich")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3.0, 1
    if args.latency_seconds is None:
        args.latency_seconds = args.seconds
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    args.targets = [t for t in ALL_TARGETS if t in wanted]
    if args.seconds < 1 or args.rounds < 1 or args.clients < 1 or args.threads < 1:
        parser.error("--seconds, --rounds, --clients and --threads must be >= 1")
    return args


def _progress(result: PgbenchResult, total: int, done: int) -> None:
    if result.ok:
        detail = f"{result.tps:>10,.0f} tps  {result.latency_ms or 0:7.3f} ms"
        if result.failed:
            detail += f"  {result.failed} failed"
    else:
        detail = f"ERROR {result.error}"
    print(
        f"[{done:>3}/{total}] round {result.round + 1} {result.case:<9} "
        f"{result.target:<11} {detail}",
        file=sys.stderr,
        flush=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    scratch = scratch_dir()
    pg: TemporaryPostgres | None = None
    targets: list[Target] = []
    try:
        print("starting PostgreSQL ...", file=sys.stderr, flush=True)
        pg = start_postgres(clients=args.clients)
        login = pg.create_login("bench", secrets.token_urlsafe(16), "bench")
        direct = Endpoint(HOST, pg.port, login.user, login.password, login.dbname)
        pgbench = pgbench_path(pg)
        print(f"pgbench -i -s {args.scale} ...", file=sys.stderr, flush=True)
        init_pgbench_data(pgbench, direct, args.scale)

        print("starting targets ...", file=sys.stderr, flush=True)
        _start_targets(args.targets, pg, direct, args.clients, scratch, notes, targets)
        meta = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "postgres": pg.version_string,
            "pgbench": tool_version([pgbench, "--version"]),
            "pgbouncer": pgbouncer_version(),
            "seconds": args.seconds,
            "latency_seconds": args.latency_seconds,
            "rounds": args.rounds,
            "clients": args.clients,
            "threads": args.threads,
            "scale": args.scale,
            "targets": {t.key: t.description for t in targets},
        }
        print(
            f"# {meta['postgres']}; {meta['pgbouncer'] or 'no PgBouncer'}; "
            f"{meta['cpus']} CPUs, load {meta['loadavg_at_start'][0]:.2f}; "
            f"pgbench scale {args.scale}",
            flush=True,
        )
        for t in targets:
            print(f"#   {t.key:<11} {t.description}", flush=True)

        # Warm-up: first connections, page cache, the proxies' code paths; not measured.
        for t in targets:
            for mode in MODES:
                run_pgbench(
                    pgbench,
                    t.endpoint,
                    target=t.key,
                    case="warmup",
                    mode=mode,
                    clients=args.clients,
                    threads=args.threads,
                    seconds=max(1.0, args.warmup / len(MODES)),
                )

        total = len(targets) * (len(MODES) + 1) * args.rounds
        done = 0

        def one_tps(t: Target, mode: str, round_no: int) -> PgbenchResult:
            return run_pgbench(
                pgbench,
                t.endpoint,
                target=t.key,
                case=mode,
                round_no=round_no,
                mode=mode,
                clients=args.clients,
                threads=args.threads,
                seconds=args.seconds,
            )

        def one_latency(t: Target, case: str, round_no: int) -> PgbenchResult:
            return run_pgbench(
                pgbench,
                t.endpoint,
                target=t.key,
                case=case,
                round_no=round_no,
                mode="simple",
                clients=1,
                threads=1,
                seconds=args.latency_seconds,
            )

        for t, _case, _round, result in interleave(targets, MODES, args.rounds, one_tps):
            t.add(result)
            done += 1
            _progress(result, total, done)
        for t, _case, _round, result in interleave(
            targets, (LATENCY_CASE,), args.rounds, one_latency
        ):
            t.add(result)
            done += 1
            _progress(result, total, done)

        for t in targets:
            if t.process is not None and not t.process.running:
                notes.append(
                    f"{t.key}: process exited during the run; log tail:\n{t.process.log_tail(10)}"
                )

        meta["loadavg_at_end"] = os.getloadavg()
        summary = _report(targets, args)
        for t in targets:
            for err in t.errors():
                notes.append(f"{t.key}: {err}")
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
        results = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
