"""pgcloak.sql: statement text -> :class:`Plan` (pure; sqlglot, stdlib and policy only).

See :mod:`pgcloak.sql.planner` for the flow and :mod:`pgcloak.sql.analyze` for what is
supported on protected columns and why everything else is refused (SQLSTATE 0A000).

Not visible to a proxy, so not covered: functions, procedures, triggers, rules and
column DEFAULTs that read or write protected columns from their own bodies; DDL
(``ALTER TABLE ... USING``). Unqualified table names are resolved by the session's
``search_path`` (:mod:`pgcloak.sql.search_path`; the session follows it).
"""

from pgcloak.sql.lexer import quote_literal
from pgcloak.sql.plan import (
    PASS,
    AuditFacts,
    Decision,
    ExecuteCall,
    Literal,
    Plan,
    ValueAction,
    read_denial,
)
from pgcloak.sql.planner import (
    Planner,
    explain_text,
    fingerprint,
    names_protected_table,
    needs_parse,
)

__all__ = [
    "PASS",
    "AuditFacts",
    "Decision",
    "ExecuteCall",
    "Literal",
    "Plan",
    "Planner",
    "ValueAction",
    "explain_text",
    "fingerprint",
    "names_protected_table",
    "needs_parse",
    "quote_literal",
    "read_denial",
]
