"""Analysis of one parsed statement: which values meet which protected columns.

The rule is fail-closed: every reference to a protected column must sit in a
context listed here (projection, equality with a value or with a column of the
same blind-index key, ``IN`` list, ``= ANY``, ``IS [NOT] NULL``, ``count()``, an
INSERT/UPDATE target). Any other use is refused with the column and the reason,
because it would either run against ciphertext (wrong answers) or write plaintext.

Name resolution has no catalog: an unqualified table name means the first schema of the
session's ``search_path`` under which the policy protects that name (``public`` when none
does; :func:`~pgcloak.sql.search_path.resolve_table`), and an unqualified column is attributed to the one
table of its scope that the policy protects under that name (two candidates: the
statement is refused and asked to qualify the column).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlglot import exp

from pgcloak.policy import ColumnPolicy, Policy
from pgcloak.sql.plan import ValueAction
from pgcloak.sql.search_path import (
    DEFAULT_PATH,
    bound_spelling,
    resolve_table,
    unknown_path_message,
)

NUM_BASE = 739_100_000_000_000
_STR_SLOT = re.compile(r"@pgcloak:(\d+)@\Z")
#: A literal's slot as an expression prints it (a string, or a number from NUM_BASE).
_PRINTED_SLOT = re.compile(r"'@pgcloak:\d+@'|\b7391\d{11}\b")

ValueRef = tuple[str, int]  # ("p", n) for $n, ("s", i) for literal slot i


def string_placeholder(slot: int) -> str:
    return f"'@pgcloak:{slot}@'"


def number_placeholder(slot: int) -> str:
    return str(NUM_BASE + slot)


@dataclass(frozen=True, slots=True)
class Origin:
    """A protected column a value or expression comes from."""

    table: str
    column: str
    policy: ColumnPolicy

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


class _Ambiguous:
    def __init__(self, names: list[str]) -> None:
        self.names = names


@dataclass
class Source:
    """A FROM item: a table (``table`` set) or a derived one (``cols``: name -> origin)."""

    table: str | None = None
    cols: dict[str, Origin | None] = field(default_factory=dict)
    #: A ``(VALUES ...) AS v(a, b)`` list: per column, the expression of each row.
    values: dict[str, list[exp.Expression]] = field(default_factory=dict)


@dataclass
class Analysis:
    """Everything found in one statement; the planner merges these."""

    kind: str = "other"
    actions: dict[ValueRef, ValueAction] = field(default_factory=dict)
    edits: list[tuple[int, int, str]] = field(default_factory=list)
    denials: list[str] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    touches: bool = False
    max_param: int = 0
    #: Refusals by the policy's guards (not by what ciphertext cannot do): SQLSTATE 42501.
    guard_denials: list[str] = field(default_factory=list)


def canon(ident: exp.Expression | str | None) -> str:
    """PostgreSQL folding: unquoted names to lowercase, quoted names as written."""
    if ident is None:
        return ""
    if isinstance(ident, str):
        return ident.lower()
    if isinstance(ident, exp.Identifier):
        name = str(ident.this)
        return name if ident.quoted else name.lower()
    return ident.name.lower()


#: PostgreSQL's limit: a Bind carries at most 65535 parameters.
MAX_PARAMETER = 65535


def parameter_number(digits: str) -> int | None:
    """``n`` of ``$n`` when it is within PostgreSQL's limit, else None (also for
    thousands of digits, which ``int()`` refuses). Past the limit no Bind can fill it
    (PostgreSQL refuses the statement): no slot, and no plan of that many parameters."""
    if not digits.isdigit() or len(digits) > 5:
        return None
    n = int(digits)
    return n if n <= MAX_PARAMETER else None


def value_ref(node: exp.Expression | None) -> ValueRef | None:
    """A parameter or literal slot, possibly in parentheses or cast; else None."""
    while isinstance(node, (exp.Paren, exp.Cast)):
        node = node.this
    if isinstance(node, exp.Parameter | exp.Placeholder):
        inner = node.this
        if isinstance(inner, exp.Literal) and not inner.is_string:
            n = parameter_number(str(inner.this))
            return None if n is None else ("p", n)
        return None
    if isinstance(node, exp.Literal):
        text = str(node.this)
        if node.is_string:
            m = _STR_SLOT.match(text)
            return ("s", int(m.group(1))) if m else None
        if text.isdigit() and int(text) >= NUM_BASE:
            return ("s", int(text) - NUM_BASE)
    return None


def _unparen(node: exp.Expression | None) -> exp.Expression | None:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _is_null(node: exp.Expression | None) -> bool:
    node = _unparen(node)
    while isinstance(node, exp.Cast):
        node = _unparen(node.this)
    return isinstance(node, exp.Null)


def _is_default(node: exp.Expression | None) -> bool:
    node = _unparen(node)
    return isinstance(node, exp.Var | exp.Column) and node.name.upper() == "DEFAULT" and not (
        isinstance(node, exp.Column) and (node.table or node.this.quoted)
    )


_SCOPE_TYPES = (exp.Select, exp.Update, exp.Delete, exp.Insert, exp.SetOperation, exp.Merge)
_RANGE = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Between)
_PATTERN = (exp.Like, exp.ILike, exp.RegexpLike, exp.RegexpILike, exp.SimilarTo)


class Analyzer:
    """Analyzes one statement tree (parsed from ``text``, positions in ``text``)."""

    def __init__(
        self,
        policy: Policy,
        index_length: int,
        text: str,
        search_path: tuple[str, ...] | None = DEFAULT_PATH,
    ) -> None:
        self.policy = policy
        self.search_path = search_path
        self.n = index_length
        self.text = text
        self.out = Analysis()
        self._scopes: dict[int, dict[str, Source]] = {}
        self._derived: dict[int, dict[str, Origin | None]] = {}
        self._in_progress: set[int] = set()
        #: node id -> the scopes above it, innermost first (see _scope_chain).
        self._chains: dict[int, tuple[exp.Expression, ...]] = {}
        #: How many places gave a value its action (see _shared_params).
        self._uses: dict[ValueRef, int] = {}

    # -- entry ----------------------------------------------------------------------

    def run(self, tree: exp.Expr) -> Analysis:
        self.out.kind = _kind_of(tree)
        for table in tree.find_all(exp.Table):
            q = self._table_name(table)
            if q is not None and not self._is_cte_name(table):
                self.out.tables.add(q)
                self._bind_schema(table, q)
                alias = table.args.get("alias")
                if isinstance(alias, exp.TableAlias) and alias.columns and self.policy.columns_of(q):
                    # users AS u(i, n, e): pgcloak would not know e is users.email (its
                    # lookups would go out in clear, its guards not apply).
                    self.deny(
                        f"column aliases on protected table {q} (AS alias(columns)) are not supported: "
                        "alias the columns in the select list instead"
                    )
        for node in tree.find_all(exp.Parameter, exp.Placeholder):
            ref = value_ref(node)
            if ref is not None:
                self.out.max_param = max(self.out.max_param, ref[1])
        if isinstance(tree, exp.Merge):
            self._merge(tree)
            return self.out
        for ins in tree.find_all(exp.Insert):
            self._insert(ins)
        for sel in tree.find_all(exp.Select):
            self._select_checks(sel)
        for col in list(tree.find_all(exp.Column)):
            self._column(col)
        for star in tree.find_all(exp.Star):
            self._star(star)
        if self.policy.guards.unbounded_select == "deny":
            self._unbounded_check(tree)
        self._shared_params(tree)
        return self.out

    def _shared_params(self, tree: exp.Expr) -> None:
        """A parameter with an action (encrypt, blind index) must not also be used where
        its value is wanted as sent (``email = $1 AND name = $1``): it is sent once, so one
        of the two would compare (or store, or return) the wrong thing."""
        if not any(ref[0] == "p" for ref in self.out.actions):
            return
        seen: dict[ValueRef, int] = {}
        for node in tree.find_all(exp.Parameter, exp.Placeholder):
            ref = value_ref(node)
            if ref is not None and ref in self.out.actions:
                seen[ref] = seen.get(ref, 0) + 1
        for ref, count in seen.items():
            if count > self._uses.get(ref, 0):
                action = self.out.actions[ref]
                self.deny(
                    f"${ref[1]} is used for protected column {action.table}.{action.column} and "
                    "elsewhere in the statement; use separate parameters"
                )

    def _unbounded_check(self, tree: exp.Expr) -> None:
        """guards.unbounded_select: refuse a SELECT that returns encrypted columns with no
        WHERE, LIMIT or FETCH anywhere in it (a dump of every row, most likely by mistake;
        guards.max_pii_rows is the hard cap on what one statement returns)."""
        if not isinstance(tree, exp.Select | exp.SetOperation | exp.Subquery):
            return
        if any(not _no_limit(node) for node in tree.find_all(exp.Where, exp.Limit, exp.Fetch)):
            return
        names: list[str] = []
        for sel in tree.find_all(exp.Select):
            node: exp.Expr = sel
            while node is not tree and isinstance(node.parent, exp.SetOperation | exp.Subquery | exp.Paren):
                node = node.parent
            if node is tree:  # its rows are the statement's result
                names += [n for n in self._randomized_outputs(sel) if n not in names]
        if names:
            self.out.guard_denials.append(
                f"SELECT of protected column{'s' if len(names) > 1 else ''} {', '.join(names)} "
                "with neither WHERE nor LIMIT: "
                "refused by the pgcloak policy (guards.unbounded_select: deny)"
            )

    def deny(self, message: str) -> None:
        if message not in self.out.denials:
            self.out.denials.append(message)

    # -- names and scopes ------------------------------------------------------------

    def _bind_schema(self, table: exp.Table, qualified: str) -> None:
        """Send an unqualified name the policy protects outside ``public`` qualified with
        the schema pgcloak resolved it to: should PostgreSQL's search_path differ from
        what pgcloak knows (a function changed it), the statement then reaches the table
        pgcloak encrypted for, or fails; it never stores plaintext in a protected table."""
        name = table.this
        if table.args.get("db") or not isinstance(name, exp.Identifier):
            return
        bare = canon(name)
        if bare not in self.policy.names_protected_beyond_public():
            return
        meta = name.meta
        if "start" not in meta or "end" not in meta:
            self.deny(f"internal: no source position for table {bare}; statement refused")
            return
        s, e = int(meta["start"]), int(meta["end"]) + 1
        self.out.edits.append((s, e, bound_spelling(qualified, bare, self.text[s:e])))

    def _table_name(self, table: exp.Table) -> str | None:
        if not isinstance(table.this, exp.Identifier):
            return None
        schema = canon(table.args.get("db"))
        name = canon(table.this)
        if schema:
            return f"{schema}.{name}"
        resolved = resolve_table(self.policy, self.search_path, name)
        if resolved is None:
            self.deny(unknown_path_message(name))
            return f"public.{name}"
        return resolved

    def _cte_map(self, node: exp.Expression) -> dict[str, exp.CTE]:
        """CTEs visible at ``node``: those of every enclosing WITH (inner ones win)."""
        ctes: dict[str, exp.CTE] = {}
        chain: list[exp.Expr] = []
        cur: exp.Expr | None = node
        while cur is not None:
            chain.append(cur)
            cur = cur.parent
        for anc in reversed(chain):
            with_ = anc.args.get("with_") or anc.args.get("with")
            if isinstance(with_, exp.With):
                for cte in with_.expressions:
                    alias = cte.args.get("alias") if isinstance(cte, exp.CTE) else None
                    if isinstance(cte, exp.CTE) and isinstance(alias, exp.TableAlias):
                        ctes[canon(alias.this)] = cte
        return ctes

    def _is_cte_name(self, table: exp.Table) -> bool:
        if table.args.get("db"):
            return False
        return canon(table.this) in self._cte_map(table)

    def _source_of_table(self, table: exp.Table) -> Source:
        if not table.args.get("db"):
            cte = self._cte_map(table).get(canon(table.this))
            if cte is not None and cte.this is not table:
                return Source(cols=self._outputs(cte.this, cte))
        q = self._table_name(table)
        return Source(table=q)

    def _alias_of(self, node: exp.Expression, default: str) -> str:
        alias = node.args.get("alias")
        if isinstance(alias, exp.TableAlias) and alias.this is not None:
            return canon(alias.this)
        return default

    def _from_item(self, item: object, sources: dict[str, Source]) -> None:
        if not isinstance(item, exp.Expression):
            return
        if isinstance(item, exp.From | exp.Join):
            self._from_item(item.this, sources)
            return
        if isinstance(item, exp.Table):
            if isinstance(item.this, exp.Identifier):
                src = self._source_of_table(item)
                sources[self._alias_of(item, canon(item.this))] = src
                if src.table is not None and not item.args.get("alias"):
                    sources[src.table] = src  # public.users.email
            else:
                # A function in FROM (generate_series(1, 3) g, json_to_record(...) AS
                # t(a int, email text)): columns pgcloak does not know, never protected,
                # and a name inside may be one of them (see _resolve).
                sources[self._alias_of(item, f"#item{id(item)}")] = Source()
            return
        if isinstance(item, exp.Subquery):
            cols = self._outputs(item.this, item)
            sources[self._alias_of(item, f"#sub{id(item)}")] = Source(cols=cols)
            return
        if isinstance(item, exp.Values):
            # its columns are never protected, but INSERT ... SELECT v.a FROM (VALUES ($1))
            # v(a) (SQLAlchemy's insertmanyvalues) stores the values of the list
            sources[self._alias_of(item, f"#item{id(item)}")] = Source(values=_values_columns(item))
            return
        # functions, lateral: unknown columns, never protected
        sources[self._alias_of(item, f"#item{id(item)}")] = Source()

    def _sources(self, scope: exp.Expression) -> dict[str, Source]:
        found = self._scopes.get(id(scope))
        if found is not None:
            return found
        sources: dict[str, Source] = {}
        self._scopes[id(scope)] = sources
        if isinstance(scope, exp.Select):
            self._from_item(scope.args.get("from_") or scope.args.get("from"), sources)
            for join in scope.args.get("joins") or ():
                self._from_item(join, sources)
        elif isinstance(scope, exp.Update | exp.Delete):
            self._from_item(scope.this, sources)
            extra = scope.args.get("from_") or scope.args.get("from") or scope.args.get("using")
            if isinstance(extra, list):
                for item in extra:
                    self._from_item(item, sources)
            else:
                self._from_item(extra, sources)
            for join in scope.args.get("joins") or ():
                self._from_item(join, sources)
        elif isinstance(scope, exp.Insert):
            target = scope.this.this if isinstance(scope.this, exp.Schema) else scope.this
            if isinstance(target, exp.Table):
                self._from_item(target, sources)
                sources["excluded"] = Source(table=self._table_name(target))
        elif isinstance(scope, exp.SetOperation):
            sources[""] = Source(cols=self._outputs(scope, scope))
        return sources

    def _outputs(self, query: exp.Expression | None, key: exp.Expression) -> dict[str, Origin | None]:
        """Output columns of a derived table (subquery, CTE, RETURNING of a DML CTE)."""
        if query is None:
            return {}
        if id(key) in self._derived:
            return self._derived[id(key)]
        if id(key) in self._in_progress:  # WITH RECURSIVE referring to itself
            return {}
        self._in_progress.add(id(key))
        try:
            cols: dict[str, Origin | None] = {}
            starred: str | None = None
            q = _unparen(query)
            if isinstance(q, exp.Subquery):
                q = q.this
            projections: list[exp.Expression] = []
            scope: exp.Expression | None = None
            if isinstance(q, exp.SetOperation):
                cols = self._set_outputs(q)
            elif isinstance(q, exp.Select):
                projections, scope = list(q.expressions), q
            elif isinstance(q, exp.Insert | exp.Update | exp.Delete):
                ret = q.args.get("returning")
                projections = list(ret.expressions) if isinstance(ret, exp.Returning) else []
                scope = q
            for proj in projections:
                name = proj.alias_or_name
                inner = proj.this if isinstance(proj, exp.Alias) else proj
                if isinstance(inner, exp.Star) or (
                    isinstance(inner, exp.Column) and isinstance(inner.this, exp.Star)
                ):
                    if scope is not None:
                        for src in self._star_sources(inner, scope):
                            source_cols = self._source_columns(src)
                            if src.table is not None and source_cols:
                                starred = src.table  # its columns' order is the catalog's
                            cols.update(source_cols)
                    continue
                origin: Origin | None = None
                if isinstance(inner, exp.Column):
                    found = self._resolve(inner)
                    origin = found if isinstance(found, Origin) else None
                cols[canon(name) if isinstance(proj, exp.Alias) else canon(_ident_of(proj, name))] = origin
            alias = key.args.get("alias") if isinstance(key, exp.CTE | exp.Subquery) else None
            if isinstance(alias, exp.TableAlias) and alias.columns:
                if starred is not None:
                    # (SELECT * FROM users) AS s(a, b, c): which name is which column only
                    # the catalog knows; a lookup on one would go out in clear.
                    self.deny(
                        f"column aliases over SELECT * of protected table {starred} are not "
                        "supported: name the columns in the select list"
                    )
                renamed = list(cols.values())
                cols = {
                    canon(c): (renamed[i] if i < len(renamed) else None)
                    for i, c in enumerate(alias.columns)
                }
            self._derived[id(key)] = cols
            return cols
        finally:
            self._in_progress.discard(id(key))

    def _set_outputs(self, op: exp.SetOperation) -> dict[str, Origin | None]:
        """Output columns of UNION / INTERSECT / EXCEPT: named by the first branch, and a
        column is a protected column's stored form only if it is that in every branch
        (matched by position); else it may be anything (a plain value among them)."""
        branches: list[exp.Expression] = []
        pending: list[exp.Expression | None] = [op]
        while pending:
            node = _unparen(pending.pop())
            if isinstance(node, exp.Subquery):
                node = node.this
            if isinstance(node, exp.SetOperation):
                pending.extend((node.expression, node.this))  # popped left first
            elif node is not None:
                branches.append(node)
        outputs = [list(self._outputs(b, b).items()) for b in branches]
        if not outputs:
            return {}
        cols: dict[str, Origin | None] = {}
        for i, (name, origin) in enumerate(outputs[0]):
            for other in outputs[1:]:
                theirs = other[i][1] if i < len(other) else None
                if origin is not None and (theirs is None or theirs.name != origin.name):
                    origin = None
            cols[name] = origin
        return cols

    def _source_columns(self, src: Source) -> dict[str, Origin | None]:
        if src.table is not None:
            return {
                c: Origin(src.table, c, p) for c, p in self.policy.columns_of(src.table).items()
            }
        return dict(src.cols)

    def _star_sources(self, star: exp.Expression, scope: exp.Expression) -> list[Source]:
        sources = self._sources(scope)
        if isinstance(star, exp.Column) and star.table:
            src = sources.get(canon(star.args.get("table")))
            return [src] if src is not None else []
        seen: list[Source] = []
        for src in sources.values():
            if all(src is not s for s in seen):
                seen.append(src)
        return seen

    def _scope_chain(self, node: exp.Expression) -> tuple[exp.Expression, ...]:
        """The scopes whose FROM items a column at ``node`` may name, innermost first.

        Not the statement a WITH belongs to, for its CTEs' bodies (a CTE cannot see the
        FROM items of the query it is attached to); not the query whose FROM holds a
        subquery, for that subquery (it cannot see its siblings unless LATERAL, which
        pgcloak treats as opaque); not an INSERT's target, for the body of INSERT ...
        SELECT / VALUES (PostgreSQL resolves those in the body's own FROM, or fails).
        Memoized per node, so that a statement of thousands of terms (a long OR chain is
        as deep as it is long) costs linear time, not quadratic.
        """
        chains = self._chains
        path: list[exp.Expr] = []
        cur: exp.Expr | None = node
        while cur is not None and id(cur) not in chains:
            path.append(cur)
            cur = cur.parent
        above: tuple[exp.Expression, ...] = chains[id(cur)] if cur is not None else ()
        for child in reversed(path):
            parent = child.parent
            if isinstance(parent, _SCOPE_TYPES) and not (
                (isinstance(parent, exp.Insert) and child is parent.args.get("expression"))
                or child is parent.args.get("with_")
                or child is parent.args.get("with")
            ):
                above = (parent, *above)
            elif (
                isinstance(child, exp.Subquery)
                and isinstance(parent, exp.From | exp.Join)
                and child is parent.this
                and above
                and above[0] is parent.parent
            ):
                above = above[1:]  # a subquery in FROM does not see its siblings (not LATERAL)
            chains[id(child)] = above
        return chains[id(node)]

    def _resolve(self, col: exp.Column) -> Origin | _Ambiguous | None:
        name = canon(col.this) if isinstance(col.this, exp.Identifier) else ""
        if not name:
            return None
        qual = canon(col.args.get("table")) if col.args.get("table") else ""
        if col.args.get("db"):
            qual = f"{canon(col.args.get('db'))}.{qual}"
        #: A FROM item of an inner scope that may have a plain column of that name: pgcloak
        #: knows only a table's protected columns, PostgreSQL resolves to the innermost.
        shadow: str | None = None
        for scope in self._scope_chain(col):
            sources = self._sources(scope)
            if qual:
                src = sources.get(qual)
                if src is None:
                    continue
                return self._lookup(src, name)
            candidates: list[Origin] = []
            plain_derived = False
            for key, src in sources.items():
                if key == "excluded" and isinstance(scope, exp.Insert):
                    continue  # only reachable qualified
                if src.table is None and name in src.cols:
                    origin = src.cols[name]
                    if origin is None:
                        plain_derived = True
                    else:
                        candidates.append(origin)
                elif src.table is None and name in src.values:
                    plain_derived = True  # a (VALUES ...) v(name) column: the list's values
                elif src.table is not None:
                    found = self._lookup(src, name)
                    if isinstance(found, Origin):
                        candidates.append(found)
            candidates = list({c.name: c for c in candidates}.values())
            if candidates and shadow is not None:
                return _Ambiguous([*(c.name for c in candidates), f"{shadow}.{name}"])
            if len(candidates) == 1 and not plain_derived:
                return candidates[0]
            if len(candidates) > 1:
                return _Ambiguous([c.name for c in candidates])
            if plain_derived:
                return None
            if shadow is None:
                # Any FROM item whose columns pgcloak may not all know: a table (only its
                # protected columns are known), a function, a derived table (its * of a
                # table). A VALUES list's columns are all known.
                shadow = next(
                    (
                        src.table or (key if not key.startswith("#") else "(a FROM item)")
                        for key, src in sources.items()
                        if key != "excluded" and not src.values
                    ),
                    None,
                )
        return None

    def _values_column(self, col: exp.Column) -> list[exp.Expression] | None:
        """The row expressions of a ``(VALUES ...)`` column that ``col`` names, if it does."""
        name = canon(col.this) if isinstance(col.this, exp.Identifier) else ""
        qual = canon(col.args.get("table")) if col.args.get("table") else ""
        if not name or col.args.get("db"):
            return None
        for scope in self._scope_chain(col):
            sources = self._sources(scope)
            if qual:
                src = sources.get(qual)
                if src is not None:
                    return src.values.get(name)
                continue
            found = [src.values[name] for src in sources.values() if name in src.values]
            if found:
                return found[0] if len(found) == 1 else None
        return None

    def _lookup(self, src: Source, name: str) -> Origin | None:
        if src.table is not None:
            pol = self.policy.column(src.table, name)
            return Origin(src.table, name, pol) if pol is not None else None
        return src.cols.get(name)

    # -- actions and edits ---------------------------------------------------------------

    def _action(self, kind: str, origin: Origin, *, array: bool = False) -> ValueAction:
        p = origin.policy
        has_index = p.index is not None
        return ValueAction(
            kind,  # type: ignore[arg-type]
            origin.table,
            origin.column,
            self.policy.key_id(origin.table, origin.column) if p.encrypt else None,
            self.policy.index_key_id(origin.table, origin.column) if has_index else None,
            p.normalize,
            p.encrypt,
            has_index,
            p.hash_only,
            array,
        )

    def _set(self, ref: ValueRef, action: ValueAction) -> None:
        self._uses[ref] = self._uses.get(ref, 0) + 1
        old = self.out.actions.get(ref)
        if old is not None and old != action:
            what = f"${ref[1]}" if ref[0] == "p" else "a literal"
            self.deny(
                f"{what} is used for both {old.table}.{old.column} ({old.kind}) and "
                f"{action.table}.{action.column} ({action.kind}); use separate parameters"
            )
            return
        self.out.actions[ref] = action

    def _wrap(self, col: exp.Column, origin: Origin, *, conflict: bool = False) -> None:
        """Compare on the blind-index prefix: ``col`` -> ``left(col, N)``."""
        if origin.policy.hash_only:
            return  # the stored value is the index itself
        span = _span(col)
        if span is None:
            self.deny(f"internal: no source position for {origin.name}; statement refused")
            return
        s, e = span
        inner = f"left({self.text[s:e]}, {self.n})"
        self.out.edits.append((s, e, f"({inner})" if conflict else inner))

    def _lookup_value(self, node: exp.Expression | None, origin: Origin, col: exp.Column) -> bool:
        """``col = node``: node must be a value or NULL. True when handled."""
        if _is_null(node):
            return True
        ref = value_ref(node)
        if ref is None:
            return False
        if not self._indexed(origin, "an equality lookup"):
            return True
        self._set(ref, self._action("lookup", origin))
        self._wrap(col, origin)
        return True

    def _indexed(self, origin: Origin, what: str) -> bool:
        if origin.policy.index is None:
            self.deny(
                f"{what} on {origin.name} is not possible: the column is encrypted without a "
                "blind index (add 'index: exact' to its policy)"
            )
            return False
        return True

    # -- per-node checks -------------------------------------------------------------------

    def _column(self, col: exp.Column) -> None:
        if isinstance(col.this, exp.Star):
            # u.* in a select list is expanded into columns (see _star); anywhere else
            # (concat(u.*), row_to_json(u.*)) it is the whole row as one value.
            if col.args.get("table") and not isinstance(col.parent, exp.Select | exp.Returning):
                self._whole_row(col, canon(col.args.get("table")))
            return
        is_target, found = self._set_target(col)
        if not is_target:
            found = self._resolve(col)
        if isinstance(found, _Ambiguous):
            self.deny(
                f"column {col.name} is ambiguous: it may be any of "
                f"{', '.join(sorted(set(found.names)))} (a protected column among them): qualify it with its table"
            )
            return
        if found is None:
            if not is_target and not col.args.get("table"):
                self._whole_row(col)
            return
        origin = found
        self.out.touches = True
        node: exp.Expr = col
        parent = col.parent
        while isinstance(parent, exp.Paren):
            node, parent = parent, parent.parent
        why = self._use(col, node, parent, origin)
        if why is not None:
            self.deny(f"{why} on protected column {origin.name} is not supported: {_reason(why)}")

    def _whole_row(self, col: exp.Column, name: str | None = None) -> None:
        """``SELECT u FROM users u``, ``row_to_json(u)``: a name that is no column but a
        FROM item is the whole row, as one composite value. Its encrypted values would
        come back as stored (only a column's own value can be decrypted), so it is
        refused; ``count(u)`` and ``u IS NULL`` return no value and pass."""
        if isinstance(col.parent, exp.Count | exp.Is):
            return
        if name is None:
            name = canon(col.this) if isinstance(col.this, exp.Identifier) else ""
        for scope in self._scope_chain(col):
            src = self._sources(scope).get(name)
            if src is None:
                continue
            encrypted = sorted(
                o.name for o in self._source_columns(src).values() if o is not None and not o.policy.hash_only
            )
            if encrypted:
                self.out.touches = True
                self.out.read.update(encrypted)
                self.deny(
                    f"a whole-row reference to {name} is not supported: its protected column"
                    f"{'s' if len(encrypted) > 1 else ''} {', '.join(encrypted)} would come back "
                    "encrypted; select the columns themselves"
                )
            return

    def _set_target(self, col: exp.Column) -> tuple[bool, Origin | _Ambiguous | None]:
        """SET col = ... in UPDATE or ON CONFLICT DO UPDATE: the target table's column."""
        parent = col.parent
        if not (isinstance(parent, exp.EQ) and parent.this is col):
            return False, None
        holder = parent.parent
        if isinstance(holder, exp.Update) and parent in holder.expressions:
            target = holder.this
        elif isinstance(holder, exp.OnConflict) and parent in holder.expressions:
            ins = holder.parent
            target = ins.this.this if isinstance(ins, exp.Insert) and isinstance(ins.this, exp.Schema) else (
                ins.this if isinstance(ins, exp.Insert) else None
            )
        else:
            return False, None
        if not isinstance(target, exp.Table):
            return False, None
        q = self._table_name(target)
        if q is None:
            return False, None
        pol = self.policy.column(q, canon(col.this))
        return True, (Origin(q, canon(col.this), pol) if pol is not None else None)

    def _use(
        self, col: exp.Column, node: exp.Expr, parent: exp.Expr | None, origin: Origin
    ) -> str | None:
        """Handle one reference in its context; return a reason when it is refused."""
        if parent is None:
            return "a bare reference"
        # projection (SELECT list, RETURNING)
        if (
            isinstance(parent, exp.Alias)
            and isinstance(parent.parent, exp.Select | exp.Returning)
            and parent in parent.parent.expressions
        ):
            self.out.read.add(origin.name)
            return None
        if isinstance(parent, exp.Select | exp.Returning) and node in parent.expressions:
            self.out.read.add(origin.name)
            return None
        if isinstance(parent, exp.Is):
            return None
        if isinstance(parent, exp.Count):
            return None
        if isinstance(parent, exp.Ordered) and isinstance(parent.parent, exp.OnConflict):
            if self._indexed(origin, "ON CONFLICT"):
                self._wrap(col, origin, conflict=True)
            return None
        if isinstance(parent, exp.EQ | exp.NEQ | exp.NullSafeEQ | exp.NullSafeNEQ):
            return self._comparison(col, node, parent, origin)
        if isinstance(parent, exp.In) and parent.this is node:
            if parent.args.get("query") is not None or parent.args.get("unnest") is not None:
                return "IN (subquery)"
            if not self._indexed(origin, "IN"):
                return None
            for item in parent.expressions:
                if _is_null(item):
                    continue
                ref = value_ref(item)
                if ref is None:
                    return f"IN with {_shown(item)}"
                self._set(ref, self._action("lookup", origin))
            self._wrap(col, origin)
            return None
        return _context_name(parent)

    def _comparison(
        self, col: exp.Column, node: exp.Expr, cmp: exp.Expr, origin: Origin
    ) -> str | None:
        holder = cmp.parent
        if cmp.this is node and (
            (isinstance(holder, exp.Update) and cmp in holder.expressions)
            or (isinstance(holder, exp.OnConflict) and cmp in holder.expressions)
        ):
            return self._store(cmp.expression, origin, "UPDATE SET")
        if cmp.expression is node and (
            (isinstance(holder, exp.Update) and cmp in holder.expressions)
            or (isinstance(holder, exp.OnConflict) and cmp in holder.expressions)
        ):
            return None  # the source of SET target = col, checked by _store
        other = cmp.expression if cmp.this is node else cmp.this
        other = _unparen(other)
        if isinstance(other, exp.Any | exp.All):
            inner = _unparen(other.this)
            if not self._indexed(origin, "= ANY"):
                return None
            ref = value_ref(inner)
            if ref is not None:
                self._set(ref, self._action("lookup", origin, array=True))
                self._wrap(col, origin)
                return None
            if isinstance(inner, exp.Array):
                for item in inner.expressions:
                    if _is_null(item):
                        continue
                    r = value_ref(item)
                    if r is None:
                        return f"ANY(ARRAY[...]) with {_shown(item)}"
                    self._set(r, self._action("lookup", origin))
                self._wrap(col, origin)
                return None
            return "ANY/ALL over a subquery or expression"
        if self._lookup_value(other, origin, col):
            return None
        if isinstance(other, exp.Column):
            found = self._resolve(other)
            if isinstance(found, Origin):
                if not (self._indexed(origin, "a join") and self._indexed(found, "a join")):
                    return None
                if self.policy.index_key_id(origin.table, origin.column) != self.policy.index_key_id(
                    found.table, found.column
                ):
                    return (
                        f"comparison with {found.name} (a different blind-index key; put both "
                        "columns in one join_group)"
                    )
                self._wrap(col, origin)
                return None
            if isinstance(found, _Ambiguous):
                return None  # reported when that column is visited
            return f"comparison with unprotected column {other.sql('postgres')}"
        return f"comparison with {_shown(other) if other is not None else 'nothing'}"

    def _store(self, value: exp.Expression | None, origin: Origin, where: str) -> str | None:
        """A value written into ``origin``: a parameter or literal (encrypted), NULL,
        DEFAULT, or the same protected column (copying its stored form)."""
        self.out.written.add(origin.name)
        self.out.touches = True
        if _is_null(value) or _is_default(value):
            return None
        cast = _truncating_cast(value)
        if cast is not None:
            return (
                f"{where} with a cast to {cast} (only text, varchar and bpchar without a length "
                "are sure to keep the stored value whole)"
            )
        ref = value_ref(value)
        if ref is not None:
            self._set(ref, self._action("store", origin))
            return None
        src = _unparen(value)
        while isinstance(src, exp.Cast):  # text casts only, see _truncating_cast
            src = _unparen(src.this)
        if isinstance(src, exp.Column):
            rows = self._values_column(src)
            if rows is not None:
                for item in rows:
                    why = self._store(item, origin, where)
                    if why is not None:
                        return f"{why} (in the VALUES list {_shown(src)} comes from)"
                return None
            found = self._resolve(src)
            if isinstance(found, Origin) and _copyable(found, origin):
                return None
            source = found.name if isinstance(found, Origin) else src.sql("postgres")
            return f"{where} copying from {source}"
        return f"{where} with the expression {_shown(value) if value else '?'}"

    def _insert(self, ins: exp.Insert) -> None:
        schema = ins.this
        target = schema.this if isinstance(schema, exp.Schema) else schema
        if not isinstance(target, exp.Table):
            return
        q = self._table_name(target)
        if q is None or not self.policy.columns_of(q):
            return
        self.out.touches = True
        body = ins.args.get("expression")
        cols = [canon(c) for c in schema.expressions] if isinstance(schema, exp.Schema) else []
        if not cols:
            if body is not None or not ins.args.get("default"):
                if body is None and not ins.args.get("default"):
                    return
                self.deny(
                    f"INSERT into protected table {q} must name its columns: without the "
                    "catalog pgcloak cannot tell which value goes to a protected column "
                    f"(write INSERT INTO {q} (col, ...) VALUES ...)"
                )
            return
        protected = [
            (i, Origin(q, c, p)) for i, c in enumerate(cols) if (p := self.policy.column(q, c)) is not None
        ]
        if not protected:
            return
        body = _unparen(body)
        expanding = f"(...).* expands into as many columns as its type has, which pgcloak cannot know: list the values for {q}"
        if isinstance(body, exp.Values):
            for row in body.expressions:
                items = row.expressions if isinstance(row, exp.Tuple) else [row]
                if any(_expands(item) for item in items):
                    self.deny(f"INSERT into protected table {q} with {expanding}")
                    return
                for i, origin in protected:
                    value = items[i] if i < len(items) else None
                    why = self._store(value, origin, "INSERT")
                    if why is not None:
                        self.deny(f"{why} into protected column {origin.name} is not supported: "
                                  "a value for it must be a parameter, a literal, NULL or DEFAULT")
            return
        if isinstance(body, exp.Select):
            projections = list(body.expressions)
            if any(isinstance(p, exp.Star) or (isinstance(p, exp.Column) and isinstance(p.this, exp.Star)) for p in projections):
                self.deny(f"INSERT ... SELECT * into protected table {q} is not supported: "
                          "list the selected columns")
                return
            if any(_expands(p.this if isinstance(p, exp.Alias) else p) for p in projections):
                self.deny(f"INSERT ... SELECT into protected table {q} with {expanding}")
                return
            for i, origin in protected:
                proj = projections[i] if i < len(projections) else None
                value = proj.this if isinstance(proj, exp.Alias) else proj
                why = self._store(value, origin, "INSERT ... SELECT")
                if why is not None:
                    self.deny(f"{why} into protected column {origin.name} is not supported: "
                              "only a parameter, a literal or the same protected column can be stored")
            return
        if body is not None:
            self.deny(f"INSERT into protected table {q} from {body.key.upper()} is not supported")
        else:
            for _i, origin in protected:
                self.out.written.add(origin.name)

    def _select_checks(self, sel: exp.Select) -> None:
        for join in sel.args.get("joins") or ():
            using = join.args.get("using")
            if using:
                for ident in using:
                    name = canon(ident)
                    for src in self._sources(sel).values():
                        if isinstance(self._lookup(src, name), Origin):
                            self.deny(
                                f"JOIN ... USING ({name}) on protected column {name} is not "
                                "supported: write ON a.col = b.col (columns of one join group)"
                            )
            if join.args.get("method") and str(join.args.get("method")).upper() == "NATURAL":
                for src in self._sources(sel).values():
                    if self._source_columns(src) and any(
                        v is not None for v in self._source_columns(src).values()
                    ):
                        self.deny("NATURAL JOIN with a protected table is not supported: "
                                  "write the join condition with ON")
                        break
        distinct = sel.args.get("distinct")
        if isinstance(distinct, exp.Distinct) and distinct.args.get("on") is not None:
            for col in distinct.args["on"].find_all(exp.Column):
                found = self._resolve(col)
                if isinstance(found, Origin):
                    self.deny(f"DISTINCT ON on protected column {found.name} is not supported: "
                              "ciphertexts of equal values differ")
        # Duplicate elimination compares stored values, and the envelopes of equal
        # plaintexts differ: SELECT DISTINCT and UNION / INTERSECT / EXCEPT (without ALL)
        # over an encrypted column would silently keep duplicates.
        dedup = "SELECT DISTINCT" if isinstance(distinct, exp.Distinct) and distinct.args.get("on") is None else None
        node: exp.Expr = sel
        while dedup is None and isinstance(node.parent, exp.SetOperation | exp.Subquery | exp.Paren):
            node = node.parent
            if isinstance(node, exp.SetOperation) and node.args.get("distinct"):
                dedup = f"{node.key.upper()} (without ALL)"
        if dedup is not None:
            for name in self._randomized_outputs(sel):
                self.deny(f"{dedup} over protected column {name} is not supported: "
                          "ciphertexts of equal values differ")

    def _randomized_outputs(self, sel: exp.Select) -> list[str]:
        """Protected columns with an envelope (not hash-only) in a SELECT list."""
        names: list[str] = []
        for proj in sel.expressions:
            inner = proj.this if isinstance(proj, exp.Alias) else proj
            if isinstance(inner, exp.Star) or (isinstance(inner, exp.Column) and isinstance(inner.this, exp.Star)):
                for src in self._star_sources(inner, sel):
                    names += [o.name for o in self._source_columns(src).values() if o is not None and not o.policy.hash_only]
            elif isinstance(inner, exp.Column):
                found = self._resolve(inner)
                if isinstance(found, Origin) and not found.policy.hash_only:
                    names.append(found.name)
        return names

    def _star(self, star: exp.Star) -> None:
        chain = self._scope_chain(star)
        if not chain:
            return
        scope = chain[0]
        parent = star.parent
        holder = parent.parent if isinstance(parent, exp.Column) else parent
        if not isinstance(holder, exp.Select | exp.Returning):
            return
        for src in self._star_sources(parent if isinstance(parent, exp.Column) else star, scope):
            for origin in self._source_columns(src).values():
                if origin is not None:
                    self.out.touches = True
                    self.out.read.add(origin.name)

    def _merge(self, merge: exp.Merge) -> None:
        protected = sorted(t for t in self.out.tables if self.policy.columns_of(t))
        if protected:
            self.out.touches = True
            self.deny(
                f"MERGE involving protected table {', '.join(protected)} is not supported: "
                "use INSERT ... ON CONFLICT, UPDATE or DELETE"
            )


def _expands(node: exp.Expression | None) -> bool:
    """``(expr).*``, ``t.*`` or ``*``: one item that PostgreSQL expands into several."""
    node = _unparen(node)
    if isinstance(node, exp.Star):
        return True
    if isinstance(node, exp.Column) and isinstance(node.this, exp.Star):
        return True
    return isinstance(node, exp.Dot) and isinstance(node.expression, exp.Star)


def _values_columns(values: exp.Values) -> dict[str, list[exp.Expression]]:
    """Column name -> expression per row of a VALUES list (``column1``... when unnamed)."""
    rows = [row.expressions if isinstance(row, exp.Tuple) else [row] for row in values.expressions]
    width = max((len(r) for r in rows), default=0)
    alias = values.args.get("alias")
    names = [canon(c) for c in alias.columns] if isinstance(alias, exp.TableAlias) else []
    names += [f"column{i + 1}" for i in range(len(names), width)]
    return {names[i]: [r[i] for r in rows if i < len(r)] for i in range(width)}


#: Casts that keep a stored value whole (any other, like ``varchar(10)``, ``char`` or
#: ``name``, could silently truncate the ciphertext the parameter is replaced by).
_WHOLE_TEXT_TYPES = frozenset({exp.DataType.Type.TEXT, exp.DataType.Type.VARCHAR, exp.DataType.Type.BPCHAR})


def _truncating_cast(node: exp.Expression | None) -> str | None:
    """The SQL of a cast around a stored value that is not to a whole text type."""
    node = _unparen(node)
    while isinstance(node, exp.Cast):
        to = node.args.get("to")
        if not isinstance(to, exp.DataType):
            return "?"
        if to.this not in _WHOLE_TEXT_TYPES or to.expressions:
            # (a length may be a literal slot placeholder: not shown)
            name = to.copy()
            name.set("expressions", [])
            return name.sql("postgres") + ("(n)" if to.expressions else "")
        node = _unparen(node.this)
    return None


def _copyable(src: Origin, dst: Origin) -> bool:
    """Copying a stored value is exact for the same column; hash-only columns sharing
    one index key (a join group) also hold interchangeable values."""
    if src.table == dst.table and src.column == dst.column:
        return True
    return (
        src.policy.hash_only
        and dst.policy.hash_only
        and src.policy.join_group is not None
        and src.policy.join_group == dst.policy.join_group
    )


def _ident_of(proj: exp.Expression, name: str) -> exp.Expression | str:
    if isinstance(proj, exp.Column) and isinstance(proj.this, exp.Identifier):
        return proj.this
    return name


def _span(col: exp.Column) -> tuple[int, int] | None:
    starts: list[int] = []
    ends: list[int] = []
    for part in col.parts:
        meta = part.meta if isinstance(part, exp.Identifier) else {}
        if "start" not in meta or "end" not in meta:
            return None
        starts.append(int(meta["start"]))
        ends.append(int(meta["end"]))
    if not starts:
        return None
    return min(starts), max(ends) + 1


def _context_name(parent: exp.Expr) -> str:
    if isinstance(parent, exp.Ordered):
        return "ORDER BY"
    if isinstance(parent, exp.Group) or isinstance(parent.parent, exp.Group):
        return "GROUP BY"
    if isinstance(parent, _PATTERN):
        return f"{parent.key.upper()} pattern matching"
    if isinstance(parent, _RANGE):
        return "a range comparison"
    if isinstance(parent, exp.DPipe | exp.Concat | exp.ConcatWs):
        return "concatenation"
    if isinstance(parent, exp.Distinct):
        return "DISTINCT"
    if isinstance(parent, exp.Window) or isinstance(parent.parent, exp.Window):
        return "a window PARTITION/ORDER"
    if isinstance(parent, exp.Cast):
        return "a cast"
    if isinstance(parent, exp.Anonymous):
        return f"function {parent.name}()"
    if isinstance(parent, exp.Func):
        return f"function {parent.sql_name().lower()}()"
    if isinstance(parent, exp.Tuple):
        return "a row/tuple expression"
    return f"use in {parent.key.upper()}"


def _reason(why: str) -> str:
    if why.startswith("comparison"):
        return "a protected column can only be compared with a parameter, a literal, NULL or a column of the same join group"
    if why.startswith(("INSERT", "UPDATE")):
        return "only a parameter, a literal, NULL, DEFAULT or the same protected column can be stored"
    return "the database only holds ciphertext and an equality-only blind index for it"


def _kind_of(tree: exp.Expr) -> str:
    if isinstance(tree, exp.Insert):
        return "insert"
    if isinstance(tree, exp.Update):
        return "update"
    if isinstance(tree, exp.Delete):
        return "delete"
    if isinstance(tree, exp.Merge):
        return "merge"
    if isinstance(tree, exp.Query):
        inner = tree
        while isinstance(inner, exp.Subquery):
            inner = inner.this
        with_ = inner.args.get("with_") or inner.args.get("with")
        if isinstance(inner, exp.Select) and isinstance(with_, exp.With):
            for cte in with_.expressions:
                if isinstance(cte.this, exp.Insert | exp.Update | exp.Delete):
                    return _kind_of(cte.this)
        return "select"
    if isinstance(tree, exp.Create | exp.Drop | exp.Alter):
        return "ddl"
    return "other"


def _no_limit(node: exp.Expr) -> bool:
    """``LIMIT ALL`` and ``LIMIT NULL`` (also ``(NULL)``, ``NULL::int``, ``FETCH FIRST NULL
    ROWS``) return every row, as no LIMIT does."""
    if isinstance(node, exp.Limit):
        bound = node.expression
    elif isinstance(node, exp.Fetch):
        bound = node.args.get("count")
        if bound is None:
            return False  # FETCH FIRST ROW ONLY: one row
    else:
        return False
    while isinstance(bound, exp.Paren | exp.Cast):
        bound = bound.this
    return isinstance(bound, exp.Null) or (isinstance(bound, exp.Var) and bound.name.upper() == "ALL")


#: Constants that are not literal slots (hex and bit strings): values all the same.
_CONSTANTS = (exp.Literal, exp.HexString, exp.BitString, exp.ByteString)


def _hidden(node: exp.Expression) -> exp.Expression:
    # A constant, and a number "aliased" by the rest of its digits (PostgreSQL 16
    # numerals sqlglot splits: 078_05_1120 reads as 078 AS _05_1120, 0o17 as 0 AS o17).
    if isinstance(node, _CONSTANTS) or (isinstance(node, exp.Alias) and isinstance(node.this, exp.Literal)):
        return exp.Var(this="?")
    return node


def _shown(node: exp.Expression) -> str:
    """An expression for a message: its literals as ``?`` (never their values, which
    may be personal data; nor pgcloak's slot markers)."""
    if node.find(*_CONSTANTS) is not None:
        node = _hidden(node) if isinstance(node, exp.Alias) else node.transform(_hidden)
    return _PRINTED_SLOT.sub("?", node.sql("postgres"))
