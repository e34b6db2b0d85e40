"""bench/audit.py --probe: what each of the audit trail's calls costs inside a running pgcloak.

Python imports this module at start-up when this directory is on PYTHONPATH (bench/audit.py
puts it there for the audit-on target only, with ``PGCLOAK_BENCH_PROBE`` naming the file
to write). It wraps the trail's per-statement entry points (the session's ``bind``,
``execute_message`` (shown as ``execute``), ``sync``, ``reply``, ``query``, ``backend``;
the log's ``emit_statement``)
and its per-batch work (chaining on the event loop; writing and fsync on the sink's IO
thread) with counters, and writes the totals as JSON when the process exits (SIGTERM:
pgcloak shuts down cleanly).

Why: the difference in CPU per transaction between audit-on and audit-off moves by more
than most changes from run to run on a shared machine, and micro-benchmarks miss what the
caches cost in place. These are the trail's own calls, timed where they run.

Event-loop calls are timed with ``perf_counter_ns`` (wall time; the loop does not block
in them); the wrapper's own cost is measured at start-up and reported, so that it can be
subtracted. The IO thread's calls are timed with ``thread_time`` (its CPU). Timing makes
the probed process slower: a probe run's TPS ratio is not the target's.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Callable
from typing import Any

_OUT = os.environ.get("PGCLOAK_BENCH_PROBE")


def _install(out: str) -> None:
    from pgcloak.audit import log as audit_log
    from pgcloak.audit import sinks
    from pgcloak.session import auditing

    clock = time.perf_counter_ns
    cpu = time.thread_time_ns
    calls: dict[str, int] = {}
    nanos: dict[str, int] = {}
    events = {"chained": 0}

    def timed(name: str, fn: Callable[..., Any], timer: Callable[[], int] = clock) -> Callable[..., Any]:
        calls.setdefault(name, 0)
        nanos.setdefault(name, 0)

        def wrapper(*args: Any) -> Any:
            start = timer()
            try:
                return fn(*args)
            finally:
                nanos[name] += timer() - start
                calls[name] += 1

        return wrapper

    init = auditing.SessionAudit.__init__

    def session_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # (C methods: shadowed per session. An Execute's call is execute_message.)
        for name, attr in (("bind", "bind"), ("execute", "execute_message"), ("sync", "sync"), ("reply", "reply"), ("query", "query")):
            setattr(self, attr, timed(name, getattr(self, attr)))

    auditing.SessionAudit.__init__ = session_init  # type: ignore[method-assign]
    auditing.SessionAudit.backend = timed("backend", auditing.SessionAudit.backend)  # type: ignore[method-assign]
    log_init = audit_log.AuditLog.__init__

    def audit_log_init(self: Any, *args: Any, **kwargs: Any) -> None:
        log_init(self, *args, **kwargs)
        self.emit_statement = timed("emit_statement", self.emit_statement)  # (the log's intake)

    audit_log.AuditLog.__init__ = audit_log_init  # type: ignore[method-assign]

    chain_into = audit_log.AuditLog._chain_into

    def counted_chain(self: Any, items: list[Any], out: list[Any]) -> None:
        events["chained"] += len(items)
        chain_into(self, items, out)

    audit_log.AuditLog._chain_into = timed("chain", counted_chain)  # type: ignore[method-assign]
    sinks.FileSink._write_blocking = timed("file.write", sinks.FileSink._write_blocking, cpu)  # type: ignore[method-assign]
    sinks.FileSink._sync_blocking = timed("file.fsync", sinks.FileSink._sync_blocking, cpu)  # type: ignore[method-assign]

    # What the wrapper itself costs per call (subtracted by bench/audit.py).
    empty = timed("wrapper", lambda: None)
    for _ in range(100_000):
        empty()
    overhead = nanos.pop("wrapper") / calls.pop("wrapper")

    def dump() -> None:
        path = f"{out}.{os.getpid()}"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"calls": calls, "nanos": nanos, "wrapper_ns": overhead, **events}, f)

    atexit.register(dump)


if _OUT:
    _install(_OUT)
