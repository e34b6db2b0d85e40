"""search_path: recognizing changes, reading settings, resolving names, following a session."""

from __future__ import annotations

import pytest

from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key
from pgcloak.policy import parse_policy
from pgcloak.session.protection import Protection
from pgcloak.session.search_path import SessionSearchPath
from pgcloak.sql import Planner
from pgcloak.sql.search_path import (
    SearchPathChange,
    parse_setting,
    resolve_table,
    search_path_change,
)

PROBE = SearchPathChange("probe")
POLICY = parse_policy(
    """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
  app.users:
    email: {encrypt: true, index: exact, normalize: email}
  app.orders:
    note: {encrypt: true}
default_read: reveal
"""
)
PUBLIC_ONLY = parse_policy(
    """
version: 1
tables:
  public.users:
    email: {encrypt: true}
default_read: reveal
"""
)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SET search_path TO app, public", SearchPathChange("set", ("app", "public"))),
        ("set search_path = App", SearchPathChange("set", ("app",))),
        ('SET SESSION search_path = "App", \'x y\'', SearchPathChange("set", ("App", "x y"))),
        ('SET search_path = "$user", public', SearchPathChange("set", ("$user", "public"))),
        ("SET LOCAL search_path TO app", SearchPathChange("set", ("app",), local=True)),
        ("SET SCHEMA 'crm'", SearchPathChange("set", ("crm",))),
        ("SET LOCAL SCHEMA 'crm'", SearchPathChange("set", ("crm",), local=True)),
        ("SET search_path = temp, json", SearchPathChange("set", ("temp", "json"))),
        ("/* c */ SET search_path TO app ;", SearchPathChange("set", ("app",))),
        # What these make of the path only PostgreSQL can say: it is asked afterwards.
        ("SET search_path TO DEFAULT", PROBE),
        ("SET LOCAL search_path = DEFAULT", PROBE),
        ("RESET search_path", PROBE),
        ("reset all", PROBE),
        ("DISCARD ALL", PROBE),
        ("SET ROLE tenant", PROBE),
        ("RESET ROLE", PROBE),
        ("SET SESSION AUTHORIZATION bob", PROBE),
        ("SELECT set_config('search_path', 'app', false)", PROBE),
        ("SELECT set_config('SEARCH_PATH', 'app', true)", PROBE),
        ("SELECT set_config($1, $2, false)", PROBE),
        ("SELECT set_config(name, 'x', false) FROM t", PROBE),
        ("DO $$ BEGIN PERFORM 1; END $$", PROBE),
        ("CALL do_things()", PROBE),
        ("SET search_path FROM CURRENT", PROBE),
        ("SET search_path TO app,", PROBE),
        ("SET search_path TO", PROBE),
        ("SET search_path = E'crm'", SearchPathChange("set", ("crm",))),
        ("SELECT 1", None),
        ("SHOW search_path", None),
        ("SELECT current_setting('search_path')", None),
        ("SET TIME ZONE 'UTC'", None),
        ("RESET TimeZone", None),
        ("DISCARD PLANS", None),
        ("SELECT set_config('app.tenant', $1, true)", None),
        ("INSERT INTO t (reset) VALUES (1)", None),
    ],
)
def test_recognized_changes(sql: str, expected: SearchPathChange | None) -> None:
    assert search_path_change(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SET search_path = app; INSERT INTO users (email) VALUES ('x')",
        "RESET ALL; SELECT 1",
        "SELECT 1; SELECT set_config('search_path', 'x', false)",
    ],
)
def test_changes_sent_with_other_statements_are_refused(sql: str) -> None:
    change = search_path_change(sql)
    assert change is not None and change.kind == "refuse"
    assert "search_path" in change.message
    assert "'x'" not in change.message


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('"$user", public', ("alice", "public")),
        ("app, Public", ("app", "public")),
        ('"My ""S""", app', ('My "S"', "app")),
        ("", ()),
        ('broken"', ("alice", "public")),
    ],
)
def test_parse_setting(setting: str, expected: tuple[str, ...]) -> None:
    assert parse_setting(setting, "alice") == expected


