"""The planner's output: what the session does with one statement text.

Everything here is immutable and shared between sessions: a Plan is cached by
statement text (extended protocol) or by statement shape (simple protocol), so it
holds no literal values, only what to do with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal as TLiteral

ActionKind = TLiteral["pass", "store", "lookup"]

#: ``named``'s name for ``DEALLOCATE ALL`` (no statement name holds a NUL; ``"ALL"`` quoted
#: is a statement of that name).
DEALLOCATE_ALL = "\0ALL"
#: ``named``'s name for ``DISCARD ALL``: DEALLOCATE ALL too, but never in a transaction block.
DISCARD_ALL = "\0DISCARD"


@dataclass(frozen=True, slots=True)
class ValueAction:
    """What to do with one parameter or literal before it reaches PostgreSQL.

    ``store``: the value is written into a protected column: encrypt it (``encrypt``)
    and/or prefix its blind index (``index``), or replace it by the index (``hash_only``).
    ``lookup``: the value is compared with a protected column: replace it by the blind
    index of the normalized value. ``array``: the value is a PostgreSQL array (text or
    binary) whose elements each get the action (``col = ANY($1)``).
    """

    kind: ActionKind
    table: str | None = None
    column: str | None = None
    key_id: str | None = None
    index_key_id: str | None = None
    normalize: str = "none"
    encrypt: bool = False
    index: bool = False
    hash_only: bool = False
    array: bool = False

    def describe(self) -> str:
        """One line for ``pgcloak explain`` and error messages."""
        if self.kind == "pass":
            return "pass"
        target = f"{self.table}.{self.column}"
        if self.kind == "lookup":
            what = "blind index"
            if self.array:
                what += " of each array element"
            return f"lookup {target}: {what} (key {self.index_key_id}, normalize {self.normalize})"
        if self.hash_only:
            how = f"blind index only (key {self.index_key_id})"
        elif self.index:
            how = f"blind index (key {self.index_key_id}) + envelope (key {self.key_id})"
        else:
            how = f"envelope (key {self.key_id})"
        return f"store {target}: {how}"


PASS = ValueAction("pass")


@dataclass(frozen=True, slots=True)
class Decision:
    """Allow, or deny with the SQLSTATE and message the client gets in an ErrorResponse."""

    allowed: bool
    sqlstate: str = ""
    message: str = ""


ALLOW = Decision(True)
#: SQLSTATE feature_not_supported: what every refusal of the planner uses.
FEATURE_NOT_SUPPORTED = "0A000"
#: "there is no parameter $n"
UNDEFINED_PARAMETER = "42P02"
#: SQLSTATE insufficient_privilege: a refusal by the policy's guards.
INSUFFICIENT_PRIVILEGE = "42501"


def deny(message: str, sqlstate: str = FEATURE_NOT_SUPPORTED) -> Decision:
    return Decision(False, sqlstate, message)


@dataclass(frozen=True, slots=True)
class AuditFacts:
    """What the audit trail records about a statement; never a literal value."""

    kind: str
    tables: tuple[str, ...] = ()
    pii_read: tuple[str, ...] = ()
    pii_written: tuple[str, ...] = ()
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal constant found in a statement text (simple protocol, or literals in Parse).

    ``value`` is the text the server would see (quotes removed, escapes decoded);
    ``raw`` the exact source spelling, ``start``/``end`` its span in the text.
    """

    value: str
    raw: str
    start: int
    end: int
    kind: TLiteral["string", "number"]


@dataclass(frozen=True, slots=True)
class ExecuteCall:
    """``EXECUTE name(args)``: the session sends it as the statement ``name`` stands for
    (:func:`pgcloak.sql.prepared.inline_executes`)."""

    name: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's verdict for one statement text (possibly several statements).

    ``sql`` is the rewritten text with literal slot ``i`` shown as ``$L{i+1}``, or None
    when the text needs no structural change. Whenever ``needs_render`` is true the
    session sends ``Planner.render(plan, values)`` instead of the original text.
    ``params[n-1]`` is the action for ``$n`` (missing entries mean pass);
    ``literals[i]`` for the i-th literal in order of appearance.
    """

    decision: Decision
    sql: str | None
    params: tuple[ValueAction, ...]
    literals: tuple[ValueAction, ...]
    touches_pii: bool
    audit: AuditFacts
    copy_in: tuple[ValueAction, ...] | None = None
    copy_format: str | None = None
    #: COPY FROM with HEADER: the data's first record is PostgreSQL's to skip or match.
    copy_header: bool = False
    #: Segments around literal slots: ``len(template) == len(literals) + 1``.
    template: tuple[str, ...] | None = None
    #: Every SQL-level ``PREPARE name AS ...`` (name, the inner statement's plan, whose
    #: params are what a later ``EXECUTE name(...)`` applies to its arguments) and
    #: ``DEALLOCATE name`` (name, None; :data:`DEALLOCATE_ALL` for DEALLOCATE ALL) of the text, in
    #: order: the session's registry must follow all of them, or a statement it does not
    #: know would run with values it never saw.
    named: tuple[tuple[str, Plan | None], ...] = ()
    #: ``EXECUTE name(...)`` calls in this text (the session sends them inlined).
    executes: tuple[ExecuteCall, ...] = ()
    #: COPY ... TO STDOUT of a protected table or query over one.
    copy_out: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def prepare(self) -> tuple[str, Plan] | None:
        """The text's first ``PREPARE``: (name, inner plan)."""
        return next(((name, inner) for name, inner in self.named if inner is not None), None)

    @property
    def deallocate(self) -> str | None:
        """The text's first ``DEALLOCATE`` name."""
        return next((name for name, inner in self.named if inner is None), None)

    @property
    def execute(self) -> str | None:
        """Name of the (first) statement run by ``EXECUTE``, if any."""
        return self.executes[0].name if self.executes else None

    @property
    def needs_render(self) -> bool:
        """True when the original text must not be sent as is."""
        return self.sql is not None or any(a.kind != "pass" for a in self.literals)


def pass_plan(kind: str = "other", fingerprint: str = "") -> Plan:
    return Plan(ALLOW, None, (), (), False, AuditFacts(kind, fingerprint=fingerprint))


PASS_PLAN = pass_plan()


def read_denial(plan: Plan, decide: Callable[[str], str]) -> tuple[str, bool] | None:
    """The first protected column ``plan`` reads (select list, ``RETURNING``, ``*``) or
    searches by (a lookup tells whether a value exists), its PREPAREs' statements
    included, for which ``decide(key_id)`` is ``"deny"``: ``(key id, searched)``."""
    for one in (plan, *(inner for _, inner in plan.named if inner is not None)):
        for key_id in one.audit.pii_read:
            if decide(key_id) == "deny":
                return key_id, False
        for action in (*one.params, *one.literals):
            if action.kind == "lookup":
                key_id = action.key_id or f"{action.table}.{action.column}"
                if decide(key_id) == "deny":
                    return key_id, True
    return None


def denied_plan(message: str, kind: str = "other", fingerprint: str = "") -> Plan:
    return Plan(deny(message), None, (), (), True, AuditFacts(kind, fingerprint=fingerprint))
