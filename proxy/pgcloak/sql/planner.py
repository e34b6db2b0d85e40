"""Planner: statement text -> cached :class:`Plan` (pure, no IO).

Flow: :func:`needs_parse` (a regex over protected table names) keeps statements
that cannot touch a protected table away from sqlglot entirely. Otherwise the text
is tokenized, its literals become numbered slots, and the *shape* (text with slots
blanked) is the cache key, so ``... = 'a'`` and ``... = 'b'`` share one plan. On a
miss each statement is dispatched by its first keyword: wrappers (EXPLAIN,
PREPARE, DECLARE, COPY (query)) plan their inner statement, queries go to sqlglot
with slots replaced by recognisable placeholders, maintenance commands pass, and an
opaque statement that names a protected table is refused (fail closed).

Rewrites are splices into the original text (``email`` -> ``left(email, N)``), so
everything else (comments, formatting, casts) reaches PostgreSQL exactly as written.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError, TokenError
from sqlglot.tokenizer_core import Token, TokenType

from pgcloak.policy import Policy
from pgcloak.sql.analyze import (
    MAX_PARAMETER,
    Analysis,
    Analyzer,
    Origin,
    canon,
    number_placeholder,
    parameter_number,
    string_placeholder,
)
from pgcloak.sql.lexer import (
    STRING_TYPES,
    Lexed,
    LexError,
    escaped_name,
    lex,
    matching_paren,
    quote_literal,
    runs_execute,
    scan_literals,
    split_statements,
)
from pgcloak.sql.plan import (
    ALLOW,
    DEALLOCATE_ALL,
    DISCARD_ALL,
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    PASS,
    UNDEFINED_PARAMETER,
    AuditFacts,
    ExecuteCall,
    Literal,
    Plan,
    ValueAction,
    deny,
    pass_plan,
)
from pgcloak.sql.prepared import comma_items, fold_name
from pgcloak.sql.search_path import (
    DEFAULT_PATH,
    bound_spelling,
    resolve_table,
    unknown_path_message,
)

#: Number of statements handed to sqlglot's parser (tests assert the prefilter works).
PARSE_CALLS = 0

_PREFILTER_EXTRA = ("u&", "execute", "prepare", "deallocate", "discard")

#: Statements that carry no values for a protected column (or cannot, as DDL):
#: they pass without parsing. (``SET search_path`` is followed by the session, with
#: :mod:`pgcloak.sql.search_path`.)
_PASS_KEYWORDS = frozenset(
    ["VACUUM", "ANALYZE", "ANALYSE", "LOCK", "REINDEX", "CLUSTER", "GRANT", "REVOKE", "COMMENT", "TRUNCATE", "DROP", "ALTER", "CHECKPOINT", "SET", "SHOW", "RESET", "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "DISCARD", "LISTEN", "UNLISTEN", "NOTIFY", "FETCH", "MOVE", "CLOSE", "LOAD", "REFRESH", "SECURITY"]
)
_QUERY_KEYWORDS = frozenset(["SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "TABLE", "MERGE", "CREATE", "("])
_DDL_KEYWORDS = frozenset(["CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "REINDEX", "CLUSTER"])

_prefilter_cache: dict[int, tuple[Policy, tuple[str, ...], re.Pattern[str]]] = {}


def _patterns(policy: Policy) -> tuple[tuple[str, ...], re.Pattern[str]]:
    """(lowercase needles for the prefilter, whole-word protected-name regex), per policy."""
    found = _prefilter_cache.get(id(policy))
    if found is not None and found[0] is policy:
        return found[1], found[2]
    names = sorted(policy.table_names_for_prefilter(), key=len, reverse=True)
    needles = tuple(n.lower() for n in names) + _PREFILTER_EXTRA
    alts = [re.escape(n) for n in names]
    words = (
        re.compile(r"(?<![A-Za-z0-9_$])(?:" + "|".join(alts) + r")(?![A-Za-z0-9_$])", re.I)
        if alts
        else re.compile(r"(?!x)x")
    )
    if len(_prefilter_cache) > 64:
        _prefilter_cache.clear()
    _prefilter_cache[id(policy)] = (policy, needles, words)
    return needles, words


def needs_parse(sql: str, policy: Policy) -> bool:
    """False when ``sql`` cannot touch a protected table: no protected bare table name
    as a substring (case-insensitive), no ``U&`` escape, no PREPARE/EXECUTE/DEALLOCATE/DISCARD."""
    low = sql.lower()
    return any(needle in low for needle in _patterns(policy)[0])


def names_protected_table(sql: str, policy: Policy) -> bool:
    """Whether ``sql`` mentions a protected table name as a whole word (anywhere,
    including string bodies): the fail-closed test for statements we cannot analyze."""
    return _patterns(policy)[1].search(sql) is not None


def fingerprint(sql: str) -> str:
    """Statement text with literals replaced by ``?``, comments dropped and spacing normalized."""
    try:
        lexed = lex(sql)
    except LexError:
        return "<untokenizable>"
    return _fingerprint(lexed, sql)


#: Fingerprint spacing: one space between tokens, except after these and before those,
#: so a fingerprint reads like SQL ("users.email = $1", "VALUES (?, ?)", "x::int") and
#: is the same whatever the statement's own spacing was.
_TIGHT_AFTER = frozenset(("(", "[", ".", "::", "$"))
_TIGHT_BEFORE = frozenset((")", "]", ",", ";", ".", "::"))


#: Constants that may not be literal slots (hex and bit strings, of no use to the
#: planner; strings pgcloak cannot decode, refused) but are values all the same: never in
#: a fingerprint.
_OTHER_CONSTANTS = STRING_TYPES | {TokenType.HEX_STRING, TokenType.BIT_STRING}


def _fingerprint(lexed: Lexed, sql: str) -> str:
    out: list[str] = []
    prev = "("  # no space before the first token
    tokens = lexed.tokens
    for i, tok in enumerate(tokens):
        if i in lexed.slot_of_token or tok.token_type in _OTHER_CONSTANTS:
            text = "?"
        elif tok.token_type is TokenType.NUMBER or tok.token_type is TokenType.VAR:
            before = tokens[i - 1] if i else None
            glued = before is not None and before.end + 1 == tok.start
            if tok.token_type is TokenType.NUMBER:
                if (
                    glued
                    and before is not None
                    and before.token_type is TokenType.PARAMETER
                    and sql[before.start : before.end + 1] == "$"
                    and _parameter_number(tok.text) is not None
                ):
                    text = sql[tok.start : tok.end + 1]  # the n of $n (not of @n: abs(n))
                else:
                    text = "?"  # 1_000 (PostgreSQL 16): not a slot, a value all the same
            elif (
                glued
                and before is not None
                and before.token_type is TokenType.NUMBER
                and (tok.text[:1] == "_" or (tok.text[:1] in "oO" and sql[before.start : before.end + 1] == "0"))
            ):
                continue  # the _05_1120 of 078_05_1120, the o7_7 of 0o7_7: part of that number
            else:
                text = sql[tok.start : tok.end + 1]
        else:
            text = sql[tok.start : tok.end + 1]
        if prev not in _TIGHT_AFTER and text not in _TIGHT_BEFORE:
            out.append(" ")
        out.append(text)
        prev = text
    return "".join(out)


Piece = str | int  # template text, or a literal slot index


@dataclass
class _Stmt:
    """Result of planning one statement (or a wrapper's inner statement)."""

    pieces: list[Piece]
    analysis: Analysis
    prepare: tuple[str, Plan] | None = None
    executes: list[ExecuteCall] = field(default_factory=list)
    deallocate: str | None = None
    copy_in: tuple[ValueAction, ...] | None = None
    copy_format: str | None = None
    copy_header: bool = False
    copy_out: bool = False
    edited: bool = False


class Planner:
    """Plans statements under one policy; share it between sessions (plans are immutable).

    Swap the whole Planner when the policy changes: the caches belong to the policy.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        index_length: int,
        cache_size: int = 4096,
        search_path: tuple[str, ...] | None = DEFAULT_PATH,
    ) -> None:
        if index_length <= 0:
            raise ValueError("index_length must be positive")
        self.policy = policy
        #: The schemas unqualified table names are resolved against (the session's; None
        #: while it is unknown: unqualified protected names are then refused).
        self.search_path = search_path
        self.index_length = index_length
        self.cache_size = cache_size
        self._by_text: dict[str, Plan] = {}
        self._by_shape: dict[str, Plan] = {}
        self.hits = 0
        self.misses = 0

    # -- public API -----------------------------------------------------------------

    def plan(self, sql: str) -> Plan:
        """Plan for a Parse message (``$n`` parameters), cached by exact text.

        When ``plan.needs_render`` is true because of literals in the text, the
        literals come from ``plan_simple(sql)[1]`` (a cache hit).
        """
        found = self._by_text.get(sql)
        if found is not None:
            self.hits += 1
            return found
        result = self.plan_simple(sql)[0]
        _remember(self._by_text, sql, result, self.cache_size)
        return result

    def plan_simple(self, sql: str) -> tuple[Plan, list[Literal]]:
        """Plan for a simple Query: cached by shape; also returns the text's literals."""
        if not needs_parse(sql, self.policy):
            return _pass_for(sql), []
        # Hit path: the literals and shape key without sqlglot's tokenizer. A miss, or
        # a text the scanner does not fully understand, takes the tokenizing path.
        scanned = scan_literals(sql)
        if scanned is not None:
            found = self._by_shape.get(scanned[1])
            if found is not None:
                self.hits += 1
                return found, scanned[0]
        try:
            lexed = lex(sql)
        except LexError as exc:
            if "$" in sql and _GLUED_PARAM.search(sql):
                unglued = unglue_params(sql)
                if unglued != sql:
                    return self.plan_simple(unglued)
            if names_protected_table(sql, self.policy):
                return _deny_plan(f"{exc}; refused because it names a protected table"), []
            return pass_plan(_guess_kind(sql)), []
        key = _shape_key(sql, lexed)
        found = self._by_shape.get(key)
        if found is not None:
            self.hits += 1
            return found, lexed.literals
        self.misses += 1
        try:
            result = self._build(sql, lexed)
        except RecursionError:
            # Nested deeper than sqlglot (or the analysis) can follow: PostgreSQL's own
            # answer to that is 54001 too. Not cached: it is cheap to find again.
            if names_protected_table(sql, self.policy):
                message = "statement too complex for pgcloak to analyze (nested too deeply); it names a protected table"
                return Plan(deny(message, "54001"), None, (), (), True, AuditFacts("other")), []
            return pass_plan(_guess_kind(sql)), []
        _remember(self._by_shape, key, result, self.cache_size)
        return result, lexed.literals

    def render(self, plan: Plan, literals: Sequence[Literal | str | None]) -> str:
        """The text to send: the plan's template with one value per literal slot.

        A :class:`Literal` is written back as it was (its original spelling), a ``str``
        as a quoted string constant (``E''`` when it holds a backslash), None as NULL.
        """
        template = plan.template
        if template is None:
            raise ValueError("plan has no template (pass-through plan: send the original text)")
        if len(literals) != len(template) - 1:
            raise ValueError(f"plan expects {len(template) - 1} literals, got {len(literals)}")
        out: list[str] = [template[0]]
        for value, segment in zip(literals, template[1:], strict=True):
            if value is None:
                out.append("NULL")
            elif isinstance(value, Literal):
                out.append(value.raw)
            else:
                out.append(quote_literal(value))
            out.append(segment)
        return "".join(out)

    def apply(
        self,
        plan: Plan,
        literals: Sequence[Literal],
        transform: Callable[[ValueAction, str], str | None],
    ) -> str:
        """Render with ``transform(action, value)`` applied to every non-pass literal."""
        values: list[Literal | str | None] = [
            lit if action.kind == "pass" else transform(action, lit.value)
            for lit, action in zip(literals, plan.literals, strict=True)
        ]
        return self.render(plan, values)

    # -- planning -----------------------------------------------------------------------

    def _build(self, sql: str, lexed: Lexed) -> Plan:
        fp = _fingerprint(lexed, sql)
        if lexed.tokens and _has_opaque_strings(lexed) and names_protected_table(sql, self.policy):
            return _deny_plan(
                "U&'...' UESCAPE strings and implicitly concatenated string constants are not "
                "supported in statements naming a protected table",
                fp,
            )
        misread = _misread_parameter(lexed, sql)
        if misread is not None and names_protected_table(sql, self.policy):
            message, sqlstate = misread
            return _deny_plan(message, fp, sqlstate)
        if _has_escaped_identifier(lexed):
            # U&"user\0073" is "users": pgcloak reads names as written, so it would not know
            # the table or column (and so what to encrypt).
            return _deny_plan(
                'identifiers written U&"..." are not supported by pgcloak (it could not tell which '
                "table or column they name): write the name plainly or in double quotes",
                fp,
            )
        stmts: list[_Stmt] = []
        pieces: list[Piece] = []
        pos = 0
        for a, b in split_statements(lexed.tokens):
            s0, e0 = lexed.tokens[a].start, lexed.tokens[b - 1].end + 1
            pieces.extend(self._verbatim(sql, lexed, pos, s0))
            st = self._statement(sql, lexed, a, b)
            stmts.append(st)
            pieces.extend(st.pieces)
            pos = e0
        pieces.extend(self._verbatim(sql, lexed, pos, len(sql)))
        return self._assemble(stmts, pieces, lexed, fp)

    def _assemble(self, stmts: list[_Stmt], pieces: list[Piece], lexed: Lexed, fp: str) -> Plan:
        segments: list[str] = []
        current: list[str] = []
        expected = 0
        for piece in pieces:
            if isinstance(piece, int):
                if piece != expected:
                    return _deny_plan("internal error: literal slots out of order", fp)
                expected += 1
                segments.append("".join(current))
                current = []
            else:
                current.append(piece)
        segments.append("".join(current))
        if expected != len(lexed.literals):
            return _deny_plan("internal error: literal slots lost", fp)
        denials: list[str] = []
        guard_denials: list[str] = []
        literal_actions: list[ValueAction] = [PASS] * len(lexed.literals)
        param_actions: dict[int, ValueAction] = {}
        max_param = 0
        kinds: list[str] = []
        tables: list[str] = []
        read: list[str] = []
        written: list[str] = []
        touches = False
        for st in stmts:
            an = st.analysis
            denials.extend(d for d in an.denials if d not in denials)
            guard_denials.extend(d for d in an.guard_denials if d not in guard_denials)
            for (kind, n), action in an.actions.items():
                if kind == "s":
                    literal_actions[n] = action
                else:
                    param_actions[n] = action
            max_param = max(max_param, an.max_param, *param_actions.keys(), 0)
            if an.kind not in kinds:
                kinds.append(an.kind)
            tables.extend(t for t in sorted(an.tables) if t not in tables)
            read.extend(k for k in sorted(an.read) if k not in read)
            written.extend(k for k in sorted(an.written) if k not in written)
            touches = touches or an.touches
        copies = [st for st in stmts if st.analysis.kind in ("copy", "copy_in", "copy_out")]
        if len(copies) > 1 and any(st.copy_in is not None for st in copies):
            # One rewriter per Query: the data of a second COPY would pass it by.
            denials.append(
                "a COPY FROM STDIN into a protected table must be the only COPY of its query "
                "string: send each COPY on its own"
            )
        edited = any(st.edited for st in stmts)
        template = tuple(segments)
        sql_out = _join_template(template) if edited else None
        if denials:
            decision = deny("; ".join(denials))
        elif guard_denials:
            decision = deny("; ".join(guard_denials), INSUFFICIENT_PRIVILEGE)
        else:
            decision = ALLOW
        named: list[tuple[str, Plan | None]] = []
        for st in stmts:
            if st.prepare is not None:
                named.append(st.prepare)
            elif st.deallocate:
                named.append((st.deallocate, None))
        copy_st = next((st for st in stmts if st.copy_format is not None or st.copy_out), None)
        return Plan(
            decision=decision,
            sql=sql_out,
            params=tuple(param_actions.get(i, PASS) for i in range(1, max_param + 1)),
            literals=tuple(literal_actions),
            touches_pii=touches,
            audit=AuditFacts(
                kind="+".join(kinds) or "other",
                tables=tuple(tables),
                pii_read=tuple(read),
                pii_written=tuple(written),
                fingerprint=fp,
            ),
            copy_in=copy_st.copy_in if copy_st else None,
            copy_format=copy_st.copy_format if copy_st else None,
            copy_header=copy_st.copy_header if copy_st else False,
            template=template,
            named=tuple(named),
            executes=tuple(c for st in stmts for c in st.executes),
            copy_out=any(st.copy_out for st in stmts),
        )

    def _verbatim(self, sql: str, lexed: Lexed, start: int, end: int) -> list[Piece]:
        """Text ``[start, end)`` as template pieces (literal slots stay slots)."""
        out: list[Piece] = []
        pos = start
        literals = lexed.literals
        # Literals are in text order: start at the first one that may fall in the span
        # (a statement with thousands of rewrites calls this once per gap between them).
        i = bisect.bisect_left(literals, start, key=_literal_start)
        while i < len(literals) and literals[i].start < end:
            lit = literals[i]
            if lit.end <= end:
                out.append(sql[pos : lit.start])
                out.append(i)
                pos = lit.end
            i += 1
        out.append(sql[pos:end])
        return out

    def _truncate(self, stmt: _Stmt, text: str) -> _Stmt:
        """TRUNCATE passes, but wiping a protected table is a write of its PII (audit)."""
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z_0-9.]*", text)}
        for table in self.policy.protected_tables():
            if table in words or table.partition(".")[2] in words:
                stmt.analysis.tables.add(table)
                stmt.analysis.written.update(self.policy.key_id(table, c) for c in self.policy.columns_of(table))
                stmt.analysis.touches = True
        return stmt

    def _alter_hazard(self, toks: list[Token], a: int, b: int) -> str | None:
        """Why an ``ALTER TABLE`` cannot pass (None: it can). Most pass unparsed (adding a
        column, an index, a constraint); refused are those that would store or keep a
        value pgcloak never encrypted in a protected column, or stop pgcloak from knowing
        the table: a ``USING``, a non-NULL ``DEFAULT`` or a generated expression on a
        protected column, renaming a protected table or column (or another to a protected
        name), moving a protected table to another schema, attaching rows to it
        (``ATTACH PARTITION``, ``INHERIT``), and dropping or renaming pgcloak's CHECK."""
        words = [fold_name(t) for t in toks[a:b]]
        upper = [t.text.upper() if t.token_type != TokenType.IDENTIFIER else "" for t in toks[a:b]]
        if len(words) < 3 or upper[1] not in ("TABLE", "FOREIGN"):
            return None
        i = 2 if upper[1] == "TABLE" else 3
        while i < len(words) and upper[i] in ("IF", "EXISTS", "ONLY"):
            i += 1
        target = self._protected_target(words, upper, i)
        columns = {c for t in target for c in self.policy.columns_of(t)}
        names = self.policy.protected_names()
        why = "pgcloak could not encrypt what it would store, nor find the table afterwards"
        for j, word in enumerate(words):
            kw = upper[j]
            if word.endswith("_pgcloak_check") and upper[j - 1] in ("CONSTRAINT", "EXISTS"):
                return (
                    f"changing constraint {word} through pgcloak is refused: pgcloak's CHECK constraints "
                    "are managed with `pgcloak policy ddl` on a direct connection"
                )
            if kw == "RENAME":
                if upper[j + 1 : j + 2] == ["TO"]:
                    new = words[j + 2] if j + 2 < len(words) else ""
                    renamed = bool(target) or new in names
                else:
                    renamed = bool(target) and any(w in columns for w in words[j + 1 :])
                if renamed:
                    return f"renaming a protected table or column (or another to a protected name) is refused: {why}"
            if not target:
                continue
            if kw == "SCHEMA" and upper[j - 1] == "SET":
                return f"moving a protected table to another schema is refused: {why}"
            if kw == "ATTACH" or (kw == "INHERIT" and upper[j - 1] != "NO"):
                return f"ALTER TABLE ... {kw} on a protected table is refused: the rows it brings in are not encrypted"
        if target:
            for lo, hi in comma_items(toks, a, b):
                column = _subcommand_column(words[lo - a : hi - a], upper[lo - a : hi - a])
                if column is None or column not in columns:
                    continue
                rest = upper[lo - a : hi - a]
                if "USING" in rest:
                    return f"ALTER COLUMN {column} TYPE ... USING on a protected column is refused: {why}"
                if "GENERATED" in rest or "EXPRESSION" in rest:
                    return f"a generated value for protected column {column} is refused: it would be stored in clear"
                if "DEFAULT" in rest:
                    d = rest.index("DEFAULT")
                    if rest[d + 1 : d + 2] != ["NULL"] and (d == 0 or rest[d - 1] != "DROP"):
                        return (
                            f"a non-NULL DEFAULT for protected column {column} is refused: it would be "
                            "stored in clear"
                        )
        return None

    def _create_hazard(self, tree: exp.Create) -> str | None:
        """Why a CREATE (not of a query) cannot pass: a table created under a protected one
        (``INHERITS``, ``PARTITION OF``: rows written to it directly are never encrypted,
        yet read as the protected table's), or a partial index whose predicate reads a
        protected column and a value (it would compare the stored form with the value as
        written, and keep that value in the catalog in clear)."""
        props = tree.args.get("properties")
        for prop in props.expressions if isinstance(props, exp.Properties) else ():
            parents = prop.expressions if isinstance(prop, exp.InheritsProperty) else (
                [prop.this] if isinstance(prop, exp.PartitionedOfProperty) else []
            )
            for parent in parents:
                if self._protected_named(parent):
                    return (
                        f"CREATE TABLE ... {'INHERITS' if isinstance(prop, exp.InheritsProperty) else 'PARTITION OF'} "
                        f"protected table {parent.sql('postgres')} is refused: rows written to the new table "
                        "would not be encrypted"
                    )
        index = tree.this
        if isinstance(index, exp.Index):
            params = index.args.get("params")
            where = params.args.get("where") if isinstance(params, exp.IndexParameters) else None
            tables = self._protected_named(index.args.get("table"))
            if where is not None and tables:
                columns = {c for t in tables for c in self.policy.columns_of(t)}
                read = sorted(
                    name
                    for test in where.find_all(exp.Binary, exp.In)
                    if not isinstance(test, exp.Connector) and next(test.find_all(exp.Literal), None) is not None
                    for name in {canon(c.this) for c in test.find_all(exp.Column)} & columns
                )
                if read:
                    return (
                        f"a partial index whose predicate reads protected column {', '.join(read)} is refused: "
                        "it would compare the stored form with the value as written, and keep that "
                        "value in the catalog in clear"
                    )
        return None

    def _tables_named(self, name: str) -> list[str]:
        """The protected tables a bare table name may mean (any schema: fail closed)."""
        return [t for t in self.policy.protected_tables() if t.partition(".")[2] == name]

    def _protected_named(self, table: object) -> list[str]:
        """The protected tables a ``Table`` node may mean."""
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            return []
        return self._tables_named(canon(table.this))

    def _protected_target(self, words: list[str], upper: list[str], i: int) -> list[str]:
        """The protected tables the (maybe schema-qualified) name at ``words[i]`` may mean."""
        if i >= len(words):
            return []
        name = words[i]
        if i + 2 < len(words) and upper[i + 1] == ".":
            name = words[i + 2]
        return self._tables_named(name)

    def _statement(self, sql: str, lexed: Lexed, a: int, b: int) -> _Stmt:
        toks = lexed.tokens
        s0, e0 = toks[a].start, toks[b - 1].end + 1
        first = toks[a].text.upper()
        text = sql[s0:e0]

        def simple(kind: str, denial: str | None = None) -> _Stmt:
            an = Analysis(kind=kind)
            if denial:
                an.denials.append(denial)
                an.touches = True
            return _Stmt(self._verbatim(sql, lexed, s0, e0), an)

        if first != "EXECUTE" and runs_execute(toks, a, b):
            return simple(
                "ddl" if first == "CREATE" else "other",
                f"{first} ... EXECUTE is not supported by pgcloak: run the prepared statement's own text",
            )
        if first == "EXPLAIN":
            i = a + 1
            if i < b and toks[i].token_type == TokenType.L_PAREN:
                i = matching_paren(toks, i, b) + 1
            while i < b and toks[i].text.upper() in ("ANALYZE", "ANALYSE", "VERBOSE"):
                i += 1
            return self._wrapper(sql, lexed, a, i, b)
        if first == "PREPARE":
            return self._prepare(sql, lexed, a, b)
        if first == "EXECUTE":
            return self._execute(sql, lexed, a, b)
        if first == "DEALLOCATE":
            names = [t for t in toks[a + 1 : b] if t.text.upper() != "PREPARE"]
            if escaped_name(names, 0):
                return simple("other", _ESCAPED_NAME)
            st = simple("other")
            if names:
                every = names[0].text.upper() == "ALL" and names[0].token_type != TokenType.IDENTIFIER
                st.deallocate = DEALLOCATE_ALL if every else fold_name(names[0])
            return st
        if first == "DISCARD":
            st = simple("other")
            if a + 1 < b and toks[a + 1].text.upper() == "ALL":
                st.deallocate = DISCARD_ALL  # DISCARD ALL deallocates every statement too
            return st
        if first == "COPY":
            return self._copy(sql, lexed, a, b)
        if first == "DECLARE":
            for i in range(a + 1, b):
                if toks[i].text.upper() == "FOR" and any(t.text.upper() == "CURSOR" for t in toks[a:i]):
                    return self._wrapper(sql, lexed, a, i + 1, b)
        if first == "TRUNCATE":
            return self._truncate(simple("truncate"), text)
        if first == "ALTER":
            hazard = self._alter_hazard(toks, a, b)
            return simple("ddl", hazard)
        if first in _PASS_KEYWORDS:
            return simple("ddl" if first in _DDL_KEYWORDS else "other")
        named = _patterns(self.policy)[1].search(text)
        if named is None:
            return simple(_guess_kind(text))
        if first not in _QUERY_KEYWORDS:
            return simple(
                _guess_kind(text),
                f"{first} statement naming a protected table ({named.group(0)}) cannot be analyzed "
                "by pgcloak and is refused (a function, procedure or DO block could write or read "
                "PII unseen)",
            )
        return self._query(sql, lexed, a, b)

    def _wrapper(self, sql: str, lexed: Lexed, a: int, inner_a: int, b: int) -> _Stmt:
        """A statement carrying another one from token ``inner_a`` on (EXPLAIN, DECLARE)."""
        if inner_a >= b:
            return _Stmt(self._verbatim(sql, lexed, lexed.tokens[a].start, lexed.tokens[b - 1].end + 1), Analysis())
        inner = self._statement(sql, lexed, inner_a, b)
        prefix = self._verbatim(sql, lexed, lexed.tokens[a].start, lexed.tokens[inner_a].start)
        inner.pieces = prefix + inner.pieces
        return inner

    def _prepare(self, sql: str, lexed: Lexed, a: int, b: int) -> _Stmt:
        toks = lexed.tokens
        name = fold_name(toks[a + 1]) if a + 1 < b else ""
        i = a + 2
        if i < b and toks[i].token_type == TokenType.L_PAREN:
            i = matching_paren(toks, i, b) + 1
        if i >= b or toks[i].text.upper() != "AS":
            # PREPARE TRANSACTION, or not PostgreSQL's syntax (it refuses it). A U&"..."
            # name: whatever it prepares, pgcloak would file it under another name.
            an = Analysis(kind="prepare")
            if escaped_name(toks[a + 1 : b], 0):
                an.denials.append(_ESCAPED_NAME)
                an.touches = True
            return _Stmt(self._verbatim(sql, lexed, toks[a].start, toks[b - 1].end + 1), an)
        st = self._wrapper(sql, lexed, a, i + 1, b)
        an = st.analysis
        inner = Plan(
            decision=ALLOW if not an.denials else deny("; ".join(an.denials)),
            sql=None,
            params=tuple(an.actions.get(("p", n), PASS) for n in range(1, an.max_param + 1)),
            literals=(),
            touches_pii=an.touches,
            audit=AuditFacts(an.kind, tuple(sorted(an.tables)), tuple(sorted(an.read)), tuple(sorted(an.written))),
        )
        # $n inside PREPARE are bound by EXECUTE, not by this statement.
        an.actions = {k: v for k, v in an.actions.items() if k[0] == "s"}
        an.max_param = 0
        st.prepare = (name, inner)
        return st

    def _execute(self, sql: str, lexed: Lexed, a: int, b: int) -> _Stmt:
        toks = lexed.tokens
        st = _Stmt(self._verbatim(sql, lexed, toks[a].start, toks[b - 1].end + 1), Analysis(kind="execute"))
        if a + 1 >= b:
            return st
        if escaped_name(toks[a + 1 : b], 0):
            st.analysis.denials.append(_ESCAPED_NAME)
            st.analysis.touches = True
            return st
        # Sent as the statement the name stands for (pgcloak.sql.prepared), by the session.
        st.executes.append(ExecuteCall(fold_name(toks[a + 1])))
        return st

    def _copy(self, sql: str, lexed: Lexed, a: int, b: int) -> _Stmt:
        toks = lexed.tokens
        s0, e0 = toks[a].start, toks[b - 1].end + 1
        i = a + 1
        if i < b and toks[i].token_type == TokenType.L_PAREN:
            close = matching_paren(toks, i, b)
            inner = self._statement(sql, lexed, i + 1, close)
            pieces = self._verbatim(sql, lexed, s0, toks[i + 1].start) + inner.pieces
            pieces += self._verbatim(sql, lexed, toks[close - 1].end + 1, e0)
            inner.pieces = pieces
            inner.analysis.kind = "copy_out"
            inner.copy_out = inner.analysis.touches
            if inner.copy_out:
                # decrypted values are escaped for the output format (CSV quoting differs)
                words = [t.text.upper() for t in toks[close + 1 : b]]
                inner.copy_format = _copy_format(words)
                unsupported = _copy_out_options(words, inner.copy_format)
                if inner.copy_format == "binary":
                    inner.analysis.denials.append(_BINARY_COPY_OUT)
                elif unsupported:
                    inner.analysis.denials.append(_copy_out_denial(unsupported))
            return inner
        an = Analysis(kind="copy")
        st = _Stmt(self._verbatim(sql, lexed, s0, e0), an)
        # COPY BINARY table ... (the syntax before 7.3, still accepted): binary format
        binary = i < b and toks[i].token_type != TokenType.IDENTIFIER and toks[i].text.upper() == "BINARY"
        if binary:
            i += 1
        # table name: ident [. ident]
        parts: list[str] = []
        while i < b:
            parts.append(fold_name(toks[i]))
            if i + 1 < b and toks[i + 1].token_type == TokenType.DOT:
                i += 2
                continue
            i += 1
            break
        if len(parts) == 2:
            table = ".".join(parts)
        elif parts:
            resolved = resolve_table(self.policy, self.search_path, parts[0])
            if resolved is None:
                an.denials.append(unknown_path_message(parts[0]))
                return st
            table = resolved
            if parts[0] in self.policy.names_protected_beyond_public():
                # Bound to the schema pgcloak resolved (Analyzer._bind_schema says why).
                tok = toks[i - 1]
                st.pieces = [
                    *self._verbatim(sql, lexed, s0, tok.start),
                    bound_spelling(table, parts[0], sql[tok.start : tok.end + 1]),
                    *self._verbatim(sql, lexed, tok.end + 1, e0),
                ]
                st.edited = True
        else:
            table = ""
        columns: list[str] = []
        if i < b and toks[i].token_type == TokenType.L_PAREN:
            close = matching_paren(toks, i, b)
            columns = [fold_name(t) for t in toks[i + 1 : close] if t.token_type != TokenType.COMMA]
            i = close + 1
        direction = toks[i].text.upper() if i < b else ""
        target = toks[i + 1].text.upper() if i + 1 < b else ""
        rest = [t.text.upper() for t in toks[i + 2 : b]]
        fmt = "binary" if binary else _copy_format(rest)
        protected = self.policy.columns_of(table)
        an.tables.add(table)
        if not protected:
            return st
        an.touches = True
        if direction == "TO":
            an.kind = "copy_out"
            st.copy_out = True
            st.copy_format = fmt
            if any(c in protected for c in (columns or protected)):
                unsupported = _copy_out_options(rest, fmt)
                if fmt == "binary":
                    an.denials.append(_BINARY_COPY_OUT)
                elif unsupported:
                    an.denials.append(_copy_out_denial(unsupported))
            an.read.update(f"{table}.{c}" for c in (columns or protected) if c in protected)
            encrypted = [f"{table}.{c}" for c in (columns or protected) if c in protected and protected[c].encrypt]
            if encrypted and self.policy.guards.unbounded_select == "deny":
                an.guard_denials.append(
                    f"COPY of protected column{'s' if len(encrypted) > 1 else ''} {', '.join(encrypted)} "
                    "(every row of the table): refused by the pgcloak policy (guards.unbounded_select: "
                    "deny); COPY (SELECT ... WHERE ...) TO STDOUT copies the rows a WHERE selects"
                )
            return st
        an.kind = "copy_in"
        if target != "STDIN":
            an.denials.append(
                f"COPY {table} FROM a server file or program is not supported: values for its "
                "protected columns would be stored unencrypted (use COPY ... FROM STDIN)"
            )
            return st
        if fmt == "binary":
            an.denials.append(
                f"COPY {table} FROM STDIN in binary format is not supported for a protected "
                "table (use text or csv format)"
            )
            return st
        if "WHERE" in rest:
            an.denials.append(f"COPY {table} FROM STDIN ... WHERE is not supported for a protected table")
            return st
        unsupported = _copy_in_options(rest)
        if unsupported:
            # the stream is rewritten with the default delimiter, quoting and NULL marker:
            # with others a protected value could slip through unencrypted
            an.denials.append(
                f"COPY {table} FROM STDIN with option {', '.join(unsupported)} is not supported for "
                "a protected table (use the defaults of the text or csv format)"
            )
            return st
        if not columns:
            an.denials.append(
                f"COPY into protected table {table} must list its columns: without the catalog "
                f"pgcloak cannot tell which field is protected (COPY {table} (col, ...) FROM STDIN)"
            )
            return st
        analyzer = Analyzer(self.policy, self.index_length, "", self.search_path)
        actions: list[ValueAction] = []
        for c in columns:
            pol = protected.get(c)
            if pol is None:
                actions.append(PASS)
                continue
            actions.append(analyzer._action("store", Origin(table, c, pol)))
            an.written.add(f"{table}.{c}")
        st.copy_in = tuple(actions)
        st.copy_format = fmt
        st.copy_header = _copy_header(rest)
        return st

    def _query(self, sql: str, lexed: Lexed, a: int, b: int) -> _Stmt:
        """Parse one statement with sqlglot (slots as placeholders) and analyze it."""
        global PARSE_CALLS
        toks = lexed.tokens
        s0, e0 = toks[a].start, toks[b - 1].end + 1
        parts: list[str] = []
        # (position in parse text, original start, length delta) per slot
        shifts: list[tuple[int, int, int]] = []
        pos = s0
        plen = 0
        for ti in range(a, b):
            slot = lexed.slot_of_token.get(ti)
            if slot is None:
                continue
            lit = lexed.literals[slot]
            chunk = sql[pos : lit.start]
            parts.append(chunk)
            plen += len(chunk)
            ph = string_placeholder(slot) if lit.kind == "string" else number_placeholder(slot)
            parts.append(ph)
            shifts.append((plen, lit.start, len(ph) - (lit.end - lit.start)))
            plen += len(ph)
            pos = lit.end
        parts.append(sql[pos:e0])
        text = "".join(parts)
        PARSE_CALLS += 1
        kind = _guess_kind(text)
        try:
            trees = sqlglot.parse(text, read="postgres")
        except SqlglotError as exc:
            return self._opaque(sql, lexed, s0, e0, kind, f"it could not be parsed ({_short(exc)})")
        found = [t for t in trees if t is not None]
        if len(found) != 1 or isinstance(found[0], exp.Command):
            return self._opaque(sql, lexed, s0, e0, kind, "pgcloak cannot analyze this statement form")
        tree = found[0]
        if isinstance(tree, exp.Create):
            body = tree.args.get("expression")
            if not isinstance(body, exp.Query):
                created = Analysis(kind="ddl")
                hazard = self._create_hazard(tree)
                if hazard is not None:
                    created.denials.append(hazard)
                    created.touches = True
                return _Stmt(self._verbatim(sql, lexed, s0, e0), created)
        analysis = Analyzer(self.policy, self.index_length, text, self.search_path).run(tree)
        if isinstance(tree, exp.Create):
            analysis.kind = "ddl"

        # Positions in the parsed text back to the statement's: minus the growth of the
        # placeholders before them (a running sum, searched: linear overall).
        shift_at = [at for at, _orig, _d in shifts]
        grown = list(itertools.accumulate(d for _at, _orig, d in shifts))

        def to_orig(p: int) -> int:
            k = bisect.bisect_left(shift_at, p)
            return p - (grown[k - 1] if k else 0) + s0

        edits = sorted((to_orig(s), to_orig(e), repl) for s, e, repl in analysis.edits)
        pieces: list[Piece] = []
        cur = s0
        for s, e, repl in edits:
            if s < cur:
                analysis.denials.append("internal error: overlapping rewrites")
                break
            pieces.extend(self._verbatim(sql, lexed, cur, s))
            pieces.append(repl)
            cur = e
        pieces.extend(self._verbatim(sql, lexed, cur, e0))
        return _Stmt(pieces, analysis, edited=bool(edits))

    def _opaque(self, sql: str, lexed: Lexed, s0: int, e0: int, kind: str, why: str) -> _Stmt:
        an = Analysis(kind=kind, touches=True)
        an.denials.append(f"statement naming a protected table refused: {why}")
        return _Stmt(self._verbatim(sql, lexed, s0, e0), an)


