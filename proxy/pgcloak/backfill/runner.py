"""`pgcloak backfill`: bring the values already in a database to the policy's stored form.

Straight to PostgreSQL (asyncpg), never through the proxy: the values it reads are the
stored ones. Per protected table:

1. **Survey** (one scan, counts only): values not in the stored form, and envelopes
   sealed under another master key. Any of those stops the whole run before a write: a
   wrong ``--master-key-file`` would otherwise seal the plaintext under a key the proxy
   does not have.
2. **Pass over the table by block ranges** (``ctid`` ranges, a TID Range Scan on
   PostgreSQL 14+), a batch per transaction: rows are read without a lock, converted here
   (:mod:`pgcloak.backfill.convert`), and written back only where the value is still the
   one read (``IS NOT DISTINCT FROM``): a row the application changed meanwhile is left
   to the next pass, never overwritten. Rows moved past the end while it ran (a
   concurrent update, or our own writes) are covered by passes over the new tail.
3. **Sweep** for plaintext left anywhere (a row moved inside a range already passed).

A batch the database refuses (a duplicate blind index against a unique index: two
plaintexts that normalize to one email) is done again row by row, each in a savepoint;
the rows that fail are reported by ``ctid`` and SQLSTATE, never by value, and left as
they are. The run is idempotent: stored values are not touched again (except by
``rotate``), so it can be stopped and run again.

User triggers fire on these UPDATEs as on any other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from pgcloak.backfill.convert import ColumnJob, Converter, ConvertError, Outcome
from pgcloak.crypto import _b64
from pgcloak.crypto.envelope import ENVELOPE_PREFIX_TEXT
from pgcloak.policy.names import quote_ident as q

__all__ = ["ColumnReport", "Progress", "TableReport", "backfill", "survey"]

#: Failures listed per column (the rest are counted).
MAX_LISTED = 20
#: Passes over a table's new tail before the sweep (each reads what the last one wrote).
MAX_TAIL_PASSES = 4

_RELATION_SQL = """
SELECT c.oid::regclass::text AS name, c.relkind::text AS relkind,
       pg_relation_size(c.oid) / current_setting('block_size')::int AS blocks,
       c.reltuples, c.relpages
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""

#: The partitions that hold a partitioned table's rows.
_LEAVES_SQL = """
SELECT c.oid::regclass::text AS name,
       pg_relation_size(c.oid) / current_setting('block_size')::int AS blocks,
       c.reltuples, c.relpages
  FROM pg_partition_tree($1::regclass) t JOIN pg_class c ON c.oid = t.relid
 WHERE t.isleaf AND c.relkind = 'r'
 ORDER BY 1
"""

_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_attribute a
 WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""

_KEY_SQL = """
SELECT a.attname FROM pg_index i
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
 WHERE i.indrelid = $1::regclass AND i.indisprimary
 ORDER BY array_position(i.indkey::int2[], a.attnum)
"""

_BLOCKS_SQL = "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::int"


