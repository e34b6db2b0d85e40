"""Backfill benchmark: how fast `pgcloak backfill` encrypts a table that held PII in clear.

A table of ``--rows`` users (email, phone, ssn in clear) on a throwaway PostgreSQL, the
policy of ``pii.py`` plus ``ssn`` (encrypt only), twice:

    rewrite   one ``UPDATE users SET email = email || '', ...``: PostgreSQL rewriting every
              row and its index entries, no encryption; the floor for any in-place tool
    backfill  ``pgcloak backfill`` (the same command line a user runs, in this process):
              read by block ranges, encrypt and index in Python, write back in batches

Prints values per second and the ratio backfill / rewrite (time), then checks that the
table holds no plaintext afterwards. Never fails on timings; exit 0.

    python bench/backfill.py                 # 100,000 rows
    python bench/backfill.py --rows 20000 --batch 500
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import sys
import time

import psycopg

from common import fmt_num, fmt_ratio, generate_master_key, print_table, scratch_dir, start_postgres
from pgcloak import cli

POLICY = """\
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
    ssn: {encrypt: true}
"""

SCHEMA = """
DROP TABLE IF EXISTS users;
CREATE TABLE users (id bigserial PRIMARY KEY, name text, email text, phone text, ssn text);
INSERT INTO users (name, email, phone, ssn)
SELECT 'n' || g, 'user' || g || '@example.com', '+1555' || lpad(g::text, 7, '0'), lpad(g::text, 9, '0')
  FROM generate_series(1, {rows}) g;
CREATE UNIQUE INDEX users_email_pgcloak_idx ON users ((left(email, 22)));
CREATE INDEX users_phone_pgcloak_idx ON users ((left(phone, 22)));
VACUUM ANALYZE users;
"""


def _schema(conn: psycopg.Connection, rows: int) -> None:
    for statement in SCHEMA.format(rows=int(rows)).split(";"):
        if statement.strip():
            conn.execute(statement.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="pgcloak backfill --batch (default 1000)")
    parser.add_argument("--plain", action="store_true", help="plain-text tables even with rich")
    args = parser.parse_args(argv)
    scratch = scratch_dir("pgcloak-bench-backfill-")
    pg = None
    try:
        print("starting PostgreSQL ...", file=sys.stderr, flush=True)
        pg = start_postgres(clients=4)
        password = secrets.token_urlsafe(16)
        login = pg.create_login("bench", password, "backfill")
        dsn = pg.dsn(login.user, password, login.dbname)
        policy = scratch / "policy.yaml"
        policy.write_text(POLICY)
        values = 3 * args.rows

        with psycopg.connect(dsn, autocommit=True) as conn:
            _schema(conn, args.rows)
            started = time.perf_counter()
            conn.execute("UPDATE users SET email = email || '', phone = phone || '', ssn = ssn || ''")
            rewrite = time.perf_counter() - started
            _schema(conn, args.rows)  # the same table again, in clear

        os.environ["PGCLOAK_MASTER_KEY"] = generate_master_key()
        out = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out):
            code = cli.main(["backfill", str(policy), "--dsn", dsn, "--batch", str(args.batch)])
        backfill = time.perf_counter() - started

        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FROM users WHERE email !~ '^[A-Za-z0-9_-]{22}\\.pgc1:' "
                "OR phone !~ '^[A-Za-z0-9_-]{22}\\.pgc1:' OR ssn !~ '^pgc1:'"
            ).fetchone()
        print_table(
            f"Encrypting a table held in clear ({args.rows:,} rows x 3 protected columns; batch {args.batch})",
            ["", "seconds", "values/s"],
            [
                ["rewrite (one UPDATE, no encryption)", fmt_num(rewrite, 2), fmt_num(values / rewrite)],
                ["pgcloak backfill", fmt_num(backfill, 2), fmt_num(values / backfill)],
            ],
            plain=args.plain,
        )
        print(f"backfill / rewrite (time): {fmt_ratio(backfill / rewrite)}")
        print(f"pgcloak backfill exit status {code}; rows still holding a value in clear: {left[0] if left else '?'}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
