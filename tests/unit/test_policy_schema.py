"""The checked-in JSON Schema matches the model, and the example policies are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pgcloak.policy import load_policy, schema_json

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLES = sorted(POLICIES.glob("*.yaml"))


def test_checked_in_schema_matches_the_model() -> None:
    checked_in = (POLICIES / "policy.schema.json").read_text(encoding="utf-8")
    assert checked_in == schema_json(), (
        "policies/policy.schema.json is stale; regenerate it with "
        "`python -m pgcloak.policy.schema > policies/policy.schema.json`"
    )


def test_schema_is_json_with_the_top_level_sections() -> None:
    schema = json.loads(schema_json())
    assert set(schema["properties"]) == {
        "version",
        "tables",
        "default_read",
        "roles",
        "guards",
        "audit",
    }
    assert schema["additionalProperties"] is False


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"example.yaml", "minimal.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policies_load(path: Path) -> None:
    policy = load_policy(path)
    assert "public.users" in policy.protected_tables()


def test_example_policy_decisions() -> None:
    policy = load_policy(POLICIES / "example.yaml")
    email, phone, ssn = (f"public.users.{c}" for c in ("email", "phone", "ssn"))
    assert policy.column("users", "email") is not None
    assert policy.columns_of("users")["email"].normalize == "email"
    assert policy.columns_of("users")["phone"].index == "exact"
    assert policy.columns_of("users")["ssn"].index is None
    assert {k: policy.read_decision(["app_rw"], k) for k in (email, phone, ssn)} == {
        email: "reveal",
        phone: "reveal",
        ssn: "reveal",
    }
    assert [policy.read_decision(["support"], k) for k in (email, phone, ssn)] == [
        "mask",
        "mask",
        "deny",
    ]
    assert policy.read_decision(["analyst"], email) == "deny"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policies_match_the_json_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((POLICIES / "policy.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), schema)
