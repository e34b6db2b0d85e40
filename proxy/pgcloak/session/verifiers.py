"""Where proxy-side SCRAM finds a user's verifier: a user file, or PostgreSQL itself.

The user file has PgBouncer's userlist format, one ``"user" "SCRAM-SHA-256$..."`` per
line. The auth query runs over the proxy's own asyncpg connection as ``auth_user``
(a role allowed to read pg_authid, or a SECURITY DEFINER function). Plaintext or md5
entries are refused: the backend login needs the SCRAM keys.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path
from typing import Any

from pgcloak.config import Settings
from pgcloak.session.scram import ScramError, ScramVerifier

log = logging.getLogger("pgcloak.auth")

_LINE = re.compile(r'^\s*"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"')


class AuthFileError(Exception):
    """A user file line that cannot be used (the message never contains the secret)."""


def parse_auth_file(path: Path) -> dict[str, ScramVerifier]:
    users: dict[str, ScramVerifier] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(";") or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise AuthFileError(f'{path}:{lineno}: expected "user" "SCRAM-SHA-256$..."')
        user, secret = m.group(1).replace('""', '"'), m.group(2).replace('""', '"')
        try:
            users[user] = ScramVerifier.parse(secret)
        except ScramError:
            raise AuthFileError(
                f"{path}:{lineno}: the entry for {user!r} is not a SCRAM-SHA-256 verifier"
            ) from None
    return users


class VerifierSource:
    """Looks up SCRAM verifiers for proxy-side authentication."""

    def __init__(self, settings: Settings, backend_ssl: ssl.SSLContext | None) -> None:
        self._settings = settings
        self._ssl = backend_ssl
        self._file: dict[str, ScramVerifier] = {}
        if settings.auth_mode == "scram" and settings.auth_file is not None:
            self._file = parse_auth_file(settings.auth_file)
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def lookup(self, user: str) -> ScramVerifier | None:
        found = self._file.get(user)
        if found is not None or not self._settings.auth_user:
            return found
        async with self._lock:
            try:
                conn = await self._connection()
                secret = await conn.fetchval(self._settings.auth_query, user)
            except Exception as exc:
                log.warning("auth query failed", extra={"error": type(exc).__name__})
                self._conn = None
                return None
        if not isinstance(secret, str):
            return None
        try:
            return ScramVerifier.parse(secret)
        except ScramError:
            log.warning("role has no SCRAM-SHA-256 verifier", extra={"user": user})
            return None

    async def _connection(self) -> Any:
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            s = self._settings
            mode = s.backend_tls_mode
            ssl_arg: Any = False if mode == "disable" else (self._ssl if mode != "prefer" else "prefer")
            self._conn = await asyncpg.connect(
                host=s.backend_host,
                port=s.backend_port,
                user=s.auth_user,
                password=s.auth_password.get_secret_value() if s.auth_password else None,
                database=s.backend_dbname or s.auth_dbname,
                ssl=ssl_arg,
                timeout=s.connect_timeout,
                server_settings={"application_name": "pgcloak-auth"},
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