def test_resolution_takes_the_first_protected_schema_on_the_path() -> None:
    assert resolve_table(POLICY, ("app", "public"), "users") == "app.users"
    assert resolve_table(POLICY, ("public", "app"), "users") == "public.users"
    assert resolve_table(POLICY, ("public",), "orders") == "public.orders"  # not protected there
    assert resolve_table(POLICY, ("x", "app"), "orders") == "app.orders"
    assert resolve_table(POLICY, (), "users") == "public.users"


def test_planner_resolves_unqualified_names_by_its_search_path() -> None:
    default = Planner(POLICY, index_length=16)
    app = Planner(POLICY, index_length=16, search_path=("app", "public"))
    sql = "INSERT INTO orders (note) VALUES ($1)"
    assert default.plan(sql).params[0].kind == "pass"
    action = app.plan(sql).params[0]
    assert action.kind == "store" and action.key_id == "app.orders.note"
    assert app.plan("SELECT email FROM users WHERE email = $1").audit.pii_read == ("app.users.email",)
    copy = app.plan("COPY orders (note) FROM STDIN")
    assert copy.copy_in is not None and copy.copy_in[0].key_id == "app.orders.note"
    # Qualified names mean what they say.
    assert app.plan("INSERT INTO public.users (email) VALUES ($1)").params[0].key_id == "public.users.email"


def test_protection_variants_only_where_the_path_matters() -> None:
    keyring = Keyring(generate_master_key())
    base = Protection.build(POLICY, keyring)
    assert base.for_search_path(("alice", "public")) is base
    assert base.for_search_path(()) is base
    app = base.for_search_path(("alice", "app", "public"))
    assert app is not base and app.planner.search_path == ("app", "public")
    assert base.for_search_path(("app", "other", "public")) is app  # same protected schemas
    only_public = Protection.build(PUBLIC_ONLY, Keyring(generate_master_key()))
    assert only_public.for_search_path(("app", "x")) is only_public


def _set(path: SessionSearchPath, sql: str) -> str | None:
    change = search_path_change(sql)
    assert change is not None
    return path.apply(change)


IDLE, IN_BLOCK, FAILED = ord("I"), ord("T"), ord("E")


def test_session_path_predicts_within_a_batch_and_asks_after_it() -> None:
    path = SessionSearchPath("alice", ("alice", "public"))
    assert path.current == ("alice", "public")
    # A batch without a change leaves the path known.
    path.batch_end()
    assert path.outstanding == 1 and path.known
    path.ready(IDLE)
    assert path.outstanding == 0 and not path.should_ask(IDLE)
    # Within its batch, a change predicts the path; after the batch, PostgreSQL says.
    assert _set(path, 'SET search_path = "$user", app') is None
    assert path.current == ("alice", "app")
    path.batch_end()
    assert not path.known
    path.batch_end()  # a second batch pipelined behind it
    path.ready(IDLE)
    assert not path.should_ask(IDLE)  # not while another batch is in flight
    path.ready(IDLE)
    assert path.should_ask(IDLE) and not path.should_ask(FAILED)
    path.learned('"$user", app', "alice", IDLE)
    assert path.current == ("alice", "app") and path.known
    # Changes whose result only PostgreSQL knows make the path unknown at once.
    assert _set(path, "SET ROLE tenant") is None
    assert not path.known
    path.batch_end()
    path.ready(IDLE)
    path.learned('"$user", public', "tenant", IDLE)
    assert path.current == ("tenant", "public")
    # A change inside a block: every later batch of the block ends unknown (a savepoint
    # or the block's end may undo it), until the block is over.
    path.ready(IN_BLOCK)
    _set(path, "SET search_path = x")
    path.batch_end()
    path.ready(IN_BLOCK)
    path.learned("x", "tenant", IN_BLOCK)
    path.batch_end()  # e.g. ROLLBACK TO SAVEPOINT
    assert not path.known
    path.ready(IN_BLOCK)
    path.learned("x", "tenant", IN_BLOCK)
    path.batch_end()  # ROLLBACK
    path.ready(IDLE)
    path.learned('"$user", public', "tenant", IDLE)
    path.batch_end()
    assert path.known  # the block is over: batches leave the path alone again
    refused = _set(path, "SET search_path = q; SELECT 1")
    assert refused is not None and path.current == ("tenant", "public")


