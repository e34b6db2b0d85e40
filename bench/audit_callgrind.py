"""What the audit trail costs in instructions, counted by callgrind: audit-on vs audit-off.

``audit.py`` measures the target (TPS), but on a small shared machine one round's ratio
scatters by about ±8 %, so a change worth a tenth of the trail's cost takes dozens of
rounds to show there. valgrind's callgrind counts the instructions each proxy executes
instead, which does not depend on what else the machine is doing: the same code and
workload give the same count to within about 1 % (the event loop's batching still
follows the clock). Use it to see whether a change to the trail's code made it cheaper;
use ``audit.py`` for the target itself.

    python bench/audit_callgrind.py                         # prepared mode, 2000 transactions
    python bench/audit_callgrind.py --modes simple,extended,prepared --transactions 1000
    python bench/audit_callgrind.py --json cg.json

Both proxies (``audit.py``'s audit-on and audit-off, in databases of their own) run
under ``valgrind --tool=callgrind`` with instrumentation off while they start and are
seeded. For each mode and proxy: a short warm-up, then instrumentation on, ``pgbench
-t`` of the PII workload, a pause for the trail's writer to chain and write the last
batch, instrumentation off, and a dump (``callgrind_control``). The dump is read with
``callgrind_annotate`` and divided by the transactions pgbench reports.

The tables: instructions per transaction of each proxy, the difference (what the trail
adds) and their ratio; the difference by library; the functions that add the most.

One caveat: valgrind's virtual CPU has no SHA extensions, so OpenSSL's SHA-256 (the
trail's HMAC) runs its AVX2 code there, several times the instructions it takes on a CPU
with them. libcrypto has a line of its own, and the difference is also given without it.
valgrind is slow: a run of the defaults takes about two minutes. Exit status 0 whatever
is measured; 2 when valgrind is missing; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import pii
from audit import SPECS, write_policy
from common import (
    HOST,
    Endpoint,
    PgbenchResult,
    StartError,
    fmt_num,
    generate_master_key,
    parse_pgbench,
    pgbench_path,
    print_table,
    scratch_dir,
    start_postgres,
    terminate_on_sigterm,
)
from pgcloak.demo.postgres import TemporaryPostgres

TARGETS = ("audit-on", "audit-off")
#: Library groups of the by-library table, by the start of the object's file name.
GROUPS = (
    ("_chain_core", "pgcloak C: the chain"),
    ("_reply_core", "pgcloak C: the session's calls"),
    ("libpython", "the interpreter (libpython)"),
    ("libcrypto", "libcrypto (HMAC; no SHA extensions under valgrind)"),
    ("_rust", "cryptography (AES-GCM, blind index HMAC)"),
    ("libc.", "libc"),
    ("loop.", "uvloop"),
)
_LINE = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+(?:\*\s+)?(\S.*?)\s+\[([^\]]+)\]\s*$")
_TOTAL = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+PROGRAM TOTALS")


@dataclass
class Profile:
    """One dump: instructions by (object file, function), and in all."""

    total: int = 0
    by_function: Counter[tuple[str, str]] = field(default_factory=Counter)


def parse_annotate(text: str) -> Profile:
    """``callgrind_annotate`` output (self cost per function, the default) as a Profile.

    Call-edge lines (``=>``, with ``--inclusive`` or ``--tree``) are not self costs and are
    skipped; a function listed once per source file it was inlined from is summed."""
    profile = Profile()
    for line in text.splitlines():
        if "=>" in line or ">   " in line:
            continue
        total = _TOTAL.match(line)
        if total:
            profile.total = int(total[1].replace(",", ""))
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        function = m[2].split(":", 1)[-1]  # (file:function; Rust names hold "::")
        profile.by_function[(Path(m[3]).name, function)] += int(m[1].replace(",", ""))
    return profile


def _is_crypto(library: str) -> bool:
    """libcrypto, and cryptography's own copy of OpenSSL: which of the two a call of the
    blind index's HMAC lands in moves with the libraries loaded, not with the work."""
    return library.startswith(("libcrypto", "_rust"))


