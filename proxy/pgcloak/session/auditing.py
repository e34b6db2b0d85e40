"""One session's audit events: facts from the plans, rows and durations from the server.

Statement events are completed when the server answers, so they can carry the rows
returned or affected and the duration. The server answers in order: each Execute gets
exactly one of CommandComplete / EmptyQueryResponse / PortalSuspended / ErrorResponse
(or none, when an earlier error makes it skip to Sync), and each simple Query ends
with ReadyForQuery. So every Execute and Query is queued in order — statements that
are not recorded as shared placeholders — and the server's replies pop the queue.
No literal value reaches an event: events get the plan's fingerprint (for a statement
pgcloak did not parse, made from its text with the literals replaced) and the
blind-index values of lookups.

In ``pii`` and ``writes`` mode, a statement whose plan names no protected column may return
protected values (a view over a protected table, a function, a cursor's FETCH): the
values carry their column's key id, and pgcloak decrypts them. So such statements are
watched: if their replies hold a value of a protected column, they are recorded, with
the columns named by the values' key ids.

Cost: this runs for every statement of an audited session, so the static part of each
plan's events is serialized once per session (:class:`StatementTemplate`), a
completed statement is queued as the few values that change, and the server's replies
are not walked again (but a watched statement's, searched for values' headers): the
session's boundary walk lists where each reply ends.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from time import monotonic, time_ns
from typing import TYPE_CHECKING, Any, TypedDict

from pgcloak import _native as native
from pgcloak.audit import AuditLog, SessionInfo, refusal_event, should_record, statement_event
from pgcloak.audit.events import InvalidEventError, StatementsMode
from pgcloak.audit.templates import FAILED_REASON, StatementTemplate
from pgcloak.crypto.envelope import ENVELOPE_PREFIX, key_ids_in
from pgcloak.sql import AuditFacts, Plan, fingerprint
from pgcloak.wire.framing import Mark

log = logging.getLogger("pgcloak.audit")
_MAX_PORTALS = 10_000
#: Templates kept per session (plans are cached by the planner, so few are distinct).
_MAX_TEMPLATES = 512
_ERROR, _READY, _COMMAND_COMPLETE, _COPY_IN, _PARSE_COMPLETE = 0x45, 0x5A, 0x43, 0x47, 0x31
_PORTAL_SUSPENDED = 0x73
#: The server messages that end a statement's or a batch's reply: CommandComplete,
#: EmptyQueryResponse, PortalSuspended, ErrorResponse, ReadyForQuery.
REPLY_ENDS = frozenset(b"CIsEZ")
#: Marked too by the session: ParseComplete, CloseComplete (statements prepared again),
#: CopyInResponse (the search_path's batch count).
_NOT_ENDS = frozenset(b"13G")
#: CommandComplete, EmptyQueryResponse, PortalSuspended: the end of one statement's reply.
_STATEMENT_ENDS = frozenset(b"CIs")


class _Slow:
    """A plan whose events cannot be templated: built and validated one by one."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan) -> None:
        self.plan = plan


class _Watched:
    """A plan that names no protected column: recorded only if its result holds some."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan) -> None:
        self.plan = plan


#: How a plan's events are made: a template, the slow way, watched, or None (not recorded).
_Recipe = StatementTemplate | _Slow | _Watched | None


class _UnitFields:
    """_Unit's fields where the C module is not built (its ``Unit`` type otherwise)."""

    __slots__ = ("keys", "lookups", "plan", "recipe", "rows", "simple", "sqlstate", "started", "text")


_reply_core: Any = native.load("pgcloak.session._reply_core")  # None: the same in Python

if TYPE_CHECKING:
    _UnitBase = _UnitFields
else:
    _UnitBase = _reply_core.Unit if _reply_core is not None else _UnitFields

#: How a portal's Executes are recorded: (recipe, lookups, plan, text).
_Bound = tuple[StatementTemplate | _Slow | _Watched, dict[str, list[str]] | None, Plan | None, str | None]


