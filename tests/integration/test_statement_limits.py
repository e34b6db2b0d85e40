"""A statement too deeply nested for pgcloak to analyze is refused with 54001 (what
PostgreSQL says of one too deep for it), not a dropped connection; the session and
everyone else's keep working, and a big but flat statement is planned and answered."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from psycopg import errors


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("limits"), "limits") as e:
        yield e


def _nested(depth: int, email: str) -> str:
    return "SELECT id FROM users WHERE " + "(" * depth + f"email = '{email}'" + ")" * depth


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_too_deeply_nested_statement_is_refused_and_the_session_lives(env: EncEnv, simple: bool) -> None:
    row, email = (8001, "deep@example.com") if simple else (8003, "deeper@example.com")
    with env.psy() as conn, env.psy() as other:
        cur = psycopg.ClientCursor(conn) if simple else conn.cursor()
        with pytest.raises(errors.StatementTooComplex, match="protected table"):
            cur.execute(_nested(3000, email))
        assert cur.execute("SELECT 1").fetchall() == [(1,)]
        assert other.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (0,)
        # Nesting pgcloak can follow still works, lookup rewritten as usual.
        conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (row, email))
        assert cur.execute(_nested(50, email)).fetchall() == [(row,)]


def test_many_alternatives_are_planned_and_looked_up(env: EncEnv) -> None:
    emails = [f"many{i}@example.com" for i in range(3000)]
    with env.psy() as conn:
        conn.execute("INSERT INTO users (id, email) VALUES (8002, 'many2999@example.com')")
        sql = "SELECT id FROM users WHERE " + " OR ".join(f"email = '{e}'" for e in emails)
        assert psycopg.ClientCursor(conn).execute(sql).fetchall() == [(8002,)]
    env.assert_stored(env.raw_one("SELECT email FROM users WHERE id = 8002"), "many2999@example.com")
