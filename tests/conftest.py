"""Shared fixtures.

Importing this module must not start anything: unit tests run without a server, so
the PostgreSQL fixtures are session-scoped and only start on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres

# Shared CI runners have 2 slow cores and noisy neighbours: wall-clock deadlines
# only produce flaky failures there, so no profile uses them.
settings.register_profile(
    "ci", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def pg() -> Iterator[TemporaryPostgres]:
    """A throwaway PostgreSQL (scram-sha-256; TLS when the binaries support it)."""
    server = TemporaryPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_app_user(pg: TemporaryPostgres) -> DbLogin:
    """Role ``app`` (password ``app-secret``) owning database ``appdb``."""
    return pg.create_login("app", "app-secret", "appdb")
