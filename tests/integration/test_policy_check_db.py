"""`pgcloak policy check-db`: a database compared with what `policy ddl` gives the policy's
protected columns (text type, lookup index, ciphertext-only CHECK), against a real server.

The fixture database has the DDL applied (encryption_fixtures runs `policy ddl`); each test
then breaks one thing directly in PostgreSQL and puts it back."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pytest
from encryption_fixtures import EncEnv, encryption_env, unique

from pgcloak import cli


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("checkdb"), "checkdb") as e:
        yield e


def check_db(env: EncEnv, *flags: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    policy = env.policy_path.with_name("full-policy.yaml")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["policy", "check-db", str(policy), "--dsn", env.direct_dsn(), *flags])
    return code, out.getvalue() + err.getvalue()


def without_phone_check(env: EncEnv) -> contextlib.AbstractContextManager[None]:
    return env.without_check(
        "users", "users_phone_pgcloak_check", "UPDATE users SET phone = NULL WHERE phone !~ '^[A-Za-z0-9_-]{22}\\.pgc1:'"
    )


def test_a_database_with_the_ddl_applied_is_ok(env: EncEnv) -> None:
    with env.direct() as d:
        d.execute("CREATE OR REPLACE VIEW user_contacts AS SELECT id, email FROM users")
        d.execute("CREATE OR REPLACE VIEW contact_ids AS SELECT id FROM user_contacts")  # a view of a view
        d.execute("CREATE MATERIALIZED VIEW IF NOT EXISTS user_count AS SELECT count(*) FROM users")
    code, text = check_db(env)
    assert code == 0, text
    for key in ("public.users.email", "public.users.phone", "public.users.ssn", "crm.Contacts.Email"):
        assert f"{key}: OK" in text, text
    assert "is NOT VALID" in text  # as `policy ddl` leaves them: rows before are not checked
    assert "views over public.users: contact_ids, user_contacts (" in text  # not the materialized one


def test_a_missing_check_and_plaintext_rows_are_problems(env: EncEnv) -> None:
    plain = unique("clear")
    with without_phone_check(env):
        with env.direct() as d:
            d.execute("INSERT INTO users (phone) VALUES (%s)", (plain,))
        code, text = check_db(env)
        assert code == 1
        assert "public.users.phone: PROBLEM" in text
        assert "no CHECK constraint users_phone_pgcloak_check" in text
        assert "public.users.email: OK" in text
        assert "not in pgcloak's stored form" not in text  # not counted without --scan
        code, text = check_db(env, "--scan")
        assert code == 1 and "1 value(s) not in pgcloak's stored form" in text, text
        assert plain not in text  # counted, never shown
    code, text = check_db(env)
    assert code == 0, text


def test_a_missing_lookup_index_is_a_problem(env: EncEnv) -> None:
    with env.direct() as d:
        d.execute("DROP INDEX users_phone_pgcloak_idx")
    try:
        code, text = check_db(env)
        assert code == 1 and "no lookup index users_phone_pgcloak_idx" in text, text
    finally:
        with env.direct() as d:
            d.execute("CREATE INDEX users_phone_pgcloak_idx ON users ((left(phone, 22)))")


def test_a_column_of_another_type_is_reported_and_scan_does_not_fail(env: EncEnv) -> None:
    policy = env.policy_path.with_name("typed.yaml")
    policy.write_text("version: 1\ntables:\n  public.orders:\n    amount: {encrypt: true}\n", encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["policy", "check-db", str(policy), "--dsn", env.direct_dsn(), "--scan"])
    assert code == 1 and "type is integer, not text" in out.getvalue(), out.getvalue()


@pytest.mark.parametrize(
    "dsn", ["postgresql://nobody@127.0.0.1:1/x", "postgresql://x@127.0.0.1:1/x?sslmode=bogus", "mysql://x@h/db"]
)
def test_an_unreachable_or_malformed_database_is_a_clear_error(env: EncEnv, dsn: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["policy", "check-db", str(env.policy_path), "--dsn", dsn])
    assert code == 2 and "cannot read the database" in err.getvalue(), err.getvalue()


def test_a_default_on_a_protected_column_is_a_problem(env: EncEnv) -> None:
    with env.direct() as d:
        d.execute("ALTER TABLE users ALTER COLUMN ssn SET DEFAULT 'unknown'")
    try:
        code, text = check_db(env)
        assert code == 1 and "public.users.ssn: PROBLEM" in text
        assert "has a non-NULL DEFAULT" in text and "unknown" not in text  # the value is not shown
    finally:
        with env.direct() as d:
            d.execute("ALTER TABLE users ALTER COLUMN ssn DROP DEFAULT")
    assert check_db(env)[0] == 0