class _Unit(_UnitBase):
    """A Query or an Execute waiting for the server's reply. When a templated one ends,
    its values go to the log as one tuple, checked by the writer, not here: this is the
    per-statement path of every audited session. (An Execute's is made in C where it
    is built: ``Core.execute`` in _reply_core.c.)"""

    __slots__ = ()

    def __init__(
        self,
        recipe: _Recipe,
        lookups: dict[str, list[str]] | None,
        simple: bool,
        plan: Plan | None = None,
        text: str | None = None,
    ) -> None:
        self.recipe = recipe
        self.lookups = lookups
        self.simple = simple
        #: What a refusal that cuts its result short says of it; the text, for the
        #: fingerprint of a statement pgcloak did not parse (it named no protected table).
        self.plan = plan
        self.text = text
        #: A watched statement: the key ids of the protected columns whose values its
        #: result holds (None: none seen yet).
        self.keys: set[str] | None = None
        self.started = monotonic()
        self.rows: int | None = None
        self.sqlstate: str | None = None


#: A Sync or FunctionCall: answered by one ReadyForQuery.
_SYNC = _Unit(None, None, True)
#: A Query / an Execute that is not recorded (kept in step with the replies, never
#: completed, never written to).
_SKIP_QUERY = _Unit(None, None, True)
_SKIP_EXECUTE = _Unit(None, None, False)


class _CoreFields:
    """SessionAudit's per-statement state and calls: the C module's ``Core`` where it is
    built (its struct holds these fields, and its methods are the calls), else plain
    attributes, with SessionAudit's reference methods as the calls (set below the class)."""

    _units: deque[_Unit]
    #: Truthy while statements wait for the server's replies: the queue itself (read after
    #: every chunk the server sends, so no property call).
    pending: deque[_Unit]
    #: Portal name (as sent) -> how its Executes are recorded.
    _portals: dict[bytes, _Bound]
    _recipes: dict[int, tuple[Plan, _Recipe]]
    log: AuditLog
    #: DataRows since the last completion: an Execute's rows when it ends in
    #: PortalSuspended (which has no tag to count from).
    _returned: int
    statements: int

    def reply(self, chunk: bytes, marks: list[Mark], tail_rows: int, /) -> None:
        """The server's replies in ``chunk`` when pgcloak cut no result short: the usual
        one (one statement's whole reply) completed at once, anything else reply by reply
        (what :meth:`SessionAudit.backend` does)."""
        raise NotImplementedError

    def query(self, plan: Plan | None, lookups: dict[str, list[str]], text: str | None = None, /) -> None:
        """A simple Query sent to the server (None: a refused one, recorded as a refusal)."""
        raise NotImplementedError

    def bind(
        self, portal: bytes, plan: Plan | None, lookups: dict[str, list[str]], text: str | None = None, /
    ) -> None:
        """A Bind of ``portal``: how its Executes are recorded (``plan`` None: not at all)."""
        raise NotImplementedError

    def execute(self, portal: bytes, /) -> None:
        """An Execute of ``portal`` queued."""
        raise NotImplementedError

    def execute_message(self, msg: bytes, /) -> None:
        """``execute`` of the portal the Execute message ``msg`` (header included) names."""
        raise NotImplementedError

    def sync(self) -> None:
        """A Sync or FunctionCall: the server answers it with one ReadyForQuery."""
        raise NotImplementedError


if TYPE_CHECKING:
    _CoreBase = _CoreFields
else:
    _CoreBase = _reply_core.Core if _reply_core is not None else _CoreFields


def event_kind(kind: str) -> str:
    """The plan's kind as the audit schema takes it (one lowercase word, ``_`` allowed).

    A simple Query holding several kinds of statements is planned as ``select+insert``;
    the schema refuses ``+``, and an event refused by ``emit()`` here would end the
    session after its statements ran. So: ``select_insert`` (``multi`` if too long).
    """
    if "+" not in kind:
        return kind
    joined = kind.replace("+", "_")
    return joined if len(joined) <= 32 else "multi"


#: sqlglot's tokenizer errors quote the statement text around the failure, literals
#: included, and the planner's refusal message passes them on: never into the trail.
_TOKENIZER_EXCERPT = re.compile(r"(Error tokenizing )'.*'(?=\))", re.S)


class _Described(TypedDict):
    kind: str
    fingerprint: str
    tables: tuple[str, ...]
    columns_read: tuple[str, ...]
    columns_written: tuple[str, ...]
    masked: tuple[str, ...]


#: What a refusal of a statement that could not be planned says of it.
_UNPLANNED = _Described(kind="other", fingerprint="", tables=(), columns_read=(), columns_written=(), masked=())


