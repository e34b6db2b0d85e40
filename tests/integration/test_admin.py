"""The admin endpoints of `pgcloak run --admin-listen HOST:PORT`: /healthz, /readyz, /metrics.

Everything runs the real CLI as a child process (:class:`SubprocessProxy`) with real
clients (psycopg 3) through the proxy, and reads the admin port with plain HTTP
(``urllib.request``, raw sockets for what urllib will not send). Metrics are parsed
with prometheus-client's own parser, and every check is on a change the test caused:

* counters and gauges move by exactly what the test's traffic should move them by
  (connections, bytes, audit events, refusals by SQLSTATE, policy reloads), and the
  policy fingerprint is the one ``pgcloak policy validate`` prints; the byte counters
  are also checked against a counting TCP relay between the client and the proxy;
* the HTTP side: 404, 405, 400 for garbage and for an oversized head, silent clients
  that hold nobody up (and are cut off in the end), a proxy that serves on afterwards;
* /readyz says 503 (and why) while draining after SIGTERM and while the audit trail
  cannot be written under ``on_audit_failure: refuse``; /healthz stays 200;
* ``--workers 2``: worker i on PORT+i; without ``--admin-listen`` nothing listens; an
  admin port that is taken fails the start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import pytest
from encryption_fixtures import EncEnv, encryption_env, policy_yaml, unique
from prometheus_client.parser import text_string_to_metric_families

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from pgcloak.policy import load_policy
from proxyctl import SubprocessProxy, dsn, free_port

WAIT = 10.0
T = TypeVar("T")
#: No HTTP proxy from the environment between the test and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    body: str
    content_type: str


def http(port: int, path: str, method: str = "GET") -> Reply:
    """One request to the admin port (urllib; an HTTP error status is a Reply too)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with OPENER.open(request, timeout=WAIT) as resp:
            return Reply(resp.status, resp.read().decode(), resp.headers.get("content-type", ""))
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.read().decode(), err.headers.get("content-type", ""))


class Metrics:
    """One /metrics scrape: sample name and labels -> value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def __call__(self, name: str, **labels: str) -> float:
        """The value of a sample that must be there."""
        value = self.get(name, **labels)
        assert value is not None, f"no sample {name}{labels} in:\n{self.text}"
        return value

    def count(self, name: str, **labels: str) -> float:
        """A labelled counter's value, 0 while it has no sample yet (nothing counted)."""
        value = self.get(name, **labels)
        return 0.0 if value is None else value

    def labels(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]


def scrape(port: int) -> Metrics:
    reply = http(port, "/metrics")
    assert reply.status == 200, reply
    assert reply.content_type.startswith("text/plain"), reply.content_type
    return Metrics(reply.body)


