"""What /metrics and /readyz say for a given proxy state (no sockets; test_admin.py has them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgcloak.admin.http import AdminServer
from pgcloak.admin.metrics import make_registry, readiness
from pgcloak.audit import AuditMetrics


@dataclass
class Audit:
    metrics: AuditMetrics = field(default_factory=AuditMetrics)
    healthy: bool = True
    queue_depth: int = 0
    spill_bytes: int = 0


@dataclass
class State:
    """The numbers a ProxyServer exposes, as plain values."""

    connections_active: int = 2
    connections_total: int = 7
    login_timeouts: int = 4
    bytes_received: int = 1000
    bytes_sent: int = 5000
    refusals: Mapping[str, int] = field(default_factory=lambda: {"0A000": 3, "42501": 1})
    policy_fingerprint: str | None = "ab" * 32
    policy_reloads: Mapping[str, int] = field(default_factory=lambda: {"applied": 1})
    audit_state: Audit | None = field(default_factory=Audit)
    accepting: bool = True
    refuses_when_audit_down: bool = True


def _samples(state: State, worker: int | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(make_registry(state, worker)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_report_the_state() -> None:
    state = State()
    assert state.audit_state is not None
    state.audit_state.metrics.emitted = 42
    state.audit_state.metrics.dropped = 2
    state.audit_state.spill_bytes = 512
    got = _samples(state)
    assert got[("pgcloak_client_connections_open", ())] == 2
    assert got[("pgcloak_client_connections_accepted_total", ())] == 7
    assert got[("pgcloak_client_login_timeouts_total", ())] == 4
    assert got[("pgcloak_client_bytes_received_total", ())] == 1000
    assert got[("pgcloak_client_bytes_sent_total", ())] == 5000
    assert got[("pgcloak_refusals_total", (("sqlstate", "0A000"),))] == 3
    assert got[("pgcloak_refusals_total", (("sqlstate", "42501"),))] == 1
    assert got[("pgcloak_policy_info", (("fingerprint", "ab" * 6),))] == 1
    assert got[("pgcloak_policy_reloads_total", (("result", "applied"),))] == 1
    assert got[("pgcloak_audit_events_total", ())] == 42
    assert got[("pgcloak_audit_events_dropped_total", ())] == 2
    assert got[("pgcloak_audit_spill_bytes", ())] == 512
    assert got[("pgcloak_audit_healthy", ())] == 1
    assert ("pgcloak_worker", ()) not in got


def test_without_policy_or_audit_only_the_proxy_counters() -> None:
    got = _samples(State(policy_fingerprint=None, audit_state=None, refusals={}), worker=3)
    assert not any(name.startswith(("pgcloak_audit", "pgcloak_policy")) for name, _ in got)
    assert got[("pgcloak_worker", ())] == 3


@pytest.mark.parametrize(
    ("state", "ready", "why"),
    [
        (State(), True, "ready"),
        (State(accepting=False), False, "not accepting"),
        (State(audit_state=Audit(healthy=False)), False, "audit trail cannot be written"),
        # on_audit_failure: allow keeps serving PII statements: still ready.
        (State(audit_state=Audit(healthy=False), refuses_when_audit_down=False), True, "ready"),
    ],
)
def test_readiness(state: State, ready: bool, why: str) -> None:
    got, reason = readiness(state)
    assert got is ready and why in reason


def test_routes() -> None:
    server = AdminServer("127.0.0.1", 0, State())
    assert server.route("GET", "/healthz")[:2] == (200, "text/plain; charset=utf-8")
    assert server.route("HEAD", "/readyz?verbose=1")[0] == 200
    assert server.route("GET", "/readyz")[0] == 200
    assert server.route("POST", "/healthz")[0] == 405
    assert server.route("GET", "/")[0] == 404
    status, ctype, body = server.route("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=")
    assert b"pgcloak_client_connections_open 2.0" in body
    assert AdminServer("127.0.0.1", 0, State(accepting=False)).route("GET", "/readyz")[0] == 503
