"""AuditLog: the session-facing queue in front of a sink, and the task that drains it.

``emit()`` is synchronous and never waits: it appends the event to a bounded in-memory
queue (validating it first unless a builder of :mod:`pgcloak.audit.events` vouched for
it). One writer task takes queued events in batches, has them chained (seq, prev, HMAC)
and written, writes seals (periodic, rotation, shutdown), rotates files, and, while the
sink fails, retries it with exponential backoff and keeps records in a bounded spill
file, replayed in order once the sink is back (also at start, after a restart). File
and network IO happen in :mod:`pgcloak.audit.sinks`; this module only coordinates with
asyncio.

Cost on the event loop: ``emit()`` is an append. The writer lets a batch gather for
``linger`` seconds (default 50 ms) after the first event, less if ``batch_size`` events
are queued, the queue is full, or a flush or close is waiting; then it chains the batch
(seq, prev, HMAC) on the event loop, a few hundred records per turn of the loop, and
hands the lines to the sink, whose IO thread writes them in one trip. Chaining
is done on the loop because a second thread running Python competes for the GIL: the
event loop then waits for it whenever it wakes for IO, which cost sessions more than
the chaining itself (measured: bench/audit.py). Session statement events arrive as
:data:`~pgcloak.audit.templates.Completed` tuples (``emit_statement``): their static
fields were serialized once per session and plan, so queueing one is appending a tuple,
and chaining one is checking and filling in ten values and an HMAC. The price of
batching: an event waits up to ``linger`` in memory before it is written (what an fsync
interval of a second leaves at risk anyway is much more). The chain is one sequence:
only the writer task touches it.

Queue full: with ``on_full: block`` the event is still accepted and :attr:`AuditLog.full`
turns True until the writer drains below half the queue; the session should stop
reading from its client meanwhile (``await log.wait_for_room()``). With ``on_full:
drop`` the event is dropped and counted, and a ``gap`` record takes its place in the
chain, so ``verify`` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pgcloak import _native as native
from pgcloak.audit.chain import Chain, ChainedRecord, make_chain_id, tuple_run_end
from pgcloak.audit.events import (
    InvalidEventError,
    SealReason,
    gap_event,
    start_event,
    take_vouched,
    utc_now,
    validate_event,
)
from pgcloak.audit.sinks import Sink, SinkError, SpillError, SpillFile, make_sink, spill_path_for
from pgcloak.audit.templates import Completed
from pgcloak.policy import Audit

__all__ = ["AuditLog", "AuditMetrics"]

log = logging.getLogger("pgcloak.audit")

#: ``_wake_at`` while the writer is not waiting: emit() never wakes it.
_NEVER = 1 << 62
#: Records chained per turn of the event loop (a few hundred microseconds of work).
_CHAIN_SLICE = 128


class _Counted(Protocol):
    emitted: int


class _Count:
    __slots__ = ("emitted",)

    def __init__(self) -> None:
        self.emitted = 0


class AuditMetrics:
    """Counters (monotonic). ``written``/``spilled`` count records, seals and gaps included.

    ``emitted`` is kept where events are queued (the log's intake, which counts in C on
    its fast path): ``counted`` is that object, a plain counter by default."""

    __slots__ = ("_counted", "dropped", "lost", "replayed", "sink_errors", "spilled", "written")

    def __init__(self, counted: _Counted | None = None) -> None:
        self._counted: _Counted = counted if counted is not None else _Count()
        self.written = 0
        self.dropped = 0
        self.spilled = 0
        self.replayed = 0
        self.sink_errors = 0
        self.lost = 0

    @property
    def emitted(self) -> int:
        return self._counted.emitted

    @emitted.setter
    def emitted(self, value: int) -> None:
        self._counted.emitted = value

    def as_dict(self) -> dict[str, int]:
        return {
            "emitted": self.emitted,
            "written": self.written,
            "dropped": self.dropped,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "sink_errors": self.sink_errors,
            "lost": self.lost,
        }


class _Intake:
    """AuditLog's ``emit_statement``: the queue's usual case (room, and nobody to wake)
    inline, anything else to ``slow``. The reference of ``_chain_core.Intake``, which does
    the same without a Python frame per statement (tests/unit/test_audit_intake.py)."""

    __slots__ = ("append", "emitted", "fast_below", "queue", "slow")

    def __init__(self, queue: deque[Any], slow: Callable[[Any], None]) -> None:
        self.queue = queue
        self.append = queue.append
        self.slow = slow
        self.fast_below = 0
        self.emitted = 0

    def __call__(self, item: Any) -> None:
        if len(self.queue) < self.fast_below:
            self.emitted += 1
            self.append(item)
        else:
            self.slow(item)


_core: Any = native.load("pgcloak.audit._chain_core")
#: The intake AuditLog uses: C where built.
Intake: type[_Intake] = _core.Intake if _core is not None else _Intake


class _Gap:
    """Queue marker standing for events dropped at this point of the stream."""

    __slots__ = ("count", "first", "last")

    def __init__(self, when: datetime) -> None:
        self.count = 1
        self.first = self.last = when


#: What the queue and a batch hold: events, templated statement events, gap markers,
#: and (in a batch) seal reasons.
_Item = dict[str, Any] | Completed | _Gap | str


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AuditLog:
    """The audit trail of one worker: ``emit()`` events, the rest happens in the background.

    ``key`` is the audit HMAC key (``Keyring(master).audit_key()``); ``worker`` the
    worker id (None with a single worker; it goes into the chain id, the events'
    ``worker`` field is the session's). ``sink`` overrides the sink the policy names.
    ``linger``: seconds the writer lets a batch gather (see the module docstring).
    """

    def __init__(
        self,
        config: Audit,
        key: bytes,
        worker: int | None = None,
        *,
        sink: Sink | None = None,
        spill_path: Path | None = None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        close_timeout: float = 10.0,
        linger: float = 0.05,
    ) -> None:
        self.config = config
        self.worker = worker
        self.sink = sink if sink is not None else make_sink(config, worker)
        self.spill = SpillFile(
            spill_path or spill_path_for(self.sink, worker, config.spill_dir),
            config.spill_max_bytes,
        )
        self.chain = Chain(key, make_chain_id(worker), worker=worker)
        self.queue_size = config.queue_size
        self.low_water = config.queue_size // 2
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.close_timeout = close_timeout
        self.linger = linger
        self._drop = config.on_full == "drop"
        self._queue: deque[dict[str, Any] | Completed | _Gap] = deque()
        self._intake = Intake(self._queue, self._enqueue_carefully)
        self.metrics = AuditMetrics(self._intake)
        #: Queue an event (a vouched dict from emit(), or a templated statement a session
        #: completed: checked when it is chained, one that fails the checks logged without
        #: its values and counted as lost); never blocks. The intake takes the usual case
        #: (room in the queue, nobody to wake) itself, anything else _enqueue_carefully.
        self._enqueue: Callable[[dict[str, Any] | Completed], None] = self._intake
        self.emit_statement: Callable[[Completed], None] = self._intake
        #: True from the moment the queue reaches ``queue_size`` until it drains to half,
        #: only with ``on_full: block`` (with ``drop`` the session never needs to pause).
        #: An attribute, not a property: sessions read it after every chunk they forward.
        self.full = False
        self._room = asyncio.Event()
        self._room.set()
        # The writer waits on _waiter; emit() resolves it once the queue holds _wake_at.
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = _NEVER
        self._intake.fast_below = self.queue_size - 1
        self._batch_at = max(1, min(config.batch_size, config.queue_size))
        self._flushes = 0
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._close_deadline = 0.0
        #: False while the sink fails (records then wait in the spill file). An attribute,
        #: not a property: every PII statement reads it (on_audit_failure: refuse).
        self.healthy = True
        self._backoff = 0.0
        self._retry_at = 0.0
        self._replay_offset = 0
        self._next_seal = 0.0
        #: The chain's first record, naming the one before it (written before anything
        #: else, even a rotation seal due at once).
        self._first: dict[str, Any] | None = None
        self._warned_closed = False

    # ------------------------------------------------------------------ session side

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spill_bytes(self) -> int:
        """Bytes of records waiting in the spill file."""
        return self.spill.size

    @property
    def chain_id(self) -> str:
        return self.chain.chain_id

    def emit(self, event: Mapping[str, Any]) -> None:
        """Queue an event built by :mod:`pgcloak.audit.events`; never blocks.

        Raises :class:`~pgcloak.audit.events.InvalidEventError` for an event that is not
        exactly one of the audit schemas (unknown fields are refused). An event a
        builder vouched for (and nobody changed since) is taken as it is, and frozen;
        any other mapping is validated and copied.
        """
        if not take_vouched(event):
            validate_event(event)
            event = dict(event)
        self._enqueue(event)  # type: ignore[arg-type]  # a dict: a BuiltEvent or a copy

    def _enqueue_carefully(self, item: dict[str, Any] | Completed) -> None:
        """``_enqueue`` when the log is closing, the queue is (nearly) full, or the writer
        waits for this event."""
        self._intake.emitted += 1
        if self._closing:
            self.metrics.dropped += 1
            if not self._warned_closed:
                self._warned_closed = True
                log.warning("audit event emitted after the audit log was closed; dropped")
            return
        queue = self._queue
        if self._drop and len(queue) >= self.queue_size:
            self.metrics.dropped += 1
            now = utc_now()
            last = queue[-1] if queue else None
            if isinstance(last, _Gap):
                last.count += 1
                last.last = now
            else:
                queue.append(_Gap(now))  # one marker past the bound, then counted in it
            return
        queue.append(item)
        depth = len(queue)
        if depth >= self.queue_size and not self.full and not self._drop:
            self.full = True
            self._room.clear()
            self._wake()
        if depth >= self._wake_at:
            self._wake()

    def _set_wake_at(self, depth: int) -> None:
        """Wake the writer once the queue holds ``depth`` events; ``_enqueue`` takes its fast
        path while the queue stays below that and below ``queue_size`` (never while closing)."""
        self._wake_at = depth
        self._intake.fast_below = 0 if self._closing else min(depth, self.queue_size) - 1

    async def wait_for_room(self) -> None:
        """Return once the queue is no longer full (at once if it is not)."""
        if self.full:
            await self._room.wait()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the sink and spill, start the writer; a leftover spill is replayed first.

        A sink that cannot be opened is not an error here: the log starts unhealthy and
        keeps retrying.
        """
        if self._task is not None:
            raise RuntimeError("AuditLog already started")
        await self.spill.open()
        if self.spill.has_data:
            log.info(
                "audit spill file found; replaying it first",
                extra={"file": str(self.spill.path), "bytes": self.spill.size},
            )
        try:
            await self.sink.open()
        except Exception as exc:  # any sink failure: spill and retry
            self._fail(exc)
        last = await self._predecessor()
        if last is not None:  # the new chain's first record names the one before it
            start = start_event(worker=self.worker, follows={"chain": last.chain, "seq": last.seq, "mac": last.mac})
            try:
                validate_event(start)
            except InvalidEventError:  # a last line that only looks like a record
                log.warning("audit trail: the last record before this start is malformed; the new chain will not name it")
            else:
                self._first = start
        self._next_seal = time.monotonic() + self.config.seal_interval
        self._task = asyncio.create_task(self._run(), name="pgcloak-audit-writer")

    async def _predecessor(self) -> ChainedRecord | None:
        """The last record written before this trail started: in the spill if records
        wait there (they come after what the sink holds), else the sink's own last. None
        unless the sink can tell (a file sink nobody else is writing to)."""
        if not self.sink.links:
            return None
        try:
            last = await self.spill.last_record()
            if last is None:
                last = await self.sink.last_record()
        except Exception as exc:  # unreadable: the new chain just names no predecessor
            log.warning(
                "audit trail: the last record before this start cannot be read; the new chain "
                "will not name the one before it",
                extra={"sink": self.sink.description, "error": str(exc)},
            )
            return None
        if last is None or last.chain == self.chain.chain_id:
            return None
        return last

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued event has been handed to the sink or the spill."""
        async with asyncio.timeout(timeout):
            self._flushes += 1  # the writer does not linger meanwhile
            try:
                while self._queue or not self._idle.is_set():
                    if self._task is None or self._task.done():
                        return
                    self._idle.clear()
                    self._wake()
                    await self._idle.wait()
            finally:
                self._flushes -= 1
            await self.sink.sync(force=True)

    async def aclose(self) -> None:
        """Write what is queued and a shutdown seal, then close the sink.

        If the sink is down, the records go to the spill file (replayed by the next
        start). Gives up after ``close_timeout`` seconds if even the spill cannot take
        them (counted in ``metrics.lost``).
        """
        if self._closed:
            return
        self._closing = True
        self._intake.fast_below = 0
        self._close_deadline = time.monotonic() + self.close_timeout
        self._wake()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # already logged by the writer
                pass
            finally:
                self._closed = True
                with contextlib.suppress(Exception):
                    await self.sink.close()
                await self.spill.close()
        self._closed = True
        self._room.set()

    # ------------------------------------------------------------------ writer

    def _wake(self) -> None:
        """Wake the writer if it waits (for events, a batch, or the next housekeeping)."""
        self._set_wake_at(_NEVER)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _nap(self, timeout: float, wake_at: int) -> None:
        """Wait ``timeout`` seconds, or until the queue holds ``wake_at`` or ``_wake()``."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._set_wake_at(wake_at)
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._set_wake_at(_NEVER)

    def _urgent(self) -> bool:
        return self._closing or self.full or self._flushes > 0

    def _take(self, limit: int) -> list[_Item]:
        queue = self._queue
        items: list[_Item]
        if len(queue) <= limit:
            items = list(queue)
            queue.clear()
        else:
            popleft = queue.popleft
            items = [popleft() for _ in range(limit)]
        if self.full and len(queue) <= self.low_water:
            self.full = False
            self._room.set()
        return items

    def _chain_into(self, items: list[_Item], out: list[ChainedRecord]) -> None:
        """Chain ``items`` in order (on the event loop; see :meth:`_chain`): runs of queued
        statements (the usual batch holds nothing else) in one call."""
        chain, append = self.chain, out.append
        start = 0
        while start < len(items):
            stop = tuple_run_end(items, start)
            if stop > start:
                run = items if stop - start == len(items) else items[start:stop]  # (the usual: all)
                refused = chain.append_completed_many(run, out)  # type: ignore[arg-type]
                for exc in refused:
                    self._rejected(exc)
                if stop == len(items):
                    return
            item = items[stop]
            start = stop + 1
            try:
                if isinstance(item, dict):
                    append(chain.append(item))
                elif isinstance(item, _Gap):
                    event = gap_event(
                        count=item.count, worker=self.worker, first_ts=item.first, last_ts=item.last
                    )
                    append(chain.append(event))
                else:
                    reason: SealReason = item  # type: ignore[assignment]
                    append(chain.seal(reason))
            except (TypeError, ValueError, RecursionError) as exc:
                # Validated events serialize; only text that is not Unicode (a lone
                # surrogate) gets here. Never the value in the message.
                self.metrics.lost += 1
                log.error(
                    "audit event cannot be serialized; dropped",
                    extra={"error": type(exc).__name__},
                )

    def _rejected(self, exc: Exception) -> None:
        """A statement left out of the chain, logged and counted: its values failed the
        builder's checks (the message names the field, never the value), or its text is
        not Unicode (a lone surrogate: the message would quote it, so it is not logged)."""
        self.metrics.lost += 1
        if isinstance(exc, InvalidEventError):
            log.error("audit event rejected", extra={"error": type(exc).__name__, "detail": str(exc)})
        else:
            log.error("audit event cannot be serialized; dropped", extra={"error": type(exc).__name__})

    async def _chain(self, items: list[_Item]) -> list[ChainedRecord]:
        """Chain a batch on the loop, a slice per turn, so sessions run in between."""
        out: list[ChainedRecord] = []
        for start in range(0, len(items), _CHAIN_SLICE):
            if start:
                await asyncio.sleep(0)
            self._chain_into(items[start : start + _CHAIN_SLICE], out)
        return out

    def _timeout(self) -> float:
        now = time.monotonic()
        wake = min(self._next_seal, now + 1.0)
        if self.config.fsync == "interval":
            wake = min(wake, now + self.config.fsync_interval)
        if not self.healthy or self.spill.has_data:
            wake = min(wake, max(self._retry_at, now + 0.01))
        return max(0.005, wake - now)

    async def _run(self) -> None:
        batch = self.config.batch_size
        queue = self._queue
        try:
            if self._first is not None:
                first, self._first = self._first, None
                await self._deliver([first])
            while True:
                if not queue:
                    if self._closing:
                        break
                    self._idle.set()
                    await self._nap(self._timeout(), 1)
                    self._idle.clear()
                if queue and len(queue) < self._batch_at and not self._urgent():
                    # Let a batch gather: one trip to the IO thread for many events.
                    await self._nap(self.linger, self._batch_at)
                await self._housekeeping()
                items = self._take(batch)
                if items:
                    await self._deliver(items)
            await self._deliver(["shutdown"])
            try:
                await self.sink.sync(force=True)
            except Exception as exc:  # any sink failure: spill and retry
                self._fail(exc)
        except Exception:
            log.exception("audit writer crashed")
            self.healthy = False
            raise
        finally:
            self._idle.set()

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if (self.spill.has_data or not self.healthy) and now >= self._retry_at:
            try:
                if self.spill.has_data:
                    await self._replay()
                else:
                    await self.sink.open()  # probe a sink that failed to open or sync
                self._ok()
            except Exception as exc:  # any sink failure: spill and retry
                self._fail(exc)
        if now >= self._next_seal:
            self._next_seal = now + self.config.seal_interval
            await self._deliver(["periodic"])
        if self.healthy and not self.spill.has_data and self.sink.rotation_due():
            await self._deliver(["rotation"])
            if self.healthy and not self.spill.has_data:
                try:
                    await self.sink.rotate()
                except Exception as exc:  # any sink failure: spill and retry
                    self._fail(exc)
                else:
                    # The new file starts with a record naming where the chain left the last
                    # one: verify --partial (old files deleted by retention) then accepts a
                    # chain that starts there, and only there.
                    chain = self.chain
                    here = {"chain": chain.chain_id, "seq": chain.next_seq - 1, "mac": chain.prev}
                    await self._deliver([start_event(worker=self.worker, follows=here)])
        if self.healthy:
            try:
                await self.sink.sync()
            except Exception as exc:  # any sink failure: spill and retry
                self._fail(exc)

    async def _deliver(self, items: list[_Item]) -> None:
        """Chain ``items`` and hand the records to the sink, or to the spill while the sink
        fails; keep order. The records are made once, then kept until one of them takes
        them."""
        records = await self._chain(items)

        while True:
            if time.monotonic() >= self._retry_at or (self.healthy and not self.spill.has_data):
                try:
                    if self.spill.has_data:
                        await self._replay()
                    await self.sink.write(records)
                    self.metrics.written += len(records)
                    self._ok()
                    return
                except Exception as exc:  # any sink failure: spill and retry
                    self._fail(exc)
            try:
                await self.spill.append(records)
                self.metrics.spilled += len(records)
                return
            except SpillError as exc:
                now = time.monotonic()
                if self._closing and now >= self._close_deadline:
                    lost = len(records)
                    self.metrics.lost += lost
                    log.error(
                        "audit records lost at shutdown: the sink and the spill file both fail",
                        extra={"records": lost, "error": str(exc)},
                    )
                    return
                log.warning("audit spill unavailable; holding records", extra={"error": str(exc)})
                await asyncio.sleep(max(0.01, min(self._retry_at - now, 1.0)))

    async def _replay(self) -> None:
        """Write the spill to the sink in order, skipping what the sink already holds."""
        batch = self.config.batch_size
        stored: dict[str, int] = {}
        asked: set[str] = set()
        while True:
            try:
                records, offset = await self.spill.read(self._replay_offset, batch)
            except SpillError as exc:
                raise SinkError(str(exc)) from exc
            if not records:
                if offset == self._replay_offset:
                    break
                self._replay_offset = offset
                continue
            chains = {r.chain for r in records} - asked
            if chains:
                stored.update(await self.sink.last_seqs(chains))
                asked |= chains
            todo = [r for r in records if r.seq > stored.get(r.chain, 0)]
            if todo:
                await self.sink.write(todo)
                self.metrics.written += len(todo)
                self.metrics.replayed += len(todo)
            self._replay_offset = offset
        try:
            await self.spill.clear()
        except SpillError as exc:
            raise SinkError(str(exc)) from exc
        self._replay_offset = 0
        log.info("audit spill replayed", extra={"sink": self.sink.description})

    def _fail(self, exc: BaseException) -> None:
        self.metrics.sink_errors += 1
        self._backoff = (
            self.retry_initial if self.healthy else min(self.retry_max, self._backoff * 2)
        )
        self._retry_at = time.monotonic() + self._backoff
        if self.healthy:
            log.warning(
                "audit sink failing; spilling records",
                extra={"sink": self.sink.description, "error": str(exc)},
                exc_info=not isinstance(exc, SinkError),
            )
        self.healthy = False

    def _ok(self) -> None:
        if not self.healthy:
            log.info("audit sink recovered", extra={"sink": self.sink.description})
        self.healthy = True
        self._backoff = 0.0
        self._retry_at = 0.0