def wait_for(
    probe: Callable[[], T], ok: Callable[[T], bool], what: str, timeout: float = WAIT
) -> T:
    """``probe()`` until ``ok`` says yes; its last value in the failure message otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(0.02)


def wait_metrics(port: int, ok: Callable[[Metrics], bool], what: str) -> Metrics:
    return wait_for(lambda: scrape(port), ok, what)


def admin_up(port: int) -> Reply:
    """/healthz once the admin listener is up (it starts right after the proxy's own)."""

    def probe() -> Reply | None:
        try:
            return http(port, "/healthz")
        except (urllib.error.URLError, ConnectionError):
            return None

    reply = wait_for(probe, lambda r: r is not None, f"the admin listener on port {port}")
    assert reply is not None
    return reply


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a plain socket and read until the server closes; b"" if the
    server reset the connection before anything could be read."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def still_open(sock: socket.socket) -> bool:
    """True while the peer has neither closed ``sock`` nor sent anything on it."""
    sock.setblocking(False)
    try:
        sock.recv(1)  # b"" (closed) or a byte of a reply: either way not silent and open
    except BlockingIOError:
        return True
    except ConnectionError:
        pass
    finally:
        sock.setblocking(True)
    return False


class CountingRelay:
    """A TCP forwarder between one client and the proxy counting the bytes each way:
    what the client really sent and received (not a mock: every byte goes through)."""

    def __init__(self, target_port: int) -> None:
        self.sent_by_client = 0
        self.received_by_client = 0
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._spawn(self._serve)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self._target))
        self._spawn(self._pump, client, upstream, True)
        self._spawn(self._pump, upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if up:
                    self.sent_by_client += len(data)
                else:
                    self.received_by_client += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def counts(self) -> tuple[int, int]:
        return self.sent_by_client, self.received_by_client

    def close(self) -> None:
        self._listener.close()
        for thread in self._threads[1:]:
            thread.join(WAIT)


def admin_port_pair() -> int:
    """A free port whose successor is free too (``--workers 2``: PORT and PORT+1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def validate_fingerprint(path: Path) -> str:
    """The 12 hex digits ``pgcloak policy validate FILE`` prints."""
    done = subprocess.run(
        [sys.executable, "-m", "pgcloak.cli", "policy", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    m = re.search(r"fingerprint ([0-9a-f]{12})\)", done.stdout)
    assert m is not None, done.stdout
    return m.group(1)


def audit_section(**overrides: Any) -> str:
    audit: dict[str, Any] = {
        "sink": "file:trail/audit.jsonl",
        "statements": "pii",
        "seal_interval": 3600,
        "fsync": "never",
        "on_audit_failure": "refuse",
    }
    audit.update(overrides)
    return "audit:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in audit.items())


def write_atomically(path: Path, text: str) -> None:
    """Replace a policy file as editors and ConfigMaps do (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(
    pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EncEnv]:
    """A database with the encryption test tables, and a master key."""
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("admin"), "admin") as e:
        yield e


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., SubprocessProxy]]:
    """Start `pgcloak run` children; whatever still runs at the end is stopped."""
    started: list[SubprocessProxy] = []

    def factory(args: list[str], env: dict[str, str] | None = None) -> SubprocessProxy:
        p = SubprocessProxy(args, tmp_path / f"pgcloak-{len(started)}.log", env)
        # Only what the test gives: no PGCLOAK_* or PG* from the caller's shell.
        p.env = {k: v for k, v in p.env.items() if not k.startswith("PG")} | (env or {})
        started.append(p)
        return p.start()

    yield factory
    for p in started:
        p.stop()


def backend_args(pg: TemporaryPostgres) -> list[str]:
    return ["--backend", f"postgresql://{pg.host}:{pg.port}", "--backend-tls-mode", "disable"]


def admin_args(port: int) -> list[str]:
    return ["--admin-listen", f"127.0.0.1:{port}"]


def connect(
    p: SubprocessProxy, login: DbLogin, app: str = "pgcloak-admin"
) -> psycopg.Connection[Any]:
    dsn = p.dsn(login.user, login.password, login.dbname, application_name=app)
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def spawn_protected(
    spawn: Callable[..., SubprocessProxy], env: EncEnv, policy: Path, *extra: str
) -> SubprocessProxy:
    return spawn(
        [*backend_args(env.pg), "--policy", str(policy), "--drain-timeout", "0", *extra],
        {"PGCLOAK_MASTER_KEY": env.key_text},
    )


# --------------------------------------------------------------------------- tests


