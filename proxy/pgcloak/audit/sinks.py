"""Where chained audit records go: a JSON-lines file, stdout/stderr, a PostgreSQL table.

This is the audit package's only module that does IO. Blocking file IO runs on one
private thread per sink (so order is kept and the event loop never waits on a disk);
the PostgreSQL sink uses asyncpg on the loop. Every failure surfaces as
:class:`SinkError`, whose message never contains a password.

A batch of records (chained by the log on the event loop) costs the loop one trip to
the sink's IO thread, where its lines are joined and written.

Also here: :class:`SpillFile`, the bounded, fsync'd JSON-lines file that holds records
while a sink fails, and the readers the CLI uses (files, gzip'd files, the table).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gzip
import hashlib
import logging
import operator
import os
import re
import tempfile
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import asyncpg

from pgcloak.audit.chain import ChainedRecord
from pgcloak.policy import Audit

__all__ = [
    "DEFAULT_TABLE",
    "FileSink",
    "PostgresSink",
    "Sink",
    "SinkError",
    "SpillError",
    "SpillFile",
    "StreamSink",
    "describe_target",
    "iter_file_lines",
    "make_sink",
    "read_table_lines",
    "redact_dsn",
    "resolve_paths",
    "rotated_name",
    "spill_path_for",
    "worker_path",
]

log = logging.getLogger("pgcloak.audit")

DEFAULT_TABLE: Final = "pgcloak_audit"
FsyncPolicy = Literal["always", "interval", "never"]
_TABLE_RE: Final = re.compile(r"^(?:([A-Za-z_][A-Za-z0-9_]{0,62})\.)?([A-Za-z_][A-Za-z0-9_]{0,62})\Z")
_T = TypeVar("_T")


class SinkError(Exception):
    """A sink could not take records (the caller spills them and retries later)."""


class SpillError(Exception):
    """The spill file is full or cannot be written."""


class _Worker:
    """One private thread for a sink's blocking calls, so that they run in order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _joined(records: Sequence[ChainedRecord]) -> bytes:
    """The records' lines as one file's bytes (each already ends with its newline)."""
    return b"".join([r.data for r in records])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _iov_max() -> int:
    """Buffers per writev(2) call: the system's limit (1024 on Linux), else POSIX's least."""
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 16
    return limit if limit >= 16 else 16


_IOV_MAX: Final = _iov_max()
#: A record's bytes (``map`` of it: no Python frame per record).
_DATA: Final = operator.attrgetter("data")


def _writev_all(fd: int, buffers: Sequence[bytes]) -> int:
    """Write ``buffers`` in order, as one ``_write_all`` of their concatenation would:
    no copy into one big buffer (a batch is hundreds of kilobytes, each line already
    bytes), one writev(2) per ``_IOV_MAX`` lines, a short write finished the plain way.
    Returns the bytes written (all of them)."""
    total = 0
    for start in range(0, len(buffers), _IOV_MAX):
        part = buffers[start : start + _IOV_MAX]
        size = sum(map(len, part))
        total += size
        written = os.writev(fd, part)
        if written == size:  # the usual: all of it (no Python loop per line)
            continue
        for i, buf in enumerate(part):
            if written < len(buf):
                _write_all(fd, b"".join([buf[written:], *part[i + 1 :]]))
                break
            written -= len(buf)
    return total


# --------------------------------------------------------------------------- naming