def explain_text(plan: Plan) -> str:
    """Human-readable plan, for ``pgcloak explain``."""
    lines: list[str] = []
    if plan.decision.allowed:
        lines.append("decision: allow")
    else:
        lines.append(f"decision: DENY (SQLSTATE {plan.decision.sqlstate})")
        lines.append(f"reason:   {plan.decision.message}")
    if plan.sql is not None:
        lines.append(f"rewritten: {plan.sql}")
    elif plan.template is not None and len(plan.template) > 1:
        lines.append(f"statement: {_join_template(plan.template)} (unchanged apart from values)")
    else:
        lines.append("rewritten: (sent unchanged)")
    for n, action in enumerate(plan.params, start=1):
        lines.append(f"  ${n}: {action.describe()}")
    for n, action in enumerate(plan.literals, start=1):
        lines.append(f"  $L{n}: {action.describe()}")
    if plan.copy_in is not None:
        lines.append(f"COPY FROM STDIN ({plan.copy_format}), per field:")
        for n, action in enumerate(plan.copy_in, start=1):
            lines.append(f"  field {n}: {action.describe()}")
    if plan.copy_out:
        lines.append("COPY TO STDOUT: envelopes in the stream are decrypted per key id")
    for name, inner in plan.named:
        if inner is None:
            continue
        lines.append(f"PREPARE {name}: parameters")
        for n, action in enumerate(inner.params, start=1):
            lines.append(f"  ${n}: {action.describe()}")
    for call in plan.executes:
        lines.append(f"EXECUTE {call.name}: arguments take the prepared statement's parameter actions")
    a = plan.audit
    lines.append(f"kind: {a.kind}; tables: {', '.join(a.tables) or '-'}")
    lines.append(f"pii read: {', '.join(a.pii_read) or '-'}; pii written: {', '.join(a.pii_written) or '-'}")
    lines.append(f"results may carry ciphertext: {'yes' if plan.touches_pii else 'no'}")
    return "\n".join(lines)


