"""The policy changes while clients run: a valid edit of the file is picked up within a
few poll intervals (new writes follow it, running sessions never fail), an invalid edit
is refused and the last good policy keeps serving; SIGHUP reloads a `pgcloak run`
process. And pgbench's tables, which no policy names, pass through untouched.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env, policy_yaml, unique

from pgcloak.sql import planner
from proxyctl import SubprocessProxy

PGBENCH = shutil.which("pgbench")
INVALID_POLICY = "version: 1\ntables:\n  users:\n    email: {hash_only: true, encrypt: true}\n"


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    """Starts with users.phone NOT in the policy; the file is polled every 0.2 s."""
    with encryption_env(
        pg, pg_app_user, tmp_path_factory.mktemp("enc_reload"), "reload",
        policy=policy_yaml(phone=False), policy_poll_interval=0.2,
    ) as e:
        yield e


def stored_phone(env: EncEnv, email: str) -> str | None:
    return env.raw_one("SELECT phone FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", email))


def is_protected_phone(env: EncEnv, email: str, phone: str) -> bool:
    stored = stored_phone(env, email)
    if stored == phone:
        return False
    env.assert_stored(stored, phone, USERS, "phone")
    return True


async def test_policy_edit_during_traffic(env: EncEnv):
    conn = await env.apg()
    first = unique("before")
    await conn.execute("INSERT INTO users (email, phone) VALUES ($1, $2)", first, "555-0100")
    assert stored_phone(env, first) == "555-0100"  # not in the policy (yet)
    by_phone = "SELECT email FROM users WHERE phone = $1"  # cached by asyncpg from now on
    assert await conn.fetchval(by_phone, "555-0100") == first

    stop = asyncio.Event()
    done = {"queries": 0}

    async def reader() -> None:
        c = await env.apg()
        try:
            stmt = await c.prepare("SELECT email, phone FROM users WHERE email = $1")
            while not stop.is_set():
                assert tuple(await stmt.fetchrow(first)) == (first, "555-0100")
                assert await c.fetchval("SELECT count(*) FROM users WHERE email = $1", first.upper()) == 1
                done["queries"] += 2
                await asyncio.sleep(0.005)
        finally:
            await c.close()

    async def insert_until(protected: bool, timeout: float) -> float:
        start = time.monotonic()
        while True:
            email = unique("during")
            await conn.execute("INSERT INTO users (email, phone) VALUES ($1, $2)", email, "555-0199")
            assert await conn.fetchval("SELECT phone FROM users WHERE email = $1", email) == "555-0199"
            if is_protected_phone(env, email, "555-0199") == protected:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, "the policy edit was not picked up"
            await asyncio.sleep(0.05)

    readers = [asyncio.create_task(reader()) for _ in range(2)]
    try:
        env.write_policy(policy_yaml(phone=True))
        await insert_until(protected=True, timeout=3.0)
        # the cached statement's rewrite changed (phone is compared on its index now): the
        # driver is told its cached plan is stale, prepares again, and the call succeeds
        emails = {r["email"] for r in await conn.fetch(by_phone, "555 0199")}
        assert emails and all(e.startswith("during-") for e in emails)
        # an invalid edit: refused, the last good policy keeps serving
        env.write_policy(INVALID_POLICY)
        await asyncio.sleep(1.0)
        email = unique("after-invalid")
        await conn.execute("INSERT INTO users (email, phone) VALUES ($1, $2)", email, "555-0142")
        assert is_protected_phone(env, email, "555-0142")
        env.assert_stored(env.raw_one("SELECT email FROM users WHERE left(email, 22) = %s",
                                      env.index_of(USERS, "email", email)), email)
        assert await conn.fetchval("SELECT phone FROM users WHERE email = $1", email) == "555-0142"
        # and the watcher still follows the next valid edit
        env.write_policy(policy_yaml(phone=False))
        await insert_until(protected=False, timeout=3.0)
        for task in readers:
            assert not task.done(), task.exception()
    finally:
        stop.set()
        await asyncio.gather(*readers)
        await conn.close()
    assert done["queries"] > 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs signals")
def test_sighup_reloads_a_running_pgcloak(env: EncEnv, tmp_path: Path):
    policy = tmp_path / "sighup.yaml"
    policy.write_text(policy_yaml(phone=False), encoding="utf-8")
    key_file = tmp_path / "master.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(env.key_text + "\n")
    args = [
        "--backend", f"postgresql://{env.pg.host}:{env.pg.port}",
        "--backend-tls-ca", str(env.pg.tls_files.ca_cert),
        "--policy", str(policy), "--policy-poll-interval", "3600",
        "--master-key-file", str(key_file), "--drain-timeout", "0",
    ]

    def insert(proxy: SubprocessProxy, phone: str) -> str:
        email = unique("hup")
        with psycopg.connect(proxy.dsn(env.login.user, env.login.password, env.dbname), autocommit=True) as c:
            c.execute("INSERT INTO users (email, phone) VALUES (%s, %s)", (email, phone))
            assert c.execute("SELECT phone FROM users WHERE email = %s", (email,)).fetchone() == (phone,)
        return email

    def replace(text: str) -> None:
        tmp = policy.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, policy)

    with SubprocessProxy(args, tmp_path / "pgcloak.log") as proxy:
        assert not is_protected_phone(env, insert(proxy, "555-0001"), "555-0001")
        replace(policy_yaml(phone=True))
        time.sleep(0.3)
        assert not is_protected_phone(env, insert(proxy, "555-0002"), "555-0002")  # no poll for an hour
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not is_protected_phone(env, insert(proxy, "555-0003"), "555-0003"):
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)
        replace(INVALID_POLICY)
        proxy.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert is_protected_phone(env, insert(proxy, "555-0004"), "555-0004"), proxy.log()
        # signals are handled in order: once the next valid edit shows, the invalid one
        # before it has been seen (and refused, as the insert above showed)
        replace(policy_yaml(phone=False))
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while is_protected_phone(env, insert(proxy, "555-0005"), "555-0005"):
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)


@pytest.mark.skipif(PGBENCH is None, reason="pgbench is not installed")
def test_pgbench_through_a_policy_enabled_proxy(env: EncEnv):
    assert PGBENCH is not None
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ |= {
        "PGHOST": env.proxy.host, "PGPORT": str(env.proxy.port), "PGUSER": env.login.user,
        "PGPASSWORD": env.login.password, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PGBENCH, *args, env.dbname], env=environ, capture_output=True, text=True,
                              timeout=120, check=False)

    init = run("-i", "-s", "1", "-q", "-I", "dtgvp")
    assert init.returncode == 0, init.stderr
    parses = planner.PARSE_CALLS
    for mode in ("simple", "extended", "prepared"):
        proc = run("-S", "-t", "50", "-c", "2", "-M", mode)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"number of transactions actually processed: 100/100", proc.stdout), proc.stdout
        failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
        assert failed is None or failed.group(1) == "0", proc.stdout
    # the prefilter kept every pgbench statement away from sqlglot
    assert parses == planner.PARSE_CALLS
    # and the protected table still works next to them
    with env.psy() as c:
        email = unique("bench")
        c.execute("INSERT INTO users (email) VALUES (%s)", (email,))
        assert c.execute("SELECT count(*) FROM users u, pgbench_branches b WHERE u.email = %s", (email,)).fetchone() == (1,)