def test_explain_takes_a_search_path(tmp_path, capsys) -> None:
    from pgcloak import cli

    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ntables:\n  app.users:\n    email: {encrypt: true}\ndefault_read: reveal\n")
    sql = "INSERT INTO users (email) VALUES ($1)"
    assert cli.main(["explain", sql, "--policy", str(policy)]) == 0
    assert "tables: public.users" in capsys.readouterr().out
    assert cli.main(["explain", sql, "--policy", str(policy), "--search-path", '"$user", app', "--user", "bob"]) == 0
    out = capsys.readouterr().out
    assert "tables: app.users" in out and "envelope (key app.users.email)" in out


def test_names_protected_beyond_public_are_sent_qualified() -> None:
    """Binding: the statement reaches the table pgcloak resolved, whatever the server's
    path has become (a function may change it unseen)."""
    app = Planner(POLICY, index_length=16, search_path=("app", "public"))
    default = Planner(POLICY, index_length=16)
    assert app.plan("INSERT INTO users (email) VALUES ($1)").sql == "INSERT INTO app.users (email) VALUES ($1)"
    assert default.plan('SELECT id FROM "users" WHERE id = $1').sql == 'SELECT id FROM public."users" WHERE id = $1'
    assert app.plan("COPY orders (note) FROM STDIN").sql == "COPY app.orders (note) FROM STDIN"
    assert app.plan("WITH users AS (SELECT id FROM t) SELECT id FROM users").sql is None  # a CTE
    assert app.plan("SELECT id FROM public.users WHERE id = $1").sql is None  # qualified already
    only_public = Planner(PUBLIC_ONLY, index_length=16, search_path=("app", "public"))
    assert only_public.plan("INSERT INTO users (email) VALUES ($1)").sql is None


# -- the batch count through an extended-protocol COPY FROM STDIN -----------------------------
_IDLE = ord("I")


def test_syncs_ignored_in_copy_in_mode_are_taken_back_when_the_copy_starts() -> None:
    path = SessionSearchPath("app", ("public",))
    path.copy_started()  # Bind of COPY ... FROM STDIN
    assert path.batch_end()  # Sync sent before the server said anything: counted, for now
    assert (path.outstanding, path.sent) == (1, 1)
    assert path.copy_in() == (0, 1)  # CopyInResponse: that Sync was ignored
    assert (path.outstanding, path.sent) == (0, 0)
    assert not path.batch_end()  # a Sync in copy-in mode: not a batch
    path.copy_ended()  # CopyDone
    assert path.batch_end()  # the Sync after it ends the COPY's batch
    path.ready(_IDLE)
    assert (path.outstanding, path.sent) == (0, 1)


def test_a_copy_that_never_starts_keeps_its_syncs_counted() -> None:
    path = SessionSearchPath("app", ("public",))
    path.copy_started()
    assert path.batch_end()  # the COPY fails (or an error before it): this Sync is answered
    assert path.batch_end()  # and so is the next batch's
    path.ready(_IDLE)  # the COPY's batch is over: no CopyInResponse will come
    assert path.copy_in() == (0, 0)  # (a later COPY's response takes nothing back)
    path.ready(_IDLE)
    assert path.outstanding == 0 and path.should_ask(_IDLE) is False  # path still known


def test_a_query_inside_an_unfinished_extended_batch_makes_the_count_uncertain() -> None:
    path = SessionSearchPath("app", ("public",))
    path.unsynced = True  # Parse, Describe, Flush
    path.uncertain = True  # then a Query (the rewriter marks it)
    path.batch_end()
    path.batch_end()  # the Sync
    path.ready(_IDLE)  # the batch failed before the Query: one ReadyForQuery only
    assert path.uncertain and path.outstanding == 1  # one too many, and known to be so
    other = SessionSearchPath("app", ("public",))
    other.unsynced = other.uncertain = True
    other.batch_end()
    other.batch_end()
    other.ready(_IDLE)
    other.ready(_IDLE)  # nothing failed: both answered, the count came out even
    assert not other.uncertain and other.outstanding == 0