# -- helpers ------------------------------------------------------------------------


_PASS_BY_KIND: dict[str, Plan] = {}


_GLUED_PARAM = re.compile(r"\$\d+[^\s\d]")
# Skipped whole: quoted strings and identifiers, comments, dollar-quoted bodies.
_OPAQUE_OR_PARAM = re.compile(
    r"[Ee]'(?:[^'\\]|\\.|'')*'"
    r"|'(?:[^']|'')*'"
    r'|"(?:[^"]|"")*"'
    r"|--[^\n]*"
    r"|/\*.*?\*/"
    r"|\$([A-Za-z_][A-Za-z_0-9]*)?\$.*?\$\1\$"
    r"|(?<![A-Za-z_0-9$])(\$\d+)(?=[^\s\d])",
    re.DOTALL,
)


def unglue_params(sql: str) -> str:
    """``$1,$2`` -> ``$1 ,$2``: sqlglot reads ``$1,$`` as a dollar-quote tag (PostgreSQL
    does not: a tag cannot start with a digit). A space after a parameter outside
    strings, comments and dollar quotes means the same to PostgreSQL."""

    def fix(m: re.Match[str]) -> str:
        return m.group(0) + " " if m.group(2) else m.group(0)

    return _OPAQUE_OR_PARAM.sub(fix, sql)


