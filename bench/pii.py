"""PII benchmark: what does encrypting users.email and users.phone cost?

One command starts a throwaway PostgreSQL with one database per target, seeds each
``users`` table through its own target, checks once that the encrypted target really
stores ciphertext and returns plaintext, then runs a pgbench custom script in the
simple, extended and prepared protocols against every target, interleaved.

One transaction of the workload (the script is the same for every target):

    generate   a table-free SELECT that builds this transaction's strings (\\gset)
    insert     INSERT INTO users (email, phone) VALUES (...) ON CONFLICT (email) DO NOTHING
    lookup     SELECT id, phone FROM users WHERE email = ...   (a seeded row; must find 1)
    by id      SELECT email, phone FROM users WHERE id = ...   (a seeded row; must find 1)

Targets (all on 127.0.0.1, clients use sslmode=disable):

    encrypted    pgcloak with a policy that encrypts and blind-indexes users.email
                 (normalize email) and users.phone (normalize phone)
    unprotected  pgcloak with a policy that does not name users (so the same session
                 machinery runs, but nothing in this workload is rewritten)
    nopolicy     pgcloak without --policy: pure pass-through (not run by default)
    direct       PostgreSQL itself

The project's targets (printed as PASS/MISS; the exit status is 0 whatever the
timings): encrypted >= 0.75x unprotected in extended and prepared mode, >= 0.60x in
simple mode. See bench/README.md for why the script looks the way it does.

    python bench/pii.py --quick          # 3 s per run, 1 round: a smoke run
    python bench/pii.py                  # 10 s per run, 2 rounds
    python bench/pii.py --show-scripts   # print the pgbench scripts and exit
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from common import (
    HOST,
    BenchTarget,
    Endpoint,
    ManagedProcess,
    PgbenchResult,
    StartError,
    fmt_num,
    fmt_ratio,
    generate_master_key,
    interleave,
    pgbench_path,
    pgcloak_argv,
    print_table,
    ratio,
    run_pgbench,
    scratch_dir,
    start_postgres,
    terminate_on_sigterm,
    tool_version,
)
from pgcloak.demo.postgres import TemporaryPostgres, free_port, quote_ident

MODES = ("simple", "extended", "prepared")
ALL_TARGETS = ("encrypted", "unprotected", "nopolicy", "direct")
DEFAULT_TARGETS = ("encrypted", "unprotected", "direct")
#: encrypted / unprotected must reach this, per mode (issue #3, item 7).
GOALS = {"simple": 0.60, "extended": 0.75, "prepared": 0.75}
#: Statements per transaction that touch the protected columns (insert, lookup, by id).
PII_STATEMENTS = 3
ROLE = "bench"
ENVELOPE_MARK = "pgc1:"

Conn = psycopg.Connection[tuple[Any, ...]]


class SetupError(RuntimeError):
    """The benchmark cannot measure anything meaningful (the message says why)."""


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Spec:
    key: str
    dbname: str
    policy: str | None  # "protect" | "other" | None
    description: str


SPECS = {
    "encrypted": Spec(
        "encrypted",
        "pii_encrypted",
        "protect",
        "pgcloak, policy encrypts + blind-indexes users.email (email) and users.phone (phone)",
    ),
    "unprotected": Spec(
        "unprotected",
        "pii_unprotected",
        "other",
        "pgcloak, policy loaded but naming another table: users is plain text",
    ),
    "nopolicy": Spec("nopolicy", "pii_nopolicy", None, "pgcloak without --policy (pass-through)"),
    "direct": Spec("direct", "pii_direct", None, "PostgreSQL itself, plain users table"),
}

POLICY_PROTECT = """\
# bench/pii.py: the table under test, protected
version: 1
tables:
  public.users:
    email: {{encrypt: true, index: exact, normalize: email}}
    phone: {{encrypt: true, index: exact, normalize: phone}}
roles:
  {role}: {{read: reveal}}
# The trail's cost is measured by bench/audit.py; this benchmark isolates encryption.
audit:
  enabled: false
"""

POLICY_OTHER = """\
# bench/pii.py: a policy that protects a table the workload never touches
version: 1
tables:
  public.customers:
    email: {{encrypt: true, index: exact, normalize: email}}
    phone: {{encrypt: true, index: exact, normalize: phone}}
roles:
  {role}: {{read: reveal}}