def group_of(library: str) -> str:
    for prefix, name in GROUPS:
        if library.startswith(prefix):
            return name
    return "other"


@dataclass
class Measured:
    target: str
    mode: str
    transactions: int
    profile: Profile

    def per_tx(self, value: float) -> float:
        return value / self.transactions if self.transactions else 0.0


def _valgrind_argv(argv: list[str], out_file: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}", *argv]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _pgbench(pgbench: str, endpoint: Endpoint, mode: str, script: Path, clients: int, per_client: int) -> PgbenchResult:
    argv = [pgbench, "-n", "-M", mode, "-c", str(clients), "-j", "1", "-t", str(per_client), "-f", str(script)]
    proc = subprocess.run(argv, env=endpoint.env(), capture_output=True, text=True, timeout=3600, check=False)
    result = parse_pgbench(proc.stdout, PgbenchResult(target="", case=mode, round=0))
    if proc.returncode != 0 or not result.transactions:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return result


def _dump(pid: int, out_file: Path) -> Profile:
    """Dump the counts since the last dump and read them."""
    before = set(out_file.parent.glob(out_file.name + "*"))
    _control(pid, "--dump")
    deadline = time.monotonic() + 60
    while True:
        new = sorted(set(out_file.parent.glob(out_file.name + "*")) - before)
        if new or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not new:
        raise RuntimeError(f"callgrind wrote no dump for pid {pid}")
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(new[-1])],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    for path in new:
        path.unlink()
    return parse_annotate(text)


