"""The audit trail through a proxy's life: workers, sink outages, restarts, a full queue.

What issue #4 promises beyond the content of the events (see ``test_audit_trail.py``):

* ``--workers 2``: each worker keeps its own chain in its own file; verify checks both;
* a sink outage mid-run (a file sink whose directory is swapped for a regular file, a
  PostgreSQL sink whose role loses LOGIN and its connection): events wait in the spill
  file and reach the sink once it is back, nothing lost, the chain intact;
* a restart (SIGTERM) while the sink is down: the spill outlives the process and the next
  start replays it first;
* ``on_audit_failure: refuse``: PII statements get SQLSTATE 58000 while the trail
  cannot be written, other statements run;
* a burst against a stalled sink (a FIFO nobody reads, its pipe shrunk to one page):
  ``on_full: block`` pauses the clients and loses nothing, ``on_full: drop`` lets them
  run and leaves a gap record that verify reports.

Outages are real (files, roles, pipes); no mock anywhere.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from encryption_fixtures import EncEnv, encryption_env, unique

# The helpers of the audit trail tests (an audited in-process proxy, trail readers, the CLI).
from test_audit_trail import (
    POLICY,
    PSQL,
    Audited,
    audit_section,
    audited,
    key_env,
    pgcloak_cli,
    read_records,
    trail_files,
    wait_until,
)

from pgcloak.audit.verify import verify
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from proxyctl import SubprocessProxy

WAIT = 15.0


@pytest.fixture(scope="module")
def env(
    pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EncEnv]:
    with encryption_env(
        pg, pg_app_user, tmp_path_factory.mktemp("audit_life"), "auditlife", policy=POLICY
    ) as e:
        yield e


def insert_users(a: Audited | SubprocessProxy, env: EncEnv, app: str, n: int) -> list[str]:
    """``n`` INSERTs of one user each through ``a``; returns the e-mails."""
    proxy = a.proxy if isinstance(a, Audited) else a
    login = env.login
    emails = [unique(app) for _ in range(n)]
    with psycopg.connect(
        proxy.dsn(login.user, login.password, login.dbname, application_name=app),
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        for e in emails:
            conn.execute("INSERT INTO users (email, ssn) VALUES (%s, %s)", (e, "123-45-6789"))
    return emails


def stored(env: EncEnv, emails: list[str]) -> int:
    index = [env.index_of("public.users", "email", e) for e in emails]
    return int(env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = ANY(%s)", index))


def statement_events(
    records: list[dict[str, Any]], app_prefix: str, kind: str = "insert"
) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["type"] == "statement"
        and r["kind"] == kind
        and (r["application_name"] or "").startswith(app_prefix)
    ]


def check_trail(env: EncEnv, files: list[Path], *, chains: int) -> None:
    report = verify([(str(p), p.read_text().splitlines()) for p in files], env.keyring.audit_key())
    assert report.ok, report.first_problem
    assert len(report.chains) == chains and all(c.sealed for c in report.chains.values()), (
        report.chains
    )
    assert not report.gaps


def run_args(env: EncEnv, policy: Path, *extra: str) -> list[str]:
    return [
        "--backend",
        f"postgresql://{env.pg.host}:{env.pg.port}",
        "--backend-tls-mode",
        "disable",
        "--policy",
        str(policy),
        "--log-level",
        "info",
        *extra,
    ]


# --------------------------------------------------------------------------- workers


def test_each_worker_keeps_its_own_chain_and_verify_checks_every_chain(
    env: EncEnv, tmp_path: Path
) -> None:
    """``pgcloak run --workers 2``: files ``audit.w0.jsonl`` and ``audit.w1.jsonl`` in its
    working directory's ``trail/`` (the relative sink), one chain each, events carrying their worker id; verify (CLI) says OK."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + audit_section(), encoding="utf-8")
    trail = tmp_path / "trail"
    sent = 0
    with SubprocessProxy(
        run_args(env, policy, "--workers", "2"), tmp_path / "proxy.log", env=key_env(env)
    ) as p:

        def both_workers_served() -> bool:
            seen = {
                f.name
                for f in trail.glob("audit.w*.jsonl")
                if '"type":"statement"' in f.read_text()
            }
            return seen == {"audit.w0.jsonl", "audit.w1.jsonl"}

        # SO_REUSEPORT spreads connections by a hash: connect until both workers had some.
        while not both_workers_served():
            assert sent < 60, f"all {sent} connections went to one worker"
            insert_users(p, env, f"workers-{sent}", 1)
            sent += 1
            time.sleep(0.02)
        # An operator checking the trail of the running proxy: --live (no shutdown seal yet).
        live = pgcloak_cli(
            env, "audit", "verify", "--live", *map(str, sorted(trail.glob("audit.w*.jsonl")))
        )
        assert live.returncode == 0 and live.stdout.startswith("OK: 2 chain(s)"), (
            live.stdout + live.stderr
        )
        assert live.stdout.count("open (no shutdown seal)") == 2
        p.signal(signal.SIGTERM)
        assert p.wait(WAIT) == 0, p.log()
    files = sorted(trail.glob("audit*.jsonl"))
    assert [f.name for f in files] == ["audit.w0.jsonl", "audit.w1.jsonl"]
    for worker, f in enumerate(files):
        records = read_records([f])
        assert {r["chain"][:3] for r in records} == {f"w{worker}-"}
        assert {r["worker"] for r in records} == {worker}
        assert records[-1]["type"] == "seal" and records[-1]["reason"] == "shutdown"
    assert len(statement_events(read_records(files), "workers-")) == sent
    done = pgcloak_cli(env, "audit", "verify", *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: 2 chain(s)") and done.stdout.count("sealed at shutdown") == 2


# --------------------------------------------------------------------------- outages


def test_file_sink_outage_mid_run_spills_and_loses_nothing(env: EncEnv, tmp_path: Path) -> None:
    """The trail directory is swapped for a regular file while the proxy runs: the next
    rotation cannot reopen the file, events go to the spill (statements keep running:
    on_audit_failure allow), and once the directory is back they are replayed in order."""
    spill = tmp_path / "spill"
    with audited(env, tmp_path, audit={"rotate_bytes": 3000, "spill_dir": str(spill)}) as a:
        log = a.proxy.server.audit  # type: ignore[union-attr]
        assert log is not None
        emails = insert_users(a, env, "outage-before", 4)
        wait_until(lambda: len(trail_files(tmp_path)) >= 2, "a first rotation")

        trail, moved = tmp_path / "trail", tmp_path / "trail.moved"
        trail.rename(moved)
        trail.write_text("not a directory any more")
        during = 0
        while log.healthy:  # the sink notices at its next rotation
            assert during < 40, "the sink never noticed the outage"
            emails += insert_users(a, env, "outage-during", 1)
            during += 1
        emails += insert_users(a, env, "outage-during", 5)
        during += 5
        wait_until(lambda: log.spill_bytes > 0, "events in the spill file")
        assert not log.healthy and log.metrics.sink_errors >= 1

        trail.unlink()
        moved.rename(trail)
        wait_until(lambda: log.healthy and log.spill_bytes == 0, "the sink to recover", WAIT)
        emails += insert_users(a, env, "outage-after", 4)
        a.stop()
        metrics = log.metrics
    assert metrics.replayed > 0 and metrics.dropped == 0 and metrics.lost == 0
    files = trail_files(tmp_path)
    assert not list(spill.glob("*.spill.jsonl")), "the spill file was replayed and removed"
    assert len(files) >= 3  # rotated files, the chain running on across them
    check_trail(env, files, chains=1)
    # The CLI: every file OK; without the oldest (retention) OK with --partial only.
    jobs = [[*map(str, files)], [*map(str, files[1:])], ["--partial", *map(str, files[1:])]]
    with ThreadPoolExecutor(3) as pool:
        whole, retained, partial = pool.map(
            lambda argv: pgcloak_cli(env, "audit", "verify", *argv), jobs
        )
    assert whole.returncode == 0 and whole.stdout.startswith("OK: 1 chain(s)"), (
        whole.stdout + whole.stderr
    )
    assert retained.returncode == 1 and "deleted" in retained.stdout.splitlines()[0], (
        retained.stdout
    )
    assert partial.returncode == 0, partial.stdout + partial.stderr
    records = read_records(files)
    inserts = statement_events(records, "outage-")
    assert len(inserts) == len(emails) == 8 + during
    # In order: the events of the outage sit between those before and after it.
    apps = [e["application_name"] for e in inserts]
    assert apps == ["outage-before"] * 4 + ["outage-during"] * during + ["outage-after"] * 4
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert stored(env, emails) == len(emails)


def test_a_restart_while_the_sink_is_down_loses_no_event(env: EncEnv, tmp_path: Path) -> None:
    """``pgcloak run`` with its trail directory blocked from the start: the events (and
    the shutdown seal) of a whole run wait in the spill file across SIGTERM; the next
    start, with the directory usable again, replays them before anything else."""
    blocker = tmp_path / "trail"
    blocker.write_text("not a directory")
    spill = tmp_path / "spill"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + audit_section(spill_dir=str(spill)), encoding="utf-8")
    args = run_args(env, policy)
    emails: list[str] = []
    with SubprocessProxy(args, tmp_path / "proxy-1.log", env=key_env(env)) as first:
        emails += insert_users(first, env, "restart-1", 4)
        with psycopg.connect(
            first.dsn(
                env.login.user, env.login.password, env.login.dbname, application_name="restart-1"
            ),
            autocommit=True,
        ) as conn:
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                conn.execute("SELECT id FROM users WHERE email LIKE %s", ("restart%",))
        first.signal(signal.SIGTERM)
        assert first.wait(WAIT) == 0, first.log()
    spilled = sorted(spill.glob("*.spill.jsonl"))
    assert len(spilled) == 1 and blocker.is_file()
    left = read_records(spilled)
    assert left[-1]["type"] == "seal" and left[-1]["reason"] == "shutdown"
    assert len(statement_events(left, "restart-1")) == 4

    blocker.unlink()
    with SubprocessProxy(args, tmp_path / "proxy-2.log", env=key_env(env)) as second:
        emails += insert_users(second, env, "restart-2", 3)
        second.signal(signal.SIGTERM)
        assert second.wait(WAIT) == 0, second.log()
    assert not spilled[0].exists(), "the spill file was replayed and removed"
    files = trail_files(tmp_path / "trail")
    done = pgcloak_cli(env, "audit", "verify", *map(str, files))
    assert done.returncode == 0 and done.stdout.startswith("OK: 2 chain(s)"), (
        done.stdout + done.stderr
    )
    records = read_records(files)
    assert [r["chain"] for r in records[: len(left)]] == [
        r["chain"] for r in left
    ]  # replayed first
    assert [e["application_name"] for e in statement_events(records, "restart-")] == [
        "restart-1"
    ] * 4 + ["restart-2"] * 3
    assert [(r["sqlstate"], r["kind"]) for r in records if r["type"] == "refusal"] == [
        ("0A000", "select")
    ]
    assert stored(env, emails) == 7


