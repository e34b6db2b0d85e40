"""Verify audit trails: every chain intact, sealed at shutdown, and what was dropped.

Pure over lines: the caller reads files (or a table) and passes
``(source name, lines)`` pairs. Each chain is checked on its own, whether it has a file
of its own or is interleaved with other chains (several workers writing one stream).
A chain that spans rotated files is put back together by the ``seq`` at which each
file's part starts, so the order in which the files are given does not matter; inside
one file, the order of the lines is what is checked.

For each chain the *first* problem is reported, classified as

* ``edited``: the record's MAC does not match its contents;
* ``inserted``: a record that does not belong (a forged MAC the chain skips over, or a
  copy of an earlier record);
* ``deleted``: records are missing (a ``seq`` gap that no later record fills);
* ``reordered``: a record comes before one with a smaller ``seq``;
* ``tail_cut``: the chain does not end with a shutdown seal;

plus every line that is not a chained JSON record (``unparseable``). A chain that began
where records already were starts with a ``start`` record naming the chain before it
and where that ended: that chain must be there, ending exactly there (``deleted`` if it
is missing or ends early: a whole run removed), but for ``require_genesis=False``. ``gap`` records
(events dropped by ``on_full: drop``) are not tampering; they are listed as findings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pgcloak.audit.chain import GENESIS, MIN_KEY_BYTES, mac_ok

__all__ = ["ChainSummary", "GapFinding", "Problem", "ProblemKind", "VerifyReport", "verify"]

ProblemKind = Literal["edited", "deleted", "inserted", "reordered", "tail_cut", "unparseable"]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain (or an unparseable line)."""

    kind: ProblemKind
    file: str
    line: int
    seq: int | None
    chain: str | None
    detail: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        what = f"seq {self.seq} of chain {self.chain}" if self.chain is not None else "line"
        return f"{where}: {what}: {self.kind.replace('_', ' ')}: {self.detail}"


@dataclass(frozen=True, slots=True)
class GapFinding:
    """A ``gap`` record: ``count`` events were dropped because the queue was full."""

    file: str
    line: int
    seq: int
    chain: str
    count: int
    first_ts: str | None
    last_ts: str | None

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: seq {self.seq} of chain {self.chain}: gap: {self.count} "
            f"event(s) dropped (queue full) between {self.first_ts} and {self.last_ts}"
        )


@dataclass(slots=True)
class ChainSummary:
    """What verify saw of one chain."""

    chain: str
    records: int = 0
    events: int = 0
    seals: int = 0
    dropped: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_ts: str | None = None
    last_ts: str | None = None
    sealed: bool = False
    files: list[str] = field(default_factory=list)
    #: The MAC of the last record that fits the chain.
    last_mac: str | None = None
    #: The chain this one continues (its first record, ``start``, names it), if any.
    follows: str | None = None


@dataclass(slots=True)
class VerifyReport:
    """The outcome of :func:`verify`: ``ok`` unless some chain has a problem."""

    chains: dict[str, ChainSummary] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    gaps: list[GapFinding] = field(default_factory=list)
    #: Open chains (``allow_open=True``): not a failure, but not proven complete.
    warnings: list[Problem] = field(default_factory=list)
    lines: int = 0
    #: Lines skipped with ``ignore_foreign=True``.
    foreign: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None


@dataclass(slots=True)
class _Rec:
    fi: int
    file: str
    line: int
    seq: int
    chain: str
    prev: str
    mac: str
    ok: bool
    type: str
    reason: Any
    count: Any
    ts: Any
    first_ts: Any
    last_ts: Any
    follows: Any


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse(line: str) -> dict[str, Any] | str:
    """The record, or why the line is not one."""
    try:
        obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:
        return f"not valid JSON ({str(exc).split(':')[0]})"
    except RecursionError:  # a hostile line: "[[[[..." thousands deep
        return "not valid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        return "not a JSON object"
    seq, chain = obj.get("seq"), obj.get("chain")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "no valid 'seq'"
    if not isinstance(chain, str) or not chain:
        return "no valid 'chain'"
    if not isinstance(obj.get("prev"), str) or not isinstance(obj.get("mac"), str):
        return "no 'prev'/'mac'"
    return obj


