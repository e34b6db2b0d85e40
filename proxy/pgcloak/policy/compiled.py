"""A validated policy compiled into lookup tables.

The SQL planner and the result path ask the policy questions for every statement
and every protected value, so all answers are computed once here, at load time:
the lookups below are dictionary hits, never string parsing.

Read decisions
--------------
* ``default_read`` is what every role gets, like a grant to ``PUBLIC``.
* Inside one role entry the most specific rule wins: ``schema.table.column``, then
  ``schema.table.*``, then the entry's ``default`` (or its single decision).
* Across the roles of a user (its own role and every role it is a member of) the most
  permissive decision wins, ``reveal`` > ``mask`` > ``deny``, the way PostgreSQL
  privileges add up. Roles not listed in the policy contribute only ``default_read``.
* A rule stricter than ``default_read`` could never take effect, so it is refused at
  load time instead of silently doing nothing.
* A key id the policy does not list (say, values written before a column was removed
  from the policy) is decided by the table wildcard or the role defaults.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

from pgcloak.policy.errors import Loc, LocatedProblem, PolicyInvalid
from pgcloak.policy.model import Audit, ColumnPolicy, Decision, Guards, PolicyModel, RolePolicy
from pgcloak.policy.names import (
    DEFAULT_SCHEMA,
    InvalidName,
    parse_single_name,
    parse_table_name,
    quote_ident,
    split_identifiers,
)

_DECISIONS: Final[tuple[Decision, ...]] = ("deny", "mask", "reveal")
_RANK: Final[Mapping[str, int]] = {d: i for i, d in enumerate(_DECISIONS)}
_EMPTY: Final[Mapping[str, ColumnPolicy]] = MappingProxyType({})
_VIEW_CACHE_MAX = 1024


class _RoleRule:
    """One role's read rules, by specificity, as decision ranks."""

    __slots__ = ("by_key", "by_table", "default")

    def __init__(self) -> None:
        self.by_key: dict[str, int] = {}
        self.by_table: dict[str, int] = {}
        self.default: int | None = None

    def rank(self, key_id: str, table: str) -> int | None:
        found = self.by_key.get(key_id)
        if found is None:
            found = self.by_table.get(table, self.default)
        return found


class ReadView:
    """Read decisions for one set of roles; compute once per session and reuse."""

    __slots__ = ("_by_key", "_by_table", "_default", "reveals_all")

    def __init__(
        self, by_key: dict[str, Decision], by_table: dict[str, Decision], default: Decision
    ) -> None:
        self._by_key = by_key
        self._by_table = by_table
        self._default = default
        #: Every value is revealed: the result path then needs no per-value decision.
        self.reveals_all = default == "reveal" and all(
            d == "reveal" for d in (*by_key.values(), *by_table.values())
        )

    def decision(self, key_id: str) -> Decision:
        """``reveal``, ``mask`` or ``deny`` for values encrypted under ``key_id``."""
        found = self._by_key.get(key_id)
        if found is not None:
            return found
        return self._by_table.get(key_id.rpartition(".")[0], self._default)