@pytest.fixture(scope="module")
def sink_login(pg: TemporaryPostgres) -> DbLogin:
    return pg.create_login("audit_life_writer", "life-writer-secret", "audit_life")


def test_postgres_sink_outage_mid_run_loses_nothing(
    env: EncEnv, pg: TemporaryPostgres, sink_login: DbLogin, tmp_path: Path
) -> None:
    """A PostgreSQL sink table (password in a passfile, not in the policy) whose role loses
    LOGIN and its connection mid-run: events spill; once LOGIN is back they are copied
    in, and ``pgcloak audit verify --dsn`` checks the table."""
    passfile = tmp_path / "pgpass"
    passfile.write_text(
        f"{pg.host}:{pg.port}:{sink_login.dbname}:{sink_login.user}:{sink_login.password}\n"
    )
    passfile.chmod(0o600)
    table = f"trail_{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://{sink_login.user}@{pg.host}:{pg.port}/{sink_login.dbname}"
    sink = f"{dsn}?passfile={passfile}&table={table}"
    spill = tmp_path / "spill"
    role = sink_login.user
    with audited(env, tmp_path, audit={"sink": sink, "spill_dir": str(spill)}) as a:
        log = a.proxy.server.audit  # type: ignore[union-attr]
        assert log is not None and log.healthy
        emails = insert_users(a, env, "pgsink-before", 3)
        pg.run_sql(
            f"ALTER ROLE {role} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE usename = '{role}'"
        )
        try:
            emails += insert_users(a, env, "pgsink-during", 4)
            wait_until(lambda: not log.healthy and log.spill_bytes > 0, "events in the spill file")
        finally:
            pg.run_sql(f"ALTER ROLE {role} LOGIN")
        wait_until(lambda: log.healthy and log.spill_bytes == 0, "the sink to recover", WAIT)
        emails += insert_users(a, env, "pgsink-after", 2)
        a.stop()
        assert log.metrics.replayed > 0 and log.metrics.lost == 0
    verify_dsn = f"postgresql://{sink_login.user}:{sink_login.password}@{pg.host}:{pg.port}/{sink_login.dbname}"
    done = pgcloak_cli(env, "audit", "verify", "--dsn", f"{verify_dsn}?table={table}")
    assert done.returncode == 0 and done.stdout.startswith("OK: 1 chain(s)"), (
        done.stdout + done.stderr
    )
    assert sink_login.password not in done.stdout + done.stderr

    async def rows() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(verify_dsn)
        try:
            return [
                json.loads(r["event"])
                for r in await conn.fetch(f"SELECT event::text FROM {table} ORDER BY seq")
            ]
        finally:
            await conn.close()

    records = asyncio.run(rows())
    apps = [e["application_name"] for e in statement_events(records, "pgsink-")]
    assert apps == ["pgsink-before"] * 3 + ["pgsink-during"] * 4 + ["pgsink-after"] * 2
    assert stored(env, emails) == 9


