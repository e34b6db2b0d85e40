"""verify(): every kind of tampering is named at the first bad record; gaps are findings."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pgcloak.audit.chain import Chain, compute_mac
from pgcloak.audit.events import SessionInfo, gap_event, start_event, statement_event
from pgcloak.audit.verify import VerifyReport, verify

KEY = b"k" * 32
INFO = SessionInfo(session="s1", user="app", database="db", client="127.0.0.1:1", worker=0)


def trail(n: int = 8, *, chain_id: str = "w0-test", shutdown: bool = True) -> list[str]:
    """``n`` statement events, a periodic seal after the 4th, a shutdown seal at the end."""
    chain = Chain(KEY, chain_id, worker=0)
    lines = []
    for i in range(n):
        lines.append(chain.append(statement_event(INFO, kind="select", fingerprint=f"SELECT {i}")).line)
        if i == 3:
            lines.append(chain.seal("periodic").line)
    if shutdown:
        lines.append(chain.seal("shutdown").line)
    return lines


def check(*files: list[str], **kw: bool) -> VerifyReport:
    return verify([(f"f{i}", lines) for i, lines in enumerate(files)], KEY, **kw)


def seq_of(line: str) -> int:
    seq: int = json.loads(line)["seq"]
    return seq


def test_an_intact_trail_is_ok() -> None:
    lines = trail()
    report = check(lines)
    assert report.ok and report.first_problem is None
    (summary,) = report.chains.values()
    assert summary.records == len(lines) == 10
    assert (summary.events, summary.seals, summary.first_seq, summary.last_seq) == (8, 2, 1, 10)
    assert summary.sealed and summary.files == ["f0"]
    assert report.lines == 10 and not report.gaps


def test_edited_field() -> None:
    lines = trail()
    record = json.loads(lines[2])
    record["user"] = "someone_else"
    lines[2] = json.dumps(record)
    report = check(lines)
    problem = report.first_problem
    assert problem is not None and not report.ok
    assert (problem.kind, problem.file, problem.line, problem.seq) == ("edited", "f0", 3, 3)
    assert "MAC" in problem.detail
    assert str(problem).startswith("f0:3: seq 3 of chain w0-test: edited")


def test_edited_last_record_and_edited_seq() -> None:
    lines = trail()
    last = json.loads(lines[-1])
    last["reason"] = "periodic"
    lines[-1] = json.dumps(last)
    problem = check(lines).first_problem
    assert problem is not None and (problem.kind, problem.line) == ("edited", len(lines))

    lines = trail()
    record = json.loads(lines[4])
    record["seq"] = 99
    lines[4] = json.dumps(record)
    problem = check(lines).first_problem
    assert problem is not None and (problem.kind, problem.line) == ("edited", 5)


def test_edited_with_a_recomputed_mac_under_another_key() -> None:
    lines = trail()
    record = json.loads(lines[1])
    record["rows"] = 1000
    record["mac"] = compute_mac(b"x" * 32, record)
    lines[1] = json.dumps(record)
    problem = check(lines).first_problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("edited", 2, 2)


def test_deleted_line() -> None:
    lines = trail()
    del lines[3]  # seq 4
    problem = check(lines).first_problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("deleted", 4, 5)
    assert "seq 4" in problem.detail and "1 record" in problem.detail


def test_deleted_several_and_deleted_first() -> None:
    lines = trail()
    del lines[2:5]
    problem = check(lines).first_problem
    assert problem is not None and problem.kind == "deleted" and "seq 3-5" in problem.detail

    lines = trail()
    del lines[0]
    problem = check(lines).first_problem
    assert problem is not None and problem.kind == "deleted" and problem.line == 1
    assert "start of the chain" in problem.detail
    # --partial accepts whole files removed, not the first lines of one.
    problem = check(lines, require_genesis=False).first_problem
    assert problem is not None and problem.kind == "deleted" and "does not start a file" in problem.detail


def test_inserted_forged_line() -> None:
    lines = trail()
    forged = json.loads(lines[2])
    forged.update(id="f" * 32, user="mallory", seq=4, prev=json.loads(lines[2])["mac"], mac="0" * 64)
    lines.insert(3, json.dumps(forged))
    problem = check(lines).first_problem
    assert problem is not None and (problem.kind, problem.line) == ("inserted", 4)


def test_inserted_copy_of_an_earlier_line() -> None:
    lines = trail()
    lines.insert(5, lines[1])
    problem = check(lines).first_problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("inserted", 6, 2)
    assert "copy of seq 2" in problem.detail


def test_swapped_lines_are_reordered() -> None:
    lines = trail()
    lines[3], lines[5] = lines[5], lines[3]  # seq 4 <-> seq 6
    problem = check(lines).first_problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("reordered", 4, 6)
    assert "before seq 4" in problem.detail


def test_tail_cut() -> None:
    lines = trail()[:-3]
    report = check(lines)
    problem = report.first_problem
    assert problem is not None and problem.kind == "tail_cut"
    assert problem.seq == seq_of(lines[-1]) == 7
    assert "events after seq 7 may have been cut, or the proxy did not shut down cleanly" in problem.detail
    assert "last seal at seq 5" in problem.detail
    assert str(problem).count("tail cut") == 1
    # A running proxy's trail: the open tail is a warning, not a failure.
    open_report = check(lines, allow_open=True)
    assert open_report.ok and open_report.warnings[0].kind == "tail_cut"
    assert not open_report.chains["w0-test"].sealed


def test_cutting_only_the_shutdown_seal_is_a_tail_cut() -> None:
    problem = check(trail()[:-1]).first_problem
    assert problem is not None and problem.kind == "tail_cut"


def test_gap_records_are_findings_not_failures() -> None:
    chain = Chain(KEY, "c")
    now = datetime(2024, 5, 1, tzinfo=UTC)
    lines = [
        chain.append(statement_event(INFO, kind="select", fingerprint="SELECT 1")).line,
        chain.append(gap_event(count=17, worker=0, first_ts=now, last_ts=now)).line,
        chain.append(statement_event(INFO, kind="select", fingerprint="SELECT 2")).line,
        chain.seal("shutdown").line,
    ]
    report = check(lines)
    assert report.ok
    (gap,) = report.gaps
    assert (gap.line, gap.seq, gap.count) == (2, 2, 17)
    assert "17 event(s) dropped" in str(gap)
    assert report.chains["c"].dropped == 17 and report.chains["c"].events == 2


@pytest.mark.parametrize(
    "junk", ["not json", "[1,2]", '{"seq": 1}', '{"seq":0,"chain":"c","prev":"","mac":""}', "{"]
)
def test_unparseable_lines(junk: str) -> None:
    lines = trail()
    lines.insert(2, junk)
    report = check(lines)
    problem = report.first_problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("unparseable", 3, None)


def test_foreign_lines_can_be_skipped_but_damage_still_shows() -> None:
    lines = trail()
    lines.insert(2, "2024-05-01T12:00:00Z info some log line")
    report = check(lines, ignore_foreign=True)
    assert report.ok and report.foreign == 1
    lines[4] = lines[4][:40]  # a record cut in half: skipped, but its chain has a hole
    problem = check(lines, ignore_foreign=True).first_problem
    assert problem is not None and problem.kind == "deleted"


def test_duplicate_keys_are_unparseable() -> None:
    lines = trail()
    lines[1] = '{"user":"mallory",' + lines[1][1:]
    problem = check(lines).first_problem
    assert problem is not None and problem.kind == "unparseable" and "duplicate" in problem.detail


def test_wrong_key_fails_at_the_first_record() -> None:
    report = verify([("f", trail())], b"z" * 32)
    problem = report.first_problem
    assert problem is not None and (problem.kind, problem.line) == ("edited", 1)
    with pytest.raises(ValueError):
        verify([("f", trail())], b"short")


def test_blank_lines_and_crlf_are_tolerated() -> None:
    lines = [line + "\r\n" for line in trail()]
    lines.insert(3, "\n")
    assert check(lines).ok


def test_multiple_chains_interleaved() -> None:
    a, b = trail(6, chain_id="w0-a"), trail(9, chain_id="w1-b")
    mixed = []
    for i in range(max(len(a), len(b))):
        mixed += a[i : i + 1] + b[i : i + 1]
    report = check(mixed)
    assert report.ok and set(report.chains) == {"w0-a", "w1-b"}
    assert report.chains["w1-b"].events == 9

    # Tamper with chain b only: the problem names chain b.
    mixed.remove(b[4])
    report = check(mixed)
    assert not report.ok and len(report.problems) == 1
    problem = report.first_problem
    assert problem is not None and problem.chain == "w1-b" and problem.kind == "deleted"
    assert report.chains["w0-a"].sealed


def test_each_chain_in_its_own_file_and_first_problem_by_position() -> None:
    a, b = trail(chain_id="w0-a"), trail(chain_id="w1-b")
    a_cut = a[:-1]
    b_edit = list(b)
    b_edit[1] = b_edit[1].replace('"app"', '"root"')
    report = check(a_cut, b_edit)
    assert [p.kind for p in report.problems] == ["tail_cut", "edited"]
    assert report.first_problem is not None and report.first_problem.file == "f0"


def test_rotation_keeps_the_chain_verifiable_in_any_file_order() -> None:
    lines = trail(20)
    parts = [lines[:7], lines[7:15], lines[15:]]
    report = verify([("audit.jsonl", parts[2]), ("audit.jsonl.2", parts[0]), ("audit.jsonl.1", parts[1])], KEY)
    assert report.ok
    assert report.chains["w0-test"].files == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]

    # A whole rotated file removed: deleted, at the first record after the hole.
    report = verify([("audit.jsonl.2", parts[0]), ("audit.jsonl", parts[2])], KEY)
    problem = report.first_problem
    assert problem is not None and problem.kind == "deleted" and problem.file == "audit.jsonl"
    assert problem.seq == seq_of(parts[2][0])


def test_empty_input() -> None:
    report = check([])
    assert report.ok and not report.chains


@pytest.mark.parametrize(
    ("hostile", "kinds"),
    [
        ("[" * 100_000, {"unparseable"}),  # json.loads: RecursionError
        # Parses or not, by how deep the stack already is; if it does, re-encoding it for
        # its MAC goes deeper than the encoder can (RecursionError in mac_ok).
        ('{"seq":9,"chain":"w0-test","prev":"x","mac":"y","z":' + "[" * 992 + "]" * 992 + "}", {"unparseable", "edited"}),
        ('{"seq":9,"chain":"w0-test","prev":"x","mac":"\u00e9"}', {"edited"}),  # compare_digest: TypeError
    ],
)
def test_hostile_lines_are_reported_not_crashed_on(hostile: str, kinds: set[str]) -> None:
    report = check([*trail(), hostile])
    assert not report.ok and report.first_problem is not None
    assert report.first_problem.kind in kinds and report.first_problem.line == 11


def _following(before: list[str], chain_id: str, n: int = 3) -> list[str]:
    """A chain (no shutdown seal yet) whose first record names ``before``'s last record."""
    last = json.loads(before[-1])
    chain = Chain(KEY, chain_id, worker=0)
    lines = [chain.append(start_event(worker=0, follows={"chain": last["chain"], "seq": last["seq"], "mac": last["mac"]})).line]
    return lines + [chain.append(statement_event(INFO, kind="select", fingerprint=f"R{i}")).line for i in range(n)]


