"""The sidecar injector's HTTPS endpoint: Kubernetes POSTs AdmissionReviews to /mutate.

The API server only calls admission webhooks over TLS, so the certificate is required.
Decisions come from :func:`pgcloak.inject.mutate.mutate`; this module only carries
bytes. A request that is not an AdmissionReview gets 400 and a log line; the webhook's
``failurePolicy`` in the cluster decides what the API server does then.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

from pgcloak.httpd import TEXT, HttpServer, Reply, Request
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


class InjectorServer(HttpServer):
    """Answers ``POST /mutate`` (and ``GET /healthz``) over HTTPS."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext, config: InjectorConfig) -> None:
        super().__init__("injector", host, port, self._answer, tls=tls, max_body=_MAX_BODY, deadline=10.0)
        self.config = config

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
