"""An operator run into a comment start: PostgreSQL cuts ``#--5`` into ``#`` and a
comment, sqlglot reads ``#-`` and ``-5``. A statement on a protected table written so is
refused (0A000) rather than planned from a reading the server does not share; any other
passes to PostgreSQL as sent."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from psycopg import errors

SMUGGLE = (
    "INSERT INTO users (id, email, name) VALUES ({id} #--5, 'decoy@example.com',\n"
    " 1, 'hash-leak@example.com', 'n')"
)


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("lexcomments"), "lexcomments") as e:
        yield e


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_operator_into_comment_on_protected_table_is_refused(env: EncEnv, simple: bool) -> None:
    with env.without_check("users", "users_email_pgcloak_check", "DELETE FROM users WHERE email LIKE '%leak%'"):
        with env.psy() as conn:
            cur = psycopg.ClientCursor(conn) if simple else conn.cursor()
            with pytest.raises(errors.FeatureNotSupported, match="comment start"):
                cur.execute(SMUGGLE.format(id=9006))
            assert cur.execute("SELECT 1").fetchall() == [(1,)]
        assert env.raw("SELECT count(*) FROM users") == [(0,)]


def test_other_statements_pass_as_postgresql_reads_them(env: EncEnv) -> None:
    with env.psy() as conn:
        # 6 # 3 (XOR) = 5: the server's reading, with "--5" a comment.
        assert psycopg.ClientCursor(conn).execute("SELECT 6 #--5\n 3").fetchall() == [(5,)]
