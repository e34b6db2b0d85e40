"""The `pgcloak run` process: signals and draining, limits, settings precedence, logs, workers.

Everything here runs the real CLI as a child process (:class:`SubprocessProxy`) and
looks at it from outside: exit codes, what clients see, and the captured log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from proxyctl import SubprocessProxy

WAIT = 10.0
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warning|error)\s+\S")


def wait_until(
    predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def backend_args(pg: TemporaryPostgres) -> list[str]:
    return ["--backend", f"postgresql://{pg.host}:{pg.port}"]


def connect(
    p: SubprocessProxy, login: DbLogin, app: str = "pgcloak-lifecycle"
) -> psycopg.Connection[Any]:
    dsn = p.dsn(login.user, login.password, login.dbname, application_name=app)
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def refused(port: int) -> bool:
    """True once nothing listens on ``port``; an accepted probe is closed at once."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def json_log(p: SubprocessProxy) -> list[dict[str, Any]]:
    """Every line of the log as a JSON object (fails on a line that is not one)."""
    events = []
    for line in p.log().splitlines():
        if line.strip():
            doc = json.loads(line)
            assert isinstance(doc, dict) and "event" in doc, line
            events.append(doc)
    return events


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., SubprocessProxy]]:
    """Start `pgcloak run` children; whatever is still running at the end is stopped."""
    started: list[SubprocessProxy] = []

    def factory(
        args: list[str], env: dict[str, str] | None = None, start: bool = True
    ) -> SubprocessProxy:
        p = SubprocessProxy(args, tmp_path / f"pgcloak-{len(started)}.log", env)
        # Only what the test gives: no PGCLOAK_* leaking in from the caller's shell.
        p.env = {k: v for k, v in p.env.items() if not k.startswith("PGCLOAK_")} | (env or {})
        started.append(p)
        return p.start() if start else p

    yield factory
    for p in started:
        p.stop()


# ------------------------------------------------------------------- graceful shutdown


SIGNALS = [signal.SIGTERM, signal.SIGINT]


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_shutdown_drains_running_query_then_exits_0(
    spawn: Callable[..., SubprocessProxy],
    pg: TemporaryPostgres,
    pg_app_user: DbLogin,
    sig: signal.Signals,
) -> None:
    p = spawn([*backend_args(pg), "--drain-timeout", "5"])
    app = f"pgcloak-drain-{sig.name}"
    idle = connect(p, pg_app_user, app)
    busy = connect(p, pg_app_user, app)
    outcome: dict[str, Any] = {}

    def run_query() -> None:
        try:
            outcome["row"] = busy.execute("select pg_sleep(2), 'finished'").fetchone()
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    worker = threading.Thread(target=run_query, daemon=True)
    worker.start()
    wait_until(
        lambda: (
            "PgSleep"
            in pg.run_sql(
                f"select wait_event from pg_stat_activity where application_name = '{app}'"
            )
        ),
        what="the query to start",
    )
    signalled = time.monotonic()
    p.signal(sig)
    wait_until(lambda: refused(p.port), 2.0, what="new connections to be refused")
    with pytest.raises(psycopg.OperationalError):
        connect(p, pg_app_user)
    # Sessions that were there keep being served during the drain.
    assert idle.execute("select 'still served'").fetchone() == ("still served",)
    worker.join(WAIT)
    assert outcome == {"row": ("", "finished")}
    assert p.proc is not None and p.proc.poll() is None, "exited before its clients left"
    busy.close()
    idle.close()
    assert p.wait(WAIT) == 0
    assert time.monotonic() - signalled < 5, "did not exit once the clients were gone"
    assert "reason=terminated" not in p.log()  # nobody was cut off


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_shutdown_ends_idle_clients_with_57p01_after_drain_timeout(
    spawn: Callable[..., SubprocessProxy],
    pg: TemporaryPostgres,
    pg_app_user: DbLogin,
    sig: signal.Signals,
) -> None:
    p = spawn([*backend_args(pg), "--drain-timeout", "0.5"])
    app = f"pgcloak-drain-idle-{sig.name}"
    with connect(p, pg_app_user, app) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        signalled = time.monotonic()
        p.signal(sig)
        assert p.wait(WAIT) == 0
        assert 0.4 < time.monotonic() - signalled < 5
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "terminating connection due to administrator command" in str(info.value)
        assert info.value.sqlstate == "57P01"
    # The proxy said goodbye to PostgreSQL too: no backend is left behind.
    wait_until(lambda: not pg.backend_pids(app), what="the backend to exit")


