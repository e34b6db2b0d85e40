"""Micro-benchmark of the audit trail: what one event costs, from emit() to written.

Prints microseconds per event; never asserts anything about the timings and always
exits 0. On a shared, noisy machine run it a few times and keep the best of each line.

    python bench/audit_micro.py                  # every case
    python bench/audit_micro.py --events 50000   # longer end-to-end runs
    python bench/audit_micro.py --only e2e       # cases whose name contains "e2e"

Cases (the event is the PII workload's: a statement event of a lookup by e-mail, as
``SessionAudit`` makes it):

    completed          the (template, lookups, started, ended, time_ns(), rows, sqlstate) tuple
                       a session queues per completed statement (the template is made once
                       per session and plan)
    chain.completed    Chain.append_completed (one item through the writer's batch loop,
                       append_completed_many): the values checked, the template's slots
                       filled, HMAC (on the loop, in the writer's batches)
    chain.batch        Chain.append_completed_many over a batch of 1000, as the writer
                       chains: per event
    build              statement_event(...): the dict builder (refusals; plans whose events
                       cannot be templated)
    validate           validate_event(event): what emit() spends on a dict no builder vouched for
    emit.vouched       AuditLog.emit of a built event
    emit.plain         AuditLog.emit of a plain dict (validated and copied)
    chain.append       Chain.append of a dict: serialization + HMAC
    e2e.paced.*        emit_statement -> written through AuditLog with the file sink
                       (defaults: fsync every second, batches of up to 1000), events emitted a
                       few per event loop iteration at about --rate events/s, as a busy proxy
                       does; the same loop making the same events without emitting them is
                       the baseline subtracted (so add ``completed`` for the session's share):
                         loop   CPU of the event loop's thread per event: emit, chaining and
                                the writer task's trips
                         total  CPU of the whole process per event, the IO thread's writes
                                included
                         batch  events per trip to the IO thread
                         lag    how late the loop's timers fired (p99, max): what chaining a
                                batch on the loop costs the sessions' latency
    e2e.burst.*        the same, emitted as fast as the loop can (bigger batches)
    session            what a session's bookkeeping adds per statement: a prepared lookup's
                       Bind, Execute and Sync through the real Rewriter and its reply
                       (BindComplete, DataRow, CommandComplete, ReadyForQuery) handed to
                       the trail, with a SessionAudit (its events only queued) minus
                       without one (best of --rounds runs of 20,000 statements)

PGCLOAK_PURE_PYTHON=1 measures the Python code where the C parts are built.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from pgcloak.audit.chain import Chain
from pgcloak.audit.events import SessionInfo, statement_event, validate_event
from pgcloak.audit.log import AuditLog
from pgcloak.audit.templates import Completed, StatementTemplate
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey
from pgcloak.policy import Audit, parse_policy
from pgcloak.session.auditing import SessionAudit
from pgcloak.session.protection import Protection
from pgcloak.session.rewriter import Rewriter
from pgcloak.session.session import _MARKED
from pgcloak.wire.framing import scan_marked
from pgcloak.wire.messages import (
    Bind,
    BindComplete,
    CommandComplete,
    DataRow,
    Execute,
    Parse,
    ParseComplete,
    ReadyForQuery,
    Sync,
)

KEY = bytes(range(32))
EMAIL = "public.users.email"
PHONE = "public.users.phone"
FINGERPRINT = "SELECT id, email, phone FROM users WHERE email = $1"
INDEX = "mV3cX0pQyqJ8rM2tTq9oXw"  # shaped like a blind-index value


def info() -> SessionInfo:
    return SessionInfo(
        session="3f9c2a1b7d6e4f50",
        user="bench",
        database="audit_on",
        application_name="pgcloak-bench",
        client="127.0.0.1:53124",
        worker=None,
    )


def build() -> dict[str, Any]:
    return statement_event(
        info(),
        kind="select",
        fingerprint=FINGERPRINT,
        tables=("public.users",),
        columns_read=(EMAIL, PHONE),
        columns_written=(),
        lookups={EMAIL: [INDEX]},
        rows=1,
        duration_ms=0.4321,
    )


TEMPLATE = StatementTemplate(
    info(), kind="select", fingerprint=FINGERPRINT, tables=("public.users",), columns_read=(EMAIL, PHONE)
)


def completed() -> Completed:
    started = time.monotonic()
    return (TEMPLATE, {EMAIL: [INDEX]}, started, time.monotonic(), time.time_ns(), 1, None)


SESSION_POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
default_read: reveal
"""


