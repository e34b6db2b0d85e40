"""psql through pgcloak: a script with \\copy, \\d, transactions and an error; multi-statement queries."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres


@pytest.fixture(scope="module")
def psql(pg: TemporaryPostgres) -> str:
    """psql from PATH, else the one next to the server (the embedded wheel ships it)."""
    found = shutil.which("psql") or (
        str(pg.bin_dir / "psql") if (pg.bin_dir / "psql").exists() else None
    )
    if found is None:
        pytest.skip("no psql on PATH or next to the server")
    return found


def psql_env(proxy, login: DbLogin, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {
        "PGHOST": proxy.host,
        "PGPORT": str(proxy.port),
        "PGUSER": login.user,
        "PGPASSWORD": login.password,
        "PGDATABASE": login.dbname,
        "PGSSLMODE": "disable",
        "PGCONNECT_TIMEOUT": "10",
        "PGAPPNAME": "pgcloak-psql-test",
    }
    env |= extra
    return env


def run_psql(
    psql: str, proxy, login: DbLogin, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [psql, "-X", *args],
        env=psql_env(proxy, login, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def section(stdout: str, name: str) -> list[str]:
    """Lines psql printed between ``\\echo ==name==`` and the next ``\\echo ==...==``."""
    lines = stdout.splitlines()
    start = lines.index(f"=={name}==") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("==")), len(lines))
    return lines[start:end]


def test_psql_script_copy_describe_transactions_and_error(
    psql, pgcloak, pg: TemporaryPostgres, pg_app_user, tmp_path: Path
):
    table = f"psql_t_{uuid.uuid4().hex[:8]}"
    (tmp_path / "in.csv").write_text(
        '1,alice,10.50\n2,"bob, jr.",20.25\n3,zoë ☃,0.01\n4,,\n', encoding="utf-8"
    )
    script = tmp_path / "script.sql"
    script.write_text(
        f"""\\set ON_ERROR_STOP 0