def test_on_audit_failure_refuse_refuses_pii_statements_while_the_sink_is_down(
    env: EncEnv, tmp_path: Path
) -> None:
    """With the trail unwritable, a statement touching PII gets SQLSTATE 58000 and says
    why; one that touches none still runs; once the sink is back PII statements run again,
    and the refusals are in the trail."""
    blocker = tmp_path / "trail"
    blocker.write_text("not a directory")
    with audited(
        env, tmp_path, audit={"on_audit_failure": "refuse", "spill_dir": str(tmp_path / "spill")}
    ) as a:
        log = a.proxy.server.audit  # type: ignore[union-attr]
        assert log is not None and not log.healthy
        email = unique("refuse")
        with a.psy("refuse") as conn:
            for sql, params in (
                ("INSERT INTO users (email) VALUES (%s)", (email,)),
                ("SELECT id FROM users WHERE email = %s", (email,)),
            ):
                with pytest.raises(psycopg.Error) as info:
                    conn.execute(sql, params)
                assert info.value.sqlstate == "58000"
                assert "audit trail cannot be written" in str(info.value)
                assert "on_audit_failure" in str(info.value)
            # Not PII: runs (and the session is fine after the refusals).
            assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
            conn.execute("INSERT INTO plain_contacts (email) VALUES ('refuse@example.com')")
        if PSQL is not None:
            done = a.psql(
                "refuse-psql",
                f"SELECT id FROM users WHERE email = '{email}';\nSELECT 'still here';\n",
            )
            assert "58000" in done.stderr or "audit trail cannot be written" in done.stderr, (
                done.stderr
            )
            assert done.stdout.strip() == "still here"
        blocker.unlink()
        wait_until(lambda: log.healthy, "the sink to recover", WAIT)
        with a.psy("refuse-after") as conn:
            conn.execute("INSERT INTO users (email) VALUES (%s)", (email,))
            assert conn.execute(
                "SELECT count(*) FROM users WHERE email = %s", (email,)
            ).fetchone() == (1,)
        a.stop()
    records = read_records(trail_files(tmp_path))
    refusals = [r for r in records if r["type"] == "refusal"]
    assert [(r["application_name"], r["kind"], r["sqlstate"]) for r in refusals] == [
        ("refuse", "insert", "58000"),
        ("refuse", "select", "58000"),
        ("refuse-psql", "select", "58000"),
    ]
    assert all("audit trail cannot be written" in r["reason"] for r in refusals)
    assert [r["kind"] for r in statement_events(records, "refuse-after", "insert")] == ["insert"]
    check_trail(env, trail_files(tmp_path), chains=1)