def _described(facts: AuditFacts, masked: tuple[str, ...]) -> _Described:
    """What every statement or refusal event says of its plan (templates, slow path, refusals)."""
    return _Described(
        kind=event_kind(facts.kind),
        fingerprint=facts.fingerprint,
        tables=facts.tables,
        columns_read=facts.pii_read,
        columns_written=facts.pii_written,
        masked=masked,
    )


def _nothing_masked(plan: Plan) -> tuple[str, ...]:
    return ()


def _no_columns(keys: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (), ()


def _no_column(key: str) -> bool:
    return False


def trail_reason(reason: str) -> str:
    """A refusal message as the trail may hold it: without quoted statement text."""
    if "Error tokenizing" not in reason:
        return reason
    return _TOKENIZER_EXCERPT.sub(r"\1(statement text withheld)", reason)


class SessionAudit(_CoreBase):
    """Queues one session's statements and emits their events when they complete.

    The per-statement calls (``query``, ``bind``, ``execute``, ``execute_message``,
    ``sync``, ``reply``) are the C module's where it is built; the methods ending in
    ``_py`` and :meth:`_one_reply` are their reference.
    """

    def __init__(self, log: AuditLog, info: Callable[[], SessionInfo], mode: StatementsMode) -> None:
        self.log = log
        self._info = info
        self._mode: StatementsMode = mode
        self._units = deque()
        if _reply_core is None:
            self.pending = self._units  # (C: a read-only name for the same field)
        self._portals = {}
        self._recipes = {}
        self._returned = 0
        self.statements = 0
        #: The columns a plan reads that this session gets masked (the rewriter knows the
        #: session's read decisions); static per plan, so part of its template.
        self.masked_of: Callable[[Plan], tuple[str, ...]] = _nothing_masked
        #: Of some key ids, those of protected columns, and those this session gets
        #: masked (for watched statements, whose plans name no column).
        self.columns_of_keys: Callable[[Iterable[str]], tuple[tuple[str, ...], tuple[str, ...]]] = _no_columns
        #: Per CopyInResponse the session saw (and this trail has yet to reach in the
        #: replies): how many Syncs sent after the COPY's Execute PostgreSQL ignored.
        self.ignored_syncs: deque[int] = deque()
        #: Whether a key id is a protected column's (values of watched statements).
        self.is_column_key: Callable[[str], bool] = _no_column

    def switch(self, log: AuditLog, mode: StatementsMode) -> None:
        """From now on, write to ``log`` and record ``mode``'s statements (a policy reload)."""
        self.log = log
        if mode != self._mode:
            self._mode = mode
            self._recipes.clear()  # which plans are recorded may differ

    def _emit(self, event: dict[str, object]) -> None:
        """Never let an audit problem break the client's stream: log it (no values) instead."""
        try:
            self.log.emit(event)
        except Exception as exc:
            log.error("audit event rejected", extra={"error": type(exc).__name__, "detail": str(exc)})

    def _wanted(self, plan: Plan) -> bool:
        kind = plan.audit.kind
        if "+" not in kind:
            return should_record(self._mode, kind, plan.touches_pii)
        # A simple Query with several statements has the kind "select+insert": it is a
        # write when any of its statements is one.
        return any(should_record(self._mode, k, plan.touches_pii) for k in kind.split("+"))

    def _recipe(self, plan: Plan) -> _Recipe:
        """How ``plan``'s events are made in this session (cached by plan identity)."""
        found = self._recipes.get(id(plan))
        if found is not None and found[0] is plan:
            return found[1]
        return self._new_recipe(plan)

    def _new_recipe(self, plan: Plan) -> _Recipe:
        recipe: _Recipe = None
        if self._wanted(plan):
            try:
                recipe = StatementTemplate(self._info(), **_described(plan.audit, self.masked_of(plan)))
            except (InvalidEventError, ValueError):
                recipe = _Slow(plan)  # emit() will validate, refuse and log each event
        else:
            recipe = _Watched(plan)
        if len(self._recipes) >= _MAX_TEMPLATES:
            self._recipes.clear()
        self._recipes[id(plan)] = (plan, recipe)  # the plan is kept: its id stays its own
        return recipe

    # -- client side ---------------------------------------------------------------------
    def _query_py(self, plan: Plan | None, lookups: dict[str, list[str]], text: str | None = None) -> None:
        self.statements += 1
        recipe = self._recipe(plan) if plan is not None else None
        self._units.append(_SKIP_QUERY if recipe is None else _Unit(recipe, lookups or None, True, plan, text))

    def _bind_py(
        self, portal: bytes, plan: Plan | None, lookups: dict[str, list[str]], text: str | None = None
    ) -> None:
        recipe: _Recipe = None
        if plan is not None:
            found = self._recipes.get(id(plan))  # _recipe(), inline: once per Bind
            recipe = found[1] if found is not None and found[0] is plan else self._new_recipe(plan)
        if recipe is None:
            self._portals.pop(portal, None)
            return
        if portal not in self._portals and len(self._portals) >= _MAX_PORTALS:
            # PostgreSQL drops portals at transaction end without telling us; bound ours.
            self._portals.clear()
        self._portals[portal] = (recipe, lookups or None, plan, text)

    def _sync_py(self) -> None:
        self._units.append(_SYNC)

    def close_portal(self, portal: bytes) -> None:
        self._portals.pop(portal, None)

    def _execute_message_py(self, msg: bytes) -> None:
        self.execute(msg[5 : msg.find(b"\0", 5)])

    def _execute_py(self, portal: bytes) -> None:
        self.statements += 1
        found = self._portals.get(portal)
        if found is None:
            self._units.append(_SKIP_EXECUTE)
        else:
            self._units.append(_Unit(found[0], found[1], False, found[2], found[3]))

    def refused(
        self, plan: Plan | None, sqlstate: str, reason: str, lookups: dict[str, list[str]] | None = None
    ) -> None:
        """Refusals are always recorded, whatever ``audit.statements`` says; ``lookups``:
        the blind-index values the refused statement searched for (never the values)."""
        described = _described(plan.audit, self.masked_of(plan)) if plan is not None else _UNPLANNED
        self._emit(
            refusal_event(
                self._info(), reason=trail_reason(reason), sqlstate=sqlstate, lookups=lookups or None, **described
            )
        )

    # -- server side ---------------------------------------------------------------------
    def backend(
        self, chunk: bytes, marks: list[Mark], tail_rows: int, cut_short: Sequence[tuple[int, str, str]] = ()
    ) -> None:
        """Complete queued statements from the server's replies in ``chunk``.

        ``marks`` and ``tail_rows`` are what :func:`~pgcloak.wire.framing.scan_marked`
        found with :data:`REPLY_ENDS` and ``_NOT_ENDS`` (the session's boundary walk, so no
        second one).
        ``cut_short``: where in ``chunk`` pgcloak cut a result short, refusing the rest
        (position, SQLSTATE, message); recorded with the facts of the statement whose
        result it was.
        """
        if 2 <= len(marks) <= 3 and self._units and not cut_short and _one_reply(self, chunk, marks, tail_rows):
            return
        self._walk(chunk, marks, tail_rows, cut_short)

    def _walk(
        self, chunk: bytes, marks: list[Mark], tail_rows: int, cut_short: Sequence[tuple[int, str, str]] = ()
    ) -> None:
        """:meth:`backend` reply by reply, for anything but the usual whole reply (which
        the caller has tried first)."""
        units = self._units
        returned = self._returned
        seg = 0  # where the replies before the next mark start
        refusals = list(cut_short) if cut_short else None
        for kind, pos, end, rows_before in marks:
            if not units:
                break
            head = units[0]
            returned += rows_before
            if type(head.recipe) is _Watched:
                self._watch(head, chunk, seg, pos)
            if refusals and refusals[0][0] < pos:
                self._cut_short(head, refusals, pos)
            seg = end
            if kind in _STATEMENT_ENDS:  # the most frequent: checked first
                recipe = head.recipe
                if recipe is None:  # not recorded (or a Sync): only keep in step
                    if not head.simple:
                        units.popleft()
                else:
                    if kind == _COMMAND_COMPLETE:
                        rows = _tag_rows(chunk, pos, end)
                    else:  # PortalSuspended: the rows sent so far (a client's row limit)
                        rows = returned if kind == _PORTAL_SUSPENDED else None
                    if head.simple:
                        if rows is not None:
                            head.rows = (head.rows or 0) + rows
                    else:
                        units.popleft()
                        head.rows = rows
                        self._complete(head)
            elif kind == _READY:
                # Executes still queued were skipped after an error in their batch.
                while not head.simple:
                    units.popleft()
                    if not units:
                        break
                    head = units[0]
                else:
                    units.popleft()
                    if head.recipe is not None:
                        self._complete(head)
            elif kind == _ERROR:
                if head is not _SYNC:
                    if not head.simple:
                        units.popleft()
                    if head.recipe is not None:
                        head.sqlstate = sqlstate_of(chunk[pos + 5 : end]) or "XX000"
                        if not head.simple:
                            self._complete(head)
            else:  # ParseComplete, CloseComplete, CopyInResponse: not the end of a reply
                if kind == _COPY_IN and self.ignored_syncs:
                    self._drop_syncs(self.ignored_syncs.popleft())
                continue
            returned = 0
        self._returned = returned + tail_rows
        if units and type(units[0].recipe) is _Watched:
            self._watch(units[0], chunk, seg, len(chunk))
        if refusals:
            self._cut_short(units[0] if units else None, refusals, len(chunk) + 1)

    def _one_reply(self, chunk: bytes, marks: list[Mark], tail_rows: int) -> bool:
        """The usual chunk, done in one go: the whole reply to one statement (its
        CommandComplete and ReadyForQuery, after the ParseComplete of a statement parsed
        with it) when it is all that is queued (with its Sync), templated, or watched and
        holding no protected value. False, having changed nothing, for anything else."""
        if len(marks) == 3:  # the ParseComplete of an unnamed statement sent with it
            if marks[0][0] != _PARSE_COMPLETE:
                return False
            (_, _, _, _), (kind, pos, end, _), (last, _, _, _) = marks
        else:
            (kind, pos, end, _), (last, _, _, _) = marks
        units = self._units
        head = units[0]
        recipe = head.recipe
        if kind != _COMMAND_COMPLETE or last != _READY:
            return False
        if type(recipe) is not StatementTemplate:
            # A watched statement whose reply holds no protected value: nothing to record.
            if type(recipe) is not _Watched or head.keys is not None or ENVELOPE_PREFIX in chunk:
                return False
            recipe = None
        if head.simple:
            if len(units) != 1 or head.rows is not None:
                return False
        elif len(units) != 2 or units[1] is not _SYNC:
            return False
        units.clear()
        self._returned = tail_rows
        if recipe is None:
            return True
        rows = _tag_rows(chunk, pos, end)
        self.log.emit_statement((recipe, head.lookups, head.started, monotonic(), time_ns(), rows, None))
        return True

    def _drop_syncs(self, count: int) -> None:
        """The COPY at the head of the queue started: the first ``count`` Syncs queued
        after it were ignored by PostgreSQL (no ReadyForQuery will answer them)."""
        units = self._units
        if not units or not count:
            return
        kept: list[_Unit] = []
        head = units.popleft()
        while units and count:
            unit = units.popleft()
            if unit is _SYNC:
                count -= 1
            else:
                kept.append(unit)
        units.extendleft(reversed(kept))
        units.appendleft(head)

    def _cut_short(self, unit: _Unit | None, refusals: list[tuple[int, str, str]], before: int) -> None:
        """Record the refusals (positions before ``before``) that cut ``unit``'s result short."""
        while refusals and refusals[0][0] < before:
            _, sqlstate, reason = refusals.pop(0)
            plan = unit.plan if unit is not None else None
            if plan is None:
                self.refused(None, sqlstate, reason)
                continue
            described = _described(plan.audit, self.masked_of(plan))
            assert unit is not None
            described["fingerprint"] = _fingerprint_of(unit)
            if unit.keys:  # a watched statement: its values' columns
                described["columns_read"], described["masked"] = self.columns_of_keys(unit.keys)
            self._emit(refusal_event(self._info(), reason=trail_reason(reason), sqlstate=sqlstate, **described))
            if "+" not in plan.audit.kind:
                # One statement: the refusal is its event, no "allow" with the rows the
                # server sent (the client got fewer, then the error). A Query of several
                # keeps its event: the server ran the statements after the cut too.
                unit.recipe = None

    def _complete(self, unit: _Unit) -> None:
        recipe = unit.recipe
        if type(recipe) is StatementTemplate:
            # Checked (and refused, logged, if bad) by the writer: see Chain.append_completed.
            self.log.emit_statement(
                (recipe, unit.lookups, unit.started, monotonic(), time_ns(), unit.rows, unit.sqlstate)
            )
            return
        if recipe is None:
            return
        if type(recipe) is _Watched:
            if unit.keys:
                self._watched_event(recipe.plan, unit)
            return
        assert isinstance(recipe, _Slow)
        failed = unit.sqlstate is not None
        self._emit(
            statement_event(
                self._info(),
                **_described(recipe.plan.audit, self.masked_of(recipe.plan)),
                lookups=unit.lookups,
                rows=None if failed else unit.rows,
                reason=FAILED_REASON if failed else None,
                sqlstate=unit.sqlstate,
                duration_ms=(monotonic() - unit.started) * 1000.0,
            )
        )

    def _watch(self, unit: _Unit, chunk: bytes, start: int, stop: int) -> None:
        """Note the columns of the protected values in ``chunk[start:stop]`` (replies of
        the watched statement ``unit``): every value's key id is read (a result cannot
        hide a column behind many values of another), and only the policy's columns
        count (text that merely looks like a value names nothing)."""
        if start >= stop or chunk.find(ENVELOPE_PREFIX, start, stop) < 0:
            return
        known = self.is_column_key
        keys = unit.keys
        for key in key_ids_in(chunk, start, stop):
            if key is not None and (keys is None or key not in keys) and known(key):
                if keys is None:
                    keys = unit.keys = set()
                keys.add(key)

    def _watched_event(self, plan: Plan, unit: _Unit) -> None:
        """A statement whose plan named no protected column returned protected values."""
        assert unit.keys
        columns, masked = self.columns_of_keys(unit.keys)
        failed = unit.sqlstate is not None
        facts = plan.audit
        self._emit(
            statement_event(
                self._info(),
                kind=event_kind(facts.kind),
                fingerprint=_fingerprint_of(unit),
                tables=facts.tables,
                columns_read=columns,
                masked=masked,
                rows=None if failed else unit.rows,
                reason=FAILED_REASON if failed else None,
                sqlstate=unit.sqlstate,
                duration_ms=(monotonic() - unit.started) * 1000.0,
            )
        )


def _tag_rows(chunk: bytes, pos: int, end: int) -> int | None:
    """The row count of the CommandComplete at ``chunk[pos:end]`` ("SELECT 3", "INSERT 0 1")."""
    tag = chunk[pos + 5 : end - 1]
    count = tag[tag.rfind(b" ") + 1 :]
    return int(count) if count.isdigit() else None


def _fingerprint_of(unit: _Unit) -> str:
    """The plan's fingerprint; made from the text for a statement pgcloak did not parse."""
    found = unit.plan.audit.fingerprint if unit.plan is not None else ""
    if not found and unit.text:
        found = fingerprint(unit.text)
    return found


def sqlstate_of(body: bytes) -> str | None:
    """The SQLSTATE field of an ErrorResponse body."""
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.find(b"\0", pos + 1)
        if end < 0:
            return None
        if body[pos] == ord("C"):
            return body[pos + 1 : end].decode("ascii", "replace")
        pos = end + 1
    return None


def _python_reply(audit: SessionAudit, chunk: bytes, marks: list[Mark], tail_rows: int) -> None:
    """SessionAudit.reply without the C module."""
    audit.backend(chunk, marks, tail_rows)


#: The usual reply, as backend() tries it first: in C where it is built
#: (pgcloak/session/_reply_core.c: the same decisions, units and events as the Python
#: methods, tests/unit/test_session_audit.py). PGCLOAK_PURE_PYTHON=1 keeps the Python.
_one_reply: Callable[[SessionAudit, bytes, list[Mark], int], bool] = SessionAudit._one_reply
if _reply_core is not None:
    # (The C functions keep these objects: patching this module's names later does not
    # reach them; configure() again.)
    _reply_core.configure(
        StatementTemplate,
        _Watched,
        _SYNC,
        ENVELOPE_PREFIX,
        monotonic,
        time_ns,
        _Unit,
        _SKIP_EXECUTE,
        _MAX_PORTALS,
        _SKIP_QUERY,
    )
    _one_reply = _reply_core.one_reply
else:
    # The reference methods are the calls (class attributes: no frame added per call).
    SessionAudit.reply = _python_reply  # type: ignore[method-assign,assignment]
    SessionAudit.bind = SessionAudit._bind_py  # type: ignore[method-assign,assignment]
    SessionAudit.execute = SessionAudit._execute_py  # type: ignore[method-assign,assignment]
    SessionAudit.execute_message = SessionAudit._execute_message_py  # type: ignore[method-assign,assignment]
    SessionAudit.sync = SessionAudit._sync_py  # type: ignore[method-assign,assignment]
    SessionAudit.query = SessionAudit._query_py  # type: ignore[method-assign,assignment]