CREATE TABLE {table} (id int PRIMARY KEY, name text, amount numeric(10,2));
\\echo ==copy-in==
\\copy {table} FROM 'in.csv' csv
\\echo ==copy-out==
\\copy (SELECT id, name, amount FROM {table} ORDER BY id) TO 'out.csv' csv
\\echo ==describe==
\\d {table}
\\echo ==rollback==
BEGIN;
INSERT INTO {table} VALUES (100, 'rolled back', 1);
SELECT count(*) FROM {table} WHERE id = 100;
ROLLBACK;
SELECT count(*) FROM {table} WHERE id = 100;
\\echo ==commit==
BEGIN;
INSERT INTO {table} VALUES (101, 'committed', 2.5);
COMMIT;
SELECT name, amount FROM {table} WHERE id = 101;
\\echo ==error==
SELECT * FROM no_such_table_psql;
\\echo ==after-error==
SELECT 'still running', count(*) FROM {table};
\\echo ==failed-transaction==
BEGIN;
SELECT 1/0;
SELECT 1;
ROLLBACK;
SELECT 'recovered';
\\echo ==end==
""",
        encoding="utf-8",
    )
    try:
        proc = run_psql(psql, pgcloak, pg_app_user, "-A", "-f", str(script), cwd=tmp_path)
        out = proc.stdout
        assert proc.returncode == 0, (
            proc.stderr
        )  # ON_ERROR_STOP=0: errors do not change the exit code

        assert section(out, "copy-in") == ["COPY 4"]
        assert section(out, "copy-out") == ["COPY 4"]
        assert (tmp_path / "out.csv").read_text(encoding="utf-8") == (
            '1,alice,10.50\n2,"bob, jr.",20.25\n3,zoë ☃,0.01\n4,,\n'
        )

        describe = section(out, "describe")
        assert describe[0] == f'Table "public.{table}"'
        assert describe[1] == "Column|Type|Collation|Nullable|Default"
        assert describe[2:5] == ["id|integer||not null|", "name|text|||", "amount|numeric(10,2)|||"]
        assert "Indexes:" in describe
        assert f'    "{table}_pkey" PRIMARY KEY, btree (id)' in describe

        assert section(out, "rollback") == [
            "BEGIN", "INSERT 0 1", "count", "1", "(1 row)", "ROLLBACK", "count", "0", "(1 row)",
        ]  # fmt: skip
        assert section(out, "commit") == [
            "BEGIN", "INSERT 0 1", "COMMIT", "name|amount", "committed|2.50", "(1 row)",
        ]  # fmt: skip

        assert section(out, "error") == []
        error_line = 'ERROR:  relation "no_such_table_psql" does not exist'
        stderr_lines = proc.stderr.splitlines()
        assert any(
            line.startswith(f"psql:{script}:") and line.endswith(error_line)
            for line in stderr_lines
        ), proc.stderr
        assert section(out, "after-error") == ["?column?|count", "still running|5", "(1 row)"]

        assert section(out, "failed-transaction") == [
            "BEGIN",
            "ROLLBACK",
            "?column?",
            "recovered",
            "(1 row)",
        ]
        assert any(line.endswith("ERROR:  division by zero") for line in stderr_lines), proc.stderr
        assert any(
            line.endswith(
                "ERROR:  current transaction is aborted, commands ignored until end of transaction block"
            )
            for line in stderr_lines
        ), proc.stderr
        assert section(out, "end") == []
        assert len([line for line in stderr_lines if "ERROR:" in line]) == 3, proc.stderr

        # The committed state, seen directly by PostgreSQL.
        direct = pg.run_sql(
            f"SELECT id, coalesce(name, '<null>') FROM {table} ORDER BY id", pg_app_user.dbname
        )
        assert direct.splitlines() == [
            "1|alice",
            "2|bob, jr.",
            "3|zoë ☃",
            "4|<null>",
            "101|committed",
        ]
    finally:
        pg.run_sql(f"DROP TABLE IF EXISTS {table}", pg_app_user.dbname)


def test_psql_multi_statement_simple_query(psql, pgcloak, pg_app_user):
    # One Query message, several results: psql >= 15 prints every result.
    multi = "select 1; select 2; select 'three' as x, 4"
    proc = run_psql(psql, pgcloak, pg_app_user, "-A", "-t", "-c", multi)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["1", "2", "three|4"]

    # An error in the middle stops the rest of the query string (one implicit transaction).
    proc = run_psql(psql, pgcloak, pg_app_user, "-A", "-t", "-c", "select 1; select 1/0; select 3")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["1"]
    assert "ERROR:  division by zero" in proc.stderr


def test_psql_multi_statement_implicit_transaction_rolls_back(
    psql, pgcloak, pg: TemporaryPostgres, pg_app_user
):
    table = f"psql_m_{uuid.uuid4().hex[:8]}"
    created = run_psql(
        psql, pgcloak, pg_app_user, "-c", f"CREATE TABLE {table} (id int PRIMARY KEY)"
    )
    assert (created.returncode, created.stdout) == (0, "CREATE TABLE\n"), created.stderr
    try:
        proc = run_psql(
            psql, pgcloak, pg_app_user, "-A", "-t", "-c",
            f"insert into {table} values (1); insert into {table} values (1); insert into {table} values (2)",
        )  # fmt: skip
        assert proc.returncode == 1
        assert f'duplicate key value violates unique constraint "{table}_pkey"' in proc.stderr
        # The whole query string was one implicit transaction: nothing is left.
        assert pg.run_sql(f"SELECT count(*) FROM {table}", pg_app_user.dbname) == "0"
    finally:
        pg.run_sql(f"DROP TABLE IF EXISTS {table}", pg_app_user.dbname)


def test_psql_over_tls_and_large_output(psql, pgcloak, pg_app_user):
    proc = run_psql(
        psql, pgcloak, pg_app_user, "-A", "-t", "-c",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid(); "
        "select count(*), sum(length(repeat(md5(g::text), 20))) from generate_series(1, 50000) g; "
        "select g, repeat('x', g % 97) from generate_series(1, 20000) g",
        PGSSLMODE="require", PGCHANNELBINDING="disable",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "t"
    assert lines[1] == f"50000|{50000 * 640}"
    rows = lines[2:]
    assert len(rows) == 20000
    assert rows == [f"{g}|{'x' * (g % 97)}" for g in range(1, 20001)]
