"""Shared helpers for the benchmarks in ``bench/`` (pass-through and PII workloads).

Everything here is plain blocking code around subprocesses: a benchmark driver has
no reason to be async, and the targets it measures run in processes of their own.

* :class:`Endpoint`: where a client connects, and the libpq environment for it.
* :class:`ManagedProcess`: start a server process in its own session, wait until it
  listens (with N listeners for SO_REUSEPORT workers), stop its whole process group.
* :func:`run_pgbench` / :class:`PgbenchResult`: run pgbench and parse its summary.
* :func:`interleave`: the measurement loop: round-robin over targets for every
  case, repeated for several rounds, so machine noise hits all targets alike.
* :class:`BenchTarget`: one target's runs by case, with means, spreads and errors.
* :func:`print_table`: ``rich`` when installed, plain aligned text otherwise.
* :func:`start_postgres`, :func:`init_pgbench_data`, :func:`pgcloak_argv`,
  :func:`relay_argv`, :func:`start_pgbouncer`: the usual targets;
  :func:`generate_master_key` for a pgcloak with a policy.

Timings never fail anything: helpers record errors in results instead of raising,
except when a target cannot start at all.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres, free_port, quote_literal

__all__ = [
    "BENCH_DIR",
    "HOST",
    "BenchTarget",
    "Endpoint",
    "ManagedProcess",
    "PgbenchResult",
    "StartError",
    "fmt_num",
    "fmt_ratio",
    "generate_master_key",
    "init_pgbench_data",
    "interleave",
    "mean_or_none",
    "pgbench_path",
    "pgbouncer_version",
    "pgcloak_argv",
    "print_table",
    "ratio",
    "relay_argv",
    "run_pgbench",
    "scratch_dir",
    "start_pgbouncer",
    "start_postgres",
    "terminate_on_sigterm",
    "tool_version",
]

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")


class StartError(RuntimeError):
    """A target process exited or did not listen in time; the message has its log tail."""


# ------------------------------------------------------------------------ endpoints


@dataclass(frozen=True)
class Endpoint:
    """A TCP address plus the credentials a libpq client (pgbench, psql) logs in with."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    def env(self, application_name: str = "pgcloak-bench") -> dict[str, str]:
        """A libpq environment for this endpoint; TLS off (the bench measures the relay path)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": self.dbname,
            "PGSSLMODE": "disable",
            "PGGSSENCMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": application_name,
        }
        return env

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.host, port, self.user, self.password, self.dbname)


# ------------------------------------------------------------------ child processes


def _listening_sockets(host: str, port: int) -> int | None:
    """How many sockets are in LISTEN on host:port (IPv4), from /proc; None without /proc.

    SO_REUSEPORT listeners each get a line of their own, which lets us wait until
    *every* worker listens: otherwise the first client connections all land on the
    first worker up and a 2-worker target is measured as a 1-worker one.
    """
    try:
        text = Path("/proc/net/tcp").read_text()
    except OSError:
        return None
    want_port = f"{port:04X}"
    want_addr = socket.inet_aton(host)[::-1].hex().upper()  # little-endian on x86/arm
    count = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        addr, _, lport = fields[1].partition(":")
        if lport == want_port and addr in (want_addr, "00000000"):
            count += 1
    return count


def _can_connect(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class ManagedProcess:
    """A server process in its own session (so a terminal's Ctrl-C reaches us, not it).

    :meth:`stop` signals the whole process group (pre-forked workers included), then
    escalates to SIGKILL, and always reaps. It is idempotent.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        host: str = HOST,
        listeners: int = 1,
        log_file: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: tuple[int, int] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.host = host
        self.port = port
        self.listeners = listeners
        self.log_file = log_file
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ManagedProcess:
        extra: dict[str, Any] = {}
        if self.user is not None:
            extra = {"user": self.user[0], "group": self.user[1], "extra_groups": []}
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                **extra,
            )
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise StartError(f"{self.name} exited with status {code}\n{self.log_tail()}")
            count = _listening_sockets(self.host, self.port)
            if count is None:  # no /proc: a successful connect is the best we can do
                if _can_connect(self.host, self.port):
                    time.sleep(0.2)
                    return
            elif count >= self.listeners:
                return
            time.sleep(0.02)
        raise StartError(
            f"{self.name} not listening on {self.host}:{self.port} "
            f"({self.listeners} listener(s)) after {timeout:.0f}s\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """CPU (user + system) used so far by the processes of this target's group.

        Pre-forked workers included (they share the group). Far steadier than TPS on a
        small shared machine: what the target itself spends, whatever the others do.
        """
        if self.proc is None:
            return None
        return group_cpu_seconds(self.proc.pid)

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the child leads its own process group
        for sig, wait in ((self.stop_signal, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                break
        # Workers of a pre-forking parent may outlive it for a moment: sweep the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)


def group_cpu_seconds(pgid: int) -> float | None:
    """Summed utime + stime of the live processes in process group ``pgid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    found = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the ")": state ppid pgrp ... utime (12th) stime (13th).
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
            found = True
    return total / tick if found else None


def terminate_on_sigterm() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so ``finally`` blocks clean up."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# ------------------------------------------------------------------------- pgbench


@dataclass
class PgbenchResult:
    """One pgbench run. ``tps`` excludes connection set-up (pgbench's own figure)."""

    target: str
    case: str
    round: int
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed: int = 0
    returncode: int = 0
    error: str | None = None
    seconds: float = 0.0
    #: CPU seconds (user + system, every process of the target) spent during the run.
    cpu_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.tps is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TPS_RE = re.compile(
    r"^tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)\)",
    re.M,
)
_TPS_ANY_RE = re.compile(r"^tps = ([0-9.]+)", re.M)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_TX_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)


