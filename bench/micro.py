"""Micro-benchmarks of the per-statement hot paths: lexing, blind index, envelopes.

Prints microseconds per call: the best of many short timed batches (about 2 ms
each), because on a shared, noisy machine the minimum of short batches is what
comes closest to the uncontended cost. Never asserts anything about the timings and
always exits 0. Run it a few times and keep the best of each line.

    python bench/micro.py                 # every case, 100 batches each
    python bench/micro.py --repeat 300    # more batches, steadier minimum
    python bench/micro.py --only lex      # cases whose name contains "lex"

Cases:

    lex.*          pgcloak.sql.lexer.lex (sqlglot's tokenizer plus literal decoding)
    scan.*         pgcloak.sql.lexer.scan_literals (the fast literal scanner, when present)
    plan_simple.*  Planner.plan_simple on a warm shape cache (the simple-protocol hot path)
    blind_index.*  blind_index with the email / phone / none normalizers
    encrypt        encrypt of a 24-byte value
    decrypt        decrypt of that envelope (and of a composed ``<index>.<envelope>``)
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from pgcloak.crypto.blind_index import blind_index, compose
from pgcloak.crypto.envelope import decrypt, encrypt
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey
from pgcloak.policy import parse_policy
from pgcloak.sql import lexer
from pgcloak.sql.planner import Planner

POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
"""

#: Typical simple-protocol statements (~100 characters, 2-3 literals) and a longer one.
STATEMENTS = {
    "select": "SELECT id, phone FROM users WHERE email = 'alice.smith@example.com' AND id > 42 LIMIT 10",
    "insert": "INSERT INTO users (email, phone) VALUES ('bob@example.org', '+1 555 0100') ON CONFLICT (email) DO NOTHING",
    "update": "UPDATE users SET phone = E'+44 20 7946\\t0958', email = 'c@d.io' WHERE id = 7 -- fix",
    "long": (
        "/* report */ SELECT u.id, u.email, count(*) FROM users u JOIN orders o ON o.user_id = u.id "
        "WHERE u.email IN ('a@x.io', 'b@x.io', 'c@x.io', 'd@x.io') AND o.total >= 10.50 "
        "AND o.created_at > '2024-01-01'::timestamptz AND o.note <> $$it's fine$$ "
        "GROUP BY u.id, u.email ORDER BY 3 DESC LIMIT 100"
    ),
}


def best_us(fn: Callable[[], object], repeat: int, batch_s: float = 0.002) -> float:
    """Best per-call time in microseconds over ``repeat`` batches of about ``batch_s``."""
    timer = timeit.Timer(fn)
    number, took = timer.autorange()  # at least 0.2 s: also warms caches up
    number = max(1, int(number * batch_s / took))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def cases() -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    scan = getattr(lexer, "scan_literals", None)
    for name, sql in STATEMENTS.items():
        out[f"lex.{name}"] = lambda sql=sql: lexer.lex(sql)
        if scan is not None:
            out[f"scan.{name}"] = lambda sql=sql: scan(sql)
    planner = Planner(parse_policy(POLICY), index_length=22)
    for name, sql in STATEMENTS.items():
        planner.plan_simple(sql)  # warm the shape cache
        out[f"plan_simple.{name}"] = lambda sql=sql: planner.plan_simple(sql)

    keyring = Keyring(MasterKey(bytes(range(32))))
    out["blind_index.email"] = lambda: blind_index(keyring, "public.users.email", "  Alice.Smith@Example.COM ", "email")
    out["blind_index.phone"] = lambda: blind_index(keyring, "public.users.phone", "+1 (555) 010-0123", "phone")
    out["blind_index.none"] = lambda: blind_index(keyring, "public.users.ssn", "123-45-6789")
    value = b"alice.smith@example.com!"
    out["encrypt"] = lambda: encrypt(keyring, "public.users.email", value)
    envelope = encrypt(keyring, "public.users.email", value)
    stored = compose(blind_index(keyring, "public.users.email", value.decode(), "email"), envelope)
    out["decrypt"] = lambda: decrypt(keyring, envelope)
    out["decrypt.bytes"] = lambda: decrypt(keyring, envelope.encode("ascii"))
    out["decrypt.composed"] = lambda: decrypt(keyring, stored.encode("ascii"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=100, help="timed batches per case; the best is shown")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args(argv)
    for name, fn in cases().items():
        if args.only and args.only not in name:
            continue
        print(f"{name:24s} {best_us(fn, max(1, args.repeat)):8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
