"""Proxy fixtures: pgcloak in front of the session's PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from pgcloak.demo.postgres import TemporaryPostgres
from proxyctl import ThreadedProxy, make_settings, proxy


def proxy_settings(pg: TemporaryPostgres, **overrides: Any) -> dict[str, Any]:
    """Defaults for a proxy in front of ``pg``: client TLS offered, backend TLS preferred."""
    tls = pg.tls_files
    base: dict[str, Any] = {
        "backend": f"postgresql://{pg.host}:{pg.port}",
        "client_tls_cert": str(tls.server_cert),
        "client_tls_key": str(tls.server_key),
        "backend_tls_ca": str(tls.ca_cert),
        "drain_timeout": 0,
    }
    base.update(overrides)
    return base


@pytest.fixture(scope="session")
def pgcloak(pg: TemporaryPostgres) -> Iterator[ThreadedProxy]:
    """A shared in-process proxy (relay auth, TLS offered on both legs)."""
    with ThreadedProxy(make_settings(**proxy_settings(pg))) as p:
        yield p


@pytest.fixture
def make_proxy(pg: TemporaryPostgres) -> Callable[..., AbstractContextManager[ThreadedProxy]]:
    """A factory for a proxy with other settings: ``with make_proxy(auth_mode="scram") as p``."""

    def factory(**overrides: Any) -> AbstractContextManager[ThreadedProxy]:
        return proxy(**proxy_settings(pg, **overrides))

    return factory
