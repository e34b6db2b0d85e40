"""Where a stored value comes from: only the same protected column's stored form may be
copied into a protected column unencrypted. A value from a CTE body, one branch of a
UNION, an inner query's own table or a composite's (...).* expansion may be plaintext
(PostgreSQL resolves names innermost-first, matches UNION columns by position, and
expands (...).* into as many columns as the type has): refused with 0A000, checked with
pgcloak's CHECK backstop dropped so that only pgcloak stands in the way.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from psycopg import errors

LEAK = "origin-leak@example.com"


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("origins"), "origins") as e:
        with e.direct() as d:
            d.execute("INSERT INTO plain_contacts (email, phone) VALUES (%s, '555-0000')", (LEAK,))
            d.execute("CREATE TABLE plain2 (a bigint, b text)")
            d.execute("INSERT INTO plain2 VALUES (6005, '222-33-4444')")
        with e.psy() as conn:
            conn.execute("INSERT INTO users (id, email, ssn) VALUES (6001, 'victim@example.com', '078-05-1120')")
        yield e


REFUSED = [
    "WITH x AS (SELECT email FROM plain_contacts) INSERT INTO users (email) SELECT email FROM x",
    "WITH x AS (SELECT email FROM plain_contacts LIMIT 1) UPDATE users SET email = x.email FROM x WHERE users.id = 6001",
    "INSERT INTO users (email) SELECT s.email FROM "
    "(SELECT email FROM users WHERE false UNION ALL SELECT p.email FROM plain_contacts p) s",
    "WITH x AS (SELECT email FROM users WHERE false UNION SELECT email FROM plain_contacts) "
    "INSERT INTO users (email) SELECT email FROM x",
    "INSERT INTO users (id, ssn, name) VALUES ((ROW(6004, '111-22-3333')::plain2).*, 'decoy')",
    "INSERT INTO users (id, ssn, name) SELECT (p).*, 'decoy' FROM plain2 p WHERE a = 6005",
    "UPDATE users SET email = (SELECT email FROM plain_contacts LIMIT 1) WHERE id = 6001",
    # A subquery in FROM cannot see its sibling users u; its own FROM has the column (a * of
    # a plain table, a function's columns), and PostgreSQL takes that one.
    "INSERT INTO users (email) SELECT s.email FROM users u, "
    "(SELECT email FROM (SELECT * FROM plain_contacts) p) s WHERE u.id = 6001",
    "INSERT INTO users (email) SELECT s.email FROM users u JOIN "
    "(SELECT email FROM json_to_record('{\"email\": \"origin-leak@example.com\"}') AS t(email text)) s ON u.id = 6001",
    "INSERT INTO users (ssn) SELECT s.ssn FROM users u JOIN (SELECT ssn FROM unnest(ARRAY['decoy']) AS g(ssn)) s "
    "ON u.id = 6001",
    "INSERT INTO users (email) SELECT s.email FROM users u, "
    "(SELECT email FROM (VALUES ('origin-leak@example.com')) v(email)) s WHERE u.id = 6001",
]


def _plaintext_stored(env: EncEnv) -> list[tuple[object, ...]]:
    return env.raw(
        "SELECT id, email, ssn FROM users WHERE email IN (%s, 'decoy') OR ssn IN ('111-22-3333', '222-33-4444', 'decoy') "
        "OR (email IS NOT NULL AND email NOT LIKE '%%.pgc1:%%') OR (ssn IS NOT NULL AND ssn NOT LIKE 'pgc1:%%')",
        LEAK,
    )


@pytest.mark.parametrize("sql", REFUSED, ids=[s[:50] for s in REFUSED])
@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_value_that_may_be_plaintext_is_refused(env: EncEnv, sql: str, simple: bool) -> None:
    with env.without_check("users", "users_email_pgcloak_check", "DELETE FROM users WHERE id = -1"):
        with env.without_check("users", "users_ssn_pgcloak_check", "DELETE FROM users WHERE id = -1"):
            with env.psy() as conn:
                cur = psycopg.ClientCursor(conn) if simple else conn.cursor()
                with pytest.raises(errors.FeatureNotSupported):
                    cur.execute(sql)
                assert cur.execute("SELECT email FROM users WHERE id = 6001").fetchone() == ("victim@example.com",)
            assert _plaintext_stored(env) == []


def test_unqualified_name_an_inner_table_may_own_must_be_qualified(env: EncEnv) -> None:
    sql = "SELECT id FROM users WHERE EXISTS (SELECT 1 FROM orders o WHERE o.amount >= 0 AND email = %s)"
    with env.psy() as conn:
        with pytest.raises(errors.FeatureNotSupported, match="qualify it"):
            conn.execute(sql, ("victim@example.com",))
        conn.execute("INSERT INTO orders (id, amount) VALUES (6100, 1)")
        qualified = "SELECT u.id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.amount >= 0 AND u.email = %s)"
        assert conn.execute(qualified, ("victim@example.com",)).fetchall() == [(6001,)]


def test_copies_of_the_same_protected_column_still_work(env: EncEnv) -> None:
    """(users.email is unique: the copies are of ssn.)"""
    with env.psy() as conn:
        conn.execute("WITH x AS (SELECT ssn FROM users WHERE id = 6001) INSERT INTO users (id, ssn) SELECT 6002, ssn FROM x")
        conn.execute(
            "INSERT INTO users (id, ssn) SELECT 6003, s.ssn FROM "
            "(SELECT ssn FROM users WHERE id = 6001 UNION ALL SELECT u.ssn FROM users u WHERE false) s"
        )
        rows = conn.execute("SELECT id, ssn FROM users WHERE id IN (6002, 6003) ORDER BY id").fetchall()
        assert rows == [(6002, "078-05-1120"), (6003, "078-05-1120")]
    for row_id in (6002, 6003):
        env.assert_stored(env.raw_one("SELECT ssn FROM users WHERE id = %s", row_id), "078-05-1120", column="ssn")
