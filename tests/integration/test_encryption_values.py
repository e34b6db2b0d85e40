"""Values through pgcloak: edge cases of the plaintext (empty, unicode, 10 KB, quotes and
backslashes, NULL) on every client path; hash-only columns; and stored values that fail
to decrypt (tampered, another master key), which must give an error, never garbage.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env, unique
from psycopg import errors

from pgcloak.crypto.blind_index import INDEX_LENGTH, blind_index, compose
from pgcloak.crypto.envelope import encrypt
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_val"), "val") as e:
        yield e


VALUES = {
    "empty": "",
    "unicode": "Ünïcødé 😀🐘 漢字テスト ☃ \u200b",
    "big": "0123456789abcdef" * 640,  # 10 KB
    "quotes": "it's \"quoted\" \\ back\\\\slash \\N \t tab\nnewline, comma; $1 $$ --",
    "space": "  padded  ",
}


def email_for(kind: str, via: str) -> str:
    return f"{kind}.{via}.{unique('v')}"


def check_row(env: EncEnv, email: str, ssn: str | None) -> None:
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email), columns="email, ssn")
    assert len(stored) == 1, email
    env.assert_stored(stored[0][0], email)
    env.assert_stored(stored[0][1], ssn, USERS, "ssn")


@pytest.mark.parametrize("kind", list(VALUES))
async def test_asyncpg_binary_params(env: EncEnv, kind: str):
    value, email = VALUES[kind], email_for(kind, "apg")
    conn = await env.apg()
    try:
        got = await conn.fetchval("INSERT INTO users (email, ssn) VALUES ($1, $2) RETURNING ssn", email, value)
        assert got == value
        assert await conn.fetchval("SELECT ssn FROM users WHERE email = $1", email) == value
    finally:
        await conn.close()
    check_row(env, email, value)


@pytest.mark.parametrize("cursor", ["server", "client"])
def test_psycopg_text_params_and_literals(env: EncEnv, cursor: str):
    factory = psycopg.ClientCursor if cursor == "client" else psycopg.Cursor
    with env.psy(cursor_factory=factory) as conn:
        for kind, value in VALUES.items():
            email = email_for(kind, cursor)
            got = conn.execute("INSERT INTO users (email, ssn) VALUES (%s, %s) RETURNING ssn", (email, value)).fetchone()
            assert got == (value,), kind
            assert conn.execute("SELECT ssn FROM users WHERE email = %s", (email,)).fetchone() == (value,)
            check_row(env, email, value)
        # a unicode and a quoted e-mail address as the indexed value itself
        for email in ("Ünï.😀@例え.jp", "o'brien\\x@example.com"):
            conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))
            assert conn.execute("SELECT email FROM users WHERE email = %s", (email.upper(),)).fetchone() == (email,)
            check_row(env, email, None)
            conn.execute("DELETE FROM users WHERE email = %s", (email,))


def test_copy_values(env: EncEnv):
    rows = [(email_for(kind, "copy"), value) for kind, value in VALUES.items()]
    with env.psy() as conn, conn.cursor() as cur:
        with cur.copy("COPY users (email, ssn) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        emails = [r[0] for r in rows]
        with cur.copy("COPY users (email, ssn) FROM STDIN (FORMAT csv)") as copy:
            for email, value in rows:
                quoted = '"' + value.replace('"', '""') + '"'
                copy.write(f"csv.{email},{quoted}\n")
        for email, value in rows:
            check_row(env, email, value)
            check_row(env, f"csv.{email}", value)
        with cur.copy("COPY (SELECT email, ssn FROM users WHERE email = ANY(%s)) TO STDOUT", (emails,)) as copy:
            got = sorted(copy.rows())
        assert got == sorted(rows)


async def test_null_stays_null_everywhere(env: EncEnv):
    conn = await env.apg()
    try:
        uid = await conn.fetchval(
            "INSERT INTO users (email, phone, ssn, loyalty_id) VALUES ($1, NULL, $2, $3) RETURNING id", None, None, None
        )
        row = await conn.fetchrow("SELECT email, phone, ssn, loyalty_id FROM users WHERE id = $1", uid)
        assert tuple(row) == (None, None, None, None)
        await conn.execute("UPDATE users SET ssn = $1 WHERE id = $2", None, uid)
    finally:
        await conn.close()
    assert env.raw_one("SELECT row(email, phone, ssn, loyalty_id)::text FROM users WHERE id = %s", uid) == "(,,,)"


async def test_hash_only_column(env: EncEnv):
    conn = await env.apg()
    try:
        email = unique("hash")
        uid = await conn.fetchval("INSERT INTO users (email, loyalty_id) VALUES ($1, $2) RETURNING id", email, "LOY-42")
        stored = env.raw_one("SELECT loyalty_id FROM users WHERE id = %s", uid)
        assert stored == env.index_of(USERS, "loyalty_id", "LOY-42")
        assert len(stored) == INDEX_LENGTH and "pgc1:" not in stored
        env.assert_stored(stored, "LOY-42", USERS, "loyalty_id")
        # lookups work (no normalization: exact), reading gives back the index (irreversible)
        assert await conn.fetchval("SELECT id FROM users WHERE loyalty_id = $1", "LOY-42") == uid
        assert await conn.fetchval("SELECT id FROM users WHERE loyalty_id = $1", "loy-42") is None
        assert await conn.fetchval("SELECT loyalty_id FROM users WHERE id = $1", uid) == stored
        assert await conn.fetchval("SELECT id FROM users WHERE loyalty_id = ANY($1)", ["x", "LOY-42"]) == uid
        await conn.execute("UPDATE users SET loyalty_id = $1 WHERE loyalty_id = $2", "LOY-43", "LOY-42")
        assert env.raw_one("SELECT loyalty_id FROM users WHERE id = %s", uid) == env.index_of(USERS, "loyalty_id", "LOY-43")
    finally:
        await conn.close()


def flip(stored: str, at: int) -> str:
    c = stored[at]
    return stored[:at] + ("A" if c != "A" else "B") + stored[at + 1 :]


async def test_tampered_ciphertext_is_an_error_not_garbage(env: EncEnv):
    email = unique("tamper")
    conn = await env.apg()
    try:
        uid = await conn.fetchval("INSERT INTO users (email, ssn) VALUES ($1, $2) RETURNING id", email, "tamper-me")
        stored = env.raw_one("SELECT ssn FROM users WHERE id = %s", uid)
        with env.direct() as d:
            d.execute("UPDATE users SET ssn = %s WHERE id = %s", (flip(stored, len(stored) - 10), uid))
        with pytest.raises(asyncpg.PostgresError) as err:
            await conn.fetch("SELECT id, ssn FROM users WHERE id = $1", uid)
        assert err.value.sqlstate == "XX001"
        assert "altered" in str(err.value) or "tamper" in str(err.value)
        assert "tamper-me" not in str(err.value)
        # the same connection goes on; the other columns of the row still read fine
        assert await conn.fetchval("SELECT email FROM users WHERE id = $1", uid) == email
        with pytest.raises(asyncpg.PostgresError) as err:  # a prepared statement too
            stmt = await conn.prepare("SELECT ssn FROM users WHERE email = $1")
            await stmt.fetch(email)
        assert err.value.sqlstate == "XX001"
        assert await conn.fetchval("SELECT 7") == 7
    finally:
        await conn.close()
    with env.psy() as pconn:
        with pytest.raises(errors.DataCorrupted):
            pconn.execute("SELECT ssn FROM users WHERE id = %s", (uid,)).fetchall()
        with pytest.raises(errors.DataCorrupted), pconn.cursor() as cur, cur.copy(
            f"COPY (SELECT ssn FROM users WHERE id = {uid}) TO STDOUT"
        ) as copy:
            list(copy.rows())
        # inside a transaction the error aborts it, like any server error
        pconn.autocommit = False
        with pytest.raises(errors.DataCorrupted):
            pconn.execute("SELECT ssn FROM users WHERE id = %s", (uid,)).fetchall()
        pconn.rollback()
        pconn.autocommit = True
        assert pconn.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (1,)


async def test_value_from_another_master_key_is_reported(env: EncEnv):
    other = Keyring(generate_master_key())
    email = unique("foreign")
    index = blind_index(other, env.policy.index_key_id(USERS, "email"), email, "email")
    with env.direct() as d:
        uid = d.execute(
            "INSERT INTO users (email, ssn) VALUES (%s, %s) RETURNING id",
            (compose(index, encrypt(other, "public.users.email", email.encode())),
             encrypt(other, "public.users.ssn", b"foreign-ssn")),
        ).fetchone()[0]
    conn = await env.apg()
    try:
        with pytest.raises(asyncpg.PostgresError) as err:
            await conn.fetchrow("SELECT email, ssn FROM users WHERE id = $1", uid)
        assert err.value.sqlstate == "XX001"
        assert "different master key" in str(err.value)
        assert await conn.fetchval("SELECT id FROM users WHERE id = $1", uid) == uid
    finally:
        await conn.close()


async def test_invalid_phone_is_refused_not_stored(env: EncEnv):
    email = unique("badphone")
    conn = await env.apg()
    try:
        with pytest.raises(asyncpg.PostgresError) as err:
            await conn.execute("INSERT INTO users (email, phone) VALUES ($1, $2)", email, "call me maybe")
        assert err.value.sqlstate == "22023"
        assert "users.phone" in str(err.value) and "call me" not in str(err.value)
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", email)) == 0
