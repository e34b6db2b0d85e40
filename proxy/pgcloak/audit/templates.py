"""Statement events serialized once per (session, plan) and completed per event.

A busy session records most of its statements, and building a 21-field dict per event,
then copying and serializing it again in the chain, cost more than proxying the
statement itself. Yet of a statement event only ten fields change from one execution
to the next (``ts``, ``id``, ``rows``, ``duration_ms``, ``lookups``, ``reason``,
``sqlstate`` and the chain's ``seq``, ``chain``, ``prev``); the rest is the session's
and the plan's. A :class:`StatementTemplate` validates those static fields once (with
the same builder and rules as :func:`~pgcloak.audit.events.statement_event`),
serializes them once with the chain's canonical encoder, and keeps slots for the
ten. A session queues each execution as a :data:`Completed` tuple (the template and
the raw values: a tuple is the cheapest thing to make on the session's path), which the
writer checks against the same rules as the builder checks them and fills into the
slots (:meth:`~pgcloak.audit.chain.Chain.append_completed_many`, the writer's loop);
:meth:`StatementTemplate.render` fills them for a :class:`PendingStatement`. Both
produce exactly the canonical text ``Chain.append`` would make of the equivalent dict
(tested byte for byte), so ``verify`` and every reader of the trail see no difference.

Pure (no IO).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from pgcloak.audit.chain import FAILED_REASON_JSON, json_string, lookups_json, serialize
from pgcloak.audit.events import (
    FAILED_REASON,
    InvalidEventError,
    SessionInfo,
    checked_duration,
    checked_rows,
    lookups_ok,
    statement_event,
    validate_event,
)

__all__ = ["FAILED_REASON", "Completed", "PendingStatement", "StatementTemplate", "lookups_json"]

#: The fields filled in per event, in the canonical (sorted) order of their slots.
_SLOTS: Final = ("chain", "duration_ms", "id", "lookups", "prev", "reason", "rows", "seq", "sqlstate", "ts")
#: Slots whose values are strings with nothing to escape (hex digits, a timestamp): the
#: template holds their quotes.
_QUOTED: Final = frozenset(("id", "prev", "ts"))

def _sentinel(i: int) -> str:
    # Encoded, a slot reads ``"\u0000<i>\u0000"`` with its quotes, which no encoded
    # static value can contain (its quotes are escaped); still checked below.
    return f"\0{i}\0"


class StatementTemplate:
    """The canonical text of one session's statement events for one plan, with slots.

    Raises :class:`~pgcloak.audit.events.InvalidEventError` for arguments the builder
    would not vouch for, and ``ValueError`` if the slots cannot be found exactly once
    each (defensive; the caller then builds its events the slow way).
    """

    __slots__ = ("parts",)

    def __init__(
        self,
        info: SessionInfo,
        *,
        kind: str,
        fingerprint: str,
        tables: Iterable[str] = (),
        columns_read: Iterable[str] = (),
        columns_written: Iterable[str] = (),
        masked: Iterable[str] = (),
    ) -> None:
        sample = statement_event(
            info,
            kind=kind,
            fingerprint=fingerprint,
            tables=tables,
            columns_read=columns_read,
            columns_written=columns_written,
            masked=masked,
        )
        if not getattr(sample, "vouched", False):
            validate_event(sample)  # names the bad field
            raise InvalidEventError("statement event: invalid template")
        record: dict[str, Any] = dict(sample)
        for i, name in enumerate(_SLOTS):
            record[name] = _sentinel(i)
        text = serialize(record)
        parts: list[str] = []
        for i, name in enumerate(_SLOTS):
            marker = json_string(_sentinel(i))
            if text.count(marker) != 1:
                raise ValueError("a static audit field holds a template marker")
            before, text = text.split(marker)
            if name in _QUOTED:
                before, text = before + '"', '"' + text
            parts.append(before)
        parts.append(text)
        #: The static text around the slots, in the order of ``_SLOTS``: eleven parts,
        #: the quotes of the string slots included (filled by ``render`` and, inline, by
        #: ``Chain.append_completed_many``).
        self.parts = tuple(parts)

    def render(
        self,
        seq: int,
        chain: str,
        prev: str,
        event_id: str,
        ts: str,
        ms: float | None,
        rows: int | None,
        sqlstate: str | None,
        lookups: dict[str, list[str]] | None,
        /,
    ) -> str:
        """The canonical text (no ``mac``) of one execution as record ``seq`` of a chain.

        ``chain`` is the chain id as JSON text (:func:`json_string`); ``prev`` and
        ``event_id`` are hex digits; the values are checked ones (:class:`PendingStatement`).
        """
        t = self.parts
        return "".join(
            (
                t[0], chain,
                t[1], "null" if ms is None else repr(ms),
                t[2], event_id,
                t[3], lookups_json(lookups) if lookups else "{}",
                t[4], prev,
                t[5], "null" if sqlstate is None else FAILED_REASON_JSON,
                t[6], "null" if rows is None else str(rows),
                t[7], str(seq),
                t[8], "null" if sqlstate is None else '"' + sqlstate + '"',
                t[9], ts,
                t[10],
            )
        )  # fmt: skip


#: A statement as a session queues it when the server has answered it: (template,
#: lookups, started, ended (both ``time.monotonic()``), ended (``time.time_ns()``), rows,
#: SQLSTATE). A plain tuple, because a busy session queues one per statement: the writer
#: checks and formats it (:meth:`~pgcloak.audit.chain.Chain.append_completed_many`), not the session.
Completed = tuple[
    StatementTemplate, "dict[str, list[str]] | None", float, float, int, "int | None", "str | None"
]


class PendingStatement:
    """One execution of a templated statement with its values checked at once (tests,
    tools; a session queues the cheaper :data:`Completed`, checked by the writer).

    Every value is checked as the builder would check it (no value of a statement can
    reach the trail through them: ``lookups`` holds blind-index values only,
    ``sqlstate`` five characters, ``rows`` and ``duration_ms`` numbers), raising
    :class:`~pgcloak.audit.events.InvalidEventError` otherwise. A statement with a
    ``sqlstate`` failed in PostgreSQL; its ``rows`` are then not recorded.
    """

    __slots__ = ("duration_ms", "lookups", "rows", "sqlstate", "template", "ts")

    def __init__(
        self,
        template: StatementTemplate,
        ts: str,
        duration_ms: float | None,
        rows: int | None,
        sqlstate: str | None,
        lookups: dict[str, list[str]] | None,
    ) -> None:
        if lookups and not lookups_ok(lookups):
            raise InvalidEventError("statement event: invalid value for field 'lookups'")
        self.template = template
        self.lookups = lookups or None
        self.ts = ts
        self.duration_ms = None if duration_ms is None else checked_duration(duration_ms)
        self.rows = checked_rows(rows, sqlstate)
        self.sqlstate = sqlstate

    def render(self, seq: int, chain: str, prev: str, event_id: str, /) -> str:
        """Its canonical text as record ``seq`` of a chain (see :meth:`StatementTemplate.render`)."""
        return self.template.render(
            seq, chain, prev, event_id, self.ts, self.duration_ms, self.rows, self.sqlstate, self.lookups
        )
