"""One session's audit events: facts from the plans, rows and durations from the server.

Statement events are completed when the server answers, so they can carry the rows
returned or affected and the duration. The server answers in order: each Execute gets
exactly one of CommandComplete / EmptyQueryResponse / PortalSuspended / ErrorResponse
(or none, when an earlier error makes it skip to Sync), and each simple Query ends
with ReadyForQuery. So every Execute and Query is queued in order — statements that
are not recorded as ``None`` placeholders — and the server's replies pop the queue.
Nothing here ever sees a literal value: events get the plan's fingerprint and the
blind-index values of lookups.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pgcloak.audit import AuditLog, SessionInfo, refusal_event, should_record, statement_event
from pgcloak.audit.events import StatementsMode
from pgcloak.sql import Plan
from pgcloak.wire.framing import iter_messages

log = logging.getLogger("pgcloak.audit")
_COMPLETIONS = frozenset(b"CIs")
_MAX_PORTALS = 10_000
_ERROR, _READY, _COMMAND_COMPLETE = 0x45, 0x5A, 0x43
_DATA_ROW, _PORTAL_SUSPENDED = 0x44, 0x73


@dataclass(slots=True)
class _Unit:
    """A Query, an Execute, or (plan None, simple True) a Sync / FunctionCall marker."""

    plan: Plan | None
    lookups: dict[str, list[str]] | None
    simple: bool
    record: bool
    started: float = field(default_factory=time.monotonic)
    rows: int | None = None
    error: str | None = None
    #: DataRows of an Execute so far: its rows when it ends in PortalSuspended (no tag).
    returned: int = 0


_SYNC = _Unit(None, None, True, False)


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


def trail_reason(reason: str) -> str:
    """A refusal message as the trail may hold it: without quoted statement text."""
    if "Error tokenizing" not in reason:
        return reason
    return _TOKENIZER_EXCERPT.sub(r"\1(statement text withheld)", reason)


def rows_of(tag: bytes) -> int | None:
    """Rows from a CommandComplete tag: ``SELECT 3``, ``INSERT 0 1``, ``UPDATE 2``..."""
    last = tag.rstrip(b"\0").rsplit(b" ", 1)[-1]
    return int(last) if last.isdigit() else None


class SessionAudit:
    """Queues one session's statements and emits their events when they complete."""

    def __init__(self, log: AuditLog, info: Callable[[], SessionInfo], mode: StatementsMode) -> None:
        self.log = log
        self._info = info
        self._mode: StatementsMode = mode
        self._units: deque[_Unit] = deque()
        self._portals: dict[str, tuple[Plan, dict[str, list[str]]]] = {}
        self.statements = 0

    def _emit(self, event: dict[str, object]) -> None:
        """Never let an audit problem break the client's stream: log it (no values) instead."""
        try:
            self.log.emit(event)
        except Exception as exc:
            log.error("audit event rejected", extra={"error": type(exc).__name__, "detail": str(exc)})

    @property
    def pending(self) -> bool:
        return bool(self._units)

    def _wanted(self, plan: Plan) -> bool:
        kind = plan.audit.kind
        if "+" not in kind:
            return should_record(self._mode, kind, plan.touches_pii)
        # A simple Query with several statements has the kind "select+insert": it is a
        # write when any of its statements is one.
        return any(should_record(self._mode, k, plan.touches_pii) for k in kind.split("+"))

    # -- client side ---------------------------------------------------------------------
    def query(self, plan: Plan | None, lookups: dict[str, list[str]]) -> None:
        """A simple Query sent to the server (None: a refused one, recorded as a refusal)."""
        self.statements += 1
        self._units.append(_Unit(plan, lookups, True, plan is not None and self._wanted(plan)))

    def bind(self, portal: str, plan: Plan | None, lookups: dict[str, list[str]]) -> None:
        if plan is None or not self._wanted(plan):
            self._portals.pop(portal, None)
            return
        if portal not in self._portals and len(self._portals) >= _MAX_PORTALS:
            # PostgreSQL drops portals at transaction end without telling us; bound ours.
            self._portals.clear()
        self._portals[portal] = (plan, lookups)

    def close_portal(self, portal: str) -> None:
        self._portals.pop(portal, None)

    def execute(self, portal: str) -> None:
        self.statements += 1
        found = self._portals.get(portal)
        if found is None:
            self._units.append(_Unit(None, None, False, False))
        else:
            self._units.append(_Unit(found[0], found[1], False, True))

    def sync(self) -> None:
        """A Sync or FunctionCall: the server answers it with one ReadyForQuery."""
        self._units.append(_SYNC)

    def refused(self, plan: Plan | None, sqlstate: str, reason: str) -> None:
        """Refusals are always recorded, whatever ``audit.statements`` says."""
        facts = plan.audit if plan is not None else None
        self._emit(
            refusal_event(
                self._info(),
                kind=event_kind(facts.kind) if facts else "other",
                fingerprint=facts.fingerprint if facts else "",
                reason=trail_reason(reason),
                sqlstate=sqlstate,
                tables=facts.tables if facts else (),
                columns_read=facts.pii_read if facts else (),
                columns_written=facts.pii_written if facts else (),
            )
        )

    # -- server side ---------------------------------------------------------------------
    def backend(self, chunk: bytes) -> None:
        """Complete queued statements from a chunk of whole server messages."""
        units = self._units
        for kind, start, end in iter_messages(chunk):
            if not units:
                return
            head = units[0]
            if kind == _DATA_ROW:
                if head is not _SYNC and not head.simple:
                    head.returned += 1
                continue
            if kind in _COMPLETIONS:
                if head is _SYNC:
                    continue
                if kind == _COMMAND_COMPLETE:
                    rows = rows_of(chunk[start:end])
                else:  # PortalSuspended: the rows sent so far (a client's row limit)
                    rows = head.returned if kind == _PORTAL_SUSPENDED else None
                if head.simple:
                    if rows is not None:
                        head.rows = (head.rows or 0) + rows
                    continue
                units.popleft()
                head.rows = rows
                self._complete(head)
            elif kind == _ERROR:
                if head is _SYNC:
                    continue
                head.error = sqlstate_of(chunk[start:end]) or "XX000"
                if not head.simple:
                    units.popleft()
                    self._complete(head)
            elif kind == _READY:
                # Executes still queued were skipped after an error in their batch.
                while units and units[0] is not _SYNC and not units[0].simple:
                    units.popleft()
                if units:
                    done = units.popleft()
                    if done is not _SYNC:
                        self._complete(done)

    def _complete(self, unit: _Unit) -> None:
        if not unit.record or unit.plan is None:
            return
        facts = unit.plan.audit
        failed = unit.error is not None
        self._emit(
            statement_event(
                self._info(),
                kind=event_kind(facts.kind),
                fingerprint=facts.fingerprint,
                tables=facts.tables,
                columns_read=facts.pii_read,
                columns_written=facts.pii_written,
                lookups=unit.lookups or None,
                rows=None if failed else unit.rows,
                reason="failed in PostgreSQL" if failed else None,
                sqlstate=unit.error,
                duration_ms=(time.monotonic() - unit.started) * 1000.0,
            )
        )


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