def verify(
    lines_by_file: Iterable[tuple[str, Iterable[str]]],
    key: bytes,
    *,
    allow_open: bool = False,
    require_genesis: bool = True,
    ignore_foreign: bool = False,
) -> VerifyReport:
    """Check every chain found in the given sources.

    ``allow_open``: a chain that does not end with a shutdown seal (a proxy still
    running) is a warning, not a problem, unless a later chain names it as the one before
    it (that proxy restarted). ``require_genesis=False`` accepts chains whose
    first records were removed on purpose (retention), checking from the first seen.
    ``ignore_foreign``: skip lines that are not audit records (a collected stdout stream
    with other output in it) and only count them; a damaged record still shows, as a
    hole in its chain.
    """
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the audit key must be at least {MIN_KEY_BYTES} bytes")
    report = VerifyReport()
    # chain -> file index -> records in line order
    segments: dict[str, dict[int, list[_Rec]]] = {}
    order: dict[str, int] = {}
    for fi, (name, lines) in enumerate(lines_by_file):
        order.setdefault(name, fi)
        for lineno, raw in enumerate(lines, start=1):
            text = raw.rstrip("\r\n")
            if not text.strip():
                continue
            report.lines += 1
            parsed = _parse(text)
            if isinstance(parsed, str):
                if ignore_foreign:
                    report.foreign += 1
                else:
                    report.problems.append(Problem("unparseable", name, lineno, None, None, parsed))
                continue
            rec = _Rec(
                fi=fi,
                file=name,
                line=lineno,
                seq=parsed["seq"],
                chain=parsed["chain"],
                prev=parsed["prev"],
                mac=parsed["mac"],
                ok=mac_ok(key, parsed),
                type=str(parsed.get("type")),
                reason=parsed.get("reason"),
                count=parsed.get("count"),
                ts=parsed.get("ts"),
                first_ts=parsed.get("first_ts"),
                last_ts=parsed.get("last_ts"),
                follows=parsed.get("follows"),
            )
            segments.setdefault(rec.chain, {}).setdefault(fi, []).append(rec)

    chains: dict[str, list[_Rec]] = {}
    for chain_id, by_file in segments.items():
        parts = sorted(by_file.items(), key=lambda item: (_start(item[1]), item[0]))
        chains[chain_id] = [r for _, part in parts for r in part]
    # A chain that a later one names as the one before it has ended: with allow_open, it
    # must be sealed all the same (only a chain nothing follows may be still running).
    follows = {chain_id: _follows_chain(recs[0]) for chain_id, recs in chains.items()}
    ended = set(follows.values()) - {None}
    for chain_id, recs in chains.items():
        _check_chain(chain_id, recs, report, allow_open=allow_open and chain_id not in ended, require_genesis=require_genesis)
    for chain_id, before in follows.items():
        if before is not None and report.chains[chain_id].first_seq == 1:
            _check_follows(chains[chain_id][0], before, report, require_genesis=require_genesis)

    report.problems.sort(key=lambda p: (order.get(p.file, 0), p.line))
    report.warnings.sort(key=lambda p: (order.get(p.file, 0), p.line))
    report.chains = dict(sorted(report.chains.items()))
    return report


def _starts_file(r: _Rec, chain_id: str) -> bool:
    """Whether ``r`` is the record a rotation begins a new file with: it names the record
    before it, of its own chain (so nothing before it in that file was removed)."""
    follows = r.follows
    return (
        r.type == "start"
        and isinstance(follows, dict)
        and follows.get("chain") == chain_id
        and follows.get("seq") == r.seq - 1
        and follows.get("mac") == r.prev
    )


def _start(part: list[_Rec]) -> int:
    """Where a file's part of a chain starts: the seq of its first record with a valid MAC
    (a forged first line, with any seq, must not decide where the file goes)."""
    return next((r.seq for r in part if r.ok), part[0].seq)


def _check_follows(start: _Rec, chain: str, report: VerifyReport, *, require_genesis: bool) -> None:
    """A chain's ``start`` record names the chain written before it (``chain``, from
    :func:`_follows_chain`) and where that one ended: it must be there (but for
    ``require_genesis=False``: retention removed old files), ending exactly there. So a
    run deleted whole between two others shows."""
    seq, mac = start.follows.get("seq"), start.follows.get("mac")
    report.chains[start.chain].follows = chain
    before = report.chains.get(chain)

    def fail(kind: ProblemKind, detail: str) -> None:
        report.problems.append(Problem(kind, start.file, start.line, start.seq, start.chain, detail))

    if before is None:
        if require_genesis:
            fail("deleted", f"the chain before this one, {chain} (up to seq {seq}), is missing: "
                 "a whole run's records were removed")
    elif before.last_seq == seq and before.last_mac == mac:
        return
    elif before.last_seq is not None and isinstance(seq, int) and before.last_seq < seq:
        fail("deleted", f"this chain follows seq {seq} of {chain}, which ends at seq {before.last_seq}: "
             f"its records after that were removed")
    else:
        fail("inserted", f"this chain follows seq {seq} of {chain}, but that chain goes on past it "
             f"or differs there (seq {before.last_seq})")