def last_record_in(path: Path, window: int = 256 * 1024) -> ChainedRecord | None:
    """The last whole record in the last ``window`` bytes of a JSON-lines file (a crash
    may have left half a line after it), or None (no such file, no record)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - window))
            tail = f.read()
    except FileNotFoundError:
        return None
    for raw in reversed(tail.splitlines()):
        if raw.strip():
            try:
                return ChainedRecord.from_line(raw.decode("utf-8"))
            except ValueError:  # half a line, or not a record: look further back
                continue
    return None


def worker_path(path: Path, worker: int | None) -> Path:
    """``audit.jsonl`` -> ``audit.w3.jsonl`` for worker 3 (unchanged without a worker)."""
    if worker is None:
        return path
    if path.suffix:
        return path.with_name(f"{path.stem}.w{worker}{path.suffix}")
    return path.with_name(f"{path.name}.w{worker}")


def rotated_name(path: Path, when: datetime | None = None) -> Path:
    """``audit.w3.jsonl`` -> ``audit.w3.jsonl.20240501T120000.123456Z`` (``.1``, ... if taken)."""
    stamp = (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    candidate = path.with_name(f"{path.name}.{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{stamp}.{n}")
        n += 1
    return candidate


def resolve_paths(config: Audit, base: Path | None = None) -> Audit:
    """``config`` with a relative file sink and ``spill_dir`` made absolute against
    ``base``, the working directory by default (never the policy file's directory: in a
    container that is a read-only mount, the working directory a writable volume).

    Resolved once, when the trail starts, so the files stay put whatever happens next."""
    base = Path.cwd() if base is None else base
    update: dict[str, str] = {}
    if config.sink.startswith("file:"):
        path = Path(config.sink[len("file:") :])
        if not path.is_absolute():
            update["sink"] = f"file:{base / path}"
    if config.spill_dir is not None and not Path(config.spill_dir).is_absolute():
        update["spill_dir"] = str(base / config.spill_dir)
    return config.model_copy(update=update) if update else config


def spill_path_for(
    sink: Sink, worker: int | None, spill_dir: str | Path | None
) -> Path:
    """The spill file of ``sink``: next to a file sink, else in ``spill_dir`` (or tmp)."""
    if isinstance(sink, FileSink):
        base = sink.path
        name = f"{base.stem}.spill.jsonl" if base.suffix else f"{base.name}.spill.jsonl"
        directory = Path(spill_dir) if spill_dir is not None else base.parent
        return directory / name
    directory = (
        Path(spill_dir)
        if spill_dir is not None
        else Path(tempfile.gettempdir()) / "pgcloak-audit-spill"
    )
    digest = hashlib.sha256(sink.identity.encode()).hexdigest()[:12]
    suffix = f".w{worker}" if worker is not None else ""
    return directory / f"pgcloak-audit-{digest}{suffix}.spill.jsonl"


# --------------------------------------------------------------------------- sinks


class Sink(ABC):
    """A destination for chained records, written in order by one writer task."""

    #: Safe to log (no password).
    description: str = "sink"

    @property
    def identity(self) -> str:
        """A stable name (for the spill file of sinks that have no path)."""
        return self.description

    async def open(self) -> None:
        """Prepare the sink; may raise :class:`SinkError` (then write retries later)."""
        return None

    @abstractmethod
    async def write(self, records: Sequence[ChainedRecord]) -> None:
        """Write ``records`` in order, all or nothing as far as possible."""

    def rotation_due(self) -> bool:
        return False

    async def rotate(self) -> None:
        """Start a new file (file sinks only)."""
        return None

    async def sync(self, force: bool = False) -> None:
        """Fsync if the policy says it is time (or ``force``)."""
        return None

    @property
    def links(self) -> bool:
        """Whether a new chain may name the one before it here (:meth:`last_record`): the
        sink reads back what it holds, and no other writer is adding to it meanwhile."""
        return False

    async def last_record(self) -> ChainedRecord | None:
        """The last record this sink holds (the chain a new one continues), or None:
        none, or a sink that cannot read back. May raise :class:`SinkError`."""
        return None

    async def last_seqs(self, chains: Collection[str]) -> dict[str, int]:
        """The highest ``seq`` already stored per chain, for replays that must not repeat.

        Sinks that cannot read back return ``{}``.
        """
        return {}

    async def close(self) -> None:
        """Flush and release."""
        return None


class FileSink(Sink):
    """JSON lines appended to a file, rotated by size and age; fsync as the policy says."""

    def __init__(
        self,
        path: str | Path,
        *,
        worker: int | None = None,
        rotate_bytes: int | None = None,
        rotate_interval: float | None = None,
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,
    ) -> None:
        self.path = worker_path(Path(path), worker)
        self.description = f"file:{self.path}"
        self.rotate_bytes = rotate_bytes
        self.rotate_interval = rotate_interval
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self._fd: int | None = None
        self._size = 0
        self._opened_at = 0.0
        self._dirty = False
        self._synced_at = 0.0
        self._io = _Worker("pgcloak-audit-file")
        #: Whether no other process had the file open for writing when this sink first
        #: opened it (None: not opened yet).
        self._alone: bool | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def links(self) -> bool:
        return self._alone is True

    def _open_blocking(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size:
                # A crash may have left half a line: end it so the next record stands alone.
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
                        size += 1
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        self._opened_at = self._synced_at = time.monotonic()
        # Claim the file while this trail writes it; another writer appending to it at the
        # same time (two backfills at once) makes a chain of ours name its running chain.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claimed = True
        except OSError:
            claimed = False
        if self._alone is None:
            self._alone = claimed

    async def open(self) -> None:
        if self._fd is not None:
            return
        try:
            await self._io.run(self._open_blocking)
        except OSError as exc:
            raise SinkError(f"{self.description}: cannot open: {exc.strerror or exc}") from exc

    def _write_blocking(self, lines: list[bytes]) -> None:
        if self._fd is None:
            self._open_blocking()
        assert self._fd is not None
        before = self._size
        try:
            size = _writev_all(self._fd, lines)
            if self.fsync == "always":
                os.fsync(self._fd)
        except OSError:
            # Leave no half record behind: the records go to the spill instead.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            raise
        self._size = before + size
        self._dirty = self.fsync != "always"

    async def write(self, records: Sequence[ChainedRecord]) -> None:
        if not records:
            return
        try:
            # The lines are bytes already (chaining encodes them for their MACs), and
            # the IO thread needs the GIL only around a writev(2) per 1024 of them,
            # which releases it (a thread running Python makes the event loop wait).
            await self._io.run(self._write_blocking, list(map(_DATA, records)))
        except OSError as exc:
            raise SinkError(f"{self.description}: write failed: {exc.strerror or exc}") from exc

    def rotation_due(self) -> bool:
        if self._fd is None or self._size == 0:
            return False
        if self.rotate_bytes is not None and self._size >= self.rotate_bytes:
            return True
        return (
            self.rotate_interval is not None
            and time.monotonic() - self._opened_at >= self.rotate_interval
        )

    def _rotate_blocking(self) -> Path:
        if self._fd is not None:
            if self.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        target = rotated_name(self.path)
        os.rename(self.path, target)
        self._open_blocking()
        return target

    async def rotate(self) -> None:
        try:
            target = await self._io.run(self._rotate_blocking)
        except OSError as exc:
            raise SinkError(f"{self.description}: rotation failed: {exc.strerror or exc}") from exc
        log.info("audit file rotated", extra={"file": str(self.path), "rotated_to": str(target)})

    def _sync_blocking(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._synced_at = time.monotonic()

    async def sync(self, force: bool = False) -> None:
        if not self._dirty or (self.fsync == "never" and not force):
            return
        if force or time.monotonic() - self._synced_at >= self.fsync_interval:
            try:
                await self._io.run(self._sync_blocking)
            except OSError as exc:
                raise SinkError(f"{self.description}: fsync failed: {exc.strerror or exc}") from exc

    async def last_record(self) -> ChainedRecord | None:
        try:
            return await self._io.run(last_record_in, self.path)
        except OSError as exc:
            raise SinkError(f"{self.description}: cannot read back: {exc.strerror or exc}") from exc

    async def last_seqs(self, chains: Collection[str]) -> dict[str, int]:
        last = await self.last_record()
        if last is not None and last.chain in chains:
            return {last.chain: last.seq}
        return {}

    def _close_blocking(self) -> None:
        if self._fd is not None:
            try:
                if self.fsync != "never":
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    async def close(self) -> None:
        try:
            await self._io.run(self._close_blocking)
        except OSError as exc:
            log.warning("audit file close failed", extra={"file": str(self.path), "error": str(exc)})
        finally:
            self._io.shutdown()


class StreamSink(Sink):
    """JSON lines on stdout or stderr (for container log collectors)."""

    def __init__(self, stream: Literal["stdout", "stderr"] = "stdout", fd: int | None = None) -> None:
        self.description = stream
        self._fd = fd if fd is not None else (1 if stream == "stdout" else 2)
        self._io = _Worker(f"pgcloak-audit-{stream}")

    async def write(self, records: Sequence[ChainedRecord]) -> None:
        if not records:
            return
        try:
            await self._io.run(_write_all, self._fd, _joined(records))
        except OSError as exc:
            raise SinkError(f"{self.description}: write failed: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        self._io.shutdown()


@dataclass(frozen=True, slots=True)
class _PgTarget:
    dsn: str
    schema: str | None
    table: str
    safe: str


def redact_dsn(dsn: str) -> str:
    """The DSN without password and query string, for logs and messages."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = f"{urllib.parse.unquote(parts.username)}@" if parts.username else ""
    except ValueError:
        return "postgresql://(unparseable)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _parse_pg_target(dsn: str) -> _PgTarget:
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError as exc:
        raise ValueError(f"invalid audit sink DSN {redact_dsn(dsn)}") from exc
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    tables = [v for k, v in query if k == "table"]
    rest = [(k, v) for k, v in query if k != "table"]
    table = tables[-1] if tables else DEFAULT_TABLE
    m = _TABLE_RE.match(table)
    if m is None:
        raise ValueError(
            f"audit sink table {table!r} must be 'name' or 'schema.name' (letters, digits, _)"
        )
    clean = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    safe = f"{redact_dsn(dsn)} table {table}"
    return _PgTarget(clean, m.group(1), m.group(2), safe)


