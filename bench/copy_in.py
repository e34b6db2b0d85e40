"""COPY benchmark: a bulk load through pgcloak, against PostgreSQL itself.

The ``users`` table of ``bench/pii.py`` (email and phone encrypted and blind-indexed in
the ``encrypted`` target) loaded with ``COPY users (email, phone) FROM STDIN`` in text
format, the data written in 64 KiB pieces as drivers send it. Every protected field is
found by PostgreSQL's rules (pgcloak.wire.copy_data), encrypted, and written again; the
``unprotected`` target runs the same session machinery with nothing to rewrite.

    encrypted    pgcloak, users.email / users.phone encrypted
    unprotected  pgcloak, policy naming another table
    direct       PostgreSQL itself

Rounds are interleaved; the table is truncated before each load. After the run the
encrypted table is read directly: every value must be ciphertext. Printed: MB/s and
rows/s per target, and the ratios encrypted / direct, unprotected / direct,
encrypted / unprotected. No target is set; timings never fail the run.

    python bench/copy_in.py --quick        # 20,000 rows, 1 round
    python bench/copy_in.py                # 200,000 rows, 3 rounds
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import (
    HOST,
    BenchTarget,
    Endpoint,
    fmt_num,
    fmt_ratio,
    generate_master_key,
    print_table,
    ratio,
    scratch_dir,
    start_postgres,
    terminate_on_sigterm,
)
from pgcloak.demo.postgres import TemporaryPostgres
from pii import ROLE, SPECS, ciphertext_census, connect, create_schema, start_target, write_policy

KEYS = ("encrypted", "unprotected", "direct")
PIECE = 64 * 1024


def copy_data(rows: int) -> bytes:
    """``rows`` lines of distinct e-mail and phone values (the phone in a form the
    ``phone`` normalization takes)."""
    return b"".join(
        f"copy-{i}@example.com\t+1 555 {i // 10000 % 1000:03d} {i % 10000:04d}\n".encode() for i in range(rows)
    )


def load(endpoint: Endpoint, data: bytes) -> float:
    """Seconds to COPY ``data`` into an emptied table (the TRUNCATE is not timed)."""
    with connect(endpoint) as conn:
        conn.execute("TRUNCATE users")
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY users (email, phone) FROM STDIN") as copy:
            for i in range(0, len(data), PIECE):
                copy.write(data[i : i + PIECE])
        return time.perf_counter() - started


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="20,000 rows, 1 round")
    p.add_argument("--plain", action="store_true", help="plain tables (no box drawing)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = 20_000, 1
    return args


def run(args: argparse.Namespace) -> int:
    scratch: Path = scratch_dir("pgcloak-bench-copy-")
    pg: TemporaryPostgres | None = None
    targets: list[BenchTarget] = []
    try:
        print("starting PostgreSQL ...", file=sys.stderr, flush=True)
        pg = start_postgres(clients=4)
        password = secrets.token_urlsafe(16)
        pg.create_role(ROLE, password)
        master_key = generate_master_key()
        direct_of: dict[str, Endpoint] = {}
        for key in KEYS:
            spec = SPECS[key]
            pg.create_database(spec.dbname, owner=ROLE)
            direct_of[key] = Endpoint(HOST, pg.port, ROLE, password, spec.dbname)
            policy_file = write_policy(spec, scratch)
            create_schema(pg, spec, policy_file)
            targets.append(start_target(spec, pg, direct_of[key], policy_file, master_key, scratch))
        data = copy_data(args.rows)
        megabytes = len(data) / 1e6
        print(f"# {pg.version_string}; {args.rows:,} rows, {megabytes:.1f} MB a load", flush=True)
        for t in targets:
            load(t.endpoint, data[: len(data) // 20])  # warm-up
        seconds: dict[str, list[float]] = {t.key: [] for t in targets}
        for round_no in range(args.rounds):
            order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
            for t in order:
                took = load(t.endpoint, data)
                seconds[t.key].append(took)
                print(f"[round {round_no + 1}] {t.key:<12} {megabytes / took:6.1f} MB/s", file=sys.stderr, flush=True)
        best = {k: min(v) for k, v in seconds.items()}
        print_table(
            f"COPY FROM STDIN, text format, {PIECE // 1024} KiB writes (best of {args.rounds})",
            ["target", "MB/s", "rows/s"],
            [[k, fmt_num(megabytes / s, 1), fmt_num(args.rows / s)] for k, s in best.items()],
            plain=args.plain,
        )
        rate = {k: megabytes / s for k, s in best.items()}
        print_table(
            "Ratios (throughput)",
            ["ratio", "value"],
            [
                ["encrypted / direct", fmt_ratio(ratio(rate["encrypted"], rate["direct"]))],
                ["unprotected / direct", fmt_ratio(ratio(rate["unprotected"], rate["direct"]))],
                ["encrypted / unprotected", fmt_ratio(ratio(rate["encrypted"], rate["unprotected"]))],
            ],
            plain=args.plain,
        )
        rows, plain = ciphertext_census(direct_of["encrypted"])
        print(f"\nEncrypted table after the run, read directly: {rows:,} rows, "
              + ("all ciphertext" if plain == 0 else f"{plain} ROW(S) WITH PLAINTEXT"))
        return 0 if plain == 0 and rows == args.rows else 1
    finally:
        for t in targets:
            if t.process is not None:
                t.process.stop()
        if pg is not None:
            pg.stop()


def main(argv: Sequence[str] | None = None) -> int:
    terminate_on_sigterm()
    try:
        return run(_parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
