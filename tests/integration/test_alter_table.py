"""ALTER TABLE passes through pgcloak unparsed (adding columns, indexes and constraints
is how applications migrate), except the forms that would put a value pgcloak never
encrypted into a protected column, or take the table or its CHECK backstop away from
pgcloak: those are refused with 0A000 before PostgreSQL sees them, and nothing changes.
So are the CREATE forms that hang a table under a protected one or keep a value looked
up in a protected column in the catalog.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from psycopg import errors


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("alter"), "alter") as e:
        with e.psy() as conn:
            conn.execute("INSERT INTO users (id, name, ssn) VALUES (7001, 'Carol', NULL)")
        yield e


REFUSED = [
    ("ALTER TABLE users ALTER COLUMN ssn TYPE text USING coalesce(ssn, 'ssn-of-' || name)", "USING"),
    ("ALTER TABLE public.users ALTER ssn SET DATA TYPE text USING name", "USING"),
    ("ALTER TABLE users ALTER COLUMN email SET DEFAULT 'default@example.com'", "DEFAULT"),
    ("ALTER TABLE users ADD COLUMN nick text, ALTER COLUMN ssn SET DEFAULT 'x'", "DEFAULT"),
    ("ALTER TABLE users RENAME COLUMN ssn TO ssn_old", "renaming"),
    ("ALTER TABLE users RENAME TO people", "renaming"),
    ("ALTER TABLE plain_contacts RENAME TO users", "renaming"),
    ("ALTER TABLE users DROP CONSTRAINT users_ssn_pgcloak_check", "users_ssn_pgcloak_check"),
    ("ALTER TABLE IF EXISTS ONLY users DROP CONSTRAINT IF EXISTS users_email_pgcloak_check", "policy ddl"),
    ("ALTER TABLE users RENAME CONSTRAINT users_ssn_pgcloak_check TO c", "users_ssn_pgcloak_check"),
    ("ALTER TABLE users SET SCHEMA crm", "schema"),
]


def _state(env: EncEnv) -> tuple[object, ...]:
    """What a refused ALTER must leave as it was (read directly)."""
    columns = env.raw(
        "SELECT attname, format_type(atttypid, atttypmod), pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE attrelid = 'public.users'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    checks = env.raw("SELECT conname FROM pg_constraint WHERE conrelid = 'public.users'::regclass ORDER BY 1")
    return tuple(columns), tuple(checks), env.raw_one("SELECT ssn FROM users WHERE id = 7001")


@pytest.mark.parametrize(("sql", "says"), REFUSED, ids=[s[:60] for s, _ in REFUSED])
@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_hazardous_alter_is_refused_and_changes_nothing(env: EncEnv, sql: str, says: str, simple: bool) -> None:
    before = _state(env)
    with env.psy() as conn:
        cur = psycopg.ClientCursor(conn) if simple else conn.cursor()
        with pytest.raises(errors.FeatureNotSupported) as info:
            cur.execute(sql)
        assert says in str(info.value)
        assert cur.execute("SELECT count(*) FROM users WHERE id = 7001").fetchone() == (1,)
    assert _state(env) == before
    assert env.raw_one("SELECT to_regclass('public.users') IS NOT NULL")


def test_migrations_that_store_nothing_in_clear_still_run(env: EncEnv) -> None:
    with env.psy() as conn:
        conn.execute("ALTER TABLE users ADD COLUMN nick text DEFAULT 'none', ADD CONSTRAINT nick_len CHECK (length(nick) < 50)")
        conn.execute("ALTER TABLE users RENAME COLUMN nick TO nickname")
        conn.execute("ALTER TABLE users ALTER COLUMN ssn TYPE text")  # what `policy ddl` prints
        conn.execute("ALTER TABLE users ALTER COLUMN email DROP DEFAULT, ALTER COLUMN ssn SET DEFAULT NULL")
        conn.execute("ALTER TABLE users ALTER COLUMN name TYPE varchar(200) USING upper(name)")
        conn.execute("INSERT INTO users (id, ssn) VALUES (7002, '078-05-1120')")
        assert conn.execute("SELECT name, nickname, ssn FROM users WHERE id IN (7001, 7002) ORDER BY id").fetchall() == [
            ("CAROL", "none", None),
            (None, "none", "078-05-1120"),
        ]
        conn.execute("ALTER TABLE users DROP COLUMN nickname")
    env.assert_stored(env.raw_one("SELECT ssn FROM users WHERE id = 7002"), "078-05-1120", column="ssn")


CREATE_REFUSED = [
    ("CREATE TABLE users_child (extra text) INHERITS (users)", "INHERITS"),
    ("CREATE TABLE users_part PARTITION OF users FOR VALUES IN (1)", "PARTITION OF"),
    ("CREATE INDEX users_alice ON users (id) WHERE email = 'alice@example.com'", "partial index"),
]


@pytest.mark.parametrize(("sql", "says"), CREATE_REFUSED, ids=[s[:40] for s, _ in CREATE_REFUSED])
def test_create_under_a_protected_table_is_refused(env: EncEnv, sql: str, says: str) -> None:
    with env.psy() as conn:
        with pytest.raises(errors.FeatureNotSupported, match=says):
            conn.execute(sql)
        # Indexes and partial indexes that hold no value of a protected column still work.
        conn.execute("CREATE INDEX IF NOT EXISTS users_recent ON users (id) WHERE id > 1000 AND ssn IS NOT NULL")
    assert env.raw("SELECT relname FROM pg_class WHERE relname IN ('users_child', 'users_part', 'users_alice')") == []
    assert "alice" not in str(env.raw("SELECT pg_get_indexdef(indexrelid) FROM pg_index"))