def _follows_chain(r: _Rec) -> str | None:
    """The chain that ``r`` names as the one before its own, if ``r`` is a chain's first
    record (a ``start`` record at seq 1 with a valid MAC); else None."""
    follows = r.follows
    if r.ok and r.seq == 1 and r.type == "start" and isinstance(follows, dict):
        chain = follows.get("chain")
        if isinstance(chain, str) and chain != r.chain:
            return chain
    return None


def _check_chain(
    chain_id: str,
    recs: list[_Rec],
    report: VerifyReport,
    *,
    allow_open: bool,
    require_genesis: bool,
) -> None:
    summary = ChainSummary(chain=chain_id)
    report.chains[chain_id] = summary
    for r in recs:
        if r.file not in summary.files:
            summary.files.append(r.file)
    later: dict[int, int] = {}  # seq -> last index of a record with a valid MAC
    for i, r in enumerate(recs):
        if r.ok:
            later[r.seq] = i
    seen: dict[str, _Rec] = {}
    expected, prev = 1, GENESIS
    last_seal: _Rec | None = None
    last: _Rec | None = None

    def fail(kind: ProblemKind, r: _Rec, detail: str) -> None:
        report.problems.append(Problem(kind, r.file, r.line, r.seq, chain_id, detail))

    for i, r in enumerate(recs):
        if i == 0 and not require_genesis and r.ok:
            if r.seq == 1 or _starts_file(r, chain_id):
                expected, prev = r.seq, r.prev
            else:
                fail("deleted", r, f"the first record left (seq {r.seq}) does not start a file: records "
                     "were removed from inside one (--partial accepts whole files removed, the oldest)")
                return
        if not r.ok:
            nxt = recs[i + 1] if i + 1 < len(recs) else None
            if nxt is not None and nxt.ok and nxt.seq == expected and nxt.prev == prev:
                fail("inserted", r, "a record with an invalid MAC that the chain skips over "
                     "(not written by pgcloak)")
            else:
                fail("edited", r, "the MAC does not match the record's contents")
            return
        if r.seq == expected and r.prev == prev:
            pass
        elif r.mac in seen:
            orig = seen[r.mac]
            fail("inserted", r, f"a copy of seq {orig.seq} ({orig.file}:{orig.line})")
            return
        elif r.seq > expected:
            moved = [s for s in range(expected, r.seq) if later.get(s, -1) > i]
            if moved:
                j = later[moved[0]]
                fail("reordered", r, f"seq {r.seq} comes before seq {moved[0]} "
                     f"({recs[j].file}:{recs[j].line})")
            else:
                n = r.seq - expected
                span = f"seq {expected}" if n == 1 else f"seq {expected}-{r.seq - 1}"
                where = "at the start of the chain" if expected == 1 else "before this record"
                fail("deleted", r, f"{n} record(s) missing {where} ({span})")
            return
        else:
            fail("inserted", r, f"seq {r.seq} does not link to the previous record "
                 f"(expected seq {expected})")
            return
        # The record fits.
        seen[r.mac] = r
        expected, prev, last = r.seq + 1, r.mac, r
        summary.records += 1
        if summary.first_seq is None:
            summary.first_seq, summary.first_ts = r.seq, r.ts
        summary.last_seq, summary.last_ts, summary.last_mac = r.seq, r.ts, r.mac
        if r.type == "start":
            pass  # checked with the chain it names (_check_follows)
        elif r.type == "seal":
            summary.seals += 1
            last_seal = r
        elif r.type == "gap":
            count = r.count if isinstance(r.count, int) else 0
            summary.dropped += count
            report.gaps.append(
                GapFinding(r.file, r.line, r.seq, chain_id, count, r.first_ts, r.last_ts)
            )
        else:
            summary.events += 1

    if last is None:
        return
    summary.sealed = last.type == "seal" and last.reason == "shutdown"
    if not summary.sealed:
        sealed_at = (
            f"last seal at seq {last_seal.seq} ({last_seal.ts})" if last_seal else "no seal at all"
        )
        problem = Problem(
            "tail_cut",
            last.file,
            last.line,
            last.seq,
            chain_id,
            f"the chain ends at seq {last.seq} without a shutdown seal ({sealed_at}): events "
            f"after seq {last.seq} may have been cut, or the proxy did not shut down cleanly",
        )
        (report.warnings if allow_open else report.problems).append(problem)
