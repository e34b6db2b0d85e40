"""The sidecar injector's HTTPS endpoint: Kubernetes POSTs AdmissionReviews to /mutate.

The API server only calls admission webhooks over TLS, so the certificate is required.
Decisions come from :func:`pgcloak.inject.mutate.mutate`; this module only carries
bytes. A request that is not an AdmissionReview gets 400 and a log line, a failure of
the injector itself 500 and a log line (neither ever logs the pod); the webhook's
``failurePolicy`` in the cluster decides what the API server does then.

The certificate is renewed under the running server (cert-manager rewrites the Secret,
the kubelet the mounted files): :class:`ServingCertificate` polls the files and serves
new connections with the new pair once it loads; a pair that does not load (a half
written update, a key that does not match) is logged and the last good one serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import traceback
from pathlib import Path

from pgcloak.httpd import TEXT, HttpServer, Reply, Request
from pgcloak.inject.mutate import InjectorConfig, mutate

__all__ = ["InjectorServer", "ServingCertificate", "tls_context"]

log = logging.getLogger("pgcloak.inject")
#: The API server's own limit on a request is 3 MiB; an AdmissionReview carries one pod.
_MAX_BODY = 4 * 1024 * 1024
_JSON = "application/json"
#: How often the certificate files are looked at (seconds).
CERT_POLL = 5.0


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


_Stamp = tuple[tuple[int, int, int, int], ...] | None


class ServingCertificate:
    """The TLS certificate and key the injector serves, followed as the files change.

    :attr:`context` is what the listener is given. Its SNI callback, which OpenSSL
    calls for every handshake (with or without a server name), hands the connection
    the newest context that loaded, so a reload is atomic: a connection gets the old
    pair or the new one, never a certificate with the other's key.
    """

    def __init__(self, cert: Path, key: Path, *, poll: float = CERT_POLL) -> None:
        self.cert, self.key, self.poll = cert, key, poll
        self._stamp = self._look()
        self.context = tls_context(cert, key)  # raises: without a certificate there is no server
        self.context.sni_callback = self._choose
        self._current = self.context

    def _look(self) -> _Stamp:
        """What identifies the files' contents without reading them (None: unreadable)."""
        try:
            stats = [os.stat(path) for path in (self.cert, self.key)]
        except OSError:
            return None
        return tuple((s.st_dev, s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _choose(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._current is not ctx:
            conn.context = self._current

    def check(self) -> bool:
        """Reload when the files changed since the last look; True when a new pair serves."""
        stamp = self._look()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if stamp is None:
            log.warning("cannot read the certificate files; the loaded certificate serves on")
            return False
        try:
            fresh = tls_context(self.cert, self.key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Tried again at the next change of either file (the other half of an update).
            log.warning(
                "certificate reload failed; the loaded certificate serves on",
                extra={"error": f"{type(exc).__name__}: {exc}"[:200]},
            )
            return False
        self._current = fresh
        log.info("certificate reloaded", extra={"cert": str(self.cert)})
        return True

    async def watch(self) -> None:
        """:meth:`check` every :attr:`poll` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.poll)
            try:
                self.check()
            except Exception as exc:  # never let the watch die: the old pair still serves
                log.error("certificate check failed", extra={"error": type(exc).__name__})


class InjectorServer(HttpServer):
    """Answers ``POST /mutate`` (and ``GET /healthz``) over HTTPS."""

    def __init__(self, host: str, port: int, certificate: ServingCertificate, config: InjectorConfig) -> None:
        super().__init__(
            "injector", host, port, self._answer, tls=certificate.context, max_body=_MAX_BODY, deadline=10.0
        )
        self.certificate = certificate
        self.config = config
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._watch = asyncio.create_task(self.certificate.watch(), name="injector-certificate")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await super().close()

    async def _answer(self, request: Request) -> Reply:
        try:
            return self._route(request)
        except Exception as exc:
            # The type and the place, never the message: it could quote the pod.
            where = traceback.extract_tb(exc.__traceback__)[-1:]
            log.error(
                "injector failed",
                extra={
                    "error": type(exc).__name__,
                    "at": f"{Path(where[0].filename).name}:{where[0].lineno}" if where else "?",
                },
            )
            return Reply(500, TEXT, b"the injector failed on this request; see its log\n")

    def _route(self, request: Request) -> Reply:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            return Reply(200, TEXT, b"ok\n")
        if request.path != "/mutate":
            return Reply(404, TEXT, b"not found: the webhook path is /mutate\n")
        if request.method != "POST":
            return Reply(405, TEXT, b"method not allowed\n", (("allow", "POST"),))
        try:
            review = json.loads(request.body)
            if not isinstance(review, dict):
                raise ValueError("not a JSON object")
            answer = mutate(review, self.config)
        except RecursionError:  # json.loads of something nested too deeply
            log.warning("not an AdmissionReview", extra={"error": "nested too deeply"})
            return Reply(400, TEXT, b"expected an AdmissionReview (admission.k8s.io/v1)\n")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            log.warning("not an AdmissionReview", extra={"error": str(exc)[:200]})
            return Reply(400, TEXT, b"expected an AdmissionReview (admission.k8s.io/v1)\n")
        response = answer["response"]
        namespace = review["request"].get("namespace")
        log.info(
            "admission reviewed",
            extra={
                "uid": response["uid"][:128],
                "allowed": response["allowed"],
                "patched": "patch" in response,
                "namespace": namespace[:253] if isinstance(namespace, str) else None,
            },
        )
        return Reply(200, _JSON, json.dumps(answer).encode())