# The trail's cost is measured by bench/audit.py; this benchmark isolates encryption.
audit:
  enabled: false
"""

TABLE_DDL = "CREATE TABLE users (id bigserial PRIMARY KEY, email text, phone text);\n"
PLAIN_INDEXES = (
    "CREATE UNIQUE INDEX users_email_key ON users (email);\n"
    "CREATE INDEX users_phone_idx ON users (phone);\n"
)


# --------------------------------------------------------------------------- workload


def workload_script(mode: str, seed_rows: int) -> str:
    """The pgbench script for ``-M mode``.

    pgbench's ``\\set`` is numeric only, so the strings come from a table-free SELECT
    whose row ``\\gset`` stores in variables. In extended and prepared mode pgbench
    sends ``:var`` as a ``$n`` parameter, which is what the proxy must encrypt; in
    simple mode it pastes the variable's text into the SQL as is (also inside quotes),
    so there the placeholders are quoted and the proxy sees string literals. The
    statements are otherwise identical in every mode. The lookups ``\\gset`` their
    row too: pgbench aborts the client unless exactly one row comes back, so a lookup
    that silently finds nothing cannot pass as a fast one.
    """
    q = "'" if mode == "simple" else ""
    return "\n".join(
        [
            "\\set uid random(1000000000, 9999999999)",
            f"\\set sid random(1, {seed_rows})",
            f"\\set rid random(1, {seed_rows})",
            "SELECT 'u' || :uid || '@example.com' AS new_email, '+1' || :uid AS new_phone, "
            "'seed' || :sid || '@example.com' AS find_email \\gset",
            f"INSERT INTO users (email, phone) VALUES ({q}:new_email{q}, {q}:new_phone{q}) "
            "ON CONFLICT (email) DO NOTHING;",
            "SELECT id AS found_id, phone AS found_phone FROM users "
            f"WHERE email = {q}:find_email{q} \\gset",
            "SELECT email AS got_email, phone AS got_phone FROM users WHERE id = :rid \\gset",
            "",
        ]
    )


def seed_email(i: int) -> str:
    return f"seed{i}@example.com"


def seed_phone(i: int) -> str:
    return f"+1555{i:07d}"


# ----------------------------------------------------------------------------- setup


def connect(endpoint: Endpoint) -> Conn:
    return psycopg.connect(
        host=endpoint.host,
        port=endpoint.port,
        user=endpoint.user,
        password=endpoint.password,
        dbname=endpoint.dbname,
        sslmode="disable",
        gssencmode="disable",
        connect_timeout=10,
        application_name="pgcloak-bench-setup",
        autocommit=True,
    )


def policy_ddl(policy_file: Path) -> str:
    """What ``pgcloak policy ddl`` says the protected columns need (indexes, CHECK constraints)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgcloak.cli", "policy", "ddl", str(policy_file),
         "--unique", "users.email"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0 or "left(email" not in proc.stdout:
        raise SetupError(
            f"pgcloak policy ddl failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc.stdout


def create_schema(pg: TemporaryPostgres, spec: Spec, policy_file: Path | None) -> None:
    """The users table in the target's database, owned by the bench role."""
    ddl = TABLE_DDL
    if spec.policy == "protect":
        assert policy_file is not None
        ddl += policy_ddl(policy_file)
    else:
        ddl += PLAIN_INDEXES
    pg.run_sql(f"SET ROLE {quote_ident(ROLE)};\n{ddl}", dbname=spec.dbname)


def write_policy(spec: Spec, scratch: Path) -> Path | None:
    if spec.policy is None:
        return None
    template = POLICY_PROTECT if spec.policy == "protect" else POLICY_OTHER
    path = scratch / f"policy-{spec.key}.yaml"
    path.write_text(template.format(role=ROLE, audit=scratch / f"audit-{spec.key}.jsonl"))
    return path


def seed(target: BenchTarget, rows: int) -> None:
    """``rows`` users with ids 1..rows, written through the target itself (COPY FROM STDIN)."""
    with connect(target.endpoint) as conn, conn.cursor() as cur:
        with cur.copy("COPY users (email, phone) FROM STDIN") as copy:
            for i in range(1, rows + 1):
                copy.write_row((seed_email(i), seed_phone(i)))


def check_seeded(direct: Endpoint, rows: int) -> None:
    """Ids must be exactly 1..rows: the script picks ids and seed numbers in that range."""
    with connect(direct) as conn:
        row = conn.execute("SELECT count(*), min(id), max(id) FROM users").fetchone()
        if row != (rows, 1, rows):
            raise SetupError(f"{direct.dbname}: expected ids 1..{rows} after seeding, got {row}")
        conn.execute("VACUUM ANALYZE users")


def _is_ciphertext(stored: object, plaintext: str) -> bool:
    return isinstance(stored, str) and ENVELOPE_MARK in stored and plaintext not in stored


def verify_encrypted(proxy: Endpoint, direct: Endpoint) -> list[str]:
    """Round trips through the encrypted target, and ciphertext at rest. Not timed.

    Writes and reads one user per protocol (psycopg's server-side binding = extended;
    ClientCursor = simple Query with literals), looks it up by email and by id through
    the proxy, then reads the rows directly from PostgreSQL. Raises SetupError on the
    first mismatch; returns a line per check for the report.
    """
    done: list[str] = []
    ids: list[int] = []
    with connect(proxy) as conn:
        for n, (proto, cursor) in enumerate(
            (("extended", psycopg.Cursor(conn)), ("simple", psycopg.ClientCursor(conn))), 1
        ):
            email, phone = f"check-{proto}@example.com", f"+1 555 010 000{n}"
            with cursor as cur:
                cur.execute(
                    "INSERT INTO users (email, phone) VALUES (%s, %s) RETURNING id", (email, phone)
                )
                inserted = cur.fetchone()
                if inserted is None:
                    raise SetupError(f"{proto}: INSERT ... RETURNING id returned no row")
                ids.append(inserted[0])
                cur.execute("SELECT id, email, phone FROM users WHERE email = %s", (email,))
                found = cur.fetchall()
                if found != [(inserted[0], email, phone)]:
                    raise SetupError(
                        f"{proto}: lookup by email through pgcloak returned {found!r}, "
                        f"expected {[(inserted[0], email, phone)]!r}"
                    )
                cur.execute("SELECT email, phone FROM users WHERE id = %s", (inserted[0],))
                by_id = cur.fetchall()
                if by_id != [(email, phone)]:
                    raise SetupError(
                        f"{proto}: select by id through pgcloak returned {by_id!r}, "
                        f"expected {[(email, phone)]!r}"
                    )
            done.append(f"{proto}: insert, lookup by email and by id return the plaintext")
        seeded = conn.execute("SELECT email, phone FROM users WHERE id = 1").fetchall()
        if seeded != [(seed_email(1), seed_phone(1))]:
            raise SetupError(f"seeded row 1 through pgcloak reads {seeded!r}")
    with connect(direct) as conn:
        rows = conn.execute(
            "SELECT id, email, phone FROM users WHERE id = ANY(%s) OR id = 1 ORDER BY id", (ids,)
        ).fetchall()
        plain = {1: (seed_email(1), seed_phone(1))} | {
            i: (f"check-{p}@example.com", f"+1 555 010 000{n}")
            for n, (i, p) in enumerate(zip(ids, ("extended", "simple"), strict=True), 1)
        }
        if len(rows) != len(plain):
            raise SetupError(f"direct read found {len(rows)} of the {len(plain)} rows written")
        for row_id, email, phone in rows:
            want_email, want_phone = plain[row_id]
            if not (_is_ciphertext(email, want_email) and _is_ciphertext(phone, want_phone)):
                raise SetupError(
                    f"row {row_id} is not ciphertext at rest: email={str(email)[:60]!r} "
                    f"phone={str(phone)[:60]!r} (expected '<index>.{ENVELOPE_MARK}...')"
                )
        done.append(f"direct read: email and phone are '<index>.{ENVELOPE_MARK}...' envelopes")
        conn.execute("DELETE FROM users WHERE id = ANY(%s)", (ids,))
    return done


def verify_plain(target: BenchTarget, direct: Endpoint) -> None:
    """A baseline must really be unprotected: plaintext at rest, plaintext through it."""
    want = [(seed_email(1), seed_phone(1))]
    for where, endpoint in (("direct", direct), ("through the target", target.endpoint)):
        with connect(endpoint) as conn:
            got = conn.execute("SELECT email, phone FROM users WHERE id = 1").fetchall()
        if got != want:
            raise SetupError(f"{target.key}: row 1 read {where} is {got!r}, expected {want!r}")


def ciphertext_census(direct: Endpoint) -> tuple[int, int]:
    """(rows, rows with a plaintext email or phone) in the encrypted table, read directly."""
    with connect(direct) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE email NOT LIKE %s OR phone NOT LIKE %s) "
            "FROM users",
            (f"%{ENVELOPE_MARK}%", f"%{ENVELOPE_MARK}%"),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def row_count(direct: Endpoint) -> int | None:
    try:
        with connect(direct) as conn:
            row = conn.execute("SELECT count(*) FROM users").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else int(row[0])


