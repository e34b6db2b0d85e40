"""examples/compose without Docker: its schema.sql on a real PostgreSQL, its policy in a
real pgcloak, the application's role `app` writing and reading through it. (The compose
file itself is checked against the CLI in tests/unit/test_examples.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgcloak.crypto.blind_index import INDEX_LENGTH
from pgcloak.crypto.envelope import ENVELOPE_PREFIX_TEXT
from pgcloak.crypto.keys import generate_master_key, master_key_to_text
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from proxyctl import ThreadedProxy, make_settings

COMPOSE = Path(__file__).resolve().parents[2] / "examples" / "compose"


@pytest.fixture(scope="module")
def example(pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedProxy, DbLogin]]:
    name = f"compose_{uuid.uuid4().hex[:6]}"
    pg.create_database(name, owner=pg_app_user.user)
    login = DbLogin(pg_app_user.user, pg_app_user.password, name)
    with psycopg.connect(pg.dsn(login.user, login.password, name), autocommit=True) as conn:
        conn.execute((COMPOSE / "schema.sql").read_text())  # as the entrypoint runs it
    directory = tmp_path_factory.mktemp("compose")
    policy = directory / "policy.yaml"  # the example's, its trail next to it
    policy.write_text((COMPOSE / "policy.yaml").read_text().replace("file:audit.jsonl", f"file:{directory}/audit.jsonl"))
    settings = make_settings(
        backend=f"postgresql://{pg.host}:{pg.port}/{name}",
        backend_tls_mode="disable",
        policy=str(policy),
        master_key=master_key_to_text(generate_master_key()),
        drain_timeout=0,
    )
    try:
        with ThreadedProxy(settings) as proxy:
            yield proxy, login
    finally:
        pg.run_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_app_role_writes_and_reads_through_pgcloak(example: tuple[ThreadedProxy, DbLogin], pg: TemporaryPostgres) -> None:
    proxy, login = example
    email, phone, ssn = "Dana@Example.com", "+1 555 010 0042", "078-05-1120"
    with psycopg.connect(proxy.dsn(login.user, login.password, login.dbname), autocommit=True) as conn:
        conn.execute("INSERT INTO users (name, email, phone, ssn) VALUES (%s, %s, %s, %s)", ("Dana", email, phone, ssn))
        row = conn.execute("SELECT name, email, phone, ssn FROM users WHERE email = %s", ("dana@example.com",)).fetchone()
        assert row == ("Dana", email, phone, ssn)
    with psycopg.connect(pg.dsn(login.user, login.password, login.dbname), autocommit=True) as direct:
        stored = direct.execute("SELECT email, phone, ssn FROM users WHERE name = 'Dana'").fetchone()
        assert stored is not None
        assert all(email not in v and ssn not in v and phone not in v for v in stored)
        assert stored[0][INDEX_LENGTH:].startswith("." + ENVELOPE_PREFIX_TEXT)
        assert stored[2].startswith(ENVELOPE_PREFIX_TEXT)
        # The schema's CHECK constraints: plaintext written around pgcloak is refused.
        with pytest.raises(psycopg.errors.CheckViolation):
            direct.execute("INSERT INTO users (name, email) VALUES ('Eve', 'eve@example.com')")
