"""The DDL a policy's protected columns need in PostgreSQL (pure: text out).

Per protected column: the ``text`` type (stored values are longer than the plaintext),
for ``index: exact`` an expression index on the blind-index prefix for lookups (unique
on request), and a ``CHECK`` constraint that holds the column to pgcloak's stored forms,
so that a write pgcloak never sees (an updatable view, a function, a trigger, a direct
connection) fails instead of storing plaintext. ``pgcloak policy ddl`` prints it; the demo runs it;
``pgcloak policy check-db`` compares a database with it (:func:`judge`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Set
from dataclasses import dataclass

from pgcloak.crypto.blind_index import INDEX_LENGTH, stored_pattern
from pgcloak.policy.compiled import Policy
from pgcloak.policy.names import quote_ident as q

__all__ = ["ColumnFacts", "ColumnNeeds", "column_needs", "judge", "object_name", "policy_ddl"]

#: PostgreSQL's identifier length (NAMEDATALEN - 1): longer names are truncated, and two
#: names truncated alike would be one object (one column's check replacing another's).
_MAX_NAME_BYTES = 63


def object_name(table: str, column: str, suffix: str) -> str:
    """``<table>_<column><suffix>``; when that is longer than PostgreSQL keeps, cut short
    and made unique again by a hash of the whole."""
    name = f"{table}_{column}{suffix}"
    if len(name.encode("utf-8")) <= _MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    room = _MAX_NAME_BYTES - len(suffix.encode("utf-8")) - len(digest) - 1
    head = f"{table}_{column}".encode()[:room].decode("utf-8", "ignore")
    return f"{head}_{digest}{suffix}"


def policy_ddl(
    policy: Policy, unique: Set[tuple[str, ...]] = frozenset(), *, checks: bool = True
) -> Iterator[str]:
    """Lines of SQL (statements and ``--`` comments), table by table.

    ``unique``: columns whose index carries uniqueness, as ``(schema, table, column)`` or
    ``(table, column)`` in canonical form. ``checks``: the ciphertext-only constraints
    (leave them out while existing rows are still in clear).
    """
    for table in sorted(policy.protected_tables()):
        schema, _, name = table.partition(".")
        qualified = f"{q(schema)}.{q(name)}"
        yield f"-- {table}"
        for column, col in policy.columns_of(table).items():
            yield f"ALTER TABLE {qualified} ALTER COLUMN {q(column)} TYPE text;  -- stored values are longer than the plaintext"
            if col.index == "exact":
                is_unique = (schema, name, column) in unique or (name, column) in unique
                kind = "UNIQUE INDEX" if is_unique else "INDEX"
                yield (
                    f"CREATE {kind} IF NOT EXISTS {q(object_name(name, column, '_pgcloak_idx'))} "
                    f"ON {qualified} ((left({q(column)}, {INDEX_LENGTH})));"
                )
                if is_unique:
                    yield (
                        f"-- then drop the old UNIQUE constraint on {q(column)} (ciphertext is randomized, so it "
                        f"means nothing now), e.g.: ALTER TABLE {qualified} DROP CONSTRAINT {q(f'{name}_{column}_key')};"
                    )
            if checks:
                check = q(object_name(name, column, "_pgcloak_check"))
                pattern = stored_pattern(encrypt=col.encrypt, index=col.index == "exact")
                yield (
                    f"ALTER TABLE {qualified} DROP CONSTRAINT IF EXISTS {check}, ADD CONSTRAINT {check} "
                    f"CHECK ({q(column)} IS NULL OR {q(column)} ~ '{pattern}') NOT VALID;"
                    "  -- only ciphertext, whoever writes (a view, a function, a direct connection)"
                )
        yield ""


# -- checking a database against it ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ColumnNeeds:
    """What ``policy_ddl`` gives one protected column, to check a database against."""

    schema: str
    table: str
    column: str
    key_id: str
    check: str
    pattern: str
    index: str | None


@dataclass(frozen=True, slots=True)
class ColumnFacts:
    """What the catalog says of one protected column (None: not there)."""

    type: str | None
    check: str | None
    check_validated: bool
    index: str | None
    #: Values not in pgcloak's stored form (None: not counted).
    in_clear: int | None = None
    #: A non-NULL DEFAULT: it would be stored in clear (the CHECK refuses it).
    has_default: bool = False


def column_needs(policy: Policy) -> list[ColumnNeeds]:
    out = []
    for table in sorted(policy.protected_tables()):
        schema, _, name = table.partition(".")
        for column, col in policy.columns_of(table).items():
            out.append(
                ColumnNeeds(
                    schema,
                    name,
                    column,
                    policy.key_id(table, column),
                    object_name(name, column, "_pgcloak_check"),
                    stored_pattern(encrypt=col.encrypt, index=col.index == "exact"),
                    object_name(name, column, "_pgcloak_idx") if col.index == "exact" else None,
                )
            )
    return out


def judge(needs: ColumnNeeds, facts: ColumnFacts | None) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of one column: problems leave plaintext possible or lookups
    broken; notes are worth knowing."""
    if facts is None or facts.type is None:
        return [f"column {needs.schema}.{needs.table}.{needs.column} does not exist"], []
    problems: list[str] = []
    notes: list[str] = []
    if facts.type != "text":
        problems.append(f"type is {facts.type}, not text (stored values are longer than the plaintext)")
    if facts.check is None:
        problems.append(f"no CHECK constraint {needs.check}: a write around pgcloak can store plaintext")
    elif needs.pattern not in facts.check:
        problems.append(
            f"CHECK constraint {needs.check} is not pgcloak's (or an older pgcloak's: run the "
            f"output of `pgcloak policy ddl` again): {facts.check}"
        )
    elif not facts.check_validated:
        notes.append(f"CHECK constraint {needs.check} is NOT VALID: rows written before it are not checked")
    if needs.index is not None and facts.index is None:
        problems.append(f"no lookup index {needs.index}: WHERE {needs.column} = ... scans the table")
    if facts.has_default:
        problems.append("has a non-NULL DEFAULT: stored in clear, or refused by the CHECK, whenever an INSERT leaves the column out")
    if facts.in_clear:
        problems.append(f"{facts.in_clear} value(s) not in pgcloak's stored form (plaintext? `pgcloak backfill` encrypts them)")
    return problems, notes
