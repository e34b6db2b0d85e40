"""Read decisions: specificity inside a role, most permissive across roles."""

from __future__ import annotations

import textwrap

import pytest

from pgcloak.policy import Policy, parse_policy

EMAIL, PHONE, SSN = "public.users.email", "public.users.phone", "public.users.ssn"
NOTE = "public.orders.note"


def _policy(roles: str, default_read: str = "deny") -> Policy:
    text = textwrap.dedent(
        """
        version: 1
        default_read: {default_read}
        tables:
          users:
            email: {{index: exact, normalize: email}}
            phone: {{index: exact, normalize: phone}}
            ssn: {{}}
          orders:
            note: {{}}
        roles:
        """
    ).format(default_read=default_read)
    return parse_policy(text + textwrap.indent(textwrap.dedent(roles), "  "))


@pytest.fixture(scope="module")
def policy() -> Policy:
    return _policy(
        """
        app_rw: {read: reveal}
        support: {read: {users.email: mask, users.phone: mask, users.ssn: deny}}
        analyst: {read: deny}
        auditor: {read: {users.*: mask, public.users.ssn: deny, default: reveal}}
        """
    )


def test_single_roles(policy: Policy) -> None:
    assert [policy.read_decision(["app_rw"], k) for k in (EMAIL, PHONE, SSN, NOTE)] == [
        "reveal",
        "reveal",
        "reveal",
        "reveal",
    ]
    assert [policy.read_decision(["support"], k) for k in (EMAIL, PHONE, SSN, NOTE)] == [
        "mask",
        "mask",
        "deny",
        "deny",  # not listed for support: default_read
    ]
    assert policy.read_decision(["analyst"], EMAIL) == "deny"


def test_most_specific_rule_wins_inside_a_role(policy: Policy) -> None:
    assert policy.read_decision(["auditor"], SSN) == "deny"  # column beats table wildcard
    assert policy.read_decision(["auditor"], EMAIL) == "mask"  # wildcard beats default
    assert policy.read_decision(["auditor"], NOTE) == "reveal"  # role default


def test_unlisted_roles_get_default_read(policy: Policy) -> None:
    assert policy.read_decision(["nobody"], EMAIL) == "deny"
    assert policy.read_decision([], EMAIL) == "deny"


def test_membership_most_permissive_wins(policy: Policy) -> None:
    # alice is not listed herself, but is a member of support and analyst.
    assert policy.read_decision(["alice", "analyst", "support"], EMAIL) == "mask"
    assert policy.read_decision(["alice", "support", "app_rw"], SSN) == "reveal"
    assert policy.read_decision(["support", "auditor"], SSN) == "deny"
    assert policy.read_decision(["support", "auditor"], NOTE) == "reveal"
    # order does not matter
    assert policy.read_decision(["app_rw", "support"], SSN) == "reveal"


def test_a_single_role_string_is_not_iterated(policy: Policy) -> None:
    assert policy.read_decision("app_rw", EMAIL) == "reveal"


def test_unknown_key_ids_use_wildcards_and_defaults(policy: Policy) -> None:
    gone = "public.users.old_email"  # values written before the column left the policy
    assert policy.read_decision(["auditor"], gone) == "mask"  # users.*
    assert policy.read_decision(["auditor"], "public.other.x") == "reveal"  # default
    assert policy.read_decision(["support"], gone) == "deny"
    assert policy.read_decision(["app_rw"], gone) == "reveal"


def test_default_read_is_a_floor() -> None:
    policy = _policy("support: {read: {users.ssn: reveal}}\n", default_read="mask")
    assert policy.read_decision(["anyone"], EMAIL) == "mask"
    assert policy.read_decision(["support"], SSN) == "reveal"
    assert policy.read_decision(["support"], EMAIL) == "mask"


def test_role_names_fold() -> None:
    policy = _policy("App_RW: {read: reveal}\n'\"Mixed\"': {read: mask}\n")
    assert policy.read_decision(["app_rw"], EMAIL) == "reveal"
    assert policy.read_decision(["App_RW"], EMAIL) == "deny"  # catalog names are exact
    assert policy.read_decision(["Mixed"], EMAIL) == "mask"


def test_read_view_is_cached_per_role_set(policy: Policy) -> None:
    view = policy.read_view(["support", "nobody"])
    assert policy.read_view(("support",)) is view
    assert view.decision(EMAIL) == "mask"
    assert view.decision(SSN) == "deny"
