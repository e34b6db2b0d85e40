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
import gc
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from pgcloak.audit import AuditLog
from pgcloak.audit.sinks import resolve_paths
from pgcloak.config import ConfigError, Settings
from pgcloak.crypto.errors import CryptoError
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey, master_key_from_text
from pgcloak.crypto.sources import FileKeySource, SharesKeySource
from pgcloak.policy import Policy, PolicyError, load_policy, policy_from_bytes, read_policy_file
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


def make_audit_log(protection: Protection, workdir: Path | None = None) -> AuditLog:
    """The worker's audit trail; a relative file sink (the default one included) and a
    relative ``spill_dir`` are in the working directory (``workdir``: the one the proxy
    started in, also for a trail a policy reload makes), never next to the policy file
    (a read-only mount in a container; the image's working directory is a volume)."""
    config = resolve_paths(protection.policy.audit, workdir)
    worker = os.environ.get("PGCLOAK_WORKER_ID")
    return AuditLog(config, protection.keyring.audit_key(), worker=int(worker) if worker else None)


#: What a poll looks at first: size, mtime, inode and device (a rename or a ConfigMap's
#: symlink swap changes the inode); None while the file is missing.
FileStamp = tuple[int, int, int, int] | None


def file_stamp(path: Path) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class PolicyFileWatch:
    """When an edited policy file is read: once it has stayed the same for one poll.

    An editor or a ``cat > policy.yaml`` that rewrites the file in place in several
    writes shows a prefix of the new policy for a moment, and a prefix is often a valid
    policy (one missing its last column). So a change (stamp differs from the file last
    taken) is read and hashed, and taken only when the next poll reads the same content
    (size and hash; the mtime may differ, as when an agent re-syncs the file in place
    every poll): what is applied has been read whole and identical twice, a poll
    interval apart. A cheap ``stat`` is all a poll costs while nothing changes. A file
    replaced by a rename (editors, Kubernetes ConfigMaps) is taken the same way, one
    poll later than it could be.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: The stamp of the file last taken (applied or refused).
        self.taken: FileStamp = file_stamp(path)
        self._candidate: tuple[int | None, bytes | None] | None = None

    def poll(self) -> bytes | None:
        """The file's bytes once a change has settled, else None. Raises
        :class:`PolicyError` once when the file stays unreadable (removed, no permission)."""
        stamp = file_stamp(self.path)
        if stamp == self.taken:
            self._candidate = None
            return None
        raw: bytes | None
        error: PolicyError | None = None
        try:
            raw = read_policy_file(self.path)
        except PolicyError as exc:
            raw, error = None, exc
        # Settled when the content is the same twice (a file re-synced in place every poll
        # with the same bytes has a new mtime each time, and would never settle on stamps).
        seen = (len(raw) if raw is not None else None, hashlib.sha256(raw).digest() if raw is not None else None)
        if seen != self._candidate:
            self._candidate = seen  # changed since the last poll: look again next time
            return None
        self._candidate = None
        self.taken = stamp
        if error is not None:
            raise error
        return raw

    def take(self) -> tuple[FileStamp, bytes]:
        """Read the file now (SIGHUP: the operator says the edit is done)."""
        stamp = file_stamp(self.path)
        raw = read_policy_file(self.path)
        self.taken, self._candidate = stamp, None
        return stamp, raw


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
        #: Where relative audit paths are, whenever a trail is made (a reload's too).
        self.workdir = Path.cwd()
        #: Swapped whole on a policy reload; sessions read it per statement.
        self.protection = load_protection(settings)
        self._policy_watch = PolicyFileWatch(settings.policy) if settings.policy is not None else None
        self._watch: asyncio.Task[None] | None = None
        #: One reload at a time (the watcher and SIGHUP).
        self._reloading = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        #: The audit trail (with a policy); created on the loop in start(), replaced by a
        #: reload that changes the policy's ``audit:`` section.
        self.audit: AuditLog | None = None
        #: Trails replaced by a reload that turned auditing off, kept open (and closed
        #: with their shutdown seal) until the sessions still writing to them end.
        self._retired: set[AuditLog] = set()
        #: Retired trails being closed (their queued events, their shutdown seal).
        self._trail_closes: set[asyncio.Task[None]] = set()
        self.sessions: set[Session] = set()
        #: Connections holding one of the max_client_connections slots (see take_slot).
        self.clients = 0
        #: Logins that did not finish within client_login_timeout.
        self.login_timeouts = 0
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

    def take_slot(self) -> bool:
        """One of the ``max_client_connections`` slots for a connection, if one is free.

        A connection takes its slot when it is accepted, not when it has logged in, as
        in PgBouncer (max_client_conn) and PostgreSQL (max_connections counts backends
        still authenticating): the one limit then bounds sockets and memory, and a
        client that opens connections and sends nothing fills no more than that limit,
        each connection for at most ``client_login_timeout``. A separate cap on logins
        in progress would be one more number to tune that an attacker can fill with the
        same effect (new logins refused) while existing sessions keep working either way.
        """
        if self.clients >= self.settings.max_client_connections:
            return False
        self.clients += 1
        return True

    def admits_overflow(self) -> bool:
        """May a connection arriving with every slot taken still be read?

        Up to ``max_client_connections`` of them are: that is how their client gets a
        readable 53300 after its StartupMessage (as PostgreSQL answers), how a
        CancelRequest still reaches PostgreSQL when the proxy is full (that is when one
        is needed most), and how a client gets in whose slot freed while it negotiated.
        They are bounded by the login timeout too. Past that, connections are closed
        as soon as they are accepted: at most twice the limit is ever open.
        """
        return len(self.sessions) - self.clients < self.settings.max_client_connections

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
                self.audit = make_audit_log(self.protection, self.workdir)
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

    async def reload_policy(self, raw: bytes | None = None, stamp: FileStamp = None) -> bool:
        """Swap in an edited policy (``raw``: the file's bytes, read now when None; the
        watcher's, read at ``stamp``, are dropped if the file was taken again meanwhile, by
        a SIGHUP while this waited for the reload before it: they are older).

        Whatever goes wrong, the edit is refused (logged, counted) and the policy in force
        keeps serving: this never raises.
        """
        if self.protection is None or self._policy_watch is None:
            return False
        async with self._reloading:
            if self._draining:
                return False
            source = str(self._policy_watch.path)
            if raw is not None and stamp is not None and self._policy_watch.taken != stamp:
                return False
            try:
                if raw is None:
                    _, raw = self._policy_watch.take()
                policy: Policy = policy_from_bytes(raw, source)
                current = self.protection.policy
                audit_changed = policy.audit != current.audit
                if policy.fingerprint == current.fingerprint and not audit_changed:
                    return False
                protection = Protection.build(policy, self.protection.keyring)
                # Made before anything is swapped: a trail that cannot be set up refuses the edit.
                trail = make_audit_log(protection, self.workdir) if audit_changed and policy.audit.enabled else None
            except PolicyError as exc:
                self._refused(str(exc))
                return False
            except Exception as exc:
                log.exception("policy edit refused: it could not be applied")
                self._refused(f"{source}: {type(exc).__name__}")
                return False
            old = self.audit
            # Policy and trail change together: a session that starts after this line
            # gets both (nothing below awaits before both are swapped).
            self.protection = protection
            if audit_changed:
                self.audit = trail
            self.policy_reloads["applied"] += 1
            log.info("policy reloaded", extra={"fingerprint": policy.fingerprint[:12]})
            if audit_changed:
                await self._switch_audit(old, trail, policy)
            return True

    async def _switch_audit(self, old: AuditLog | None, new: AuditLog | None, policy: Policy) -> None:
        """Put a reloaded ``audit:`` section in force.

        Turned on or changed: every audited session writes to the new trail from its next
        event on, the trails before it are closed (their queued events, then their
        shutdown seal), and only then is the new trail opened. So two trails never write
        at once: they may name one file (and so one spill file), and with rotation a
        second writer would break both chains. The new trail is a chain of its own (a new
        chain id), which ``pgcloak audit verify`` checks on its own, as after a restart;
        events the sessions emit meanwhile wait in its queue.
        Turned on: sessions opened before are audited from their next idle moment (no
        transaction open, nothing in flight; ``Session._join_trail``), with an
        ``audit_started`` connection event.
        Turned off: sessions audited so far keep their trail until they end (it is closed
        then); new sessions are not audited.
        """
        config = policy.audit
        unaudited = 0
        for session in self.sessions:
            audit = session.statement_audit
            if audit is None:
                unaudited += session.ready
            elif new is not None:
                audit.switch(new, config.statements)
        if new is None:
            if old is not None:
                self._retired.add(old)
                log.warning(
                    "audit trail turned off by the policy: new sessions are not audited",
                    extra={"sink": old.sink.description, "sessions": len(self.sessions) - unaudited},
                )
                self.release_audit(old)
            return
        if unaudited:
            log.warning(
                "audit trail turned on: sessions opened before are audited from their next idle moment",
                extra={"sessions": unaudited},
            )
        retiring = [trail for trail in (old, *self._retired) if trail is not None]
        self._retired.clear()
        try:
            for trail in retiring:
                try:
                    await trail.aclose()
                except Exception:  # the new trail starts all the same
                    log.exception("the previous audit trail could not be closed")
                for name, value in trail.metrics.as_dict().items():  # counters stay monotonic
                    setattr(new.metrics, name, getattr(new.metrics, name) + value)
                if trail.spill_bytes and trail.spill.path != new.spill.path:
                    log.warning(
                        "audit records left in the spill file of the previous sink; "
                        "a proxy started with that sink replays them",
                        extra={"file": str(trail.spill.path), "bytes": trail.spill_bytes},
                    )
        finally:
            if self._trail_closes:  # trails turned off earlier, still writing their seal
                await asyncio.gather(*self._trail_closes, return_exceptions=True)
            await new.start()  # a sink that cannot be opened: unhealthy, retried, spilled
        log.info(
            "audit trail reloaded",
            extra={"sink": new.sink.description, "chain": new.chain_id, "statements": config.statements},
        )

    def release_audit(self, trail: AuditLog | None) -> None:
        """A session that wrote to ``trail`` ended: close it if it is retired and unused."""
        if trail is None or trail not in self._retired:
            return
        if any(s.statement_audit is not None and s.statement_audit.log is trail for s in self.sessions):
            return
        self._retired.discard(trail)
        task = asyncio.get_running_loop().create_task(trail.aclose())
        # Awaited by a reload that turns a trail on again before the new one opens (they
        # may name one file, one spill file).
        self._trail_closes.add(task)
        task.add_done_callback(self._trail_closes.discard)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refused(self, reason: str) -> None:
        log.error("policy edit refused, still serving the previous policy", extra={"reason": reason})
        self.policy_reloads["refused"] += 1

    async def _watch_policy(self) -> None:
        """Poll the policy file: works for editors' renames and Kubernetes ConfigMap swaps.

        Nothing that goes wrong in one poll stops the polling: a dead watcher would leave
        every later edit (a column newly protected) silently unapplied.
        """
        watch = self._policy_watch
        assert watch is not None
        while True:
            await asyncio.sleep(self.settings.policy_poll_interval)
            try:
                try:
                    raw = watch.poll()
                except PolicyError as exc:
                    self._refused(str(exc))
                    continue
                if raw is not None:
                    await self.reload_policy(raw, watch.taken)
            except Exception:
                log.exception("policy watcher: this check failed; still watching")
                self.policy_reloads["refused"] += 1

    def reload(self) -> None:
        """SIGHUP: re-read the policy, certificate and user files; a failure keeps the old ones."""
        self._spawn(self.reload_files())

    async def reload_files(self) -> None:
        """What SIGHUP does. The policy and the TLS and user files each stand alone: one
        that fails keeps its previous version and does not stop the others."""
        await self.reload_policy()
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
        async with self._reloading:  # a reload under way finishes first (it may switch trails)
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
        for trail in (self.audit, *self._retired):
            if trail is not None:
                await trail.aclose()  # the shutdown seal
        self._retired.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
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
        # What startup made (sqlglot, pydantic, the policy, the keys) lives as long as the
        # process: out of the collector's sight, a full collection (the audit trail's queued
        # events are what makes them come) walks only what came later, in a fraction of
        # the 20 ms pause every few seconds it was.
        gc.freeze()
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
