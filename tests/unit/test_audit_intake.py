"""AuditLog's intake (emit_statement): in C where built, the same as log.py's _Intake.

Every audited statement goes through it, so a wrong count would misreport
pgcloak_audit_events_total, and a wrong choice between the fast path and the slow one
would skip the writer's wake-up or back-pressure (the slow path's job).
"""

from __future__ import annotations

import gc
import weakref
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.audit import AuditMetrics, log
from pgcloak.policy import Audit


def test_the_c_intake_is_built_here() -> None:
    """CI builds it (setup.py): a silent fallback to Python would hide a broken build."""
    assert log.Intake is not log._Intake
    assert log.Intake.__module__ == "pgcloak.audit._chain_core"


step = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 99)),
    st.tuples(st.just("fast_below"), st.integers(-1, 6)),
    st.tuples(st.just("take"), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, max_size=30))
def test_the_c_intake_does_what_the_python_one_does(steps: list[tuple[str, int]]) -> None:
    runs = []
    for kind in (log.Intake, log._Intake):
        queue: deque[Any] = deque()
        slow: list[Any] = []
        intake = kind(queue, slow.append)
        for op, value in steps:
            if op == "put":
                intake(value)
            elif op == "fast_below":
                intake.fast_below = value
            else:
                for _ in range(min(value, len(queue))):
                    queue.popleft()
        runs.append((list(queue), slow, intake.emitted, intake.fast_below))
    assert runs[0] == runs[1]


def test_the_intake_refuses_what_a_session_never_passes() -> None:
    intake = log.Intake(deque(), lambda item: None)
    with pytest.raises(TypeError):
        intake()
    with pytest.raises(TypeError):
        intake(1, 2)
    with pytest.raises(TypeError):
        intake(item=1)
    with pytest.raises(AttributeError):
        log.Intake(object(), print)  # (no append)


def test_an_intake_in_a_reference_cycle_is_collected() -> None:
    class Owner:  # as AuditLog: its intake's slow path is one of its methods
        def take(self, item: Any) -> None:
            pass

    owner = Owner()
    owner.intake = log.Intake(deque(), owner.take)  # type: ignore[attr-defined]
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None


async def test_the_log_counts_what_either_path_queues() -> None:
    trail = log.AuditLog(Audit.model_validate({"sink": "stdout"}), b"k" * 32)
    assert trail.emit_statement is trail._intake and type(trail._intake) is log.Intake
    trail._intake.fast_below = 2
    for i in range(4):  # two the fast way, two through _enqueue_carefully
        trail.emit_statement(("statement", i))  # type: ignore[arg-type]
    assert trail.queue_depth == 4 and trail.metrics.emitted == 4
    trail.metrics.emitted += 10  # a reload adds the old trail's counts (server.py)
    assert trail._intake.emitted == 14 and trail.metrics.as_dict()["emitted"] == 14


def test_metrics_without_a_log_keep_their_own_count() -> None:
    metrics = AuditMetrics()
    metrics.emitted = 3
    metrics.written += 2
    assert metrics.as_dict() == {
        "emitted": 3, "written": 2, "dropped": 0, "spilled": 0, "replayed": 0, "sink_errors": 0, "lost": 0,
    }  # fmt: skip