def run(args: argparse.Namespace) -> list[Measured]:
    scratch = scratch_dir("pgcloak-bench-callgrind-")
    pg: TemporaryPostgres | None = None
    procs: dict[str, Any] = {}
    measured: list[Measured] = []
    try:
        print("starting PostgreSQL ...", file=sys.stderr, flush=True)
        pg = start_postgres(clients=args.clients)
        password = secrets.token_urlsafe(16)
        pg.create_role(pii.ROLE, password)
        pgbench = pgbench_path(pg)
        master_key = generate_master_key()
        endpoints: dict[str, Endpoint] = {}
        outs: dict[str, Path] = {}
        for key in TARGETS:
            print(f"starting {key} under valgrind, seeding ...", file=sys.stderr, flush=True)
            spec = SPECS[key]
            pg.create_database(spec.dbname, owner=pii.ROLE)
            direct = Endpoint(HOST, pg.port, pii.ROLE, password, spec.dbname)
            policy_file, _trail = write_policy(key, scratch)
            pii.create_schema(pg, spec, policy_file)
            out_file = outs[key] = scratch / f"callgrind-{key}.out"
            target = pii.start_target(
                spec,
                pg,
                direct,
                policy_file,
                master_key,
                scratch,
                wrap=functools.partial(_valgrind_argv, out_file=out_file),
                start_timeout=300.0,
            )
            procs[key] = target.process
            endpoints[key] = target.endpoint
            pii.seed(target, args.seed_rows)
        for mode in args.modes:
            script = scratch / f"pii-{mode}.sql"
            script.write_text(pii.workload_script(mode, args.seed_rows))
            per_client = max(1, args.transactions // args.clients)
            for key in TARGETS:
                pid = procs[key].proc.pid
                _pgbench(pgbench, endpoints[key], mode, script, args.clients, 20)  # warm-up
                _control(pid, "--instr=on")
                result = _pgbench(pgbench, endpoints[key], mode, script, args.clients, per_client)
                time.sleep(1.0)  # the writer's linger: the last batch chained and written
                _control(pid, "--instr=off")
                profile = _dump(pid, outs[key])
                m = Measured(key, mode, result.transactions or 0, profile)
                measured.append(m)
                print(
                    f"{mode:<9} {key:<10} {m.transactions:,} transactions, "
                    f"{m.per_tx(profile.total):,.0f} instructions each",
                    file=sys.stderr,
                    flush=True,
                )
        return measured
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        for proc in procs.values():
            proc.stop(grace=60.0)
        if pg is not None:
            pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def report(measured: list[Measured], *, top: int = 15, plain: bool = False) -> dict[str, Any]:
    by = {(m.target, m.mode): m for m in measured}
    modes = list(dict.fromkeys(m.mode for m in measured))
    rows = []
    summary: dict[str, Any] = {}
    for mode in modes:
        on, off = by.get(("audit-on", mode)), by.get(("audit-off", mode))
        if on is None or off is None:
            continue
        a, b = on.per_tx(on.profile.total), off.per_tx(off.profile.total)
        crypto_on = sum(v for (lib, _f), v in on.profile.by_function.items() if _is_crypto(lib))
        crypto_off = sum(v for (lib, _f), v in off.profile.by_function.items() if _is_crypto(lib))
        without = (a - on.per_tx(crypto_on)) - (b - off.per_tx(crypto_off))
        summary[mode] = {"audit_on": a, "audit_off": b, "added": a - b, "added_without_crypto": without}
        rows.append([mode, fmt_num(b), fmt_num(a), fmt_num(a - b), f"{a / b:.3f}x", fmt_num(without)])
    print_table(
        "Instructions per transaction (callgrind; the trail adds audit-on - audit-off)",
        ["mode", "audit-off", "audit-on", "added", "on / off", "added, crypto libraries left out"],
        rows,
        plain=plain,
    )
    for mode in modes:
        on, off = by.get(("audit-on", mode)), by.get(("audit-off", mode))
        if on is None or off is None:
            continue
        groups: dict[str, float] = {}
        diffs: list[tuple[float, str, str]] = []
        for key in set(on.profile.by_function) | set(off.profile.by_function):
            d = on.per_tx(on.profile.by_function[key]) - off.per_tx(off.profile.by_function[key])
            groups[group_of(key[0])] = groups.get(group_of(key[0]), 0.0) + d
            diffs.append((d, key[0], key[1]))
        print_table(
            f"What the trail adds, by library ({mode}; instructions per transaction, self cost)",
            ["library", "added"],
            [[name, fmt_num(value)] for name, value in sorted(groups.items(), key=lambda kv: -abs(kv[1]))],
            plain=plain,
        )
        diffs.sort(reverse=True)
        print_table(
            f"The functions that add the most ({mode}; self cost per transaction)",
            ["added", "function", "library"],
            [[fmt_num(d), fn[:60], lib] for d, lib, fn in diffs[:top]],
            plain=plain,
        )
        summary[mode]["by_library"] = dict(groups)
    return summary


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--modes", default="prepared", help="comma-separated pgbench -M modes (prepared)")
    parser.add_argument("--transactions", type=int, default=2000, help="per mode and proxy (2000)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c (4)")
    parser.add_argument("--seed-rows", type=int, default=2000, help="users seeded per target (2000)")
    parser.add_argument("--top", type=int, default=15, help="functions listed per mode (15)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plain", action="store_true", help="plain-text tables even with rich")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(pii.MODES))
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    if min(args.transactions, args.clients, args.seed_rows) < 1:
        parser.error("--transactions, --clients and --seed-rows must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    missing = [t for t in ("valgrind", "callgrind_control", "callgrind_annotate") if shutil.which(t) is None]
    if missing:
        print(f"error: {', '.join(missing)} not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    terminate_on_sigterm()
    try:
        measured = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    except (pii.SetupError, StartError, RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        print(f"\nerror: {exc}\nnothing was measured; everything stopped", file=sys.stderr)
        return 0
    summary = report(measured, top=args.top, plain=args.plain)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
