"""Encrypted columns through pgcloak with psql: the simple protocol (values as literals
in the text, E'' strings, several statements in one Query), ``\\copy`` in and out, and
refusals that leave the session usable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env, unique

PSQL = shutil.which("psql")
pytestmark = pytest.mark.skipif(PSQL is None, reason="psql is not installed")


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_psql"), "psql") as e:
        yield e


def psql(env: EncEnv, script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` through pgcloak: unaligned, tuples only, going on after errors."""
    assert PSQL is not None
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ |= {
        "PGHOST": env.proxy.host,
        "PGPORT": str(env.proxy.port),
        "PGUSER": env.login.user,
        "PGPASSWORD": env.login.password,
        "PGDATABASE": env.dbname,
        "PGSSLMODE": "disable",
        "PGCONNECT_TIMEOUT": "10",
        "PGAPPNAME": "pgcloak-enc-psql",
    }
    return subprocess.run(
        [PSQL, "-X", "-q", "-A", "-t", "-v", "VERBOSITY=verbose", "-f", "-"],
        input=script, env=environ, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )


def sections(stdout: str) -> dict[str, list[str]]:
    """Lines printed after each ``\\echo ==name==``."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("==") and line.endswith("=="):
            current = out.setdefault(line.strip("="), [])
        else:
            current.append(line)
    return out


def check_one(env: EncEnv, email: str, column: str, plain: str | None) -> None:
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email), columns=f"email, {column}")
    assert len(stored) == 1
    env.assert_stored(stored[0][0], email)
    env.assert_stored(stored[0][1], plain, USERS, column)


def test_literals_round_trip_with_quotes_backslashes_and_unicode(env: EncEnv):
    a, b, c = unique("Psql-A"), unique("psql-b"), unique("psql-c")
    weird = "it's a \\ back\\slash, a \"quote\"\nand 漢字 😀"
    script = f"""
\\echo ==insert==
INSERT INTO users (email, phone, ssn, name) VALUES ('{a}', '+33 1 23 45 67 89', E'it''s a \\\\ back\\\\slash, a "quote"\\nand 漢字 😀', 'x'),
  ('{b}', NULL, '', DEFAULT) RETURNING email, phone, ssn IS NULL;
\\echo ==empty==
SELECT '[' || name || ']', ssn FROM users WHERE email = '{b}';
\\echo ==lookup==
SELECT email, phone FROM users WHERE email = '{a.upper()}';
SELECT count(*) FROM users WHERE email IN ('{a}', '{b}', 'nobody@example.com');
SELECT count(*) FROM users WHERE email = ANY('{{{a},{b}}}');
SELECT count(*) FROM users WHERE email = ANY(ARRAY['{a}', '{b.upper()}']);
SELECT email FROM users WHERE phone = '+33123456789';
\\echo ==multi==
SELECT 1 AS one \\; SELECT email FROM users WHERE email = '{b}' \\; SELECT 'plain' AS p;
\\echo ==update==
UPDATE users SET phone = '555 0000' WHERE email = '{b}' RETURNING email, phone;
\\echo ==prepare==
PREPARE psql_find(text) AS SELECT email FROM users WHERE email = $1;
EXECUTE psql_find('{a}');
\\echo ==cursor==
BEGIN;
DECLARE enc_cur CURSOR FOR SELECT email FROM users WHERE email IN ('{a}', '{b}') ORDER BY id;
FETCH ALL FROM enc_cur;
COMMIT;
\\echo ==view==
CREATE TEMP VIEW enc_view AS SELECT id, email AS contact FROM users;
SELECT contact FROM enc_view WHERE id = (SELECT id FROM users WHERE email = '{a}');
\\echo ==describe==
\\d users
\\echo ==upsert==
INSERT INTO users (email, name) VALUES ('{a.lower()}', 'dup') ON CONFLICT (email) DO NOTHING;
INSERT INTO users (email, phone) VALUES (' {a.upper()} ', '555 4242') ON CONFLICT (email) DO UPDATE SET phone = EXCLUDED.phone RETURNING email, phone;
INSERT INTO users (email) VALUES ('{a.upper()}');
\\echo ==explain_analyze==
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) INSERT INTO users (email, ssn) VALUES ('{c}', 'explained');
SELECT ssn FROM users WHERE email = '{c}';
\\echo ==delete==
DELETE FROM users WHERE email = '{b}' RETURNING email;
\\echo ==end==
"""
    proc = psql(env, script)
    assert proc.returncode == 0, proc.stderr
    # the one error: a duplicate of a (differently cased) e-mail on the unique index
    errs = proc.stderr.strip().splitlines()
    assert "ERROR:  23505: duplicate key value violates unique constraint \"users_email_pgcloak_idx\"" in errs[0], errs
    assert a not in proc.stderr and a.upper() not in proc.stderr
    out = sections(proc.stdout)
    assert out["upsert"] == [f"{a}|555 4242"]  # DO UPDATE SET phone: the e-mail stays
    assert out["explain_analyze"][-1] == "explained"
    check_one(env, c, "ssn", "explained")
    assert out["insert"] == [f"{a}|+33 1 23 45 67 89|f", f"{b}||f"]
    assert out["empty"] == ["|"]  # name NULL (DEFAULT), ssn the empty string
    assert out["lookup"] == [f"{a}|+33 1 23 45 67 89", "2", "2", "2", a]
    assert out["multi"] == ["1", b, "plain"]
    assert out["update"] == [f"{b}|555 0000"]
    assert out["prepare"] == [a]
    assert out["delete"] == [b]
    assert out["cursor"] == [a, b]
    assert out["view"] == [a]  # decided by the envelope, not by the SQL: views work
    assert any("email" in line and "text" in line for line in out["describe"]), out["describe"]
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", a), columns="email, phone, ssn")
    assert len(stored) == 1
    env.assert_stored(stored[0][0], a)
    env.assert_stored(stored[0][1], "555 4242", USERS, "phone")
    env.assert_stored(stored[0][2], weird, USERS, "ssn")
    assert env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", b)) == 0


def test_copy_in_and_out_with_backslash_copy(env: EncEnv, tmp_path: Path):
    emails = [unique("Copy") for _ in range(3)]
    (tmp_path / "in.csv").write_text(
        f'{emails[0]},555-1111\n"{emails[1]}",\n{emails[2]},"+1 (555) 222-3333"\n', encoding="utf-8"
    )
    # text format with \r\n line ends (a Windows file): the \r is not part of the value
    (tmp_path / "in.txt").write_bytes(f"{unique('tcopy')}\t\\N\tssn\\twith tab\r\n".encode())
    text_email = (tmp_path / "in.txt").read_text().split("\t")[0]
    script = f"""
