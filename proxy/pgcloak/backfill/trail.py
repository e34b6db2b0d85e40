"""The backfill in the audit trail: it reads (and with ``--rotate`` decrypts) every
protected value of a table, which a data protection officer must be able to see.

The backfill runs beside the proxy, not in it, so it keeps a chain of its own (its own
chain id, sealed when it ends), next to the proxy's: a file sink ``audit.jsonl`` gets
``audit.backfill.jsonl`` (``pgcloak audit verify`` checks both; a relative path is in
the working directory, as for the proxy), a PostgreSQL sink the
same table, and ``stdout`` becomes stderr (stdout carries the report). Events carry
table names, column key ids and counts: never a value, never a row's key.

With ``on_audit_failure: refuse``, a trail that cannot be written stops the backfill
before it writes anything. A run refused because values are under another master key
writes no event (its MACs would be made with that wrong key).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from pgcloak.audit import AuditLog, SessionInfo, refusal_event, statement_event
from pgcloak.audit.sinks import FileSink, make_sink, resolve_paths, spill_path_for
from pgcloak.backfill.convert import ColumnJob
from pgcloak.backfill.runner import TableReport
from pgcloak.crypto.keyring import Keyring
from pgcloak.policy import Policy
from pgcloak.policy.model import Audit

__all__ = ["KIND", "Trail", "backfill_audit_config", "table_event"]

#: The statement kind of the backfill's events.
KIND = "backfill"
#: Seconds the start waits for its first event to be written.
_START_TIMEOUT = 10.0


def backfill_audit_config(policy: Policy) -> Audit:
    """The policy's audit section, with the backfill's own sink (see the module docstring);
    a relative file sink (or ``spill_dir``) is in the working directory, as for the proxy."""
    config = resolve_paths(policy.audit)
    sink = config.sink
    if sink.startswith("file:"):
        path = Path(sink[len("file:") :])
        name = f"{path.stem}.{KIND}{path.suffix}" if path.suffix else f"{path.name}.{KIND}"
        sink = f"file:{path.with_name(name)}"
    elif sink == "stdout":
        sink = "stderr"
    return config.model_copy(update={"sink": sink})


def _fingerprint(table: str, *, rotate: bool, dry_run: bool) -> str:
    flags = (" --rotate" if rotate else "") + (" --dry-run" if dry_run else "")
    return f"pgcloak backfill {table}{flags}"


def table_event(
    info: SessionInfo, report: TableReport, jobs: Sequence[ColumnJob], *, rotate: bool, dry_run: bool
) -> dict[str, object]:
    """What one table's run did: every protected column read, those changed written,
    the rows updated, and the counts (no value, no row named)."""
    read = [job.key_id for job in jobs]
    columns = report.columns
    written = [] if dry_run else [
        job.key_id for job in jobs
        if columns[job.column].encrypted + columns[job.column].relaid + columns[job.column].rotated
    ]  # fmt: skip
    failed = sum(c.failed for c in columns.values())
    counts = [
        f"{sum(getattr(c, what) for c in columns.values())} {label}"
        for what, label in (("encrypted", "encrypted"), ("relaid", "stored again"), ("rotated", "rotated"))
    ]
    reason = ", ".join(counts) + f", {failed} failed, {report.raced} changed meanwhile"
    if dry_run:
        reason = "dry run (nothing written): " + reason
    return statement_event(
        info,
        kind=KIND,
        fingerprint=_fingerprint(report.table, rotate=rotate, dry_run=dry_run),
        tables=[report.table],
        columns_read=read,
        columns_written=written,
        rows=0 if dry_run else report.rows_updated,
        reason=reason,
        duration_ms=report.seconds * 1000.0,
    )


class Trail:
    """The backfill's audit chain (one per run)."""

    def __init__(self, policy: Policy, keyring: Keyring, *, rotate: bool, dry_run: bool) -> None:
        self.config = backfill_audit_config(policy)
        sink = make_sink(self.config)
        spill = spill_path_for(sink, None, self.config.spill_dir)
        if not isinstance(sink, FileSink):
            # A table sink is the proxy's own: its spill file would be the proxy's too (two
            # processes appending to and replaying one file).
            spill = spill.with_name(spill.name.replace(".spill.jsonl", f".{KIND}.spill.jsonl"))
        self.log = AuditLog(self.config, keyring.audit_key(), sink=sink, spill_path=spill)
        self.rotate = rotate
        self.dry_run = dry_run
        self.info = SessionInfo(session=os.urandom(8).hex(), application_name="pgcloak backfill")
        #: Not when the survey found values under another master key: the trail's MACs
        #: would be made with the wrong key too (nothing is written then anyway).
        self.started = False

    @property
    def description(self) -> str:
        return self.log.sink.description

    async def start(self, user: str, database: str, tables: Sequence[str]) -> bool:
        """Open the chain and record the start; False when the trail cannot be written
        and the policy says to refuse (nothing may be read or written then)."""
        self.info = SessionInfo(
            session=self.info.session,
            user=user,
            database=database,
            application_name=self.info.application_name,
            client=f"{socket.gethostname()} (pid {os.getpid()})",
        )
        await self.log.start()
        self.started = True
        self.log.emit(
            statement_event(
                self.info,
                kind=KIND,
                fingerprint=_fingerprint(", ".join(tables), rotate=self.rotate, dry_run=self.dry_run),
                tables=list(tables),
                reason="started",
            )
        )
        with contextlib.suppress(TimeoutError):  # still unwritten: not healthy, below
            await self.log.flush(timeout=_START_TIMEOUT)
        return self.log.healthy or self.config.on_audit_failure != "refuse"

    def _emit(self, event: dict[str, object]) -> None:
        if self.started:
            self.log.emit(event)

    def refused(self, table: str, problems: Sequence[str]) -> None:
        """The survey found ``problems`` (names and counts only): nothing written."""
        self._emit(
            refusal_event(
                self.info,
                kind=KIND,
                fingerprint=_fingerprint(table, rotate=self.rotate, dry_run=self.dry_run),
                tables=[table],
                reason="; ".join(problems),
                sqlstate="55000",
            )
        )

    def done(self, report: TableReport, jobs: Sequence[ColumnJob]) -> None:
        self._emit(table_event(self.info, report, jobs, rotate=self.rotate, dry_run=self.dry_run))

    def stopped(self, table: str, jobs: Sequence[ColumnJob], sqlstate: str | None) -> None:
        """The database refused a statement mid-table: batches committed before it stay."""
        self._emit(
            statement_event(
                self.info,
                kind=KIND,
                fingerprint=_fingerprint(table, rotate=self.rotate, dry_run=self.dry_run),
                tables=[table],
                columns_read=[job.key_id for job in jobs],
                columns_written=[] if self.dry_run else [job.key_id for job in jobs],
                reason="stopped by an error: batches committed before it stay converted",
                sqlstate=sqlstate,
            )
        )

    async def close(self) -> None:
        """Write what is queued and a seal (to the spill file while the sink fails: the
        next run replays it)."""
        await self.log.aclose()
