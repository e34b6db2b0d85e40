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
        ("SET search_path TO DEFAULT", SearchPathChange("reset")),
        ("SET LOCAL search_path = DEFAULT", SearchPathChange("reset", local=True)),
        ("RESET search_path", SearchPathChange("reset")),
        ("reset all", SearchPathChange("reset")),
        ("DISCARD ALL", SearchPathChange("reset")),
        ("/* c */ SET search_path TO app ;", SearchPathChange("set", ("app",))),
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
        "SELECT set_config('search_path', 'app', false)",
        "SELECT set_config('SEARCH_PATH', 'app', true)",
        "SELECT set_config($1, $2, false)",
        "SELECT set_config(name, 'x', false) FROM t",
        "SET search_path FROM CURRENT",
        "SET search_path TO app,",
        "SET search_path TO",
        "SET search_path = app; INSERT INTO users (email) VALUES ('x')",
        "RESET ALL; SELECT 1",
    ],
)
def test_changes_that_cannot_be_followed_are_refused(sql: str) -> None:
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


def test_session_path_follows_sets_and_transactions() -> None:
    path = SessionSearchPath("alice", '"$user", public')
    assert path.current == ("alice", "public") and path.settled
    # Autocommit: a SET applies at once and holds once its batch succeeded...
    assert _set(path, 'SET search_path = "$user", app') is None
    assert path.current == ("alice", "app") and not path.settled
    path.ready(IDLE)
    assert path.current == ("alice", "app") and path.settled
    # ...and is undone when its batch (an implicit transaction) failed.
    _set(path, "SET search_path = x")
    path.failed()
    path.ready(IDLE)
    assert path.current == ("alice", "app")
    # In a block: undone by a rollback (or a failed COMMIT), kept by a COMMIT.
    path.ready(IN_BLOCK)
    _set(path, "SET search_path = x")
    assert path.current == ("x",)
    path.ready(FAILED)
    path.ready(IDLE)
    assert path.current == ("alice", "app")
    path.ready(IN_BLOCK)
    _set(path, "SET search_path = y")
    path.commit()
    path.ready(IDLE)
    assert path.current == ("y",) and path.settled
    # COMMIT AND CHAIN: committed, still in a block.
    path.ready(IN_BLOCK)
    _set(path, "SET search_path = z")
    path.commit()
    path.ready(IN_BLOCK)
    path.ready(IDLE)  # the chained block rolled back
    assert path.current == ("z",)
    # SET LOCAL ends with its transaction, either way.
    path.ready(IN_BLOCK)
    _set(path, "SET LOCAL search_path = w")
    assert path.current == ("w",)
    path.commit()
    path.ready(IDLE)
    assert path.current == ("z",)
    _set(path, "SET LOCAL search_path = w")  # an implicit transaction (a batch)
    assert path.current == ("w",)
    path.ready(IDLE)
    assert path.current == ("z",) and path.settled
    # RESET returns to the start-up value.
    _set(path, "RESET search_path")
    path.ready(IDLE)
    assert path.current == ("alice", "public")
    refused = _set(path, "SELECT set_config('search_path', 'q', false)")
    assert refused is not None and path.current == ("alice", "public") and path.settled


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
