"""pgcloak.audit: a tamper-evident, PII-free audit trail.

* :mod:`.events`  builders of the events the session emits (no field for a literal value)
* :mod:`.chain`   seq / prev / HMAC-SHA256 chaining and the canonical serialization (pure)
* :mod:`.verify`  checks chains over lines: edited, deleted, inserted, reordered, tail cut
* :mod:`.sinks`   file (rotation, fsync), stdout/stderr, PostgreSQL table; spill file (IO)
* :mod:`.log`     :class:`AuditLog`, the bounded queue and writer task a worker runs
* :mod:`.cli`     ``pgcloak audit verify`` / ``who-accessed`` as functions

Usage from a worker::

    log = AuditLog(policy.audit, keyring.audit_key(), worker=worker_id)
    await log.start()
    log.emit(statement_event(info, kind="select", fingerprint=fp, ...))
    if log.full:
        await log.wait_for_room()
    await log.aclose()
"""

from pgcloak.audit.chain import GENESIS, Chain, ChainedRecord, canonical, compute_mac, mac_ok
from pgcloak.audit.events import (
    InvalidEventError,
    SessionInfo,
    connection_event,
    refusal_event,
    should_record,
    statement_event,
    validate_event,
)
from pgcloak.audit.log import AuditLog, AuditMetrics
from pgcloak.audit.verify import ChainSummary, GapFinding, Problem, VerifyReport, verify

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditMetrics",
    "Chain",
    "ChainSummary",
    "ChainedRecord",
    "GapFinding",
    "InvalidEventError",
    "Problem",
    "SessionInfo",
    "VerifyReport",
    "canonical",
    "compute_mac",
    "connection_event",
    "mac_ok",
    "refusal_event",
    "should_record",
    "statement_event",
    "validate_event",
    "verify",
]
