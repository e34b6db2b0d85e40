"""The admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP/1.1.

It runs on the proxy's own event loop on purpose: a liveness probe must fail when that
loop is stuck, which a server in another thread would hide. HTTP is parsed by h11 (a
sans-IO library); every connection serves one request and is closed, with a few
seconds' deadline and h11's bound on the request head, so a slow or hostile client
costs nothing. GET and HEAD only: nothing here changes the proxy.
"""

from __future__ import annotations

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pgcloak.admin.metrics import ProxyState, make_registry, readiness
from pgcloak.httpd import TEXT, HttpServer, Reply, Request

__all__ = ["AdminServer"]


class AdminServer(HttpServer):
    """Serves the admin endpoints for one proxy process (one worker)."""

    def __init__(self, host: str, port: int, state: ProxyState, worker: int | None = None) -> None:
        super().__init__("admin", host, port, self._answer)
        self._state = state
        self._registry = make_registry(state, worker)

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for one request (no IO; tests call it too)."""
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            ready, why = readiness(self._state)
            return (200 if ready else 503), TEXT, (why + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, TEXT, b"not found: try /healthz, /readyz or /metrics\n"

    async def _answer(self, request: Request) -> Reply:
        status, ctype, body = self.route(request.method, request.path)
        return Reply(status, ctype, body, (("allow", "GET, HEAD"),) if status == 405 else ())
