"""pgcloak.policy: the policy model, YAML loading with precise errors, and decisions.

A leaf package: pure (the loader reads one file, nothing else), no asyncio, and no
imports from other pgcloak packages. Everything the rest of pgcloak needs is here::

    policy = load_policy("policies/example.yaml")        # or parse_policy(text)
    policy.column("public.users", "email")               # ColumnPolicy | None
    policy.read_decision(["support"], "public.users.email")   # "mask"

Names follow PostgreSQL: unquoted names fold to lowercase, double-quoted names keep
their case; a bare table name means schema ``public``. See :mod:`.compiled` for how
read decisions combine across roles.
"""

from pgcloak.policy.compiled import Policy, ReadView
from pgcloak.policy.errors import PolicyError, PolicyIssue
from pgcloak.policy.loader import (
    load_policy,
    load_policy_or_keep,
    parse_policy,
    policy_from_bytes,
    policy_from_mapping,
    read_policy_file,
)
from pgcloak.policy.mask import MASK, mask_value
from pgcloak.policy.model import (
    Audit,
    ColumnPolicy,
    Decision,
    Guards,
    IndexKind,
    Normalize,
    PolicyModel,
    RolePolicy,
)
from pgcloak.policy.names import DEFAULT_SCHEMA
from pgcloak.policy.schemagen import schema_json

__all__ = [
    "DEFAULT_SCHEMA",
    "MASK",
    "Audit",
    "ColumnPolicy",
    "Decision",
    "Guards",
    "IndexKind",
    "Normalize",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "PolicyModel",
    "ReadView",
    "RolePolicy",
    "load_policy",
    "load_policy_or_keep",
    "mask_value",
    "parse_policy",
    "policy_from_bytes",
    "policy_from_mapping",
    "read_policy_file",
    "schema_json",
]
