"""README's first command: `pgcloak demo`, then the psql walkthrough it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxyctl import free_port


def _psql(dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clients"


def _examples(proxied: str, direct: str) -> None:
    """examples/clients/, as their docstrings say to run them against the demo."""
    refusals = {
        "asyncpg_app.py": "bulk read refused: SQLSTATE 42501",
        "psycopg_app.py": "LIKE on an encrypted column refused: SQLSTATE 0A000",
    }
    for script, refusal in refusals.items():
        run = subprocess.run(
            [sys.executable, str(EXAMPLES / script), proxied, direct], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, (script, run.stdout, run.stderr)
        assert "found" in run.stdout and "stored in PostgreSQL: email = " in run.stdout and "deleted" in run.stdout
        stored = [line for line in run.stdout.splitlines() if line.startswith("stored in PostgreSQL")]
        assert stored and all(".pgc1:" in line or ": ssn = pgc1:" in line for line in stored), stored
        assert refusal in run.stdout
    sql = subprocess.run(
        ["psql", "-X", "-f", str(EXAMPLES / "walkthrough.sql"), proxied], capture_output=True, text=True, timeout=60
    )
    assert sql.returncode == 0, sql.stderr
    assert "Hedy | hedy@example.com | +1 555 010 4242 | 219-09-9999" in sql.stdout
    assert sql.stdout.count(" Hedy\n") == 1  # EXECUTE found the row by its phone, written otherwise
    assert "LIKE pattern matching" in sql.stderr and "unbounded_select" in sql.stderr
    assert sql.stdout.rstrip().endswith("DELETE 1")


def test_demo_walkthrough(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    here = tmp_path / "here"  # where the user starts it: the demo leaves nothing there
    here.mkdir()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgcloak.cli", "demo", "--listen", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=here,
        )
    try:
        deadline = time.monotonic() + 90
        while "Press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        proxied = f"postgresql://demo:demo@127.0.0.1:{port}/demo"
        assert f"psql '{proxied}'" in text
        direct = re.findall(r"psql '(postgresql://demo:demo@127\.0\.0\.1:\d+/demo)'", text)[-1]
        assert direct != proxied

        insert = _psql(
            proxied,
            "INSERT INTO users (name, email, phone, ssn) "
            "VALUES ('Alice', 'alice@example.com', '+1 555 010 9999', '078-05-1120')",
        )
        assert insert.returncode == 0, insert.stderr
        found = _psql(proxied, "SELECT name, email, ssn FROM users WHERE email = 'ALICE@example.com'")
        assert found.stdout.strip() == "Alice|alice@example.com|078-05-1120"
        refused = _psql(proxied, "SELECT * FROM users WHERE email LIKE 'a%'")
        assert refused.returncode != 0 and "LIKE" in refused.stderr and "email" in refused.stderr
        dump = _psql(proxied, "SELECT * FROM users")
        assert dump.returncode != 0 and "unbounded_select" in dump.stderr

        support = re.findall(r"psql '(postgresql://support:support@127\.0\.0\.1:\d+/demo)'", text)
        assert support == [f"postgresql://support:support@127.0.0.1:{port}/demo"]
        masked = _psql(support[0], "SELECT name, email, phone FROM users WHERE email = 'alice@example.com'")
        assert masked.stdout.strip() == "Alice|a***@example.com|****99", masked.stderr
        denied = _psql(support[0], "SELECT ssn FROM users WHERE email = 'alice@example.com'")
        assert denied.returncode != 0 and "permission denied" in denied.stderr
        assert "078-05" not in denied.stdout + denied.stderr

        stored = _psql(direct, "SELECT email, ssn FROM users WHERE name = 'Alice'").stdout.strip()
        email, ssn = stored.split("|")
        assert email[22:28] == ".pgc1:" and ssn.startswith("pgc1:")
        assert "alice" not in stored.lower() and "078-05" not in stored
        # Written straight to PostgreSQL, plaintext is refused by the policy's CHECK constraints.
        bypass = _psql(direct, "INSERT INTO users (name, email) VALUES ('Mallory', 'mallory@example.com')")
        assert bypass.returncode != 0 and "users_email_pgcloak_check" in bypass.stderr, bypass.stderr
        _examples(proxied, direct)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()
    assert list(here.iterdir()) == []  # its audit trail went with the throwaway data
