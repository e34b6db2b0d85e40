"""The hash chain: sequence numbers and HMACs that make the audit trail tamper-evident.

Pure (no IO). Every record of a chain carries

* ``chain``: the chain id (one per worker and process start),
* ``seq``: 1, 2, 3, ... within the chain,
* ``prev``: the previous record's ``mac`` (:data:`GENESIS` for ``seq`` 1),
* ``mac``: ``HMAC-SHA256(audit key, canonical(record without "mac"))`` in hex,

where ``canonical`` is ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()``. Editing a record breaks its ``mac``; deleting,
inserting or moving one breaks ``seq``/``prev`` of its neighbours, and nobody without
the key can compute a matching ``mac``. A written line is that canonical form with
``"mac"`` appended as the last member (one serialization per record; verifiers parse
the JSON, so member order does not matter to them).

:meth:`Chain.append` produces exactly those bytes, only faster than ``json.dumps``: it
calls the C encoder that ``json.dumps`` itself uses, with the same settings, built
once (no ``JSONEncoder`` per call, no circular-reference bookkeeping: a record that
nests into itself falls back to ``json.dumps``, which refuses it), and an HMAC whose
key schedule is computed once per chain. (The builders insert an event's keys in
sorted order, so the encoder's sort is a single pass.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import json.encoder
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn

from pgcloak import _native as native
from pgcloak.audit.events import (
    CHAIN_FIELDS,
    FAILED_REASON,
    InvalidEventError,
    SealReason,
    _key_ids_ok,
    lookups_ok,
    seal_event,
    sqlstate_ok,
    utc_now,
)

if TYPE_CHECKING:
    from pgcloak.audit.templates import Completed, PendingStatement

__all__ = [
    "FAILED_REASON_JSON",
    "GENESIS",
    "MIN_KEY_BYTES",
    "Chain",
    "ChainedRecord",
    "canonical",
    "compute_mac",
    "json_string",
    "lookups_json",
    "mac_ok",
    "make_chain_id",
    "serialize",
    "tuple_run_end",
]

#: ``prev`` of the first record of every chain.
GENESIS: Final = "0" * 64
MIN_KEY_BYTES: Final = 16


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The byte string the MAC covers (and the form a record is written in)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _unserializable(o: object) -> NoReturn:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _make_fast_encoder() -> Callable[[Mapping[str, Any]], str]:
    """``canonical(obj).decode()``, by the C encoder ``json.dumps`` runs, set up once."""
    make: Any = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the _json accelerator
        return lambda obj: canonical(obj).decode("utf-8")
    # The arguments json.JSONEncoder.iterencode passes for sort_keys=True,
    # separators=(",", ":"), ensure_ascii=False, allow_nan=False; markers None: no
    # circular-reference check (a cycle recurses until RecursionError; see serialize).
    encoder = make(
        None, _unserializable, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
    join = "".join

    def encode(obj: Mapping[str, Any]) -> str:
        return join(encoder(obj, 0))

    return encode


_fast_encode: Final = _make_fast_encoder()
#: JSON text of a str as the canonical encoder writes it (ensure_ascii=False).
json_string: Final[Callable[[str], str]] = json.encoder.encode_basestring


def serialize(record: Mapping[str, Any]) -> str:
    """``canonical(record)`` as text."""
    try:
        return _fast_encode(record)
    except RecursionError:
        return canonical(record).decode("utf-8")  # raises ValueError for a cycle


#: Column key ids as JSON text (a few per policy).
_KEY_JSON: dict[str, str] = {}


def lookups_json(lookups: dict[str, list[str]]) -> str:
    """``serialize(lookups)`` of checked lookups, the usual one column by hand: its values
    are blind-index values (base64url: nothing to escape), its key is memoized."""
    if len(lookups) != 1:
        return serialize(lookups)
    ((key, values),) = lookups.items()
    if not values:  # joined, no values would read as one empty string
        return serialize(lookups)
    quoted = _KEY_JSON.get(key)
    if quoted is None:
        if len(_KEY_JSON) >= 4096:
            _KEY_JSON.clear()
        quoted = _KEY_JSON[key] = json_string(key)
    return "{" + quoted + ':["' + '","'.join(values) + '"]}'


#: ``reason`` of a statement that failed in PostgreSQL, as JSON text.
FAILED_REASON_JSON: Final = json_string(FAILED_REASON)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the audit key must be at least {MIN_KEY_BYTES} bytes")
    return bytes(key)


def compute_mac(key: bytes, record: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) of ``record`` without its ``mac`` field."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, record: Mapping[str, Any]) -> bool:
    """Whether ``record["mac"]`` is the MAC of the rest of ``record`` (constant time)."""
    mac = record.get("mac")
    if not isinstance(mac, str):
        return False
    try:
        expected = compute_mac(key, record)
        # compare_digest refuses a str that is not ASCII (TypeError): not our MAC either.
        return hmac.compare_digest(expected, mac)
    except (TypeError, ValueError, RecursionError):  # not JSON-serializable, NaN, lone
        return False  # surrogate, nested deeper than the encoder goes


def make_chain_id(worker: int | None, started: datetime | None = None) -> str:
    """``w<worker>-<UTC start>-<random>``, e.g. ``w0-20240501T120000.123456Z-3fa9c2``."""
    when = (started or utc_now()).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"w{worker if worker is not None else 0}-{when}-{secrets.token_hex(3)}"


class _Fields:
    """ChainedRecord's fields where the C loop is not built (its ``Record`` type otherwise)."""

    __slots__ = ("_line", "_record", "chain", "data", "mac", "seq", "ts", "type")
    data: bytes
    seq: int
    chain: str
    mac: str
    ts: str
    type: str
    _line: str | None
    _record: dict[str, Any] | None