# --------------------------------------------------------------------------- full queue


class StalledSink:
    """A FIFO in place of the audit file, read only when the test says so.

    Its pipe is shrunk to one page, so a few records fill it; then the writer's
    ``write()`` blocks, exactly as on a disk that stopped answering.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.data = bytearray()
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._read, name="stalled-sink", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "rb", buffering=0) as fifo:  # returns once the proxy opens it
            fcntl.fcntl(fifo.fileno(), fcntl.F_SETPIPE_SZ, 4096)
            self._go.wait()
            while chunk := fifo.read(65536):
                self.data += chunk

    def resume(self) -> None:
        self._go.set()

    def records(self) -> list[dict[str, Any]]:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the proxy never closed its audit file"
        return [json.loads(line) for line in self.data.decode().splitlines() if line.strip()]

    def lines(self) -> list[str]:
        return self.data.decode().splitlines()


async def _burst(a: Audited, app: str, connections: int, each: int, done: list[int]) -> None:
    async def one(n: int) -> None:
        conn = await a.apg(f"{app}-{n}")
        try:
            for _ in range(each):
                await conn.execute(
                    "INSERT INTO users (email, ssn) VALUES ($1, $2)", unique(app), "000-00-0000"
                )
                done[0] += 1
        finally:
            await conn.close()

    await asyncio.gather(*(one(n) for n in range(connections)))


async def test_burst_against_a_stalled_sink_blocks_the_clients_and_loses_nothing(
    env: EncEnv, tmp_path: Path
) -> None:
    """queue_size 5, on_full block: 4 connections send 200 PII statements while the sink is
    stalled. The queue fills, the sessions stop reading their clients (nothing completes
    while the sink is stuck), and once it moves again all 200 succeed, all 200 events are
    in the trail and it verifies."""
    sink = StalledSink(tmp_path / "trail" / "audit.jsonl")
    try:
        with audited(
            env, tmp_path, audit={"queue_size": 5, "on_full": "block", "batch_size": 2}
        ) as a:
            log = a.proxy.server.audit  # type: ignore[union-attr]
            assert log is not None
            done = [0]
            burst = asyncio.create_task(_burst(a, "burst", 4, 50, done))
            try:
                deadline = time.monotonic() + WAIT
                while not log.full:
                    assert time.monotonic() < deadline and not burst.done(), (
                        "the queue never filled"
                    )
                    await asyncio.sleep(0.005)
                stalled_at = done[0]
                await asyncio.sleep(0.3)
                assert log.full and not burst.done()
                # A session pauses after forwarding the chunk it is reading: at most one more
                # statement each, and the one already in flight; plus one batch (2) the
                # writer may have taken off the queue just before the sink stalled it.
                assert done[0] <= stalled_at + 2 * 4 + 2, "clients kept going while the queue was full"
                assert log.queue_depth <= 5 + 2 * 4  # the bound, plus what paused sessions had read
            finally:
                sink.resume()
            await asyncio.wait_for(burst, WAIT)
            assert done[0] == 200
            # The last replies' events may fill the queue once more just before the
            # clients see those replies; the writer then drains it (asynchronously).
            deadline = time.monotonic() + WAIT
            while log.full:
                assert time.monotonic() < deadline, "the queue stayed full after the burst"
                await asyncio.sleep(0.005)
            a.stop()
            assert log.metrics.dropped == 0
    finally:
        sink.resume()
    records = sink.records()
    assert len(statement_events(records, "burst-")) == 200
    report = verify([("fifo", sink.lines())], env.keyring.audit_key())
    assert report.ok and not report.gaps, report.first_problem
    (chain,) = report.chains.values()
    assert chain.sealed


async def test_burst_with_on_full_drop_runs_on_and_leaves_a_gap_that_verify_reports(
    env: EncEnv, tmp_path: Path
) -> None:
    """queue_size 5, on_full drop: the same stalled sink never holds up the clients; the
    events that did not fit are counted in a gap record, and verify (CLI) reports it."""
    sink = StalledSink(tmp_path / "trail" / "audit.jsonl")
    try:
        with audited(env, tmp_path, audit={"queue_size": 5, "on_full": "drop"}) as a:
            log = a.proxy.server.audit  # type: ignore[union-attr]
            assert log is not None
            done = [0]
            try:
                # Completes although nobody reads the sink: the clients are never paused.
                await asyncio.wait_for(_burst(a, "drop", 2, 30, done), WAIT)
                assert done[0] == 60 and log.metrics.dropped > 0
            finally:
                sink.resume()
            a.stop()
            dropped, emitted = log.metrics.dropped, log.metrics.emitted
    finally:
        sink.resume()
    records = sink.records()
    gaps = [r for r in records if r["type"] == "gap"]
    assert gaps and sum(g["count"] for g in gaps) == dropped
    events = [r for r in records if r["type"] not in ("gap", "seal")]
    assert len(events) + dropped == emitted
    copy = tmp_path / "captured.jsonl"
    copy.write_text("\n".join(sink.lines()) + "\n")
    out = pgcloak_cli(env, "audit", "verify", str(copy))
    assert out.returncode == 0, out.stdout + out.stderr  # intact chain; the gap is a finding
    assert f"{dropped} event(s) dropped" in out.stdout and "finding:" in out.stdout, out.stdout