def test_live_lets_a_chain_be_open_unless_a_later_one_follows_it() -> None:
    """--live: the running proxy's chain has no shutdown seal yet. A chain that a later
    one names as the one before it has ended: its cut tail is still a problem. Clocks do
    not matter (this restart's chain id is stamped earlier than the crashed one's)."""
    older, newer = "w0-20240501T120000.000000Z-aaaaaa", "w0-20240501T080000.000000Z-bbbbbb"
    whole = trail(8, chain_id=older)
    running = _following(whole, newer)
    other = trail(3, chain_id="w1-20240501T070000.000000Z-cccccc", shutdown=False)
    report = check(whole[:4] + running, other, allow_open=True)  # older's tail cut
    assert ("tail_cut", older) in [(p.kind, p.chain) for p in report.problems]
    assert {w.chain for w in report.warnings} == {newer, "w1-20240501T070000.000000Z-cccccc"}
    report = check(whole + running, allow_open=True)
    assert report.ok and [w.chain for w in report.warnings] == [newer]
    # Two replicas' chains in one collected stream (no chain names another): both open.
    report = check(trail(3, chain_id=older, shutdown=False) + trail(3, chain_id=newer, shutdown=False), allow_open=True)
    assert report.ok and {w.chain for w in report.warnings} == {older, newer}