def parse_pgbench(output: str, result: PgbenchResult) -> PgbenchResult:
    """Fill ``result`` from pgbench's summary (PostgreSQL 13..17 formats)."""
    match = _TPS_RE.search(output) or _TPS_ANY_RE.search(output)
    if match:
        result.tps = float(match.group(1))
    if match := _LAT_RE.search(output):
        result.latency_ms = float(match.group(1))
    if match := _TX_RE.search(output):
        result.transactions = int(match.group(1))
    if match := _FAILED_RE.search(output):
        result.failed = int(match.group(1))
    return result


def pgbench_path(pg: TemporaryPostgres | None = None) -> str:
    """pgbench next to the server binaries, else from PATH."""
    if pg is not None:
        local = pg.bin_dir / "pgbench"
        if os.access(local, os.X_OK):
            return str(local)
    found = shutil.which("pgbench")
    if found is None:
        raise FileNotFoundError(
            "pgbench not found (install postgresql-contrib / postgresql-client)"
        )
    return found


def run_pgbench(
    pgbench: str,
    endpoint: Endpoint,
    *,
    target: str,
    case: str,
    round_no: int = 0,
    mode: str = "simple",
    clients: int = 8,
    threads: int = 2,
    seconds: float = 10,
    builtin: str | None = "select-only",
    scripts: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> PgbenchResult:
    """Run ``pgbench -M mode -c clients -j threads -T seconds`` against ``endpoint``.

    ``builtin`` picks a built-in script (``select-only`` = ``-S``); ``scripts`` are
    ``-f file[@weight]`` arguments for custom workloads. Errors (exit status, aborted
    clients, no tps line) are recorded in the result, never raised.
    """
    argv = [
        pgbench, "-n",
        "-M", mode,
        "-c", str(clients),
        "-j", str(max(1, min(threads, clients))),
        "-T", str(max(1, round(seconds))),
    ]  # fmt: skip
    if builtin is not None:
        argv += ["-b", builtin]
    for script in scripts:
        argv += ["-f", script]
    argv += list(extra_args)
    result = PgbenchResult(target=target, case=case, round=round_no)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            env=endpoint.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        result.error = f"pgbench did not finish within {seconds + 60:.0f}s"
        result.returncode = -1
        return result
    finally:
        result.seconds = time.monotonic() - started
    parse_pgbench(proc.stdout, result)
    result.returncode = proc.returncode
    if proc.returncode != 0 or result.tps is None:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
        result.error = f"pgbench exit {proc.returncode}: {detail.strip()}"[:300]
    return result


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the values, or None when any is missing (a failed run poisons the cell)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(v for v in values if v is not None)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass
class BenchTarget:
    """One measured target: where clients connect, its process, and its runs by case.

    A case's figure is the mean over its rounds; one failed run poisons the cell
    (``None``) rather than averaging over fewer rounds silently.
    """

    key: str
    description: str
    endpoint: Endpoint
    process: ManagedProcess | None = None
    results: dict[str, list[PgbenchResult]] = field(default_factory=dict)

    def add(self, result: PgbenchResult) -> None:
        self.results.setdefault(result.case, []).append(result)

    def tps(self, case: str) -> float | None:
        return mean_or_none([r.tps if r.ok else None for r in self.results.get(case, [])])

    def cpu_us_per_tx(self, case: str) -> float | None:
        """The target's own CPU per transaction (µs), mean over the rounds."""
        return mean_or_none(
            [
                r.cpu_seconds * 1e6 / r.transactions
                if r.ok and r.cpu_seconds is not None and r.transactions
                else None
                for r in self.results.get(case, [])
            ]
        )

    def latency_ms(self, case: str) -> float | None:
        return mean_or_none([r.latency_ms if r.ok else None for r in self.results.get(case, [])])

    def spread(self, case: str) -> float | None:
        """Half the min..max range of the rounds' tps, as a fraction of their mean."""
        values = [r.tps for r in self.results.get(case, []) if r.ok and r.tps is not None]
        if len(values) < 2:
            return None
        return (max(values) - min(values)) / 2 / statistics.fmean(values)

    def failed(self, case: str) -> int:
        return sum(r.failed for r in self.results.get(case, []))

    def errors(self) -> list[str]:
        return [
            f"{r.case} round {r.round + 1}: {r.error}"
            for runs in self.results.values()
            for r in runs
            if r.error
        ]

    def cell(self, case: str) -> str:
        """``1,234 ±3%`` for a table: mean tps, spread over rounds, failed transactions."""
        tps = self.tps(case)
        text = fmt_num(tps)
        spread = self.spread(case)
        if tps is not None and spread is not None:
            text += f" ±{spread * 100:.0f}%"
        if self.failed(case):
            text += f" ({self.failed(case)} failed)"
        return text


# ----------------------------------------------------------------- measurement loop


def interleave(
    targets: Sequence[T],
    cases: Sequence[K],
    rounds: int,
    run: Callable[[T, K, int], R],
) -> Iterator[tuple[T, K, int, R]]:
    """Run every (target, case) ``rounds`` times, interleaved.

    Order: for each round, for each case, every target once; the starting target
    rotates with the round and the case, so no target always runs first (right
    after another's connections were torn down) or last. Yields as it goes so
    callers can print progress.
    """
    n = len(targets)
    for round_no in range(rounds):
        for case_no, case in enumerate(cases):
            shift = (round_no + case_no) % n if n else 0
            for target in (*targets[shift:], *targets[:shift]):
                yield target, case, round_no, run(target, case, round_no)


# -------------------------------------------------------------------------- output


def fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "ERR"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    plain: bool = False,
    right_align_from: int = 1,
) -> None:
    """A table via ``rich`` when it is installed (and ``plain`` is False), else text."""
    if not plain:
        try:
            from rich.console import Console  # type: ignore[import-not-found, unused-ignore]
            from rich.table import Table  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            plain = True
        else:
            table = Table()
            for i, header in enumerate(headers):
                table.add_column(header, justify="right" if i >= right_align_from else "left")
            for row in rows:
                table.add_row(*row)
            console = Console()
            console.print("\n" + title, markup=False, highlight=False, style="bold")
            console.print(table)
            return
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i >= right_align_from else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    sys.stdout.flush()