_core: Any = native.load("pgcloak.audit._chain_core")  # None: the Python loop, the same bytes

#: Whether the chain runs its per-event loop in C (pgcloak/audit/_chain_core.c).
ACCELERATED: Final = _core is not None
if TYPE_CHECKING:
    _RecordBase = _Fields
else:
    _RecordBase = _core.Record if _core is not None else _Fields


class ChainedRecord(_RecordBase):
    """One chained record: its line (JSON, no newline) and what sinks index it by.

    ``data`` is the line as the file sinks write it (UTF-8, newline included): chaining
    encodes the text anyway for its MAC, so the sinks need not encode a batch again.
    ``line`` (the text) and ``record`` (the parsed dict) are made on first use:
    templated statement records are rendered straight to bytes, and only a sink that
    stores fields (none on the hot path) or a test ever asks for them.
    """

    __slots__ = ()

    def __init__(
        self,
        line: str | None,
        seq: int,
        chain: str,
        mac: str,
        ts: str,
        type: str,
        record: dict[str, Any] | None = None,
        data: bytes | None = None,
    ) -> None:
        if data is None:
            if line is None:
                raise ValueError("a chained record needs its line or its data")
            data = (line + "\n").encode("utf-8")
        self.data = data
        self._line = line
        self.seq = seq
        self.chain = chain
        self.mac = mac
        self.ts = ts
        self.type = type
        self._record = record

    @property
    def line(self) -> str:
        line = self._line
        if line is None:
            line = self._line = self.data[:-1].decode("utf-8")
        return line

    @property
    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = json.loads(self.line)
        return self._record

    @classmethod
    def from_line(cls, line: str) -> ChainedRecord:
        """Parse a line written earlier (e.g. from a spill file); raises ValueError."""
        record = json.loads(line)
        if not isinstance(record, dict) or any(f not in record for f in CHAIN_FIELDS):
            raise ValueError("not a chained audit record")
        return cls._of(record, line.rstrip("\n"))

    @classmethod
    def _of(cls, record: dict[str, Any], line: str) -> ChainedRecord:
        return cls(
            line,
            seq=record["seq"],
            chain=record["chain"],
            mac=record["mac"],
            ts=str(record.get("ts", "")),
            type=str(record.get("type", "")),
            record=record,
        )


class _EventIds:
    """Random 128-bit event ids (32 hex digits), drawn from the OS a few thousand at a time."""

    __slots__ = ("pool", "pos")

    def __init__(self) -> None:
        self.pool = ""
        self.pos = 0

    @staticmethod
    def draw() -> str:
        """256 ids' worth of hex digits."""
        return os.urandom(16 * 256).hex()

    def next(self) -> str:
        pos = self.pos
        if pos >= len(self.pool):
            self.pool = self.draw()
            pos = 0
        self.pos = pos + 32
        return self.pool[pos : pos + 32]