def _runs(*ids: str) -> list[list[str]]:
    """One file's runs of the proxy, each chain's first record naming the one before."""
    runs: list[list[str]] = []
    last: dict[str, object] | None = None
    for chain_id in ids:
        chain = Chain(KEY, chain_id, worker=0)
        lines = [chain.append(start_event(worker=0, follows=last)).line] if last is not None else []
        for i in range(3):
            lines.append(chain.append(statement_event(INFO, kind="select", fingerprint=f"SELECT {i}")).line)
        lines.append(chain.seal("shutdown").line)
        final = json.loads(lines[-1])
        last = {"chain": chain_id, "seq": final["seq"], "mac": final["mac"]}
        runs.append(lines)
    return runs


def test_a_run_deleted_whole_from_between_two_others_is_missing() -> None:
    first, second, third = _runs("w0-a", "w0-b", "w0-c")
    assert check(first + second + third).ok
    report = check(first + third)  # the second run's lines removed, every one of them
    assert [(p.kind, p.chain) for p in report.problems] == [("deleted", "w0-c")]
    assert "w0-b" in report.problems[0].detail and report.chains["w0-c"].follows == "w0-b"
    # Retention may remove old files: --partial accepts that the chain before is gone.
    assert check(third, require_genesis=False).ok
    assert not check(third).ok  # but not without it


