"""`pgcloak backfill`: a database that held its PII in clear before pgcloak, brought to
the policy's stored form; a key_version bumped and the old envelopes sealed again.

Both sides each time: what PostgreSQL holds (read directly: ciphertext, the right blind
index, decrypting to the value seeded) and what a client gets through pgcloak (the row
found by its plaintext e-mail, which a plaintext row never is).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from encryption_fixtures import EncEnv, encryption_env, policy_ddl, policy_yaml, unique

from pgcloak import cli
from pgcloak.crypto.blind_index import blind_index
from pgcloak.crypto.envelope import decrypt, parse_header
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key, master_key_from_text, master_key_to_text


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    # policy= given: the tables start without pgcloak's CHECK constraints, as a database
    # that held plaintext before pgcloak does (the README: `policy ddl --no-check` first).
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("backfill"), "backfill", policy=policy_yaml()) as e:
        yield e


@pytest.fixture(autouse=True)
def master_key(env: EncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCLOAK_MASTER_KEY", env.key_text)


def backfill(env: EncEnv, *flags: str, policy: str | None = None) -> tuple[int, str]:
    """Run the CLI; its exit status and everything it printed (stdout and stderr)."""
    out, err = io.StringIO(), io.StringIO()
    # In the proxy's working directory, as an operator runs it: a relative (here the
    # default) file sink is resolved against it, so the two trails sit side by side.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(env.workdir):
        code = cli.main(["backfill", policy or str(env.policy_path), "--dsn", env.direct_dsn(), *flags])
    return code, out.getvalue() + err.getvalue()


def seed(env: EncEnv, rows: list[tuple[Any, ...]]) -> list[int]:
    """Plaintext rows written straight to PostgreSQL (as before pgcloak); their ids."""
    with env.direct() as conn:
        return [
            conn.execute(
                "INSERT INTO users (email, phone, ssn, loyalty_id, name) VALUES (%s, %s, %s, %s, %s) RETURNING id", row
            ).fetchone()[0]
            for row in rows
        ]


def stored(env: EncEnv, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    rows = env.raw("SELECT id, email, phone, ssn, loyalty_id, name FROM users WHERE id = ANY(%s)", ids)
    return {r[0]: r[1:] for r in rows}


@pytest.fixture
def clean(env: EncEnv) -> Iterator[None]:
    """Each test starts from tables without plaintext (another test's leftovers would be
    converted, or refused, by its run)."""
    yield
    env.raw("DELETE FROM users RETURNING 1")
    env.raw("DELETE FROM orders RETURNING 1")
    env.raw('DELETE FROM crm."Contacts" RETURNING 1')


def test_plaintext_rows_are_encrypted_and_found_through_pgcloak(env: EncEnv, clean: None) -> None:
    people = [
        (unique("Alice").upper(), "+1 555 010 0001", "078-05-1120", "L-0001", "alice"),
        (unique("bob"), "(555) 010-0002", "219-09-9999", None, "bob"),
        (None, None, None, None, "nobody"),
    ]
    ids = seed(env, people)
    with env.direct() as conn:
        conn.execute("INSERT INTO orders (buyer_email) VALUES (%s)", (people[1][0],))
        conn.execute('INSERT INTO crm."Contacts" ("Email", note) VALUES (%s, %s)', (people[0][0], "vip"))

    async def found(email: str) -> Any:
        conn = await env.apg()
        try:
            return await conn.fetchval("SELECT name FROM users WHERE email = $1", email)
        finally:
            await conn.close()

    # In clear, the rows exist but pgcloak's lookup (by blind index) cannot see them.
    assert asyncio.run(found(people[1][0])) is None

    code, printed = backfill(env)
    assert code == 0, printed
    assert "users.email: 2 value(s) not in the stored form" in printed
    for values in people:  # no value is ever printed
        for value in values[:4]:
            if value:
                assert value not in printed and value.lower() not in printed

    rows = stored(env, ids)
    for row_id, (email, phone, ssn, loyalty, _name) in zip(ids, people, strict=True):
        got = rows[row_id]
        env.assert_stored(got[0], email)
        env.assert_stored(got[1], phone, column="phone")
        env.assert_stored(got[2], ssn, column="ssn")
        env.assert_stored(got[3], loyalty, column="loyalty_id")
        assert got[4] == _name  # unprotected columns untouched
    env.assert_stored(env.raw_one("SELECT buyer_email FROM orders"), people[1][0], "public.orders", "buyer_email")
    env.assert_stored(env.raw_one('SELECT "Email" FROM crm."Contacts"'), people[0][0], "crm.Contacts", "Email")

    # Through pgcloak: found by the plaintext (in another case too), decrypted.
    assert asyncio.run(found(people[0][0].lower())) == "alice"
    with env.psy() as conn:
        assert conn.execute("SELECT phone, ssn FROM users WHERE email = %s", (people[1][0],)).fetchone() == (
            people[1][1],
            people[1][2],
        )

    # Run again: nothing left to do, nothing rewritten.
    before = stored(env, ids)
    code, printed = backfill(env)
    assert code == 0, printed
    assert "0 value(s) not in the stored form" in printed
    assert stored(env, ids) == before

    # What the CHECK constraints of `policy ddl` hold the columns to: every row passes.
    with env.direct() as conn:
        conn.execute(policy_ddl(env.policy_path))
        for check in conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE conname LIKE %s", ("%pgcloak_check",)
        ).fetchall():
            conn.execute(f'ALTER TABLE {check[0]} VALIDATE CONSTRAINT "{check[1]}"')
        for check in conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE conname LIKE %s", ("%pgcloak_check",)
        ).fetchall():
            conn.execute(f'ALTER TABLE {check[0]} DROP CONSTRAINT "{check[1]}"')


def test_a_value_that_cannot_be_converted_is_named_by_its_row_and_left_alone(env: EncEnv, clean: None) -> None:
    email = unique("carol")
    ids = seed(env, [(email, "call me maybe", "123-45-6789", None, "carol"), (unique(), "+15550100", None, None, "d")])
    code, printed = backfill(env)
    assert code == 1, printed
    assert f"row id={ids[0]}: value is not a phone number" in printed
    assert "call me maybe" not in printed and email not in printed
    rows = stored(env, ids)
    assert rows[ids[0]][1] == "call me maybe"  # left as it was...
    env.assert_stored(rows[ids[0]][0], email)  # ...and the row's other values converted
    env.assert_stored(rows[ids[0]][2], "123-45-6789", column="ssn")
    env.assert_stored(rows[ids[1]][1], "+15550100", column="phone")
    # Listed once, although the row moved when its other values were written.
    assert printed.count(f"row id={ids[0]}:") == 1
    # The CHECK constraint would catch it: the column cannot be validated.
    with env.direct() as conn:
        conn.execute(policy_ddl(env.policy_path))
        with pytest.raises(Exception, match="violated by some row"):
            conn.execute("ALTER TABLE users VALIDATE CONSTRAINT users_phone_pgcloak_check")
        conn.execute(policy_ddl(env.policy_path, checks=False))
        for name in ("email", "phone", "ssn", "loyalty_id"):
            conn.execute(f"ALTER TABLE users DROP CONSTRAINT IF EXISTS users_{name}_pgcloak_check")
        conn.execute("ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_buyer_email_pgcloak_check")
        conn.execute('ALTER TABLE crm."Contacts" DROP CONSTRAINT IF EXISTS "Contacts_Email_pgcloak_check"')


def test_duplicates_by_normalized_value_are_refused_by_the_unique_index(env: EncEnv, clean: None) -> None:
    email, other = unique("dup"), unique("other")
    ids = seed(env, [(email, None, None, None, "a"), (email.upper(), None, None, None, "b"), (other, None, None, None, "c")])
    code, printed = backfill(env, "--batch", "2")
    assert code == 1, printed
    assert f"row id={ids[1]}: refused by PostgreSQL: SQLSTATE 23505 (users_email_pgcloak_idx)" in printed
    rows = stored(env, ids)
    env.assert_stored(rows[ids[0]][0], email)
    assert rows[ids[1]][0] == email.upper()  # the duplicate, in clear, for the owner to resolve
    env.assert_stored(rows[ids[2]][0], other)  # its batch was written row by row


def _plain(env: EncEnv, value: str) -> str:
    return decrypt(env.keyring, value).decode()


def test_another_master_key_is_refused_before_anything_is_written(
    env: EncEnv, clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = seed(env, [(unique(), None, None, None, "x")])
    assert backfill(env)[0] == 0
    email = unique("late")
    later = seed(env, [(email, None, None, None, "late")])
    monkeypatch.setenv("PGCLOAK_MASTER_KEY", master_key_to_text(generate_master_key()))
    code, printed = backfill(env)
    assert code == 2, printed
    assert "sealed under another master key" in printed and "nothing written" in printed
    assert stored(env, later)[later[0]][0] == email  # still in clear: not sealed under a key pgcloak lacks
    assert ids


def test_rotation_seals_old_versions_again(env: EncEnv, clean: None, tmp_path: Any) -> None:
    ssns = ["111-22-3333", "444-55-6666"]
    ids = seed(env, [(unique(), None, s, None, "r") for s in ssns])
    assert backfill(env)[0] == 0
    ssn_key = env.policy.key_id("public.users", "ssn")
    assert {parse_header(v[2])[1] for v in stored(env, ids).values()} == {1}

    rotated = tmp_path / "policy-v2.yaml"
    rotated.write_text(policy_yaml().replace("ssn: {encrypt: true}", "ssn: {encrypt: true, key_version: 2}"))
    code, printed = backfill(env, policy=str(rotated))
    assert code == 0 and "0 value(s) not in the stored form" in printed  # without --rotate: nothing
    emails_before = {i: v[0] for i, v in stored(env, ids).items()}
    code, printed = backfill(env, "--rotate", policy=str(rotated))
    assert code == 0, printed
    assert "ssn: 0 encrypted, 0 stored again in the policy's layout, 2 sealed again" in printed
    keyring = Keyring(master_key_from_text(env.key_text))  # one that knows version 2 is current
    keyring.set_current_version(ssn_key, 2)
    rows = stored(env, ids)
    for row_id, ssn in zip(ids, ssns, strict=True):
        assert parse_header(rows[row_id][2]) == (ssn_key, 2)
        assert decrypt(keyring, rows[row_id][2]) == ssn.encode()
        assert rows[row_id][0] == emails_before[row_id]  # email is at its current version: untouched
    assert "public.users: 0 row(s) updated" in backfill(env, "--rotate", policy=str(rotated))[1]  # done already


def test_a_changed_layout_is_stored_again(env: EncEnv, clean: None, tmp_path: Any) -> None:
    """ssn gains a blind index: its envelopes are stored again with the index in front."""
    ssn = "987-65-4320"
    ids = seed(env, [(None, None, ssn, None, "layout")])
    assert backfill(env)[0] == 0
    indexed = tmp_path / "policy-indexed.yaml"
    indexed.write_text(policy_yaml().replace("ssn: {encrypt: true}", "ssn: {encrypt: true, index: exact}"))
    code, printed = backfill(env, policy=str(indexed))
    assert code == 0, printed
    assert "ssn: 0 encrypted, 1 stored again in the policy's layout" in printed
    value = stored(env, ids)[ids[0]][2]
    assert value.startswith(blind_index(env.keyring, "public.users.ssn", ssn) + ".pgc1:")
    assert _plain(env, value) == ssn


def test_dry_run_writes_nothing(env: EncEnv, clean: None) -> None:
    email = unique("dry")
    ids = seed(env, [(email, None, None, None, "dry")])
    code, printed = backfill(env, "--dry-run")
    assert code == 0, printed
    assert "1 row(s) would be updated" in printed
    assert stored(env, ids)[ids[0]][0] == email


def test_a_value_the_application_writes_meanwhile_is_not_overwritten(env: EncEnv, clean: None) -> None:
    """The application writes a row through pgcloak after the backfill read it and before
    the backfill's write: the application's value stays (not the old one, encrypted)."""
    old, new, other = unique("old"), unique("new"), unique("other")
    ids = seed(env, [(old, None, None, None, "before"), (other, None, None, None, "o")])
    result: dict[str, Any] = {}
    with env.psy(autocommit=False) as app:
        # The application's transaction holds the row: the backfill reads the committed
        # (plaintext) value, and its write waits for this transaction to end.
        app.execute("UPDATE users SET email = %s, name = 'after' WHERE id = %s", (new, ids[0]))
        worker = threading.Thread(target=lambda: result.setdefault("run", backfill(env)))
        worker.start()
        deadline = time.monotonic() + 20
        while not env.raw(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE %%users%%'"
        ):
            assert time.monotonic() < deadline and worker.is_alive(), "the backfill never waited for the row"
            time.sleep(0.02)
        app.commit()
    worker.join(60)
    code, printed = result["run"]
    assert code == 0, printed
    rows = stored(env, ids)
    env.assert_stored(rows[ids[0]][0], new)  # the application's value, not the old one
    assert rows[ids[0]][4] == "after"
    env.assert_stored(rows[ids[1]][0], other)
    assert "1 row(s) changed while being converted" in printed


def test_bad_arguments_are_refused(env: EncEnv) -> None:
    code, printed = backfill(env, "--table", "public.nope")
    assert code == 2 and "not protected by the policy: public.nope" in printed
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        code = cli.main(["backfill", str(env.policy_path), "--dsn", "postgresql://nobody@127.0.0.1:1/x"])
    assert code == 2 and "cannot read or write the database" in out.getvalue()


def test_a_partitioned_table_is_done_partition_by_partition(env: EncEnv, tmp_path: Any) -> None:
    """Rows of two partitions share ctids ((0,1), (0,2)...): each is converted, once."""
    with env.direct() as conn:
        conn.execute(
            "CREATE TABLE events (id int, email text) PARTITION BY RANGE (id);"
            "CREATE TABLE events_a PARTITION OF events FOR VALUES FROM (0) TO (100);"
            "CREATE TABLE events_b PARTITION OF events FOR VALUES FROM (100) TO (200);"
        )
    try:
        emails = {i: unique(f"part{i}") for i in (1, 2, 101, 102)}
        with env.direct() as conn:
            for i, email in emails.items():
                conn.execute("INSERT INTO events VALUES (%s, %s)", (i, email))
        policy = tmp_path / "events.yaml"
        policy.write_text(
            "version: 1\ntables:\n  public.events:\n    email: {encrypt: true, index: exact, normalize: email}\n"
        )
        code, printed = backfill(env, policy=str(policy))
        assert code == 0, printed
        assert "public.events: 4 row(s) updated" in printed
        keyring = Keyring(master_key_from_text(env.key_text))
        rows = dict(env.raw("SELECT id, email FROM events"))
        assert len(rows) == 4
        for i, email in emails.items():
            assert rows[i].startswith(blind_index(keyring, "public.events.email", email, "email") + ".pgc1:")
            assert decrypt(keyring, rows[i]) == email.encode()
    finally:
        with env.direct() as conn:
            conn.execute("DROP TABLE events")


def test_another_master_key_is_refused_under_an_old_layout_too(
    env: EncEnv, clean: None, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ssn gains an index: its envelopes (no index in front) would be opened and sealed
    again, so they must be checked against the key as well, before anything is written."""
    ids = seed(env, [(None, None, "123-45-6789", None, "old")])
    assert backfill(env)[0] == 0
    later = seed(env, [(None, None, "987-65-4321", None, "new")])
    indexed = tmp_path / "indexed.yaml"
    indexed.write_text(policy_yaml().replace("ssn: {encrypt: true}", "ssn: {encrypt: true, index: exact}"))
    monkeypatch.setenv("PGCLOAK_MASTER_KEY", master_key_to_text(generate_master_key()))
    code, printed = backfill(env, policy=str(indexed))
    assert code == 2, printed
    assert "ssn: 1 stored value(s) sealed under another master key" in printed
    assert stored(env, later)[later[0]][2] == "987-65-4321"  # not sealed under the wrong key
    assert ids


