"""An application on psycopg 3, pointed at pgcloak instead of PostgreSQL.

Nothing here knows about encryption: the same code runs against PostgreSQL itself.
Start ``pgcloak demo`` first, then::

    python examples/clients/psycopg_app.py 'postgresql://demo:demo@127.0.0.1:6432/demo' [DIRECT_DSN]

DIRECT_DSN (the demo prints it under "PostgreSQL itself") shows what the server stores.
"""

from __future__ import annotations

import sys
import uuid

import psycopg
from psycopg import errors


def main(proxy_dsn: str, direct_dsn: str | None) -> int:
    tag = uuid.uuid4().hex[:8]
    people = [(f"Grace {tag}", f"grace-{tag}@example.com", "+1 555 010 0001"),
              (f"Linus {tag}", f"linus-{tag}@example.com", "+1 555 010 0002")]  # fmt: skip
    with psycopg.connect(proxy_dsn) as conn:
        # executemany: psycopg sends the statement once, then one Bind per row.
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO users (name, email, phone) VALUES (%s, %s, %s)", people)
        # COPY FROM STDIN: pgcloak encrypts the protected columns row by row.
        copied = f"alan-{tag}@example.com"
        with conn.cursor() as cur, cur.copy("COPY users (name, email, phone) FROM STDIN") as copy:
            copy.write_row((f"Alan {tag}", copied, "+1 555 010 0003"))
        conn.commit()
        print(f"inserted {len(people)} rows and copied 1")

        # Server-side prepared statements (prepare=True) work as they do on PostgreSQL.
        for name, email, _ in people:
            found = conn.execute("SELECT name, phone FROM users WHERE email = %s", (email,), prepare=True).fetchone()
            assert found is not None and found[0] == name
            print(f"found {found[0]}: {found[1]}")
        row = conn.execute("SELECT name FROM users WHERE email = %s", (copied.upper(),)).fetchone()
        assert row is not None
        print(f"the copied row, found by its e-mail in capitals: {row[0]}")

        try:
            conn.execute("SELECT email FROM users WHERE email LIKE %s", ("grace%",))
        except errors.FeatureNotSupported as exc:
            conn.rollback()
            print(f"LIKE on an encrypted column refused: SQLSTATE {exc.sqlstate}")
        else:
            print("LIKE on an encrypted column was not refused", file=sys.stderr)
            return 1

        if direct_dsn:
            with psycopg.connect(direct_dsn) as direct:
                stored = direct.execute("SELECT email, phone FROM users WHERE name = %s", (people[0][0],)).fetchone()
            assert stored is not None
            print(f"stored in PostgreSQL: email = {stored[0][:48]}...")
            if people[0][1] in stored[0] or "0001" in stored[1]:
                print("plaintext stored!", file=sys.stderr)
                return 1

        conn.execute("DELETE FROM users WHERE email = ANY(%s)", ([p[1] for p in people] + [copied],))
        conn.commit()
        print("deleted by e-mail")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
