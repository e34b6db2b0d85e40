"""Audit events: the builders the session calls, and the validator every event passes.

Pure (no IO). An event is a plain ``dict`` that serializes to one JSON object per line.
The builders take keyword arguments only and have no parameter that could carry a
literal value: statements are described by their kind, a fingerprint with literals
removed, the tables and column key ids (``"public.users.email"``) they touch, and for
lookups the *blind-index* values searched for (keyed hashes, not PII).
:func:`validate_event` rejects any field that is not in the schema, so a dict built by
hand cannot smuggle one in either.

The session builds an event for (almost) every statement, on the event loop, so the
builders are the trusted fast path: they return a :class:`BuiltEvent` (a ``dict``) and
check the arguments they were given against the same rules as :func:`validate_event`
(the fields they make themselves, ``ts``, ``id``, ``type``, are right by construction).
An event that passed is *vouched for*, and ``AuditLog.emit`` takes it without validating
it again; one that did not (a bad argument) is not, so ``emit`` validates it and raises
:class:`InvalidEventError` there, as for any dict. Changing a built event (setting,
deleting or updating a key) withdraws the vouching, and an event handed to ``emit`` is
frozen: it can no longer be changed at all.

The chain fields (``seq``, ``chain``, ``prev``, ``mac``) are added by
:mod:`pgcloak.audit.chain` when the event is written; events handed to the log must not
carry them.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "CHAIN_FIELDS",
    "COMMON_FIELDS",
    "CONNECTION_ACTIONS",
    "EVENT_FIELDS",
    "EVENT_TYPES",
    "FAILED_REASON",
    "LOOKUP_VALUE_PATTERN",
    "SEAL_REASONS",
    "WRITE_KINDS",
    "BuiltEvent",
    "ConnectionAction",
    "EventType",
    "InvalidEventError",
    "SealReason",
    "SessionInfo",
    "checked_duration",
    "checked_rows",
    "connection_event",
    "format_ns",
    "format_ts",
    "gap_event",
    "lookups_ok",
    "new_event_id",
    "now_ts",
    "refusal_event",
    "seal_event",
    "should_record",
    "sqlstate_ok",
    "start_event",
    "statement_event",
    "take_vouched",
    "utc_now",
    "validate_event",
]

#: ``reason`` of a statement that failed in PostgreSQL (its ``sqlstate`` says how).
FAILED_REASON: Final = "failed in PostgreSQL"

EventType = Literal["connection", "statement", "refusal", "gap", "seal", "start"]
ConnectionAction = Literal["authenticated", "auth_failed", "audit_started", "disconnected"]
SealReason = Literal["periodic", "rotation", "shutdown"]
StatementsMode = Literal["pii", "writes", "all"]

EVENT_TYPES: Final = frozenset({"connection", "statement", "refusal", "gap", "seal", "start"})
CONNECTION_ACTIONS: Final = frozenset({"authenticated", "auth_failed", "audit_started", "disconnected"})
SEAL_REASONS: Final = frozenset({"periodic", "rotation", "shutdown"})
#: Statement kinds that change data (``audit.statements: writes`` records them all).
WRITE_KINDS: Final = frozenset({"insert", "update", "delete", "merge", "copy", "truncate"})

#: Blind-index values are base64url keyed hashes. Anything else (an e-mail address, a
#: phone number, a short number) is refused, as a last line of defence against a
#: plaintext value ending up in ``lookups``.
LOOKUP_VALUE_PATTERN: Final = r"^[A-Za-z0-9_-]{16,128}\Z"
_LOOKUP_RE: Final = re.compile(LOOKUP_VALUE_PATTERN)
# Key ids join canonical names (no dots inside, even quoted) with dots: public.users.email.
_KEY_ID_RE: Final = re.compile(r"^[^.\x00]{1,63}(?:\.[^.\x00]{1,63}){1,3}$")
_KIND_RE: Final = re.compile(r"^[a-z][a-z_]{0,31}\Z")
_SQLSTATE_RE: Final = re.compile(r"^[0-9A-Z]{5}\Z")

#: Fields every session-bound event carries (``connection``, ``statement``, ``refusal``).
COMMON_FIELDS: Final = (
    "ts",
    "id",
    "type",
    "session",
    "user",
    "database",
    "application_name",
    "client",
    "worker",
)
#: Added by the chain; never present in an event handed to the log.
CHAIN_FIELDS: Final = ("seq", "chain", "prev", "mac")


class InvalidEventError(ValueError):
    """An event does not match the audit schema (unknown field, wrong type, ...)."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Who is on the other end of a session: copied into every event of the session.

    ``client`` is the peer address as text (``"10.0.0.7:51234"`` or a unix socket path);
    ``worker`` the proxy worker id (None with a single worker).
    """

    session: str
    user: str | None = None
    database: str | None = None
    application_name: str | None = None
    client: str | None = None
    worker: int | None = None


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_ts(when: datetime) -> str:
    """UTC ISO-8601 with microseconds and a ``Z``: ``2024-05-01T12:00:00.000123Z``."""
    if when.tzinfo is None:
        raise InvalidEventError("audit timestamps must be timezone-aware")
    if when.utcoffset():
        when = when.astimezone(UTC)
    return when.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# The current second, formatted once: (seconds since the epoch, "YYYY-MM-DDTHH:MM:SS.").
# One tuple, replaced whole, so a thread never sees a second with another's text.
_second: tuple[int, str] = (-1, "")


def now_ts() -> str:
    """``format_ts(utc_now())``, cheaply: the date and time are formatted once a second."""
    return format_ns(time.time_ns())


def format_ns(wall_ns: int) -> str:
    """``format_ts`` of a ``time.time_ns()`` value (the date and time formatted once a second)."""
    global _second
    sec, us = divmod(wall_ns // 1000, 1_000_000)
    cached = _second
    if cached[0] != sec:
        cached = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
        _second = cached
    return f"{cached[1]}{us:06d}Z"


def checked_duration(duration_ms: float) -> float:
    """A statement's duration as recorded: whole microseconds (they survive jsonb unchanged)."""
    if not 0.0 <= duration_ms < 1e12:  # also refuses NaN
        raise InvalidEventError("statement event: invalid value for field 'duration_ms'")
    return round(duration_ms * 1000.0) / 1000.0


