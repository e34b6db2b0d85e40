"""examples/compose without Docker: its schema.sql on a real PostgreSQL, and the compose
file's own `pgcloak run` command with its policy, the application's role `app` writing
and reading through it. As in the container, the policy sits in a read-only directory
(immutable as root, mode 0555 otherwise) and pgcloak runs in a directory of its own, the
`audit` volume: the policy's relative audit sink must land there, /readyz must say 200.
(The compose file itself is checked against the CLI in tests/unit/test_examples.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml

from pgcloak.crypto.blind_index import INDEX_LENGTH
from pgcloak.crypto.envelope import ENVELOPE_PREFIX_TEXT
from pgcloak.crypto.keys import generate_master_key, master_key_to_text
from pgcloak.demo.postgres import DbLogin, TemporaryPostgres
from proxyctl import SubprocessProxy, free_port

COMPOSE = Path(__file__).resolve().parents[2] / "examples" / "compose"


@dataclass
class Example:
    proxy: SubprocessProxy
    login: DbLogin
    admin: str
    workdir: Path
    policy_dir: Path
    key: str


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` read-only as a `:ro` mount is: ``chattr +i`` as root (who ignores
    mode bits), mode 0555 otherwise."""
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    if immutable:
        immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False).returncode == 0
    if not immutable:
        directory.chmod(0o555)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def compose_args(policy: Path, backend: str, admin_port: int) -> list[str]:
    """The compose service's `command`, pointed at this test's server, policy and ports
    (SubprocessProxy adds its own --listen)."""
    command: list[str] = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())["services"]["pgcloak"]["command"]
    assert command[0] == "run"
    args, values = command[1:], {"--backend": backend, "--policy": str(policy), "--admin-listen": f"127.0.0.1:{admin_port}"}
    out: list[str] = []
    i = 0
    while i < len(args):
        flag = args[i]
        if flag == "--listen":
            i += 2
            continue
        out.append(flag)
        if flag in values:
            out.append(values[flag])
            i += 2
        else:
            i += 1
    assert {"--backend", "--policy", "--admin-listen"} <= set(out)
    return out


@pytest.fixture(scope="module")
def example(pg: TemporaryPostgres, pg_app_user: DbLogin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    name = f"compose_{uuid.uuid4().hex[:6]}"
    pg.create_database(name, owner=pg_app_user.user)
    login = DbLogin(pg_app_user.user, pg_app_user.password, name)
    with psycopg.connect(pg.dsn(login.user, login.password, name), autocommit=True) as conn:
        conn.execute((COMPOSE / "schema.sql").read_text())  # as the entrypoint runs it
    directory = tmp_path_factory.mktemp("compose")
    policy_dir, workdir = directory / "etc-pgcloak-policy", directory / "var-lib-pgcloak"
    policy_dir.mkdir()
    workdir.mkdir()
    shutil.copy(COMPOSE / "policy.yaml", policy_dir / "policy.yaml")  # the example's, unchanged
    backend = f"postgresql://{pg.host}:{pg.port}/{name}"
    admin = free_port()
    key = master_key_to_text(generate_master_key())
    args = [*compose_args(policy_dir / "policy.yaml", backend, admin), "--drain-timeout", "0"]
    try:
        with read_only(policy_dir), SubprocessProxy(
            args, directory / "pgcloak.log", env={"PGCLOAK_MASTER_KEY": key}, cwd=workdir
        ) as proxy:
            yield Example(proxy, login, f"http://127.0.0.1:{admin}", workdir, policy_dir, key)
    finally:
        pg.run_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_trail_lands_in_the_working_directory_and_the_proxy_is_ready(example: Example) -> None:
    """The compose healthcheck's /readyz is 200: the relative sink was opened in the
    working directory (the volume), not next to the read-only policy (which would make
    every PII statement fail with 58000 under on_audit_failure: refuse)."""
    with urllib.request.urlopen(f"{example.admin}/readyz", timeout=10) as reply:
        assert reply.status == 200
    assert (example.workdir / "audit.jsonl").is_file()
    assert sorted(p.name for p in example.policy_dir.iterdir()) == ["policy.yaml"]


def test_the_app_role_writes_and_reads_through_pgcloak(example: Example, pg: TemporaryPostgres) -> None:
    proxy, login = example.proxy, example.login
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


def test_the_compose_files_verify_command_works_on_the_running_proxys_trail(example: Example) -> None:
    """The compose file's comment, `docker compose exec pgcloak sh -c '...'`: its command
    run by a shell in the container's working directory while the proxy runs (no
    shutdown seal yet, hence --live)."""
    comment = next(
        line for line in (COMPOSE / "docker-compose.yaml").read_text().splitlines() if "audit verify" in line
    )
    command = comment.split("docker compose exec pgcloak sh -c ", 1)[1].strip().strip("'")
    assert command.startswith("pgcloak audit verify --live ")
    with psycopg.connect(example.proxy.dsn(example.login.user, example.login.password, example.login.dbname)) as conn:
        conn.execute("SELECT email FROM users WHERE email = %s", ("nobody@example.com",))
    done = subprocess.run(
        ["sh", "-c", command.replace("pgcloak ", f"{sys.executable} -m pgcloak.cli ", 1)],
        cwd=example.workdir,
        env={**os.environ, "PGCLOAK_MASTER_KEY": example.key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr
    events = [json.loads(line) for line in (example.workdir / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("type") == "statement" for e in events)
