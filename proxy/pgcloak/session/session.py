"""One client connection: start-up, TLS, authentication, then the relay.

The start-up phase is a coroutine (``_startup``) reading whole packets; the relay
phase is two callbacks (``_relay_client`` / ``_relay_backend``) fed straight from
``data_received``. Both directions go through a :class:`~pgcloak.wire.splitter.Splitter`,
which walks message headers without copying; messages nobody needs to change are
forwarded as the original bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import struct
import time
from typing import TYPE_CHECKING

from pgcloak.audit import SessionInfo, connection_event
from pgcloak.audit.events import ConnectionAction
from pgcloak.session.auditing import REPLY_ENDS, SessionAudit, sqlstate_of
from pgcloak.session.endpoint import ConnectionClosed, Endpoint
from pgcloak.session.protection import Protection
from pgcloak.session.reprepare import ACKS, cut
from pgcloak.session.rewriter import CAPTURE, CAPTURE_AUDITED, Rewriter
from pgcloak.session.scram import ScramClient, ScramError, ScramServer, ScramVerifier
from pgcloak.session.search_path import SessionSearchPath
from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import Mark, frame, iter_messages, scan_marked
from pgcloak.wire.messages import (
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    DataRow,
    NegotiateProtocolVersion,
    Query,
    SASLInitialResponse,
    SASLResponse,
    error_response,
)
from pgcloak.wire.splitter import PASS, Segment, Splitter
from pgcloak.wire.startup import (
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)

if TYPE_CHECKING:
    from pgcloak.audit import AuditLog
    from pgcloak.session.server import ProxyServer

log = logging.getLogger("pgcloak.session")

_ids = itertools.count(1)
_unpack_i32 = struct.Struct("!i").unpack_from
_SSL_REQUEST = SSLRequest().encode()
_TERMINATE = b"X\x00\x00\x00\x04"
_READY_HEAD = b"Z\x00\x00\x00\x05"
#: What a protected session asks at start-up: its roles ('r' rows), its search_path ('s')
#: and the current user ('u', what "$user" in the path means).
_PATH_FACTS = (
    "UNION ALL SELECT 's', pg_catalog.current_setting('search_path') "
    "UNION ALL SELECT 'u', current_user::text"
)
_SESSION_FACTS_SQL = (
    "SELECT 'r', rolname FROM pg_catalog.pg_roles "
    "WHERE pg_catalog.pg_has_role(session_user, oid, 'MEMBER') " + _PATH_FACTS
)
#: PostgreSQL 16 split membership into INHERIT and SET options (and gives a CREATEROLE
#: user an ADMIN-only membership in the roles it creates): the roles that count are those
#: whose privileges the login has or can take on with SET ROLE.
_SESSION_FACTS_SQL_16 = (
    "SELECT 'r', rolname FROM pg_catalog.pg_roles "
    "WHERE pg_catalog.pg_has_role(session_user, oid, 'USAGE') "
    "OR pg_catalog.pg_has_role(session_user, oid, 'SET') " + _PATH_FACTS
)
#: Asked again at the first idle moment after a statement that may have changed the path:
#: utility statements, which take no snapshot in the client's transaction. "$user" means
#: the role SET ROLE chose, else the session's authorization.
_PATH_PROBE = Query("SHOW search_path; SHOW role; SHOW session_authorization").encode()
#: The server messages the session follows: the ends of replies (the audit trail, the
#: search_path), ParseComplete / CloseComplete (statements prepared again) and
#: CopyInResponse (PostgreSQL ignores Sync in copy-in mode).
_COPY_IN = ord("G")
_MARKED = REPLY_ENDS | ACKS | {_COPY_IN}
_PARAMETER_STATUS = ord("S")
_CLIENT_ENCODING = b"client_encoding\0"
_STANDARD_STRINGS = b"standard_conforming_strings\0"
_PASSING = frozenset(b"ANS")  # notifications, notices, ParameterStatus: the client's
_READY, _DATA_ROW, _ERROR = ord("Z"), ord("D"), ord("E")
_COPY_DATA = ord("d")
#: COPY data encrypted per turn of the event loop: a CopyData into a protected COPY with
#: more than _COPY_SLICED_ABOVE bytes of data (some drivers send megabytes in one, about
#: 1 s of work per 8 MB) is encrypted a slice at a time, so that the process's other
#: sessions are served in between (a slice takes milliseconds); a smaller one at once
#: (psycopg's largest, 128 KiB, too).
_COPY_SLICE = 64 * 1024
_COPY_SLICED_ABOVE = 2 * _COPY_SLICE

# Authentication request codes that expect a message from the client in return.
_AUTH_NEEDS_RESPONSE = {3, 5, 7, 8, 9, 10, 11}
_AUTH_NAMES = {3: "password", 5: "md5", 7: "gss", 8: "gss", 9: "sspi", 10: "sasl", 11: "sasl"}
_SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
_MAX_AUTH_MESSAGE = 65535 + 4



def _setting(data: bytes, start: int, end: int) -> str:
    """The value of a ParameterStatus whose name ends at ``start``."""
    return data[start:end].rstrip(b"\0").decode("ascii", "replace")


def _tls_detail(exc: BaseException) -> dict[str, str]:
    """What a TLS failure says, for the log: a certificate's verification message
    ("Hostname mismatch, certificate is not valid for 'db'.", "unable to get local issuer
    certificate") or OpenSSL's reason code. Neither holds a secret."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return {"reason": str(exc.verify_message)}
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return {"reason": str(exc.reason)}
    return {}

class SessionError(Exception):
    """Ends the session with an ErrorResponse to the client (FATAL unless said otherwise)."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail


class BackendRefused(ConnectionClosed):
    """PostgreSQL sent an ErrorResponse during start-up; the client already has it."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class Session:
    """State of one client connection and its backend connection."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.settings = server.settings
        self.id = f"{os.getpid():x}-{next(_ids):x}"
        self.client = Endpoint("client", self._lost, on_made=self.start)
        self.backend: Endpoint | None = None
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.client_addr = ""
        self.client_tls = False
        #: The client's TLS handshake is under way: its socket carries no messages of ours.
        self._client_handshake = False
        #: A CancelRequest is being forwarded (the client may already have gone).
        self._cancelling = False
        self.backend_tls = False
        self.started = time.monotonic()
        self.ready = False  # in the relay phase
        self.closing = False
        self.bytes_from_client = 0
        self.bytes_from_backend = 0
        #: What a protected session sent its client (decrypted, masked, refused).
        self._bytes_rewritten = 0
        self._c2b = Splitter(max_message=self.settings.max_message_size)
        self._b2c_idle = True  # the last server chunk ended with ReadyForQuery
        self._b2c_held = b""  # an incomplete server message (protected sessions only)
        self._rewriter: Rewriter | None = None
        self._audit: SessionAudit | None = None
        self._audit_wait: asyncio.Task[None] | None = None
        self._info: SessionInfo | None = None
        self._task: asyncio.Task[None] | None = None
        #: A big CopyData being encrypted slice by slice (_copy_in_slices); meanwhile the
        #: client is not read, and what it had sent already waits in _held_in.
        self._slicing: asyncio.Task[None] | None = None
        self._held_in: list[bytes] = []
        #: Holds one of the server's max_client_connections slots (ProxyServer.take_slot).
        self._counted = False
        #: The loop time by which the client must be logged in (client_login_timeout).
        self._login_deadline = 0.0
        #: The login role and the roles it is a member of (asked at start-up, with a policy).
        self.roles: frozenset[str] = frozenset()
        #: The schemas unqualified table names mean (asked at start-up and after changes).
        self.search_path = SessionSearchPath("", None)
        self._protections: tuple[Protection | None, tuple[str, ...] | None, Protection | None] = (None, (), None)
        self._path_probe: _PathProbe | None = None
        self._server_version = ""
        #: As PostgreSQL reported it at startup (the rewriter follows later changes).
        self._client_encoding = "UTF8"
        self._standard_strings = "on"

    @property
    def bytes_to_client(self) -> int:
        """What the client was sent in the relay phase: the server's bytes as they came
        in an unprotected session, after decryption, masks and refusals in a protected one."""
        return self._bytes_rewritten if self._rewriter is not None else self.bytes_from_backend

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Called by the server once the client's TCP connection is accepted."""
        peer = self.client.transport.get_extra_info("peername") if self.client.transport else None
        if peer:
            self.client_addr = f"{peer[0]}:{peer[1]}"
        server = self.server
        self._counted = server.take_slot()
        if not self._counted and not server.admits_overflow():
            # Twice max_client_connections open already: not a byte read or written.
            self.closing = True
            self.client.abort()
            return
        server.sessions.add(self)
        loop = asyncio.get_running_loop()
        self._login_deadline = loop.time() + self.settings.client_login_timeout
        self._task = loop.create_task(self._startup())

    def _lost(self, endpoint: Endpoint, exc: Exception | None) -> None:
        if self.closing:
            return
        if not self.ready:
            if endpoint is self.client:
                if not self.user and (self._cancelling or self.client.has_pending()):
                    # A client may send its CancelRequest and close at once (tokio-postgres
                    # does): the start-up task reads what came and forwards the cancel, as
                    # the postmaster would, then ends the session.
                    return
                self._finish("client closed during start-up")
            elif endpoint is self.backend:
                # PostgreSQL gave up on the login (authentication_timeout, a shutdown) while
                # the start-up task may be waiting for the client, who may never answer:
                # end that wait too. The task reports it (08006) and ends the session. A
                # wait on the backend sees the close itself, after what PostgreSQL sent.
                self.client.fail("the PostgreSQL server closed the connection during start-up")
            return
        if endpoint is self.client:
            # Client gone: tell the backend politely if we are between its messages.
            if self.backend is not None and not self.backend.closed:
                if self.ready and self._c2b.at_boundary:
                    self.backend.write(_TERMINATE)
                # abort, not close: a graceful TLS close waits for PostgreSQL's
                # close_notify, which a backend busy streaming a result never sends,
                # so the query would run on (up to the 30 s TLS shutdown timeout).
                self.backend.abort()
            self._finish("client closed")
        else:
            if self.ready and not self.client.closed:
                self._fatal("57P01", "terminating connection because the backend connection was lost")
            self._finish("backend closed")

    def _finish(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.client.close()
        if self.backend is not None:
            self.backend.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._slicing is not None:
            self._slicing.cancel()
            self._slicing = None
        self.server.sessions.discard(self)
        self.server.count_closed(self)
        if self._counted:
            self.server.clients -= 1
        if self.ready:
            self._audit_connection("disconnected", reason=reason)
            if self._audit is not None:
                self.server.release_audit(self._audit.log)
            log.info(
                "session closed",
                extra={
                    "session": self.id,
                    "reason": reason,
                    "user": self.user,
                    "database": self.database,
                    "duration_s": round(time.monotonic() - self.started, 3),
                    "bytes_in": self.bytes_from_client,
                    "bytes_out": self.bytes_from_backend,
                },
            )

    def audit_info(self) -> SessionInfo:
        if self._info is not None:
            return self._info
        worker = os.environ.get("PGCLOAK_WORKER_ID")
        info = SessionInfo(
            session=self.id,
            user=self.user or None,
            database=self.database or None,
            application_name=self.application_name or None,
            client=self.client_addr or None,
            worker=int(worker) if worker else None,
        )
        if self.ready:
            self._info = info  # who the session is no longer changes
        return info

    @property
    def statement_audit(self) -> SessionAudit | None:
        """The session's audit events (None: not audited); a reload may switch its trail."""
        return self._audit

    def _audit_connection(self, action: ConnectionAction, *, sqlstate: str | None = None, reason: str | None = None) -> None:
        """Connection events are always recorded when there is an audit trail (the session's
        own, once it has one: after a reload turned auditing off, it is kept until the end)."""
        trail = self._audit.log if self._audit is not None else self.server.audit
        if trail is None:
            return
        totals: dict[str, object] = {}
        if action == "disconnected":
            totals = {
                "duration_ms": (time.monotonic() - self.started) * 1000.0,
                "bytes_in": self.bytes_from_client,
                "bytes_out": self.bytes_from_backend,
                "statements": self._audit.statements if self._audit is not None else 0,
            }
        try:
            event = connection_event(
                self.audit_info(),
                action=action,
                tls=self.client_tls,
                sqlstate=sqlstate,
                reason=reason,
                **totals,  # type: ignore[arg-type]
            )
            trail.emit(event)
        except Exception as exc:
            log.error("audit event rejected", extra={"session": self.id, "error": type(exc).__name__})

    def _fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        """Send a FATAL ErrorResponse if the client stream is at a message boundary."""
        if not self.client.closed and self._client_at_boundary():
            self.client.write(error_response(sqlstate, message, "FATAL", detail))

    def _client_at_boundary(self) -> bool:
        """Can a message of ours be written to the client without splitting one of the server's?"""
        if not self.ready:
            return not self._client_handshake  # start-up writes whole messages
        if self._rewriter is not None:
            return not self._b2c_held  # protected sessions forward whole messages only
        return self._b2c_idle

    def terminate(self, sqlstate: str, message: str) -> None:
        """Server-initiated end of the session (shutdown, limits)."""
        self._fatal(sqlstate, message)
        if self.backend is not None and self.ready and self._c2b.at_boundary:
            self.backend.write(_TERMINATE)
        self._finish("terminated")

    # -- start-up ---------------------------------------------------------------------
    async def _startup(self) -> None:
        # client_login_timeout covers everything from accept to the first ReadyForQuery:
        # TLS handshake, StartupMessage, authentication, PostgreSQL's own start-up.
        login = asyncio.timeout_at(self._login_deadline)
        try:
            async with login:
                startup = await self._negotiate()
                if startup is None:
                    return
                await self._connect_backend()
                if self.settings.auth_mode == "scram":
                    await self._authenticate_scram(startup)
                else:
                    await self._authenticate_relay(startup)
                await self._until_ready()
            try:
                self._enter_relay()
            except Exception:
                # ready is set by then: the finally below would not end the session, and
                # its slot would never be freed.
                log.exception("internal error entering the relay", extra={"session": self.id})
                self._fatal("XX000", "pgcloak internal error; the session is closed")
                self._finish("internal error")
        except TimeoutError as exc:
            if login.expired():
                self._login_timed_out()
            else:
                self._lost_during_startup(exc)
        except SessionError as exc:
            self._fatal(exc.sqlstate, exc.message, exc.detail)
            if exc.sqlstate.startswith("28"):
                self._audit_connection("auth_failed", sqlstate=exc.sqlstate, reason=exc.message)
            log.info(
                "session refused",
                extra={"session": self.id, "sqlstate": exc.sqlstate, "reason": exc.message, "client": self.client_addr},
            )
            self._finish("refused")
        except ProtocolError as exc:
            self._fatal(exc.sqlstate, exc.message)
            log.info("protocol violation", extra={"session": self.id, "sqlstate": exc.sqlstate, "reason": exc.message})
            self._finish("protocol violation")
        except ScramError as exc:
            self._fatal(exc.sqlstate, str(exc))
            self._audit_connection("auth_failed", sqlstate=exc.sqlstate, reason="SCRAM exchange failed")
            log.info("authentication failed", extra={"session": self.id, "user": self.user, "client": self.client_addr})
            self._finish("authentication failed")
        except BackendRefused as exc:
            if exc.sqlstate and exc.sqlstate.startswith("28"):
                self._audit_connection("auth_failed", sqlstate=exc.sqlstate, reason="refused by PostgreSQL")
            self._finish("refused by PostgreSQL")
        except ConnectionClosed:
            if self.backend is not None and self.backend.closed:
                self._fatal("08006", "the PostgreSQL server closed the connection unexpectedly")
            self._finish("closed during start-up")
        except asyncio.CancelledError:
            self._finish("cancelled")
        except (OSError, ssl.SSLError) as exc:
            self._lost_during_startup(exc)
        finally:
            if not self.ready and not self.closing:
                # Whatever went wrong above, the session never outlives its start-up task.
                self._finish("start-up failed")

    def _lost_during_startup(self, exc: Exception) -> None:
        self._fatal("08006", "pgcloak lost a connection during start-up")
        log.info("start-up failed", extra={"session": self.id, "error": type(exc).__name__, **_tls_detail(exc)})
        self._finish("start-up failed")

    def _login_timed_out(self) -> None:
        """client_login_timeout expired: FATAL 08P01 (when the client can read it) and close.

        PostgreSQL, on its authentication_timeout, logs "canceling authentication due to
        timeout" (57014) and closes without a word to the client. pgcloak tells the
        client, in its words, with 08P01 as PgBouncer does on client_login_timeout: a
        connection-class error that drivers report as a failed connection attempt, where
        57014 (query_canceled) would read as a statement cancelled by the user.
        """
        self.server.login_timeouts += 1
        timeout = self.settings.client_login_timeout
        self._fatal(
            "08P01",
            "canceling authentication due to timeout",
            f"The client did not log in within pgcloak's client_login_timeout ({timeout:g} s).",
        )
        if self.user:
            self._audit_connection("auth_failed", sqlstate="08P01", reason="login timeout")
        log.info(
            "login timed out",
            extra={"session": self.id, "client": self.client_addr, "user": self.user, "timeout_s": timeout},
        )
        if self.backend is not None:
            self.backend.abort()  # mid-login: PostgreSQL has nothing of ours to finish
        self._finish("login timeout")

    async def _negotiate(self) -> StartupMessage | None:
        """SSLRequest / GSSENCRequest / CancelRequest / StartupMessage, like the postmaster."""
        mode = self.settings.effective_client_tls_mode
        client = self.client
        while True:
            packet = await client.read_startup_packet()
            msg = decode_startup(packet)
            if isinstance(msg, SSLRequest):
                if self.client_tls or client.has_pending():
                    raise ProtocolError("unexpected data after SSL negotiation request")
                ctx = self.server.tls.client
                if ctx is None:
                    client.write(b"N")
                    continue
                client.write(b"S")
                await self._upgrade_client(ctx)
            elif isinstance(msg, GSSENCRequest):
                client.write(b"N")
            elif isinstance(msg, CancelRequest):
                self._cancelling = True
                await self._forward_cancel(packet)
                self._finish("cancel request")
                return None
            else:
                assert isinstance(msg, StartupMessage)
                self.user = msg.user
                self.database = msg.database
                self.application_name = msg.application_name
                if not self.user:
                    raise SessionError("28000", "no PostgreSQL user name specified in startup packet")
                if mode == "require" and not self.client_tls:
                    raise SessionError(
                        "28000",
                        "pgcloak requires TLS from clients (client_tls_mode=require)",
                        "connect with sslmode=require or stronger",
                    )
                if not self._counted:
                    # Accepted with every slot taken: one may have freed since.
                    self._counted = self.server.take_slot()
                    if not self._counted:
                        raise SessionError("53300", "sorry, too many clients already")
                return self._settle_protocol(msg)

    def _settle_protocol(self, msg: StartupMessage) -> StartupMessage:
        """pgcloak speaks protocol 3.0 on both legs: a client asking for a newer minor
        version or ``_pq_.`` extensions is told so, as PostgreSQL itself would."""
        extensions = tuple(k for k in msg.params if k.startswith("_pq_."))
        if msg.protocol == PROTOCOL_3_0 and not extensions:
            return msg
        self.client.write(NegotiateProtocolVersion(0, extensions).encode())
        params = {k: v for k, v in msg.params.items() if not k.startswith("_pq_.")}
        return StartupMessage(params, PROTOCOL_3_0)

    async def _upgrade_client(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        assert self.client.transport is not None
        self._client_handshake = True
        # The login timeout bounds the handshake (start_tls's own default is 60 s).
        handshake_timeout = self._login_deadline - loop.time() + 1.0
        try:
            transport = await loop.start_tls(
                self.client.transport, self.client, ctx, server_side=True, ssl_handshake_timeout=handshake_timeout
            )
        except BaseException:
            # start_tls closed the socket; its SSL protocol does not report the loss to
            # ours, so say it here: nothing may be written to it any more.
            self.client.closed = True
            raise
        finally:
            self._client_handshake = False
        if transport is None:
            raise ConnectionClosed("client closed during TLS handshake")
        self.client.transport = transport
        self.client_tls = True

    async def _open_backend(self) -> tuple[Endpoint, bool]:
        """A TCP connection to PostgreSQL, TLS negotiated per backend_tls_mode."""
        s = self.settings
        loop = asyncio.get_running_loop()
        endpoint = Endpoint("backend", self._lost)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: endpoint, s.backend_host, s.backend_port),
                s.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            log.warning("backend unreachable", extra={"session": self.id, "error": type(exc).__name__})
            raise SessionError(
                "08006", "pgcloak could not connect to the PostgreSQL server", f"{s.backend_host}:{s.backend_port}"
            ) from None
        ctx = self.server.tls.backend
        if ctx is None:
            return endpoint, False
        endpoint.write(_SSL_REQUEST)
        answer = await endpoint.read_byte()
        if answer == ord("S"):
            assert endpoint.transport is not None
            transport = await loop.start_tls(
                endpoint.transport, endpoint, ctx, server_hostname=s.backend_host
            )
            if transport is None:
                raise ConnectionClosed("backend closed during TLS handshake")
            endpoint.transport = transport
            return endpoint, True
        endpoint.close()
        if answer == ord("N") and s.backend_tls_mode == "prefer":
            # The server refused TLS: reconnect in plain text, as libpq's sslmode=prefer does.
            endpoint = Endpoint("backend", self._lost)
            await loop.create_connection(lambda: endpoint, s.backend_host, s.backend_port)
            return endpoint, False
        raise SessionError(
            "08006",
            "the PostgreSQL server does not accept TLS, but backend_tls_mode=" + s.backend_tls_mode,
        )

    async def _connect_backend(self) -> None:
        backend, self.backend_tls = await self._open_backend()
        self.backend = backend
        backend.peer = self.client
        self.client.peer = backend

    async def _forward_cancel(self, packet: bytes) -> None:
        """Cancel keys are the backend's own (we pass BackendKeyData through), so any
        worker can forward a CancelRequest straight to PostgreSQL."""
        try:
            endpoint, _ = await self._open_backend()
        except SessionError:
            return
        endpoint.write(packet)
        endpoint.close()

    # -- authentication ---------------------------------------------------------------
    async def _read_backend(self) -> tuple[int, bytes]:
        assert self.backend is not None
        return await self.backend.read_message(1 << 30)

    async def _read_client(self) -> tuple[int, bytes]:
        # Before authentication only small messages are legitimate (PostgreSQL's
        # PG_MAX_AUTH_TOKEN_LENGTH), so an anonymous client cannot make us buffer more.
        return await self.client.read_message(_MAX_AUTH_MESSAGE)

    async def _read_client_password_message(self) -> bytes:
        t, body = await self._read_client()
        if t != ord("p"):
            raise ProtocolError(f"expected an authentication response, got message type {chr(t)!r}")
        return body

    def _backend_error(self, body: bytes) -> None:
        """Forward PostgreSQL's own ErrorResponse (e.g. 28P01) and end the session."""
        self.client.write(frame(b"E", body))
        raise BackendRefused("backend refused the session", sqlstate_of(body))

    async def _authenticate_relay(self, startup: StartupMessage) -> None:
        """PostgreSQL authenticates the client; we carry the messages both ways.

        SCRAM-SHA-256-PLUS is removed from the offer: channel binding binds the
        client's TLS session, which we terminate, so it can never verify.
        """
        assert self.backend is not None
        self.backend.write(startup.encode())
        while True:
            t, body = await self._read_backend()
            if t == ord("E"):
                self._backend_error(body)
            if t != ord("R"):
                raise ProtocolError(f"unexpected message {chr(t)!r} from the server during authentication")
            code = _unpack_i32(body)[0]
            if code == 0:
                self.client.write(frame(b"R", body))
                return
            if code == 10:
                offer = AuthenticationSASL.decode(body)
                mechanisms = tuple(m for m in offer.mechanisms if m != _SCRAM_PLUS)
                self.client.write(AuthenticationSASL(mechanisms).encode())
                answer = await self._read_client_password_message()
                initial = SASLInitialResponse.decode(answer)
                if initial.data and initial.data[:1] == b"y" and self.backend_tls:
                    raise SessionError(
                        "28000",
                        "SCRAM cannot be relayed when both legs use TLS",
                        "The client supports channel binding, which a TLS-terminating proxy cannot "
                        "pass on, and PostgreSQL would reject the exchange as a downgrade. Use "
                        "auth_mode=scram (pgcloak authenticates the client), or disable TLS on one leg.",
                    )
                self.backend.write(frame(b"p", answer))
                continue
            self.client.write(frame(b"R", body))
            if code in _AUTH_NEEDS_RESPONSE:
                self.backend.write(frame(b"p", await self._read_client_password_message()))

    async def _authenticate_scram(self, startup: StartupMessage) -> None:
        """pgcloak runs SCRAM with the client, then logs in to PostgreSQL with the
        ClientKey recovered from the client's proof, as PgBouncer does."""
        assert self.backend is not None
        verifier = await self.server.verifiers.lookup(self.user)
        known = verifier is not None
        if verifier is None:
            # A mock exchange (stable fake salt, certain failure), as PostgreSQL does,
            # so the answer does not reveal which roles exist.
            verifier = ScramVerifier.mock(self.user, self.server.mock_secret)
        binding = self.server.tls.client_channel_binding if self.client_tls else None
        scram = ScramServer(verifier, binding, doomed=not known)
        self.client.write(AuthenticationSASL(tuple(scram.mechanisms())).encode())
        initial = SASLInitialResponse.decode(await self._read_client_password_message())
        data = initial.data
        if data is None:
            # No initial response: ask for it with an empty challenge, as PostgreSQL does.
            self.client.write(AuthenticationSASLContinue(b"").encode())
            data = SASLResponse.decode(await self._read_client_password_message()).data
        first = scram.handle_client_first(initial.mechanism, data)
        self.client.write(AuthenticationSASLContinue(first).encode())
        response = SASLResponse.decode(await self._read_client_password_message())
        try:
            final = scram.handle_client_final(response.data)
        except ScramError as exc:
            if exc.sqlstate == "28P01":
                raise SessionError("28P01", f'password authentication failed for user "{self.user}"') from None
            raise
        await self._backend_login_with_client_key(startup, scram.client_key, verifier)
        self.client.write(AuthenticationSASLFinal(final).encode() + AuthenticationOk().encode())

    async def _backend_login_with_client_key(
        self, startup: StartupMessage, client_key: bytes, verifier: ScramVerifier
    ) -> None:
        assert self.backend is not None
        self.backend.write(startup.encode())
        scram: ScramClient | None = None
        while True:
            t, body = await self._read_backend()
            if t == ord("E"):
                self._backend_error(body)
            if t != ord("R"):
                raise ProtocolError(f"unexpected message {chr(t)!r} from the server during authentication")
            code = _unpack_i32(body)[0]
            if code == 0:
                return
            if code == 10:
                offer = AuthenticationSASL.decode(body)
                binding = None
                if self.backend_tls and _SCRAM_PLUS in offer.mechanisms:
                    binding = self._backend_channel_binding()
                scram = ScramClient(
                    client_key=client_key,
                    server_key=verifier.server_key,
                    channel_binding=binding,
                    use_plus=binding is not None,
                )
                mechanism, data = scram.client_first()
                self.backend.write(SASLInitialResponse(mechanism, data).encode())
            elif code == 11 and scram is not None:
                data = AuthenticationSASLContinue.decode(body).data
                self.backend.write(SASLResponse(scram.handle_server_first(data)).encode())
            elif code == 12 and scram is not None:
                scram.handle_server_final(AuthenticationSASLFinal.decode(body).data)
            else:
                raise SessionError(
                    "28000",
                    f"PostgreSQL asked for {_AUTH_NAMES.get(code, str(code))} authentication, "
                    "but auth_mode=scram can only log in with scram-sha-256",
                    "Store the role's password as SCRAM-SHA-256 and use scram-sha-256 in pg_hba.conf.",
                )

    def _backend_channel_binding(self) -> bytes | None:
        from pgcloak.session.scram import tls_server_end_point

        assert self.backend is not None and self.backend.transport is not None
        sslobj = self.backend.transport.get_extra_info("ssl_object")
        cert = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        return tls_server_end_point(cert) if cert else None

    async def _until_ready(self) -> None:
        """Forward ParameterStatus, BackendKeyData and notices until ReadyForQuery.

        With a policy, the session's roles are asked before the client gets that
        ReadyForQuery, so its first statement is already decided for them.
        """
        while True:
            t, body = await self._read_backend()
            if t == ord("S") and body.startswith(b"server_version\0"):
                self._server_version = body[len(b"server_version\0") :].rstrip(b"\0").decode("ascii", "replace")
            elif t == ord("S") and body.startswith(_CLIENT_ENCODING):
                self._client_encoding = _setting(body, len(_CLIENT_ENCODING), len(body))
            elif t == ord("S") and body.startswith(_STANDARD_STRINGS):
                self._standard_strings = _setting(body, len(_STANDARD_STRINGS), len(body))
            if t == ord("Z") and self.server.protection is not None:
                self.roles, setting, current_user = await self._session_facts()
                self.search_path = SessionSearchPath(current_user or self.user, None)
                if setting is not None:
                    self.search_path.learned(setting, current_user or self.user, ord("I"))
            self.client.write(frame(bytes((t,)), body))
            if t == ord("Z"):
                return
            if t == ord("E"):
                raise BackendRefused("backend refused the session")

    async def _session_facts(self) -> tuple[frozenset[str], str | None, str | None]:
        """The session user's role and every role it is a member of (superusers: all), as
        PostgreSQL knows them now: what the policy's read decisions combine; and the
        session's ``search_path`` setting with the ``current_user`` its ``"$user"`` means.

        Asked once per session on its own connection (the roles are the login's, so a
        ``SET ROLE`` cannot widen them). If PostgreSQL answers with an error, the session
        gets its own role only, the most restrictive choice, and its path stays unknown
        (asked again after the client's first statement).
        """
        assert self.backend is not None
        major = self._server_version.split(".", 1)[0].split(" ", 1)[0]
        sql = _SESSION_FACTS_SQL_16 if major.isdigit() and int(major) >= 16 else _SESSION_FACTS_SQL
        self.backend.write(Query(sql).encode())
        roles: set[str] = set()
        setting: str | None = None
        current_user: str | None = None
        failed = False
        while True:
            t, body = await self._read_backend()
            if t == ord("D"):
                row = DataRow.decode(body).values
                if len(row) == 2 and row[0] is not None and row[1] is not None:
                    value = row[1].decode("utf-8", "surrogateescape")
                    if row[0] == b"r":
                        roles.add(value)
                    elif row[0] == b"s":
                        setting = value
                    else:
                        current_user = value
            elif t == ord("E"):
                failed = True
            elif t == ord("S"):
                self.client.write(frame(b"S", body))  # a setting the client must know of
            elif t == ord("Z"):
                break
        if failed:
            log.warning("could not read role memberships; deciding for the login role alone",
                        extra={"session": self.id, "user": self.user})
            return frozenset({self.user}), None, None  # the path stays unknown: asked later
        return frozenset(roles) | {self.user}, setting, current_user

    # -- relay --------------------------------------------------------------------------
    def _enter_relay(self) -> None:
        assert self.backend is not None
        self.ready = True
        log.info(
            "session ready",
            extra={
                "session": self.id,
                "user": self.user,
                "database": self.database,
                "application_name": self.application_name,
                "client": self.client_addr,
                "client_tls": self.client_tls,
                "backend_tls": self.backend_tls,
            },
        )
        self.client.relay = self._relay_client
        self.backend.relay = self._relay_backend
        if self.server.protection is not None:
            self._rewriter = Rewriter(
                self._current_protection, None, self.roles, self.server.refusals, self.search_path
            )
            self._rewriter.client_encoding(self._client_encoding)
            self._rewriter.standard_conforming_strings(self._standard_strings)
            if self.server.audit is not None:
                self._start_audit(self.server.audit, "authenticated")
            self._c2b.capture = CAPTURE if self._audit is None else CAPTURE_AUDITED
            self.backend.relay = self._relay_backend_protected
        if self.backend.has_pending():
            self._relay_backend(self.backend.pending())
        if self.client.has_pending():
            self._relay_client(self.client.pending())
        if self.client.closed:
            self._lost(self.client, None)

    def _relay_client(self, data: bytes) -> None:
        if self._slicing is not None:
            # Already received when reading stopped: after the CopyData being sliced,
            # in order.
            self._held_in.append(data)
            if self.client.transport is not None:
                self.client.transport.pause_reading()
            return
        self.bytes_from_client += len(data)
        try:
            segments = self._c2b.feed(data)
        except ProtocolError as exc:
            self._protocol_violation(exc)
            return
        backend = self.backend
        assert backend is not None and backend.transport is not None
        if segments is None:
            backend.transport.write(data)
            if self._rewriter is not None and self._rewriter.to_server:
                self._flush_to_server()  # held while the client was mid-message
        else:
            self._client_segments(segments)

    def _current_protection(self) -> Protection:
        """The server's protection (reloads swap it) planned for this session's search_path."""
        protection = self.server.protection
        assert protection is not None
        path = self.search_path.current
        base, known, found = self._protections
        if base is protection and known is path and found is not None:
            return found
        found = protection.for_search_path(path)
        self._protections = (protection, path, found)
        return found

    def _start_audit(self, trail: AuditLog, action: ConnectionAction, reason: str | None = None) -> None:
        """Record this session's statements in ``trail`` from now on."""
        rewriter, protection = self._rewriter, self.server.protection
        assert rewriter is not None and protection is not None
        audit = SessionAudit(trail, self.audit_info, protection.policy.audit.statements)
        audit.masked_of = rewriter.masked_columns
        audit.columns_of_keys = rewriter.columns_of_keys
        audit.is_column_key = rewriter.is_column_key
        self._audit = audit
        rewriter.audit_to(audit)
        self._audit_connection(action, reason=reason)

    def _join_trail(self) -> None:
        """A reload turned the trail on after this session started: audit it from its first
        idle moment on (no transaction open, nothing in flight or half sent), where no
        statement, portal or reply is left that the new trail could not follow."""
        path = self.search_path
        rewriter = self._rewriter
        trail = self.server.audit
        if (
            trail is None
            or rewriter is None
            or path.outstanding
            or path.unsynced
            or path.in_transaction
            or self._path_probe is not None
            or rewriter.acks.busy
            or rewriter.to_server
        ):
            return
        self._start_audit(trail, "audit_started", "audit turned on by a policy reload")
        log.info("session audited from now on (a reload turned the trail on)", extra={"session": self.id})

    def _client_segments(self, segments: list[Segment]) -> None:
        assert self.backend is not None and self.backend.transport is not None
        rewriter = self._rewriter
        if rewriter is None:
            for _kind, chunk in segments:
                self.backend.transport.write(chunk)
            return
        if self._audit is None and self.server.audit is not None:
            self._join_trail()
        out: list[bytes] = []
        try:
            for i, (kind, chunk) in enumerate(segments):
                if kind == PASS:
                    out.append(chunk)
                elif kind == _COPY_DATA and len(chunk) - 5 > _COPY_SLICED_ABOVE and rewriter.copying_in:
                    self.backend.transport.write(b"".join(out))
                    self._slice_copy_data(chunk, segments[i + 1 :])
                    return
                else:
                    out.append(rewriter.client_message(kind, chunk))
        except ProtocolError as exc:
            self._protocol_violation(exc)
            return
        except Exception:
            log.exception("internal error applying the policy", extra={"session": self.id})
            self._fatal("XX000", "pgcloak internal error; the session is closed")
            self._finish("internal error")
            return
        self.backend.transport.write(b"".join(out))
        if rewriter.to_server:
            self._flush_to_server()
        audit = self._audit
        if audit is not None and audit.log.full and self._audit_wait is None:
            self._pause_for_audit(audit)

    def _flush_to_server(self) -> None:
        """Send the rewriter's own messages for the server, between two of the client's
        (the client may be half-way through a message; then after it)."""
        rewriter = self._rewriter
        if rewriter is None or not rewriter.to_server or not self._c2b.at_boundary or self._slicing is not None:
            return
        assert self.backend is not None
        self.backend.write(b"".join(rewriter.to_server))
        rewriter.to_server.clear()

    def _slice_copy_data(self, message: bytes, rest: list[Segment]) -> None:
        """Encrypt a big CopyData (``message``) slice by slice on a task of its own; the
        client's messages after it (``rest``, then whatever it sends) wait until it is done."""
        assert self.client.transport is not None
        self.client.reading_held = True
        self.client.transport.pause_reading()
        self._slicing = asyncio.get_running_loop().create_task(self._copy_in_slices(message, rest))

    async def _copy_in_slices(self, message: bytes, rest: list[Segment]) -> None:
        """Each slice's records go to PostgreSQL as a CopyData of their own (COPY data is
        one stream to it; a record may span slices, the rewriter keeps its start). Between
        slices the loop serves the other sessions, and PostgreSQL's leg drains below its
        high-water mark. A refusal ends the COPY with the CopyFail the rewriter makes, the
        rest of the message dropped, as when it is encrypted whole. A session that ends
        meanwhile cancels this task."""
        rewriter, backend = self._rewriter, self.backend
        assert rewriter is not None and backend is not None
        try:
            for start in range(5, len(message), _COPY_SLICE):
                out = rewriter.copy_data(message[start : start + _COPY_SLICE])
                if out:
                    backend.write(out)
                if not rewriter.copying_in:
                    break  # refused: the CopyFail is sent
                await asyncio.sleep(0)
                await backend.drained()
            self._slicing = None
            if self.closing:
                return
            self.client.reading_held = False
            held, self._held_in = self._held_in, []
            self._client_segments(rest)
            for data in held:
                if self.closing:
                    return
                self._relay_client(data)  # held again if another big CopyData is sliced
        except Exception:
            log.exception("internal error applying the policy", extra={"session": self.id})
            self._fatal("XX000", "pgcloak internal error; the session is closed")
            self._finish("internal error")
            return
        finally:
            if self._slicing is asyncio.current_task():
                self._slicing = None
        transport = self.client.transport
        if (
            self._slicing is None
            and not self.closing
            and self._audit_wait is None
            and not backend.holds_peer
            and transport is not None
        ):
            transport.resume_reading()

    def _pause_for_audit(self, audit: SessionAudit) -> None:
        """on_full: block — stop reading this client until the audit queue has room."""
        transport = self.client.transport
        assert transport is not None
        transport.pause_reading()

        async def wait() -> None:
            try:
                await audit.log.wait_for_room()
            finally:
                self._audit_wait = None
                if not self.client.closed and self.client.transport is not None and not self.client.reading_held:
                    self.client.transport.resume_reading()

        self._audit_wait = asyncio.get_running_loop().create_task(wait())

    def _relay_backend_protected(self, data: bytes) -> None:
        """Whole messages only, so that a stored value is never split when decrypted."""
        self.bytes_from_backend += len(data)
        if self._b2c_held:
            data = self._b2c_held + data
        end, marks, tail_rows = scan_marked(data, 1 << 31, _MARKED)
        if end < len(data):
            self._b2c_held = data[end:]
            data = data[:end]
        else:
            self._b2c_held = b""
        if _CLIENT_ENCODING in data or _STANDARD_STRINGS in data:
            self._follow_settings(data)
        if self._path_probe is not None:
            data, counted = self._path_probe_reply(data)
            if data:
                _, marks, tail_rows = scan_marked(data, 1 << 31, _MARKED)
                self._to_client_protected(data, marks, tail_rows, counted)
        elif data:
            self._to_client_protected(data, marks, tail_rows)

    def _follow_settings(self, data: bytes) -> None:
        """The server reported a new client encoding or standard_conforming_strings
        (ParameterStatus, after a SET): both change how the rewriter reads statements."""
        rewriter = self._rewriter
        assert rewriter is not None
        for kind, start, end in iter_messages(data):
            if kind != _PARAMETER_STATUS:
                continue
            if data.startswith(_CLIENT_ENCODING, start):
                rewriter.client_encoding(_setting(data, start + len(_CLIENT_ENCODING), end))
            elif data.startswith(_STANDARD_STRINGS, start):
                rewriter.standard_conforming_strings(_setting(data, start + len(_STANDARD_STRINGS), end))

    def _to_client_protected(self, data: bytes, marks: list[Mark], tail_rows: int, counted: int = 0) -> None:
        """The server's whole messages for the client (``marks``: where its replies end):
        the audit trail, the search_path, results decrypted. ``counted``: ReadyForQuery
        messages at the start of ``data`` already accounted for (held back while the
        search_path was asked)."""
        rewriter = self._rewriter
        assert rewriter is not None
        # Before ReadyForQuery messages are counted below: the acks are numbered by batch.
        ours = rewriter.follow_acks(marks, counted) if rewriter.acks.busy else None
        path = self.search_path
        for i, (kind, pos, _end, rows) in enumerate(marks):
            if kind != _READY:
                if kind == _COPY_IN:  # Syncs sent since the COPY was bound were ignored
                    batch, undone = path.copy_in()
                    if undone:
                        rewriter.acks.renumber(batch, undone)
                    if self._audit is not None and self._audit.pending:
                        self._audit.ignored_syncs.append(undone)
                continue
            if counted:
                counted -= 1
                continue
            status = data[pos + 5]
            path.ready(status)
            if path.should_ask(status):
                # Hold this ReadyForQuery (and what follows) until PostgreSQL has said what
                # the path is now: the client's next statement is planned for it.
                self._ask_path(data[pos:], status)
                data, marks, tail_rows = data[:pos], marks[:i], rows
                break
        if not data:
            return
        transport = self.client.transport
        assert transport is not None
        if ours:
            # The replies to statements prepared again for the client are not its own.
            data = cut(data, ours)
            _, marks, tail_rows = scan_marked(data, 1 << 31, _MARKED)
        received = data
        if rewriter.needs_inspection(data):
            try:
                data = rewriter.backend_chunk(data)
            except Exception:
                log.exception("internal error decrypting results", extra={"session": self.id})
                self._fatal("XX000", "pgcloak internal error; the session is closed")
                self._finish("internal error")
                return
            if rewriter.to_server:
                self._flush_to_server()
        audit = self._audit
        if audit is not None:
            # After the results were decided: a result cut short is the statement's the
            # trail completes from these same replies (as the server sent them).
            cut_short = rewriter.cut_short
            if cut_short:
                audit.backend(received, marks, tail_rows, cut_short)
                cut_short.clear()
            elif audit.pending:
                audit.reply(received, marks, tail_rows)
        self._bytes_rewritten += len(data)
        transport.write(data)

    def _ask_path(self, held: bytes, status: int) -> None:
        assert self._rewriter is not None
        self._path_probe = _PathProbe(held, status)
        self._rewriter.to_server.append(_PATH_PROBE)  # between two of the client's messages
        self._rewriter.unnamed_dropped()  # (a Query drops the unnamed statement)
        self._flush_to_server()

    def _path_probe_reply(self, data: bytes) -> tuple[bytes, int]:
        """Take the probe's reply out of ``data``: nothing else is in flight, so every
        message up to its ReadyForQuery is the probe's, but notifications, notices and
        ParameterStatus, which go to the client. Returns what the client gets, the held
        ReadyForQuery first once the probe is answered, and how many ReadyForQuery
        messages at its start were accounted for already."""
        probe = self._path_probe
        assert probe is not None
        out: list[bytes] = []
        for kind, start, end in iter_messages(data):
            if kind in _PASSING:
                out.append(data[start - 5 : end])
            elif kind == _DATA_ROW:
                values = DataRow.decode(data[start:end]).values
                probe.values.append(values[0].decode("utf-8", "surrogateescape") if values and values[0] else "")
            elif kind == _ERROR:
                probe.error = data[start - 5 : end]
            elif kind == _READY:
                self._path_probe = None
                if probe.error is None and len(probe.values) == 3:
                    setting, role, authorization = probe.values
                    self.search_path.learned(setting, authorization if role == "none" else role, probe.status)
                    out.insert(0, probe.held)
                else:
                    # Canceled, timed out...: the client learns it before its ReadyForQuery
                    # (its transaction may have failed with the probe), which says the
                    # status now; the path stays unknown, asked again later.
                    log.warning("could not read the session's search_path", extra={"session": self.id})
                    if probe.error is not None:
                        out.append(probe.error)
                    out.append(probe.held[:5] + data[start : start + 1] + probe.held[6:])
                out.append(data[end:])
                # The held ReadyForQuery is the first one in what the client gets (the
                # others are never ReadyForQuery): accounted for when it was held.
                return b"".join(out), 1
        return b"".join(out), 0

    def _relay_backend(self, data: bytes) -> None:
        """Unprotected sessions: the server's bytes go to the client untouched.

        Nothing here needs the server's message boundaries except injecting our own
        FATAL (shutdown, protocol violation), which only ever happens between
        transactions: so remember whether the last chunk ended with ReadyForQuery
        instead of walking every header.
        """
        self.bytes_from_backend += len(data)
        self.client.transport.write(data)  # type: ignore[union-attr]
        self._b2c_idle = data[-6:-1] == _READY_HEAD

    def _protocol_violation(self, exc: ProtocolError) -> None:
        log.info("protocol violation", extra={"session": self.id, "sqlstate": exc.sqlstate, "reason": exc.message})
        self._fatal(exc.sqlstate, exc.message)
        if self.backend is not None:
            # The client's stream is unusable; the backend may be mid-message from it.
            self.backend.abort()
        self._finish("protocol violation")


class _PathProbe:
    """The search_path asked of PostgreSQL: what was held back from the client meanwhile."""

    __slots__ = ("error", "held", "status", "values")

    def __init__(self, held: bytes, status: int) -> None:
        self.held = held
        self.status = status
        self.values: list[str] = []
        self.error: bytes | None = None
