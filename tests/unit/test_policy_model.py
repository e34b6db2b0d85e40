"""Compiled policy lookups: names, key ids, prefilter, fingerprint."""

from __future__ import annotations

import json
import textwrap

import pytest
from pydantic import ValidationError

from pgcloak.policy import ColumnPolicy, Policy, PolicyError, parse_policy

POLICY = textwrap.dedent(
    """
    version: 1
    tables:
      Users:
        Email: {index: exact, normalize: email, join_group: customer_email}
        phone: {index: exact, normalize: phone}
        ssn: {}
        '"TaxId"': {hash_only: true, index: exact}
      sales.Orders:
        buyer_email: {index: exact, normalize: email, join_group: customer_email}
        note: {key_version: 3}
      '"CamelCase"':
        x: {}
    """
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY, "test.yaml")


def test_names_fold_like_postgresql(policy: Policy) -> None:
    assert policy.protected_tables() == frozenset(
        {"public.users", "sales.orders", "public.CamelCase"}
    )
    assert set(policy.columns_of("public.users")) == {"email", "phone", "ssn", "TaxId"}
    assert policy.column("public.users", "Email") is None  # lookups take canonical names
    assert policy.column("public.users", "email") is not None


def test_unqualified_lookup_means_public(policy: Policy) -> None:
    assert policy.column("users", "email") is policy.column("public.users", "email")
    assert policy.columns_of("users") == policy.columns_of("public.users")
    assert policy.columns_of("orders") == {}  # not in public
    assert policy.column("sales.orders", "note") == ColumnPolicy(key_version=3)


def test_unknown_tables_and_columns(policy: Policy) -> None:
    assert policy.column("public.accounts", "email") is None
    assert policy.column("public.users", "name") is None
    assert len(policy.columns_of("nope")) == 0


def test_columns_of_is_read_only(policy: Policy) -> None:
    with pytest.raises(TypeError):
        policy.columns_of("users")["x"] = ColumnPolicy()  # type: ignore[index]
    ssn = policy.columns_of("users")["ssn"]
    with pytest.raises(ValidationError):
        ssn.__setattr__("encrypt", False)  # frozen, whatever mypy plugin is configured


def test_key_ids(policy: Policy) -> None:
    assert policy.key_id("public.users", "email") == "public.users.email"
    assert policy.key_id("users", "TaxId") == "public.users.TaxId"
    assert policy.key_id("sales.orders", "note") == "sales.orders.note"
    with pytest.raises(KeyError, match="not a protected column"):
        policy.key_id("users", "name")


def test_index_key_ids(policy: Policy) -> None:
    assert policy.index_key_id("users", "email") == "customer_email"
    assert policy.index_key_id("sales.orders", "buyer_email") == "customer_email"
    assert policy.index_key_id("users", "phone") == "public.users.phone"
    assert policy.index_key_id("users", "TaxId") == "public.users.TaxId"
    with pytest.raises(KeyError, match="no blind index"):
        policy.index_key_id("users", "ssn")


def test_column_for_key_id(policy: Policy) -> None:
    assert policy.column_for_key_id("public.users.phone") is policy.column("users", "phone")
    assert policy.column_for_key_id("public.users.gone") is None


def test_prefilter_names(policy: Policy) -> None:
    assert policy.table_names_for_prefilter() == frozenset({"users", "orders", "camelcase"})


def test_hash_only_implies_no_envelope(policy: Policy) -> None:
    tax = policy.columns_of("users")["TaxId"]
    assert tax.hash_only and not tax.encrypt
    assert ColumnPolicy(hash_only=True, index="exact").encrypt is False
    with pytest.raises(ValidationError, match="cannot be combined"):
        ColumnPolicy(hash_only=True, index="exact", encrypt=True)


def test_defaults_are_safe() -> None:
    policy = parse_policy("version: 1\n")
    assert policy.protected_tables() == frozenset()
    assert policy.default_read == "deny"
    assert policy.guards.unbounded_select == "deny"
    assert policy.guards.max_pii_rows == 1000
    assert policy.audit.statements == "pii"
    assert policy.audit.on_full == "block"
    assert policy.audit.on_audit_failure == "refuse"
    assert ColumnPolicy() == ColumnPolicy(
        encrypt=True, index=None, normalize="none", join_group=None, hash_only=False
    )


def test_canonical_model_round_trips(policy: Policy) -> None:
    dumped = policy.model.model_dump(mode="json")
    assert set(dumped["tables"]) == {"public.users", "sales.orders", 'public."CamelCase"'}
    assert '"TaxId"' in dumped["tables"]["public.users"]
    again = parse_policy(json.dumps(dumped))  # JSON is YAML
    assert again.model == policy.model
    assert again.fingerprint == policy.fingerprint


def test_fingerprint_ignores_spelling_and_layout() -> None:
    a = parse_policy(
        "version: 1\ntables: {users: {email: {}}}\nroles: {r: {read: {users.email: mask}}}"
    )
    b = parse_policy(
        "# comment\nversion: 1\ntables:\n  PUBLIC.Users:\n    EMAIL: {encrypt: true}\n"
        "roles:\n  R:\n    read: {public.users.email: mask}\n"
    )
    c = parse_policy("version: 1\ntables: {users: {email: {key_version: 2}}}\n")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 64
    assert a.fingerprint[:12] in repr(a)


def test_policy_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_policy("version: 1\nx: 1\n")
    assert issubclass(PolicyError, ValueError)