\\copy users (email, phone) from 'in.csv' csv
\\copy users (email, phone, ssn) from 'in.txt'
\\echo ==lookup==
SELECT phone FROM users WHERE email = '{emails[2].upper()}';
SELECT ssn FROM users WHERE email = '{text_email}';
\\copy (SELECT email, phone FROM users WHERE email IN ('{emails[0]}', '{emails[1]}', '{emails[2]}') ORDER BY id) to 'out.csv' csv
\\copy (SELECT email, ssn FROM users WHERE email = '{text_email}') to 'out.txt'
\\echo ==end==
"""
    proc = psql(env, script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert sections(proc.stdout)["lookup"] == ["+1 (555) 222-3333", "ssn\twith tab"]
    assert (tmp_path / "out.csv").read_text() == (
        f'"{emails[0]}","555-1111"\n"{emails[1]}",\n"{emails[2]}","+1 (555) 222-3333"\n'
    )
    assert (tmp_path / "out.txt").read_text() == f"{text_email}\tssn\\twith tab\n"
    phones = ["555-1111", None, "+1 (555) 222-3333"]
    for email, phone in zip(emails, phones, strict=True):
        stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email), columns="email, phone")
        assert len(stored) == 1
        env.assert_stored(stored[0][0], email)
        env.assert_stored(stored[0][1], phone, USERS, "phone")


def test_refusals_keep_the_session_usable(env: EncEnv):
    email = unique("refuse")
    script = f"""
INSERT INTO users (email, phone) VALUES ('{email}', '555');
\\echo ==like==
SELECT id FROM users WHERE email LIKE '%example.com';
SELECT 'after-like';
\\echo ==range==
SELECT id FROM users WHERE phone > '5';
\\echo ==order==
SELECT id FROM users ORDER BY email;
\\echo ==function==
SELECT id FROM users WHERE lower(email) = '{email}';
\\echo ==insert_select==
INSERT INTO users (email) SELECT email FROM plain_contacts;
\\echo ==do==
DO $$ BEGIN UPDATE users SET email = 'plain@example.com' WHERE id = 1; END $$;
\\echo ==copy_file==
COPY users (email) FROM '/etc/hostname';
\\echo ==still==
SELECT email FROM users WHERE email = '{email}';
\\echo ==txn==
BEGIN;
SELECT id FROM users ORDER BY phone;
SELECT 1;
ROLLBACK;
SELECT 'recovered';
\\echo ==end==
"""
    proc = psql(env, script)
    assert proc.returncode == 0, proc.stderr
    out = sections(proc.stdout)
    assert out["like"] == ["after-like"]
    assert out["still"] == [email]
    assert out["txn"] == ["recovered"]
    errs = [line for line in proc.stderr.splitlines() if line.startswith("psql:")]
    expected = [
        ("0A000", "public.users.email", "LIKE"),
        ("0A000", "public.users.phone", "range"),
        ("0A000", "public.users.email", "ORDER BY"),
        ("0A000", "public.users.email", "lower"),
        ("0A000", "public.users.email", "INSERT ... SELECT"),
        ("0A000", "DO", "(users)"),
        ("0A000", "public.users", "STDIN"),
        ("0A000", "public.users.phone", "ORDER BY"),
        ("25P02", "current transaction is aborted", ""),
    ]
    assert len(errs) == len(expected), proc.stderr
    for line, words in zip(errs, expected, strict=True):
        for word in words:
            assert word in line, (word, line)
    assert "plain@example.com" not in " ".join(str(r) for r in env.raw("SELECT email FROM users"))
