"""No value written in a statement reaches the audit trail or the proxy's log, whatever
form it is written in (review findings: constants pgcloak cannot decode, text around a
parse error, a number after PostgreSQL's ``@`` operator), and a parameter number no
PostgreSQL accepts cannot make pgcloak build a plan that size.

Real clients (psql: simple protocol; psycopg: extended) through an in-process pgcloak
whose trail goes to a fresh directory; the trail's records and the log lines pgcloak's
own formatters make are searched for a marker only the statement's text held.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env
from raw_wire import message, raw, sqlstates
from test_audit_trail import POLICY, Audited, audited

from pgcloak.demo.postgres import TemporaryPostgres
from pgcloak.logs import JsonFormatter, TextFormatter

PSQL = shutil.which("psql")


@pytest.fixture(scope="module")
def env(pg: TemporaryPostgres, pg_app_user: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("no_literals"), "noliterals", policy=POLICY) as e:
        yield e


class _Lines(logging.Handler):
    """What pgcloak's own formatters (JSON and text) print for each log record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._formats = (JsonFormatter(), TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(f.format(record) for f in self._formats)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    handler = _Lines()
    root = logging.getLogger("pgcloak")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _found(a: Audited, lines: list[str], marker: str) -> list[str]:
    """Where ``marker`` shows in the trail (``type.field``) or the log."""
    hits = [
        f"{r['type']}.{k}={v!r}"
        for r in a.records()
        for k, v in r.items()
        if marker.lower() in json.dumps(v, ensure_ascii=False).lower()
    ]
    return hits + [f"log: {line}" for line in lines if marker.lower() in line.lower()]


def _psql(a: Audited, app: str, script: str) -> str:
    done = a.psql(app, script)
    return done.stdout + done.stderr


#: Constants PostgreSQL reads (or rejects) but pgcloak cannot decode, so they are no
#: literal slot of the statement: it is refused, and its refusal is recorded in every
#: ``statements`` mode. The marker is what only the constant held.
UNDECODABLE = {
    "E'' surrogate pair": ("SELECT id FROM users WHERE email = E'zelda.e1\\uD83D\\uDE00@example.org';", "zelda.e1"),
    "U&'' UESCAPE": ("SELECT id FROM users WHERE email = U&'zelda.u2!0040example.org' UESCAPE '!';", "zelda.u2"),
    "U&'' surrogate pair": ("SELECT id FROM users WHERE email = U&'zelda.u3\\D83D\\DE00@example.org';", "zelda.u3"),
    "E'' byte not UTF-8": ("INSERT INTO users (email, ssn) VALUES ('a@b.c', E'078-05-1120\\xff');", "078-05-1120"),
    "E'' NUL": ("UPDATE users SET name = E'Zelda Nul\\0' WHERE id = 1;", "Zelda Nul"),
}


@pytest.mark.skipif(PSQL is None, reason="psql is installed by .ci/run")
@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_a_constant_pgcloak_cannot_decode_is_refused_and_not_recorded(
    log_lines: list[str], env: EncEnv, tmp_path: Path, case: str
) -> None:
    sql, marker = UNDECODABLE[case]
    with audited(env, tmp_path) as a:
        said = _psql(a, "undecodable", sql)
        refusals = [r for r in a.records() if r["type"] == "refusal"]
        assert refusals and "?" in refusals[0]["fingerprint"], said
        assert not _found(a, log_lines, marker), said


@pytest.mark.skipif(PSQL is None, reason="psql is installed by .ci/run")
def test_text_around_a_parse_error_is_not_recorded(log_lines: list[str], env: EncEnv, tmp_path: Path) -> None:
    """sqlglot's messages quote the statement (a tokenizer's excerpt, a token's text):
    the refusal says where the statement could not be read, not what it said."""
    with audited(env, tmp_path) as a:
        said = _psql(a, "comment", "SELECT id FROM users WHERE email = $1 -- for zelda.c4@example.org\nGROUP BY $1$;\n")
        said += _psql(a, "token", "SELECT id FROM users WHERE email = 'a' AND AND 'zelda.c6@example.org';\n")
        with a.psy("comment-ext") as conn, pytest.raises(psycopg.Error):
            conn.execute("SELECT id FROM users WHERE email = %s -- lookup of zelda.c5@example.org\nGROUP BY $1$", ("x@example.org",))
        refusals = [r for r in a.records() if r["type"] == "refusal"]
        assert len(refusals) >= 3 and all("could not be" in r["reason"] for r in refusals), refusals
        for marker in ("zelda.c4", "zelda.c5", "zelda.c6"):
            assert not _found(a, log_lines, marker), said