def _pass_for(sql: str) -> Plan:
    """The shared pass-through plan for a statement kind (audit kind from the first word)."""
    kind = _guess_kind(sql)
    found = _PASS_BY_KIND.get(kind)
    if found is None:
        found = _PASS_BY_KIND[kind] = pass_plan(kind)
    return found


def _deny_plan(message: str, fp: str = "", sqlstate: str = FEATURE_NOT_SUPPORTED) -> Plan:
    return Plan(deny(message, sqlstate), None, (), (), True, AuditFacts("other", fingerprint=fp))


def _parameter_number(digits: str) -> int | None:
    """``n`` of ``$n`` if PostgreSQL could have such a parameter (1..65535), else None."""
    n = parameter_number(digits)
    return n if n else None


def _misread_parameter(lexed: Lexed, sql: str) -> tuple[str, str] | None:
    """Why a statement's parameters cannot be trusted to sqlglot, or None. ``@`` before
    a number is PostgreSQL's absolute value, but sqlglot reads ``@5`` (and ``@ 5``) as
    parameter ``$5``; a parameter past PostgreSQL's limit would have pgcloak plan that
    many (PostgreSQL refuses it anyway: 42P02). Messages hold no number (it may be a
    value)."""
    tokens = lexed.tokens
    for i in range(len(tokens) - 1):
        tok = tokens[i]
        if tok.token_type is not TokenType.PARAMETER or tokens[i + 1].token_type is not TokenType.NUMBER:
            continue
        if sql[tok.start : tok.end + 1] == "@":
            return (
                "the @ operator (absolute value) before a number is not supported in statements "
                "naming a protected table: write abs(...)",
                FEATURE_NOT_SUPPORTED,
            )
        digits = tokens[i + 1].text
        if digits.isdigit() and _parameter_number(digits) is None:
            return (f"there is no such parameter (PostgreSQL allows ${MAX_PARAMETER} at most)", UNDEFINED_PARAMETER)
    return None


