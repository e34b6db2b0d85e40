"""The sidecar injector's HTTPS endpoint: Kubernetes POSTs AdmissionReviews to /mutate.

The API server only calls admission webhooks over TLS, so the certificate is required.
Decisions come from :func:`pgcloak.inject.mutate.mutate`; this module only carries
bytes. A request that is not an AdmissionReview gets 400 and a log line; the webhook's
``failurePolicy`` in the cluster decides what the API server does then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from pathlib import Path

from pgcloak.httpd import TEXT, Reply, Request, serve_connection
from pgcloak.inject.mutate import InjectorConfig, mutate

__all__ = ["InjectorServer", "tls_context"]

log = logging.getLogger("pgcloak.inject")
#: The API server's own limit on a request is 3 MiB; an AdmissionReview carries one pod.
_MAX_BODY = 4 * 1024 * 1024
_JSON = "application/json"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class InjectorServer:
    """Answers ``POST /mutate`` (and ``GET /healthz``) over HTTPS."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext, config: InjectorConfig) -> None:
        self.host = host
        self._port = port
        self._tls = tls
        self.config = config
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, ssl=self._tls, reuse_address=True, ssl_handshake_timeout=5.0
        )
        log.info("injector listening", extra={"address": f"{self.host}:{self.port}"})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(reader, writer, self._answer, max_body=_MAX_BODY, deadline=10.0)

    async def _answer(self, request: Request) -> Reply:
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
        except ValueError as exc:  # JSONDecodeError is a ValueError
            log.warning("not an AdmissionReview", extra={"error": str(exc)[:200]})
            return Reply(400, TEXT, b"expected an AdmissionReview (admission.k8s.io/v1)\n")
        response = answer["response"]
        log.info(
            "admission reviewed",
            extra={
                "uid": response["uid"],
                "allowed": response["allowed"],
                "patched": "patch" in response,
                "namespace": (review.get("request") or {}).get("namespace"),
            },
        )
        return Reply(200, _JSON, json.dumps(answer).encode())
