"""The DDL a policy's protected columns need in PostgreSQL (pure: text out).

Per protected column: the ``text`` type (stored values are longer than the plaintext),
an expression index on the blind-index prefix for lookups (unique on request), and a
``CHECK`` constraint that holds the column to pgcloak's stored forms, so that a write
pgcloak never sees (an updatable view, a function, a trigger, a direct connection)
fails instead of storing plaintext. ``pgcloak policy ddl`` prints it; the demo runs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Set

from pgcloak.crypto.blind_index import INDEX_LENGTH, stored_pattern
from pgcloak.policy.compiled import Policy
from pgcloak.policy.names import quote_ident as q

__all__ = ["object_name", "policy_ddl"]

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