def _join_template(template: tuple[str, ...]) -> str:
    out = [template[0]]
    for i, seg in enumerate(template[1:], start=1):
        out.append(f"$L{i}")
        out.append(seg)
    return "".join(out)


def _remember(cache: dict[str, Plan], key: str, plan: Plan, size: int) -> None:
    if len(cache) >= size:
        cache.pop(next(iter(cache)))
    cache[key] = plan


def _shape_key(sql: str, lexed: Lexed) -> str:
    if not lexed.literals:
        return sql
    out: list[str] = []
    pos = 0
    for lit in lexed.literals:
        out.append(sql[pos : lit.start])
        out.append("\x00s" if lit.kind == "string" else "\x00n")
        pos = lit.end
    out.append(sql[pos:])
    return "".join(out)


def _has_opaque_strings(lexed: Lexed) -> bool:
    strings = (TokenType.STRING, TokenType.UNICODE_STRING, TokenType.NATIONAL_STRING, TokenType.BYTE_STRING)
    prev: Token | None = None
    for i, tok in enumerate(lexed.tokens):
        if tok.token_type in strings:
            if i not in lexed.slot_of_token:
                return True
            if prev is not None and prev.token_type in strings:
                return True
        prev = tok
    return False


def _has_escaped_identifier(lexed: Lexed) -> bool:
    """Whether the text holds a ``U&"..."`` identifier (lexed as ``U``, ``&``, a quoted
    name, with nothing between them)."""
    toks = lexed.tokens
    for i in range(len(toks) - 2):
        u, amp, name = toks[i], toks[i + 1], toks[i + 2]
        if (
            amp.token_type == TokenType.AMP
            and name.token_type == TokenType.IDENTIFIER
            and u.text in ("U", "u")
            and u.token_type != TokenType.IDENTIFIER
            and amp.start == u.end + 1
            and name.start == amp.end + 1
        ):
            return True
    return False


