"""What ``/metrics`` reports: a prometheus-client collector over the proxy's own counters.

Nothing on the client path pays for metrics: sessions, the rewriter and the audit log
already count what matters (bytes, refusals, :class:`~pgcloak.audit.AuditMetrics`),
and this collector reads those numbers when Prometheus scrapes. The proxy is seen
through :class:`ProxyState` (structural: admin does not import the session layer).
Metric names follow Prometheus conventions: ``pgcloak_`` prefix, ``_total`` counters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pgcloak.audit import AuditMetrics

__all__ = ["AuditState", "ProxyCollector", "ProxyState", "make_registry", "readiness"]


class AuditState(Protocol):
    """The parts of :class:`~pgcloak.audit.AuditLog` a scrape reads."""

    @property
    def metrics(self) -> AuditMetrics: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def spill_bytes(self) -> int: ...


class ProxyState(Protocol):
    """The parts of the proxy server a scrape (and ``/readyz``) reads."""

    @property
    def connections_active(self) -> int: ...
    @property
    def connections_total(self) -> int: ...
    @property
    def login_timeouts(self) -> int: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def refusals(self) -> Mapping[str, int]: ...
    @property
    def policy_fingerprint(self) -> str | None: ...
    @property
    def policy_reloads(self) -> Mapping[str, int]: ...
    @property
    def audit_state(self) -> AuditState | None: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def refuses_when_audit_down(self) -> bool: ...


#: AuditMetrics field -> (metric name, help).
_AUDIT_COUNTERS = {
    "emitted": ("pgcloak_audit_events", "Audit events handed to the trail"),
    "written": ("pgcloak_audit_records_written", "Records written to the sink (seals and gaps included)"),
    "dropped": ("pgcloak_audit_events_dropped", "Events dropped (on_full: drop, or after close)"),
    "spilled": ("pgcloak_audit_records_spilled", "Records written to the spill file while the sink failed"),
    "replayed": ("pgcloak_audit_records_replayed", "Spilled records replayed to the sink"),
    "sink_errors": ("pgcloak_audit_sink_errors", "Failed attempts to open, write or sync the sink"),
    "lost": ("pgcloak_audit_records_lost", "Records neither written nor spilled"),
}


class ProxyCollector(Collector):
    """Reads a :class:`ProxyState` on every scrape."""

    def __init__(self, state: ProxyState, worker: int | None = None) -> None:
        self._state = state
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        s = self._state
        yield GaugeMetricFamily(
            "pgcloak_client_connections_open", "Client connections open now", value=s.connections_active
        )
        yield CounterMetricFamily(
            "pgcloak_client_connections_accepted", "Client connections accepted", value=s.connections_total
        )
        yield CounterMetricFamily(
            "pgcloak_client_login_timeouts",
            "Client connections closed because they had not logged in within client_login_timeout",
            value=s.login_timeouts,
        )
        yield CounterMetricFamily(
            "pgcloak_client_bytes_received",
            "Bytes received from clients after authentication",
            value=s.bytes_received,
        )
        yield CounterMetricFamily(
            "pgcloak_client_bytes_sent",
            "Bytes sent to clients after authentication (results as decrypted or masked)",
            value=s.bytes_sent,
        )
        refusals = CounterMetricFamily(
            "pgcloak_refusals",
            "Statements and results pgcloak refused, by SQLSTATE (0A000 unsupported on ciphertext, "
            "42501 read policy or unbounded_select, 54000 max_pii_rows, 58000 audit down, ...)",
            labels=["sqlstate"],
        )
        for sqlstate, count in sorted(s.refusals.items()):
            refusals.add_metric([sqlstate], count)
        yield refusals
        fingerprint = s.policy_fingerprint
        if fingerprint is not None:
            yield InfoMetricFamily(
                "pgcloak_policy", "The policy being served", value={"fingerprint": fingerprint[:12]}
            )
            reloads = CounterMetricFamily(
                "pgcloak_policy_reloads", "Policy file edits, by result (applied or refused)", labels=["result"]
            )
            for result, count in sorted(s.policy_reloads.items()):
                reloads.add_metric([result], count)
            yield reloads
        audit = s.audit_state
        if audit is not None:
            metrics = audit.metrics
            for field, (name, doc) in _AUDIT_COUNTERS.items():
                yield CounterMetricFamily(name, doc, value=getattr(metrics, field))
            yield GaugeMetricFamily(
                "pgcloak_audit_healthy", "1 while the audit sink accepts records, else 0", value=int(audit.healthy)
            )
            yield GaugeMetricFamily("pgcloak_audit_queue_depth", "Audit events waiting in memory", value=audit.queue_depth)
            yield GaugeMetricFamily(
                "pgcloak_audit_spill_bytes", "Bytes of records waiting in the spill file", value=audit.spill_bytes
            )
        if self._worker is not None:
            yield GaugeMetricFamily("pgcloak_worker", "This worker's id (--workers N)", value=self._worker)


def make_registry(state: ProxyState, worker: int | None = None) -> CollectorRegistry:
    """A registry holding only pgcloak's collector (no process or GC collectors: their
    numbers are the Python runtime's, and reading /proc on every scrape costs the loop)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(state, worker))
    return registry


def readiness(state: ProxyState) -> tuple[bool, str]:
    """Whether to send this proxy traffic, and why not: not accepting (starting or
    draining), or statements touching PII would be refused (the audit sink is down and
    the policy says ``on_audit_failure: refuse``)."""
    if not state.accepting:
        return False, "not accepting connections (starting or shutting down)"
    audit = state.audit_state
    if audit is not None and not audit.healthy and state.refuses_when_audit_down:
        return False, "the audit trail cannot be written, so statements touching PII are refused"
    return True, "ready"