# ------------------------------------------------------------------------- targets


def tool_version(argv: Sequence[str]) -> str | None:
    """First line of ``tool --version`` style output, or None."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, check=False
        ).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    return None


def start_postgres(
    *, clients: int, settings: Mapping[str, str | int | float | bool] | None = None
) -> TemporaryPostgres:
    """A throwaway PostgreSQL tuned for a read-mostly benchmark on a small machine.

    Durability is already off (fsync, synchronous_commit: a throwaway server);
    connections leave room for one pooler's idle pool besides the running target.
    """
    base: dict[str, str | int | float | bool] = {
        "max_connections": max(100, 4 * clients + 20),
        "shared_buffers": "256MB",
        "jit": False,
        "log_min_messages": "warning",
        "log_connections": False,
        "log_disconnections": False,
        "track_io_timing": False,
    }
    base |= dict(settings or {})
    return TemporaryPostgres(settings=base).start()


def init_pgbench_data(pgbench: str, endpoint: Endpoint, scale: int) -> None:
    """``pgbench -i -s scale`` (with VACUUM) directly against PostgreSQL."""
    proc = subprocess.run(
        [pgbench, "-i", "-q", "-s", str(scale)],
        env=endpoint.env("pgcloak-bench-init"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -i failed ({proc.returncode}):\n{proc.stderr}")


def pgcloak_argv(
    listen_port: int,
    backend_port: int,
    *,
    workers: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m pgcloak.cli run`` in front of a plain-text backend on 127.0.0.1."""
    argv = [
        sys.executable, "-m", "pgcloak.cli", "run",
        "--listen", f"{HOST}:{listen_port}",
        "--backend", f"postgresql://{HOST}:{backend_port}",
        "--backend-tls-mode", "disable",
        "--log-level", "warning",
    ]  # fmt: skip
    if workers > 1:
        argv += ["--workers", str(workers)]
    return argv + list(extra)


