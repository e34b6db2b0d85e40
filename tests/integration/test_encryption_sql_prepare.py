"""SQL-level PREPARE / DEALLOCATE whose outcome pgcloak cannot see at send time.

pgcloak files a PREPARE's parameter actions under the statement's name when it sends it.
PostgreSQL may refuse it (42P05: the name still exists, because a DEALLOCATE failed in an
aborted transaction or was skipped after an error in its Query string): EXECUTE then runs
the old definition. pgcloak asks the server (pg_prepared_statements) which text a name
holds before it lets the name be executed, so the values of EXECUTE get the actions of
the statement that really runs. Before this, they went out in clear.
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


def test_a_failed_deallocate_leaves_the_first_definition_in_force(env: EncEnv) -> None:
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
        conn.execute(f"EXECUTE dw('dw-1', '{SSN}')")  # the INSERT runs: its ssn encrypted
    env.assert_stored(stored_ssn(env, "dw-1"), SSN, column="ssn")


def test_a_deallocate_skipped_after_an_error_in_its_query_string(env: EncEnv) -> None:
    with env.psy() as conn:
        conn.execute("PREPARE dq(text, text) AS INSERT INTO users (name, ssn) VALUES ($1, $2)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0; DEALLOCATE dq")
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            conn.execute("PREPARE dq(text, text) AS SELECT $1, $2")
        conn.execute(f"EXECUTE dq('dq-1', '{SSN}')")
    env.assert_stored(stored_ssn(env, "dq-1"), SSN, column="ssn")


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