@pytest.mark.skipif(PSQL is None, reason="psql is installed by .ci/run")
def test_a_view_statement_and_statements_all_record_no_constant(log_lines: list[str], env: EncEnv, tmp_path: Path) -> None:
    """A statement pgcloak does not parse (a view over users, watched for protected
    values) and one on no protected table (statements: all) keep no constant either."""
    with env.direct() as conn:
        conn.execute("CREATE OR REPLACE VIEW people_nolit AS SELECT id, email, name FROM users")
    with audited(env, tmp_path, audit={"statements": "all"}) as a:
        with a.psy("seed") as conn:
            conn.execute("INSERT INTO users (email, name) VALUES (%s, %s)", ("seen.nolit@example.com", "W"))
        said = _psql(a, "watched", "SELECT email FROM people_nolit WHERE name <> E'Zelda W6 \\uD83D\\uDE00' LIMIT 1;\n")
        assert "@example.com" in said, said  # it ran, and returned a protected value
        said += _psql(
            a, "all", "INSERT INTO plain_contacts (email, phone) VALUES (E'zelda.a7\\uD83D\\uDE00@example.org', U&'555 0107');\n"
        )
        assert "ERROR" not in said, said
        for marker in ("Zelda W6", "zelda.a7"):
            assert not _found(a, log_lines, marker), said


@pytest.mark.skipif(PSQL is None, reason="psql is installed by .ci/run")
def test_a_number_after_the_at_operator_is_a_value(log_lines: list[str], env: EncEnv, tmp_path: Path) -> None:
    """``@ n`` is PostgreSQL's absolute value; sqlglot reads ``@`` as a parameter marker.
    On a protected table the statement is refused (pgcloak would misread it), without
    the number; and a huge number costs nothing (it once built a plan of n parameters:
    a minute of the proxy's time, or all its memory)."""
    with audited(env, tmp_path) as a:
        started = time.monotonic()
        said = _psql(
            a,
            "at",
            "SELECT id FROM users WHERE email = 'nobody@example.org' AND id <> @780511207;\n"
            "SELECT id FROM users WHERE ssn = @ 78051120;\n"
            "SELECT id FROM users WHERE email = $780511208;\n",
        )
        assert time.monotonic() - started < 10, "planning took as long as the parameter number is big"
        refusals = [r for r in a.records() if r["type"] == "refusal"]
        assert len(refusals) == 3, said
        assert [r["sqlstate"] for r in refusals] == ["0A000", "0A000", "42P02"], refusals
        for marker in ("78051120", "780511207", "780511208"):
            assert not _found(a, log_lines, marker), said


def test_a_constant_that_is_not_utf8_is_refused_and_the_session_goes_on(
    log_lines: list[str], env: EncEnv, tmp_path: Path
) -> None:
    """Raw bytes that are not UTF-8 inside a protected column's constant: 22021, as
    PostgreSQL says of such text, the value neither encrypted nor recorded, and the
    session serves its next statement (it used to end with XX000)."""
    with audited(env, tmp_path) as a:
        with a.psy("raw") as conn:
            for body in (
                b"INSERT INTO users (email) VALUES ('zelda.r1\xff@example.org')",
                b"SELECT id FROM users WHERE email = 'zelda.r2\xed\xa0\x80@example.org'",  # a surrogate
            ):
                replies = raw(conn, message(b"Q", body + b"\0"), 1)
                assert sqlstates(replies) == ["22021"], replies
            assert conn.execute("SELECT 1").fetchone() == (1,)
        for marker in ("zelda.r1", "zelda.r2"):
            assert not _found(a, log_lines, marker)