class Policy:
    """A loaded, validated policy. Immutable; share it between sessions and threads."""

    __slots__ = (
        "_beyond_public",
        "_by_key_id",
        "_columns",
        "_index_key_id",
        "_key_id",
        "_prefilter",
        "_protected",
        "_protected_names",
        "_protected_schemas",
        "_role_rules",
        "_views",
        "audit",
        "default_read",
        "fingerprint",
        "guards",
        "model",
        "source",
    )

    model: PolicyModel
    """The policy with every name in canonical form (re-parsing it gives the same policy)."""
    source: str
    fingerprint: str
    """sha256 (hex) of the canonical policy: equal for equivalent files, to tell them apart in logs."""
    guards: Guards
    audit: Audit
    default_read: Decision

    def __init__(self, model: PolicyModel, *, source: str = "<policy>") -> None:
        """Compile ``model``; raises :class:`PolicyInvalid` listing every problem found."""
        problems: list[LocatedProblem] = []
        tables = _compile_tables(model, problems)
        roles = _compile_roles(model, tables, problems)
        if problems:
            raise PolicyInvalid(problems)

        self.source = source
        self.guards = model.guards
        self.audit = model.audit
        self.default_read = model.default_read
        self.model = _canonical_model(model, tables, roles)
        canonical = json.dumps(
            self.model.model_dump(mode="json"),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        self.fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()

        self._columns: dict[str, Mapping[str, ColumnPolicy]] = {}
        self._key_id: dict[tuple[str, str], str] = {}
        self._index_key_id: dict[tuple[str, str], str] = {}
        self._by_key_id: dict[str, ColumnPolicy] = {}
        for qualified, cols in tables.items():
            schema, _, table = qualified.partition(".")
            names = [qualified, table] if schema == DEFAULT_SCHEMA else [qualified]
            frozen = MappingProxyType(dict(cols))
            for name in names:
                self._columns[name] = frozen
                for column, policy in cols.items():
                    key_id = f"{qualified}.{column}"
                    self._key_id[(name, column)] = key_id
                    if policy.index is not None:
                        self._index_key_id[(name, column)] = policy.join_group or key_id
            for column, policy in cols.items():
                self._by_key_id[f"{qualified}.{column}"] = policy
        self._protected = frozenset(tables)
        self._protected_schemas = frozenset(q.partition(".")[0] for q in tables)
        self._protected_names = frozenset(q.partition(".")[2] for q in tables)
        self._beyond_public = frozenset(
            q.partition(".")[2] for q in tables if q.partition(".")[0] != DEFAULT_SCHEMA
        )
        prefilter: set[str] = set()
        for qualified in tables:
            bare = qualified.partition(".")[2].lower()
            prefilter.add(bare)
            # A quoted name as it appears in SQL text: "a""b" for a"b.
            prefilter.add(bare.replace('"', '""'))
        self._prefilter = frozenset(prefilter)
        self._role_rules = {name: rule for name, (rule, _raw) in roles.items()}
        self._views: dict[frozenset[str], ReadView] = {}

    def __repr__(self) -> str:
        return f"<Policy {self.source} {self.fingerprint[:12]}>"

    # -- tables and columns ---------------------------------------------------------

    def protected_tables(self) -> frozenset[str]:
        """Qualified canonical names (``public.users``) of tables with protected columns."""
        return self._protected

    def protected_schemas(self) -> frozenset[str]:
        """The schemas of :meth:`protected_tables`."""
        return self._protected_schemas

    def protected_names(self) -> frozenset[str]:
        """The table names of :meth:`protected_tables`, without their schemas."""
        return self._protected_names

    def names_protected_beyond_public(self) -> frozenset[str]:
        """Table names the policy protects in a schema other than ``public``: which table
        an unqualified one means depends on the search_path."""
        return self._beyond_public

    def table_names_for_prefilter(self) -> frozenset[str]:
        """Lowercase bare table names, for a substring test on lowercased SQL text.

        Statement text containing none of these names cannot touch a protected table,
        with one exception the caller must handle: a ``U&"..."`` identifier can spell a
        name with escapes, so text containing ``u&`` must be parsed too.
        """
        return self._prefilter

    def column(self, table: str, column: str) -> ColumnPolicy | None:
        """The policy of a column, or None when it is not protected.

        ``table`` is ``schema.table`` or a bare table name (schema ``public``, as in the
        policy file), both in canonical form: what PostgreSQL stores in the catalog,
        i.e. unquoted identifiers already folded to lowercase.
        """
        return self._columns.get(table, _EMPTY).get(column)

    def columns_of(self, table: str) -> Mapping[str, ColumnPolicy]:
        """Protected columns of ``table`` (read-only; empty when the table is not protected)."""
        return self._columns.get(table, _EMPTY)

    def key_id(self, table: str, column: str) -> str:
        """Key id of a protected column (``public.users.email``): names the envelope key.

        Raises KeyError for a column the policy does not protect.
        """
        try:
            return self._key_id[(table, column)]
        except KeyError:
            raise KeyError(f"{table}.{column} is not a protected column") from None

    def index_key_id(self, table: str, column: str) -> str:
        """Id of the blind index key: the join group name if any, else the key id.

        Join group names never contain a dot and key ids always do, so the two never
        collide. Raises KeyError for a column without a blind index.
        """
        try:
            return self._index_key_id[(table, column)]
        except KeyError:
            raise KeyError(f"{table}.{column} has no blind index") from None

    def column_for_key_id(self, key_id: str) -> ColumnPolicy | None:
        """The column policy behind an envelope's key id (to pick a mask shape)."""
        return self._by_key_id.get(key_id)

    # -- reading --------------------------------------------------------------------

    def read_view(self, roles: Iterable[str]) -> ReadView:
        """Decisions for a user holding ``roles`` (its role plus the roles it is a member of).

        Cached per distinct set of listed roles, so calling it per statement is cheap.
        """
        if isinstance(roles, str):  # a lone role name is a common slip; don't iterate chars
            roles = (roles,)
        listed = frozenset(r for r in roles if r in self._role_rules)
        view = self._views.get(listed)
        if view is None:
            view = self._build_view(listed)
            if len(self._views) >= _VIEW_CACHE_MAX:
                self._views.clear()
            self._views[listed] = view
        return view

    @property
    def nobody_reads(self) -> bool:
        """Protected columns, ``default_read: deny`` and no role listed: every read of a
        protected value is refused (safe, and almost always a forgotten ``roles:``)."""
        return bool(self._protected) and self.default_read == "deny" and not self._role_rules

    def read_decision(self, roles: Iterable[str], key_id: str) -> Decision:
        """``reveal``, ``mask`` or ``deny``: the most permissive the roles allow (see module doc)."""
        return self.read_view(roles).decision(key_id)

    def _build_view(self, listed: frozenset[str]) -> ReadView:
        rules = [self._role_rules[name] for name in sorted(listed)]
        floor = _RANK[self.default_read]

        def combine(key_id: str, table: str) -> Decision:
            best = floor
            for rule in rules:
                rank = rule.rank(key_id, table)
                if rank is not None and rank > best:
                    best = rank
            return _DECISIONS[best]

        by_key = {key_id: combine(key_id, key_id.rpartition(".")[0]) for key_id in self._by_key_id}
        tables = {t for rule in rules for t in rule.by_table}
        by_table = {t: combine("", t) for t in tables}
        default = max([floor, *(r.default for r in rules if r.default is not None)])
        return ReadView(by_key, by_table, _DECISIONS[default])


# -- compile steps ------------------------------------------------------------------


def _compile_tables(
    model: PolicyModel, problems: list[LocatedProblem]
) -> dict[str, dict[str, ColumnPolicy]]:
    """Canonical ``schema.table`` -> canonical column -> policy, checking names and groups."""
    tables: dict[str, dict[str, ColumnPolicy]] = {}
    seen_tables: dict[str, str] = {}
    # join group -> (normalize, key id of the first member)
    groups: dict[str, tuple[str, str]] = {}
    for raw_table, raw_columns in model.tables.items():
        loc: Loc = ("tables", raw_table)
        try:
            schema, table = parse_table_name(raw_table)
        except InvalidName as exc:
            problems.append(LocatedProblem(loc, str(exc), at_key=True))
            continue
        qualified = f"{schema}.{table}"
        if qualified in seen_tables:
            problems.append(
                LocatedProblem(
                    loc,
                    f"{raw_table!r} is table {qualified}, already listed as "
                    f"{seen_tables[qualified]!r}",
                    at_key=True,
                )
            )
            continue
        seen_tables[qualified] = raw_table
        if not raw_columns:
            problems.append(LocatedProblem(loc, "a protected table needs at least one column"))
        columns: dict[str, ColumnPolicy] = {}
        seen_columns: dict[str, str] = {}
        for raw_column, policy in raw_columns.items():
            cloc = (*loc, raw_column)
            try:
                column = parse_single_name(raw_column, what="column")
            except InvalidName as exc:
                problems.append(LocatedProblem(cloc, str(exc), at_key=True))
                continue
            if column in seen_columns:
                problems.append(
                    LocatedProblem(
                        cloc,
                        f"{raw_column!r} is column {column}, already listed as "
                        f"{seen_columns[column]!r} (unquoted names fold to lowercase)",
                        at_key=True,
                    )
                )
                continue
            seen_columns[column] = raw_column
            columns[column] = policy
            key_id = f"{qualified}.{column}"
            if policy.join_group is not None:
                first = groups.setdefault(policy.join_group, (policy.normalize, key_id))
                if first[0] != policy.normalize:
                    problems.append(
                        LocatedProblem(
                            (*cloc, "join_group"),
                            f"join group {policy.join_group!r} mixes normalize "
                            f"{policy.normalize!r} here with {first[0]!r} on {first[1]}; "
                            "equal values would get different index values",
                        )
                    )
        tables[qualified] = columns
    return tables


def _compile_roles(
    model: PolicyModel,
    tables: Mapping[str, Mapping[str, ColumnPolicy]],
    problems: list[LocatedProblem],
) -> dict[str, tuple[_RoleRule, RolePolicy]]:
    """Canonical role name -> (rule, role policy with canonical read keys)."""
    floor = _RANK[model.default_read]
    roles: dict[str, tuple[_RoleRule, RolePolicy]] = {}
    seen: dict[str, str] = {}

    def check_floor(loc: Loc, decision: Decision) -> None:
        if _RANK[decision] < floor:
            problems.append(
                LocatedProblem(
                    loc,
                    f"{decision!r} is stricter than default_read {model.default_read!r} and "
                    "would never apply (decisions combine most-permissive-wins, like "
                    "PostgreSQL grants); lower default_read instead",
                )
            )

    for raw_role, role_policy in model.roles.items():
        loc: Loc = ("roles", raw_role)
        try:
            role = parse_single_name(raw_role, what="role")
        except InvalidName as exc:
            problems.append(LocatedProblem(loc, str(exc), at_key=True))
            continue
        if role == "public":
            problems.append(
                LocatedProblem(
                    loc,
                    "'public' is not a role; use default_read for what every role gets",
                    at_key=True,
                )
            )
            continue
        if role in seen:
            problems.append(
                LocatedProblem(
                    loc,
                    f"{raw_role!r} is role {role}, already listed as {seen[role]!r}",
                    at_key=True,
                )
            )
            continue
        seen[role] = raw_role
        rule = _RoleRule()
        read = role_policy.read
        rloc: Loc = (*loc, "read")
        if isinstance(read, str):
            check_floor(rloc, read)
            rule.default = _RANK[read]
            roles[role] = (rule, role_policy)
            continue
        canonical: dict[str, Decision] = {}
        for raw_key, decision in read.items():
            kloc: Loc = (*rloc, raw_key)
            check_floor(kloc, decision)
            try:
                target = _resolve_read_key(raw_key, tables)
            except InvalidName as exc:
                problems.append(LocatedProblem(kloc, str(exc), at_key=True))
                continue
            if target in canonical:
                problems.append(
                    LocatedProblem(kloc, f"{target} is listed twice for this role", at_key=True)
                )
                continue
            canonical[target] = decision
            if target == "default":
                rule.default = _RANK[decision]
            elif target.endswith(".*"):
                rule.by_table[target[:-2]] = _RANK[decision]
            else:
                rule.by_key[target] = _RANK[decision]
        roles[role] = (rule, RolePolicy(read=_quote_read_keys(canonical)))
    return roles


def _resolve_read_key(raw: str, tables: Mapping[str, Mapping[str, ColumnPolicy]]) -> str:
    """``users.email`` -> ``public.users.email``; ``users.*`` -> ``public.users.*``."""
    if raw == "default":
        return raw
    if raw.endswith(".*"):
        schema, table = parse_table_name(raw[:-2])
        qualified = f"{schema}.{table}"
        if qualified not in tables:
            raise InvalidName(f"{qualified} is not a protected table{_known(tables)}")
        return f"{qualified}.*"
    parts = split_identifiers(raw, what="column reference")
    if len(parts) == 2:
        schema, table, column = DEFAULT_SCHEMA, parts[0], parts[1]
    elif len(parts) == 3:
        schema, table, column = parts
    else:
        raise InvalidName(
            f"{raw!r} must be 'table.column', 'schema.table.column', 'table.*', "
            "'schema.table.*' or 'default'"
        )
    qualified = f"{schema}.{table}"
    columns = tables.get(qualified)
    if columns is None:
        raise InvalidName(f"{qualified} is not a protected table{_known(tables)}")
    if column not in columns:
        raise InvalidName(
            f"{qualified}.{column} is not a protected column (protected columns of "
            f"{qualified}: {', '.join(sorted(columns))})"
        )
    return f"{qualified}.{column}"


def _known(tables: Mapping[str, object]) -> str:
    if not tables:
        return " (the policy protects no tables)"
    return f" (protected tables: {', '.join(sorted(tables))})"


def _quote_read_keys(canonical: Mapping[str, Decision]) -> dict[str, Decision]:
    out: dict[str, Decision] = {}
    for key, decision in canonical.items():
        if key == "default":
            out[key] = decision
        elif key.endswith(".*"):
            out[_quote_dotted(key[:-2]) + ".*"] = decision
        else:
            out[_quote_dotted(key)] = decision
    return out


def _quote_dotted(canonical: str) -> str:
    return ".".join(quote_ident(part) for part in canonical.split("."))


def _canonical_model(
    model: PolicyModel,
    tables: Mapping[str, Mapping[str, ColumnPolicy]],
    roles: Mapping[str, tuple[_RoleRule, RolePolicy]],
) -> PolicyModel:
    """The same policy with every name spelled canonically (and re-parseable)."""
    return PolicyModel(
        version=model.version,
        tables={
            _quote_dotted(qualified): {quote_ident(c): p for c, p in cols.items()}
            for qualified, cols in tables.items()
        },
        default_read=model.default_read,
        roles={quote_ident(name): policy for name, (_rule, policy) in roles.items()},
        guards=model.guards,
        audit=model.audit,
    )
