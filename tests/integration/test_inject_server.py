"""`pgcloak inject serve`: the webhook over HTTPS, as the Kubernetes API server calls it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgcloak.demo.certs import TlsFiles, make_tls_files
from proxyctl import free_port

REVIEW = {
    "apiVersion": "admission.k8s.io/v1",
    "kind": "AdmissionReview",
    "request": {
        "uid": "b9f4f0a2-1f1e-4c57-9d1b-0c0ffee00001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "operation": "CREATE",
        "namespace": "shop",
        "object": {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "api",
                "annotations": {
                    "pgcloak.dev/inject": "true",
                    "pgcloak.dev/backend": "postgresql://db.shop.svc:5432",
                    "pgcloak.dev/policy-configmap": "pgcloak-policy",
                    "pgcloak.dev/master-key-secret": "pgcloak-key",
                },
            },
            "spec": {"containers": [{"name": "app", "image": "shop/api:1"}]},
        },
    },
}


class Injector:
    def __init__(self, port: int, tls: TlsFiles, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
        self.port, self.tls, self.proc, self.log = port, tls, proc, log
        self.context = ssl.create_default_context(cafile=str(tls.ca_cert))

    def request(self, path: str, body: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"https://localhost:{self.port}{path}",
            data=body,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@contextlib.contextmanager
def _serving(base: Path, tls: TlsFiles, env: dict[str, str] | None = None) -> Iterator[Injector]:
    """`pgcloak inject serve` on a free port with ``tls``'s server certificate."""
    port = free_port()
    log = base / "inject.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "pgcloak.cli", "inject", "serve",
                "--listen", f"127.0.0.1:{port}",
                "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
                "--image", "registry.example/pgcloak:1.0",
            ],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield Injector(port, tls, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Injector]:
    base = tmp_path_factory.mktemp("inject")
    with _serving(base, make_tls_files(base / "tls")) as running:
        yield running


def test_a_review_gets_the_sidecar_patch(injector: Injector) -> None:
    status, body = injector.request("/mutate", json.dumps(REVIEW).encode())
    assert status == 200, body
    answer = json.loads(body)
    response = answer["response"]
    assert (answer["kind"], response["uid"], response["allowed"]) == (
        "AdmissionReview", REVIEW["request"]["uid"], True,  # type: ignore[index]
    )  # fmt: skip
    patch = json.loads(base64.b64decode(response["patch"]))
    sidecar = patch[0]["value"][0]
    assert patch[0]["path"] == "/spec/initContainers"
    assert (sidecar["name"], sidecar["image"]) == ("pgcloak", "registry.example/pgcloak:1.0")
    # The log says what was decided, never the pod's contents.
    log = injector.log.read_text()
    assert REVIEW["request"]["uid"] in log and "db.shop.svc" not in log  # type: ignore[index]


def test_a_refusal_is_an_answer_not_an_error(injector: Injector) -> None:
    review = json.loads(json.dumps(REVIEW))
    del review["request"]["object"]["metadata"]["annotations"]["pgcloak.dev/master-key-secret"]
    status, body = injector.request("/mutate", json.dumps(review).encode())
    response = json.loads(body)["response"]
    assert status == 200 and response["allowed"] is False
    assert "pgcloak.dev/master-key-secret is required" in response["status"]["message"]


def test_bad_requests(injector: Injector) -> None:
    assert injector.request("/mutate", b"{not json")[0] == 400
    assert injector.request("/mutate", b"[1, 2]")[0] == 400
    assert injector.request("/mutate", b'{"kind": "AdmissionReview"}')[0] == 400
    assert injector.request("/mutate")[0] == 405  # GET
    assert injector.request("/elsewhere", b"{}")[0] == 404
    assert injector.request("/healthz") == (200, b"ok\n")
    # A body over the limit is refused before it is read.
    big = b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    try:
        status, _ = injector.request("/mutate", big)
    except (ConnectionError, urllib.error.URLError):
        status = 413  # the server may close while the client still sends
    assert status == 413
    # Plain HTTP on the TLS port gets nothing, and the server serves on.
    with socket.create_connection(("127.0.0.1", injector.port), 5) as s:
        s.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        with contextlib.suppress(TimeoutError, ConnectionError):
            assert b"HTTP/1.1 200" not in s.recv(100)
    assert injector.request("/mutate", json.dumps(REVIEW).encode())[0] == 200


