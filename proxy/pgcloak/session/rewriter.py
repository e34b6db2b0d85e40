"""Applying plans to one session's messages (no IO: bytes in, bytes out).

Client side: Query and Parse texts are planned; a refused statement is replaced by a
statement PostgreSQL itself rejects at the same point (a syntax error naming a
marker), so the server aborts the transaction and skips to Sync exactly as it would
for a real error, and the ordering of replies stays the server's. The server's
ErrorResponse for the marker is then replaced by pgcloak's own message. Bind values
and COPY rows are transformed in place; the client's parameters, ParameterDescription
and RowDescription stay what it expects.

Server side: complete messages only (a stored value must be whole to decrypt it); a
chunk without the envelope prefix or the marker is forwarded as it came.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from pgcloak.crypto.envelope import ENVELOPE_PREFIX, key_ids_in
from pgcloak.policy import ReadView
from pgcloak.session.auditing import SessionAudit
from pgcloak.session.protection import (
    CopyInRewriter,
    DecryptionFailed,
    Protection,
    ReadDenied,
    ValueRefused,
)
from pgcloak.session.reprepare import (
    INTERNAL_PREFIX,
    STATEMENT_PREFIX,
    Acks,
    Closing,
    Prepared,
    internal_name,
    reserved,
    statement_name,
)
from pgcloak.session.search_path import SessionSearchPath
from pgcloak.sql import PASS, Decision, Plan, ValueAction, read_denial
from pgcloak.sql.lexer import LexError, pin_backslashes
from pgcloak.sql.lexer import copies_from_stdin as lexer_copies_from_stdin
from pgcloak.sql.plan import DEALLOCATE_ALL, DISCARD_ALL, Literal
from pgcloak.sql.planner import names_protected_table, unglue_params
from pgcloak.sql.prepared import Definition, InlineRefused, inline_executes, truncated
from pgcloak.sql.search_path import PROBE, SearchPathChange, search_path_change
from pgcloak.wire.copy_data import CopyFormatError
from pgcloak.wire.errors import ProtocolError
from pgcloak.wire.framing import Mark, frame, iter_messages
from pgcloak.wire.messages import (
    Bind,
    Close,
    CopyData,
    CopyFail,
    ErrorResponse,
    Parse,
    Query,
)

MARKER = b"pgcloak_refused_"
_MARKER_ID = re.compile(rb"pgcloak_refused_(\d+)")
#: The server's names for the client's statements, in PostgreSQL's errors about them.
_SERVER_NAME = STATEMENT_PREFIX.encode()
_SERVER_NAME_RE = re.compile(re.escape(_SERVER_NAME) + rb"\d+_[0-9a-f]{12}")
_ids = itertools.count(1)
#: Named prepared statements tracked per session (PostgreSQL has no limit; we need one).
MAX_STATEMENTS = 100_000
_MAX_REFUSALS = 10_000
#: Client encodings whose multibyte characters can hold ASCII bytes (a backslash, a
#: quote, a TAB): PostgreSQL converts text from them before it parses it, pgcloak parses
#: the bytes it gets, so it could not tell what PostgreSQL will read (server encodings
#: never have such characters; these are client-only). Names as PostgreSQL compares
#: them: letters and digits only, any case.
UNSAFE_ENCODINGS = frozenset(("SJIS", "SHIFTJIS2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"))
#: A statement that may change the client encoding (SET client_encoding, SET NAMES,
#: set_config): checked before it runs, so that nothing sent after it is read by pgcloak
#: one way and by PostgreSQL another.
_ENCODING_SWITCH = re.compile(r"(?i)client_encoding|\bnames\b")
#: Every name PostgreSQL knows those encodings by, cleaned as it cleans them (letters and
#: digits, lowercase): found in a statement's cleaned text.
_UNSAFE_ENCODING_NAME = re.compile(
    r"s_?jis|shiftjis|mskanji|windows9(?:32|36|49|50)|win9(?:32|36|49|50)|big5|gbk|uhc|gb18030|johab"
)
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_UNSAFE_ENCODING = (
    "pgcloak cannot read statements in client encoding {name} (its characters can hold ASCII "
    "bytes that PostgreSQL reads after converting them): use UTF8 on a session that touches "
    "protected tables"
)
#: COPY portals remembered until they run (a client binds one, then executes it).
_MAX_COPY_PORTALS = 1_000

Q, P, B, C = ord("Q"), ord("P"), ord("B"), ord("C")
EXECUTE, SYNC, FUNCTION_CALL, DESCRIBE = ord("E"), ord("S"), ord("F"), ord("D")
COPY_DATA, COPY_DONE, COPY_FAIL = ord("d"), ord("c"), ord("f")
#: Sync and FunctionCall end batches: the session's search_path is asked after them.
#: Describe and Execute: they make a batch the server is answering (no search_path asked
#: in it). Executes and Syncs also pace the audit trail's reading of the replies.
CAPTURE = frozenset((Q, P, B, C, COPY_DATA, COPY_DONE, COPY_FAIL, SYNC, FUNCTION_CALL, DESCRIBE, EXECUTE))
#: Extended-protocol messages that leave a batch half sent until the client's Sync.
_HALF_SENT = frozenset((P, B, C, DESCRIBE, EXECUTE))
#: (The same with an audit trail; kept as a name of its own for the session.)
CAPTURE_AUDITED = CAPTURE
#: A statement name never prepared (a client's Close of an internal name closes it).
_NO_STATEMENT = INTERNAL_PREFIX + "none"
_RESERVED_NAME = (
    f'statement names starting with "{INTERNAL_PREFIX}" or "{STATEMENT_PREFIX}" are reserved for pgcloak'
)
_STALE_STATEMENT = (
    "the pgcloak policy changed (or the session's search_path) since this statement was "
    "prepared; prepare it again"
)
AUDIT_DOWN = (
    "the audit trail cannot be written, so statements touching protected columns are refused "
    "(policy audit.on_audit_failure: refuse)"
)
# Backend messages still delivered while the rest of a failed result is dropped.
_KEEP_WHILE_DROPPING = frozenset(b"ZNAS")
#: CopyInResponse, CopyBothResponse: the server waits for COPY data the client, told
#: the batch failed, will never send.
_COPY_WAITS = frozenset(b"GW")
_COPY_FAIL_DROPPED = CopyFail("pgcloak refused an earlier result of this batch").encode()
DATA_ROW, ERROR, READY = ord("D"), ord("E"), ord("Z")
#: Server messages that end one statement's rows (max_pii_rows counts per statement):
#: CommandComplete, EmptyQueryResponse, ErrorResponse, ReadyForQuery. Not
#: PortalSuspended: a portal fetched in pieces is still one statement.
_ROWS_END = frozenset(b"CIEZ")


_H = struct.Struct("!h")
_I = struct.Struct("!i")
_NULL = _I.pack(-1)


def _literal_lookups(protection: Protection, plan: Plan, literals: Sequence[Literal]) -> dict[str, list[str]]:
    """The blind-index values a refused simple Query searched for, per column key id (the
    values themselves are never kept): a refused read is an access attempt, and
    ``pgcloak audit who-accessed`` finds events by these. A value that cannot be
    normalized is left out."""
    lookups: dict[str, list[str]] = {}
    for literal, action in zip(literals, plan.literals, strict=False):
        if action.kind == "lookup":
            with contextlib.suppress(ValueRefused):
                protection.transform(action, literal.value, lookups)
    return lookups


def _bind_lookups(
    body: bytes, pos: int, actions: tuple[ValueAction, ...], protection: Protection
) -> dict[str, list[str]]:
    """:func:`_literal_lookups` for a refused Bind's parameters (nothing is encrypted)."""
    lookups: dict[str, list[str]] = {}
    only = tuple(a if a.kind == "lookup" else PASS for a in actions)
    if any(a.kind == "lookup" for a in only):
        try:
            _rewrite_bind_values(body, pos, only, protection, lookups)
        except (ValueRefused, ProtocolError):
            return {}
    return lookups


