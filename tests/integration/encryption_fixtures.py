"""Shared set-up for the encryption integration tests (``test_encryption_*.py``).

Each test module gets its own database (owner ``app``), its own policy file and master
key, and its own in-process pgcloak with that policy: :func:`encryption_env` is a context
manager that a module-scoped fixture wraps. The tables are created directly on
PostgreSQL, with the blind-index expression indexes ``pgcloak policy ddl`` prints.

Every check has two sides: what the client sees through pgcloak (plaintext) and what
PostgreSQL holds (:meth:`EncEnv.raw` over a direct connection, checked by
:meth:`EncEnv.assert_stored`: ciphertext, the right blind index, never the plaintext).
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from pgcloak import cli
from pgcloak.crypto.blind_index import INDEX_LENGTH, blind_index
from pgcloak.crypto.envelope import ENVELOPE_PREFIX_TEXT, decrypt
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key, master_key_to_text
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from pgcloak.policy import Policy, load_policy
from proxyctl import ThreadedProxy, make_settings

USERS = "public.users"
ORDERS = "public.orders"


def policy_yaml(*, phone: bool = True, extra_users: str = "") -> str:
    """The test policy. ``phone=False`` leaves users.phone unprotected (reload tests)."""
    phone_line = "    phone: {encrypt: true, index: exact, normalize: phone}\n" if phone else ""
    return (
        "version: 1\n"
        "tables:\n"
        "  public.users:\n"
        "    email: {encrypt: true, index: exact, normalize: email, join_group: customer_email}\n"
        f"{phone_line}"
        "    ssn: {encrypt: true}\n"
        "    loyalty_id: {hash_only: true, index: exact}\n"
        f"{extra_users}"
        "  public.orders:\n"
        "    buyer_email: {index: exact, normalize: email, join_group: customer_email}\n"
        "  crm.\"Contacts\":\n"
        "    '\"Email\"': {encrypt: true, index: exact, normalize: email}\n"
        "default_read: reveal\n"
        "guards: {unbounded_select: allow, max_pii_rows: null}\n"
    )


TABLES_DDL = """
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text,
    phone text,
    ssn text,
    loyalty_id text,
    name text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (id bigserial PRIMARY KEY, buyer_email text, amount int NOT NULL DEFAULT 0);
CREATE TABLE plain_contacts (email text, phone text);
CREATE SCHEMA crm;
CREATE TABLE crm."Contacts" (id serial PRIMARY KEY, "Email" text, note text);
"""


def policy_ddl(path: Path, *, checks: bool = True) -> str:
    """What ``pgcloak policy ddl FILE --unique users.email`` prints: run as it is, so a
    name it fails to quote (crm."Contacts"."Email") breaks every test that uses it. With
    its CHECK constraints, any plaintext pgcloak let through would fail the write."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        flags = [] if checks else ["--no-check"]
        assert cli.main(["policy", "ddl", str(path), "--unique", "users.email", *flags]) == 0
    return out.getvalue()


