"""The policy document as pydantic models: the single source of the JSON Schema.

These models check the shape of each section and the combinations inside one
column. Checks that need the whole document (names, duplicates after case
folding, references from ``roles`` to ``tables``, join groups) live in
:mod:`pgcloak.policy.compiled`, where they can point at the exact key at fault.

Models are strict (a YAML ``"true"`` string is not a boolean, ``"2"`` is not an
int), forbid unknown keys (a typo must not silently weaken protection) and are
frozen (a loaded policy is shared by every session and must not change).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pgcloak.policy.names import IDENT_KEY_PATTERN, READ_KEY_PATTERN, TABLE_KEY_PATTERN

Decision = Literal["reveal", "mask", "deny"]
"""What a role gets for a protected value: plaintext, a masked form, or an error."""
Normalize = Literal["email", "phone", "none"]
IndexKind = Literal["exact"]

#: Tags of the two forms of ``roles.<role>.read``; they show up in pydantic error
#: locations and are removed when errors are reported.
READ_ONE_TAG = "decision"
READ_MAP_TAG = "by_column"
MAX_KEY_VERSION = 65535
JOIN_GROUP_PATTERN = r"^[a-z][a-z0-9_-]*$"

# Keys are validated (and folded) by the compile step, which can point at the key;
# the patterns here only feed the JSON Schema, for editors.
TableKey = Annotated[str, WithJsonSchema({"type": "string", "pattern": TABLE_KEY_PATTERN})]
ColumnKey = Annotated[str, WithJsonSchema({"type": "string", "pattern": IDENT_KEY_PATTERN})]
RoleKey = ColumnKey
ReadKey = Annotated[str, WithJsonSchema({"type": "string", "pattern": READ_KEY_PATTERN})]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class ColumnPolicy(BaseModel):
    """How one column is protected."""

    model_config = _STRICT

    encrypt: bool = Field(
        default=True,
        description="Store the value as an AES-256-GCM envelope (reversible for roles allowed "
        "to read it). Defaults to false when hash_only is true.",
    )
    index: IndexKind | None = Field(
        default=None,
        description="Blind index kind. 'exact': a keyed HMAC of the normalized value is stored "
        "as a prefix, so equality lookups, joins and uniqueness work. Leaks equality: equal "
        "plaintexts have equal index values.",
    )
    normalize: Normalize = Field(
        default="none",
        description="Normalization before indexing (email: trim + lowercase; phone: digits, "
        "E.164). Also chooses the mask shape.",
    )
    join_group: str | None = Field(
        default=None,
        max_length=63,
        json_schema_extra={"pattern": JOIN_GROUP_PATTERN},
        description="Columns in one join group share one index key, so equality joins between "
        "them work. Requires index: exact; members must use the same normalize.",
    )
    hash_only: bool = Field(
        default=False,
        description="Store only the blind index, no envelope: irreversible pseudonymization. "
        "Requires index: exact; implies encrypt: false.",
    )
    key_version: int = Field(
        default=1,
        ge=1,
        le=MAX_KEY_VERSION,
        description="Version of the column key used for new writes (older versions still "
        "decrypt). Bump it to rotate.",
    )

    @field_validator("join_group")
    @classmethod
    def _check_join_group(cls, value: str | None) -> str | None:
        if value is not None and re.match(JOIN_GROUP_PATTERN, value) is None:
            raise PydanticCustomError(
                "invalid_join_group",
                "join group names are lowercase letters, digits, '_' and '-', starting with "
                "a letter (got '{value}')",
                {"value": value},
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _hash_only_implies_no_envelope(cls, data: Any) -> Any:
        # Done before validation so that `hash_only: true` alone is a complete column
        # policy, while an explicit `encrypt: true` next to it is still reported.
        if isinstance(data, dict) and data.get("hash_only") is True and "encrypt" not in data:
            return {**data, "encrypt": False}
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> ColumnPolicy:
        if self.hash_only:
            if self.encrypt:
                raise PydanticCustomError(
                    "invalid_combination",
                    "hash_only: true stores no envelope, so it cannot be combined with "
                    "encrypt: true (drop 'encrypt')",
                )
            if self.index is None:
                raise PydanticCustomError(
                    "invalid_combination",
                    "hash_only: true requires index: exact (the stored value is the index)",
                )
        elif not self.encrypt:
            raise PydanticCustomError(
                "invalid_combination",
                "encrypt: false leaves the column unprotected; remove the column from the "
                "policy, or set hash_only: true (with index: exact) for irreversible "
                "pseudonymization",
            )
        if self.join_group is not None and self.index is None:
            raise PydanticCustomError(
                "invalid_combination",
                "join_group requires index: exact (a join group shares a blind index key)",
            )
        return self


def _read_form(value: Any) -> str:
    return READ_MAP_TAG if isinstance(value, dict) else READ_ONE_TAG


ReadRule = Annotated[
    Annotated[Decision, Tag(READ_ONE_TAG)] | Annotated[dict[ReadKey, Decision], Tag(READ_MAP_TAG)],
    Discriminator(_read_form),
]


class RolePolicy(BaseModel):
    """What members of one PostgreSQL role may read."""

    model_config = _STRICT

    read: ReadRule = Field(
        description="One decision for every protected column, or a mapping from "
        "'table.column', 'schema.table.column', 'table.*' or 'schema.table.*' to a decision, "
        "with an optional 'default' for columns not listed. Inside one role the most specific "
        "entry wins; across the roles of a user the most permissive decision wins.",
    )


class Guards(BaseModel):
    """Statement-level limits applied to statements that touch PII."""

    model_config = _STRICT

    unbounded_select: Literal["allow", "deny"] = Field(
        default="deny",
        description="Refuse a SELECT that reads PII columns with neither WHERE nor LIMIT.",
    )
    max_pii_rows: int | None = Field(
        default=1000,
        ge=1,
        description="Most values of one protected column one statement may return (rows carrying PII, as a rule); null for no limit.",
    )


AUDIT_SINK_PATTERN = r"^(?:file:.+|stdout:?|stderr:?|postgres(?:ql)?://.+)$"


class Audit(BaseModel):
    """Where and what to audit. Only the shape is checked here; the audit package owns meaning."""

    model_config = _STRICT

    enabled: bool = Field(
        default=True,
        description="Write the audit trail. On by default; turning it off is for benchmarks and "
        "throwaway setups, never for data a data protection officer must answer for.",
    )
    statements: Literal["pii", "writes", "all"] = Field(
        default="pii",
        description="Which statements produce audit events: those touching PII, all writes "
        "plus PII reads, or every statement.",
    )
    sink: str = Field(
        default="file:pgcloak-audit.jsonl",
        json_schema_extra={"pattern": AUDIT_SINK_PATTERN},
        description="Destination: 'file:<path>' (JSON lines; a relative path is in pgcloak's "
        "working directory, not the policy file's; with several workers each writes "
        "'<name>.w<id><suffix>'), 'stdout', 'stderr', or a PostgreSQL table "
        "'postgresql://user@host:port/db?table=pgcloak_audit' (keep the password out of the "
        "policy: PGPASSWORD or ~/.pgpass work).",
    )
    queue_size: int = Field(
        default=10000,
        ge=1,
        description="Events buffered between the proxy and the sink.",
    )
    on_full: Literal["block", "drop"] = Field(
        default="block",
        description="When the queue is full: block the statement (no event lost) or drop "
        "the event (counted in metrics, and a gap record in the trail says how many).",
    )
    on_audit_failure: Literal["allow", "refuse"] = Field(
        default="refuse",
        description="When the sink fails: refuse statements that would need an event "
        "(fail closed) or let them run.",
    )
    fsync: Literal["always", "interval", "never"] = Field(
        default="interval",
        description="How often a file sink is fsynced: after every write, every "
        "fsync_interval seconds, or never (left to the OS).",
    )
    fsync_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between fsyncs of a file sink with fsync: interval.",
    )
    seal_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between periodic seal records (seals are also written at "
        "rotation and on clean shutdown).",
    )
    rotate_bytes: int | None = Field(
        default=100 * 1024 * 1024,
        ge=1,
        description="Rotate a file sink when it reaches this size; null: never by size.",
    )
    rotate_interval: float | None = Field(
        default=86400.0,
        gt=0,
        description="Rotate a file sink after this many seconds; null: never by time.",
    )
    batch_size: int = Field(
        default=1000,
        ge=1,
        description="Most events written to the sink at once (one COPY for a PostgreSQL sink).",
    )
    spill_dir: str | None = Field(
        default=None,
        min_length=1,
        description="Directory of the spill file that holds events while the sink fails "
        "(a relative one is in the working directory). Default: next to a file sink; for "
        "other sinks <tmp>/pgcloak-audit-spill.",
    )
    spill_max_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="Largest spill file; when it is full the queue fills and on_full applies.",
    )

    @field_validator("sink")
    @classmethod
    def _check_sink(cls, value: str) -> str:
        if re.match(AUDIT_SINK_PATTERN, value) is None:
            # Never echo the value: a mistyped DSN may carry a password.
            raise PydanticCustomError(
                "invalid_sink",
                "audit sink must be 'file:<path>', 'stdout', 'stderr' or "
                "'postgresql://user@host:port/db?table=name'",
            )
        return value


class PolicyModel(BaseModel):
    """A pgcloak policy document: which columns are protected and who may read them."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="pgcloak policy",
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://pgcloak.dev/policy.schema.json",
        },
    )

    version: Literal[1] = Field(description="Policy format version.")
    tables: dict[TableKey, dict[ColumnKey, ColumnPolicy]] = Field(
        default_factory=dict,
        description="Protected columns by table. Keys are 'table' (schema public) or "
        "'schema.table'; names fold to lowercase as unquoted SQL identifiers do, "
        "double-quote a name to keep its case.",
    )
    default_read: Decision = Field(
        default="deny",
        description="What every role gets, like a grant to PUBLIC: a role entry can only "
        "make access more permissive than this.",
    )
    roles: dict[RoleKey, RolePolicy] = Field(
        default_factory=dict,
        description="Read rules by PostgreSQL role. A user gets the most permissive decision "
        "of its own role, the roles it is a member of, and default_read.",
    )
    guards: Guards = Field(default_factory=Guards, description=Guards.__doc__)
    audit: Audit = Field(default_factory=Audit, description=Audit.__doc__)