def generate_master_key() -> str:
    """A fresh master key from ``pgcloak keys generate`` (base64), for PGCLOAK_MASTER_KEY.

    Never printed or logged by the benchmarks; it lives only in the proxies' environment.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "pgcloak.cli", "keys", "generate"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    key = proc.stdout.strip()
    if proc.returncode != 0 or not key:
        raise RuntimeError(
            f"pgcloak keys generate failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return key


def relay_argv(listen_port: int, backend_port: int, *, workers: int = 1) -> list[str]:
    """The plain uvloop byte relay (``bench/relay.py``): the floor for a Python proxy."""
    return [
        sys.executable, str(BENCH_DIR / "relay.py"),
        "--listen", f"{HOST}:{listen_port}",
        "--backend", f"{HOST}:{backend_port}",
        "--workers", str(workers),
    ]  # fmt: skip


def pgbouncer_version() -> str | None:
    exe = shutil.which("pgbouncer")
    return tool_version([exe, "--version"]) if exe else None


def _quote_userlist(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def start_pgbouncer(
    pg: TemporaryPostgres,
    login: DbLogin,
    *,
    pool_size: int,
    workdir: Path,
    port: int | None = None,
    log_file: Path | None = None,
) -> ManagedProcess:
    """PgBouncer 1 process, session pooling, SCRAM for clients and towards PostgreSQL.

    The auth_file holds the role's SCRAM verifier straight from ``pg_authid`` (no
    plaintext password on disk): a client that authenticates with SCRAM gives
    PgBouncer the keys it then uses to log in to PostgreSQL. PgBouncer refuses to
    run as root, so as root it runs as the server's unprivileged OS user.
    """
    exe = shutil.which("pgbouncer")
    if exe is None:
        raise FileNotFoundError("pgbouncer is not on PATH")
    verifier = pg.run_sql(
        f"SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = {quote_literal(login.user)}"
    ).strip()
    if not verifier.startswith("SCRAM-SHA-256$"):
        raise RuntimeError(f"role {login.user!r} has no SCRAM verifier")

    user: tuple[int, int] | None = None
    if os.geteuid() == 0:
        entry = pwd.getpwnam(pg.os_user)
        user = (entry.pw_uid, entry.pw_gid)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(HOST)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f"{_quote_userlist(login.user)} {_quote_userlist(verifier)}\n")
    config = workdir / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"{login.dbname} = host={HOST} port={pg.port} dbname={login.dbname}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {HOST}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {userlist}\n"
        "pool_mode = session\n"
        f"default_pool_size = {pool_size}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        f"max_client_conn = {max(100, 4 * pool_size)}\n"
        f"max_db_connections = {pool_size}\n"
        "server_tls_sslmode = disable\n"
        "client_tls_sslmode = disable\n"
        "server_reset_query = DISCARD ALL\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
        "log_pooler_errors = 1\n"
        "stats_period = 3600\n"
    )
    for path in (workdir, userlist, config):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if user is not None:
            os.chown(path, *user)
    log_file = log_file or workdir / "pgbouncer.log"
    log_file.touch()
    if user is not None:
        os.chown(log_file, *user)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return ManagedProcess(
        "pgbouncer",
        [exe, str(config)],
        port=port,
        log_file=log_file,
        env=env,
        cwd=workdir,
        user=user,
    ).start()


def scratch_dir(prefix: str = "pgcloak-bench-") -> Path:
    """A private temporary directory (the caller removes it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # PgBouncer's unprivileged user must traverse into its subdir
    return path