def test_a_run_whose_tail_was_cut_before_the_next_is_found_even_sealed_before() -> None:
    first, second = _runs("w0-a", "w0-b")
    # Cut the first run's last event and its shutdown seal, then forge nothing: the
    # first chain ends early (tail cut) and the second names a seq it never reached.
    report = check(first[:-2] + second)
    kinds = {(p.kind, p.chain) for p in report.problems}
    assert ("tail_cut", "w0-a") in kinds and ("deleted", "w0-b") in kinds
    # A start record that names a place its predecessor went on past: inserted.
    chain = Chain(KEY, "w0-x", worker=0)
    early = json.loads(first[1])
    stray = [chain.append(start_event(worker=0, follows={"chain": "w0-a", "seq": early["seq"], "mac": early["mac"]})).line,
             chain.seal("shutdown").line]
    report = check(first + stray)
    assert [(p.kind, p.chain) for p in report.problems] == [("inserted", "w0-x")]


def test_live_judges_each_file_on_its_own() -> None:
    """The proxy's chain (still running) and a backfill's runs, sealed, in a file of their
    own: both worker 0, but a later chain in another file says nothing of the proxy's."""
    proxy = "w0-20240501T080000.000000Z-aaaaaa"
    backfill = "w0-20240501T120000.000000Z-bbbbbb"
    report = check(trail(4, chain_id=proxy, shutdown=False), trail(2, chain_id=backfill), allow_open=True)
    assert report.ok and [w.chain for w in report.warnings] == [proxy]


def test_a_forged_first_line_does_not_decide_where_its_file_goes() -> None:
    """A chain over two rotated files; a forged line (any seq, no key) put first in the
    older one is what verify names, not a genuine record it would then seem to misplace."""
    chain = Chain(KEY, "w0-R", worker=0)
    older = [chain.append(statement_event(INFO, kind="select", fingerprint=f"S{i}")).line for i in range(4)]
    older.append(chain.seal("rotation").line)
    newer = [chain.append(statement_event(INFO, kind="select", fingerprint=f"T{i}")).line for i in range(4)]
    newer.append(chain.seal("shutdown").line)
    forged = json.dumps({**json.loads(older[0]), "seq": 1_000_000, "mac": "a" * 64})
    report = verify([("audit.jsonl.1", [forged, *older]), ("audit.jsonl", newer)], KEY)
    problem = report.first_problem
    assert problem is not None and (problem.file, problem.line) == ("audit.jsonl.1", 1), problem
    assert problem.kind in ("inserted", "edited")


def _rotated(chain_id: str = "w0-rot") -> tuple[list[str], list[str]]:
    """A chain over two files: the rotated one ends with the rotation seal, the new one
    starts with a record naming it (as AuditLog rotates)."""
    chain = Chain(KEY, chain_id, worker=0)
    older = [chain.append(statement_event(INFO, kind="select", fingerprint=f"S{i}")).line for i in range(3)]
    seal = chain.seal("rotation")
    older.append(seal.line)
    newer = [chain.append(start_event(worker=0, follows={"chain": chain_id, "seq": seal.seq, "mac": seal.mac})).line]
    newer += [chain.append(statement_event(INFO, kind="select", fingerprint=f"T{i}")).line for i in range(3)]
    newer.append(chain.seal("shutdown").line)
    return older, newer


def test_partial_accepts_whole_files_removed_and_nothing_else() -> None:
    """--partial (retention deleted old files): a chain may begin where a file began,
    with the record a rotation starts a file with, or at seq 1; not anywhere else."""
    older, newer = _rotated()
    assert check(older, newer).ok
    assert check(newer, require_genesis=False).ok  # the rotated file deleted
    report = check(newer, require_genesis=False)
    assert report.chains["w0-rot"].events == 3  # the file's start record is no event
    for cut in (1, 2):  # records removed from inside the file that is left
        report = check(newer[cut:], require_genesis=False)
        assert [p.kind for p in report.problems] == ["deleted"] and "does not start a file" in report.problems[0].detail
    single = trail(8)  # one file, never rotated: only seq 1 starts it
    assert check(single[3:], require_genesis=False).first_problem is not None
    assert check(single, require_genesis=False).ok