def test_metrics_follow_real_traffic_audit_and_policy_reloads(
    spawn: Callable[..., SubprocessProxy], env: EncEnv, tmp_path: Path
) -> None:
    """A protected proxy with a file audit sink: probes answer, and every number on
    /metrics moves by what a psycopg session, PII statements, a refused statement and
    two policy edits (one invalid, one valid) should move it by."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml() + audit_section(), encoding="utf-8")
    admin = free_port()
    p = spawn_protected(spawn, env, policy, *admin_args(admin), "--policy-poll-interval", "0.05")

    health = admin_up(admin)
    assert (health.status, health.body) == (200, "ok\n")
    assert health.content_type.startswith("text/plain")
    ready = http(admin, "/readyz")
    assert (ready.status, ready.body) == (200, "ready\n")

    # SubprocessProxy.start() probed the proxy's port: that connection goes away first.
    m0 = wait_metrics(
        admin, lambda m: m("pgcloak_client_connections_open") == 0, "no open connection"
    )
    assert m0.types["pgcloak_client_connections_open"] == "gauge"
    assert m0.types["pgcloak_client_connections_accepted"] == "counter"
    assert m0.types["pgcloak_refusals"] == "counter"
    fingerprint = validate_fingerprint(policy)
    assert fingerprint == load_policy(policy).fingerprint[:12]
    assert m0.labels("pgcloak_policy_info") == [{"fingerprint": fingerprint}]
    assert m0("pgcloak_policy_info", fingerprint=fingerprint) == 1
    assert m0.labels("pgcloak_policy_reloads_total") == []  # no edit yet
    assert m0("pgcloak_audit_healthy") == 1
    assert m0("pgcloak_audit_spill_bytes") == 0
    assert m0("pgcloak_audit_queue_depth") >= 0
    assert m0("pgcloak_audit_sink_errors_total") == 0
    assert m0.get("pgcloak_worker") is None  # one process, no worker id
    assert m0.labels("pgcloak_refusals_total") == []

    with connect(p, env.login, "admin-metrics") as conn:
        m1 = scrape(admin)
        assert m1("pgcloak_client_connections_open") == 1
        assert (
            m1("pgcloak_client_connections_accepted_total")
            == m0("pgcloak_client_connections_accepted_total") + 1
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)  # touches no PII: no event

        # PII statements: one audit event each, and the trail gets written.
        m2 = scrape(admin)
        for _ in range(3):
            conn.execute(
                "INSERT INTO users (email, ssn) VALUES (%s, %s)", (unique("admin"), "123-45-6789")
            )
        events = m2("pgcloak_audit_events_total") + 3
        m3 = wait_metrics(
            admin, lambda m: m("pgcloak_audit_events_total") >= events, "three audit events"
        )
        assert m3("pgcloak_audit_events_total") == events
        written = m2("pgcloak_audit_records_written_total") + 3
        wait_metrics(
            admin,
            lambda m: m("pgcloak_audit_records_written_total") >= written,
            "three more audit records written",
        )

        # A statement pgcloak refuses (LIKE on an encrypted column): counted by SQLSTATE.
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("SELECT * FROM users WHERE email LIKE 'a%'")
        assert info.value.sqlstate == "0A000"
        m4 = scrape(admin)
        assert m4.count("pgcloak_refusals_total", sqlstate="0A000") == 1
        assert m4.labels("pgcloak_refusals_total") == [{"sqlstate": "0A000"}]

        # Bytes both ways, while the session is open.
        big_in = "x" * 50_000
        assert conn.execute("SELECT length(%s)", (big_in,)).fetchone() == (50_000,)
        m5 = scrape(admin)
        received = m5("pgcloak_client_bytes_received_total") - m4(
            "pgcloak_client_bytes_received_total"
        )
        assert 50_000 <= received < 51_000, received
        sent = m5("pgcloak_client_bytes_sent_total") - m4("pgcloak_client_bytes_sent_total")
        assert 0 < sent < 1_000, sent  # the reply to that one statement
        row = conn.execute("SELECT repeat('y', 60000)").fetchone()
        assert row is not None and len(row[0]) == 60_000
        m6 = scrape(admin)
        sent = m6("pgcloak_client_bytes_sent_total") - m5("pgcloak_client_bytes_sent_total")
        assert 60_000 <= sent < 61_000, sent
        assert m6("pgcloak_client_connections_open") == 1

    # The session is gone: the gauge drops, the counters keep what it moved.
    m7 = wait_metrics(
        admin, lambda m: m("pgcloak_client_connections_open") == 0, "the session to close"
    )
    assert m7("pgcloak_client_connections_accepted_total") == m1(
        "pgcloak_client_connections_accepted_total"
    )
    assert m7("pgcloak_client_bytes_received_total") >= m6("pgcloak_client_bytes_received_total")
    assert m7("pgcloak_client_bytes_sent_total") >= m6("pgcloak_client_bytes_sent_total")
    assert m7.count("pgcloak_refusals_total", sqlstate="0A000") == 1

    # An invalid edit is refused (the old policy keeps serving) ...
    write_atomically(policy, "version: 1\ntables:\n  public.users:\n    email: {encrypt: maybe}\n")
    m8 = wait_metrics(
        admin,
        lambda m: m.count("pgcloak_policy_reloads_total", result="refused") >= 1,
        "the invalid edit to be refused",
    )
    assert m8.count("pgcloak_policy_reloads_total", result="refused") == 1
    assert m8.count("pgcloak_policy_reloads_total", result="applied") == 0
    assert m8.labels("pgcloak_policy_info") == [{"fingerprint": fingerprint}]
    assert http(admin, "/readyz").status == 200
    # ... a valid one is applied, and the fingerprint follows it.
    write_atomically(policy, policy_yaml(phone=False) + audit_section())
    edited = validate_fingerprint(policy)
    assert edited != fingerprint and edited == load_policy(policy).fingerprint[:12]
    m9 = wait_metrics(
        admin,
        lambda m: m.count("pgcloak_policy_reloads_total", result="applied") >= 1,
        "the valid edit to be applied",
    )
    assert m9.count("pgcloak_policy_reloads_total", result="applied") == 1
    assert m9.count("pgcloak_policy_reloads_total", result="refused") == 1
    assert m9.labels("pgcloak_policy_info") == [{"fingerprint": edited}]
    with connect(p, env.login) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert http(admin, "/healthz").status == 200


def test_byte_counters_count_what_the_client_sent_and_received(
    spawn: Callable[..., SubprocessProxy], env: EncEnv, tmp_path: Path
) -> None:
    """Through a counting TCP relay: once the session is up, the byte counters move by
    exactly the bytes the client sent and received, also where pgcloak rewrites the
    traffic (values encrypted on the way in, decrypted on the way out, a refusal)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(), encoding="utf-8")
    admin = free_port()
    p = spawn_protected(spawn, env, policy, *admin_args(admin))
    admin_up(admin)
    relay = CountingRelay(p.port)
    login = env.login
    url = dsn("127.0.0.1", relay.port, login.user, login.password, login.dbname, sslmode="disable")
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            before, (up0, down0) = scrape(admin), relay.counts()
            emails = [unique("bytes") for _ in range(20)]
            for email in emails:
                conn.execute(
                    "INSERT INTO users (email, ssn) VALUES (%s, %s)", (email, "123-45-6789")
                )
            read = {r[0] for r in conn.execute("SELECT email, ssn FROM users").fetchall()}
            assert set(emails) <= read  # decrypted on the way to the client
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                conn.execute("SELECT * FROM users WHERE email LIKE 'a%'")
            after, (up1, down1) = scrape(admin), relay.counts()
    finally:
        relay.close()
    received = after("pgcloak_client_bytes_received_total") - before(
        "pgcloak_client_bytes_received_total"
    )
    assert received == up1 - up0, (received, up1 - up0)
    sent = after("pgcloak_client_bytes_sent_total") - before("pgcloak_client_bytes_sent_total")
    assert sent == down1 - down0, (
        f"pgcloak_client_bytes_sent_total moved by {sent}; the client received {down1 - down0}"
    )