def _copy_format(words: Sequence[str]) -> str:
    """``text``, ``csv`` or ``binary`` from the uppercased words of COPY's options."""
    fmt = "text"
    for j, word in enumerate(words):
        if word == "FORMAT" and j + 1 < len(words):
            fmt = words[j + 1].lower()
        elif word in ("CSV", "BINARY") and (j == 0 or words[j - 1] != "FORMAT"):
            fmt = word.lower()
    return fmt


_BINARY_COPY_OUT = (
    "COPY ... TO STDOUT in binary format is not supported for protected columns (their "
    "decrypted values would not match the field lengths): use text or csv format"
)


def _copy_out_options(words: Sequence[str], fmt: str) -> list[str]:
    """COPY TO options the decrypted values are not escaped for (CSV quoting is always
    with '"', which any CSV delimiter accepts; text escaping knows only the tab)."""
    options = ("QUOTE", "ESCAPE") if fmt == "csv" else ("DELIMITER",)
    return [w for w in options if w in words]


def _copy_out_denial(options: list[str]) -> str:
    return (
        f"COPY ... TO STDOUT with option {', '.join(options)} is not supported for protected "
        "columns: decrypted values are escaped for the default delimiter and quote"
    )


#: The words a COPY FROM STDIN of a protected table may use after STDIN, in either
#: syntax: the format (text or csv), HEADER, FREEZE and a UTF-8 ENCODING. Anything else
#: (DELIMITER, the old USING DELIMITERS, NULL, QUOTE, ESCAPE, FORCE_*, DEFAULT, options
#: of later releases) may change how PostgreSQL splits or reads fields, which the COPY
#: rewriter must know exactly: refused, so an unknown option never lets a field by.
_COPY_IN_WORDS: Final = frozenset(
    {"WITH", "(", ")", ",", "FORMAT", "TEXT", "CSV", "HEADER", "MATCH", "FREEZE", "ENCODING"}
    | {"TRUE", "FALSE", "ON", "OFF", "1", "0"}
)
_UTF8_NAMES: Final = frozenset(("UTF8", "UNICODE"))


