"""An application on asyncpg, pointed at pgcloak instead of PostgreSQL.

Nothing here knows about encryption: the same code runs against PostgreSQL itself.
Start ``pgcloak demo`` first, then::

    python examples/clients/asyncpg_app.py 'postgresql://demo:demo@127.0.0.1:6432/demo' [DIRECT_DSN]

DIRECT_DSN (the demo prints it under "PostgreSQL itself") shows what the server stores.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import asyncpg


async def main(proxy_dsn: str, direct_dsn: str | None) -> int:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    conn = await asyncpg.connect(proxy_dsn)
    try:
        # asyncpg prepares every statement: pgcloak encrypts (and hashes, for lookups) the
        # values of protected columns as they are bound.
        user_id = await conn.fetchval(
            "INSERT INTO users (name, email, phone, ssn) VALUES ($1, $2, $3, $4) RETURNING id",
            "Ada", email, "+44 20 7946 0958", "123-45-6789",
        )  # fmt: skip
        print(f"inserted user {user_id}")

        # An equality lookup on an encrypted column: sent as a blind-index lookup, which the
        # policy normalizes (e-mails are case-insensitive), so capitals find the row.
        row = await conn.fetchrow("SELECT id, name, email, phone FROM users WHERE email = $1", email.upper())
        assert row is not None and row["email"] == email
        print(f"found by its e-mail in capitals: {row['name']} <{row['email']}> {row['phone']}")

        names = await conn.fetch("SELECT name FROM users WHERE email = ANY($1::text[])", [email, "nobody@example.com"])
        print(f"= ANY(array): {[r['name'] for r in names]}")

        async with conn.transaction():
            await conn.execute("UPDATE users SET phone = $1 WHERE email = $2", "+44 20 7946 0000", email)
        print(f"phone updated: {await conn.fetchval('SELECT phone FROM users WHERE id = $1', user_id)}")

        try:
            await conn.fetch("SELECT email FROM users")
        except asyncpg.PostgresError as exc:
            print(f"bulk read refused: SQLSTATE {exc.sqlstate}")
        else:
            print("a bulk read of e-mails was not refused", file=sys.stderr)
            return 1

        if direct_dsn:
            direct = await asyncpg.connect(direct_dsn)
            try:
                stored = await direct.fetchrow("SELECT email, phone, ssn FROM users WHERE id = $1", user_id)
            finally:
                await direct.close()
            assert stored is not None
            for column, value in stored.items():
                print(f"stored in PostgreSQL: {column} = {value[:48]}...")
            if email in str(dict(stored)) or "7946" in str(dict(stored)):
                print("plaintext stored!", file=sys.stderr)
                return 1

        await conn.execute("DELETE FROM users WHERE email = $1", email)
        print("deleted by e-mail")
        return 0
    finally:
        await conn.close()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)))