def test_shutdown_cuts_a_query_still_running_at_the_deadline_with_57p01(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    p = spawn([*backend_args(pg), "--drain-timeout", "0.3"])
    app = "pgcloak-drain-cut"
    with connect(p, pg_app_user, app) as conn:
        timer = threading.Timer(0.3, p.signal, (signal.SIGTERM,))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select pg_sleep(3)")
        finally:
            timer.join(WAIT)
        assert time.monotonic() - started < 2.5
        assert info.value.sqlstate == "57P01"
        assert "terminating connection due to administrator command" in str(info.value)
    assert p.wait(WAIT) == 0
    # No check that the backend is gone: PostgreSQL notices the closed connection
    # only once pg_sleep returns (nothing but a CancelRequest stops a statement).


# -------------------------------------------------------------------- connection limit


async def test_connection_limit_is_53300_and_frees_up(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    p = spawn([*backend_args(pg), "--max-client-connections", "2"])
    login = pg_app_user
    kwargs = {**p.kwargs(login.user, login.password, login.dbname), "ssl": False}
    first = await asyncpg.connect(**kwargs)
    second = await asyncpg.connect(**kwargs)
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(**kwargs)
        assert info.value.sqlstate == "53300"
        assert str(info.value) == "sorry, too many clients already"
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            await asyncio.to_thread(connect, p, login)
        assert await first.fetchval("select 1") == 1  # the refused ones did no harm
        await first.close()
        deadline = time.monotonic() + WAIT
        while True:  # the proxy notices the close asynchronously
            try:
                third = await asyncpg.connect(**kwargs)
                break
            except asyncpg.TooManyConnectionsError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert await third.fetchval("select 'third'") == "third"
        await third.close()
    finally:
        await second.close()


# ------------------------------------------------------------------- settings precedence


def _log_format(p: SubprocessProxy) -> str:
    lines = [line for line in p.log().splitlines() if line.strip()]
    assert lines, "no log output"
    if all(line.startswith("{") for line in lines):
        for line in lines:
            assert "event" in json.loads(line)
        return "json"
    assert all(TEXT_LINE.match(line) for line in lines), lines
    return "text"


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({}, [], "json"),
        ({"PGCLOAK_LOG_FORMAT": "text"}, [], "text"),
        ({"PGCLOAK_LOG_FORMAT": "text"}, ["--log-format", "json"], "json"),
    ],
    ids=["file", "env-over-file", "flag-over-env"],
)
def test_settings_precedence_file_env_flag(
    spawn: Callable[..., SubprocessProxy],
    pg: TemporaryPostgres,
    pg_app_user: DbLogin,
    tmp_path: Path,
    env: dict[str, str],
    flags: list[str],
    expected: str,
) -> None:
    p = spawn([], env, start=False)
    config = tmp_path / "pgcloak.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{p.port}\n"
        f"backend: postgresql://{pg.host}:{pg.port}\n"
        "log_format: json\n"
        "drain_timeout: 0\n"
    )
    p.args = ["--config", str(config), *flags]  # listen and backend come from the file only
    p.start()
    with connect(p, pg_app_user) as conn:
        assert conn.execute("select current_user").fetchone() == ("app",)
    p.signal(signal.SIGTERM)
    assert p.wait(WAIT) == 0
    assert _log_format(p) == expected