def _rewrite_bind_values(
    body: bytes, pos: int, actions: tuple[ValueAction, ...], protection: Protection, lookups: dict[str, list[str]]
) -> bytes:
    """The Bind message with its protected values transformed, everything else spliced
    through as it came (cheaper than decoding and re-encoding the whole message)."""
    try:
        (nfmt,) = _H.unpack_from(body, pos)
        formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2) if nfmt > 0 else ()
        pos += 2 + 2 * max(nfmt, 0)
        (nparams,) = _H.unpack_from(body, pos)
        pos += 2
        out = [body[:pos]]
        for i in range(nparams):
            (n,) = _I.unpack_from(body, pos)
            pos += 4
            if n < 0:
                out.append(_NULL)
                continue
            if pos + n > len(body):
                raise ProtocolError("invalid Bind message: parameter value runs past the end")
            action = actions[i] if i < len(actions) else PASS
            if action.kind == "pass":
                out.append(body[pos - 4 : pos + n])
            else:
                fmt = formats[0] if len(formats) == 1 else (formats[i] if formats else 0)
                value = protection.transform_param(action, body[pos : pos + n], fmt == 1, lookups)
                out.append(_I.pack(len(value)))
                out.append(value)
            pos += n
    except struct.error:
        raise ProtocolError("invalid Bind message: truncated") from None
    out.append(body[pos:])
    return frame(b"B", b"".join(out))


def text_of(body: bytes, start: int, end: int) -> str:
    return body[start + 1 : end].decode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=1024)
def copies_from_stdin(text: str) -> bool:
    """Whether a statement's text is ``COPY ... FROM STDIN``. Asked at every Bind, of the
    few texts a session prepares: cached."""
    return lexer_copies_from_stdin(text)


def _renamed_bind(body: bytes, portal_end: int, stmt_end: int, name: str) -> tuple[bytes, int]:
    """A Bind body sent to statement ``name`` instead; with where its name now ends."""
    encoded = name.encode()
    return body[: portal_end + 1] + encoded + body[stmt_end:], portal_end + 1 + len(encoded)


def _unknown_message(name: str) -> str:
    return f'prepared statement "{name}" does not exist'


def _sql_prepared_message(name: str) -> str:
    return (
        f'prepared statement "{name}" was prepared with SQL PREPARE: through pgcloak it runs '
        "only as EXECUTE (prepare it with the protocol, as drivers do, to bind it)"
    )