def test_a_deferred_constraint_failing_at_commit_is_reported_without_the_value(env: EncEnv, tmp_path: Any) -> None:
    with env.direct() as conn:
        conn.execute(
            "CREATE TABLE accounts (id serial PRIMARY KEY, email text UNIQUE);"
            "CREATE TABLE tickets (id serial, email text REFERENCES accounts (email) DEFERRABLE INITIALLY DEFERRED);"
            "INSERT INTO accounts (email) VALUES ('held@example.com'), ('free@example.com');"
            "INSERT INTO tickets (email) VALUES ('held@example.com');"
        )
    try:
        policy = tmp_path / "accounts.yaml"
        policy.write_text("version: 1\ntables:\n  public.accounts:\n    email: {encrypt: true}\n")
        code, printed = backfill(env, policy=str(policy))
        assert code == 1, printed
        assert "refused by PostgreSQL: SQLSTATE 23503 (tickets_email_fkey)" in printed
        assert "held@example.com" not in printed and "free@example.com" not in printed
        rows = dict(env.raw("SELECT email, id FROM accounts"))
        assert "held@example.com" in rows  # left as it was: the ticket refers to it
        assert "free@example.com" not in rows  # converted
    finally:
        with env.direct() as conn:
            conn.execute("DROP TABLE tickets; DROP TABLE accounts")