def test_bad_requests_get_errors_and_the_proxy_serves_on(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    """Unknown paths, other methods, garbage and a client that says nothing: each gets
    its error (or is cut off) and nobody else is held up."""
    admin = free_port()
    p = spawn([*backend_args(pg), *admin_args(admin)])
    admin_up(admin)
    # Two clients that hold a connection and say nothing more: one sends nothing at
    # all, the other half a request head. Others are answered meanwhile.
    silent = socket.create_connection(("127.0.0.1", admin), timeout=WAIT)
    halfway = socket.create_connection(("127.0.0.1", admin), timeout=WAIT)
    try:
        halfway.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        assert http(admin, "/healthz").body == "ok\n"
        assert still_open(silent) and still_open(halfway)

        for path in ("/", "/nope", "/healthz/x", "/metric"):
            reply = http(admin, path)
            assert reply.status == 404, (path, reply)
            assert "/healthz" in reply.body
        for method in ("POST", "PUT", "DELETE"):
            for path in ("/healthz", "/metrics", "/nope"):
                reply = http(admin, path, method)
                assert (reply.status, reply.body) == (405, "method not allowed\n"), (method, path)
        head = http(admin, "/healthz", "HEAD")
        assert (head.status, head.body) == (200, "")
        assert http(admin, "/healthz?verbose=1").body == "ok\n"

        garbage = raw_exchange(
            admin, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"
        )
        assert garbage.startswith(b"HTTP/1.1 400 "), garbage
        request_line = raw_exchange(admin, b"GET /healthz HTTP/1.1 extra\r\nhost: x\r\n\r\n")
        assert request_line.startswith(b"HTTP/1.1 400 "), request_line
        # A well-formed request on a raw socket: the same answer urllib gets.
        plain = raw_exchange(admin, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 200 ") and plain.endswith(b"\r\n\r\nok\n"), plain

        # The proxy itself is fine, and so is the admin listener.
        assert p.proc is not None and p.proc.poll() is None
        with connect(p, pg_app_user) as conn:
            assert conn.execute("SELECT 'served'").fetchone() == ("served",)
            assert scrape(admin)("pgcloak_client_connections_open") >= 1
        assert http(admin, "/healthz").body == "ok\n"
        assert http(admin, "/readyz").status == 200

        # The two are cut off in the end (the server's deadline), with no reply.
        for sock in (silent, halfway):
            sock.settimeout(30)
            assert sock.recv(1024) == b""
    finally:
        silent.close()
        halfway.close()
    assert http(admin, "/healthz").status == 200


@pytest.mark.parametrize("header", [17_000, 64_000], ids=["17KB", "64KB"])
def test_an_oversized_request_head_is_refused(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, header: int
) -> None:
    """A request head over the 16 KiB bound gets 400 or a closed connection, never an
    answer, whatever the size; the listener serves on."""
    admin = free_port()
    spawn([*backend_args(pg), *admin_args(admin)])
    admin_up(admin)
    huge = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * header + b"\r\n\r\n"
    assert len(huge) > 16 * 1024
    oversized = raw_exchange(admin, huge)
    assert oversized == b"" or oversized.startswith(b"HTTP/1.1 400 "), oversized[:200]
    assert http(admin, "/healthz").body == "ok\n"


def test_readyz_is_503_while_draining(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    """SIGTERM with a session open: /readyz says 503 (and why) while the session drains,
    /healthz and /metrics go on answering; the session leaves and the process exits 0."""
    admin = free_port()
    p = spawn([*backend_args(pg), *admin_args(admin), "--drain-timeout", "20"])
    admin_up(admin)
    assert http(admin, "/readyz").status == 200
    conn = connect(p, pg_app_user, "admin-drain")
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        p.signal(signal.SIGTERM)
        draining = wait_for(
            lambda: http(admin, "/readyz"), lambda r: r.status == 503, "/readyz 503"
        )
        assert draining.body == "not accepting connections (starting or shutting down)\n"
        assert http(admin, "/healthz").status == 200
        assert scrape(admin)("pgcloak_client_connections_open") == 1
        # Still served, still draining.
        assert conn.execute("SELECT 'still served'").fetchone() == ("still served",)
        assert p.proc is not None and p.proc.poll() is None
        assert http(admin, "/readyz").status == 503
    finally:
        conn.close()
    assert p.wait(WAIT) == 0, p.log()
    assert refused(admin)


def test_readyz_is_503_while_the_audit_trail_cannot_be_written(
    spawn: Callable[..., SubprocessProxy], env: EncEnv, tmp_path: Path
) -> None:
    """A PostgreSQL audit sink nobody listens for, with ``on_audit_failure: refuse``:
    /readyz 503 naming the audit trail, the audit gauges and error counter say so, a PII
    statement is refused with 58000 (and counted); once the policy says ``allow``,
    /readyz is 200 although the sink is still down."""
    dead = free_port()  # nothing listens there
    sink = f"postgresql://nobody@127.0.0.1:{dead}/x?table=pgcloak_audit"
    section = {"sink": sink, "spill_dir": str(tmp_path / "spill")}
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml() + audit_section(**section), encoding="utf-8")
    admin = free_port()
    p = spawn_protected(spawn, env, policy, *admin_args(admin), "--policy-poll-interval", "0.05")

    assert admin_up(admin).body == "ok\n"
    ready = wait_for(lambda: http(admin, "/readyz"), lambda r: r.status == 503, "/readyz 503")
    assert "audit trail cannot be written" in ready.body, ready
    m0 = scrape(admin)
    assert m0("pgcloak_audit_healthy") == 0
    assert m0("pgcloak_audit_sink_errors_total") >= 1
    assert m0.labels("pgcloak_refusals_total") == []
    assert http(admin, "/healthz").status == 200

    with connect(p, env.login, "admin-audit-down") as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("INSERT INTO users (email) VALUES (%s)", (unique("down"),))
        assert info.value.sqlstate == "58000"
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)  # no PII: runs
        m1 = scrape(admin)
        assert m1.count("pgcloak_refusals_total", sqlstate="58000") == 1
        assert m1.labels("pgcloak_refusals_total") == [{"sqlstate": "58000"}]
        assert http(admin, "/readyz").status == 503

        # The same sink, but the policy now lets statements run without the trail.
        write_atomically(policy, policy_yaml() + audit_section(**section, on_audit_failure="allow"))
        wait_metrics(
            admin,
            lambda m: m.count("pgcloak_policy_reloads_total", result="applied") == 1,
            "the edit to be applied",
        )
        ready = http(admin, "/readyz")
        assert (ready.status, ready.body) == (200, "ready\n")
        conn.execute("INSERT INTO users (email) VALUES (%s)", (unique("down"),))
        # The reload is counted before its new trail opens the sink (the old trail is
        # closed first, its seal spilled): the new one finds the sink down a moment later.
        m2 = wait_metrics(
            admin, lambda m: m("pgcloak_audit_healthy") == 0, "the reloaded trail to find its sink down"
        )
        assert m2.count("pgcloak_refusals_total", sqlstate="58000") == 1


def test_each_worker_serves_admin_on_its_own_port(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    """``--workers 2 --admin-listen 127.0.0.1:PORT``: worker 0 on PORT, worker 1 on PORT+1."""
    admin = admin_port_pair()
    p = spawn([*backend_args(pg), *admin_args(admin), "--workers", "2"])
    for worker in (0, 1):
        port = admin + worker
        assert admin_up(port).body == "ok\n"
        assert http(port, "/readyz").status == 200
        m = scrape(port)
        assert m.types["pgcloak_worker"] == "gauge"
        assert m("pgcloak_worker") == worker
    with connect(p, pg_app_user) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    p.signal(signal.SIGTERM)
    assert p.wait(WAIT) == 0, p.log()
    assert refused(admin) and refused(admin + 1)


def test_without_admin_listen_nothing_listens(
    spawn: Callable[..., SubprocessProxy], pg: TemporaryPostgres, pg_app_user: DbLogin
) -> None:
    admin = free_port()
    p = spawn(backend_args(pg))
    with connect(p, pg_app_user) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert refused(admin)
    assert "admin listening" not in p.log()


def test_admin_port_in_use_fails_the_start(pg: TemporaryPostgres) -> None:
    """An admin port someone else holds: `pgcloak run` exits 1 and says why (rather
    than serving without its probes)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pgcloak.cli",
                "run",
                "--listen",
                f"127.0.0.1:{free_port()}",
                *backend_args(pg),
                *admin_args(port),
            ],
            env=environ,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "address already in use" in (done.stdout + done.stderr).lower(), (
        done.stdout + done.stderr
    )
