"""A policy reload that changes ``audit:`` is applied, not only counted.

Before, the trail was built once at start: a reload that turned auditing on, moved the
sink or changed its settings was counted as applied while nothing changed (PII read
unaudited, events in the old file). Now the new trail is built and started; sessions
write to it from their next event; the previous trail ends with its shutdown seal
before the new one opens (they may share a file); every file verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env, unique
from test_audit_trail import POLICY, Audited, audit_section, audited, pgcloak_cli, wait_until

from pgcloak.audit import AuditLog
from pgcloak.session.server import ProxyServer

SSN = f"{USERS}.ssn"


@pytest.fixture(scope="module")
def env(pg: Any, pg_app_user: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("audit_reload"), "auditreload", policy=POLICY) as e:
        yield e


def server_of(a: Audited) -> ProxyServer:
    server = a.proxy.server
    assert server is not None
    return server


def reload_audit(a: Audited, **audit: Any) -> None:
    """Replace the policy file (a rename) with another ``audit:``; wait until applied."""
    server = server_of(a)
    applied = server.policy_reloads["applied"]
    policy = a.directory / "policy.yaml"
    tmp = policy.with_name(".policy.yaml.tmp")
    tmp.write_text(POLICY + audit_section(**audit), encoding="utf-8")
    os.replace(tmp, policy)
    wait_until(lambda: server.policy_reloads["applied"] > applied, "the reload to be applied")
    # applied, and the new trail started (or none)
    wait_until(lambda: server.audit is None or server.audit._task is not None, "the new trail to start")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_ssn(a: Audited, app: str, email: str) -> None:
    with a.psy(app) as conn:
        conn.execute("INSERT INTO users (email, ssn) VALUES (%s, %s)", (email, "078-05-1120"))
        assert conn.execute("SELECT ssn FROM users WHERE email = %s", (email,)).fetchone() == ("078-05-1120",)


def ssn_reads(recs: list[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    return [
        r
        for r in recs
        if r["type"] == "statement" and r["application_name"] == app and SSN in r["columns_read"]
    ]


def verified(env: EncEnv, *files: Path) -> str:
    done = pgcloak_cli(env, "audit", "verify", *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def chains(recs: list[dict[str, Any]]) -> list[str]:
    """Chain ids in the order they first appear."""
    return list(dict.fromkeys(r["chain"] for r in recs))


def test_turning_the_trail_on_audits_new_sessions_and_those_open_before(env: EncEnv, tmp_path: Path) -> None:
    with audited(env, tmp_path, audit={"enabled": False}, policy_poll_interval=0.1) as a:
        server = server_of(a)
        assert server.audit is None
        with a.psy("opened-before") as early:
            early.execute("SELECT ssn FROM users LIMIT 1").fetchall()  # not audited: no trail
            reload_audit(a, enabled=True, sink="file:trail/on.jsonl")
            assert server.audit is not None
            read_ssn(a, "after-on", unique("on"))
            # A pooled connection open across the reload is audited from its next idle
            # moment on, without reconnecting.
            early.execute("SELECT ssn FROM users LIMIT 1").fetchall()
            early.execute("SELECT ssn FROM users LIMIT 0").fetchall()
        a.stop()  # the shutdown seal
    trail = tmp_path / "trail" / "on.jsonl"
    recs = records(trail)
    assert len(ssn_reads(recs, "after-on")) == 1
    early_events = [(r["type"], r.get("action"), r.get("rows")) for r in recs if r.get("application_name") == "opened-before"]
    assert early_events == [
        ("connection", "audit_started", None),
        ("statement", None, 1),
        ("statement", None, 0),
        ("connection", "disconnected", None),
    ]
    started = next(r for r in recs if r.get("action") == "audit_started")
    assert started["reason"] == "audit turned on by a policy reload"
    assert next(r for r in recs if r.get("action") == "disconnected" and r["application_name"] == "opened-before")[
        "statements"
    ] == 2
    assert recs[-1]["type"] == "seal" and recs[-1]["reason"] == "shutdown"
    verified(env, trail)


def test_a_session_in_a_transaction_joins_the_trail_when_it_ends(env: EncEnv, tmp_path: Path) -> None:
    """Portals bound before the trail came may run until the transaction ends: the session
    joins it at the first moment with no transaction open, so nothing it runs is half seen."""
    with audited(env, tmp_path, audit={"enabled": False}, policy_poll_interval=0.1) as a:
        read_ssn(a, "in-tx-seed", unique("tx"))
        with a.psy("in-tx") as early:
            early.execute("BEGIN")
            early.execute("SELECT ssn FROM users LIMIT 1").fetchall()
            reload_audit(a, enabled=True, sink="file:trail/tx.jsonl")
            early.execute("SELECT ssn FROM users LIMIT 1").fetchall()  # same transaction
            early.execute("COMMIT")
            early.execute("SELECT ssn FROM users LIMIT 0").fetchall()
        a.stop()
    trail = tmp_path / "trail" / "tx.jsonl"
    recs = records(trail)
    events = [(r["type"], r.get("action"), r.get("rows")) for r in recs if r.get("application_name") == "in-tx"]
    assert events == [
        ("connection", "audit_started", None),
        ("statement", None, 0),
        ("connection", "disconnected", None),
    ]
    verified(env, trail)


def test_statements_prepared_before_the_trail_are_recorded_with_their_lookups(env: EncEnv, tmp_path: Path) -> None:
    """asyncpg prepares first: a statement prepared while there was no trail, run after the
    reload, is recorded with the blind index of the value it looked up (never the value)."""
    email = unique("prepared-before")

    async def scenario(a: Audited) -> None:
        conn = await a.apg("apg-before")
        try:
            await conn.execute("INSERT INTO users (email, ssn) VALUES ($1, $2)", email, "078-05-1120")
            lookup = await conn.prepare("SELECT ssn FROM users WHERE email = $1")
            assert await lookup.fetchval(email) == "078-05-1120"
            await asyncio.to_thread(reload_audit, a, enabled=True, sink="file:trail/prep.jsonl")
            assert await lookup.fetchval(email) == "078-05-1120"
        finally:
            await conn.close()

    with audited(env, tmp_path, audit={"enabled": False}, policy_poll_interval=0.1) as a:
        asyncio.run(scenario(a))
        a.stop()
    trail = tmp_path / "trail" / "prep.jsonl"
    text = trail.read_text()
    assert email not in text and "078-05-1120" not in text
    reads = ssn_reads(records(trail), "apg-before")
    assert len(reads) == 1 and reads[0]["rows"] == 1
    assert list(reads[0]["lookups"]) == [f"{USERS}.email"] and len(reads[0]["lookups"][f"{USERS}.email"]) == 1
    policy = tmp_path / "policy.yaml"
    found = pgcloak_cli(
        env, "audit", "who-accessed", "--column", "users.email", "--value", email, "--json", "--policy", str(policy), str(trail)
    )
    assert found.returncode == 0, found.stdout + found.stderr
    assert [json.loads(line)["id"] for line in found.stdout.splitlines()] == [reads[0]["id"]]
    verified(env, trail)


def test_moving_the_sink_moves_every_session_and_seals_the_old_trail(env: EncEnv, tmp_path: Path) -> None:
    with audited(env, tmp_path, audit={"sink": "file:trail/first.jsonl"}, policy_poll_interval=0.1) as a:
        server = server_of(a)
        first_log = server.audit
        email = unique("moved")
        with a.psy("spanning") as conn:
            conn.execute("INSERT INTO users (email, ssn) VALUES (%s, %s)", (email, "078-05-1120"))
            conn.execute("SELECT ssn FROM users WHERE email = %s", (email,)).fetchall()
            reload_audit(a, sink="file:trail/second.jsonl", queue_size=500, on_full="drop")
            new_log = server.audit
            assert isinstance(new_log, AuditLog) and new_log is not first_log
            assert (new_log.queue_size, new_log.config.on_full) == (500, "drop")
            assert first_log is not None and first_log._closed  # sealed before the new one opened
            # the session open across the reload writes to the new trail from now on
            conn.execute("SELECT ssn FROM users WHERE email = %s", (email,)).fetchall()
        read_ssn(a, "after-move", unique("moved"))
        a.stop()
    first, second = tmp_path / "trail" / "first.jsonl", tmp_path / "trail" / "second.jsonl"
    old, new = records(first), records(second)
    assert len(ssn_reads(old, "spanning")) == 1 and len(ssn_reads(new, "spanning")) == 1
    assert ssn_reads(new, "after-move") and not ssn_reads(old, "after-move")
    assert old[-1]["type"] == "seal" and old[-1]["reason"] == "shutdown"
    assert new[-1]["type"] == "seal" and new[-1]["reason"] == "shutdown"
    assert len(chains(old)) == 1 and len(chains(new)) == 1 and chains(old) != chains(new)
    # the session's disconnect went to the trail it was writing to then
    assert [r["action"] for r in new if r["type"] == "connection" and r["application_name"] == "spanning"] == [
        "disconnected"
    ]
    verified(env, first, second)


def test_changing_settings_of_the_same_sink_chains_one_trail_after_the_other(
    env: EncEnv, tmp_path: Path
) -> None:
    """One file, two chains: the first sealed before the second starts (no interleaving),
    and the new ``statements: all`` applies to a session open across the reload too."""
    with audited(env, tmp_path, policy_poll_interval=0.1) as a:
        server = server_of(a)
        with a.psy("spanning") as conn:
            conn.execute("SELECT 1").fetchall()  # not recorded in pii mode
            read_ssn(a, "before", unique("same"))
            before = server.audit
            assert before is not None
            a.proxy.call(before.flush, 10)
            written = before.metrics.written
            reload_audit(a, statements="all", queue_size=100, fsync="always")
            after = server.audit
            assert after is not None and after is not before and after.chain_id != before.chain_id
            assert after.metrics.written >= written + 1  # counters carried over (+ the seal)
            conn.execute("SELECT 2").fetchall()  # recorded now
        a.stop()
    trail = tmp_path / "trail" / "audit.jsonl"
    recs = records(trail)
    first, second = chains(recs)
    cut = next(i for i, r in enumerate(recs) if r["chain"] == second)
    assert {r["chain"] for r in recs[:cut]} == {first} and {r["chain"] for r in recs[cut:]} == {second}
    assert recs[cut - 1]["type"] == "seal" and recs[cut - 1]["reason"] == "shutdown"
    spanning = [r for r in recs if r["type"] == "statement" and r["application_name"] == "spanning"]
    assert [r["chain"] for r in spanning] == [second]  # SELECT 2 only
    verified(env, trail)


def test_turning_the_trail_off_keeps_it_for_the_sessions_that_have_it(env: EncEnv, tmp_path: Path) -> None:
    with audited(env, tmp_path, policy_poll_interval=0.1) as a:
        server = server_of(a)
        trail = tmp_path / "trail" / "audit.jsonl"
        old = server.audit
        assert old is not None
        email = unique("off")
        with a.psy("audited-session") as conn:
            conn.execute("INSERT INTO users (email, ssn) VALUES (%s, %s)", (email, "078-05-1120"))
            reload_audit(a, enabled=False)
            assert server.audit is None and not old._closed
            read_ssn(a, "unaudited", unique("off"))  # a new session: not audited
            conn.execute("SELECT ssn FROM users WHERE email = %s", (email,)).fetchall()
        # its last session ended: the trail is closed with its shutdown seal
        wait_until(lambda: old._closed, "the retired trail to be closed")
        recs = records(trail)
        assert recs[-1]["type"] == "seal" and recs[-1]["reason"] == "shutdown"
        assert len(ssn_reads(recs, "audited-session")) == 1
        assert not [r for r in recs if r.get("application_name") == "unaudited"]
        a.stop()
    verified(env, trail)


def test_off_then_on_at_once_seals_the_old_trail_before_the_new_one_opens(env: EncEnv, tmp_path: Path) -> None:
    # Turned off with no audited session, the trail was closed in the background; turned
    # on again at once, the new one opened the same file before the old one's seal
    # (review of session 13).
    with audited(env, tmp_path, audit={"sink": "file:trail/audit.jsonl"}, policy_poll_interval=3600) as a:
        server = server_of(a)
        old = server.audit
        assert old is not None

        async def off_then_on() -> tuple[bool, bool]:
            assert await server.reload_policy((POLICY + audit_section(enabled=False)).encode())
            on = POLICY + audit_section(sink="file:trail/audit.jsonl", statements="all")
            assert await server.reload_policy(on.encode())
            assert server.audit is not None
            return old._closed, server.audit._task is not None

        closed_first, started = a.proxy.call(off_then_on)
        assert started and closed_first
        a.proxy.stop()
    verified(env, tmp_path / "trail" / "audit.jsonl")


def test_busy_pooled_sessions_all_join_a_trail_turned_on_mid_run(env: EncEnv, tmp_path: Path) -> None:
    """pgbench's clients keep their connections and prepared statements for the whole run;
    the trail is turned on half-way: every client joins it, and each one's disconnect
    counts exactly the statement events the trail holds for it."""
    binary = shutil.which("pgbench") or str(env.pg.bin_dir / "pgbench")
    script = tmp_path / "reads.sql"
    script.write_text("\\set id random(1, 50)\nSELECT ssn FROM users WHERE id = :id;\n")
    clients = 4
    with audited(env, tmp_path, audit={"enabled": False}, policy_poll_interval=0.1) as a:
        for i in range(3):
            read_ssn(a, "seed", unique(f"bench{i}"))
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
            "PGHOST": a.proxy.host,
            "PGPORT": str(a.proxy.port),
            "PGUSER": env.login.user,
            "PGPASSWORD": env.login.password,
            "PGSSLMODE": "disable",
            "PGAPPNAME": "bench-joined",
        }
        bench = subprocess.Popen(
            [binary, "-n", "-M", "prepared", "-c", str(clients), "-T", "4", "-f", str(script), env.dbname],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.5)
            reload_audit(a, enabled=True, sink="file:trail/bench.jsonl")
            out, err = bench.communicate(timeout=60)
        finally:
            if bench.poll() is None:
                bench.kill()
        assert bench.returncode == 0, out + err
        a.stop()
    trail = tmp_path / "trail" / "bench.jsonl"
    recs = [r for r in records(trail) if r.get("application_name") == "bench-joined"]
    sessions = {r["session"] for r in recs}
    assert len(sessions) == clients
    for session in sessions:
        mine = [r for r in recs if r["session"] == session]
        assert mine[0]["action"] == "audit_started" and mine[-1]["action"] == "disconnected"
        statements = [r for r in mine if r["type"] == "statement"]
        assert statements and all(r["columns_read"] == [SSN] and r["decision"] == "allow" for r in statements)
        assert mine[-1]["statements"] == len(statements)
    verified(env, trail)