def test_a_quoted_table_is_selected_by_its_quoted_name(env: EncEnv, clean: None) -> None:
    email = unique("quoted")
    with env.direct() as conn:
        conn.execute('INSERT INTO crm."Contacts" ("Email") VALUES (%s)', (email,))
    code, printed = backfill(env, "--table", 'crm."Contacts"')
    assert code == 0, printed
    assert "public.users" not in printed  # only the table asked for
    env.assert_stored(env.raw_one('SELECT "Email" FROM crm."Contacts"'), email, "crm.Contacts", "Email")


# -- the run in the audit trail ------------------------------------------------------------
def _backfill_trail(env: EncEnv) -> Path:
    """The backfill's own chain, next to the proxy's (the policy's default file sink, in
    the working directory; the policy's own directory gets nothing)."""
    assert not list(env.policy_path.parent.glob("*.jsonl"))
    return env.workdir / "pgcloak-audit.backfill.jsonl"


def _last_run(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    start = max(i for i, r in enumerate(records) if r.get("reason") == "started")
    return [r for r in records[start:] if r["chain"] == records[start]["chain"]]


def _verify(*files: Path | str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["audit", "verify", *map(str, files)])
    return code, out.getvalue() + err.getvalue()


def test_the_run_is_recorded_in_its_own_chain_without_a_value(env: EncEnv, clean: None, tmp_path: Path) -> None:
    """Reading every protected value of a table is an access a DPO must see: one event per
    table (columns read and written, rows updated, counts), a seal at the end, verifiable;
    no value and no row key in it."""
    people = [(unique("trail"), "+1 555 010 0042", "321-54-9876", "L-4242", "t1"), (unique("trail"), None, None, None, "t2")]
    ids = seed(env, people)
    code, printed = backfill(env, "--table", "public.users")
    assert code == 0, printed
    path = _backfill_trail(env)
    text = path.read_text(encoding="utf-8")
    for values in people:
        for value in values[:4]:
            if value:
                assert value not in text and value.lower() not in text
    run = _last_run(path)
    assert [r["type"] for r in run] == ["statement", "statement", "seal"]
    started, users = run[0], run[1]
    assert started["tables"] == ["public.users"] and started["application_name"] == "pgcloak backfill"
    assert users["kind"] == "backfill" and users["tables"] == ["public.users"]
    assert users["user"] == env.login.user and users["database"] == env.login.dbname
    assert users["rows"] == len(ids)
    assert set(users["columns_written"]) == {
        env.policy.key_id("public.users", c) for c in ("email", "phone", "ssn", "loyalty_id")
    }
    assert users["reason"].startswith("5 encrypted, 0 stored again, 0 rotated, 0 failed")
    assert not any(str(i) in json.dumps(users["reason"]) for i in ids if i > 9)  # no row key either

    code, report = _verify(path)
    assert code == 0, report
    # The README's glob (here for the default sink pgcloak-audit.jsonl) takes in both
    # chains, the proxy's (still running: --live) and the backfill's.
    with env.psy() as conn:  # an event in the proxy's chain
        conn.execute("SELECT name FROM users WHERE email = %s", (people[0][0],))
    server = env.proxy.server
    assert server is not None and server.audit is not None
    env.proxy.call(server.audit.flush, 10)
    files = sorted(env.workdir.glob("pgcloak-audit*.jsonl*"))
    assert path in files and env.workdir / "pgcloak-audit.jsonl" in files
    code, report = _verify("--live", *files)
    assert code == 0 and report.startswith("OK: ") and "in 2 source(s)" in report, report
    # The chain is the proof: a count edited after the fact is found.
    edited = tmp_path / path.name
    edited.write_text(text.replace(f'"rows":{len(ids)},', f'"rows":{len(ids) + 1},', 1), encoding="utf-8")
    assert edited.read_text(encoding="utf-8") != text
    assert _verify(edited)[0] != 0


def test_a_table_with_nothing_to_convert_gets_no_event_of_its_own(env: EncEnv, clean: None) -> None:
    """As the README says: `started` names the tables, a table needing no pass gets no
    event, the chain ends with its seal."""
    seed(env, [(unique("again"), None, None, None, "a")])
    assert backfill(env, "--table", "public.users")[0] == 0
    code, printed = backfill(env, "--table", "public.users")
    assert code == 0, printed
    run = _last_run(_backfill_trail(env))
    assert [(r["type"], r.get("reason")) for r in run] == [("statement", "started"), ("seal", "shutdown")]
    assert run[0]["tables"] == ["public.users"] and run[0]["kind"] == "backfill"


def test_a_trail_that_cannot_be_written_stops_the_backfill_when_the_policy_says_refuse(
    env: EncEnv, clean: None, tmp_path: Path
) -> None:
    email = unique("untrailed")
    ids = seed(env, [(email, None, None, None, "u")])
    unwritable = f"audit:\n  sink: file:/dev/null/audit.jsonl\n  spill_dir: {tmp_path}\n"
    refusing = tmp_path / "refusing.yaml"
    refusing.write_text(policy_yaml() + unwritable + "  on_audit_failure: refuse\n")
    code, printed = backfill(env, policy=str(refusing))
    assert code == 2 and "on_audit_failure: refuse" in printed and "nothing written" in printed
    assert stored(env, ids)[ids[0]][0] == email  # untouched
    # With on_audit_failure: allow it runs, and its events wait in the spill file.
    allowing = tmp_path / "allowing.yaml"
    allowing.write_text(policy_yaml() + unwritable + "  on_audit_failure: allow\n")
    code, printed = backfill(env, policy=str(allowing))
    assert code == 0 and "wait in the spill file" in printed, printed
    env.assert_stored(stored(env, ids)[ids[0]][0], email)
    spilled = [json.loads(line) for p in tmp_path.glob("*.spill.jsonl") for line in p.read_text().splitlines()]
    assert any(r.get("kind") == "backfill" and r.get("rows") == 1 for r in spilled), spilled
