"""`pgcloak demo`: a throwaway PostgreSQL with pgcloak in front, for a first psql session."""

from __future__ import annotations

import asyncio
import signal
import sys
from urllib.parse import urlsplit, urlunsplit

from pgcloak.config import load_settings
from pgcloak.logs import setup_logging
from pgcloak.session.server import ProxyServer, install_event_loop_policy

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_DB = "demo"


def run_demo(listen: str, backend: str | None, keep: bool = False) -> int:
    setup_logging("text", "info")
    if backend is not None:
        parts = urlsplit(backend)
        user = parts.username or "postgres"
        dbname = parts.path.lstrip("/") or user
        backend_url = urlunsplit(("postgresql", f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}", "", "", ""))
        return _serve(listen, backend_url, user, dbname, None, None)

    from pgcloak.demo.postgres import TemporaryPostgres

    print("pgcloak demo: starting a throwaway PostgreSQL ...", file=sys.stderr)
    server = TemporaryPostgres()
    server.start()
    try:
        server.create_login(DEMO_USER, DEMO_PASSWORD, DEMO_DB)
        print(f"pgcloak demo: PostgreSQL {server.version_string} on {server.host}:{server.port}", file=sys.stderr)
        direct = f"psql 'postgresql://{DEMO_USER}:{DEMO_PASSWORD}@{server.host}:{server.port}/{DEMO_DB}'"
        return _serve(
            listen, f"postgresql://{server.host}:{server.port}", DEMO_USER, DEMO_DB, DEMO_PASSWORD, direct
        )
    finally:
        if not keep:
            server.stop()


def _serve(listen: str, backend: str, user: str, dbname: str, password: str | None, direct: str | None) -> int:
    settings = load_settings(None, {"listen": listen, "backend": backend})
    install_event_loop_policy()

    async def main() -> None:
        proxy = ProxyServer(settings)
        await proxy.start()
        auth = f"{user}:{password}" if password else user
        print("\npgcloak is running. Connect through it with:\n", file=sys.stderr)
        print(f"  psql 'postgresql://{auth}@{settings.listen_host}:{proxy.port}/{dbname}'\n", file=sys.stderr)
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