class Chain:
    """The state of one chain: assigns ``seq``/``chain``/``prev``/``mac`` in order.

    Not thread-safe; one writer owns a chain. ``since_seal`` counts the records chained
    since the last seal, which the next seal reports as ``count``.
    """

    def __init__(
        self,
        key: bytes,
        chain_id: str,
        *,
        worker: int | None = None,
        next_seq: int = 1,
        prev: str = GENESIS,
    ) -> None:
        self._key = _check_key(key)
        # HMAC (RFC 2104) from two SHA-256 states keyed once, copied for each record:
        # the same MAC as hmac.new(key, text, sha256), without its Python wrapper.
        block = (hashlib.sha256(self._key).digest() if len(self._key) > 64 else self._key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block)).copy
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block)).copy
        #: The same MAC for the C loop (None without it).
        self._hmac = _core.Hmac(self._key) if _core is not None else None
        self.chain_id = chain_id
        self.worker = worker
        self.next_seq = next_seq
        self.prev = prev
        self.since_seal = 0
        self._chain_json = json_string(chain_id)
        self._ids = _EventIds()

    def append(self, event: Mapping[str, Any]) -> ChainedRecord:
        """Chain ``event`` (which must not carry chain fields) and return the record.

        ``event`` is not modified. Raises ``ValueError``/``TypeError`` for an event that
        cannot be serialized (NaN, a lone surrogate, a cycle, an unknown type); the chain
        is then unchanged.
        """
        if "seq" in event or "chain" in event or "prev" in event or "mac" in event:
            raise ValueError("an event handed to the chain must not carry chain fields")
        record = dict(event)
        record["seq"] = self.next_seq
        record["chain"] = self.chain_id
        record["prev"] = self.prev
        text = serialize(record)
        mac = self._mac(text)
        record["mac"] = mac
        line = text[:-1] + ',"mac":"' + mac + '"}'
        self.next_seq += 1
        self.prev = mac
        if record.get("type") == "seal":
            self.since_seal = 0
        else:
            self.since_seal += 1
        return ChainedRecord._of(record, line)

    def append_pending(self, pending: PendingStatement) -> ChainedRecord:
        """Chain a templated statement event (what ``append`` would make of its dict)."""
        seq = self.next_seq
        text = pending.render(seq, self._chain_json, self.prev, self._ids.next())
        return self._chained(seq, text, pending.ts)

    def append_completed(self, item: Completed) -> ChainedRecord:
        """Chain one statement a session queued (see :meth:`append_completed_many`).
        Raises what refused it (the chain is then unchanged)."""
        out: list[ChainedRecord] = []
        refused = self.append_completed_many((item,), out)
        if refused:
            raise refused[0]
        return out[0]

    def append_completed_many(self, items: Iterable[Completed], out: list[ChainedRecord]) -> list[Exception]:
        """Chain statements sessions queued (:data:`~pgcloak.audit.templates.Completed`),
        in order, onto ``out``; return why those refused were (left out of the chain).

        In C where it is built (:data:`ACCELERATED`), for the plain case (the usual item):
        an item it does not take, it hands back, and :meth:`_completed_in_python`, the
        reference, chains that one. Both write the same bytes
        (tests/unit/test_audit_chain_core.py).
        """
        if _core is None or type(items) is not list or type(out) is not list:
            return self._completed_in_python(items, out)  # (the writer's are lists)
        batch = items
        refused: list[Exception] = []
        done, count = 0, len(batch)
        while True:
            done = _core.chain_completed(self, batch, done, out, refused)
            if done >= count:
                return refused
            refused += self._completed_in_python(batch[done : done + 1], out)
            done += 1

    def _completed_in_python(self, items: Iterable[Completed], out: list[ChainedRecord]) -> list[Exception]:
        """Chain statements sessions queued (:data:`~pgcloak.audit.templates.Completed`),
        in order, onto ``out``; return why those refused were (left out of the chain).

        This is the trail's per-event work, so it is one loop with everything inline. Each
        item's values are checked as :func:`~pgcloak.audit.events.statement_event` checks
        them (blind-index lookups, a duration, a row count, a SQLSTATE: a value that
        fails refuses its item with an :class:`~pgcloak.audit.events.InvalidEventError`,
        never written), then its template's slots are filled in canonical order (what
        :meth:`append` makes of the equivalent dict, byte for byte:
        tests/unit/test_audit_templates.py) and the text MACed once encoded. Text that
        cannot be encoded (a lone surrogate from undecodable statement text) refuses its
        item with the ``UnicodeEncodeError``, anything malformed with its ``TypeError``;
        either way the chain goes on from the last record chained.
        """
        refused: list[Exception] = []
        seq = first = self.next_seq
        prev = self.prev
        chain_json, chain_id = self._chain_json, self.chain_id
        inner_state, outer_state = self._inner, self._outer
        ids = self._ids
        pool, pos = ids.pool, ids.pos
        second: int | None = None  # no second formatted yet (-1 is one: 1969-12-31T23:59:59)
        second_text = ""
        append, join = out.append, "".join
        try:
            for item in items:
                try:
                    template, lookups, started, ended, wall_ns, rows, sqlstate = item
                    if not lookups:
                        found = "{}"
                    elif lookups_ok(lookups):
                        found = lookups_json(lookups)
                    else:
                        raise InvalidEventError("statement event: invalid value for field 'lookups'")
                    ms = (ended - started) * 1000.0
                    if not 0.0 <= ms < 1e12:  # also refuses NaN
                        raise InvalidEventError("statement event: invalid value for field 'duration_ms'")
                    if sqlstate is None:
                        if rows is None:
                            counted = "null"
                        elif type(rows) is int and rows >= 0:
                            counted = str(rows)
                        else:
                            raise InvalidEventError("statement event: invalid value for field 'rows'")
                        state = reason = "null"
                    elif sqlstate_ok(sqlstate):
                        counted, state, reason = "null", '"' + sqlstate + '"', FAILED_REASON_JSON  # failed: no rows
                    else:
                        raise InvalidEventError("statement event: invalid value for field 'sqlstate'")
                    us = wall_ns // 1000
                    sec = us // 1_000_000
                    if sec != second:  # the date and time formatted once a second
                        second, second_text = sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
                    ts = f"{second_text}{us - sec * 1_000_000:06d}Z"
                    if pos >= len(pool):
                        pool, pos = _EventIds.draw(), 0
                    t = template.parts
                    text = join(
                        (
                            t[0], chain_json,
                            t[1], repr(round(ms * 1000.0) / 1000.0),  # whole microseconds
                            t[2], pool[pos : pos + 32],
                            t[3], found,
                            t[4], prev,
                            t[5], reason,
                            t[6], counted,
                            t[7], str(seq),
                            t[8], state,
                            t[9], ts,
                            t[10],
                        )
                    )  # fmt: skip
                    pos += 32
                    encoded = text.encode("utf-8")
                except (TypeError, ValueError, AttributeError, OverflowError) as exc:
                    refused.append(exc)
                    continue
                inner = inner_state()
                inner.update(encoded)
                outer = outer_state()
                outer.update(inner.digest())
                prev = outer.hexdigest()
                data = b"".join((encoded[:-1], b',"mac":"', prev.encode("ascii"), b'"}\n'))
                append(ChainedRecord(None, seq, chain_id, prev, ts, "statement", None, data))
                seq += 1
        finally:
            # Also if something unforeseen raised: the chain is where ``out`` ends.
            ids.pool, ids.pos = pool, pos
            self.since_seal += seq - first
            self.next_seq = seq
            self.prev = prev
        return refused

    def _chained(self, seq: int, text: str, ts: str) -> ChainedRecord:
        mac = self._mac(text)
        self.next_seq = seq + 1
        self.prev = mac
        self.since_seal += 1
        line = text[:-1] + ',"mac":"' + mac + '"}'
        return ChainedRecord(line, seq, self.chain_id, mac, ts, "statement")

    def _mac(self, text: str) -> str:
        inner = self._inner()
        inner.update(text.encode("utf-8"))
        outer = self._outer()
        outer.update(inner.digest())
        return outer.hexdigest()

    def seal(self, reason: SealReason) -> ChainedRecord:
        """Append a seal record (``periodic``, ``rotation`` or ``shutdown``)."""
        return self.append(seal_event(reason=reason, count=self.since_seal, worker=self.worker))


def _tuple_run_end(items: list[Any], start: int) -> int:
    """The index of the first item of ``items`` at or after ``start`` that is not a tuple
    (``len(items)`` if none is): where a run of queued statements ends. In C where built."""
    if start < 0:
        raise ValueError("start must not be negative")
    stop = start
    while stop < len(items) and type(items[stop]) is tuple:
        stop += 1
    return min(stop, len(items))


tuple_run_end: Callable[[list[Any], int], int] = _tuple_run_end

if _core is not None:
    _core.configure(ChainedRecord, InvalidEventError, _key_ids_ok, _KEY_JSON, FAILED_REASON_JSON)
    tuple_run_end = _core.tuple_run_end