def test_bad_settings_exit_2_naming_the_setting(tmp_path: Path) -> None:
    addresses = ["--listen", "127.0.0.1:1", "--backend", "postgresql://127.0.0.1:1"]
    (tmp_path / "negative.yaml").write_text("drain_timeout: -1\n")
    (tmp_path / "typo.yaml").write_text("log_fromat: json\n")
    # YAML that breaks the parser (RecursionError) or a constructor (ValueError)
    (tmp_path / "nested.yaml").write_text("[" * 5000 + "\n")
    (tmp_path / "digits.yaml").write_text("version: 1" + "0" * 5000 + "\ntables: {}\n")
    key = base64.b64encode(os.urandom(32)).decode()
    # (arguments, environment, texts the message must contain)
    cases: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
        "flag": (
            [*addresses, "--max-client-connections", "0"],
            {},
            ["max_client_connections", "--max-client-connections"],
        ),
        "env": (addresses, {"PGCLOAK_WORKERS": "lots"}, ["workers", "PGCLOAK_WORKERS"]),
        "file": (
            ["--config", str(tmp_path / "negative.yaml"), *addresses],
            {},
            ["drain_timeout", str(tmp_path / "negative.yaml")],
        ),
        "unknown key": (["--config", str(tmp_path / "typo.yaml"), *addresses], {}, ["log_fromat"]),
        "policy too deep": (
            [*addresses, "--policy", str(tmp_path / "nested.yaml")],
            {"PGCLOAK_MASTER_KEY": key},
            [f"policy refused: {tmp_path / 'nested.yaml'}:1:", "nesting depth"],
        ),
        "policy huge number": (
            [*addresses, "--policy", str(tmp_path / "digits.yaml")],
            {"PGCLOAK_MASTER_KEY": key},
            [f"policy refused: {tmp_path / 'digits.yaml'}:1:10: ", "int value cannot be read"],
        ),
        "backend url": (
            ["--listen", "127.0.0.1:1", "--backend", "mysql://127.0.0.1:1"],
            {},
            ["backend", "postgresql://"],
        ),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGCLOAK_")}
    # Started together: each is a Python start-up, which is slow on a busy runner.
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pgcloak.cli", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=base | env,
        )
        for name, (args, env, _) in cases.items()
    }
    try:
        for name, proc in procs.items():
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, (name, proc.returncode, stderr)
            for needle in cases[name][2]:
                assert needle in stderr, (name, needle, stderr)
            assert stderr.startswith("pgcloak: ") and "Traceback" not in stderr, (name, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------ logs


def test_logs_hold_no_secrets_or_literals(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    password = "Pw-Distinct-91c4e7"
    wrong = "Wrong-Pw-5d2b88"
    literal = "SECRET-LITERAL-8f3a"
    pg.run_sql(
        "do $$ begin if not exists (select from pg_roles where rolname = 'logcheck') then "
        f"create role logcheck login password '{password}'; end if; end $$"
    )
    p = spawn(
        [*backend_args(pg), "--log-level", "debug", "--log-format", "json", "--drain-timeout", "0"]
    )
    login = DbLogin("logcheck", password, pg_app_user.dbname)
    with connect(p, login) as conn:
        assert conn.execute(f"select '{literal}'").fetchone() == (literal,)
        assert conn.execute("select %s::text", (literal,)).fetchone() == (literal,)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute(f"select '{literal}'::int")  # PostgreSQL's error quotes it
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(p, DbLogin("logcheck", wrong, pg_app_user.dbname))
    p.signal(signal.SIGTERM)
    assert p.wait(WAIT) == 0
    text = p.log()
    for secret in (password, wrong, literal):
        assert secret not in text
    events = json_log(p)
    names = [e["event"] for e in events]
    assert "session ready" in names and "session closed" in names, names


# --------------------------------------------------------------------------- workers


def test_two_workers_share_the_load_cancel_and_stop(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    p = spawn([*backend_args(pg), "--workers", "2", "--log-format", "json", "--drain-timeout", "1"])
    login = pg_app_user
    for i in range(40):
        with connect(p, login) as conn:
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)

    results: list[Any] = []

    def concurrent(i: int) -> None:
        try:
            with connect(p, login) as conn:
                results.append(conn.execute("select pg_sleep(0.2), %s::int", (i,)).fetchone())
        except BaseException as exc:  # asserted below
            results.append(exc)

    threads = [threading.Thread(target=concurrent, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(results, key=repr) == sorted((("", i) for i in range(10)), key=repr)

    # A cancel request may land on either worker; each forwards it to PostgreSQL.
    with connect(p, login) as conn:
        for _ in range(10):
            timer = threading.Timer(0.2, conn.cancel_safe)
            timer.start()
            started = time.monotonic()
            try:
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("select pg_sleep(5)")
            finally:
                timer.join(WAIT)
            assert time.monotonic() - started < 1.2
        assert conn.execute("select 'alive'").fetchone() == ("alive",)

    ready = [e for e in json_log(p) if e["event"] == "session ready"]
    assert len(ready) == 51
    workers = {e["pid"] for e in ready}
    assert len(workers) == 2, workers
    assert p.proc is not None and p.proc.pid not in workers

    p.signal(signal.SIGTERM)
    assert p.wait(WAIT) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the parent"
    stopped = [e for e in json_log(p) if e["event"] == "stopped"]
    assert {e["pid"] for e in stopped} == workers
