"""`pgcloak backfill POLICY --dsn URL`: survey, then convert, table by table; the report.

Exit status: 0 when every value is in the policy's form (with ``--dry-run``: when every
value would be), 1 when some values could not be converted (listed by primary key or
``ctid``, never by value) or are still not in the stored form after the run (written
meanwhile by someone else: run again), 2 when it could not run: the policy, the key or
the database cannot be read, or a table is not fit (missing, a column not ``text``,
values under another master key), or the audit trail cannot be written and the policy
says ``on_audit_failure: refuse`` - nothing written then - or the database failed in the
middle (batches committed before stay converted). The run is recorded in the audit
trail (:mod:`.trail`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from pgcloak.backfill.convert import ColumnJob, Converter, column_jobs
from pgcloak.backfill.runner import TableReport, backfill, describe_error, merged, survey
from pgcloak.backfill.trail import Trail
from pgcloak.crypto.keyring import Keyring
from pgcloak.policy import Policy
from pgcloak.policy.names import InvalidName, parse_table_name

__all__ = ["canonical_table", "run"]


def canonical_table(name: str) -> str:
    """``users`` -> ``public.users``, ``crm."Contacts"`` -> ``crm.Contacts``: spelled as in
    the policy (unquoted names fold to lowercase). Raises ``KeyError`` for a bad name."""
    try:
        schema, table = parse_table_name(name.strip())
    except InvalidName as exc:
        raise KeyError(str(exc)) from None
    return f"{schema}.{table}"


class _Bars:
    """A rich progress bar per table on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, progress: RichProgress) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def table(self, table: str, blocks: int) -> None:
        task = self._tasks.get(table)
        if task is None:
            self._tasks[table] = self._progress.add_task(table, total=max(blocks, 1))
        else:
            self._progress.update(task, total=max(blocks, 1))

    def advance(self, table: str, blocks: int, rows: int) -> None:
        self._progress.advance(self._tasks[table], blocks)


def _print_survey(report: TableReport, out: TextIO) -> None:
    for name, col in report.columns.items():
        print(
            f"{report.table}.{name}: {col.unconverted} value(s) not in the stored form, "
            f"{col.stored} stored",
            file=out,
        )


def _print_run(report: TableReport, out: TextIO, *, dry_run: bool, rotate: bool) -> None:
    verb = "would be updated" if dry_run else "updated"
    print(f"{report.table}: {report.rows_updated} row(s) {verb} in {report.seconds:.1f} s", file=out)
    for name, col in report.columns.items():
        done = f"{col.encrypted} encrypted, {col.relaid} stored again in the policy's layout"
        if rotate:
            done += f", {col.rotated} sealed again under the current key"
        print(f"  {name}: {done}" + (f"; {col.failed} failed" if col.failed else ""), file=out)
        for line in col.failures:
            print(f"    {line}", file=out)
        if col.failed > len(col.failures):
            print(f"    ... and {col.failed - len(col.failures)} more", file=out)
    if report.raced and not dry_run:
        print(
            f"  {report.raced} row(s) changed while being converted and were left to the "
            "application's write" + ("; run again to be sure every value is rotated" if rotate else ""),
            file=out,
        )


