"""`$1,$2` (psycopg's `%s,%s`) must plan like `$1, $2`; sqlglot alone reads `$1,$` as a dollar quote."""

from __future__ import annotations

from pgcloak.crypto.blind_index import INDEX_LENGTH
from pgcloak.policy import load_policy
from pgcloak.sql import Planner
from pgcloak.sql.planner import unglue_params


def _planner() -> Planner:
    return Planner(load_policy("policies/example.yaml"), index_length=INDEX_LENGTH)


def test_glued_params_are_planned() -> None:
    plan = _planner().plan("INSERT INTO users (email, phone) VALUES ($1,$2)")
    assert plan.decision.allowed
    assert [a.kind for a in plan.params] == ["store", "store"]
    lookup = _planner().plan("SELECT id FROM users WHERE email=$1 AND phone=$2")
    assert lookup.decision.allowed and [a.kind for a in lookup.params] == ["lookup", "lookup"]


def test_unglue_leaves_strings_comments_and_dollar_quotes_alone() -> None:
    text = "select '$1,$2', E'\\'$1,$', $$x$1,$$, $a$ $1,$2 $a$ /* $1,$2 */ -- $1,$2\n $12::text,$3"
    assert unglue_params(text) == (
        "select '$1,$2', E'\\'$1,$', $$x$1,$$, $a$ $1,$2 $a$ /* $1,$2 */ -- $1,$2\n $12 ::text,$3"
    )
    assert unglue_params("VALUES ($1,$2)") == "VALUES ($1 ,$2 )"
