"""SQL-level PREPARE / DEALLOCATE whose outcome pgcloak cannot see at send time.

PostgreSQL may refuse a PREPARE (42P05: the name still exists, because a DEALLOCATE
failed in an aborted transaction or was skipped after an error in its Query string).
EXECUTE would then run the old statement, with arguments pgcloak transformed for the
new one: before, protected values went out in clear. pgcloak now sends EXECUTE as the
statement it knows for the name, so what runs is what it encrypted for, whatever the
server holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env

SSN = "078-05-1120"


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("sqlprep"), "sqlprep") as e:
        yield e


def stored_ssn(env: EncEnv, name: str) -> str:
    return env.raw_one("SELECT ssn FROM users WHERE name = %s", name)


def server_holds(conn: psycopg.Connection, name: str) -> str:
    row = conn.execute("SELECT statement FROM pg_prepared_statements WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def test_a_failed_deallocate_does_not_let_the_old_statement_run(env: EncEnv) -> None:
    with env.psy() as conn:
        conn.execute("PREPARE dw(text, text) AS INSERT INTO users (name, ssn) VALUES ($1, $2)")
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("DEALLOCATE dw")  # refused: PostgreSQL keeps the INSERT
        conn.execute("ROLLBACK")
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            conn.execute("PREPARE dw(text, text) AS SELECT $1, $2")
        assert "INSERT" in server_holds(conn, "dw")
        # pgcloak knew the DEALLOCATE could not run (a failed transaction) and kept the
        # INSERT too: EXECUTE runs it, as PostgreSQL does, with the SSN encrypted for it.
        assert conn.execute(f"EXECUTE dw('dw-1', '{SSN}')").rowcount == 1
    assert env.raw("SELECT 1 FROM users WHERE ssn = %s", SSN) == []
    stored = env.raw("SELECT ssn FROM users WHERE name = 'dw-1'")
    assert len(stored) == 1
    env.assert_stored(stored[0][0], SSN, column="ssn")


def test_a_deallocate_skipped_after_an_error_in_its_query_string(env: EncEnv) -> None:
    with env.psy() as conn:
        conn.execute("PREPARE dq(text, text) AS INSERT INTO users (name, ssn) VALUES ($1, $2)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0; DEALLOCATE dq")
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            conn.execute("PREPARE dq(text, text) AS SELECT $1, $2")
        assert "INSERT" in server_holds(conn, "dq")
        assert conn.execute(f"EXECUTE dq('dq-1', '{SSN}')").fetchone() == ("dq-1", SSN)
    assert env.raw("SELECT 1 FROM users WHERE name = 'dq-1' OR ssn = %s", SSN) == []


def test_a_statement_prepared_with_sql_is_not_bound(env: EncEnv) -> None:
    """A Bind runs the server's statement: for one prepared with SQL, refused."""
    with env.psy() as conn:
        conn.execute("PREPARE viabind(text, text) AS INSERT INTO users (name, ssn) VALUES ($1, $2)")
        res = conn.pgconn.exec_prepared(b"viabind", [b"vb-1", SSN.encode()])
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"0A000"
    assert env.raw("SELECT 1 FROM users WHERE name = 'vb-1'") == []


def test_a_deallocate_that_worked_lets_the_name_be_prepared_again(env: EncEnv) -> None:
    with env.psy() as conn:
        conn.execute("PREPARE ok(text, text) AS SELECT $1, $2")
        conn.execute("DEALLOCATE ok")
        conn.execute("PREPARE ok(text, text) AS INSERT INTO users (name, ssn) VALUES ($1, $2)")
        conn.execute(f"EXECUTE ok('ok-1', '{SSN}')")
        conn.execute("DEALLOCATE ok")
        conn.execute("PREPARE ok(text, text) AS SELECT $1, $2")
        assert conn.execute("EXECUTE ok('a', 'b')").fetchone() == ("a", "b")
    env.assert_stored(stored_ssn(env, "ok-1"), SSN, column="ssn")


def test_long_and_escaped_names(env: EncEnv) -> None:
    base = "p" * 63
    with env.psy() as conn:
        conn.execute(f"PREPARE {base}x1(text, text) AS INSERT INTO users (name, ssn) VALUES ($1, $2)")
        conn.execute(f"EXECUTE {base}x2('long-1', '{SSN}')")  # PostgreSQL: the same 63 bytes
        with pytest.raises(psycopg.errors.FeatureNotSupported, match=re.escape('U&"..."')):
            conn.execute('DEALLOCATE U&"\\0070"')
    env.assert_stored(stored_ssn(env, "long-1"), SSN, column="ssn")
