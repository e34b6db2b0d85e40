"""Flow control: the proxy's memory must not grow with the size of what passes through it.

A result bigger than any buffer is read slowly by the client, and a COPY bigger than
any buffer is pushed fast into a slower PostgreSQL. In both cases the proxy must stop
reading from the fast side while the slow side catches up, so its resident memory
stays flat. The proxy runs as `pgcloak run` in a child process, and its memory is read
from /proc: the peak-RSS counter (VmHWM) is reset first, so it reports the peak of
exactly the period measured.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from proxyctl import SubprocessProxy

WAIT = 10.0
MiB = 1024
BOUND_KIB = 30 * MiB  # well under the ~200-300 MB that pass through


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class PeakMemory:
    """Peak RSS of a process over a period: the kernel's VmHWM after a reset, and
    sampling as a fallback where clear_refs is not permitted."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = 0
        self.sampled = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._halt.wait(0.02):
            with contextlib.suppress(OSError):
                self.sampled = max(self.sampled, memory_kib(self.pid)["VmRSS"])

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.start = memory_kib(self.pid)["VmRSS"]
        self.sampled = self.start
        self._thread.start()
        return self

    def growth(self) -> int:
        """KiB above the RSS at the start of the period, at the worst moment so far."""
        now = memory_kib(self.pid)
        return max(now["VmHWM"], now["VmRSS"], self.sampled) - self.start

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(WAIT)


@pytest.fixture(scope="module")
def cli_proxy(
    pg: TemporaryPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubprocessProxy]:
    """`pgcloak run` with its defaults (backend TLS preferred, so both legs differ)."""
    log = tmp_path_factory.mktemp("flow") / "pgcloak.log"
    args = ["--backend", f"postgresql://{pg.host}:{pg.port}", "--drain-timeout", "0"]
    with SubprocessProxy(args, log) as p:
        yield p


def connect(p: SubprocessProxy, login: DbLogin, app: str) -> psycopg.Connection[Any]:
    dsn = p.dsn(login.user, login.password, login.dbname, application_name=app)
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    # Warm up the session path (imports, TLS state) before anything is measured.
    assert conn.execute("select 1").fetchone() == (1,)
    return conn


def proxy_pid(p: SubprocessProxy) -> int:
    assert p.proc is not None and p.proc.poll() is None
    return p.proc.pid


def test_slow_reader_pauses_the_backend(
    cli_proxy: SubprocessProxy, pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    rows_wanted, width = 300_000, 1000  # ~300 MB of DataRows
    app = "pgcloak-slow-reader"
    # closing(), not the connection's own `with`: on a failed assertion that one would
    # roll back, waiting for the lock the half-read stream still holds.
    with (
        contextlib.closing(connect(cli_proxy, pg_app_user, app)) as conn,
        PeakMemory(proxy_pid(cli_proxy)) as peak,
    ):
        cur = conn.cursor()
        rows = cur.stream(f"select repeat('x', {width}) from generate_series(1, {rows_wanted})")
        first = next(rows)  # the result is flowing; now stop reading
        time.sleep(3)
        paused = peak.growth()
        # PostgreSQL is blocked writing to the proxy, which stopped reading from it.
        wait_event = pg.run_sql(
            f"select wait_event from pg_stat_activity where application_name = '{app}'"
        )
        assert wait_event == "ClientWrite"
        assert paused < BOUND_KIB, f"proxy RSS grew {paused} KiB while the client read nothing"

        count, total = 1, len(first[0])
        for (value,) in rows:
            count += 1
            total += len(value)
        assert (count, total) == (rows_wanted, rows_wanted * width)
        assert peak.growth() < BOUND_KIB, (
            f"proxy RSS grew {peak.growth()} KiB over the whole result"
        )
        assert conn.execute("select 'after'").fetchone() == ("after",)


def test_fast_copy_in_is_bounded(cli_proxy: SubprocessProxy, pg_app_user: DbLogin) -> None:
    rows_per_block, blocks = 1000, 200
    line_width = 1000
    app = "pgcloak-copy-in"
    with contextlib.closing(connect(cli_proxy, pg_app_user, app)) as conn:
        conn.execute("drop table if exists flow_copy")
        conn.execute("create unlogged table flow_copy (id int, payload text)")
        try:
            block = "".join(
                f"{i}\t{'y' * (line_width - len(str(i)) - 2)}\n" for i in range(rows_per_block)
            ).encode()
            assert len(block) == rows_per_block * line_width  # ~1 MB per block, ~200 MB in all
            with PeakMemory(proxy_pid(cli_proxy)) as peak:
                started = time.monotonic()
                with conn.cursor().copy("copy flow_copy (id, payload) from stdin") as copy:
                    for _ in range(blocks):
                        copy.write(block)
                elapsed = time.monotonic() - started
                grown = peak.growth()
            row = conn.execute(
                "select count(*), sum(length(payload) + length(id::text) + 2) from flow_copy"
            ).fetchone()
            assert row == (rows_per_block * blocks, rows_per_block * blocks * line_width)
            assert grown < BOUND_KIB, f"proxy RSS grew {grown} KiB during a {elapsed:.1f}s COPY"
        finally:
            conn.execute("drop table if exists flow_copy")