def _qualified(schema: str | None, table: str) -> str:
    return f'"{schema}"."{table}"' if schema else f'"{table}"'


def _ts(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class PostgresSink(Sink):
    """Records in a table, one COPY per batch: ``seq, chain, ts, type, event jsonb, mac``.

    The table is created if missing, with ``PRIMARY KEY (chain, seq)``, so a batch
    replayed after an uncertain failure cannot be stored twice: on a unique violation
    the records already stored are skipped and the rest written.
    """

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        create_table: bool = True,
    ) -> None:
        self._target = _parse_pg_target(dsn)
        self.description = self._target.safe
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.create_table = create_table
        self._conn: Any = None

    @property
    def table(self) -> str:
        return _qualified(self._target.schema, self._target.table)

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        conn = await asyncpg.connect(
            self._target.dsn,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings={"application_name": "pgcloak-audit"},
        )
        try:
            if self.create_table:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} ("
                    "seq bigint NOT NULL, chain text NOT NULL, ts timestamptz NOT NULL, "
                    "type text NOT NULL, event jsonb NOT NULL, mac text NOT NULL, "
                    "PRIMARY KEY (chain, seq))"
                )
        except BaseException:
            await conn.close(timeout=1)
            raise
        self._conn = conn
        return conn

    def _error(self, what: str, exc: BaseException) -> SinkError:
        # asyncpg messages name the role and the server, never the password.
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return SinkError(f"{self.description}: {what}: {text}")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def open(self) -> None:
        try:
            await self._connection()
        except Exception as exc:  # asyncpg raises more than its documented classes
            await self._drop()
            raise self._error("cannot connect", exc) from exc

    async def _copy(self, conn: Any, records: Sequence[ChainedRecord]) -> None:
        rows = [
            (r.seq, r.chain, _ts(r.ts), r.type, r.line, r.mac)
            for r in records
        ]
        await conn.copy_records_to_table(
            self._target.table,
            schema_name=self._target.schema,
            records=rows,
            columns=["seq", "chain", "ts", "type", "event", "mac"],
        )

    async def write(self, records: Sequence[ChainedRecord]) -> None:
        if not records:
            return
        try:
            conn = await self._connection()
            try:
                await self._copy(conn, records)
            except asyncpg.UniqueViolationError:
                # Some were stored by an attempt whose outcome we did not see.
                done = await self._last_seqs(conn, {r.chain for r in records})
                rest = [r for r in records if r.seq > done.get(r.chain, 0)]
                if rest:
                    await self._copy(conn, rest)
        except Exception as exc:  # asyncpg raises more than its documented classes
            await self._drop()
            raise self._error("write failed", exc) from exc

    async def _last_seqs(self, conn: Any, chains: Collection[str]) -> dict[str, int]:
        rows = await conn.fetch(
            f"SELECT chain, max(seq) AS seq FROM {self.table} "
            "WHERE chain = ANY($1::text[]) GROUP BY chain",
            list(chains),
        )
        return {row["chain"]: int(row["seq"]) for row in rows}

    async def last_seqs(self, chains: Collection[str]) -> dict[str, int]:
        try:
            conn = await self._connection()
            return await self._last_seqs(conn, chains)
        except Exception as exc:  # asyncpg raises more than its documented classes
            await self._drop()
            raise self._error("cannot read back", exc) from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=5)
            except Exception:
                conn.terminate()


