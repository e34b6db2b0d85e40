"""AuditLog and its sinks for real: files (rotation, per worker), a pipe, a PostgreSQL table.

Outages are made deterministic without any mock: a file sink whose directory path is
taken by a regular file (ENOTDIR) until the test removes it, and a PostgreSQL sink
whose role loses LOGIN (and its connection) until the test gives it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgcloak.audit import cli
from pgcloak.audit.chain import Chain
from pgcloak.audit.events import InvalidEventError, SessionInfo, connection_event, statement_event
from pgcloak.audit.log import AuditLog
from pgcloak.audit.sinks import FileSink, PostgresSink, StreamSink, iter_file_lines
from pgcloak.audit.verify import VerifyReport, verify
from pgcloak.crypto.blind_index import blind_index
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from pgcloak.policy import Audit

KEYRING = Keyring(MasterKey(bytes(range(1, 33))))
KEY = KEYRING.audit_key()
EMAIL = "public.users.email"
#: Values a client might send; none of them may ever appear in audit output.
LITERALS = ("alice@example.com", "+1-202-555-0100", "078-05-1120", "Alice Liddell")
INFO = SessionInfo(session="sess-1", user="app", database="appdb", application_name="test",
                   client="127.0.0.1:40000", worker=None)
SINK_PASSWORD = "s1nk-Pa55word-never-logged"


def config(**kw: Any) -> Audit:
    base: dict[str, Any] = {"seal_interval": 3600.0, "fsync": "always", "batch_size": 50}
    base.update(kw)
    return Audit(**base)


def event(i: int) -> dict[str, Any]:
    """Statement event number ``i`` (in ``rows``), looking up one of the literals."""
    value = LITERALS[i % len(LITERALS)]
    return statement_event(
        INFO,
        kind="select",
        fingerprint="SELECT id, email FROM users WHERE email = $1",
        tables=["public.users"],
        columns_read=[EMAIL],
        lookups={EMAIL: [blind_index(KEYRING, EMAIL, value, "none")]},
        rows=i,
        duration_ms=0.5,
    )


async def until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


def trail_files(directory: Path) -> list[Path]:
    """Audit files oldest first: rotated ones (timestamped names), then the active one."""
    files = [p for p in directory.glob("audit*") if ".spill" not in p.name]
    return sorted(files, key=lambda p: (re.search(r"\.\d{8}T", p.name) is None, p.name))


def check_files(paths: list[Path]) -> VerifyReport:
    return verify([(str(p), iter_file_lines(p)) for p in paths], KEY)


def events_of(lines: list[str]) -> list[dict[str, Any]]:
    return [r for r in (json.loads(line) for line in lines if line.strip())
            if r["type"] == "statement"]


def assert_no_plaintext(text: str) -> None:
    for literal in LITERALS:
        assert literal not in text, literal
        assert literal.lower() not in text.lower(), literal


def all_lines(paths: list[Path]) -> list[str]:
    return [line for p in paths for line in iter_file_lines(p)]


# --------------------------------------------------------------------------- files


async def test_file_sink_trail_per_worker_verifies(tmp_path: Path) -> None:
    log = AuditLog(config(sink=f"file:{tmp_path}/audit.jsonl"), KEY, worker=3)
    await log.start()
    log.emit(connection_event(INFO, action="authenticated", tls=True))
    for i in range(40):
        log.emit(event(i))
    await log.aclose()
    files = trail_files(tmp_path)
    assert [p.name for p in files] == ["audit.w3.jsonl"]
    report = check_files(files)
    assert report.ok, report.first_problem
    (chain,) = report.chains.values()
    assert chain.chain.startswith("w3-") and chain.sealed and chain.events == 41
    assert sorted(e["rows"] for e in events_of(all_lines(files))) == list(range(40))
    assert_no_plaintext(files[0].read_text())
    assert log.metrics.emitted == 41 and log.metrics.written == 42 and log.metrics.dropped == 0
    assert log.healthy and not log.spill.path.exists()


async def test_invalid_events_are_refused_and_never_written(tmp_path: Path) -> None:
    log = AuditLog(config(sink=f"file:{tmp_path}/audit.jsonl"), KEY)
    await log.start()
    bad = event(1)
    bad["value"] = LITERALS[0]
    with pytest.raises(InvalidEventError):
        log.emit(bad)
    bad = event(2)
    bad["fingerprint_params"] = [LITERALS[1]]
    with pytest.raises(InvalidEventError):
        log.emit(bad)
    with pytest.raises(InvalidEventError):
        log.emit(statement_event(INFO, kind="select", fingerprint="x") | {"lookups": {EMAIL: [LITERALS[0]]}})
    log.emit(event(3))
    await log.aclose()
    text = (tmp_path / "audit.jsonl").read_text()
    assert_no_plaintext(text)
    assert len(events_of(text.splitlines())) == 1 and log.metrics.emitted == 1


async def test_size_rotation_continues_the_chain_across_files(tmp_path: Path) -> None:
    log = AuditLog(config(sink=f"file:{tmp_path}/audit.jsonl", rotate_bytes=4000, batch_size=5), KEY)
    await log.start()
    for i in range(120):
        log.emit(event(i))
        if i % 10 == 0:
            await asyncio.sleep(0)
    await log.aclose()
    files = trail_files(tmp_path)
    assert len(files) >= 4
    rotated = [p for p in files if p.name != "audit.jsonl"]
    for p in rotated:
        assert p.name.startswith("audit.jsonl.20")
        last = json.loads(list(iter_file_lines(p))[-1])
        assert (last["type"], last["reason"]) == ("seal", "rotation")
        assert p.stat().st_size < 4000 + 5 * 1000
    shuffled = list(files)
    random.Random(4).shuffle(shuffled)
    report = check_files(shuffled)
    assert report.ok, report.first_problem
    assert report.chains[log.chain_id].events == 120
    # Removing a rotated file in the middle is detected.
    by_seq = sorted(rotated, key=lambda p: json.loads(next(iter_file_lines(p)))["seq"])
    report = check_files([p for p in files if p != by_seq[1]])
    assert report.first_problem is not None and report.first_problem.kind == "deleted"
    # Every file after the first starts with a record naming where the chain left the
    # one before: retention may delete the oldest files (--partial), nothing less.
    newest_first = [p for p in files if p not in by_seq[:2]]
    for p in newest_first:
        first = json.loads(next(iter_file_lines(p)))
        assert first["type"] == "start" and first["follows"]["chain"] == log.chain_id
        assert first["follows"]["seq"] == first["seq"] - 1 and first["follows"]["mac"] == first["prev"]
    kept = [(str(p), list(iter_file_lines(p))) for p in newest_first]
    assert verify(kept, KEY, require_genesis=False).ok
    oldest_kept = min(kept, key=lambda f: json.loads(f[1][0])["seq"])
    cut = [(name, lines[2:] if (name, lines) == oldest_kept else lines) for name, lines in kept]
    report = verify(cut, KEY, require_genesis=False)
    assert report.first_problem is not None and "does not start a file" in report.first_problem.detail


async def test_time_rotation_and_periodic_seals(tmp_path: Path) -> None:
    log = AuditLog(
        config(sink=f"file:{tmp_path}/audit.jsonl", rotate_interval=0.2, rotate_bytes=None,
               seal_interval=0.05, fsync="interval", fsync_interval=0.05),
        KEY,
    )
    await log.start()
    log.emit(event(0))
    await asyncio.sleep(0.5)
    log.emit(event(1))
    await log.aclose()
    files = trail_files(tmp_path)
    assert len(files) >= 2
    records = [json.loads(line) for line in all_lines(files)]
    reasons = [r["reason"] for r in records if r["type"] == "seal"]
    assert reasons.count("periodic") >= 2 and "rotation" in reasons and reasons[-1] == "shutdown"
    assert check_files(files).ok


async def test_stdout_sink_writes_json_lines(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    try:
        log = AuditLog(config(sink="stdout", spill_dir=str(tmp_path)), KEY,
                       sink=StreamSink("stdout", fd=write_fd))
        await log.start()
        for i in range(20):
            log.emit(event(i))
        await log.aclose()
        os.close(write_fd)
        with os.fdopen(read_fd, encoding="utf-8") as f:
            lines = f.read().splitlines()
    finally:
        for fd in (read_fd, write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert len(lines) == 21
    assert verify([("stdout", lines)], KEY).ok
    assert_no_plaintext("\n".join(lines))


# --------------------------------------------------------------------------- queue


async def test_back_pressure_block_loses_nothing(tmp_path: Path) -> None:
    log = AuditLog(config(sink=f"file:{tmp_path}/audit.jsonl", queue_size=20, batch_size=5), KEY)
    await log.start()
    await log.wait_for_room()  # not full: returns at once
    sent = 0
    pauses = 0
    while sent < 300:
        log.emit(event(sent))  # synchronous: a burst with no chance for the writer to run
        sent += 1
        if log.full:
            pauses += 1
            assert log.queue_depth >= 20
            await asyncio.wait_for(log.wait_for_room(), 10)
            assert not log.full and log.queue_depth <= 10
    # A burst beyond the bound is still accepted (block never drops).
    for i in range(300, 350):
        log.emit(event(i))
    assert log.full and log.queue_depth >= 50
    await asyncio.wait_for(log.wait_for_room(), 10)
    await log.aclose()
    assert pauses >= 10
    files = trail_files(tmp_path)
    report = check_files(files)
    assert report.ok and not report.gaps
    assert sorted(e["rows"] for e in events_of(all_lines(files))) == list(range(350))
    assert log.metrics.dropped == 0 and log.metrics.emitted == 350


async def test_drop_policy_writes_a_gap_record_that_verify_reports(tmp_path: Path) -> None:
    log = AuditLog(config(sink=f"file:{tmp_path}/audit.jsonl", queue_size=10, on_full="drop"), KEY)
    await log.start()
    for i in range(100):
        log.emit(event(i))
    assert not log.full and log.metrics.dropped == 90
    await log.flush(10)
    for i in range(100, 105):
        log.emit(event(i))
    await log.aclose()
    files = trail_files(tmp_path)
    report = check_files(files)
    assert report.ok
    (gap,) = report.gaps
    assert gap.count == 90 and gap.seq == 11
    rows = [e["rows"] for e in events_of(all_lines(files))]
    assert rows == [*range(10), *range(100, 105)]
    _, out = await asyncio.to_thread(_cli_verify, files)
    assert "90 event(s) dropped" in out


def _cli_verify(files: list[Path], dsn: str | None = None) -> tuple[int, str]:
    import io

    out = io.StringIO()
    code = cli.verify(files, KEY, dsn=dsn, out=out, err=out)
    return code, out.getvalue()


# --------------------------------------------------------------------------- outages


def _blocked_sink(tmp_path: Path) -> tuple[Path, str]:
    """A file sink path whose directory is (for now) a regular file: ENOTDIR."""
    blocker = tmp_path / "logs"
    blocker.write_text("not a directory")
    return blocker, f"file:{blocker}/audit.jsonl"


async def test_file_sink_outage_spills_then_replays_in_order(tmp_path: Path) -> None:
    blocker, sink = _blocked_sink(tmp_path)
    log = AuditLog(config(sink=sink, spill_dir=str(tmp_path / "spill")), KEY,
                   retry_initial=0.05, retry_max=0.2)
    await log.start()
    assert not log.healthy
    for i in range(30):
        log.emit(event(i))
    await log.flush(10)
    assert not log.healthy and log.metrics.spilled == 30 and log.spill_bytes > 0
    assert log.metrics.sink_errors >= 1
    assert_no_plaintext(log.spill.path.read_text())
    blocker.unlink()  # the disk is back
    await until(lambda: log.healthy and log.spill_bytes == 0, what="recovery")
    for i in range(30, 60):
        log.emit(event(i))
    await log.aclose()
    files = trail_files(tmp_path / "logs")
    report = check_files(files)
    assert report.ok, report.first_problem
    assert [e["rows"] for e in events_of(all_lines(files))] == list(range(60))
    assert log.metrics.replayed == 30 and not log.spill.path.exists()


async def test_a_full_spill_turns_into_back_pressure(tmp_path: Path) -> None:
    blocker, sink = _blocked_sink(tmp_path)
    log = AuditLog(
        config(sink=sink, spill_dir=str(tmp_path / "spill"), spill_max_bytes=6000,
               queue_size=10, batch_size=5),
        KEY, retry_initial=0.05, retry_max=0.1,
    )
    await log.start()
    for i in range(60):
        log.emit(event(i))
        if log.full:
            break
        await asyncio.sleep(0.01)
    await until(lambda: log.full, what="queue full")
    assert 0 < log.spill_bytes <= 6000 and not log.healthy
    blocker.unlink()
    await asyncio.wait_for(log.wait_for_room(), 15)
    emitted = log.metrics.emitted
    await log.aclose()
    files = trail_files(tmp_path / "logs")
    report = check_files(files)
    assert report.ok, report.first_problem
    assert [e["rows"] for e in events_of(all_lines(files))] == list(range(emitted))
    assert log.metrics.dropped == 0 and log.metrics.lost == 0


async def test_an_idle_log_notices_the_sink_is_back(tmp_path: Path) -> None:
    blocker, sink = _blocked_sink(tmp_path)
    log = AuditLog(config(sink=sink, spill_dir=str(tmp_path / "spill")), KEY,
                   retry_initial=0.05, retry_max=0.1)
    await log.start()
    try:
        await asyncio.sleep(0.2)
        assert not log.healthy
        blocker.unlink()
        await until(lambda: log.healthy, what="healthy without any event")
    finally:
        await log.aclose()
    assert check_files(trail_files(tmp_path / "logs")).ok


async def test_restart_with_a_leftover_spill_loses_nothing(tmp_path: Path) -> None:
    blocker, sink = _blocked_sink(tmp_path)
    cfg = config(sink=sink, spill_dir=str(tmp_path / "spill"))
    first = AuditLog(cfg, KEY, retry_initial=60)
    await first.start()
    for i in range(25):
        first.emit(event(i))
    await first.aclose()  # sink still down: everything, shutdown seal included, is spilled
    assert first.spill.path.exists() and first.metrics.spilled == 26

    blocker.unlink()
    second = AuditLog(cfg, KEY)
    assert second.spill.path == first.spill.path
    await second.start()
    for i in range(25, 35):
        second.emit(event(i))
    await second.aclose()
    files = trail_files(tmp_path / "logs")
    report = check_files(files)
    assert report.ok, report.first_problem
    assert set(report.chains) == {first.chain_id, second.chain_id}
    assert all(c.sealed for c in report.chains.values())
    assert [e["rows"] for e in events_of(all_lines(files))] == list(range(35))
    assert not second.spill.path.exists() and second.metrics.replayed == 26


async def test_replay_after_a_crash_mid_replay_writes_nothing_twice(tmp_path: Path) -> None:
    # The spill holds 10 records; the sink already got the first 4 (crash before the
    # spill was cleared). The replay must skip them.
    chain = Chain(KEY, "w0-crashed")
    records = [chain.append(event(i)) for i in range(9)] + [chain.seal("shutdown")]
    spill = tmp_path / "spill" / "audit.spill.jsonl"
    spill.parent.mkdir()
    spill.write_text("".join(r.line + "\n" for r in records))
    (tmp_path / "audit.jsonl").write_text("".join(r.line + "\n" for r in records[:4]))
    log = AuditLog(config(sink=f"file:{tmp_path}/audit.jsonl", spill_dir=str(spill.parent)), KEY)
    assert log.spill.path == spill
    await log.start()
    await log.aclose()
    report = check_files(trail_files(tmp_path))
    assert report.ok, report.first_problem
    assert report.chains["w0-crashed"].records == 10
    assert log.metrics.replayed == 6


async def test_a_half_written_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"seq":1,"chain":"dead","prev":"')  # a crash mid-write
    log = AuditLog(config(sink=f"file:{path}"), KEY)
    await log.start()
    log.emit(event(0))
    await log.aclose()
    report = check_files([path])
    assert [p.kind for p in report.problems] == ["unparseable"]
    assert report.chains[log.chain_id].sealed


# --------------------------------------------------------------------------- postgresql


@pytest.fixture(scope="module")
def sink_login(pg: TemporaryPostgres) -> DbLogin:
    return pg.create_login("audit_writer", SINK_PASSWORD, "auditdb")


@pytest.fixture
def table_dsn(pg: TemporaryPostgres, sink_login: DbLogin, request: pytest.FixtureRequest) -> Iterator[str]:
    table = "audit_" + request.node.name.removeprefix("test_")[:40]
    yield pg.dsn(sink_login.user, sink_login.password, sink_login.dbname) + f"&table={table}"


async def _table_rows(dsn: str) -> list[asyncpg.Record]:
    sink = PostgresSink(dsn)
    conn = await asyncpg.connect(dsn.split("&table=")[0])
    try:
        return list(await conn.fetch(
            f"SELECT seq, chain, ts, type, event, mac FROM {sink.table} ORDER BY chain, seq"
        ))
    finally:
        await conn.close()


async def _set_login(pg: TemporaryPostgres, role: str, allowed: bool) -> None:
    await asyncio.to_thread(pg.run_sql, f"ALTER ROLE {role} {'LOGIN' if allowed else 'NOLOGIN'}")
    if not allowed:
        await asyncio.to_thread(pg.kill_backends, "pgcloak-audit")


async def test_postgres_sink_writes_batches_and_verifies(table_dsn: str, tmp_path: Path) -> None:
    log = AuditLog(config(sink=table_dsn, batch_size=7, spill_dir=str(tmp_path)), KEY, worker=1)
    assert SINK_PASSWORD not in log.sink.description and "table audit_" in log.sink.description
    await log.start()
    for i in range(50):
        log.emit(event(i))
        if i % 9 == 0:
            await asyncio.sleep(0)
    await log.aclose()
    rows = await _table_rows(table_dsn)
    assert len(rows) == 51 and rows[-1]["type"] == "seal"
    assert [r["seq"] for r in rows] == list(range(1, 52))
    assert rows[0]["ts"].tzinfo is not None and rows[0]["chain"] == log.chain_id
    first = json.loads(rows[0]["event"])
    assert first["mac"] == rows[0]["mac"] and first["rows"] == 0
    assert_no_plaintext("\n".join(r["event"] for r in rows))

    code, out = await asyncio.to_thread(_cli_verify, [], table_dsn)
    assert code == 0, out
    assert out.startswith("OK: 1 chain(s), 51 record(s)") and SINK_PASSWORD not in out

    wanted = blind_index(KEYRING, EMAIL, LITERALS[0], "none")
    import io

    buf = io.StringIO()
    found = await asyncio.to_thread(
        lambda: cli.who_accessed([], EMAIL, [wanted], dsn=table_dsn, key=KEY, out=buf, err=buf)
    )
    assert found == 0 and buf.getvalue().count("match=lookup") == 13  # i % 4 == 0, i < 50
    assert "MAC-INVALID" not in buf.getvalue()


async def test_postgres_sink_skips_records_already_stored(table_dsn: str) -> None:
    chain = Chain(KEY, "w0-dup")
    records = [chain.append(event(i)) for i in range(10)]
    sink = PostgresSink(table_dsn)
    await sink.open()
    try:
        await sink.write(records[:6])
        await sink.write(records[3:])  # an uncertain earlier attempt is retried
        assert await sink.last_seqs({"w0-dup", "other"}) == {"w0-dup": 10}
    finally:
        await sink.close()
    assert [r["seq"] for r in await _table_rows(table_dsn)] == list(range(1, 11))


async def test_postgres_outage_spills_then_replays_nothing_lost(
    pg: TemporaryPostgres, sink_login: DbLogin, table_dsn: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgcloak")
    log = AuditLog(config(sink=table_dsn, batch_size=10, spill_dir=str(tmp_path)), KEY,
                   retry_initial=0.05, retry_max=0.3)
    await log.start()
    try:
        for i in range(10):
            log.emit(event(i))
        await log.flush(10)
        assert log.healthy and log.metrics.written == 10

        await _set_login(pg, sink_login.user, allowed=False)
        for i in range(10, 30):
            log.emit(event(i))
        await log.flush(10)
        await until(lambda: not log.healthy and log.metrics.spilled >= 20, what="spill")
        assert log.spill.path.parent == tmp_path and log.spill_bytes > 0

        await _set_login(pg, sink_login.user, allowed=True)
        await until(lambda: log.healthy and log.spill_bytes == 0, what="replay")
        for i in range(30, 40):
            log.emit(event(i))
    finally:
        await _set_login(pg, sink_login.user, allowed=True)
        await log.aclose()

    rows = await _table_rows(table_dsn)
    lines = [r["event"] for r in rows]
    assert [e["rows"] for e in events_of(lines)] == list(range(40))
    report = verify([("table", lines)], KEY)
    assert report.ok, report.first_problem
    assert log.metrics.sink_errors >= 1 and log.metrics.replayed >= 20
    assert SINK_PASSWORD not in caplog.text
    assert "audit sink failing" in caplog.text and "audit sink recovered" in caplog.text


async def test_postgres_restart_with_leftover_spill(
    pg: TemporaryPostgres, sink_login: DbLogin, table_dsn: str, tmp_path: Path,
) -> None:
    cfg = config(sink=table_dsn, spill_dir=str(tmp_path))
    await _set_login(pg, sink_login.user, allowed=False)
    try:
        first = AuditLog(cfg, KEY, worker=2, retry_initial=60)
        await first.start()
        assert not first.healthy
        for i in range(20):
            first.emit(event(i))
        await first.aclose()
        assert first.spill.path.exists()
    finally:
        await _set_login(pg, sink_login.user, allowed=True)

    second = AuditLog(cfg, KEY, worker=2)
    assert second.spill.path == first.spill.path
    await second.start()
    for i in range(20, 25):
        second.emit(event(i))
    await second.aclose()
    rows = await _table_rows(table_dsn)
    lines = [r["event"] for r in rows]
    report = verify([("table", lines)], KEY)
    assert report.ok, report.first_problem
    assert {c.chain for c in report.chains.values()} == {first.chain_id, second.chain_id}
    assert sorted(e["rows"] for e in events_of(lines)) == list(range(25))
    assert not second.spill.path.exists()


async def test_postgres_sink_file_rotation_is_a_no_op(table_dsn: str) -> None:
    sink = PostgresSink(table_dsn)
    assert not sink.rotation_due()
    assert isinstance(FileSink("x.jsonl", worker=0).path, Path)


async def _one_run(sink: str, rows: range, **kw: Any) -> AuditLog:
    log = AuditLog(config(sink=sink, **kw), KEY, retry_initial=0.05, retry_max=0.2)
    await log.start()
    for i in rows:
        log.emit(event(i))
    await log.aclose()
    return log


async def test_each_run_names_the_one_before_so_a_run_deleted_whole_shows(tmp_path: Path) -> None:
    """Three runs of the proxy append to one file; each later chain starts with a record
    naming where the one before it ended. Deleting the middle run's lines (all of them,
    which keeps every chain intact in itself) is found."""
    sink = f"file:{tmp_path}/audit.jsonl"
    runs = [await _one_run(sink, range(n * 5, n * 5 + 5)) for n in range(3)]
    lines = list(iter_file_lines(tmp_path / "audit.jsonl"))
    records = [json.loads(line) for line in lines]
    starts = [r for r in records if r["type"] == "start"]
    assert [s["chain"] for s in starts] == [runs[1].chain_id, runs[2].chain_id]
    assert [s["seq"] for s in starts] == [1, 1]
    assert [s["follows"]["chain"] for s in starts] == [runs[0].chain_id, runs[1].chain_id]
    ends = {r["chain"]: r for r in records if r["type"] == "seal" and r["reason"] == "shutdown"}
    assert all(s["follows"]["mac"] == ends[s["follows"]["chain"]]["mac"] for s in starts)
    report = verify([("audit.jsonl", lines)], KEY)
    assert report.ok and [e["rows"] for e in events_of(lines)] == list(range(15))
    without_middle = [line for line, r in zip(lines, records, strict=True) if r["chain"] != runs[1].chain_id]
    report = verify([("audit.jsonl", without_middle)], KEY)
    assert [(p.kind, p.chain) for p in report.problems] == [("deleted", runs[2].chain_id)]


async def test_a_run_after_an_outage_names_the_last_record_in_the_spill(tmp_path: Path) -> None:
    """The last record before a restart may still wait in the spill (the sink was down):
    the next chain names that one, and once the spill is replayed the trail verifies."""
    blocker, sink = _blocked_sink(tmp_path)
    first = await _one_run(sink, range(5), spill_dir=str(tmp_path / "spill"))
    assert first.metrics.spilled >= 6 and first.spill_bytes > 0  # 5 events and the seal
    blocker.unlink()
    second = await _one_run(sink, range(5, 10), spill_dir=str(tmp_path / "spill"))
    lines = list(iter_file_lines(tmp_path / "logs" / "audit.jsonl"))
    (start,) = [r for r in map(json.loads, lines) if r["type"] == "start"]
    assert start["chain"] == second.chain_id and start["follows"]["chain"] == first.chain_id
    report = verify([("audit.jsonl", lines)], KEY)
    assert report.ok, report.first_problem
    assert [e["rows"] for e in events_of(lines)] == list(range(10))


async def test_a_rotation_due_at_start_comes_after_the_record_naming_the_run_before(tmp_path: Path) -> None:
    """The file is past rotate_bytes when the proxy starts again: the new chain still
    begins (seq 1) with the record naming the chain before it, then rotates."""
    sink = f"file:{tmp_path}/audit.jsonl"
    first = await _one_run(sink, range(20))
    second = await _one_run(sink, range(20, 25), rotate_bytes=2000)
    records = [json.loads(line) for p in trail_files(tmp_path) for line in iter_file_lines(p)]
    mine = [r for r in records if r["chain"] == second.chain_id]
    assert (mine[0]["seq"], mine[0]["type"]) == (1, "start") and mine[0]["follows"]["chain"] == first.chain_id
    assert [(r["type"], r.get("reason")) for r in mine[1:3]] == [("seal", "rotation"), ("start", None)]
    lines = [(str(p), list(iter_file_lines(p))) for p in trail_files(tmp_path)]
    assert verify(lines, KEY).ok
    without_first = [(name, [ln for ln in ls if json.loads(ln)["chain"] != first.chain_id]) for name, ls in lines]
    report = verify(without_first, KEY)
    assert [(p.kind, p.chain) for p in report.problems] == [("deleted", second.chain_id)]


async def test_a_chain_names_no_other_while_another_process_writes_the_file(tmp_path: Path) -> None:
    """Two writers at once on one file (two backfill runs): the second cannot claim the
    file, so its chain names none (the first is still going); both verify."""
    sink = f"file:{tmp_path}/audit.jsonl"
    first = AuditLog(config(sink=sink), KEY)
    await first.start()
    first.emit(event(0))
    await first.flush(10)
    second = await _one_run(sink, range(1, 3))  # while the first still writes
    first.emit(event(3))
    await first.aclose()
    third = await _one_run(sink, range(4, 6))  # alone again: it names the last chain
    lines = list(iter_file_lines(tmp_path / "audit.jsonl"))
    starts = {r["chain"]: r["follows"]["chain"] for r in map(json.loads, lines) if r["type"] == "start"}
    assert starts == {third.chain_id: first.chain_id}
    assert second.chain_id not in starts
    report = verify([("audit.jsonl", lines)], KEY)
    assert report.ok, report.first_problem
