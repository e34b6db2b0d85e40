"""Encrypted columns through pgcloak with asyncpg: extended protocol, $n parameters in
binary format, arrays for ``= ANY($1)``, RETURNING, ON CONFLICT, joins, COPY out.

Every test checks both sides: plaintext through pgcloak, ciphertext and the blind index
over a direct connection.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from encryption_fixtures import ORDERS, USERS, EncEnv, encryption_env, unique

from pgcloak.crypto.blind_index import INDEX_LENGTH


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_apg"), "apg") as e:
        yield e


@pytest.fixture
async def conn(env: EncEnv) -> AsyncIterator[asyncpg.Connection]:
    c = await env.apg()
    try:
        yield c
    finally:
        await c.close()


INSERT = "INSERT INTO users (email, phone, ssn, loyalty_id, name) VALUES ($1, $2, $3, $4, $5) RETURNING id"


async def add_user(conn: asyncpg.Connection, email: str, phone: str | None = None, ssn: str | None = None,
                   loyalty: str | None = None, name: str | None = None) -> int:
    return await conn.fetchval(INSERT, email, phone, ssn, loyalty, name)


# -- INSERT ---------------------------------------------------------------------------------


async def test_insert_single_row_returning_plaintext_stores_ciphertext(env: EncEnv, conn):
    email = unique("Single")
    row = await conn.fetchrow(
        "INSERT INTO users (email, phone, ssn, loyalty_id, name) VALUES ($1, $2, $3, $4, $5) "
        "RETURNING id, email, phone, ssn, name",
        email, "+1 (555) 010-0200", "078-05-1120", "LOY-1", "Ann",
    )
    assert (row["email"], row["phone"], row["ssn"], row["name"]) == (email, "+1 (555) 010-0200", "078-05-1120", "Ann")
    stored = env.raw_one("SELECT email, phone, ssn, loyalty_id, name FROM users WHERE id = %s", row["id"])
    env.assert_stored(stored[0], email)
    env.assert_stored(stored[1], "+1 (555) 010-0200", USERS, "phone")
    env.assert_stored(stored[2], "078-05-1120", USERS, "ssn")
    env.assert_stored(stored[3], "LOY-1", USERS, "loyalty_id")
    assert stored[4] == "Ann"  # unprotected column untouched
    # The phone index is over the normalized form: any spelling finds the row.
    assert stored[1][:INDEX_LENGTH] == env.index_of(USERS, "phone", "+15550100200")
    found = await conn.fetchval("SELECT id FROM users WHERE phone = $1", "+1 555 010 0200")
    assert found == row["id"]


async def test_insert_multi_row_with_default_and_null(env: EncEnv, conn):
    a, b = unique("multi-a"), unique("multi-b")
    rows = await conn.fetch(
        "INSERT INTO users (email, phone, ssn, name) VALUES ($1, $2, DEFAULT, $3), ($4, DEFAULT, $5, DEFAULT) "
        "RETURNING id, email, phone, ssn, name",
        a, "555-0101", "first", b, "111-22-3333",
    )
    assert [(r["email"], r["phone"], r["ssn"], r["name"]) for r in rows] == [
        (a, "555-0101", None, "first"), (b, None, "111-22-3333", None),
    ]
    stored = env.raw("SELECT email, phone, ssn FROM users WHERE id = ANY(%s) ORDER BY id", [r["id"] for r in rows])
    env.assert_stored(stored[0][0], a)
    env.assert_stored(stored[0][1], "555-0101", USERS, "phone")
    assert stored[0][2] is None
    env.assert_stored(stored[1][0], b)
    assert stored[1][1] is None
    env.assert_stored(stored[1][2], "111-22-3333", USERS, "ssn")


async def test_insert_null_stays_null(env: EncEnv, conn):
    uid = await add_user(conn, None, None, None, None, "nulls")
    assert env.raw_one("SELECT (email IS NULL AND phone IS NULL AND ssn IS NULL AND loyalty_id IS NULL) FROM users WHERE id = %s", uid)
    row = await conn.fetchrow("SELECT email, phone, ssn, loyalty_id FROM users WHERE id = $1", uid)
    assert tuple(row) == (None, None, None, None)
    assert await conn.fetchval("SELECT count(*) FROM users WHERE id = $1 AND email IS NULL AND phone IS NULL", uid) == 1


async def test_duplicate_email_is_unique_violation_even_differently_cased(env: EncEnv, conn):
    local = unique("Dup")
    await add_user(conn, local)
    with pytest.raises(asyncpg.UniqueViolationError) as err:
        await add_user(conn, "  " + local.upper() + " ")
    assert err.value.sqlstate == "23505"
    assert "users_email_pgcloak_idx" in str(err.value)
    # The session carries on.
    assert await conn.fetchval("SELECT count(*) FROM users WHERE email = $1", local.lower()) == 1


async def test_on_conflict_do_nothing_and_do_update(env: EncEnv, conn):
    email = unique("Conflict")
    uid = await add_user(conn, email, "555-0000", name="before")
    got = await conn.fetch(
        "INSERT INTO users (email, name) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING RETURNING id",
        email.upper(), "ignored",
    )
    assert got == []
    row = await conn.fetchrow(
        "INSERT INTO users AS u (email, phone, name) VALUES ($1, $2, $3) "
        "ON CONFLICT (email) DO UPDATE SET phone = EXCLUDED.phone, name = EXCLUDED.name "
        "RETURNING u.id, u.email, u.phone, u.name",
        email, "555-9999", "after",
    )
    assert (row["id"], row["email"], row["phone"], row["name"]) == (uid, email, "555-9999", "after")
    stored = env.raw_one("SELECT email, phone FROM users WHERE id = %s", uid)
    env.assert_stored(stored[0], email)
    env.assert_stored(stored[1], "555-9999", USERS, "phone")
    # ON CONFLICT ... DO UPDATE SET protected = $n also encrypts the new value.
    await conn.execute(
        "INSERT INTO users (email, ssn) VALUES ($1, $2) ON CONFLICT (email) DO UPDATE SET ssn = $2", email, "999-88-7777"
    )
    env.assert_stored(env.raw_one("SELECT ssn FROM users WHERE id = %s", uid), "999-88-7777", USERS, "ssn")
    assert env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", email)) == 1


# -- UPDATE / DELETE ---------------------------------------------------------------------------


async def test_update_set_where_email(env: EncEnv, conn):
    old, new = unique("old"), unique("new")
    uid = await add_user(conn, old, "555-1000")
    status = await conn.execute("UPDATE users SET email = $1, phone = $3 WHERE email = $2", new, old, "555-2000")
    assert status == "UPDATE 1"
    stored = env.raw_one("SELECT email, phone FROM users WHERE id = %s", uid)
    env.assert_stored(stored[0], new)
    env.assert_stored(stored[1], "555-2000", USERS, "phone")
    assert await conn.fetchval("SELECT id FROM users WHERE email = $1", old) is None
    assert await conn.fetchval("SELECT id FROM users WHERE email = $1", new) == uid
    row = await conn.fetchrow("UPDATE users SET ssn = $1 WHERE id = $2 RETURNING email, ssn", "123-00-4567", uid)
    assert tuple(row) == (new, "123-00-4567")


async def test_update_from_and_delete_using_join_group(env: EncEnv, conn):
    email = unique("join")
    uid = await add_user(conn, email, name="not yet")
    oid = await conn.fetchval("INSERT INTO orders (buyer_email, amount) VALUES ($1, 42) RETURNING id", email.upper())
    env.assert_stored(env.raw_one("SELECT buyer_email FROM orders WHERE id = %s", oid), email.upper(), ORDERS, "buyer_email")
    # one join group: orders.buyer_email and users.email share the index key
    assert env.raw_one("SELECT left(buyer_email, 22) FROM orders WHERE id = %s", oid) == env.raw_one(
        "SELECT left(email, 22) FROM users WHERE id = %s", uid
    )
    status = await conn.execute(
        "UPDATE users u SET name = 'buyer' FROM orders o WHERE o.buyer_email = u.email AND o.id = $1", oid
    )
    assert status == "UPDATE 1"
    assert await conn.fetchval("SELECT name FROM users WHERE email = $1", email) == "buyer"
    status = await conn.execute("DELETE FROM orders o USING users u WHERE u.email = o.buyer_email AND u.id = $1", uid)
    assert status == "DELETE 1"
    assert env.raw_one("SELECT count(*) FROM orders WHERE id = %s", oid) == 0
    assert await conn.execute("DELETE FROM users WHERE email = $1", email) == "DELETE 1"
    assert env.raw_one("SELECT count(*) FROM users WHERE id = %s", uid) == 0


# -- SELECT ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def people(env: EncEnv) -> list[tuple[int, str, str]]:
    """Three users and an order for each of the first two."""
    c = await env.apg()
    try:
        out = []
        for i in range(3):
            email = unique(f"sel{i}")
            uid = await c.fetchval(INSERT, email, f"555-01{i}0", None, f"L{i}", f"sel{i}")
            out.append((uid, email, f"555-01{i}0"))
        for uid, email, _ in out[:2]:
            await c.execute("INSERT INTO orders (buyer_email, amount) VALUES ($1, $2)", email, uid)
        return out
    finally:
        await c.close()


async def test_select_equality_in_and_any(env: EncEnv, conn, people):
    (u0, e0, p0), (u1, e1, _), (u2, e2, _) = people
    stored = dict((r[0], r[1:]) for r in env.raw("SELECT id, email, phone FROM users WHERE id = ANY(%s)", [u0, u1, u2]))
    for uid, email, phone in people:
        env.assert_stored(stored[uid][0], email)
        env.assert_stored(stored[uid][1], phone, USERS, "phone")
    row = await conn.fetchrow("SELECT id, email, phone FROM users WHERE email = $1", e0.upper())
    assert tuple(row) == (u0, e0, p0)
    rows = await conn.fetch("SELECT id FROM users WHERE email IN ($1, $2, $3) ORDER BY id", e0, e2, "nobody@example.com")
    assert [r["id"] for r in rows] == [u0, u2]
    rows = await conn.fetch("SELECT id, email FROM users WHERE email = ANY($1) ORDER BY id", [e1, e2, None, "x@y.z"])
    assert [tuple(r) for r in rows] == [(u1, e1), (u2, e2)]
    assert await conn.fetch("SELECT id FROM users WHERE email = ANY($1)", []) == []
    assert await conn.fetchval("SELECT id FROM users WHERE email <> $1 AND id = $2", e0, u1) == u1
    # a literal inside an extended-protocol statement is transformed as well
    assert await conn.fetchval(f"SELECT id FROM users WHERE email = '{e1}'") == u1
    # a parameter is reused both as a stored value and as a lookup: two parameters
    assert await conn.fetchval("SELECT count(*) FROM users WHERE phone = $1 OR email = $2", p0, e1) == 2


async def test_select_is_null_and_is_not_null(env: EncEnv, conn, people):
    uid = await add_user(conn, unique("nophone"), None)
    assert uid in [r["id"] for r in await conn.fetch("SELECT id FROM users WHERE phone IS NULL")]
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM users WHERE phone IS NOT NULL AND email IS NOT NULL")]
    assert {p[0] for p in people} <= set(ids)
    assert uid not in ids


async def test_join_subquery_cte_aliases(env: EncEnv, conn, people):
    (u0, e0, _), (u1, e1, _), (u2, _, _) = people
    rows = await conn.fetch(
        "SELECT u.id, u.email, o.buyer_email, o.amount FROM users u JOIN orders o ON o.buyer_email = u.email "
        "WHERE u.id = ANY($1::bigint[]) ORDER BY u.id",
        [u0, u1, u2],
    )
    assert [tuple(r) for r in rows] == [(u0, e0, e0, u0), (u1, e1, e1, u1)]
    assert await conn.fetchval(
        "SELECT count(*) FROM orders o WHERE EXISTS (SELECT 1 FROM users u WHERE u.email = o.buyer_email "
        "AND u.email = $1)", e1
    ) == 1
    assert await conn.fetchval("SELECT (SELECT email FROM users WHERE id = $1) AS e", u1) == e1
    assert await conn.fetchval(
        "SELECT s.email FROM (SELECT id, email FROM users) s WHERE s.email = $1", e1
    ) == e1
    assert await conn.fetchval(
        "SELECT id FROM users WHERE id IN (SELECT u2.id FROM users u2 WHERE u2.email = $1)", e0
    ) == u0
    row = await conn.fetchrow(
        "WITH found AS (SELECT id, email AS mail FROM users WHERE email = $1) "
        "SELECT f.id, f.mail FROM found f WHERE f.mail = $1",
        e1,
    )
    assert tuple(row) == (u1, e1)
    row = await conn.fetchrow("SELECT x.email AS contact, x.phone FROM public.users AS x WHERE x.email = $1", e0)
    assert row["contact"] == e0
    row = await conn.fetchrow('SELECT "users"."email" FROM "public"."users" WHERE "users"."email" = $1', e0)
    assert row["email"] == e0
    rows = await conn.fetch("SELECT * FROM users WHERE email = $1", e0)
    assert len(rows) == 1 and rows[0]["email"] == e0 and rows[0]["loyalty_id"] == env.index_of(USERS, "loyalty_id", "L0")
    rows = await conn.fetch("SELECT u.*, o.* FROM users u, orders o WHERE o.buyer_email = u.email AND u.email = $1", e0)
    assert rows[0]["buyer_email"] == e0


async def test_quoted_mixed_case_table_and_column(env: EncEnv, conn):
    email = unique("Quoted")
    cid = await conn.fetchval('INSERT INTO crm."Contacts" ("Email", note) VALUES ($1, $2) RETURNING id', email, "n")
    stored = env.raw_one('SELECT "Email" FROM crm."Contacts" WHERE id = %s', cid)
    env.assert_stored(stored, email, 'crm.Contacts', "Email")
    assert await conn.fetchval('SELECT "Email" FROM crm."Contacts" WHERE "Email" = $1', email.upper()) == email
    assert await conn.fetchval('SELECT c.id FROM crm."Contacts" c WHERE c."Email" = ANY($1)', [email]) == cid


# -- statements that carry statements --------------------------------------------------------


async def test_explain_prepare_execute_and_dml_cte(env: EncEnv, conn, people):
    (u0, e0, _), _, _ = people
    plan = await conn.fetch("EXPLAIN SELECT id FROM users WHERE email = $1", e0)
    text = "\n".join(r[0] for r in plan)
    # the lookup is rewritten to the blind-index prefix and served by the expression index
    assert "users_email_pgcloak_idx" in text and e0 not in text
    assert env.index_of(USERS, "email", e0) in text
    # EXPLAIN ANALYZE really runs the INSERT, which must therefore be encrypted
    email = unique("explain")
    await conn.fetch("EXPLAIN ANALYZE INSERT INTO users (email, phone) VALUES ($1, $2)", email, "555-7777")
    stored = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email), columns="email, phone")
    assert len(stored) == 1
    env.assert_stored(stored[0][0], email)
    env.assert_stored(stored[0][1], "555-7777", USERS, "phone")
    # SQL-level PREPARE / EXECUTE (asyncpg's execute() without args uses a simple Query)
    await conn.execute("PREPARE by_mail(text) AS SELECT id, email FROM users WHERE email = $1")
    assert tuple(await conn.fetchrow(f"EXECUTE by_mail('{e0.upper()}')")) == (u0, e0)
    await conn.execute("DEALLOCATE by_mail")
    # a data-modifying CTE: the INSERT is encrypted, the outer SELECT sees plaintext
    email = unique("cte")
    row = await conn.fetchrow(
        "WITH ins AS (INSERT INTO users (email, ssn) VALUES ($1, $2) RETURNING id, email, ssn) "
        "SELECT id, email, ssn FROM ins",
        email, "000-11-2222",
    )
    assert (row["email"], row["ssn"]) == (email, "000-11-2222")
    stored = env.raw_one("SELECT email, ssn FROM users WHERE id = %s", row["id"])
    env.assert_stored(stored[0], email)
    env.assert_stored(stored[1], "000-11-2222", USERS, "ssn")


async def test_merge_is_refused_and_stores_nothing(env: EncEnv, conn):
    email = unique("merge")
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.execute(
            "MERGE INTO users u USING (SELECT $1::text AS email) s ON u.email = s.email "
            "WHEN NOT MATCHED THEN INSERT (email) VALUES (s.email)",
            email,
        )
    assert err.value.sqlstate == "0A000"
    assert "MERGE" in str(err.value)
    assert env.raw_one("SELECT count(*) FROM users WHERE email LIKE %s", f"%{email}%") == 0
    assert await conn.fetchval("SELECT 1") == 1


# -- COPY ------------------------------------------------------------------------------------


async def test_copy_out_is_decrypted_and_binary_copy_in_refused(env: EncEnv, conn, people):
    (u0, e0, p0), _, _ = people
    buf = io.BytesIO()
    await conn.copy_from_query("SELECT id, email, phone FROM users WHERE email = $1", e0, output=buf, format="csv")
    assert list(csv.reader(io.StringIO(buf.getvalue().decode()))) == [[str(u0), e0, p0]]
    buf = io.BytesIO()
    await conn.copy_from_table("users", columns=["id", "email"], output=buf, format="text")
    lines = buf.getvalue().decode().splitlines()
    assert f"{u0}\t{e0}" in lines
    assert "pgc1:" not in buf.getvalue().decode()
    # binary COPY out of protected columns is refused (decrypting would break the field
    # lengths); of other columns it passes
    with pytest.raises(asyncpg.FeatureNotSupportedError, match="binary"):
        await conn.copy_from_query("SELECT email FROM users WHERE id = $1", u0, output=io.BytesIO(), format="binary")
    buf = io.BytesIO()
    await conn.copy_from_table("users", columns=["id"], output=buf, format="binary")
    assert buf.getvalue().startswith(b"PGCOPY\n")
    # asyncpg's copy_records_to_table streams COPY ... (FORMAT binary): refused, nothing stored
    email = unique("bincopy")
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.copy_records_to_table("users", records=[(email, "555")], columns=["email", "phone"])
    assert err.value.sqlstate == "0A000"
    assert env.raw_one("SELECT count(*) FROM users WHERE email LIKE %s", f"%{email}%") == 0
    assert await conn.fetchval("SELECT 2") == 2


async def test_large_result_spanning_many_network_chunks(env: EncEnv, conn):
    tag = unique("bulk")
    rows = [(f"{i}.{tag}", f"+1 555 {i:07d}") for i in range(3000)]
    await conn.executemany("INSERT INTO users (email, phone, name) VALUES ($1, $2, 'bulk')", rows)
    got = await conn.fetch("SELECT email, phone FROM users WHERE name = 'bulk' ORDER BY id")
    assert [tuple(r) for r in got] == rows
    async with conn.transaction():
        cursor_rows = [tuple(r) async for r in conn.cursor("SELECT email, phone FROM users WHERE name = 'bulk' ORDER BY id", prefetch=700)]
    assert cursor_rows == rows
    sample = env.raw("SELECT email, phone FROM users WHERE name = 'bulk' ORDER BY id LIMIT 3")
    for (s_email, s_phone), (email, phone) in zip(sample, rows, strict=False):
        env.assert_stored(s_email, email)
        env.assert_stored(s_phone, phone, USERS, "phone")
    await conn.execute("DELETE FROM users WHERE name = 'bulk'")


# -- concurrency -----------------------------------------------------------------------------


async def test_eight_concurrent_sessions_insert_and_look_up(env: EncEnv):
    conns = await asyncio.gather(*(env.apg() for _ in range(8)))
    try:
        async def worker(c: asyncpg.Connection, n: int) -> list[tuple[int, str]]:
            mine = []
            stmt = await c.prepare("SELECT id, email, phone FROM users WHERE email = $1")
            for i in range(15):
                email = unique(f"w{n}-{i}")
                uid = await c.fetchval(INSERT, email, f"+49 30 {n:03d} {i:04d}", None, None, f"w{n}")
                row = await stmt.fetchrow(email.upper())
                assert tuple(row) == (uid, email, f"+49 30 {n:03d} {i:04d}")
                mine.append((uid, email))
            return mine

        results = await asyncio.gather(*(worker(c, n) for n, c in enumerate(conns)))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    everyone = [pair for r in results for pair in r]
    assert len({uid for uid, _ in everyone}) == 8 * 15
    stored = dict(env.raw("SELECT id, email FROM users WHERE id = ANY(%s)", [uid for uid, _ in everyone]))
    for uid, email in everyone:
        env.assert_stored(stored[uid], email)