def start_target(
    spec: Spec,
    pg: TemporaryPostgres,
    direct: Endpoint,
    policy_file: Path | None,
    master_key: str,
    scratch: Path,
    workers: int = 1,
    env_extra: dict[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
    start_timeout: float = 30.0,
) -> BenchTarget:
    """Start ``spec``'s proxy (``wrap`` may prefix its command line, e.g. with valgrind)."""
    if spec.key == "direct":
        return BenchTarget(spec.key, f"PostgreSQL {pg.version}, plain users table", direct)
    port = free_port(HOST)
    extra = ["--policy", str(policy_file)] if policy_file is not None else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PGCLOAK_MASTER_KEY", None)
    if policy_file is not None:
        env["PGCLOAK_MASTER_KEY"] = master_key
    env.update(env_extra or {})
    argv = pgcloak_argv(port, pg.port, workers=workers, extra=extra)
    proc = ManagedProcess(
        spec.key,
        wrap(argv) if wrap is not None else argv,
        port=port,
        listeners=workers,
        log_file=scratch / f"{spec.key}.log",
        env=env,
    ).start(start_timeout)
    return BenchTarget(spec.key, spec.description, direct.with_port(port), proc)


# ------------------------------------------------------------------------- reporting


def _report(targets: list[BenchTarget], args: argparse.Namespace) -> dict[str, Any]:
    by_key = {t.key: t for t in targets}

    def tps(key: str, mode: str) -> float | None:
        target = by_key.get(key)
        return target.tps(mode) if target else None

    print_table(
        f"PII workload TPS  ({args.clients} clients, {args.threads} threads, "
        f"{args.seconds:g} s x {args.rounds} round(s); ± = half the range across rounds)",
        ["target", *MODES],
        [[t.key, *(t.cell(m) for m in MODES)] for t in targets],
        plain=args.plain,
    )

    ratio_defs = [
        ("encrypted / unprotected", "encrypted", "unprotected"),
        ("encrypted / nopolicy", "encrypted", "nopolicy"),
        ("unprotected / nopolicy", "unprotected", "nopolicy"),
        ("pgcloak (unprotected) / direct", "unprotected", "direct"),
        ("pgcloak (nopolicy) / direct", "nopolicy", "direct"),
        ("encrypted / direct", "encrypted", "direct"),
    ]
    ratios: dict[str, dict[str, float | None]] = {}
    rows = []
    for name, num, den in ratio_defs:
        if num not in by_key or den not in by_key:
            continue
        ratios[name] = {m: ratio(tps(num, m), tps(den, m)) for m in MODES}
        rows.append([name, *(fmt_ratio(ratios[name][m]) for m in MODES)])
    print_table(
        "TPS ratios (higher is better for the left side)", ["ratio", *MODES], rows, plain=args.plain
    )

    baseline = "unprotected" if "unprotected" in by_key else "nopolicy"
    added: dict[str, float | None] = {}
    if "encrypted" in by_key and baseline in by_key:

        def per_tx(key: str, mode: str) -> float | None:
            value = tps(key, mode)
            return None if not value else 1e6 / value

        rows = [[t.key, *(fmt_num(per_tx(t.key, m)) for m in MODES)] for t in targets]
        for m in MODES:
            a, b = per_tx("encrypted", m), per_tx(baseline, m)
            added[m] = None if a is None or b is None else a - b
        rows.append([f"encrypted - {baseline}", *(fmt_num(added[m]) for m in MODES)])
        per_statement = {
            m: None if (value := added[m]) is None else value / PII_STATEMENTS for m in MODES
        }
        rows.append(
            [
                f"  per PII statement (/{PII_STATEMENTS})",
                *(fmt_num(per_statement[m]) for m in MODES),
            ]
        )
        print_table(
            "µs per transaction = 1e6 / TPS (the clients saturate the machine, so this is "
            "what the bottleneck spends on one transaction; the difference is what encryption "
            "adds, undiluted by the statements it does not touch)",
            ["", *MODES],
            rows,
            plain=args.plain,
        )

    goals: list[dict[str, Any]] = []
    rows = []
    for mode in MODES:
        need = GOALS[mode]
        value = ratio(tps("encrypted", mode), tps(baseline, mode))
        verdict = "n/a" if value is None else ("PASS" if value >= need else "MISS")
        goal = f"encrypted >= {need:.2f}x {baseline}"
        goals.append({"goal": goal, "mode": mode, "ratio": value, "need": need, "verdict": verdict})
        rows.append([goal, mode, fmt_ratio(value), f">= {need:.2f}x", verdict])
    print_table(
        "Project targets (timings never fail the run)",
        ["goal", "mode", "ratio", "need", "verdict"],
        rows,
        plain=args.plain,
        right_align_from=2,
    )
    return {"ratios": ratios, "added_us_per_transaction": added, "goals": goals}


def _progress(result: PgbenchResult, total: int, done: int) -> None:
    if result.ok:
        detail = f"{result.tps:>9,.0f} tps  {result.latency_ms or 0:7.3f} ms"
        if result.failed:
            detail += f"  {result.failed} failed"
    else:
        detail = f"ERROR {result.error}"
    print(
        f"[{done:>3}/{total}] round {result.round + 1} {result.case:<9} "
        f"{result.target:<12} {detail}",
        file=sys.stderr,
        flush=True,
    )


def _log_findings(target: BenchTarget, limit: int = 5) -> str | None:
    """Warnings and errors the proxy logged (it runs at --log-level warning)."""
    if target.process is None:
        return None
    try:
        text = target.process.log_file.read_text(errors="replace")
    except OSError:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    shown = "\n    ".join(ln[:300] for ln in lines[:limit])
    more = f"\n    ... {len(lines) - limit} more line(s)" if len(lines) > limit else ""
    return f"{target.key}: the proxy logged {len(lines)} line(s):\n    {shown}{more}"


# ------------------------------------------------------------------------------ main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A PII workload (insert, lookup by email, select by id) through pgcloak "
        "on an encrypted table, pgcloak on the same table unprotected, and PostgreSQL directly",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, averaged (2)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--seed-rows",
        type=int,
        default=10_000,
        help="users seeded per target before measuring (default 10000)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of warm-up per target, split over the modes (default 3, 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 round: a smoke run")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} "
        f"(default {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plain", action="store_true", help="plain-text tables even with rich")
    parser.add_argument(
        "--show-scripts", action="store_true", help="print the pgbench scripts and exit"
    )
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
    if "encrypted" not in args.targets:
        parser.error("the encrypted target is what this benchmark measures; keep it")
    if min(args.seconds, args.rounds, args.clients, args.threads, args.seed_rows) < 1:
        parser.error("--seconds, --rounds, --clients, --threads and --seed-rows must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    scratch = scratch_dir("pgcloak-bench-pii-")
    pg: TemporaryPostgres | None = None
    targets: list[BenchTarget] = []
    try:
        print("starting PostgreSQL ...", file=sys.stderr, flush=True)
        pg = start_postgres(clients=args.clients)
        password = secrets.token_urlsafe(16)
        pg.create_role(ROLE, password)
        pgbench = pgbench_path(pg)
        master_key = generate_master_key()

        specs = [SPECS[k] for k in args.targets]
        direct_of: dict[str, Endpoint] = {}
        print("creating databases, starting targets, seeding ...", file=sys.stderr, flush=True)
        for spec in specs:
            pg.create_database(spec.dbname, owner=ROLE)
            direct = Endpoint(HOST, pg.port, ROLE, password, spec.dbname)
            direct_of[spec.key] = direct
            policy_file = write_policy(spec, scratch)
            create_schema(pg, spec, policy_file)
            try:
                target = start_target(spec, pg, direct, policy_file, master_key, scratch)
            except (StartError, OSError) as exc:
                if spec.key == "encrypted":
                    raise SetupError(f"the encrypted pgcloak did not start: {exc}") from exc
                notes.append(f"{spec.key}: failed to start, left out: {exc}")
                print(f"warning: {spec.key} failed to start: {exc}", file=sys.stderr)
                continue
            targets.append(target)  # at once, so a failure below still stops it
            try:
                seed(target, args.seed_rows)
                check_seeded(direct, args.seed_rows)
                if spec.key == "encrypted":
                    checks = verify_encrypted(target.endpoint, direct)
                    print("correctness check (encrypted):", file=sys.stderr)
                    for line in checks:
                        print(f"  ok  {line}", file=sys.stderr)
                else:
                    verify_plain(target, direct)
            except (psycopg.Error, SetupError) as exc:
                if spec.key in ("encrypted", "direct"):
                    tail = target.process.log_tail(10) if target.process else ""
                    raise SetupError(
                        f"{spec.key}: setup or correctness check failed: {exc}"
                        + (f"\nproxy log tail:\n{tail}" if tail else "")
                    ) from exc
                notes.append(f"{spec.key}: setup failed, left out: {exc}")
                targets.remove(target)
                if target.process is not None:
                    target.process.stop()

        scripts = {m: workload_script(m, args.seed_rows) for m in MODES}
        script_files: dict[str, str] = {}
        for mode, text in scripts.items():
            path = scratch / f"pii-{mode}.sql"
            path.write_text(text)
            script_files[mode] = str(path)

        meta: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "postgres": pg.version_string,
            "pgbench": tool_version([pgbench, "--version"]),
            "seconds": args.seconds,
            "rounds": args.rounds,
            "clients": args.clients,
            "threads": args.threads,
            "seed_rows": args.seed_rows,
            "targets": {t.key: t.description for t in targets},
            "scripts": scripts,
        }
        print(
            f"# {meta['postgres']}; {meta['cpus']} CPUs, load "
            f"{meta['loadavg_at_start'][0]:.2f}; {args.seed_rows:,} seeded users per target",
            flush=True,
        )
        for t in targets:
            print(f"#   {t.key:<12} {t.description}", flush=True)

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
            )

        # Warm-up: connections, caches, the proxies' plan caches; not measured, but a
        # statement the proxy refuses shows up here first, so errors are kept.
        for t in targets:
            for mode in MODES:
                result = one(t, mode, 0, max(1.0, args.warmup / len(MODES)), f"warmup-{mode}")
                if result.error:
                    notes.append(f"{t.key}: warm-up in {mode} mode: {result.error}")

        total = len(targets) * len(MODES) * args.rounds

        def measured(t: BenchTarget, mode: str, round_no: int) -> PgbenchResult:
            return one(t, mode, round_no, args.seconds, mode)

        runs = interleave(targets, MODES, args.rounds, measured)
        for done, (t, _mode, _round, result) in enumerate(runs, 1):
            t.add(result)
            _progress(result, total, done)

        for t in targets:
            if t.process is not None and not t.process.running:
                notes.append(
                    f"{t.key}: process exited during the run; log tail:\n{t.process.log_tail(10)}"
                )

        meta["loadavg_at_end"] = os.getloadavg()
        summary = _report(targets, args)

        census: dict[str, Any] = {}
        if "encrypted" in direct_of:
            rows, plain = ciphertext_census(direct_of["encrypted"])
            census = {"rows": rows, "plaintext_rows": plain}
            verdict = "all ciphertext" if plain == 0 else f"{plain} ROW(S) WITH PLAINTEXT"
            print(f"\nEncrypted table after the run, read directly: {rows:,} rows, {verdict}")
            if plain:
                notes.append(
                    f"encrypted: {plain} row(s) hold a plaintext email or phone: a proxy bug"
                )
        meta["rows_after"] = {t.key: row_count(direct_of[t.key]) for t in targets}

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
                    m: {
                        "mean": t.tps(m),
                        "spread": t.spread(m),
                        "failed": t.failed(m),
                        "latency_ms": t.latency_ms(m),
                    }
                    for m in MODES
                }
                for t in targets
            },
            **summary,
            "ciphertext_census": census,
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
    if args.show_scripts:
        for mode in MODES:
            print(f"-- pgbench -M {mode} -f (with --seed-rows {args.seed_rows})")
            print(workload_script(mode, args.seed_rows))
        return 0
    terminate_on_sigterm()
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    except SetupError as exc:
        print(f"\nerror: {exc}\nnothing was measured; everything stopped", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