def test_dry_run_from_a_file(tmp_path: Path) -> None:
    """`pgcloak inject mutate FILE`: the webhook's answer without a cluster."""
    review = tmp_path / "review.json"
    review.write_text(json.dumps(REVIEW))
    cmd = [sys.executable, "-m", "pgcloak.cli", "inject", "mutate", str(review), "--image", "pgcloak:dev"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    patch = json.loads(base64.b64decode(json.loads(done.stdout)["response"]["patch"]))
    assert patch[0]["value"][0]["image"] == "pgcloak:dev"
    done = subprocess.run([*cmd[:-2]], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "image" in done.stderr  # the image is required


def _handshake(port: int, cafile: Path) -> bool:
    """Whether a client trusting only ``cafile`` completes a TLS handshake with the injector."""
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as raw, context.wrap_socket(raw, server_hostname="localhost"):
            return True
    except ssl.SSLCertVerificationError:
        return False


def _until(condition: Callable[[], bool], what: str, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}\n{log.read_text()}"
        time.sleep(0.05)


def test_a_renewed_certificate_serves_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews the certificate under the running injector: new connections get
    the new pair once both files are in place; a half-replaced pair (a certificate with
    the old key) does not load, and the old certificate serves on meanwhile."""
    old = make_tls_files(tmp_path / "old")
    new = make_tls_files(tmp_path / "new")  # a different CA: only the new pair passes with it
    with _serving(tmp_path, old, {"PGCLOAK_INJECT_CERT_POLL_SECONDS": "0.1"}) as injector:
        assert _handshake(injector.port, old.ca_cert) and not _handshake(injector.port, new.ca_cert)
        # The certificate first (what a non-atomic update looks like half way).
        os.replace(new.server_cert, old.server_cert)
        _until(lambda: "certificate reload failed" in injector.log.read_text(), "no failed reload logged", injector.log)
        assert _handshake(injector.port, old.ca_cert) and not _handshake(injector.port, new.ca_cert)
        assert injector.request("/mutate", json.dumps(REVIEW).encode())[0] == 200
        # Then the key: the pair loads and serves the next connection.
        os.replace(new.server_key, old.server_key)
        _until(lambda: _handshake(injector.port, new.ca_cert), "the new certificate is not served", injector.log)
        assert not _handshake(injector.port, old.ca_cert)
        injector.context = ssl.create_default_context(cafile=str(new.ca_cert))
        assert injector.request("/mutate", json.dumps(REVIEW).encode())[0] == 200
        assert "certificate reloaded" in injector.log.read_text()


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    "body",
    [
        _nested(100_000),  # json.loads: RecursionError
        b'{"apiVersion": ' + _nested(100_000) + b', "request": {"uid": "1"}}',
        b'{"request": {"uid": "1", "operation": "CREATE", "object": {"metadata": {"annotations": ["a"]}}}}',
        b'{"request": {"uid": "1", "operation": "CREATE", "object": {"metadata": {"annotations": "a: b"}}}}',
        b'{"request": {"uid": "1", "operation": "CREATE", "object": {"metadata": '
        b'{"labels": {"pgcloak.dev/inject": "true"}}, "spec": []}}}',
        b'{"request": {"uid": "1", "operation": "CREATE", "object": {"metadata": '
        b'{"labels": {"pgcloak.dev/inject": "true"}}, "spec": {"containers": {}}}}}',
    ],
)
def test_malformed_reviews_are_answered_400(injector: Injector, body: bytes) -> None:
    """An answer, not a dropped connection; and the server serves on."""
    assert injector.request("/mutate", body) == (400, b"expected an AdmissionReview (admission.k8s.io/v1)\n")
    assert injector.request("/mutate", json.dumps(REVIEW).encode())[0] == 200


async def test_an_unexpected_failure_is_a_500_without_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the injector is answered (500, plain text) and logged by type and place,
    never by its message, which could quote the pod."""
    import pgcloak.inject.server as module
    from pgcloak.inject.mutate import InjectorConfig

    def broken(review: dict[str, Any], config: InjectorConfig) -> dict[str, Any]:
        raise KeyError(review["request"]["object"]["metadata"]["annotations"]["pgcloak.dev/backend"])

    monkeypatch.setattr(module, "mutate", broken)
    tls = make_tls_files(tmp_path / "tls")
    server = module.InjectorServer(
        "127.0.0.1", 0, module.ServingCertificate(tls.server_cert, tls.server_key), InjectorConfig(image="x")
    )
    await server.start()
    try:
        injector = Injector(server.port, tls, None, tmp_path / "unused.log")
        with caplog.at_level(logging.INFO, logger="pgcloak.inject"):
            status, body = await asyncio.to_thread(injector.request, "/mutate", json.dumps(REVIEW).encode())
    finally:
        await server.close()
    assert status == 500 and body == b"the injector failed on this request; see its log\n"
    failed = [r for r in caplog.records if r.getMessage() == "injector failed"]
    assert len(failed) == 1 and failed[0].__dict__["error"] == "KeyError"
    assert "db.shop.svc" not in caplog.text and all("db.shop.svc" not in str(r.__dict__) for r in caplog.records)