@dataclass
class EncEnv:
    pg: TemporaryPostgres
    login: DbLogin
    proxy: ThreadedProxy
    key_text: str
    keyring: Keyring
    policy_path: Path
    policy: Policy
    #: The proxy's working directory, where its (relative, default) audit trail is; the
    #: policy is in a directory of its own, as a container mounts it (read-only).
    workdir: Path

    # -- connections ------------------------------------------------------------------
    @property
    def dbname(self) -> str:
        return self.login.dbname

    def proxy_dsn(self) -> str:
        return self.proxy.dsn(self.login.user, self.login.password, self.login.dbname)

    def direct_dsn(self) -> str:
        return self.pg.dsn(self.login.user, self.login.password, self.login.dbname)

    async def apg(self, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg through pgcloak."""
        kwargs.setdefault("ssl", False)
        return await asyncpg.connect(
            **self.proxy.kwargs(self.login.user, self.login.password, self.login.dbname), timeout=10, **kwargs
        )

    def psy(self, **kwargs: Any) -> psycopg.Connection:
        """psycopg 3 through pgcloak (autocommit unless told otherwise)."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.proxy_dsn(), connect_timeout=10, **kwargs)

    def direct(self) -> psycopg.Connection:
        """psycopg 3 straight to PostgreSQL: what is really stored."""
        return psycopg.connect(self.direct_dsn(), autocommit=True, connect_timeout=10)

    def raw(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` run directly on PostgreSQL (never through pgcloak)."""
        with self.direct() as conn:
            return conn.execute(sql, params or None).fetchall()

    def raw_one(self, sql: str, *params: Any) -> Any:
        rows = self.raw(sql, *params)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    # -- what is stored -----------------------------------------------------------------
    def index_of(self, table: str, column: str, value: str) -> str:
        col = self.policy.column(table, column)
        assert col is not None
        return blind_index(self.keyring, self.policy.index_key_id(table, column), value, col.normalize)

    def assert_stored(self, stored: Any, plain: str | None, table: str = USERS, column: str = "email") -> None:
        """``stored`` (read directly) is the protected form of ``plain``."""
        if plain is None:
            assert stored is None
            return
        assert isinstance(stored, str), stored
        col = self.policy.column(table, column)
        assert col is not None, f"{table}.{column} is not protected"
        if col.hash_only:
            assert stored == self.index_of(table, column, plain)
            assert len(stored) == INDEX_LENGTH
            return
        if col.index:
            assert stored[:INDEX_LENGTH] == self.index_of(table, column, plain), "blind index mismatch"
            assert stored[INDEX_LENGTH] == "."
            assert stored[INDEX_LENGTH + 1 :].startswith(ENVELOPE_PREFIX_TEXT)
            assert decrypt(self.keyring, stored[INDEX_LENGTH + 1 :]) == plain.encode()
        else:
            assert stored.startswith(ENVELOPE_PREFIX_TEXT)
        if len(plain) >= 4:
            assert plain not in stored, "plaintext reached the database"
        assert decrypt(self.keyring, stored) == plain.encode("utf-8")

    def stored_users(self, where: str = "true", *params: Any, columns: str = "email") -> list[tuple[Any, ...]]:
        return self.raw(f"SELECT {columns} FROM users WHERE {where} ORDER BY id", *params)

    @contextlib.contextmanager
    def without_check(self, table: str, check: str, cleanup: str) -> Iterator[None]:
        """``table`` (as SQL spells it) without pgcloak's CHECK constraint ``check`` (as with
        ``policy ddl --no-check``), for tests that need plaintext stored; on the way out
        ``cleanup`` removes what it let in, and the check is put back as it was."""
        definition = self.raw_one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", check)
        with self.direct() as conn:
            conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{check}"')
        try:
            yield
        finally:
            with self.direct() as conn:
                conn.execute(cleanup)
                conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{check}" {definition}')

    def write_policy(self, text: str) -> None:
        """Replace the policy file atomically (as editors and ConfigMaps do)."""
        tmp = self.policy_path.with_name(f".{self.policy_path.name}.{uuid.uuid4().hex[:6]}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.policy_path)


def unique(prefix: str = "u") -> str:
    """A fresh e-mail address (tests share one database per module)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


@contextlib.contextmanager
def encryption_env(
    pg: TemporaryPostgres,
    pg_app_user: DbLogin,
    directory: Path,
    module: str,
    *,
    policy: str | None = None,
    **settings: Any,
) -> Iterator[EncEnv]:
    """A database ``enc_<module>_<random>`` with the test tables, and pgcloak in front
    of it enforcing the test policy with a freshly generated master key."""
    name = f"enc_{module}_{uuid.uuid4().hex[:6]}"
    pg.create_database(name, owner=pg_app_user.user)
    login = DbLogin(pg_app_user.user, pg_app_user.password, name)
    (directory / "policy").mkdir()
    policy_path = directory / "policy" / "policy.yaml"
    policy_path.write_text(policy or policy_yaml(), encoding="utf-8")
    full = directory / "policy" / "full-policy.yaml"
    full.write_text(policy_yaml(), encoding="utf-8")
    key = generate_master_key()
    key_text = master_key_to_text(key)
    try:
        with psycopg.connect(pg.dsn(login.user, login.password, name), autocommit=True) as conn:
            conn.execute(TABLES_DDL)
            # The checks hold the columns to ciphertext from the start: only when the
            # policy in force protects them all from the start (not in reload tests).
            conn.execute(policy_ddl(full, checks=policy is None))
        tls = pg.tls_files
        base: dict[str, Any] = {
            "backend": f"postgresql://{pg.host}:{pg.port}",
            "client_tls_cert": str(tls.server_cert),
            "client_tls_key": str(tls.server_key),
            "backend_tls_ca": str(tls.ca_cert),
            "drain_timeout": 0,
            "policy": str(policy_path),
            "master_key": key_text,
        }
        base.update(settings)
        with ThreadedProxy(make_settings(**base), cwd=directory) as proxy:
            yield EncEnv(pg, login, proxy, key_text, Keyring(key), policy_path, load_policy(full), directory)
        # The audit trail (the default sink, in the working directory) must not hold a
        # plaintext value either: every e-mail the tests use ends in @example.com.
        assert not list(policy_path.parent.glob("*.jsonl"))  # nothing next to the policy
        for audit in directory.glob("*.jsonl"):
            assert "@example.com" not in audit.read_text(encoding="utf-8", errors="replace"), audit
    finally:
        pg.run_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