@dataclass
class ColumnReport:
    key_id: str
    #: Survey: values not in the column's stored form, envelopes under another master
    #: key, stored values (the master key was checked against these).
    unconverted: int = 0
    foreign_key: int = 0
    stored: int = 0
    #: What the run did.
    encrypted: int = 0
    relaid: int = 0
    rotated: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def count(self, outcome: Outcome) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    def fail(self, row: str, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append(f"row {row}: {reason}")


@dataclass
class TableReport:
    table: str
    columns: dict[str, ColumnReport]
    #: Why the table cannot be converted (missing, a column not text...): not written.
    problems: list[str] = field(default_factory=list)
    rows_updated: int = 0
    #: Rows that changed between read and write (a concurrent writer): left as they
    #: are; the sweep takes those still in clear, ``rotate`` needs another run for the rest.
    raced: int = 0
    seconds: float = 0.0
    #: Rows that failed (conversion or write): not tried again in this run.
    skip: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def fail(self, job: ColumnJob, change: _Change, reason: str) -> None:
        self.columns[job.column].fail(change.label, reason)
        self.skip.add(change.ctid)


class Progress(Protocol):
    """Told how far a table's pass is, in blocks; ``table`` is called again when later
    passes take the table's new tail."""

    def table(self, table: str, blocks: int) -> None: ...

    def advance(self, table: str, blocks: int, rows: int) -> None: ...


class _Quiet:
    def table(self, table: str, blocks: int) -> None:
        return None

    def advance(self, table: str, blocks: int, rows: int) -> None:
        return None


def describe_error(exc: BaseException) -> str:
    """A database error without its message or DETAIL, which can hold a value (a
    constraint's "Key (email)=(...)"): the SQLSTATE and the constraint's name."""
    sqlstate = getattr(exc, "sqlstate", None)
    constraint = getattr(exc, "constraint_name", None)
    text = f"SQLSTATE {sqlstate}" if sqlstate else type(exc).__name__
    return text + (f" ({constraint})" if constraint else "")


def _row_label(ctid: tuple[int, int], key_names: Sequence[str], key: Sequence[Any]) -> str:
    """How a failure names its row: its primary key (unprotected columns only), else its
    current ``ctid``. Never a protected value."""
    if key_names:
        return ", ".join(f"{n}={v}" for n, v in zip(key_names, key, strict=True))
    return f"ctid ({ctid[0]},{ctid[1]})"


def _check_prefix(check_value: bytes) -> str:
    """The first four characters of every envelope body the master key seals (its
    check value fills them exactly)."""
    return _b64.encode(check_value)


def _unconverted(job: ColumnJob, n: int) -> str:
    """SQL: the column's value is not in its stored form (``$n`` is the pattern)."""
    c = q(job.column)
    return f"({c} IS NOT NULL AND {c} !~ ${n})"


async def survey(conn: Any, jobs: Sequence[ColumnJob], check_value: bytes) -> TableReport:
    """Counts per column, and the reasons the table cannot be converted (if any)."""
    first = jobs[0]
    report = TableReport(first.table, {j.column: ColumnReport(j.key_id) for j in jobs})
    rel = await conn.fetchrow(_RELATION_SQL, first.schema_name, first.table_name)
    if rel is None:
        report.problems.append(f"table {first.table} does not exist")
        return report
    types = {r["attname"]: r["type"] for r in await conn.fetch(_COLUMNS_SQL, rel["name"])}
    for job in jobs:
        found = types.get(job.column)
        if found is None:
            report.problems.append(f"column {job.column} does not exist")
        elif found != "text":
            report.problems.append(
                f"column {job.column} is {found}, not text: stored values are longer than the "
                "plaintext (run the DDL of `pgcloak policy ddl` first)"
            )
    if report.problems:
        return report
    sums: list[str] = []
    args: list[str] = [_ENVELOPE_ANYWHERE]
    for job in jobs:
        c = q(job.column)
        args.append(job.pattern)
        n = len(args)
        at = f"strpos({c}, {_literal(ENVELOPE_PREFIX_TEXT)}) + {len(ENVELOPE_PREFIX_TEXT)}"
        sums.append(f"count(*) FILTER (WHERE {_unconverted(job, n)})")
        sums.append(f"count(*) FILTER (WHERE {c} ~ ${n} OR {c} ~ $1)")
        # Envelopes in any layout (with or without an index in front): a value of the
        # column's old layout is decrypted and stored again, so its key matters too.
        sums.append(f"count(*) FILTER (WHERE {c} ~ $1 AND substr({c}, {at}, 4) <> {_literal(_check_prefix(check_value))})")
    # ONLY: rows of tables that inherit from this one are theirs (a partitioned table's
    # rows are its partitions', so all of them).
    only = "" if rel["relkind"] == "p" else "ONLY "
    row = await conn.fetchrow(f"SELECT {', '.join(sums)} FROM {only}{rel['name']}", *args)
    for i, job in enumerate(jobs):
        col = report.columns[job.column]
        col.unconverted, col.stored, col.foreign_key = row[3 * i], row[3 * i + 1], row[3 * i + 2]
        if col.foreign_key:
            report.problems.append(
                f"column {job.column}: {col.foreign_key} stored value(s) sealed under another "
                "master key: is this the key pgcloak runs with?"
            )
    return report


#: An envelope, with or without a blind index in front, long enough to hold a header,
#: a nonce and a tag (so "pgc1:hello" is not one): its first four characters after the
#: prefix are the check value of the master key that sealed it.
_ENVELOPE_ANYWHERE = r"^([A-Za-z0-9_-]{22}\.)?pgc1:[A-Za-z0-9_-]{48,}$"


def _literal(text: str) -> str:
    """A SQL string literal of ASCII text pgcloak made (base64url, its own prefix)."""
    assert text.isascii() and "'" not in text and "\\" not in text
    return f"'{text}'"


@dataclass
class _Table:
    """What one table's pass needs: its name as SQL, its jobs, its statements."""

    name: str
    jobs: list[ColumnJob]
    #: The primary key's columns, to name a failed row by (empty: none, or protected).
    key: list[str]
    select_range: str
    select_sweep: str
    update: str
    patterns: list[str]
    #: What ``select_range`` takes after its two ctids (``rotate`` reads every value).
    range_args: list[str]


def _statements(name: str, jobs: list[ColumnJob], key: list[str], rotate: bool) -> _Table:
    cols = ", ".join([q(j.column) for j in jobs] + [q(k) for k in key])
    patterns = [j.pattern for j in jobs]
    unconverted = " OR ".join(_unconverted(j, i + 3) for i, j in enumerate(jobs))
    wanted = " OR ".join(f"{q(j.column)} IS NOT NULL" for j in jobs) if rotate else unconverted
    select_range = f"SELECT ctid, {cols} FROM ONLY {name} WHERE ctid >= $1::tid AND ctid < $2::tid AND ({wanted})"
    select_sweep = f"SELECT ctid, {cols} FROM ONLY {name} WHERE NOT (ctid = ANY($1::tid[])) AND ({unconverted}) LIMIT $2"
    # $1: ctids; per column k (0-based): $2+2k the new values (NULL: unchanged), $3+2k the
    # values read. A row whose values changed since they were read is not updated.
    sets = ", ".join(f"{q(j.column)} = COALESCE(v.n{k}, t.{q(j.column)})" for k, j in enumerate(jobs))
    unnest = ", ".join(["$1::tid[]"] + [f"${2 + 2 * k}::text[], ${3 + 2 * k}::text[]" for k in range(len(jobs))])
    names = ", ".join(["tid"] + [f"n{k}, o{k}" for k in range(len(jobs))])
    same = " AND ".join(f"t.{q(j.column)} IS NOT DISTINCT FROM v.o{k}" for k, j in enumerate(jobs))
    update = (
        f"UPDATE ONLY {name} AS t SET {sets} FROM unnest({unnest}) AS v({names}) "
        f"WHERE t.ctid = v.tid AND {same} RETURNING v.tid, t.ctid"
    )
    return _Table(name, jobs, key, select_range, select_sweep, update, patterns, [] if rotate else patterns)


@dataclass
class _Change:
    ctid: tuple[int, int]
    label: str
    old: list[str | None]
    new: list[str | None]
    outcomes: list[Outcome | None]


def _changes(
    table: _Table, rows: Sequence[Any], converter: Converter, rotate: bool, report: TableReport
) -> list[_Change]:
    out: list[_Change] = []
    width = len(table.jobs)
    for row in rows:
        ctid: tuple[int, int] = tuple(row[0])
        if ctid in report.skip:  # failed before (and moved by writing its other values)
            continue
        change = _Change(ctid, _row_label(ctid, table.key, row[1 + width :]), list(row[1 : 1 + width]), [], [])
        for job, value in zip(table.jobs, change.old, strict=True):
            result = None
            if value is not None:
                try:
                    result = converter.convert(job, value, rotate=rotate)
                except ConvertError as exc:
                    report.fail(job, change, str(exc))
            change.new.append(result[0] if result else None)
            change.outcomes.append(result[1] if result else None)
        if any(v is not None for v in change.new):
            out.append(change)
    return out


def _update_args(changes: Sequence[_Change], width: int) -> list[list[Any]]:
    args: list[list[Any]] = [[c.ctid for c in changes]]
    for k in range(width):
        args.append([c.new[k] for c in changes])
        args.append([c.old[k] for c in changes])
    return args


async def _write(conn: Any, table: _Table, changes: list[_Change], report: TableReport) -> set[tuple[int, int]]:
    """Write ``changes``; the ctids written (as read). A batch the database refuses is
    written row by row; the refused rows are reported (never with the database's message,
    which can quote a value)."""
    if not changes:
        return set()
    width = len(table.jobs)
    moved: dict[tuple[int, int], tuple[int, int]] = {}
    try:
        async with conn.transaction():
            moved = {tuple(r[0]): tuple(r[1]) for r in await conn.fetch(table.update, *_update_args(changes, width))}
    except asyncpg.PostgresError:
        # Row by row, each its own transaction (a deferred constraint fails at COMMIT).
        for change in changes:
            try:
                async with conn.transaction():
                    rows = await conn.fetch(table.update, *_update_args([change], width))
            except asyncpg.PostgresError as exc:
                reason = f"refused by PostgreSQL: {describe_error(exc)}"
                for job, outcome in zip(table.jobs, change.outcomes, strict=True):
                    if outcome is not None:
                        report.fail(job, change, reason)
                continue
            moved.update((tuple(r[0]), tuple(r[1])) for r in rows)
    # A row that failed in one column was written in the others: it has a new ctid.
    report.skip.update(moved[c] for c in report.skip.intersection(moved))
    done = set(moved)
    for change in changes:
        if change.ctid in done:
            _count(table, change, report)
        elif change.ctid not in report.skip:
            report.raced += 1
    return done


def _count(table: _Table, change: _Change, report: TableReport) -> None:
    report.rows_updated += 1
    for job, outcome in zip(table.jobs, change.outcomes, strict=True):
        if outcome is not None:
            report.columns[job.column].count(outcome)


async def _pass(
    conn: Any,
    table: _Table,
    converter: Converter,
    report: TableReport,
    progress: Progress,
    start: int,
    end: int,
    step: int,
    rotate: bool,
    dry_run: bool,
) -> None:
    """One pass over blocks ``[start, end)`` (``dry_run``: count, write nothing)."""
    for lo in range(start, end, step):
        hi = min(lo + step, end)
        rows = await conn.fetch(table.select_range, (lo, 0), (hi, 0), *table.range_args)
        changes = _changes(table, rows, converter, rotate, report)
        if dry_run:
            for change in changes:
                _count(table, change, report)
        else:
            await _write(conn, table, changes, report)
        progress.advance(report.table, hi - lo, len(changes))


async def _sweep(
    conn: Any, table: _Table, converter: Converter, report: TableReport, batch: int, rotate: bool
) -> None:
    """Plaintext left anywhere (rows moved into ranges already passed)."""
    tried: set[tuple[int, int]] = set()
    while True:
        rows = await conn.fetch(table.select_sweep, list(report.skip | tried), batch, *table.patterns)
        if not rows:
            return
        changes = _changes(table, rows, converter, rotate, report)
        done = await _write(conn, table, changes, report)
        # A row not written (it changed again meanwhile): not again in this run.
        tried.update(c for r in rows if (c := tuple(r[0])) not in done)


async def backfill(
    conn: Any,
    jobs: Sequence[ColumnJob],
    converter: Converter,
    *,
    batch_rows: int = 1000,
    rotate: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> TableReport:
    """Convert one table's protected columns (``jobs``, all of one table); see the module
    docstring. Call :func:`survey` first: this one assumes the table is fit. A
    partitioned table is done partition by partition (a ctid is a partition's own)."""
    started = time.monotonic()
    progress = progress or _Quiet()
    first = jobs[0]
    report = TableReport(first.table, {j.column: ColumnReport(j.key_id) for j in jobs})
    rel = await conn.fetchrow(_RELATION_SQL, first.schema_name, first.table_name)
    assert rel is not None
    protected = {j.column for j in jobs}
    key = [r["attname"] for r in await conn.fetch(_KEY_SQL, rel["name"])]
    key = [] if protected & set(key) else key
    relations = [rel] if rel["relkind"] == "r" else list(await conn.fetch(_LEAVES_SQL, rel["name"]))
    total = sum(int(r["blocks"]) for r in relations)
    progress.table(report.table, total)
    for relation in relations:
        report.skip.clear()  # ctids are per relation
        table = _statements(relation["name"], list(jobs), key, rotate)
        pages, tuples = relation["relpages"], relation["reltuples"]
        per_block = tuples / pages if pages > 0 and tuples > 0 else 100.0
        step = max(1, int(batch_rows / max(per_block, 1.0)))
        start, end = 0, int(relation["blocks"])
        for _ in range(1 + (0 if dry_run else MAX_TAIL_PASSES)):
            if start >= end:
                break
            await _pass(conn, table, converter, report, progress, start, end, step, rotate, dry_run)
            start, end = end, int(await conn.fetchval(_BLOCKS_SQL, relation["name"]))
            if end > start:
                total += end - start
                progress.table(report.table, total)  # our writes (and others') grew it
        if not dry_run:
            await _sweep(conn, table, converter, report, batch_rows, rotate)
    report.seconds = time.monotonic() - started
    return report


def merged(survey_report: TableReport, run: TableReport) -> TableReport:
    """The survey's counts with the run's results (for one printed report)."""
    columns = {
        name: dataclasses.replace(
            col,
            unconverted=survey_report.columns[name].unconverted,
            foreign_key=survey_report.columns[name].foreign_key,
            stored=survey_report.columns[name].stored,
        )
        for name, col in run.columns.items()
    }
    return dataclasses.replace(run, columns=columns)
