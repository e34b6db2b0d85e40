"""COPY FROM STDIN into a protected table: the field PostgreSQL stores in a protected
column is the one pgcloak encrypted, however the data is laid out.

Each case once stored an e-mail in clear (review of session 13): pgcloak split records
at LF only, split text fields at every TAB, opened CSV quotes only at a field's start,
let the old ``USING DELIMITERS`` option by, and chose the rewriter at Bind instead of at
Execute. Checked on both sides: the row read straight from PostgreSQL holds the e-mail's
stored form (CHECK constraints are in place too, so plaintext would have failed the COPY).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env, unique
from raw_wire import (
    COPY_DONE,
    SYNC,
    bind,
    copy_data,
    execute,
    parse,
    raw,
    read_messages,
    sqlstates,
    types,
)


@pytest.fixture(scope="module")
def env(pg: Any, pg_app_user: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_copy"), "copy") as e:
        yield e


def _copy(env: EncEnv, sql: str, data: bytes) -> None:
    with env.psy() as conn, conn.cursor() as cur, cur.copy(sql) as copy:
        copy.write(data)


def _stored(env: EncEnv, name: str) -> list[Any]:
    return [r[0] for r in env.raw("SELECT email FROM users WHERE name = %s ORDER BY id", name)]


@pytest.mark.parametrize("fmt", ["text", "csv"])
@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"], ids=["cr", "crlf", "lf"])
def test_every_line_end_postgresql_reads_gets_its_fields_encrypted(env: EncEnv, fmt: str, eol: bytes) -> None:
    name = unique("eol")
    sep = b"," if fmt == "csv" else b"\t"
    emails = [f"{name}-{i}@example.com" for i in range(3)]
    data = b"".join(name.encode() + sep + e.encode() + eol for e in emails)
    data += b"\\." + eol + name.encode() + sep + b"after-the-end@example.com" + eol  # not data
    _copy(env, f"COPY users (name, email) FROM STDIN (FORMAT {fmt})", data)
    stored = _stored(env, name)
    assert len(stored) == 3, stored
    for value, email in zip(stored, emails, strict=True):
        env.assert_stored(value, email)


def test_a_backslash_makes_the_tab_after_it_data(env: EncEnv) -> None:
    name = unique("tab")
    email = f"{name}@example.com"
    _copy(env, "COPY users (name, email) FROM STDIN", f"{name}\\\tx\t{email}\n".encode())
    [value] = _stored(env, f"{name}\tx")
    env.assert_stored(value, email)


def test_a_quote_in_the_middle_of_a_csv_field_opens_a_quoted_section(env: EncEnv) -> None:
    name = unique("q")
    email = f"{name}@example.com"
    _copy(env, "COPY users (name, email) FROM STDIN (FORMAT csv)", f'{name}"b,c,d"e,{email}\n'.encode())
    [value] = _stored(env, f"{name}b,c,de")
    env.assert_stored(value, email)


def test_a_csv_header_is_left_to_postgresql(env: EncEnv) -> None:
    name = unique("hdr")
    email = f"{name}@example.com"
    _copy(env, "COPY users (name, email) FROM STDIN (FORMAT csv, HEADER match)", f"name,email\n{name},{email}\n".encode())
    [value] = _stored(env, name)
    env.assert_stored(value, email)


@pytest.mark.parametrize(
    "options",
    ["USING DELIMITERS '|'", "WITH DELIMITER '|'", "(FORMAT csv, QUOTE '''')", "(ON_ERROR ignore)", "WITH OIDS"],
)
def test_options_that_change_how_fields_are_read_are_refused(env: EncEnv, options: str) -> None:
    name = unique("opt")
    with env.psy() as conn, pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
        with conn.cursor() as cur, cur.copy(f"COPY users (name, email) FROM STDIN {options}") as copy:
            copy.write(f"{name}|{name}@example.com\n".encode())
    assert "not supported" in str(caught.value)
    assert not _stored(env, name) and not env.raw("SELECT 1 FROM users WHERE email LIKE %s", f"%{name}%")


def test_a_second_copy_in_one_query_is_refused(env: EncEnv) -> None:
    with env.psy() as conn, pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
        conn.execute("COPY plain_contacts (email) FROM STDIN; COPY users (name, email) FROM STDIN")
    assert "only COPY" in str(caught.value)


def test_the_copy_that_runs_is_the_one_executed_not_the_last_bound(env: EncEnv) -> None:
    name = unique("portal")
    email = f"{name}@example.com"
    with env.psy() as conn:
        os.write(
            conn.pgconn.socket,
            parse("c1", "COPY users (name, email) FROM STDIN") + bind("p1", "c1")
            + parse("c2", "COPY users (email, name) FROM STDIN") + bind("p2", "c2")
            + execute("p1"),
        )  # fmt: skip
        msgs = read_messages(conn, lambda out: any(t in "GEZ" for t, _ in out))
        assert "G" in types(msgs), msgs
        replies = raw(conn, copy_data(f"{name}\t{email}\n") + COPY_DONE + SYNC, 1)
        assert not sqlstates(replies), replies
    [value] = _stored(env, name)
    env.assert_stored(value, email)


def test_data_postgresql_would_refuse_is_refused_with_its_sqlstate(env: EncEnv) -> None:
    name = unique("bad")
    with env.psy() as conn, pytest.raises(psycopg.errors.BadCopyFileFormat) as caught:
        with conn.cursor() as cur, cur.copy("COPY users (name, email) FROM STDIN") as copy:
            copy.write(f"{name}\t{name}@example.com\n{name}\t{name}-2@example.com\r".encode())
    assert f"{name}@example.com" not in str(caught.value)
    assert not _stored(env, name)


# -- second review (session 13): what the first fixes missed --------------------------------


def test_the_old_binary_keyword_is_binary_format(env: EncEnv) -> None:
    # COPY BINARY table (before 7.3, still accepted): read as the table name "BINARY",
    # the statement named no protected table and its data went by untouched.
    with env.psy() as conn, pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
        conn.execute("COPY BINARY users (name, email) FROM STDIN")
    assert "binary format" in str(caught.value)


@pytest.mark.parametrize(
    "sql",
    [
        'COPY U&"user\\0073" (name, email) FROM STDIN',
        'COPY users (name, U&"emai\\006c") FROM STDIN',
        "INSERT INTO U&\"user\\0073\" (name, email) VALUES ('n', 'u-escaped@example.com')",
    ],
)
def test_unicode_escaped_names_are_refused(env: EncEnv, sql: str) -> None:
    with env.psy() as conn, pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
        conn.execute(sql)
    assert 'U&"..."' in str(caught.value)
    assert not env.raw("SELECT 1 FROM users WHERE email = 'u-escaped@example.com'")


def test_a_copy_portal_is_known_by_the_name_postgresql_keeps(env: EncEnv) -> None:
    # PostgreSQL cuts portal names to 63 bytes: bound as one spelling, run as another.
    name = unique("long")
    email = f"{name}@example.com"
    with env.psy() as conn:
        os.write(
            conn.pgconn.socket,
            parse("cl", "COPY users (name, email) FROM STDIN") + bind("P" * 63 + "a", "cl") + execute("P" * 63 + "b"),
        )
        assert "G" in types(read_messages(conn, lambda out: any(t in "GEZ" for t, _ in out)))
        assert not sqlstates(raw(conn, copy_data(f"{name}\t{email}\n") + COPY_DONE + SYNC, 1))
    [value] = _stored(env, name)
    env.assert_stored(value, email)


def test_copy_portals_past_the_bound_are_refused_not_forgotten(env: EncEnv) -> None:
    with env.psy() as conn:
        os.write(
            conn.pgconn.socket,
            parse("cm", "COPY users (name, email) FROM STDIN")
            + b"".join(bind(f"p{i}", "cm") for i in range(1001))
            + SYNC,
        )
        replies = read_messages(conn, lambda out: any(t == "Z" for t, _ in out))
    assert sqlstates(replies) == ["54000"], sqlstates(replies)