def _portal_key(name: bytes) -> bytes:
    """A portal name as PostgreSQL keeps it (cut to 63 bytes, never inside a character)."""
    if len(name) <= 63:
        return name
    return truncated(name.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


class Rewriter:
    """Per-session statement state: prepared statements, refusals, COPY."""

    def __init__(
        self,
        protection: Callable[[], Protection],
        audit: SessionAudit | None = None,
        roles: frozenset[str] = frozenset(),
        refusals: Counter[str] | None = None,
        search_path: SessionSearchPath | None = None,
    ) -> None:
        self._protection = protection
        #: The session's search_path, which the planner resolves table names by: the
        #: changes this session's statements make are followed here.
        self._search_path = search_path
        #: Prepared statements whose text changes the search_path (applied at each Bind).
        self._path_changes: dict[str, SearchPathChange] = {}
        self._audit = audit
        #: Refusals by SQLSTATE, shared by the server's sessions (its /metrics).
        self._refused: Counter[str] = refusals if refusals is not None else Counter()
        #: The session user's own role and every role it is a member of: what the
        #: policy's read decisions are made for.
        self.roles = roles
        self._view: tuple[Protection | None, ReadView | None] = (None, None)
        #: Rows carrying stored values in the current statement's result, and its stored
        #: values by column key id (max_pii_rows).
        self._pii_rows = 0
        self._pii_values: dict[str, int] = {}
        #: Messages for the server that the session sends after :meth:`backend_chunk`.
        self.to_server: list[bytes] = []
        #: The client's protocol-level statements by name, as pgcloak planned them.
        self.statements: dict[str, Prepared] = {}
        #: The one :meth:`_parse` took last, the one :meth:`_close` closed last (what the
        #: session's acks follow).
        self._parsed: Prepared | None = None
        self._closing: Closing | None = None
        #: The client's batches so far (Syncs, Queries, FunctionCalls it sent), counted on
        #: its side: whether a Bind is in the same batch as the Parse before it never
        #: depends on following the server's replies.
        self._batches = 0
        #: The unnamed statement a Query of pgcloak's own dropped on the server (the
        #: search_path probe): parsed again before the client's next Describe of it.
        self._unnamed_dropped: Prepared | None = None
        #: Whether the last simple Query holds a COPY FROM STDIN (the session's batch count).
        self._query_copies = False
        #: The client's name of each named statement, by the server's name for it: put
        #: back into PostgreSQL's errors (insertion-ordered: the oldest go first).
        self._client_names: dict[str, str] = {}
        #: Statements prepared again under other rules (see :mod:`.reprepare`): client
        #: name -> (the rules, the internal name, its plan).
        self._reprepared: dict[str, tuple[Protection, str, Plan]] = {}
        #: Internal statements to close at the next opportunity.
        self._closes_due: list[str] = []
        #: The Parse and Close messages in flight: the replies to ours are not the client's.
        self.acks = Acks()
        #: SQL-level PREPAREs by name: what EXECUTE is sent as (see
        #: :mod:`pgcloak.sql.prepared`; never the server's statement).
        self._bodies: dict[str, Definition] = {}
        self._refusals: dict[bytes, bytes] = {}
        self._copy_in: CopyInRewriter | None = None
        #: The session's client encoding when it is one of UNSAFE_ENCODINGS (as the
        #: server reports it), else None.
        self._unsafe_encoding: str | None = None
        #: standard_conforming_strings is off (as the server reports it): a backslash in
        #: '...' escapes, and texts are read that way (see :meth:`_spelled`).
        self._escaping = False
        #: Portals bound to a COPY FROM STDIN of a protected table (as sent): the plan
        #: whose rewriter its data gets once it is executed.
        self._copy_portals: dict[bytes, tuple[Protection, Plan]] = {}
        self._copy_out_csv = False
        #: A protected COPY was refused: the client's COPY messages still coming are
        #: dropped (PostgreSQL would ignore them; their data is in clear) until its
        #: CopyDone / CopyFail, or its next statement.
        self._copy_dropped = False
        self._dropping = False
        #: The statement being handled: what a refusal's audit event describes.
        self.last_plan: Plan | None = None
        #: Results cut short by a refusal in the last :meth:`backend_chunk` (position in
        #: its chunk, SQLSTATE, message): the session has the audit trail record them with
        #: the facts of the statement whose result it was.
        self.cut_short: list[tuple[int, str, str]] = []
        self._at = 0

    # -- refusals ------------------------------------------------------------------
    def _arm(
        self,
        sqlstate: str,
        message: str,
        routine: str | None = None,
        *,
        refusal: bool = True,
        lookups: dict[str, list[str]] | None = None,
    ) -> bytes:
        """Remember our error; return the marker the server will echo in its error.
        ``refusal``: a refusal by pgcloak (counted and audited), not an error PostgreSQL
        would have given anyway."""
        if len(self._refusals) >= _MAX_REFUSALS:
            self._refusals.clear()
        marker = MARKER + str(next(_ids)).encode()
        error = ErrorResponse.make(sqlstate, message)
        if routine is not None:
            error = ErrorResponse((*error.fields, ("R", routine)))
        self._refusals[marker] = error.encode()
        if refusal:
            self._record_refusal(self.last_plan, sqlstate, message, lookups)
        return marker

    def _record_refusal(
        self, plan: Plan | None, sqlstate: str, message: str, lookups: dict[str, list[str]] | None = None
    ) -> None:
        """Count a refusal (the /metrics) and put it in the audit trail."""
        self._refused[sqlstate] += 1
        if self._audit is not None:
            self._audit.refused(plan, sqlstate, message, lookups)

    def audit_to(self, audit: SessionAudit) -> None:
        """Record the statements from now on (a session a reload put under audit, between
        two batches: no statement of its is half handled)."""
        self._audit = audit

    def _audit_down(self, protection: Protection, plan: Plan) -> bool:
        """on_audit_failure: refuse — no PII statement runs while the trail cannot be written."""
        return (
            self._audit is not None
            and plan.touches_pii
            and not self._audit.log.healthy
            and protection.policy.audit.on_audit_failure == "refuse"
        )

    def _refuse_query(self, sqlstate: str, message: str, lookups: dict[str, list[str]] | None = None) -> bytes:
        return Query(self._arm(sqlstate, message, lookups=lookups).decode()).encode()

    def _refuse_parse(
        self,
        name: str,
        sqlstate: str,
        message: str,
        *,
        refusal: bool = True,
        lookups: dict[str, list[str]] | None = None,
    ) -> bytes:
        return Parse(name, self._arm(sqlstate, message, refusal=refusal, lookups=lookups).decode(), ()).encode()

    def _refuse_bind(
        self,
        portal: str,
        sqlstate: str,
        message: str,
        routine: str | None = None,
        *,
        refusal: bool = True,
        lookups: dict[str, list[str]] | None = None,
    ) -> bytes:
        # Binding a statement that does not exist fails at Bind, naming the marker.
        marker = self._arm(sqlstate, message, routine, refusal=refusal, lookups=lookups)
        return Bind(portal, marker.decode(), (), (), ()).encode()

    # -- read decisions --------------------------------------------------------------
    def _read_view(self, protection: Protection) -> ReadView | None:
        """The session's read decisions under ``protection``'s policy (None: reveal all)."""
        cached, view = self._view
        if cached is not protection:
            view = protection.policy.read_view(self.roles)
            if view.reveals_all:
                view = None
            self._view = (protection, view)
        return view

    def masked_columns(self, plan: Plan) -> tuple[str, ...]:
        """The columns ``plan`` reads that this session gets masked (for the audit trail)."""
        view = self._read_view(self._protection())
        if view is None or not plan.audit.pii_read:
            return ()
        return tuple(k for k in plan.audit.pii_read if view.decision(k) == "mask")

    def is_column_key(self, key: str) -> bool:
        """Whether ``key`` is the key id of a column the policy protects."""
        return self._protection().policy.column_for_key_id(key) is not None

    def columns_of_keys(self, keys: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Of envelope key ids seen in a result, those of columns the policy protects
        (others are not named in the trail: they came from the database), and those this
        session gets masked."""
        protection = self._protection()
        policy = protection.policy
        columns = tuple(sorted(k for k in keys if policy.column_for_key_id(k) is not None))
        view = self._read_view(protection)
        if view is None:
            return columns, ()
        return columns, tuple(k for k in columns if view.decision(k) == "mask")

    def _denied_read(self, protection: Protection, plan: Plan) -> ReadDenied | None:
        """A statement returning or searching by a column this session may not read is
        refused before it runs, like a column privilege (a lookup would tell whether a
        value exists); values the planner cannot see (views, functions) are decided again
        by their envelopes in the result."""
        if not plan.touches_pii:
            return None
        view = self._read_view(protection)
        found = read_denial(plan, view.decision) if view is not None else None
        return ReadDenied(found[0], searched=found[1]) if found is not None else None

    # -- client messages -------------------------------------------------------------
    def client_message(self, kind: int, msg: bytes) -> bytes:
        """The bytes to send to the server in place of one captured client message."""
        path = self._search_path
        if path is not None and kind in _HALF_SENT:
            path.unsynced = True
        # Most frequent first: an extended-protocol statement is Bind, Execute, Sync.
        if kind == B:
            if self._copy_portals:
                self._copy_portals.pop(_portal_key(msg[5 : msg.find(b"\0", 5)]), None)  # bound again
            return self._bind(msg)
        if kind == EXECUTE:
            self._copy_dropped = False
            if self._audit is not None:
                self._audit.execute_message(msg)
            if self._copy_portals:
                copy = self._copy_portals.pop(_portal_key(msg[5 : msg.find(b"\0", 5)]), None)
                if copy is not None:
                    self._start_copy(*copy)
            return msg
        if kind == DESCRIBE:
            return self._describe(msg)
        if kind in (SYNC, FUNCTION_CALL):
            self._batches += 1
            if kind == FUNCTION_CALL:
                self._not_in_a_batch()
            answered = path.batch_end() if path is not None else True
            if self._audit is not None and answered:
                self._audit.sync()
            return msg
        if kind == Q:
            self._copy_dropped = False
            self._batches += 1
            self._not_in_a_batch()
            out = self._query(msg)
            if path is not None:
                path.batch_end()
                if self._query_copies:
                    path.copy_started(path.sent - 1)  # Syncs sent during its COPY are ignored
            return out
        if kind in (P, C):
            if path is None:
                return self._parse(msg) if kind == P else self._close(msg)
            # Answered by ParseComplete / CloseComplete, as pgcloak's own Parse and Close
            # are: told apart by their order (:attr:`acks`).
            before = self._our_closes()
            self._parsed = self._closing = None
            if kind == P:
                out = self._parse(msg)
                self.acks.sent(path.sent, self._parsed)
            else:
                out = self._close(msg)
                self.acks.sent(path.sent, self._closing)
            return before + out + self._our_closes()
        if kind != COPY_DATA and path is not None:
            path.copy_ended()  # CopyDone, CopyFail
        return self._copy(kind, msg)

    def _query(self, msg: bytes) -> bytes:
        protection = self._protection()
        sql = Query.decode(msg[5:]).sql
        if "\\" in sql:
            try:
                spelled = self._spelled(protection, sql)
            except LexError as exc:
                self.last_plan = None
                return self._refused_query("0A000", str(exc))
            if spelled is not sql:
                sql = spelled
                msg = Query(sql).encode()
        self._query_copies = lexer_copies_from_stdin(sql)
        # A simple Query destroys the unnamed statement (ours too, if it was prepared again).
        if self.statements.pop("", None) is not None:
            self._path_changes.pop("", None)
            if self._reprepared:
                self._forget_reprepared("")
        plan, literals = protection.planner.plan_simple(sql)
        bodies: dict[str, Definition] | None = None
        named = plan.named
        if plan.named or plan.executes:
            if self._reserved(plan):
                self.last_plan = None
                return self._refused_query("42939", _RESERVED_NAME)
            try:
                inlined, bodies = self._inlined(protection, sql)
            except InlineRefused as exc:
                self.last_plan = None
                return self._refused_query(exc.sqlstate, exc.message)
            if inlined != sql:
                sql = inlined
                msg = Query(sql).encode()
                plan, literals = protection.planner.plan_simple(sql)
                plan = self._reinlined(plan)
        self.last_plan = plan
        audit = self._audit
        if not plan.decision.allowed:
            return self._refused_query(plan.decision.sqlstate, plan.decision.message)
        unreadable = self._encoding_refusal(protection, plan, sql)
        if unreadable is not None:
            return self._refused_query("0A000", unreadable)
        change = self._path_change(sql, plan) if self._search_path is not None else None
        if change is not None and change.kind == "refuse":
            return self._refused_query("0A000", change.message)
        denied = self._denied_read(protection, plan)
        if denied is not None:
            # An attempt to read someone's value: who-accessed must find it by the lookup.
            return self._refused_query(denied.sqlstate, denied.message, _literal_lookups(protection, plan, literals))
        if self._audit_down(protection, plan):
            return self._refused_query("58000", AUDIT_DOWN)
        self._start_copy(protection, plan)
        lookups: dict[str, list[str]] = {}
        sent = sql
        if plan.needs_render:
            try:
                sent = protection.planner.apply(
                    plan, literals, lambda action, value: protection.transform(action, value, lookups)
                )
            except ValueRefused as exc:
                return self._refused_query(exc.sqlstate, exc.message)
            msg = Query(sent).encode()
        if named or bodies is not None:
            self._sql_level_statements(named, bodies)
        if audit is not None:
            audit.query(plan, lookups, sql)
        if change is not None:
            assert self._search_path is not None
            self._search_path.apply(change)  # the statements after it are planned for it
        return msg

    def _path_change(self, sql: str, plan: Plan) -> SearchPathChange | None:
        """What ``sql`` does to the search_path, SQL-level PREPAREs and EXECUTEs included:
        a PREPAREd change is remembered by name, and EXECUTE of one is a change too."""
        change = search_path_change(sql)
        changes = self._path_changes
        for name, inner in plan.named:
            if inner is not None and change is not None:
                changes[name] = PROBE
            else:
                changes.pop(name, None)
        if change is None and changes and any(c.name in changes for c in plan.executes):
            return PROBE
        return change

    def standard_conforming_strings(self, value: str) -> None:
        """The server reported the setting (at startup, after a SET)."""
        self._escaping = value.strip().lower() != "on"

    def _spelled(self, protection: Protection, text: str) -> str:
        """``text`` as sent to the server: its ``'...'`` constants that hold a backslash
        spelled ``E''`` (:func:`pin_backslashes`), read as the server reads them now.

        With standard_conforming_strings on (pgcloak's own reading) that is needed only in
        statements naming a protected table: it keeps a pipelined ``SET ... = off`` from
        making the server read a text other than the one pgcloak planned. With it off,
        every text is respelled, so that pgcloak plans (and fingerprints) what the server
        will run. Raises :class:`LexError` for a text naming a protected table that cannot
        be read that way (the message quotes none of it).
        """
        protected = names_protected_table(text, protection.policy)
        if not protected and not self._escaping:
            return text
        try:
            return pin_backslashes(text, escaping=self._escaping)
        except LexError:
            if protected:
                raise
            return text  # the server will say what is wrong with it

    def client_encoding(self, name: str) -> None:
        """The server reported the session's client encoding (at startup, after a SET)."""
        self._unsafe_encoding = name if _NOT_ALNUM.sub("", name.lower()).upper() in UNSAFE_ENCODINGS else None

    def _encoding_refusal(self, protection: Protection, plan: Plan, sql: str) -> str | None:
        """Why ``sql`` cannot run under the session's client encoding (None: it can).

        A statement that may change the encoding is refused when it names one of the
        unsafe ones, and when it comes with a statement on a protected table (the
        encoding it sets, maybe computed, would apply to what follows it: COPY data).
        """
        switch = _ENCODING_SWITCH.search(sql) is not None
        name = self._unsafe_encoding
        if not switch and name is None:
            return None  # the common case: nothing to look at
        protected = plan.touches_pii or any(protection.policy.columns_of(t) for t in plan.audit.tables)
        if switch:
            found = _UNSAFE_ENCODING_NAME.search(_NOT_ALNUM.sub("", sql.lower()))
            if found is not None:
                return _UNSAFE_ENCODING.format(name=found.group(0).upper())
            if protected and re.search(r"(?i)\bset\b|set_config", sql):
                return (
                    "a statement that sets the client encoding must not come with statements on "
                    "protected tables: send it on its own"
                )
        if name is not None and protected:
            return _UNSAFE_ENCODING.format(name=name)
        return None

    def _refused_query(self, sqlstate: str, message: str, lookups: dict[str, list[str]] | None = None) -> bytes:
        if self._audit is not None:
            self._audit.query(None, {})  # its ReadyForQuery still comes
        return self._refuse_query(sqlstate, message, lookups)

    def _reserved(self, plan: Plan, deallocated: frozenset[str] = frozenset()) -> bool:
        """SQL-level names of pgcloak's own statements: not the client's (42939). Those
        in ``deallocated`` may be DEALLOCATEd (pgcloak sent them for the client's names)."""
        return bool(plan.named or plan.executes) and any(
            reserved(name)
            for name in itertools.chain(
                (n for n, inner in plan.named if inner is not None or n not in deallocated),
                (c.name for c in plan.executes),
            )
        )

    def _inlined(self, protection: Protection, text: str) -> tuple[str, dict[str, Definition]]:
        """``text`` with its ``EXECUTE name(...)`` statements sent as the statements the
        names stand for (see :mod:`pgcloak.sql.prepared`), and the SQL-level definitions
        once it ran. Raises :class:`InlineRefused` (also for a text pgcloak cannot
        tokenize: its EXECUTE would go out as it came)."""
        def protocol_text(name: str) -> str | None:
            entry = self.statements.get(name)
            return entry.text if entry is not None and entry.text else None

        def vet(name: str, definition: Definition) -> None:
            if reserved(name):
                raise InlineRefused("42939", _RESERVED_NAME)
            decision = protection.planner.plan(definition.body).decision
            if not decision.allowed:
                raise InlineRefused(decision.sqlstate, f'prepared statement "{name}": {decision.message}')

        def server_name(name: str) -> str | None:
            entry = self.statements.get(name)
            return entry.server if entry is not None and entry.server else None

        discards = self._discards()
        try:
            return inline_executes(text, self._bodies, protocol_text, vet, server_name, discards)
        except LexError:
            pass
        try:
            # sqlglot reads "$1,$2" as a dollar quote; the planner planned it unglued too.
            return inline_executes(unglue_params(text), self._bodies, protocol_text, vet, server_name, discards)
        except LexError:
            raise InlineRefused("0A000", "pgcloak could not read this statement (PREPARE / EXECUTE)") from None

    def _discards(self) -> bool:
        """Whether a DISCARD ALL sent now would run: PostgreSQL refuses it in a
        transaction block (25001), and then drops nothing."""
        return self._search_path is None or not self._search_path.in_transaction

    def _deallocates(self) -> bool:
        """Whether a DEALLOCATE sent now would run: not in a failed transaction (25P02)."""
        return self._search_path is None or not self._search_path.aborted

    def _reinlined(self, plan: Plan) -> Plan:
        """The plan of an inlined text: one that still executes, or names one of
        pgcloak's statements, is refused (its EXECUTE would run the server's statement),
        but for a DEALLOCATE of the server's name for one of the client's."""
        ours = frozenset(e.server for e in self.statements.values() if e.server) if plan.named else frozenset()
        if self._reserved(plan, ours):
            return dataclasses.replace(plan, decision=Decision(False, "42939", _RESERVED_NAME))
        if plan.executes:
            message = "EXECUTE inside a prepared statement is not supported by pgcloak"
            return dataclasses.replace(plan, decision=Decision(False, "0A000", message))
        return plan

    def _sql_level_statements(
        self, named: tuple[tuple[str, Plan | None], ...], bodies: dict[str, Definition] | None
    ) -> None:
        """Follow SQL-level PREPARE / DEALLOCATE (``named``: the client's text's, before
        :meth:`_inlined`; ``bodies``: the definitions once the text ran, from it).
        DEALLOCATE also closes a statement the client prepared with the protocol (one
        namespace; sent with the server's name for it)."""
        if not self._deallocates():
            return  # in a failed transaction block: PostgreSQL runs none of them
        if bodies is not None:
            self._bodies = bodies if len(bodies) <= MAX_STATEMENTS else {}
        for name, inner in named:
            if inner is not None:
                continue
            if name == DISCARD_ALL and not self._discards():
                continue
            if name in (DEALLOCATE_ALL, DISCARD_ALL):
                self.statements.clear()
                self._client_names.clear()
                self._reprepared.clear()  # the server drops ours too
            else:
                self._forget(name)

    def _start_copy(self, protection: Protection, plan: Plan) -> None:
        if plan.copy_in is not None:
            self._copy_in = CopyInRewriter(
                plan.copy_in, plan.copy_format or "text", protection.transform, plan.copy_header
            )
        if plan.copy_out:
            self._copy_out_csv = plan.copy_format == "csv"

    # -- statements prepared again -----------------------------------------------------
    def _forget_reprepared(self, name: str) -> None:
        """The client's statement is gone or redefined: its internal one is closed."""
        found = self._reprepared.pop(name, None)
        if found is not None:
            self._closes_due.append(found[1])

    def _our_closes(self) -> bytes:
        """Close messages for the internal statements no longer needed (sent before or
        after one of the client's extended-protocol messages, never inside a COPY)."""
        due = self._closes_due
        if not due or self._search_path is None or self._search_path.uncertain:
            if len(due) > MAX_STATEMENTS:  # not sent for long (an uncertain count): kept bounded
                del due[: len(due) - MAX_STATEMENTS]
            return b""
        batch = self._search_path.sent
        out = []
        for internal in due:
            out.append(Close("S", internal).encode())
            self.acks.sent_ours(batch, parse=False, client_name="", internal=internal)
        due.clear()
        return b"".join(out)

    def _reprepare(
        self, name: str, current: Protection, text: str, tail: bytes, portal: bytes
    ) -> tuple[bytes, str, Plan] | bytes:
        """Parse ``name``'s text again, as planned under ``current``, under an internal
        name. Returns the messages to send before the client's Bind, the internal name
        and the plan; or the refusal to send instead of the Bind."""
        assert self._search_path is not None
        entry = current.plan_parse(text.encode("utf-8", "surrogateescape"))
        plan = entry.plan
        body = entry.static
        if entry.literals:
            try:
                body = current.planner.apply(plan, entry.literals, current.transform).encode(
                    "utf-8", "surrogateescape"
                )
            except ValueRefused as exc:
                return self._refuse_bind(portal.decode("utf-8", "surrogateescape"), exc.sqlstate, exc.message)
        internal = internal_name()
        self._forget_reprepared(name)
        out = [self._our_closes()]
        query = text.encode("utf-8", "surrogateescape") if body is None else body
        out.append(frame(b"P", internal.encode() + b"\0" + query + tail))
        self.acks.sent_ours(self._search_path.sent, parse=True, client_name=name, internal=internal)
        self._reprepared[name] = (current, internal, plan)
        return b"".join(out), internal, plan

    def follow_acks(self, marks: list[Mark], seen: int = 0) -> list[tuple[int, int]]:
        """The server's replies in one chunk (``marks`` before ReadyForQuery is counted
        for them; the first ``seen`` ReadyForQuery were followed already): the spans of
        the replies to our own Parse and Close messages, to cut. An internal statement
        the server did not prepare is forgotten (prepared again at the next Bind); one it
        did not close is closed again."""
        path = self._search_path
        assert path is not None
        cuts, failed = self.acks.replies(marks, path.sent - path.outstanding, seen)
        for ours in failed:
            if isinstance(ours, Prepared):
                # The client's Parse failed: the server prepared nothing under its name
                # (the unnamed statement: dropped before parsing, or the previous one kept
                # when skipped, which a Bind must not reach either).
                if self.statements.get(ours.name) is ours:
                    self._forget(ours.name)
                continue
            if isinstance(ours, Closing) or not ours.parse:
                self._closes_due.append(ours.server if isinstance(ours, Closing) else ours.internal)
                continue
            found = self._reprepared.get(ours.client_name)
            if found is not None and found[1] == ours.internal:
                del self._reprepared[ours.client_name]
            # Skipped, or refused: either way the server holds nothing under that name.
        return cuts

    def _forget(self, name: str) -> None:
        """The client's statement ``name`` is gone (closed, failed, replaced)."""
        self.statements.pop(name, None)
        if self._path_changes:
            self._path_changes.pop(name, None)
        if self._reprepared:
            self._forget_reprepared(name)

    def _parse_failed(self, name: str) -> None:
        """Our refusal makes this Parse fail (sent as a Parse the server fails):
        PostgreSQL has dropped the unnamed statement before parsing; a named one the
        client had is kept (by pgcloak: the server knows it by another name)."""
        if not name:
            self._forget(name)

    def _parse(self, msg: bytes) -> bytes:
        protection = self._protection()
        body = msg[5:]
        name_end = body.find(b"\0")
        query_end = body.find(b"\0", name_end + 1)
        if name_end < 0 or query_end < 0:
            raise ProtocolError("invalid Parse message: missing terminator")
        name = truncated(body[:name_end].decode("utf-8", "surrogateescape"))
        if self._reprepared:
            self._forget_reprepared(name)  # the unnamed statement, or one closed unseen
        if reserved(name):
            self.last_plan = None
            return self._refuse_parse(name, "42939", _RESERVED_NAME)
        held = self.statements.get(name) if name else None
        if name in self._bodies or (held is not None and held.answered):
            # PostgreSQL's own answer (the name holds a statement), given by pgcloak: the
            # server knows the statement by another name. (One whose Parse the server has
            # not answered yet is replaced: that Parse may have failed.)
            self.last_plan = None
            return self._refuse_parse(name, "42P05", f'prepared statement "{name}" already exists', refusal=False)
        if name and name not in self.statements and len(self.statements) >= MAX_STATEMENTS:
            self.last_plan = None
            return self._refuse_parse(name, "54000", f"too many prepared statements in one session (limit {MAX_STATEMENTS})")
        if body.find(b"\\", name_end + 1, query_end) >= 0:
            original = text_of(body, name_end, query_end)
            try:
                spelled = self._spelled(protection, original)
            except LexError as exc:
                self.last_plan = None
                self._parse_failed(name)
                return self._refuse_parse(name, "0A000", str(exc))
            if spelled is not original:
                query = spelled.encode("utf-8", "surrogateescape")
                body = body[: name_end + 1] + query + body[query_end:]
                query_end = name_end + 1 + len(query)
                msg = frame(b"P", body)
        entry = protection.plan_parse(body[name_end + 1 : query_end])
        plan = entry.plan
        named = plan.named
        bodies: dict[str, Definition] | None = None
        if plan.executes or plan.named:
            # EXECUTE name(...) sent in a Parse (drivers do that): as in a Query, sent as
            # the statement the name stands for.
            refusal: tuple[str, str] | None = ("42939", _RESERVED_NAME) if self._reserved(plan) else None
            if refusal is None:
                try:
                    inlined, bodies = self._inlined(protection, text_of(body, name_end, query_end))
                except InlineRefused as exc:
                    refusal = (exc.sqlstate, exc.message)
                else:
                    if inlined != text_of(body, name_end, query_end):
                        body = body[: name_end + 1] + inlined.encode("utf-8", "surrogateescape") + body[query_end:]
                        query_end = name_end + 1 + len(inlined.encode("utf-8", "surrogateescape"))
                        msg = frame(b"P", body)
                        entry = protection.plan_parse(body[name_end + 1 : query_end])
                        plan = self._reinlined(entry.plan)
            if refusal is not None:
                self.last_plan = None
                self._parse_failed(name)
                return self._refuse_parse(name, *refusal)
        self.last_plan = plan
        if not plan.decision.allowed:
            self._parse_failed(name)
            return self._refuse_parse(name, plan.decision.sqlstate, plan.decision.message)
        denied = self._denied_read(protection, plan)
        if denied is not None:
            self._parse_failed(name)
            # Its literals' lookups (a parameter's value is not sent yet: none for it).
            lookups = _literal_lookups(protection, plan, entry.literals) if entry.literals else None
            return self._refuse_parse(name, denied.sqlstate, denied.message, lookups=lookups)
        text = text_of(body, name_end, query_end)
        unreadable = self._encoding_refusal(protection, plan, text)
        if unreadable is not None:
            self._parse_failed(name)
            return self._refuse_parse(name, "0A000", unreadable)
        change = self._path_change(text, plan) if self._search_path is not None else None
        if change is not None and change.kind == "refuse":
            self._parse_failed(name)
            return self._refuse_parse(name, "0A000", change.message)
        sent = entry.static
        if entry.literals:
            try:
                rendered = protection.planner.apply(plan, entry.literals, protection.transform)
            except ValueRefused as exc:
                self._parse_failed(name)
                return self._refuse_parse(name, exc.sqlstate, exc.message)
            sent = rendered.encode("utf-8", "surrogateescape")
        # Taken: from here on, this is what the name stands for.
        if named or bodies is not None:
            # Followed at Parse (it runs at each Execute, maybe never: EXECUTE is sent as
            # pgcloak's statement anyway, so the server's need not be known). Before this
            # statement is kept: DEALLOCATE ALL / DISCARD ALL would drop it too.
            self._sql_level_statements(named, bodies)
        if held is not None:
            self._closes_due.append(held.server)
        self._forget(name)
        path = self._search_path
        server = statement_name() if name else ""
        query = body[name_end + 1 : query_end] if sent is None else sent
        batch = self._batches if path is not None else None
        prepared = Prepared(name, server, protection, plan, text, query, body[query_end:], batch)
        self.statements[name] = self._parsed = prepared
        if server:
            # Kept after the statement is gone (an error about it may come later; the
            # server's names are never reused), the oldest dropped past the bound.
            names = self._client_names
            names[server] = name
            if len(names) > MAX_STATEMENTS:
                del names[next(iter(names))]
        if change is not None:
            self._path_changes[name] = change
        if plan.copy_out:
            self._copy_out_csv = plan.copy_format == "csv"
        if sent is None and not name:
            return msg
        return frame(b"P", server.encode() + b"\0" + query + body[query_end:])

    def _bind(self, msg: bytes) -> bytes:
        body = msg[5:]
        portal_end = body.find(b"\0")
        stmt_end = body.find(b"\0", portal_end + 1)
        if portal_end < 0 or stmt_end < 0:
            raise ProtocolError("invalid Bind message: missing terminator")
        name = truncated(body[portal_end + 1 : stmt_end].decode("utf-8", "surrogateescape"))
        audit = self._audit
        portal = body[:portal_end]
        entry = self.statements.get(name) if name not in self._bodies else None
        if entry is None:
            # Unknown to us: refused as PostgreSQL refuses a name it does not know, so a
            # statement prepared some way we did not see never runs with raw values.
            # (Usually the Parse before it failed, and the server skips this Bind anyway:
            # PostgreSQL's own error, not a refusal to count or record.) One prepared with
            # SQL runs only as EXECUTE (sent as pgcloak's statement, not the server's).
            if audit is not None:
                audit.bind(portal, None, {})
            if name in self._bodies:
                return self._refuse_bind(portal.decode("utf-8", "surrogateescape"), "0A000", _sql_prepared_message(name))
            return self._refuse_bind(
                portal.decode("utf-8", "surrogateescape"), "26000", _unknown_message(name), refusal=False
            )
        protection, plan, text = entry.protection, entry.plan, entry.text
        if entry.server:
            # The server knows a named statement by pgcloak's name for it (see reprepare).
            body, stmt_end = _renamed_bind(body, portal_end, stmt_end, entry.server)
            msg = frame(b"B", body)
        current = self._protection()
        before = b""
        redirected = False  # sent to a statement pgcloak prepared in this batch
        if protection is not current and text:
            # The policy or the search_path changed since Parse: plan the text again (and
            # prepare it again where the server's statement may not be this text).
            again = self._reprepared.get(name)
            if again is not None and again[0] is current:
                plan = again[2]
                body, stmt_end = _renamed_bind(body, portal_end, stmt_end, again[1])
                msg = frame(b"B", body)
                redirected = True
            else:
                replanned = current.planner.plan(text)
                if not replanned.decision.allowed:
                    self.last_plan = replanned
                    if audit is not None:
                        audit.bind(portal, None, {})
                    decision = replanned.decision
                    return self._refuse_bind(portal.decode("utf-8", "surrogateescape"), decision.sqlstate, decision.message)
                if replanned.sql != plan.sql or replanned.literals != plan.literals:
                    # (A literal of a column protected since: the server's text has it as
                    # it was sent then.)
                    if self._search_path is None or self._search_path.uncertain:
                        # PostgreSQL's own error for a cached plan gone stale (0A000 from
                        # RevalidateCachedQuery): drivers with a statement cache prepare again.
                        # (Not prepared again here while the batch count is uncertain: the
                        # replies to pgcloak's own Parse could not be told apart.)
                        return self._refuse_bind("", "0A000", _STALE_STATEMENT, routine="RevalidateCachedQuery")
                    # As PostgreSQL analyses a prepared statement again for a new
                    # search_path: the text, as planned now, under an internal name.
                    made = self._reprepare(name, current, text, entry.tail, portal)
                    if isinstance(made, bytes):
                        if audit is not None:
                            audit.bind(portal, None, {})
                        return made
                    before, internal, replanned = made
                    body, stmt_end = _renamed_bind(body, portal_end, stmt_end, internal)
                    msg = frame(b"B", body)
                    redirected = True
                plan = replanned
            protection = current
        if not name and not redirected and entry.batch is not None and entry.batch != self._batches:
            # The unnamed statement's Parse went in an earlier batch: had the server skipped
            # it, the unnamed statement before it would run this Bind. PostgreSQL's one
            # guarantee is the order within a batch, so the text goes again before the Bind.
            # (Whether that Parse was answered is not asked: replies are matched by
            # position, and a count thrown off would take another's answer for it.)
            path = self._search_path
            if path is None or path.uncertain:
                # Its reply could not be told from the client's: "prepare it again".
                if audit is not None:
                    audit.bind(portal, None, {})
                return self._refuse_bind("", "0A000", _STALE_STATEMENT, routine="RevalidateCachedQuery")
            before = self._unnamed_again(entry, path)
        self.last_plan = plan
        out = self._bind_checked(msg, body, portal_end, stmt_end, name, protection, current, plan, text)
        return before + out if before else out

    def _bind_checked(
        self,
        msg: bytes,
        body: bytes,
        portal_end: int,
        stmt_end: int,
        name: str,
        protection: Protection,
        current: Protection,
        plan: Plan,
        text: str,
    ) -> bytes:
        """The Bind of ``plan`` (its values transformed), or its refusal."""
        audit = self._audit
        portal = body[:portal_end]
        denied = self._denied_read(current, plan)  # today's decisions, whenever it was planned
        if denied is not None:
            if audit is not None:
                audit.bind(portal, None, {})
            return self._refuse_bind(
                portal.decode("utf-8", "surrogateescape"),
                denied.sqlstate,
                denied.message,
                lookups=_bind_lookups(body, stmt_end + 1, plan.params, protection) if audit is not None else None,
            )
        if self._audit_down(protection, plan):
            if audit is not None:
                audit.bind(portal, None, {})
            return self._refuse_bind(portal.decode("utf-8", "surrogateescape"), "58000", AUDIT_DOWN)
        if self._path_changes:
            change = self._path_changes.get(name)
            if change is not None:
                assert self._search_path is not None
                self._search_path.apply(change)  # refused ones were refused at Parse
        if plan.copy_in is not None:
            # Its data is rewritten when the portal runs (Execute): another COPY may be
            # bound meanwhile. Portals end with their transaction, untold: past the bound
            # the Bind is refused (forgetting one would let its data by).
            key = _portal_key(portal)
            if key not in self._copy_portals and len(self._copy_portals) >= _MAX_COPY_PORTALS:
                if audit is not None:
                    audit.bind(portal, None, {})
                return self._refuse_bind(
                    portal.decode("utf-8", "surrogateescape"),
                    "54000",
                    f"too many COPY portals bound and not executed in one session (limit {_MAX_COPY_PORTALS})",
                )
            self._copy_portals[key] = (protection, plan)
        if self._search_path is not None and (plan.copy_in is not None or copies_from_stdin(text)):
            self._search_path.copy_started()
        actions = plan.params
        lookups: dict[str, list[str]] = {}
        if not any(a.kind != "pass" for a in actions):
            if audit is not None:
                audit.bind(portal, plan, lookups, text)
            return msg
        try:
            rewritten = _rewrite_bind_values(body, stmt_end + 1, actions, protection, lookups)
        except ValueRefused as exc:
            if audit is not None:
                audit.bind(portal, None, {})
            return self._refuse_bind(body[:portal_end].decode("utf-8", "surrogateescape"), exc.sqlstate, exc.message)
        if audit is not None:
            audit.bind(portal, plan, lookups, text)
        return rewritten

    def _close(self, msg: bytes) -> bytes:
        close = Close.decode(msg[5:])
        if close.kind == "S" and reserved(close.name):
            # Never the client's to close: closed in name only (the reply is the same).
            return Close("S", _NO_STATEMENT).encode()
        if close.kind == "S":
            name = truncated(close.name)
            entry = self.statements.get(name)
            self._forget(name)
            if self._bodies:
                self._bodies.pop(name, None)  # one namespace: a SQL-level one is closed too
            if entry is not None and entry.server:
                # Sent to the server's name (closed again by pgcloak if the server skips it).
                self._closing = Closing(entry.server)
                return Close("S", entry.server).encode()
        else:
            portal = close.name.encode("utf-8", "surrogateescape")
            self._copy_portals.pop(_portal_key(portal), None)
            if self._audit is not None:
                self._audit.close_portal(portal)
        return msg

    def _unnamed_again(self, entry: Prepared, path: SessionSearchPath) -> bytes:
        """The unnamed statement's Parse, sent again in the current batch (its reply cut)."""
        self.acks.sent_ours(path.sent, parse=True, client_name="", internal="")
        entry.batch = self._batches
        return frame(b"P", b"\0" + entry.query + entry.tail)

    def unnamed_dropped(self) -> None:
        """The session sent a Query of its own, which drops the server's unnamed statement
        (the client's Binds of it are parsed again anyway: they come in a later batch)."""
        self._unnamed_dropped = self.statements.get("")

    def _describe(self, msg: bytes) -> bytes:
        """Describe of a named statement: sent to the server's name for it."""
        if len(msg) >= 7 and msg[5] == ord("S") and msg[6] == 0 and self._unnamed_dropped is not None:
            dropped, self._unnamed_dropped = self._unnamed_dropped, None
            path = self._search_path
            if dropped is self.statements.get("") and path is not None and not path.uncertain:
                return self._unnamed_again(dropped, path) + msg
        if len(msg) < 7 or msg[5] != ord("S") or msg[6] == 0:
            return msg  # a portal, or the unnamed statement
        end = msg.find(b"\0", 6)
        if end < 0:
            return msg  # malformed: PostgreSQL says so
        name = truncated(msg[6:end].decode("utf-8", "surrogateescape"))
        entry = self.statements.get(name)
        if entry is None or not entry.server:
            return msg  # PostgreSQL answers as it would (unknown: 26000 under its name)
        return frame(b"D", b"S" + entry.server.encode() + b"\0")

    def _not_in_a_batch(self) -> None:
        """A Query or FunctionCall inside an extended-protocol batch not yet ended by Sync
        (asyncpg sends one after Parse/Describe/Flush) runs only if nothing before it in
        the batch fails: whether the server answers it is not known when it is sent. The
        session's count of batches is uncertain until it comes out even again."""
        if self._search_path is not None and self._search_path.unsynced:
            self._search_path.uncertain = True

    @property
    def copying_in(self) -> bool:
        """A COPY FROM STDIN into a protected table is under way: its data is rewritten."""
        return self._copy_in is not None

    def copy_data(self, data: bytes) -> bytes:
        """A piece of the COPY data under way (a CopyData's payload, or a slice of one:
        records may span pieces): the CopyData for the server (b"" while no record is
        whole), or the CopyFail that ends the COPY refused. b"" once it was refused
        (PostgreSQL ignores COPY data after a CopyFail; none of it goes in clear)."""
        rewriter = self._copy_in
        if rewriter is None:
            return b""
        try:
            rows = rewriter.feed(data)
        except (ValueRefused, CopyFormatError, UnicodeDecodeError) as exc:
            return self._copy_refused(exc)
        return CopyData(rows).encode() if rows else b""

    def _copy(self, kind: int, msg: bytes) -> bytes:
        rewriter = self._copy_in
        if rewriter is None:
            if self._copy_dropped and kind in (COPY_DATA, COPY_DONE, COPY_FAIL):
                self._copy_dropped = kind == COPY_DATA
                return b""
            return msg
        if kind == COPY_DATA:
            return self.copy_data(CopyData.decode(msg[5:]).data)
        self._copy_in = None
        if kind != COPY_DONE:
            return msg
        try:
            rest = rewriter.finish()
        except (ValueRefused, CopyFormatError, UnicodeDecodeError) as exc:
            return self._copy_refused(exc)
        return (CopyData(rest).encode() if rest else b"") + msg

    def _copy_refused(self, exc: ValueRefused | CopyFormatError | UnicodeDecodeError) -> bytes:
        """The CopyFail that ends the COPY under way, with pgcloak's error for ``exc``."""
        self._copy_in = None
        self._copy_dropped = True
        if isinstance(exc, ValueRefused):
            state, text = exc.sqlstate, exc.message
        elif isinstance(exc, CopyFormatError):
            state, text = exc.sqlstate, f"COPY data for a protected table: {exc}"
        else:
            state, text = "22021", "COPY data for a protected column is not valid UTF-8"
        return CopyFail(self._arm(state, text).decode()).encode()

    # -- server messages ---------------------------------------------------------------
    def needs_inspection(self, chunk: bytes) -> bool:
        return (
            self._dropping
            or self._pii_rows > 0
            or ENVELOPE_PREFIX in chunk
            or (bool(self._refusals) and MARKER in chunk)
            or (bool(self._client_names) and _SERVER_NAME in chunk)
        )

    def backend_chunk(self, chunk: bytes) -> bytes:
        """Complete server messages with stored values decided (revealed, masked or
        refused), rows with stored values counted against ``max_pii_rows``, and our
        errors put back."""
        protection = self._protection()
        view = self._read_view(protection)
        limit = protection.policy.guards.max_pii_rows
        out: list[bytes] = []
        run = 0
        for kind, start, end in iter_messages(chunk):
            head = start - 5
            replacement: bytes | None = None
            if self._dropping:
                if kind in _KEEP_WHILE_DROPPING:
                    if kind == READY:
                        self._dropping = False
                        self._pii_rows = 0
                        self._pii_values.clear()
                    continue
                if kind in _COPY_WAITS:
                    # A later COPY FROM STDIN of the batch: end it, or the server waits
                    # for data while the client waits for ReadyForQuery.
                    self.to_server.append(_COPY_FAIL_DROPPED)
                replacement = b""
            elif kind in (DATA_ROW, COPY_DATA):
                if ENVELOPE_PREFIX not in chunk[start:end]:
                    continue
                self._at = head
                self._pii_rows += 1
                over = self._over_limit(chunk, start, end, limit) if limit is not None else None
                if over is not None:
                    replacement = self._fail_result(
                        "54000",
                        f"more than {limit} values of protected column {over} in one result: refused "
                        "by the pgcloak policy (guards.max_pii_rows); narrow the query or page it",
                        refusal=True,
                    )
                elif kind == DATA_ROW:
                    replacement = self._reveal_row(protection, view, chunk[start:end])
                else:
                    replacement = self._reveal_copy(protection, view, chunk[start:end])
            elif kind in _ROWS_END:
                self._pii_rows = 0
                self._pii_values.clear()
                if kind == ERROR and MARKER in chunk[start:end]:
                    m = _MARKER_ID.search(chunk, start, end)
                    if m is not None:
                        replacement = self._refusals.pop(MARKER + m.group(1), None)
                if replacement is None and kind == ERROR and self._client_names and _SERVER_NAME in chunk[start:end]:
                    replacement = self._client_named(chunk[start:end])
            if replacement is None:
                continue
            if head > run:
                out.append(chunk[run:head])
            out.append(replacement)
            run = end
        if not out:
            return chunk
        if run < len(chunk):
            out.append(chunk[run:])
        return b"".join(out)

    def _over_limit(self, chunk: bytes, start: int, end: int, limit: int) -> str | None:
        """Count the stored values in one row by column (their envelopes' key ids): the
        column whose count passes ``limit`` now, if any. By value, not by row: one row
        can carry many people's values (a scalar subquery per person, a self-join)."""
        counts = self._pii_values
        for found in key_ids_in(chunk, start, end):
            key = found or "(unreadable key id)"
            n = counts.get(key, 0) + 1
            counts[key] = n
            if n > limit:
                return key
        return None

    def _client_named(self, body: bytes) -> bytes | None:
        """An ErrorResponse naming the server's name for a client's statement, with the
        client's name instead (None: none it knows)."""
        names = self._client_names

        def client(m: re.Match[bytes]) -> bytes:
            found = names.get(m.group(0).decode())
            return m.group(0) if found is None else found.encode("utf-8", "surrogateescape")

        renamed = _SERVER_NAME_RE.sub(client, body)
        return None if renamed == body else frame(b"E", renamed)

    def _reveal_row(self, protection: Protection, view: ReadView | None, body: bytes) -> bytes | None:
        """The DataRow with stored values decided; untouched values are spliced through."""
        try:
            (count,) = _H.unpack_from(body, 0)
            pos = 2
            out = [body[:2]]
            run = 2  # start of bytes not yet copied
            changed = False
            for _ in range(count):
                (n,) = _I.unpack_from(body, pos)
                start = pos + 4
                if n < 0:
                    pos = start
                    continue
                end = start + n
                if end > len(body):
                    raise ProtocolError("invalid DataRow message: value runs past the end")
                if ENVELOPE_PREFIX in body[start:end]:
                    value = body[start:end]
                    plain = protection.reveal(value, view)
                    if plain is not value:
                        out.append(body[run:pos])
                        out.append(_I.pack(len(plain)))
                        out.append(plain)
                        run = end
                        changed = True
                pos = end
        except struct.error:
            raise ProtocolError("invalid DataRow message: truncated") from None
        except DecryptionFailed as exc:
            return self._fail_result(exc.sqlstate, exc.message)
        except ReadDenied as exc:
            return self._fail_result(exc.sqlstate, exc.message, refusal=True)
        if not changed:
            return None
        out.append(body[run:])
        return frame(b"D", b"".join(out))

    def _reveal_copy(self, protection: Protection, view: ReadView | None, body: bytes) -> bytes:
        try:
            return CopyData(protection.reveal_copy_row(body, self._copy_out_csv, view)).encode()
        except DecryptionFailed as exc:
            return self._fail_result(exc.sqlstate, exc.message)
        except ReadDenied as exc:
            return self._fail_result(exc.sqlstate, exc.message, refusal=True)

    def _fail_result(self, sqlstate: str, message: str, *, refusal: bool = False) -> bytes:
        """Never hand out garbage or what the policy refuses: the rest of this result is
        dropped up to ReadyForQuery. A refusal by the policy is counted, and recorded in
        the trail by the session (:attr:`cut_short`), which knows whose result it was."""
        self._dropping = True
        self._pii_rows = 0
        self._pii_values.clear()
        if refusal:
            self._refused[sqlstate] += 1
            if self._audit is not None:
                self.cut_short.append((self._at, sqlstate, message))
        return ErrorResponse.make(sqlstate, message).encode()