def make_sink(config: Audit, worker: int | None = None) -> Sink:
    """The sink the policy's ``audit.sink`` names (``.w<id>`` in file names per worker)."""
    spec = config.sink
    if spec.startswith("file:"):
        return FileSink(
            spec[len("file:") :],
            worker=worker,
            rotate_bytes=config.rotate_bytes,
            rotate_interval=config.rotate_interval,
            fsync=config.fsync,
            fsync_interval=config.fsync_interval,
        )
    if spec.rstrip(":") in ("stdout", "stderr"):
        return StreamSink("stdout" if spec.startswith("stdout") else "stderr")
    if spec.startswith(("postgresql://", "postgres://")):
        return PostgresSink(spec)
    raise ValueError("audit sink must be 'file:<path>', 'stdout', 'stderr' or 'postgresql://...'")


# --------------------------------------------------------------------------- spill


class SpillFile:
    """A bounded JSON-lines file of chained records waiting for the sink, fsync'd per append.

    Records are read back in order from ``offset`` (kept in memory; a replay after a
    restart starts at 0 and relies on :meth:`Sink.last_seqs` to skip what was stored).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._size = 0
        self._io = _Worker("pgcloak-audit-spill")

    @property
    def size(self) -> int:
        return self._size

    @property
    def has_data(self) -> bool:
        return self._size > 0

    def _open_blocking(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    async def open(self) -> None:
        self._size = await self._io.run(self._open_blocking)

    async def last_record(self) -> ChainedRecord | None:
        """The last record waiting here (None if none); raises :class:`SpillError`."""
        if not self.has_data:
            return None
        try:
            return await self._io.run(last_record_in, self.path)
        except OSError as exc:
            raise SpillError(f"spill file {self.path}: {exc.strerror or exc}") from exc

    def _append_blocking(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            before = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                raise
            self._size = before + len(data)
        finally:
            os.close(fd)

    def _check_room(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes:
            raise SpillError(f"spill file {self.path} is full ({self._size} bytes)")

    async def append(self, records: Sequence[ChainedRecord]) -> None:
        """Append and fsync ``records``; :class:`SpillError` if full or failing."""
        data = _joined(records)
        self._check_room(data)
        try:
            await self._io.run(self._append_blocking, data)
        except OSError as exc:
            raise SpillError(f"spill file {self.path}: {exc.strerror or exc}") from exc

    def _read_blocking(self, offset: int, max_records: int) -> tuple[list[ChainedRecord], int]:
        out: list[ChainedRecord] = []
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return out, offset
        with f:
            f.seek(offset)
            while len(out) < max_records:
                raw = f.readline()
                if not raw:
                    break
                if not raw.endswith(b"\n"):
                    break  # an append in progress or cut by a crash: not ours yet
                offset += len(raw)
                if not raw.strip():
                    continue
                try:
                    out.append(ChainedRecord.from_line(raw.decode("utf-8")))
                except ValueError:
                    log.warning("unreadable line in audit spill file skipped",
                                extra={"file": str(self.path)})
        return out, offset

    async def read(self, offset: int, max_records: int) -> tuple[list[ChainedRecord], int]:
        """Up to ``max_records`` records from byte ``offset``, and the offset after them."""
        try:
            return await self._io.run(self._read_blocking, offset, max_records)
        except OSError as exc:
            raise SpillError(f"spill file {self.path}: {exc.strerror or exc}") from exc

    def _clear_blocking(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._size = 0

    async def clear(self) -> None:
        """Everything was replayed: remove the file."""
        try:
            await self._io.run(self._clear_blocking)
        except OSError as exc:
            raise SpillError(f"spill file {self.path}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        self._io.shutdown()


# --------------------------------------------------------------------------- readers


def iter_file_lines(path: Path) -> Iterator[str]:
    """Lines of an audit file (``.gz`` is decompressed); bad UTF-8 is replaced, not fatal."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as gz:
            yield from gz
        return
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        yield from f


async def read_table_lines(dsn: str, *, connect_timeout: float = 10.0) -> list[tuple[str, str]]:
    """``(chain, event json)`` of every row of a PostgreSQL sink table, by chain and seq."""
    target = _parse_pg_target(dsn)
    try:
        conn = await asyncpg.connect(target.dsn, timeout=connect_timeout)
    except Exception as exc:
        raise SinkError(f"{target.safe}: cannot connect: {str(exc).splitlines()[0]}") from exc
    try:
        rows = await conn.fetch(
            f"SELECT chain, event::text AS event FROM {_qualified(target.schema, target.table)} "
            "ORDER BY chain, seq"
        )
    except Exception as exc:
        raise SinkError(f"{target.safe}: cannot read: {str(exc).splitlines()[0]}") from exc
    finally:
        await conn.close()
    return [(row["chain"], row["event"]) for row in rows]


def describe_target(spec: str) -> str:
    """A sink spec or DSN as it may be printed."""
    return redact_dsn(spec) if spec.startswith(("postgresql://", "postgres://")) else spec