#: Option words named in the refusal (other words, option values among them, are not
#: repeated back: they come from the statement's text).
_COPY_OPTION_NAMES: Final = frozenset(
    {"DELIMITER", "DELIMITERS", "NULL", "QUOTE", "ESCAPE", "FORCE_QUOTE", "FORCE_NOT_NULL"}
    | {"FORCE_NULL", "FORCE", "DEFAULT", "BINARY", "OIDS", "ON_ERROR", "REJECT_LIMIT", "LOG_VERBOSITY"}
)


def _copy_in_options(words: Sequence[str]) -> list[str]:
    """The options of a COPY FROM that the COPY rewriter does not implement."""
    found: list[str] = []
    unknown = False
    for j, word in enumerate(words):
        if j and words[j - 1] == "ENCODING":
            if "".join(c for c in word if c.isalnum()) not in _UTF8_NAMES:
                found.append("ENCODING")
        elif word in _COPY_OPTION_NAMES:
            if word not in found:
                found.append(word)
        elif word not in _COPY_IN_WORDS:
            unknown = True
    if unknown and not found:
        found.append("(an option pgcloak does not know)")
    return found


def _copy_header(words: Sequence[str]) -> bool:
    """Whether COPY FROM's options ask for a header line (HEADER, HEADER true / MATCH)."""
    for j, word in enumerate(words):
        if word == "HEADER":
            return j + 1 >= len(words) or words[j + 1] not in ("FALSE", "OFF", "0")
    return False


