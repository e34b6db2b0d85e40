"""EXECUTE sent as the statement the name stands for (pgcloak.sql.prepared)."""

from __future__ import annotations

import pytest

from pgcloak.sql.lexer import tokenize
from pgcloak.sql.prepared import Definition, InlineRefused, fold_name, inline_executes

INSERT = Definition("INSERT INTO users (email, ssn) VALUES ($1, $2)", ("text", "text"))


def test_arguments_take_the_place_of_their_parameters_with_the_declared_types() -> None:
    sql, _ = inline_executes("EXECUTE ins('a@example.com', NULL)", {"ins": INSERT})
    assert sql == "INSERT INTO users (email, ssn) VALUES (('a@example.com')::text, (NULL)::text)"


def test_a_parameter_used_twice_gets_its_argument_twice_and_strings_are_left_alone() -> None:
    body = Definition("SELECT '$1', $1 || $2, $10", ())
    args = ", ".join(f"'{i}'" for i in range(1, 11))
    sql, _ = inline_executes(f"EXECUTE p({args})", {"p": body})
    assert sql == "SELECT '$1', ('1') || ('2'), ('10')"


def test_the_rest_of_the_text_is_kept_and_the_registry_follows_it_in_order() -> None:
    text = (
        "SELECT 1; PREPARE a(int) AS SELECT $1; EXECUTE a(5); DEALLOCATE a; "
        "PREPARE b AS SELECT 2; PREPARE b AS SELECT 3; EXECUTE b"
    )
    sql, after = inline_executes(text, {})
    assert sql == (
        "SELECT 1; PREPARE a(int) AS SELECT $1; SELECT (5)::int; DEALLOCATE a; "
        "PREPARE b AS SELECT 2; PREPARE b AS SELECT 3; SELECT 2"  # the second PREPARE b is refused
    )
    assert after == {"b": Definition("SELECT 2")}
    assert inline_executes("DEALLOCATE ALL", after)[1] == {}
    assert inline_executes("DEALLOCATE PREPARE b", after)[1] == {}


@pytest.mark.parametrize(
    ("text", "sqlstate"),
    [
        ("EXECUTE nope(1)", "26000"),
        ("EXECUTE ins('a')", "42601"),  # too few
        ("EXECUTE ins('a', 'b', 'c')", "42601"),  # too many
        ('EXECUTE U&"\\0069ns"(1, 2)', "0A000"),
    ],
)
def test_what_cannot_be_sent_as_its_statement_is_refused(text: str, sqlstate: str) -> None:
    with pytest.raises(InlineRefused) as info:
        inline_executes(text, {"ins": INSERT})
    assert info.value.sqlstate == sqlstate


def test_a_create_trigger_executing_a_function_is_not_an_execute() -> None:
    text = "CREATE TRIGGER t BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION f()"
    assert inline_executes(text, {})[0] == text


def test_a_statement_prepared_with_the_protocol_is_sent_with_its_text() -> None:
    sql, _ = inline_executes("EXECUTE s1($1)", {}, lambda name: "SELECT $1 FROM t" if name == "s1" else None)
    assert sql == "SELECT ($1) FROM t"


@pytest.mark.parametrize(
    ("spelled", "folded"),
    [
        ("Ins", "ins"),
        ('"Ins"', "Ins"),
        ("FÖÖ", "fÖÖ"),  # PostgreSQL lowercases ASCII letters only (UTF-8)
        ("a" * 70, "a" * 63),
        ('"' + "é" * 40 + '"', "é" * 31),  # 63 bytes, not cutting a character
    ],
)
def test_names_fold_as_postgresql_folds_them(spelled: str, folded: str) -> None:
    assert fold_name(tokenize(f"EXECUTE {spelled}")[1]) == folded
