"""The asyncio server: accept clients, run sessions, drain on shutdown, pre-fork workers.

pgcloak keeps no state shared between sessions that a second process could not
rebuild, so scaling out on one host is N processes on one port (SO_REUSEPORT lets the
kernel spread connections). Cancel requests work across workers because sessions
pass PostgreSQL's own BackendKeyData through: any worker forwards a CancelRequest
straight to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from pgcloak.audit import AuditLog
from pgcloak.audit.sinks import resolve_paths
from pgcloak.config import ConfigError, Settings
from pgcloak.crypto.errors import CryptoError
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey, master_key_from_text
from pgcloak.crypto.sources import FileKeySource, SharesKeySource
from pgcloak.policy import Policy, PolicyError, load_policy
from pgcloak.session.protection import Protection
from pgcloak.session.session import Session
from pgcloak.session.tls import TlsContexts, build_tls
from pgcloak.session.verifiers import VerifierSource

log = logging.getLogger("pgcloak.server")

ADMIN_SHUTDOWN = ("57P01", "terminating connection due to administrator command")


def load_master_key(settings: Settings) -> MasterKey:
    """The master key from the configured source; errors never show key material."""
    try:
        if settings.master_key is not None:
            return master_key_from_text(settings.master_key.get_secret_value())
        if settings.master_key_file is not None:
            return FileKeySource(settings.master_key_file).load()
        if settings.master_key_shares:
            files = [f.strip() for f in settings.master_key_shares.split(",") if f.strip()]
            return SharesKeySource(files=files).load()
    except CryptoError as exc:
        raise ConfigError(f"master key: {exc}") from None
    raise ConfigError("no master key configured")


def load_protection(settings: Settings, keyring: Keyring | None = None) -> Protection | None:
    """Policy + keyring + planner, or None when no policy is configured (pure relay)."""
    if settings.policy is None:
        return None
    try:
        policy = load_policy(settings.policy)
    except PolicyError as exc:
        raise ConfigError(f"policy refused: {exc}") from None
    if policy.nobody_reads:
        log.warning(
            "no role may read the protected columns (default_read: deny and no roles: entry): "
            "every read of a protected value will be refused"
        )
    return Protection.build(policy, keyring or Keyring(load_master_key(settings)))


def make_audit_log(protection: Protection) -> AuditLog:
    """The worker's audit trail; a relative file sink (the default one included) and a
    relative ``spill_dir`` are in the working directory, never next to the policy file
    (a read-only mount in a container; the image's working directory is a volume)."""
    config = resolve_paths(protection.policy.audit)
    worker = os.environ.get("PGCLOAK_WORKER_ID")
    return AuditLog(config, protection.keyring.audit_key(), worker=int(worker) if worker else None)


class Service(Protocol):
    """Something that runs beside the proxy in its process (the admin endpoints)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


#: Makes a service for a server; the second argument is the worker id (None: one process).
ServiceFactory = Callable[["ProxyServer", int | None], Service]


class ProxyServer:
    """Listens for clients and owns their sessions.

    Also what the admin endpoints read (``pgcloak.admin.metrics.ProxyState``): counters
    kept here are bumped once per session or per refusal, never per message.
    """

    def __init__(self, settings: Settings, tls: TlsContexts | None = None) -> None:
        self.settings = settings
        self.tls = tls if tls is not None else build_tls(settings)
        self.verifiers = VerifierSource(settings, self.tls.backend)
        #: Swapped whole on a policy reload; sessions read it per statement.
        self.protection = load_protection(settings)
        self._policy_stamp = self._stamp()
        self._watch: asyncio.Task[None] | None = None
        #: The audit trail (with a policy); created on the loop in start().
        self.audit: AuditLog | None = None
        self.sessions: set[Session] = set()
        #: Sessions past their StartupMessage, counted against max_client_connections.
        self.authenticated = 0
        #: Seeds the fake salts of mock SCRAM exchanges for unknown roles.
        self.mock_secret = os.urandom(32)
        self._server: asyncio.Server | None = None
        self.services: list[Service] = []
        self.connections_total = 0
        self._bytes_in_closed = 0
        self._bytes_out_closed = 0
        #: Refusals by SQLSTATE (statements and results), shared with every session.
        self.refusals: Counter[str] = Counter()
        #: Policy file edits by result: "applied" or "refused".
        self.policy_reloads: Counter[str] = Counter()
        self._draining = False

    @property
    def port(self) -> int:
        assert self._server is not None
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def _accept(self) -> asyncio.Protocol:
        self.connections_total += 1
        return Session(self).client

    def count_closed(self, session: Session) -> None:
        """Fold a finished session's byte counts into the totals."""
        self._bytes_in_closed += session.bytes_from_client
        self._bytes_out_closed += session.bytes_to_client

    # -- what the admin endpoints read ------------------------------------------------
    @property
    def connections_active(self) -> int:
        return len(self.sessions)

    @property
    def bytes_received(self) -> int:
        return self._bytes_in_closed + sum(s.bytes_from_client for s in self.sessions)

    @property
    def bytes_sent(self) -> int:
        return self._bytes_out_closed + sum(s.bytes_to_client for s in self.sessions)

    @property
    def policy_fingerprint(self) -> str | None:
        return self.protection.policy.fingerprint if self.protection is not None else None

    @property
    def audit_state(self) -> AuditLog | None:
        return self.audit

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self._draining

    @property
    def refuses_when_audit_down(self) -> bool:
        return self.protection is not None and self.protection.policy.audit.on_audit_failure == "refuse"

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.protection is not None:
            # The trail is up before the first client can connect.
            if self.protection.policy.audit.enabled:
                self.audit = make_audit_log(self.protection)
                await self.audit.start()
            self._watch = loop.create_task(self._watch_policy())
        if sock is not None:
            self._server = await loop.create_server(self._accept, sock=sock, backlog=1024)
        else:
            self._server = await loop.create_server(
                self._accept,
                self.settings.listen_host,
                self.settings.listen_port,
                backlog=1024,
                reuse_address=True,
            )
        log.info("listening", extra={"address": f"{self.settings.listen_host}:{self.port}"})
        for service in self.services:
            await service.start()

    def _stamp(self) -> tuple[float, int, int] | None:
        if self.settings.policy is None:
            return None
        try:
            st = os.stat(self.settings.policy)
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def reload_policy(self) -> bool:
        """Swap in an edited policy; an invalid edit is refused and the old one keeps serving."""
        if self.protection is None or self.settings.policy is None:
            return False
        self._policy_stamp = self._stamp()
        try:
            policy: Policy = load_policy(self.settings.policy)
        except PolicyError as exc:
            log.error("policy edit refused, still serving the previous policy", extra={"reason": str(exc)})
            self.policy_reloads["refused"] += 1
            return False
        if policy.fingerprint == self.protection.policy.fingerprint:
            return False
        self.protection = Protection.build(policy, self.protection.keyring)
        self.policy_reloads["applied"] += 1
        log.info("policy reloaded", extra={"fingerprint": policy.fingerprint[:12]})
        return True

    async def _watch_policy(self) -> None:
        """Poll the policy file: works for editors' renames and Kubernetes ConfigMap swaps."""
        while True:
            await asyncio.sleep(self.settings.policy_poll_interval)
            if self._stamp() != self._policy_stamp:
                self.reload_policy()

    def reload(self) -> None:
        """SIGHUP: re-read the policy, certificate and user files; a failure keeps the old ones."""
        self.reload_policy()
        try:
            tls = build_tls(self.settings)
            verifiers = VerifierSource(self.settings, tls.backend)
        except Exception as exc:
            log.error("reload failed, keeping the previous files", extra={"error": str(exc)})
            return
        self.tls, old = tls, self.verifiers
        self.verifiers = verifiers
        asyncio.get_running_loop().create_task(old.close())
        log.info("reloaded")

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let sessions finish, then end the rest with 57P01."""
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        self._draining = True  # /readyz says no from now on
        if self._server is not None:
            self._server.close()
        if self._watch is not None:
            self._watch.cancel()
        deadline = time.monotonic() + timeout
        if self.sessions:
            log.info("draining", extra={"sessions": len(self.sessions), "timeout_s": timeout})
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.terminate(*ADMIN_SHUTDOWN)
        await asyncio.sleep(0)
        if self.audit is not None:
            await self.audit.aclose()  # the shutdown seal
        await self.verifiers.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        log.info("stopped")


def install_event_loop_policy() -> None:
    """uvloop when available; plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on supported platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run(
    settings: Settings,
    on_ready: Callable[[int], None] | None = None,
    services: Sequence[ServiceFactory] = (),
) -> int:
    """Serve in this process (workers=1) or in N forked workers sharing the port;
    ``services`` run beside the proxy in each worker (the admin endpoints)."""
    install_event_loop_policy()
    if settings.workers == 1:
        return _run_worker(settings, None, on_ready, services, None)
    # Reserve the port (it may be 0) with a bound, non-listening SO_REUSEPORT socket;
    # each worker binds its own listening socket to the same port.
    reserve = _reuseport_socket(settings.listen_host, settings.listen_port)
    port = reserve.getsockname()[1]
    children: list[int] = []
    for worker in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            reserve.close()
            sock = _reuseport_socket(settings.listen_host, port)
            os.environ["PGCLOAK_WORKER_ID"] = str(worker)
            code = 1
            try:
                code = _run_worker(settings, sock, None, services, worker)
            finally:
                os._exit(code)
        children.append(pid)
    if on_ready is not None:
        on_ready(port)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, st = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        status = status or os.waitstatus_to_exitcode(st)
    reserve.close()
    return status


def _run_worker(
    settings: Settings,
    sock: socket.socket | None,
    on_ready: Callable[[int], None] | None,
    services: Sequence[ServiceFactory],
    worker: int | None,
) -> int:
    async def main() -> None:
        server = ProxyServer(settings)
        server.services.extend(make(server, worker) for make in services)
        if sock is not None:
            sock.listen(1024)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload)
        await server.start(sock)
        if on_ready is not None:
            on_ready(server.port)
        await stop.wait()
        log.info("shutdown requested")
        await server.shutdown()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"pgcloak: {exc}", file=sys.stderr)
        return 1
    return 0