def checked_rows(rows: int | None, sqlstate: str | None) -> int | None:
    """The rows recorded: none for a statement that failed (its SQLSTATE says how)."""
    if sqlstate is not None:
        if not sqlstate_ok(sqlstate):
            raise InvalidEventError("statement event: invalid value for field 'sqlstate'")
        return None
    if rows is not None and not (type(rows) is int and rows >= 0):
        raise InvalidEventError("statement event: invalid value for field 'rows'")
    return rows


def new_event_id() -> str:
    """A unique event id: 128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


class BuiltEvent(dict[str, Any]):
    """An event as a builder returned it: a ``dict`` that remembers being vouched for.

    A builder sets :attr:`vouched` when every argument it was given passed the checks of
    :func:`validate_event`; ``AuditLog.emit`` then skips validating it. Any change
    (``ev[k] = v``, ``del``, ``update``, ``pop``, ...) withdraws that, so an event
    changed after it was built is validated like any other dict. Once handed to
    ``emit`` it is frozen: changing it raises ``TypeError`` (the log holds it, unchanged,
    until it is written). Copies (``dict(ev)``, ``ev | {...}``, ``ev.copy()``) are
    plain dicts. Nested lists are not guarded: never edit a built event's insides.
    """

    __slots__ = ("_state",)

    _state: int  # _UNCHECKED, _VOUCHED or _FROZEN

    @property
    def vouched(self) -> bool:
        """Built from arguments that all passed validation, and unchanged since."""
        return getattr(self, "_state", _UNCHECKED) == _VOUCHED

    def _touch(self) -> None:
        if getattr(self, "_state", _UNCHECKED) == _FROZEN:
            raise TypeError("an audit event handed to AuditLog.emit() cannot be changed")
        self._state = _UNCHECKED

    def __setitem__(self, key: str, value: Any) -> None:
        self._touch()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._touch()
        dict.__delitem__(self, key)

    def __ior__(self, other: Any) -> BuiltEvent:  # type: ignore[override,misc]
        self._touch()
        dict.update(self, other)
        return self

    def clear(self) -> None:
        self._touch()
        dict.clear(self)

    def pop(self, *args: Any) -> Any:
        self._touch()
        return dict.pop(self, *args)

    def popitem(self) -> tuple[str, Any]:
        self._touch()
        return dict.popitem(self)

    def setdefault(self, *args: Any) -> Any:
        self._touch()
        return dict.setdefault(self, *args)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._touch()
        dict.update(self, *args, **kwargs)


_UNCHECKED: Final = 0
_VOUCHED: Final = 1
_FROZEN: Final = 2


def take_vouched(event: Mapping[str, Any]) -> bool:
    """For ``AuditLog.emit``: freeze ``event`` and say True if a builder vouched for it.

    An event vouched for is frozen, so that the log may keep it without a copy; a
    second ``emit`` of the same object gets False (and validates it).
    """
    if type(event) is BuiltEvent and getattr(event, "_state", _UNCHECKED) == _VOUCHED:
        event._state = _FROZEN
        return True
    return False


def _ms(value: float | None) -> float | None:
    # Rounded to microseconds (a whole number of thousandths: its repr has at most three
    # decimals), so that the value survives a round trip through jsonb unchanged.
    if value is None:
        return None
    v = float(value)
    if 0.0 <= v < 1e12:
        return round(v * 1000.0) / 1000.0  # round() to an int: much cheaper than round(v, 3)
    return round(v, 3)  # negative, huge, inf or nan: as it is (validation refuses the last)


# --------------------------------------------------------------------------- vouching
# What the builders check of their arguments: exactly what validate_event would check
# of the fields made from them (the fields a builder makes itself are right by
# construction). Strings that passed a pattern once are remembered (kinds, column key
# ids and SQLSTATEs repeat: they come from a few plans), in bounded sets.

_MEMO_MAX: Final = 4096
_kinds_ok: set[str] = set()
_key_ids_ok: set[str] = set()
_sqlstates_ok: set[str] = set()


def _matches(value: Any, pattern: re.Pattern[str], memo: set[str]) -> bool:
    if type(value) is not str:
        return False
    if value in memo:
        return True
    if pattern.match(value) is None:
        return False
    if len(memo) < _MEMO_MAX:
        memo.add(value)
    return True


def _info_ok(info: SessionInfo) -> bool:
    w = info.worker
    return (
        type(info.session) is str
        and (info.user is None or type(info.user) is str)
        and (info.database is None or type(info.database) is str)
        and (info.application_name is None or type(info.application_name) is str)
        and (info.client is None or type(info.client) is str)
        and (w is None or (type(w) is int and w >= 0))
    )


def _opt_count_ok(v: Any) -> bool:
    return v is None or (type(v) is int and v >= 0)


def _opt_ms_ok(v: float | None) -> bool:
    # _ms() made it a float (or None): finite and not negative.
    return v is None or 0.0 <= v < math.inf


def sqlstate_ok(v: Any) -> bool:
    """None, or a SQLSTATE: five digits or capital letters."""
    return v is None or _matches(v, _SQLSTATE_RE, _sqlstates_ok)


def _key_ids_ok_all(values: list[Any]) -> bool:
    memo = _key_ids_ok
    for x in values:
        if type(x) is not str or (x not in memo and not _matches(x, _KEY_ID_RE, memo)):
            return False
    return True


def lookups_ok(lookups: Mapping[Any, list[Any]]) -> bool:
    """Column key ids mapped to blind-index values (never anything shaped like PII)."""
    for k, vals in lookups.items():
        if not _matches(k, _KEY_ID_RE, _key_ids_ok):
            return False
        for x in vals:
            if type(x) is not str or _LOOKUP_RE.match(x) is None:
                return False
    return True


def _tables_ok(tables: list[Any]) -> bool:
    for x in tables:  # noqa: SIM110 - a plain loop: no generator on the hot path
        if type(x) is not str or not x:
            return False
    return True


_DECISIONS: Final = ("allow", "deny")


def _vouch(event: BuiltEvent, ok: bool) -> BuiltEvent:
    event._state = _VOUCHED if ok else _UNCHECKED
    return event


# --------------------------------------------------------------------------- builders


def connection_event(
    info: SessionInfo,
    *,
    action: ConnectionAction,
    tls: bool,
    duration_ms: float | None = None,
    bytes_in: int | None = None,
    bytes_out: int | None = None,
    statements: int | None = None,
    reason: str | None = None,
    sqlstate: str | None = None,
    ts: datetime | None = None,
) -> dict[str, Any]:
    """A connection event: ``authenticated``, ``auth_failed``, ``audit_started`` (a session
    opened before a reload turned the trail on, audited from then on) or ``disconnected``.

    Totals (``duration_ms``, ``bytes_in``, ``bytes_out``, ``statements``) belong to
    ``disconnected``; ``reason``/``sqlstate`` say why authentication failed or why the
    session ended (an error message from the server, never a value from a statement).
    """
    ms = _ms(duration_ms)
    # Keys in sorted order: the canonical serialization's sort is then a single pass.
    event = BuiltEvent(
        action=action,
        application_name=info.application_name,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        client=info.client,
        database=info.database,
        duration_ms=ms,
        id=os.urandom(16).hex(),
        reason=reason,
        session=info.session,
        sqlstate=sqlstate,
        statements=statements,
        tls=tls,
        ts=now_ts() if ts is None else format_ts(ts),
        type="connection",
        user=info.user,
        worker=info.worker,
    )
    return _vouch(
        event,
        _info_ok(info)
        and type(action) is str
        and action in CONNECTION_ACTIONS
        and type(tls) is bool
        and _opt_ms_ok(ms)
        and _opt_count_ok(bytes_in)
        and _opt_count_ok(bytes_out)
        and _opt_count_ok(statements)
        and (reason is None or type(reason) is str)
        and sqlstate_ok(sqlstate),
    )


def _statement(
    kind_of_event: Literal["statement", "refusal"],
    info: SessionInfo,
    kind: str,
    fingerprint: str,
    tables: Iterable[str],
    columns_read: Iterable[str],
    columns_written: Iterable[str],
    pii: Iterable[str] | None,
    masked: Iterable[str],
    lookups: Mapping[str, Iterable[str]] | None,
    rows: int | None,
    decision: Literal["allow", "deny"],
    reason: str | None,
    sqlstate: str | None,
    duration_ms: float | None,
    ts: datetime | None,
) -> dict[str, Any]:
    # Positional parameters: the builders call this on the session's path.
    read = list(columns_read)
    written = list(columns_written)
    if pii is not None:
        touched = list(pii)
    elif written:
        touched = sorted({*read, *written})
    else:
        touched = sorted(set(read)) if len(read) > 1 else list(read)
    if not lookups:
        looked: dict[str, list[str]] = {}
    elif len(lookups) == 1:
        looked = {k: list(v) for k, v in lookups.items()}
    else:
        looked = {k: list(lookups[k]) for k in sorted(lookups)}
    table_list = list(tables)
    masked_list = list(masked)
    ms = _ms(duration_ms)
    # Keys in sorted order: the canonical serialization's sort is then a single pass.
    event = BuiltEvent(
        application_name=info.application_name,
        client=info.client,
        columns_read=read,
        columns_written=written,
        database=info.database,
        decision=decision,
        duration_ms=ms,
        fingerprint=fingerprint,
        id=os.urandom(16).hex(),
        kind=kind,
        lookups=looked,
        masked=masked_list,
        pii=touched,
        reason=reason,
        rows=rows,
        session=info.session,
        sqlstate=sqlstate,
        tables=table_list,
        ts=now_ts() if ts is None else format_ts(ts),
        type=kind_of_event,
        user=info.user,
        worker=info.worker,
    )
    event._state = (
        _VOUCHED
        if (
            _info_ok(info)
            and _matches(kind, _KIND_RE, _kinds_ok)
            and type(fingerprint) is str
            and _tables_ok(table_list)
            and _key_ids_ok_all(read)
            and _key_ids_ok_all(written)
            and (pii is None or _key_ids_ok_all(touched))
            and _key_ids_ok_all(masked_list)
            and (not looked or lookups_ok(looked))
            and _opt_count_ok(rows)
            and (decision == "deny" if kind_of_event == "refusal" else decision in _DECISIONS)
            and (reason is None or type(reason) is str)
            and sqlstate_ok(sqlstate)
            and _opt_ms_ok(ms)
        )
        else _UNCHECKED
    )
    return event


def statement_event(
    info: SessionInfo,
    *,
    kind: str,
    fingerprint: str,
    tables: Iterable[str] = (),
    columns_read: Iterable[str] = (),
    columns_written: Iterable[str] = (),
    pii: Iterable[str] | None = None,
    masked: Iterable[str] = (),
    lookups: Mapping[str, Iterable[str]] | None = None,
    rows: int | None = None,
    decision: Literal["allow", "deny"] = "allow",
    reason: str | None = None,
    sqlstate: str | None = None,
    duration_ms: float | None = None,
    ts: datetime | None = None,
) -> dict[str, Any]:
    """A statement that ran (or failed in the server: pass its ``sqlstate``).

    ``fingerprint`` is the normalized text with literals removed; ``columns_*`` and
    ``pii`` are column key ids (``pii`` defaults to every column read or written);
    ``masked`` the columns read that the session's roles get masked (the policy's read
    decision ``mask``; the others read are revealed); ``lookups`` maps a column key id
    to the blind-index values the statement searched.
    """
    return _statement(
        "statement", info, kind, fingerprint, tables, columns_read, columns_written, pii,
        masked, lookups, rows, decision, reason, sqlstate, duration_ms, ts,
    )  # fmt: skip


def refusal_event(
    info: SessionInfo,
    *,
    kind: str,
    fingerprint: str,
    reason: str,
    sqlstate: str,
    tables: Iterable[str] = (),
    columns_read: Iterable[str] = (),
    columns_written: Iterable[str] = (),
    pii: Iterable[str] | None = None,
    masked: Iterable[str] = (),
    lookups: Mapping[str, Iterable[str]] | None = None,
    duration_ms: float | None = None,
    ts: datetime | None = None,
) -> dict[str, Any]:
    """A statement pgcloak refused (guard, unsupported operation, parse failure, audit down)."""
    return _statement(
        "refusal", info, kind, fingerprint, tables, columns_read, columns_written, pii,
        masked, lookups, None, "deny", reason, sqlstate, duration_ms, ts,
    )  # fmt: skip


def gap_event(
    *, count: int, worker: int | None, first_ts: datetime, last_ts: datetime
) -> dict[str, Any]:
    """``count`` events dropped (``on_full: drop``) between ``first_ts`` and ``last_ts``."""
    event: dict[str, Any] = {
        "ts": now_ts(),
        "id": new_event_id(),
        "type": "gap",
        "worker": worker,
        "reason": "queue_full",
        "count": count,
        "first_ts": format_ts(first_ts),
        "last_ts": format_ts(last_ts),
    }
    return event


def start_event(*, worker: int | None, follows: Mapping[str, Any]) -> dict[str, Any]:
    """The first record of a chain that continues a trail: the chain written there before
    it (``follows``: its id, last ``seq`` and last ``mac``). So a run of the proxy deleted
    whole from between two others is missing where ``verify`` looks for it."""
    event: dict[str, Any] = {
        "ts": now_ts(),
        "id": new_event_id(),
        "type": "start",
        "worker": worker,
        "follows": {"chain": follows["chain"], "seq": follows["seq"], "mac": follows["mac"]},
    }
    return event


def seal_event(*, reason: SealReason, count: int, worker: int | None) -> dict[str, Any]:
    """A seal: ``count`` records were chained since the previous seal of this chain."""
    event: dict[str, Any] = {
        "ts": now_ts(),
        "id": new_event_id(),
        "type": "seal",
        "worker": worker,
        "reason": reason,
        "count": count,
    }
    return event


def should_record(mode: StatementsMode, kind: str, touches_pii: bool) -> bool:
    """Whether ``audit.statements`` asks for an event for this (allowed) statement.

    Refusals and connection events are always recorded; this is only for statements.
    """
    if mode == "all" or touches_pii:
        return True
    return mode == "writes" and kind in WRITE_KINDS


# --------------------------------------------------------------------------- validation
# Straight-line checks: emit() validates every event on the session's path, so this
# stays a few microseconds (no strptime, no per-field closures).

_TS_RE: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
_OPTIONAL_TEXT: Final = ("user", "database", "application_name", "client")


class _Bad(Exception):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def _is_int(v: Any) -> bool:
    return type(v) is int


def _count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _opt_count(e: Mapping[str, Any], name: str) -> None:
    v = e[name]
    if v is not None and not (type(v) is int and v >= 0):
        raise _Bad(name)


def _opt_ms(e: Mapping[str, Any], name: str) -> None:
    v = e[name]
    if v is None:
        return
    if not (type(v) is int or (type(v) is float and math.isfinite(v))) or v < 0:
        raise _Bad(name)


def _opt_text(e: Mapping[str, Any], name: str) -> None:
    v = e[name]
    if v is not None and type(v) is not str:
        raise _Bad(name)


def _opt_sqlstate(e: Mapping[str, Any]) -> None:
    v = e["sqlstate"]
    if v is not None and (type(v) is not str or _SQLSTATE_RE.match(v) is None):
        raise _Bad("sqlstate")


def _ts(e: Mapping[str, Any], name: str) -> None:
    v = e[name]
    if type(v) is not str or _TS_RE.match(v) is None:
        raise _Bad(name)


def _key_ids(e: Mapping[str, Any], name: str) -> None:
    v = e[name]
    if type(v) is not list:
        raise _Bad(name)
    for x in v:
        if type(x) is not str or _KEY_ID_RE.match(x) is None:
            raise _Bad(name)


def _check_system(e: Mapping[str, Any]) -> None:
    _ts(e, "ts")
    v = e["id"]
    if type(v) is not str or not 0 < len(v) <= 64:
        raise _Bad("id")
    _opt_count(e, "worker")


def _check_session(e: Mapping[str, Any]) -> None:
    _check_system(e)
    if type(e["session"]) is not str:
        raise _Bad("session")
    for name in _OPTIONAL_TEXT:
        _opt_text(e, name)


def _check_connection(e: Mapping[str, Any]) -> None:
    _check_session(e)
    if e["action"] not in CONNECTION_ACTIONS:
        raise _Bad("action")
    if type(e["tls"]) is not bool:
        raise _Bad("tls")
    _opt_ms(e, "duration_ms")
    for name in ("bytes_in", "bytes_out", "statements"):
        _opt_count(e, name)
    _opt_text(e, "reason")
    _opt_sqlstate(e)


def _check_statement(e: Mapping[str, Any]) -> None:
    _check_session(e)
    v = e["kind"]
    if type(v) is not str or _KIND_RE.match(v) is None:
        raise _Bad("kind")
    if type(e["fingerprint"]) is not str:
        raise _Bad("fingerprint")
    v = e["tables"]
    if type(v) is not list or not all(type(x) is str and x for x in v):
        raise _Bad("tables")
    for name in ("columns_read", "columns_written", "pii", "masked"):
        _key_ids(e, name)
    v = e["lookups"]
    if type(v) is not dict:
        raise _Bad("lookups")
    for k, vals in v.items():
        if type(k) is not str or _KEY_ID_RE.match(k) is None or type(vals) is not list:
            raise _Bad("lookups")
        for x in vals:
            if type(x) is not str or _LOOKUP_RE.match(x) is None:
                raise _Bad("lookups")
    _opt_count(e, "rows")
    if e["decision"] not in ("allow", "deny"):
        raise _Bad("decision")
    _opt_text(e, "reason")
    _opt_sqlstate(e)
    _opt_ms(e, "duration_ms")


def _check_gap(e: Mapping[str, Any]) -> None:
    _check_system(e)
    if e["reason"] != "queue_full":
        raise _Bad("reason")
    if not (_is_int(e["count"]) and e["count"] >= 1):
        raise _Bad("count")
    _ts(e, "first_ts")
    _ts(e, "last_ts")


_MAC_RE: Final = re.compile(r"[0-9a-f]{64}")


def _check_start(e: Mapping[str, Any]) -> None:
    _check_system(e)
    follows = e["follows"]
    if not (
        type(follows) is dict
        and follows.keys() == {"chain", "seq", "mac"}
        and type(follows["chain"]) is str
        and 0 < len(follows["chain"]) <= 200
        and _is_int(follows["seq"])
        and follows["seq"] >= 1
        and type(follows["mac"]) is str
        and _MAC_RE.fullmatch(follows["mac"])
    ):
        raise _Bad("follows")


def _check_seal(e: Mapping[str, Any]) -> None:
    _check_system(e)
    if e["reason"] not in SEAL_REASONS:
        raise _Bad("reason")
    if not _count(e["count"]):
        raise _Bad("count")


_SYSTEM_FIELDS: Final = ("ts", "id", "type", "worker")
_STATEMENT_FIELDS: Final = (
    "kind",
    "fingerprint",
    "tables",
    "columns_read",
    "columns_written",
    "pii",
    "masked",
    "lookups",
    "rows",
    "decision",
    "reason",
    "sqlstate",
    "duration_ms",
)
#: The exact field set of each event type (before chaining).
EVENT_FIELDS: Final[dict[str, frozenset[str]]] = {
    "connection": frozenset(
        (
            *COMMON_FIELDS,
            "action",
            "tls",
            "duration_ms",
            "bytes_in",
            "bytes_out",
            "statements",
            "reason",
            "sqlstate",
        )
    ),
    "statement": frozenset((*COMMON_FIELDS, *_STATEMENT_FIELDS)),
    "refusal": frozenset((*COMMON_FIELDS, *_STATEMENT_FIELDS)),
    "gap": frozenset((*_SYSTEM_FIELDS, "reason", "count", "first_ts", "last_ts")),
    "seal": frozenset((*_SYSTEM_FIELDS, "reason", "count")),
    "start": frozenset((*_SYSTEM_FIELDS, "follows")),
}
_CHECKS: Final[dict[str, Callable[[Mapping[str, Any]], None]]] = {
    "connection": _check_connection,
    "statement": _check_statement,
    "refusal": _check_statement,
    "gap": _check_gap,
    "seal": _check_seal,
    "start": _check_start,
}


def validate_event(event: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidEventError` unless ``event`` has exactly its type's fields.

    Unknown fields are refused (the API has no place for a literal value), and so are
    the chain fields, which only the chain may set. Errors name the field, never the
    value (it might be the very thing being refused).
    """
    kind = event.get("type")
    fields = EVENT_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None or not isinstance(kind, str):
        raise InvalidEventError("unknown audit event type")
    if event.keys() != fields:
        extra = sorted(set(event) - fields)
        missing = sorted(fields - set(event))
        detail = []
        if extra:
            detail.append(f"unknown field(s) {', '.join(extra)}")
        if missing:
            detail.append(f"missing field(s) {', '.join(missing)}")
        raise InvalidEventError(f"{kind} event: {'; '.join(detail)}")
    try:
        _CHECKS[kind](event)
    except _Bad as bad:
        raise InvalidEventError(f"{kind} event: invalid value for field {bad.field!r}") from None
    if kind == "refusal" and event["decision"] != "deny":
        raise InvalidEventError("refusal event: decision must be 'deny'")
