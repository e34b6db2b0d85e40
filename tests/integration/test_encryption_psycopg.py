"""Encrypted columns through pgcloak with psycopg 3: server-side parameters (text
format, unnamed and named prepared statements), client-side literals (``ClientCursor``
puts the values in the SQL text), COPY FROM STDIN / TO STDOUT in text and CSV, and
pipeline mode.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import psycopg
import pytest
from encryption_fixtures import ORDERS, USERS, EncEnv, encryption_env, unique
from psycopg import errors


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_psy"), "psy") as e:
        yield e


@pytest.fixture
def conn(env: EncEnv) -> Iterator[psycopg.Connection]:
    with env.psy() as c:
        yield c


@pytest.fixture
def client_conn(env: EncEnv) -> Iterator[psycopg.Connection]:
    """Client-side binding: every value travels as a literal in a simple Query."""
    with env.psy(cursor_factory=psycopg.ClientCursor) as c:
        yield c


@pytest.mark.parametrize("prepare", [False, True], ids=["unnamed", "prepared"])
def test_server_side_params_round_trip(env: EncEnv, conn, prepare: bool):
    email, phone = unique(f"Psy{prepare}"), "+44 20 7946 0018"
    row = conn.execute(
        "INSERT INTO users (email, phone, ssn, loyalty_id) VALUES (%s, %s, %s, %s) RETURNING id, email, phone, ssn",
        (email, phone, "AB-12", "card-7"), prepare=prepare,
    ).fetchone()
    assert row is not None and row[1:] == (email, phone, "AB-12")
    uid = row[0]
    stored = env.raw_one("SELECT email, phone, ssn, loyalty_id FROM users WHERE id = %s", uid)
    env.assert_stored(stored[0], email)
    env.assert_stored(stored[1], phone, USERS, "phone")
    env.assert_stored(stored[2], "AB-12", USERS, "ssn")
    env.assert_stored(stored[3], "card-7", USERS, "loyalty_id")
    for _ in range(3):  # a named statement, executed repeatedly
        got = conn.execute("SELECT id, email FROM users WHERE email = %s", (email.upper(),), prepare=prepare).fetchall()
        assert got == [(uid, email)]
    got = conn.execute("SELECT id FROM users WHERE email = ANY(%s)", ([email, unique()],), prepare=prepare).fetchall()
    assert got == [(uid,)]
    got = conn.execute("SELECT id FROM users WHERE loyalty_id = %s", ("card-7",), prepare=prepare).fetchall()
    assert got == [(uid,)]
    new = unique("moved")
    cur = conn.execute("UPDATE users SET email = %s WHERE email = %s", (new, email), prepare=prepare)
    assert cur.rowcount == 1
    env.assert_stored(env.raw_one("SELECT email FROM users WHERE id = %s", uid), new)
    cur = conn.execute("DELETE FROM users WHERE email = %s", (new,), prepare=prepare)
    assert cur.rowcount == 1


def test_binary_params(env: EncEnv, conn):
    email = unique("Binary")
    with conn.cursor(binary=True) as cur:
        cur.execute("INSERT INTO users (email, ssn) VALUES (%b, %b) RETURNING id, email, ssn", (email, "bin-ssn"))
        uid, got_email, got_ssn = cur.fetchone()
        assert (got_email, got_ssn) == (email, "bin-ssn")
        cur.execute("SELECT id FROM users WHERE email = ANY(%b)", ([email.upper(), "nobody@example.com"],))
        assert cur.fetchall() == [(uid,)]
    stored = env.raw_one("SELECT email, ssn FROM users WHERE id = %s", uid)
    env.assert_stored(stored[0], email)
    env.assert_stored(stored[1], "bin-ssn", USERS, "ssn")


def test_executemany_and_duplicate(env: EncEnv, conn):
    emails = [unique("many") for _ in range(5)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO users (email, phone) VALUES (%s, %s)", [(e, f"555-{i:04d}") for i, e in enumerate(emails)])
        assert cur.rowcount == 5
    stored = env.raw("SELECT email, phone FROM users WHERE left(email, 22) = ANY(%s) ORDER BY id",
                     [env.index_of(USERS, "email", e) for e in emails])
    for (s_email, s_phone), e, i in zip(stored, emails, range(5), strict=True):
        env.assert_stored(s_email, e)
        env.assert_stored(s_phone, f"555-{i:04d}", USERS, "phone")
    with pytest.raises(errors.UniqueViolation):
        conn.execute("INSERT INTO users (email) VALUES (%s)", (emails[0].title(),))


def test_client_side_literals(env: EncEnv, client_conn):
    conn = client_conn
    a, b = unique("Lit-a"), unique("lit-b")
    rows = conn.execute(
        "INSERT INTO users (email, phone, ssn, name) VALUES (%s, %s, %s, %s), (%s, DEFAULT, NULL, %s) "
        "RETURNING id, email, phone, ssn",
        (a, "555 123", "it's-\\-secret", "o'neil", b, "b"),
    ).fetchall()
    assert [r[1:] for r in rows] == [(a, "555 123", "it's-\\-secret"), (b, None, None)]
    (ua, sa, pa, xa), (ub, sb, pb, xb) = env.raw(
        "SELECT id, email, phone, ssn FROM users WHERE id = ANY(%s) ORDER BY id", [r[0] for r in rows]
    )
    env.assert_stored(sa, a)
    env.assert_stored(pa, "555 123", USERS, "phone")
    env.assert_stored(xa, "it's-\\-secret", USERS, "ssn")
    env.assert_stored(sb, b)
    assert (pb, xb) == (None, None)
    assert conn.execute("SELECT name FROM users WHERE id = %s", (ua,)).fetchone() == ("o'neil",)
    # same statement shape with other literals (the plan comes from the shape cache)
    for email, uid in ((a, ua), (b, ub), (a.upper(), ua)):
        assert conn.execute("SELECT id FROM users WHERE email = %s", (email,)).fetchall() == [(uid,)]
    assert conn.execute("SELECT id FROM users WHERE email IN (%s, %s) ORDER BY id", (a, b)).fetchall() == [(ua,), (ub,)]
    assert conn.execute("SELECT id FROM users WHERE email = ANY(%s) ORDER BY id", ([b, a],)).fetchall() == [(ua,), (ub,)]
    cur = conn.execute("UPDATE users SET phone = %s WHERE email = %s", ("+1-202-555-0144", b))
    assert cur.rowcount == 1
    env.assert_stored(env.raw_one("SELECT phone FROM users WHERE id = %s", ub), "+1-202-555-0144", USERS, "phone")
    assert conn.execute("SELECT email FROM users WHERE phone = %s", ("+1 (202) 555 0144",)).fetchone() == (b,)
    # orders in the same join group, written with literals
    conn.execute("INSERT INTO orders (buyer_email, amount) VALUES (%s, 5), (%s, 6)", (a.upper(), b))
    got = conn.execute(
        "SELECT u.email, o.amount FROM orders o JOIN users u ON u.email = o.buyer_email "
        "WHERE o.buyer_email IN (%s, %s) ORDER BY o.amount", (a, b)
    ).fetchall()
    assert got == [(a, 5), (b, 6)]
    stored = env.raw("SELECT buyer_email FROM orders WHERE left(buyer_email, 22) = %s",
                     env.index_of(ORDERS, "buyer_email", a))
    assert len(stored) == 1
    env.assert_stored(stored[0][0], a.upper(), ORDERS, "buyer_email")
    cur = conn.execute("DELETE FROM orders WHERE buyer_email = %s", (b,))
    assert cur.rowcount == 1
    # SQL-level PREPARE / EXECUTE with a literal argument
    conn.execute("PREPARE psy_find(text) AS SELECT id FROM users WHERE email = $1")
    assert conn.execute("EXECUTE psy_find(%s)", (a,)).fetchall() == [(ua,)]
    conn.execute("DEALLOCATE psy_find")


def test_copy_from_stdin_write_row_text_and_csv(env: EncEnv, conn):
    text_rows = [(unique("copyT"), "555-0001", "tab\there"), (unique("copyT"), None, "back\\slash\nnewline")]
    with conn.cursor() as cur:
        with cur.copy("COPY users (email, phone, ssn) FROM STDIN") as copy:
            for r in text_rows:
                copy.write_row(r)
        csv_rows = [(unique("copyC"), "555-0002", 'quote " comma, x'), (unique("copyC"), "", "")]
        with cur.copy("COPY users (email, phone, ssn) FROM STDIN WITH (FORMAT csv)") as copy:
            copy.write(f'{csv_rows[0][0]},{csv_rows[0][1]},"quote "" comma, x"\n')
            copy.write(f'{csv_rows[1][0]},,""\n')
    expected = [*text_rows, (csv_rows[0][0], "555-0002", 'quote " comma, x'), (csv_rows[1][0], None, "")]
    for email, phone, ssn in expected:
        stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email), columns="email, phone, ssn")
        assert len(stored) == 1, email
        env.assert_stored(stored[0][0], email)
        env.assert_stored(stored[0][1], phone, USERS, "phone")
        env.assert_stored(stored[0][2], ssn, USERS, "ssn")
        got = conn.execute("SELECT email, phone, ssn FROM users WHERE email = %s", (email,)).fetchall()
        assert got == [(email, phone, ssn)]


def test_copy_in_refusals_store_nothing(env: EncEnv, conn):
    leak = unique("copyleak")
    with conn.cursor() as cur:
        # a delimiter the COPY rewriter does not split on: refused, never stored as is
        with pytest.raises(errors.FeatureNotSupported) as err, cur.copy(
            "COPY users (name, email) FROM STDIN (DELIMITER ',')"
        ) as copy:
            copy.write(f"bob,{leak}\n")
        assert "DELIMITER" in str(err.value) and "public.users" in str(err.value)
        # a value the phone normalizer refuses, in the middle of the stream
        with pytest.raises(errors.InvalidParameterValue) as err, cur.copy(
            "COPY users (email, phone) FROM STDIN"
        ) as copy:
            copy.write_row((unique("copyok"), "555-0101"))
            copy.write_row((leak, "call me maybe"))
        assert "users.phone" in str(err.value) and "call me" not in str(err.value)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert env.raw_one("SELECT count(*) FROM users WHERE email LIKE %s OR name = 'bob'", f"%{leak}%") == 0
    assert env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", leak)) == 0


def test_copy_to_stdout_is_decrypted_text_and_csv(env: EncEnv, conn):
    email, ssn = unique("copyout"), 'tab\t"q",\\ ü'
    uid = conn.execute("INSERT INTO users (email, ssn) VALUES (%s, %s) RETURNING id", (email, ssn)).fetchone()[0]
    with conn.cursor() as cur:
        with cur.copy(f"COPY (SELECT id, email, ssn, phone FROM users WHERE id = {uid}) TO STDOUT") as copy:
            rows = list(copy.rows())
        assert rows == [(str(uid), email, ssn, None)]
        data = b""
        with cur.copy("COPY users (id, email, ssn) TO STDOUT WITH (FORMAT csv)") as copy:
            for chunk in copy:
                data += bytes(chunk)
        assert b"pgc1:" not in data
        assert [str(uid), email, ssn] in list(csv.reader(io.StringIO(data.decode())))
        data = b""
        query = f"COPY (SELECT id, email, ssn FROM users WHERE email = '{email}') TO STDOUT (FORMAT csv, FORCE_QUOTE *)"
        with cur.copy(query) as copy:
            for chunk in copy:
                data += bytes(chunk)
        assert list(csv.reader(io.StringIO(data.decode()))) == [[str(uid), email, ssn]]
        data = b""
        with cur.copy(f"COPY (SELECT id, ssn FROM users WHERE id = {uid}) TO STDOUT (FORMAT csv, DELIMITER ';')") as copy:
            for chunk in copy:
                data += bytes(chunk)
        assert list(csv.reader(io.StringIO(data.decode()), delimiter=";")) == [[str(uid), ssn]]
        # text format with another delimiter: the decrypted value could not be escaped for it
        with pytest.raises(errors.FeatureNotSupported, match="DELIMITER"), cur.copy(
            "COPY users (id, ssn) TO STDOUT (DELIMITER ',')"
        ) as copy:
            list(copy)


def test_refusal_in_transaction_and_pipeline(env: EncEnv, conn):
    email = unique("txn")
    # explicit transaction: a refusal aborts it exactly like a server error
    conn.autocommit = False
    conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))
    with pytest.raises(errors.FeatureNotSupported) as err:
        conn.execute("SELECT id FROM users WHERE email LIKE %s", ("%x%",))
    assert "public.users.email" in str(err.value)
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute("SELECT 1")
    conn.rollback()
    conn.autocommit = True
    assert env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", email)) == 0
    assert conn.execute("SELECT 1").fetchone() == (1,)

    # pipeline: statements before the refused one ran (committed at their Sync); its
    # error comes in order; the rest is skipped up to the next Sync, as for a server error.
    before, after = unique("pipe-before"), unique("pipe-after")
    with pytest.raises(errors.FeatureNotSupported) as err:
        with conn.pipeline() as p:
            c1 = conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING email", (before,))
            p.sync()
            c2 = conn.execute("SELECT id FROM users ORDER BY email")
            conn.execute("INSERT INTO users (email) VALUES (%s)", (after,))
    assert "ORDER BY" in str(err.value) and "email" in str(err.value)
    assert c1.fetchone() == (before,)
    with pytest.raises(psycopg.Error):
        c2.fetchall()
    assert conn.execute("SELECT count(*) FROM users WHERE email = %s", (before,)).fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM users WHERE email = %s", (after,)).fetchone() == (0,)
    with conn.pipeline():
        c3 = conn.execute("SELECT email FROM users WHERE email = %s", (before,))
        c4 = conn.execute("SELECT 42")
    assert c3.fetchone() == (before,) and c4.fetchone() == (42,)


def test_every_sql_level_prepare_of_a_query_string_is_followed(env: EncEnv, conn) -> None:
    """A second PREPARE in one query string, and an EXECUTE of a statement the same
    string prepares, get their values encrypted like any other (review finding: they
    once reached PostgreSQL in clear); a name pgcloak never saw prepared is refused."""
    first, second = unique("prep2"), unique("prepexec")
    conn.execute(
        b"PREPARE a AS SELECT 1; PREPARE ins AS INSERT INTO users (email, ssn) VALUES ($1, $2)",
        prepare=False,
    )
    conn.execute(f"EXECUTE ins('{first}', '999-99-9999')".encode(), prepare=False)
    conn.execute(
        f"PREPARE ins2 AS INSERT INTO users (email) VALUES ($1); EXECUTE ins2('{second}')".encode(),
        prepare=False,
    )
    # Through pgcloak: plaintext; in PostgreSQL: ciphertext and the blind index.
    got = conn.execute("SELECT email, ssn FROM users WHERE email = %s", (first,)).fetchone()
    assert got == (first, "999-99-9999")
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", first), columns="email, ssn")
    assert len(stored) == 1
    env.assert_stored(stored[0][0], first)
    env.assert_stored(stored[0][1], "999-99-9999", USERS, "ssn")
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", second))
    assert len(stored) == 1
    env.assert_stored(stored[0][0], second)
    with pytest.raises(errors.InvalidSqlStatementName):  # 26000
        conn.execute(b"EXECUTE nobody('x@example.com')", prepare=False)
    conn.execute(b"DEALLOCATE ALL", prepare=False)