class _QueueOnly:
    """Stands in for AuditLog where only the session's share is measured."""

    full = False
    healthy = True

    def __init__(self) -> None:
        self.queued: list[Completed] = []

    def emit(self, event: object) -> None:
        pass

    def emit_statement(self, item: Completed) -> None:
        self.queued.append(item)
        if len(self.queued) > 1000:
            self.queued.clear()


def session_statements(audited: bool, n: int) -> float:
    """µs per prepared statement through the Rewriter (and a SessionAudit if ``audited``)."""
    protection = Protection.build(parse_policy(SESSION_POLICY), Keyring(MasterKey(KEY)))
    audit = SessionAudit(_QueueOnly(), info, "pii") if audited else None  # type: ignore[arg-type]
    rewriter = Rewriter(lambda: protection, audit)
    parse = Parse("look", "SELECT id FROM users WHERE email = $1").encode()
    rewriter.client_message(parse[0], parse)
    if audit is not None:
        done = ParseComplete().encode() + ReadyForQuery("I").encode()
        audit.sync()
        audit.reply(done, scan_marked(done, 1 << 31, _MARKED)[1], 0)
    bind = Bind("", "look", (), (b"alice@example.com",), ()).encode()
    execute, sync = Execute("").encode(), Sync().encode()
    reply = b"".join(
        m.encode() for m in (BindComplete(), DataRow((b"1",)), CommandComplete("SELECT 1"), ReadyForQuery("I"))
    )
    message = rewriter.client_message
    started = time.perf_counter()
    for _ in range(n):
        message(0x42, bind)
        message(0x45, execute)
        message(0x53, sync)
        _, marks, tail_rows = scan_marked(reply, 1 << 31, _MARKED)
        if audit is not None and audit.pending:
            audit.reply(reply, marks, tail_rows)
    return (time.perf_counter() - started) / n * 1e6


def best_of(fn: Callable[[], object], repeat: int, number: int = 2000) -> float:
    """µs per call: the best of ``repeat`` timed batches."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def config(directory: Path) -> Audit:
    return Audit(sink=f"file:{directory}/audit.jsonl")


class _NullSinkLog:
    """Counts how many trips the writer makes (patched onto one AuditLog)."""

    def __init__(self, log: AuditLog) -> None:
        self.trips = 0
        original = log._deliver

        async def counting(items: list[Any]) -> None:
            self.trips += 1
            await original(items)

        log._deliver = counting  # type: ignore[method-assign]


async def _produce(n: int, per_tick: int, rate: float | None, log: AuditLog | None) -> list[float]:
    """Build ``n`` events, ``per_tick`` per loop iteration, at about ``rate`` events/s, and
    emit them to ``log`` (or drop them: the baseline). Returns how late (seconds) each
    paced wake-up was: the event loop's lag."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    lags: list[float] = []
    sent = 0
    while sent < n:
        for _ in range(per_tick):
            event = completed()
            if log is not None:
                log.emit_statement(event)
                if log.full:
                    await log.wait_for_room()
            sent += 1
        if rate is not None:
            due = start + sent / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                lags.append(max(0.0, loop.time() - due))
            else:
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(0)
    return lags


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _e2e(n: int, per_tick: int, rate: float | None, directory: Path) -> dict[str, float]:
    main = threading.get_ident()
    assert main == threading.main_thread().ident
    # The same loop building the events but not emitting them: what building, pacing
    # and the loop cost by themselves.
    t0 = time.thread_time()
    base_lags = await _produce(n, per_tick, rate, None)
    idle = time.thread_time() - t0

    log = AuditLog(config(directory), KEY)
    probe = _NullSinkLog(log)
    await log.start()
    await log.flush()
    p0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
    lags = await _produce(n, per_tick, rate, log)
    await log.flush()
    p1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
    await log.aclose()
    assert log.metrics.written >= n and log.metrics.lost == 0, log.metrics
    return {
        "loop": max(0.0, (t1 - t0) - idle) / n * 1e6,
        "total": max(0.0, (p1 - p0) - idle) / n * 1e6,
        "batch": n / max(1, probe.trips),
        "wall": (w1 - w0) / n * 1e6,
        "lag99": _pct(lags, 0.99) * 1e6,
        "lagmax": _pct(lags, 1.0) * 1e6,
        "base_lag99": _pct(base_lags, 0.99) * 1e6,
        "base_lagmax": _pct(base_lags, 1.0) * 1e6,
    }