async def _run(
    dsn: str,
    tables: dict[str, list[ColumnJob]],
    converter: Converter,
    trail: Trail,
    *,
    batch_rows: int,
    rotate: bool,
    dry_run: bool,
    out: TextIO,
) -> int:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        user, database = await conn.fetchrow("SELECT current_user::text, current_database()::text")
        # The survey reads counts only; it also tells whether the master key is the one
        # the values were sealed with, which the trail's MACs are made with too.
        surveys = [await survey(conn, jobs, converter.keyring.check_value) for jobs in tables.values()]
        if not any(c.foreign_key for r in surveys for c in r.columns.values()):
            if not await trail.start(user, database, list(tables)):
                print(
                    f"pgcloak backfill: the audit trail cannot be written ({trail.description}) and the "
                    "policy says on_audit_failure: refuse; nothing written",
                    file=sys.stderr,
                )
                return 2
            if not trail.log.healthy:
                print(
                    f"warning: the audit trail cannot be written now ({trail.description}): its events "
                    "wait in the spill file for the next run",
                    file=sys.stderr,
                )
        for report in surveys:
            _print_survey(report, out)
        problems = [(r.table, p) for r in surveys for p in r.problems]
        for table, problem in problems:
            print(f"pgcloak backfill: {table}: {problem}", file=sys.stderr)
        if trail.started:
            for report in surveys:
                if report.problems:
                    trail.refused(report.table, report.problems)
        if problems:
            print("pgcloak backfill: nothing written", file=sys.stderr)
            return 2
        if not any(c.stored for r in surveys for c in r.columns.values()) and any(
            c.unconverted for r in surveys for c in r.columns.values()
        ):
            print(
                "note: no value is stored yet to check the master key against: it must be the "
                "key pgcloak runs with",
                file=out,
            )
        status = 0
        console = Console(stderr=True)
        with RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("blocks"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        ) as bars:
            for before, jobs in zip(surveys, tables.values(), strict=True):
                if not rotate and not any(c.unconverted for c in before.columns.values()):
                    continue  # nothing in clear: no pass needed
                try:
                    report = await backfill(
                        conn, jobs, converter, batch_rows=batch_rows, rotate=rotate, dry_run=dry_run, progress=_Bars(bars)
                    )
                except asyncpg.PostgresError as exc:
                    trail.stopped(before.table, jobs, getattr(exc, "sqlstate", None))
                    raise
                report = merged(before, report)
                trail.done(report, jobs)
                _print_run(report, out, dry_run=dry_run, rotate=rotate)
                if any(c.failed for c in report.columns.values()):
                    status = 1
                if not dry_run:
                    # Whatever the passes said: what the table holds now.
                    after = await survey(conn, jobs, converter.keyring.check_value)
                    left = sum(c.unconverted for c in after.columns.values())
                    failed = sum(c.failed for c in report.columns.values())
                    if left > failed:
                        print(
                            f"  {left - failed} value(s) still not in the stored form (written "
                            "meanwhile around pgcloak?): run again",
                            file=out,
                        )
                        status = 1
        return status
    finally:
        try:
            await trail.close()
        finally:
            await conn.close()


def run(
    policy: Policy,
    keyring: Keyring,
    dsn: str,
    *,
    tables: Sequence[str] = (),
    batch_rows: int = 1000,
    rotate: bool = False,
    dry_run: bool = False,
    out: TextIO | None = None,
) -> int:
    """Survey, then convert (see the module docstring for the exit status); the report on
    ``out`` (default: stdout)."""
    out = out or sys.stdout
    try:
        jobs = column_jobs(policy, {canonical_table(t) for t in tables} if tables else None)
    except KeyError as exc:
        print(f"pgcloak backfill: {exc.args[0]}", file=sys.stderr)
        return 2
    converter = Converter.for_policy(policy, keyring)
    trail = Trail(policy, keyring, rotate=rotate, dry_run=dry_run)
    try:
        return asyncio.run(
            _run(dsn, jobs, converter, trail, batch_rows=batch_rows, rotate=rotate, dry_run=dry_run, out=out)
        )
    except asyncpg.PostgresError as exc:
        # Its message or DETAIL can quote a value: never printed.
        print(
            f"pgcloak backfill: the database refused a statement ({describe_error(exc)}); "
            "batches committed before it stay converted: run again",
            file=sys.stderr,
        )
        return 2
    except (TimeoutError, OSError, ValueError, asyncpg.InterfaceError) as exc:
        print(
            f"pgcloak backfill: cannot read or write the database: {type(exc).__name__}: {exc}; "
            "batches committed before stay converted: run again",
            file=sys.stderr,
        )
        return 2
