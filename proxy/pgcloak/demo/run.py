"""`pgcloak demo`: a throwaway PostgreSQL with pgcloak in front, for a first psql session."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pgcloak.config import load_settings
from pgcloak.crypto.keys import generate_master_key, master_key_to_text
from pgcloak.logs import setup_logging
from pgcloak.session.server import ProxyServer, install_event_loop_policy

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_DB = "demo"

#: A second login, for the help desk: reads masked values, never the SSN.
SUPPORT_USER = "support"
SUPPORT_PASSWORD = "support"

#: The demo's policy: users.email and users.phone encrypted with blind indexes, ssn
#: encrypted; the application reads everything, the help desk masked values only.
DEMO_POLICY = """\
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
    ssn:   {encrypt: true}
default_read: deny            # a role not listed gets no protected value
roles:
  demo: {read: reveal}        # the application
  support:                    # the help desk
    read: {users.email: mask, users.phone: mask, users.ssn: deny}
guards:
  unbounded_select: deny      # SELECT of protected columns with no WHERE / LIMIT
  max_pii_rows: 1000          # values of one protected column per statement
"""

DEMO_SCHEMA = """\
CREATE TABLE users (id serial PRIMARY KEY, name text, email text, phone text, ssn text);
ALTER TABLE users OWNER TO demo;
GRANT SELECT ON users TO support;
"""


def demo_schema() -> str:
    """The demo's table, with what ``pgcloak policy ddl`` says DEMO_POLICY needs (lookup
    indexes, ciphertext-only checks)."""
    from pgcloak.policy import parse_policy
    from pgcloak.policy.ddl import policy_ddl

    return DEMO_SCHEMA + "\n".join(policy_ddl(parse_policy(DEMO_POLICY), {("public", "users", "email")}))


WALKTHROUGH = """\
Try, through pgcloak:

  INSERT INTO users (name, email, phone, ssn)
       VALUES ('Alice', 'alice@example.com', '+1 555 010 9999', '078-05-1120');
  SELECT * FROM users WHERE email = 'ALICE@example.com';   -- found by its blind index
  SELECT * FROM users WHERE email LIKE 'a%';                -- refused: no LIKE on ciphertext
  SELECT * FROM users;                                      -- refused: a dump of every row

then read the same row directly from PostgreSQL: only ciphertext is stored (and a
plaintext INSERT made there is refused by the table's CHECK constraints), and as the
help desk (the support login below) through pgcloak:

  SELECT name, email, phone FROM users WHERE email = 'alice@example.com';  -- masked
  SELECT ssn FROM users WHERE email = 'alice@example.com';                 -- permission denied
"""


def run_demo(listen: str, backend: str | None, keep: bool = False) -> int:
    """Serve until Ctrl-C. With a throwaway server, the demo schema is protected by
    DEMO_POLICY under a fresh master key that lives only as long as the demo.

    With ``backend`` (an existing server), pgcloak only relays: no policy, no master key,
    nothing created there (setting up the demo's roles, table and constraints would
    change someone's server, and values encrypted under a key that dies with the demo
    could never be read again). Its user and database only shape the psql command
    printed; the client authenticates to that server as usual."""
    setup_logging("text", "info")
    if backend is not None:
        parts = urlsplit(backend)
        user = parts.username or "postgres"
        dbname = parts.path.lstrip("/") or user
        backend_url = urlunsplit(("postgresql", f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}", "", "", ""))
        return _serve(listen, backend_url, user, dbname, None, None, None)

    from pgcloak.demo.postgres import TemporaryPostgres

    print("pgcloak demo: starting a throwaway PostgreSQL ...", file=sys.stderr)
    server = TemporaryPostgres()
    server.start()
    try:
        server.create_login(DEMO_USER, DEMO_PASSWORD, DEMO_DB)
        server.create_role(SUPPORT_USER, SUPPORT_PASSWORD)
        server.run_sql(demo_schema(), dbname=DEMO_DB)
        policy = server.base_dir / "demo-policy.yaml"
        # The trail goes with the throwaway data (a relative sink would land in the
        # directory the demo was started from, and outlive it).
        policy.write_text(DEMO_POLICY + f"audit:\n  sink: file:{server.base_dir / 'audit.jsonl'}\n")
        print(f"pgcloak demo: PostgreSQL {server.version_string} on {server.host}:{server.port}", file=sys.stderr)
        direct = f"psql 'postgresql://{DEMO_USER}:{DEMO_PASSWORD}@{server.host}:{server.port}/{DEMO_DB}'"
        return _serve(
            listen, f"postgresql://{server.host}:{server.port}", DEMO_USER, DEMO_DB, DEMO_PASSWORD, direct, policy
        )
    finally:
        if not keep:
            server.stop()


def _serve(
    listen: str,
    backend: str,
    user: str,
    dbname: str,
    password: str | None,
    direct: str | None,
    policy: Path | None,
) -> int:
    flags: dict[str, object] = {"listen": listen, "backend": backend, "backend_tls_mode": "prefer"}
    if policy is not None:
        flags.update(policy=str(policy), master_key=master_key_to_text(generate_master_key()))
    settings = load_settings(None, flags, environ={})
    install_event_loop_policy()

    async def main() -> None:
        proxy = ProxyServer(settings)
        await proxy.start()
        auth = f"{user}:{password}" if password else user
        print("\npgcloak is running. Connect through it with:\n", file=sys.stderr)
        print(f"  psql 'postgresql://{auth}@{settings.listen_host}:{proxy.port}/{dbname}'\n", file=sys.stderr)
        if policy is not None:
            print(f"Protected by {policy}:\n\n{policy.read_text()}", file=sys.stderr)
            print(WALKTHROUGH, file=sys.stderr)
        if policy is not None:
            support = f"{SUPPORT_USER}:{SUPPORT_PASSWORD}@{settings.listen_host}:{proxy.port}/{dbname}"
            print(f"The help desk, through pgcloak:\n\n  psql 'postgresql://{support}'\n", file=sys.stderr)
        if direct:
            print(f"PostgreSQL itself (bypassing pgcloak):\n\n  {direct}\n", file=sys.stderr)
        print("Press Ctrl-C to stop.", file=sys.stderr)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.shutdown(drain_timeout=1.0)

    asyncio.run(main())
    return 0
