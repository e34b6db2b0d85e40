"""TLS on both legs and the two authentication modes, with libpq (psycopg) and asyncpg."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgcloak.demo.certs import make_tls_files
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres

BACKEND_SSL = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def connect(p, login: DbLogin, **params: str) -> psycopg.Connection:
    params.setdefault("sslmode", "disable")
    return psycopg.connect(p.dsn(login.user, login.password, login.dbname, **params), connect_timeout=10)


def test_client_tls_terminated_and_backend_tls_used(pgcloak, pg, pg_app_user):
    params = {"sslmode": "verify-full", "sslrootcert": str(pg.ca_file), "channel_binding": "disable"}
    with connect(pgcloak, pg_app_user, **params) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(BACKEND_SSL).fetchone() == (True,)
        assert conn.execute("select current_user, current_database()").fetchone() == ("app", "appdb")


def test_plaintext_client_allowed_in_allow_mode(pgcloak, pg_app_user):
    with connect(pgcloak, pg_app_user, sslmode="disable") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 41 + 1").fetchone() == (42,)


def test_client_tls_require_refuses_plaintext_with_28000(make_proxy, pg_app_user):
    with make_proxy(client_tls_mode="require") as p:
        with pytest.raises(psycopg.OperationalError) as info:
            connect(p, pg_app_user, sslmode="disable")
        assert "requires TLS" in str(info.value)
        with connect(p, pg_app_user, sslmode="require", channel_binding="disable") as conn:
            assert conn.execute("select 1").fetchone() == (1,)


async def test_client_tls_require_sqlstate_seen_by_asyncpg(make_proxy, pg_app_user):
    with make_proxy(client_tls_mode="require") as p:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(**p.kwargs(pg_app_user.user, pg_app_user.password, pg_app_user.dbname), ssl=False)
        assert info.value.sqlstate == "28000"


def test_client_tls_disabled_answers_n(make_proxy, pg_app_user):
    with make_proxy(client_tls_mode="disable", client_tls_cert=None, client_tls_key=None) as p:
        with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
            connect(p, pg_app_user, sslmode="require")
        with connect(p, pg_app_user, sslmode="prefer") as conn:
            assert not conn.pgconn.ssl_in_use


@pytest.mark.parametrize(
    ("mode", "expect_ssl"),
    [("disable", False), ("prefer", True), ("require", True), ("verify-ca", True), ("verify-full", True)],
)
def test_backend_tls_modes(make_proxy, pg_app_user, mode, expect_ssl):
    with make_proxy(backend_tls_mode=mode) as p, connect(p, pg_app_user) as conn:
        assert conn.execute(BACKEND_SSL).fetchone() == (expect_ssl,)


def test_backend_verify_full_rejects_unknown_ca(make_proxy, pg_app_user, tmp_path: Path, caplog):
    other = make_tls_files(tmp_path)
    with make_proxy(backend_tls_mode="verify-full", backend_tls_ca=str(other.ca_cert)) as p:
        with caplog.at_level(logging.INFO, logger="pgcloak.session"), pytest.raises(psycopg.OperationalError) as info:
            connect(p, pg_app_user)
        assert "pgcloak" in str(info.value)
        assert "secret" not in str(info.value)
    # The log says why, not only the exception's class name.
    failed = [r for r in caplog.records if r.getMessage() == "start-up failed"]
    assert failed and failed[0].error == "SSLCertVerificationError"
    assert "certificate" in failed[0].reason, failed[0].reason


def test_backend_verify_full_logs_a_hostname_mismatch(make_proxy, pg, pg_app_user, caplog):
    """The server's certificate is for 127.0.0.1 / ::1 / its DNS names: reached by another
    name that resolves to it, verify-full refuses it and the log names the mismatch."""
    import socket

    try:
        name = socket.gethostname()
        assert socket.gethostbyname(name)
    except (OSError, AssertionError):
        pytest.skip("no resolvable host name")
    with socket.socket() as probe:
        if probe.connect_ex((name, pg.port)) != 0:
            pytest.skip(f"PostgreSQL is not reachable as {name}")
    with make_proxy(backend=f"postgresql://{name}:{pg.port}", backend_tls_mode="verify-full") as p:
        with caplog.at_level(logging.INFO, logger="pgcloak.session"), pytest.raises(psycopg.OperationalError):
            connect(p, pg_app_user)
    failed = [r for r in caplog.records if r.getMessage() == "start-up failed"]
    assert failed and "Hostname mismatch" in failed[0].reason, [vars(r) for r in failed]


def test_backend_tls_required_but_server_has_none(pg_app_user, tmp_path: Path):
    from proxyctl import proxy

    with TemporaryPostgres(tls=False) as plain:
        login = plain.create_login("app", "app-secret", "appdb")
        with proxy(backend=f"postgresql://{plain.host}:{plain.port}", backend_tls_mode="require") as p:
            with pytest.raises(psycopg.OperationalError, match="does not accept TLS"):
                connect(p, login)
        with proxy(backend=f"postgresql://{plain.host}:{plain.port}", backend_tls_mode="prefer") as p:
            with connect(p, login) as conn:
                assert conn.execute(BACKEND_SSL).fetchone() == (False,)


# -- relay authentication ---------------------------------------------------------------


async def test_relay_wrong_password_is_postgres_28p01(pgcloak, pg_app_user):
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(**pgcloak.kwargs(pg_app_user.user, "wrong", pg_app_user.dbname), ssl=False)
    assert info.value.sqlstate == "28P01"
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "app"'):
        psycopg.connect(pgcloak.dsn(pg_app_user.user, "wrong", pg_app_user.dbname, sslmode="disable"))


def test_relay_both_legs_tls_with_channel_binding_client_is_a_clear_error(pgcloak, pg_app_user):
    """libpq over TLS, offered only SCRAM-SHA-256, sends the 'y' flag; a TLS backend
    would reject that as a downgrade. We say so instead."""
    with pytest.raises(psycopg.OperationalError) as info:
        connect(pgcloak, pg_app_user, sslmode="require")
    assert "both legs use TLS" in str(info.value)


def test_relay_client_tls_with_channel_binding_disabled_works(pgcloak, pg_app_user):
    with connect(pgcloak, pg_app_user, sslmode="require", channel_binding="disable") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(BACKEND_SSL).fetchone() == (True,)


def test_relay_client_tls_backend_plain_works(make_proxy, pg_app_user):
    with make_proxy(backend_tls_mode="disable") as p, connect(p, pg_app_user, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(BACKEND_SSL).fetchone() == (False,)


def test_relay_channel_binding_require_fails_cleanly(make_proxy, pg_app_user):
    """SCRAM-SHA-256-PLUS is never offered in relay mode."""
    with make_proxy(backend_tls_mode="disable") as p:
        with pytest.raises(psycopg.OperationalError, match="channel binding"):
            connect(p, pg_app_user, sslmode="require", channel_binding="require")


def test_session_remembers_user_database_application_name(pgcloak, pg_app_user):
    with connect(pgcloak, pg_app_user, application_name="billing-job") as conn:
        conn.execute("select 1")
        found = [
            (s.user, s.database, s.application_name)
            for s in list(pgcloak.server.sessions)
            if s.application_name == "billing-job"
        ]
        assert found == [("app", "appdb", "billing-job")]


# -- proxy-side SCRAM -------------------------------------------------------------------


def _verifier(pg: TemporaryPostgres, role: str) -> str:
    return pg.run_sql(f"select rolpassword from pg_authid where rolname = '{role}'").strip()


@pytest.fixture
def auth_file(pg, pg_app_user, tmp_path: Path) -> Path:
    path = tmp_path / "userlist.txt"
    path.write_text(f'"{pg_app_user.user}" "{_verifier(pg, pg_app_user.user)}"\n')
    return path


@pytest.mark.parametrize("backend_tls", ["disable", "verify-full"])
@pytest.mark.parametrize("client", [{"sslmode": "disable"}, {"sslmode": "require"}, {"sslmode": "verify-full"}])
def test_scram_mode_with_auth_file(make_proxy, pg, pg_app_user, auth_file, backend_tls, client):
    params = dict(client)
    if params["sslmode"] == "verify-full":
        params["sslrootcert"] = str(pg.ca_file)
    with make_proxy(auth_mode="scram", auth_file=str(auth_file), backend_tls_mode=backend_tls) as p:
        with connect(p, pg_app_user, **params) as conn:
            assert conn.execute("select current_user").fetchone() == ("app",)
            assert conn.execute(BACKEND_SSL).fetchone() == (backend_tls != "disable",)
            assert conn.pgconn.ssl_in_use == (params["sslmode"] != "disable")


def test_scram_mode_channel_binding_required_by_client(make_proxy, pg_app_user, auth_file):
    """Over client TLS pgcloak offers SCRAM-SHA-256-PLUS (tls-server-end-point)."""
    with make_proxy(auth_mode="scram", auth_file=str(auth_file), backend_tls_mode="require") as p:
        with connect(p, pg_app_user, sslmode="require", channel_binding="require") as conn:
            assert conn.execute("select 1").fetchone() == (1,)


async def test_scram_mode_wrong_password_and_unknown_user(make_proxy, pg_app_user, auth_file):
    with make_proxy(auth_mode="scram", auth_file=str(auth_file)) as p:
        for user, password in ((pg_app_user.user, "wrong"), ("nobody", "whatever")):
            with pytest.raises(asyncpg.InvalidPasswordError) as info:
                await asyncpg.connect(**p.kwargs(user, password, pg_app_user.dbname), ssl=False)
            assert info.value.sqlstate == "28P01"
            assert f'password authentication failed for user "{user}"' in str(info.value)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn(pg_app_user.user, "wrong", pg_app_user.dbname))


async def test_scram_mode_with_auth_query_and_asyncpg(make_proxy, pg, pg_app_user):
    with make_proxy(
        auth_mode="scram", auth_user=pg.superuser, auth_password=pg.password, backend_tls_mode="verify-full"
    ) as p:
        ctx = ssl.create_default_context(cafile=str(pg.ca_file))
        conn = await asyncpg.connect(**p.kwargs(pg_app_user.user, pg_app_user.password, pg_app_user.dbname), ssl=ctx)
        try:
            assert await conn.fetchval("select current_user") == "app"
            assert await conn.fetchval(BACKEND_SSL) is True
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(**p.kwargs(pg_app_user.user, "nope", pg_app_user.dbname), ssl=False)