def run_e2e(name: str, n: int, per_tick: int, rate: float | None, rounds: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="pgcloak-audit-micro-") as tmp:
            try:
                import uvloop

                result = uvloop.run(_e2e(n, per_tick, rate, Path(tmp)))
            except ImportError:
                result = asyncio.run(_e2e(n, per_tick, rate, Path(tmp)))
        for k, v in result.items():
            best[k] = v if k not in best else (max(best[k], v) if k == "batch" else min(best[k], v))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=50, help="timed batches per micro case")
    parser.add_argument("--events", type=int, default=20000, help="events per end-to-end run")
    parser.add_argument("--rate", type=float, default=4000.0, help="events/s of the paced run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="end-to-end runs per case (best kept)"
    )
    parser.add_argument("--only", default="", help="only cases whose name contains this")
    args = parser.parse_args(argv)

    def want(name: str) -> bool:
        return args.only in name

    rows: list[tuple[str, str]] = []

    def show(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:28s} {value}", flush=True)

    if want("completed"):
        show("completed", f"{best_of(completed, args.repeat):8.2f} µs")
    if want("chain.completed"):
        chain = Chain(KEY, "w0-bench")
        one = completed()
        show("chain.completed", f"{best_of(lambda: chain.append_completed(one), args.repeat):8.2f} µs")
    if want("chain.batch"):
        chain = Chain(KEY, "w0-bench")
        batch = [completed() for _ in range(1000)]
        per_batch = best_of(lambda: chain.append_completed_many(batch, []), args.repeat, number=20)
        show("chain.batch", f"{per_batch / len(batch):8.2f} µs per event")
    event = build()
    if want("build"):
        show("build", f"{best_of(build, args.repeat):8.2f} µs")
    if want("validate"):
        show("validate", f"{best_of(lambda: validate_event(event), args.repeat):8.2f} µs")
    if want("emit"):
        with tempfile.TemporaryDirectory(prefix="pgcloak-audit-micro-") as tmp:
            cfg = Audit(sink=f"file:{tmp}/audit.jsonl", queue_size=10**9)
            log = AuditLog(cfg, KEY)  # never started: emit() only queues
            events = [build() for _ in range(2000 * args.repeat)]
            it = iter(events)
            show("emit.vouched", f"{best_of(lambda: log.emit(next(it)), args.repeat):8.2f} µs")
            plain = dict(event)
            show("emit.plain", f"{best_of(lambda: log.emit(plain), args.repeat):8.2f} µs")
    if want("chain.append"):
        chain = Chain(KEY, "w0-bench")
        show("chain.append", f"{best_of(lambda: chain.append(event), args.repeat):8.2f} µs")
    if want("session"):
        off = min(session_statements(False, 20000) for _ in range(args.rounds))
        on = min(session_statements(True, 20000) for _ in range(args.rounds))
        show("session", f"{on - off:8.2f} µs per statement ({on:.2f} with a trail, {off:.2f} without)")
    for name, per_tick, rate in (("e2e.paced", 3, args.rate), ("e2e.burst", 20, None)):
        if not want(name):
            continue
        r = run_e2e(name, args.events, per_tick, rate, args.rounds)
        show(f"{name}.loop", f"{r['loop']:8.2f} µs/event on the event loop")
        show(f"{name}.total", f"{r['total']:8.2f} µs/event CPU, all threads")
        show(f"{name}.batch", f"{r['batch']:8.1f} events per trip to the IO thread")
        if rate is not None:
            show(
                f"{name}.lag",
                f"{r['lag99']:8.0f} µs p99, {r['lagmax']:.0f} µs max: how late the loop's timers "
                f"fired (without audit: {r['base_lag99']:.0f} µs p99, {r['base_lagmax']:.0f} µs max)",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
