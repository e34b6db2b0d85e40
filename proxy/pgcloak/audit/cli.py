"""``pgcloak audit verify`` and ``pgcloak audit who-accessed``: functions returning exit codes.

``cli.py`` wires argparse and computes what needs pgcloak.crypto (the audit key, the
blind index of the value asked about); these functions read the trail from files
(``.gz`` too) or from a PostgreSQL sink table, and print to ``out``.

Exit codes: 0 = OK / found, 1 = a problem / nothing found, 2 = cannot read the input.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

from pgcloak.audit.chain import mac_ok
from pgcloak.audit.sinks import SinkError, iter_file_lines, read_table_lines, redact_dsn
from pgcloak.audit.verify import VerifyReport
from pgcloak.audit.verify import verify as verify_lines

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_PROBLEM", "KeySource", "verify", "who_accessed"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_ERROR = 2

#: The audit key, or a callable that loads it (called once, only when needed).
KeySource = bytes | Callable[[], bytes]


#: Control characters (C0, DEL, C1): a forged record could move the cursor or erase a
#: line on the reader's terminal (making FAILED read OK); they are printed escaped.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters and lone surrogates escaped."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _key(source: KeySource) -> bytes:
    return source() if callable(source) else source


def _sources(files: Sequence[Path], dsn: str | None) -> list[tuple[str, Iterable[str]]]:
    """``(name, lines)`` per file, and per chain of the table when ``dsn`` is given."""
    out: list[tuple[str, Iterable[str]]] = [(str(p), iter_file_lines(p)) for p in files]
    if dsn is not None:
        rows = asyncio.run(read_table_lines(dsn))
        by_chain: dict[str, list[str]] = {}
        for chain, line in rows:
            by_chain.setdefault(chain, []).append(line)
        safe = redact_dsn(dsn)
        out += [(f"{safe}#{chain}", lines) for chain, lines in by_chain.items()]
    return out


def _check_inputs(files: Sequence[Path], dsn: str | None, err: TextIO) -> bool:
    if not files and dsn is None:
        print("error: no audit file or table given", file=err)
        return False
    missing = [p for p in files if not p.is_file()]
    for p in missing:
        print(f"error: {p}: no such file", file=err)
    return not missing


def format_report(report: VerifyReport) -> list[str]:
    """Human-readable lines for a verify report."""
    lines: list[str] = []
    n_files = len({f for c in report.chains.values() for f in c.files})
    records = sum(c.records for c in report.chains.values())
    if report.ok:
        lines.append(
            f"OK: {len(report.chains)} chain(s), {records} record(s) in {n_files} source(s)"
        )
    else:
        first = report.first_problem
        lines.append(f"FAILED: {first}")
    for c in report.chains.values():
        state = "sealed at shutdown" if c.sealed else "open (no shutdown seal)"
        lines.append(
            f"  chain {c.chain}: seq {c.first_seq}-{c.last_seq}, {c.events} event(s), "
            f"{c.seals} seal(s), {state}, {c.first_ts} .. {c.last_ts}"
            + (f", {c.dropped} event(s) dropped" if c.dropped else "")
            + (f", follows {c.follows}" if c.follows else "")
        )
    for gap in report.gaps:
        lines.append(f"  finding: {gap}")
    for warning in report.warnings:
        lines.append(f"  warning: {warning}")
    for problem in report.problems[1:]:
        lines.append(f"  also: {problem}")
    if report.foreign:
        lines.append(f"  skipped {report.foreign} line(s) that are not audit records")
    return lines


def verify(
    files: Sequence[Path],
    key: KeySource,
    *,
    dsn: str | None = None,
    allow_open: bool = False,
    require_genesis: bool = True,
    ignore_foreign: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Verify audit files (any order; rotated files included) and/or a sink table.

    Prints ``OK`` with per-chain counts, or ``FAILED`` and the first bad record (file,
    line, seq, what is wrong). ``allow_open`` accepts chains of a proxy still running;
    ``require_genesis=False`` accepts chains whose oldest files were deleted (retention);
    ``ignore_foreign`` skips non-audit lines (a collected stdout stream).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if not _check_inputs(files, dsn, err):
        return EXIT_ERROR
    try:
        report = verify_lines(
            _sources(files, dsn),
            _key(key),
            allow_open=allow_open,
            require_genesis=require_genesis,
            ignore_foreign=ignore_foreign,
        )
    except (OSError, SinkError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    if not report.chains and report.ok:
        print("FAILED: no audit records found", file=out)
        return EXIT_PROBLEM
    for line in format_report(report):
        print(printable(line), file=out)
    return EXIT_OK if report.ok else EXIT_PROBLEM


def _events(sources: Iterable[tuple[str, Iterable[str]]]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for name, lines in sources:
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
            except (ValueError, RecursionError):  # not a record (nested past any of ours)
                continue
            if isinstance(event, dict):
                yield name, lineno, event


def _match(
    event: dict[str, Any], key_id: str, wanted: set[str], include_column_access: bool
) -> str | None:
    if event.get("type") not in ("statement", "refusal"):
        return None
    lookups = event.get("lookups")
    if isinstance(lookups, dict):
        values = lookups.get(key_id)
        if isinstance(values, list) and wanted.intersection(v for v in values if isinstance(v, str)):
            return "lookup"
    if include_column_access:
        for name in ("columns_read", "columns_written", "pii"):
            cols = event.get(name)
            if isinstance(cols, list) and key_id in cols:
                return "column"
    return None


def _text_line(event: dict[str, Any], how: str, verified: bool | None) -> str:
    def g(name: str) -> str:
        value = event.get(name)
        return "-" if value is None else str(value)

    parts = [
        g("ts"),
        f"{g('type')}/{g('kind')}",
        g("decision"),
        f"user={g('user')}",
        f"db={g('database')}",
        f"client={g('client')}",
        f"app={g('application_name')}",
        f"session={g('session')}",
        f"rows={g('rows')}",
        f"match={how}",
    ]
    masked = event.get("masked")
    if isinstance(masked, list) and masked:
        parts.append("masked=" + ",".join(str(m) for m in masked))
    if verified is False:
        parts.append("MAC-INVALID")
    return "  ".join(parts) + f"\n    {g('fingerprint')}"


def who_accessed(
    files: Sequence[Path],
    key_id: str,
    index_values: Sequence[str],
    *,
    dsn: str | None = None,
    key: KeySource | None = None,
    include_column_access: bool = False,
    fmt: Literal["text", "json"] = "text",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Every statement/refusal event whose ``lookups[key_id]`` holds one of ``index_values``.

    ``index_values`` are blind indexes of the subject's value (the caller computes them;
    the trail never holds the value itself). ``include_column_access`` also lists events
    that read or wrote the column without a lookup (e.g. a scan: it may have returned
    the subject's row). With ``key``, events whose MAC does not verify are flagged.
    Events are printed in time order, as text or as the original JSON lines.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if not _check_inputs(files, dsn, err):
        return EXIT_ERROR
    wanted = set(index_values)
    secret = _key(key) if key is not None else None
    found: list[tuple[str, dict[str, Any], str, bool | None]] = []
    try:
        for _name, _line, event in _events(_sources(files, dsn)):
            how = _match(event, key_id, wanted, include_column_access)
            if how is not None:
                verified = mac_ok(secret, event) if secret is not None else None
                found.append((str(event.get("ts", "")), event, how, verified))
    except (OSError, SinkError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    found.sort(key=lambda item: item[0])
    for _ts, event, how, verified in found:
        if fmt == "json":
            print(json.dumps(event, sort_keys=True, ensure_ascii=True), file=out)  # escapes every control
        else:
            print(printable(_text_line(event, how, verified)), file=out)
    if fmt == "text":
        print(f"{len(found)} event(s) for {key_id}", file=out)
    return EXIT_OK if found else EXIT_PROBLEM
