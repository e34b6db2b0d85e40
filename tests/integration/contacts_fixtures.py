"""The set-up of the search_path and prepared-again tests: the test policy protects
``crm."Contacts"."Email"``; ``public."Contacts"``, of the same shape, is not protected.
So an unqualified ``"Contacts"`` reaches one or the other by the session's search_path,
and what PostgreSQL holds (read directly) tells which, and whether it was encrypted."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from encryption_fixtures import EncEnv, encryption_env

KEY_TABLE = "crm.Contacts"


@contextlib.contextmanager
def contacts_env(pg: Any, pg_app_user: Any, directory: Path, module: str) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, directory, module) as e:
        with e.direct() as conn:
            conn.execute('CREATE TABLE public."Contacts" (id serial PRIMARY KEY, "Email" text, note text)')
        yield e


def stored(env: EncEnv, schema: str, note: str) -> list[tuple[Any, ...]]:
    """The e-mails stored in ``schema."Contacts"`` for ``note``, read directly."""
    return env.raw(f'SELECT "Email" FROM {schema}."Contacts" WHERE note = %s', note)


def in_crm_encrypted(env: EncEnv, email: str, note: str) -> None:
    rows = stored(env, "crm", note)
    assert len(rows) == 1, rows
    env.assert_stored(rows[0][0], email, table=KEY_TABLE, column="Email")
    assert stored(env, "public", note) == []


def in_public_plain(env: EncEnv, email: str, note: str) -> None:
    assert stored(env, "public", note) == [(email,)]
    assert stored(env, "crm", note) == []


def internal_statements(conn: psycopg.Connection) -> list[str]:
    """pgcloak's own prepared statements in this session, as PostgreSQL lists them."""
    rows = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgcloak\\_reprepared\\_%%' ORDER BY name",
        prepare=False,
    ).fetchall()
    return [r[0] for r in rows]


def wait_for_policy(env: EncEnv, *, protected: bool) -> None:
    """Until a fresh statement shows the policy in force (the watcher polls the file)."""
    deadline = time.monotonic() + 10
    while True:
        note = uuid.uuid4().hex[:12]
        with env.psy() as conn:
            conn.execute('INSERT INTO crm."Contacts" ("Email", note) VALUES (%s, %s)', (f"w-{note}@example.com", note))
        kept = stored(env, "crm", note)[0][0]
        with env.direct() as direct:
            direct.execute('DELETE FROM crm."Contacts" WHERE note = %s', (note,))
        if kept.endswith("@example.com") != protected:
            return
        assert time.monotonic() < deadline, "the policy edit was not picked up"
        time.sleep(0.05)
