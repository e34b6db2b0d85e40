"""standard_conforming_strings decides what a backslash in '...' means; pgcloak must
read every statement on a protected table exactly as PostgreSQL will, or a string
constant can be made to end somewhere else for the server than for the planner and a
value reach a protected column unencrypted.

pgcloak follows the setting as the server reports it (ParameterStatus) and sends each
such constant spelled E'...', which reads the same under both settings: so even a
SET pipelined ahead of a statement cannot change what the server runs. Every case is
checked on both sides: plaintext through pgcloak, ciphertext read directly, and a
trail that holds none of the values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from psycopg import errors

# Under standard_conforming_strings = off, 'a\' || ' is one string: the e-mail after it
# is a value of its own. Read with the setting on, it hides inside a string constant
# and the rest of the line looks like a comment.
SMUGGLE = (
    "INSERT INTO users (id, name, email) VALUES ({id}, 'a\\' || ' , $$smuggled@example.com$$) --', "
    "'decoy@example.com')"
)


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("escapes"), "escapes") as e:
        yield e


def _off(conn: psycopg.Connection) -> None:
    conn.execute("SET standard_conforming_strings = off")
    assert conn.info.parameter_status("standard_conforming_strings") == "off"


def _trail(env: EncEnv, until: str) -> str:
    """The trail's text once it holds ``until`` (events are written off the client path)."""
    deadline = time.monotonic() + 10
    while True:
        text = "".join(p.read_text(encoding="utf-8") for p in env.workdir.glob("*.jsonl"))
        if until in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "extended"])
def test_setting_off_statement_is_read_as_the_server_reads_it(env: EncEnv, simple: bool) -> None:
    row = 9001 if simple else 9002
    # Without the CHECK backstop: what pgcloak itself sends is what is checked.
    with env.without_check("users", "users_email_pgcloak_check", f"DELETE FROM users WHERE id = {row}"):
        with env.psy() as conn:
            _off(conn)
            cur = psycopg.ClientCursor(conn) if simple else conn.cursor()
            cur.execute(SMUGGLE.format(id=row))
            assert cur.execute(f"SELECT name, email FROM users WHERE id = {row}").fetchall() == [
                ("a' || ", "smuggled@example.com")
            ]
        (stored,) = env.raw("SELECT email FROM users WHERE id = %s", row)
        env.assert_stored(stored[0], "smuggled@example.com")


def test_setting_off_escapes_reach_the_columns_decoded(env: EncEnv) -> None:
    with env.psy() as conn:
        _off(conn)
        cur = psycopg.ClientCursor(conn)
        cur.execute("INSERT INTO users (id, name, ssn, email) VALUES (9003, 'O\\'Brien', 'back\\\\slash', 'Esc@Example.com')")
        # A lookup under the same setting finds it by the value the server reads.
        rows = cur.execute("SELECT name, ssn FROM users WHERE email = 'esc@example.com' AND ssn IS NOT NULL").fetchall()
        assert rows == [("O'Brien", "back\\slash")]
    stored = env.raw_one("SELECT ssn, email FROM users WHERE id = 9003")
    env.assert_stored(stored[0], "back\\slash", column="ssn")
    env.assert_stored(stored[1], "Esc@Example.com")
    # The trail's fingerprint is made from the statement as the server read it.
    fingerprint = "INSERT INTO users (id, name, ssn, email) VALUES (?, ?, ?, ?)"
    trail = _trail(env, fingerprint)
    assert fingerprint in trail
    assert "Brien" not in trail and "slash" not in trail


def test_pipelined_set_cannot_change_what_the_server_reads(env: EncEnv) -> None:
    """The SET and the statement reach pgcloak before the server has answered the SET:
    whichever way the race goes, the server runs the statement pgcloak planned."""
    with env.without_check("users", "users_email_pgcloak_check", "DELETE FROM users WHERE id = 9004"):
        with env.psy() as conn:
            with conn.pipeline():
                conn.execute("SET standard_conforming_strings = off")
                conn.execute(SMUGGLE.format(id=9004))
            name, email = conn.execute("SELECT name, email FROM users WHERE id = 9004").fetchone() or (None, None)
        stored = env.raw_one("SELECT email FROM users WHERE id = 9004")
        assert email is not None
        env.assert_stored(stored, email)
        assert env.raw("SELECT count(*) FROM users WHERE email LIKE '%smuggled%' OR email LIKE '%decoy%'") == [(0,)]
        # Either the setting had reached pgcloak (the server's reading) or not (pgcloak's
        # reading, pinned with E''): never a mixture.
        pinned = ("a\\ , $$smuggled@example.com$$) --", "decoy@example.com")
        assert (name, email) in (("a' || ", "smuggled@example.com"), pinned)


def test_setting_on_backslash_constants_keep_their_meaning(env: EncEnv) -> None:
    with env.psy() as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("INSERT INTO users (id, name, ssn) VALUES (9005, 'C:\\dir', 'a\\b')")
        assert cur.execute("SELECT name, ssn FROM users WHERE id = 9005").fetchall() == [("C:\\dir", "a\\b")]
    env.assert_stored(env.raw_one("SELECT ssn FROM users WHERE id = 9005"), "a\\b", column="ssn")
    assert env.raw_one("SELECT name FROM users WHERE id = 9005") == "C:\\dir"


def test_national_constant_with_backslash_is_refused(env: EncEnv) -> None:
    with env.psy() as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(errors.FeatureNotSupported, match=r"N'\.\.\.'"):
            cur.execute("INSERT INTO users (id, ssn) VALUES (9006, N'x\\y')")
        assert cur.execute("SELECT 1").fetchall() == [(1,)]
    assert env.raw("SELECT count(*) FROM users WHERE id = 9006") == [(0,)]


def test_unprotected_statements_pass_as_sent(env: EncEnv) -> None:
    with env.psy() as conn:
        _off(conn)
        cur = psycopg.ClientCursor(conn)
        assert cur.execute("SELECT 'it\\'s', length('a\\\\b')").fetchall() == [("it's", 3)]


def test_setting_off_from_the_startup_packet_is_followed(env: EncEnv) -> None:
    with env.without_check("users", "users_email_pgcloak_check", "DELETE FROM users WHERE id = 9007"):
        with env.psy(options="-c standard_conforming_strings=off") as conn:
            assert conn.info.parameter_status("standard_conforming_strings") == "off"
            psycopg.ClientCursor(conn).execute(SMUGGLE.format(id=9007))
            assert conn.execute("SELECT email FROM users WHERE id = 9007").fetchone() == ("smuggled@example.com",)
        env.assert_stored(env.raw_one("SELECT email FROM users WHERE id = 9007"), "smuggled@example.com")