_ESCAPED_NAME: Final = (
    'a prepared statement name written U&"..." is not supported by pgcloak (it could not '
    "tell which statement runs): use a plain or quoted name"
)


def _literal_start(lit: Literal) -> int:
    return lit.start


def _subcommand_column(words: list[str], upper: list[str]) -> str | None:
    """The column an ``ALTER [COLUMN] c ...`` or ``ADD [COLUMN] [IF NOT EXISTS] c ...``
    subcommand is about (None: another kind of subcommand)."""
    for k, kw in enumerate(upper):
        if kw not in ("ALTER", "ADD"):
            continue
        j = k + 1
        if j < len(upper) and upper[j] == "TABLE":
            continue  # the statement's own ALTER TABLE
        while j < len(upper) and upper[j] in ("COLUMN", "IF", "NOT", "EXISTS"):
            j += 1
        if j < len(upper) and upper[j] in ("CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "EXCLUDE"):
            return None
        return words[j] if j < len(words) else None
    return None


def _guess_kind(sql: str) -> str:
    head = sql[:40].lstrip(" \t\r\n(")
    word = head.split(None, 1)[0].lower() if head else ""
    if word in ("select", "insert", "update", "delete", "merge"):
        return word
    if word in ("with", "values", "table"):
        return "select"
    if word.upper() in _DDL_KEYWORDS:
        return "ddl"
    return "other"


def _short(exc: Exception) -> str:
    """Where sqlglot could not read a statement, never what it said there: its messages
    quote the text (a tokenizer's excerpt, a token's text), and a refusal's message goes
    into the audit trail."""
    if isinstance(exc, TokenError):
        return "it could not be split into tokens"
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        line, col = errors[0].get("line"), errors[0].get("col")
        if isinstance(line, int) and isinstance(col, int):
            return f"line {line}, column {col}"
    return type(exc).__name__
