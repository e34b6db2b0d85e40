"""pin_backslashes: '...' constants holding a backslash respelled E'...' so that they
read the same whatever standard_conforming_strings is, and nothing else touched."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcloak.sql.lexer import LexError, NationalBackslash, lex, pin_backslashes


def test_text_without_backslash_is_returned_as_is() -> None:
    sql = "SELECT 'a', E'b', $$c$$ FROM t"
    assert pin_backslashes(sql) is sql
    assert pin_backslashes(sql, escaping=True) is sql


def test_setting_on_reading_pins_the_backslash_as_a_character() -> None:
    sql = "INSERT INTO t VALUES ('a\\' || ' , $$x$$) --', 'b')"
    assert pin_backslashes(sql) == "INSERT INTO t VALUES (E'a\\\\' || ' , $$x$$) --', 'b')"


def test_setting_off_reading_keeps_the_escapes() -> None:
    sql = "INSERT INTO t VALUES ('a\\' || ' , $$x$$) --', 'b')"
    assert pin_backslashes(sql, escaping=True) == "INSERT INTO t VALUES (E'a\\' || ' , $$x$$) --', 'b')"
    assert [lit.value for lit in lex(pin_backslashes(sql, escaping=True)).literals] == ["a' || ", "x"]


def test_other_constants_are_left_alone() -> None:
    sql = "SELECT E'a\\\\b', $$c\\$$, \"col\\\", 'x' -- '\\\n"
    assert pin_backslashes(sql) == sql


def test_national_constant_with_a_backslash_has_no_pinned_spelling() -> None:
    with pytest.raises(NationalBackslash):
        pin_backslashes("SELECT N'a\\b'")


def test_untokenizable_text_is_a_lex_error_that_quotes_nothing() -> None:
    with pytest.raises(LexError) as info:
        pin_backslashes("SELECT 'secret\\", escaping=True)
    assert "secret" not in str(info.value)


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30))
def test_pinned_constant_reads_back_as_the_value_pgcloak_saw(value: str) -> None:
    sql = "SELECT '" + value.replace("'", "''") + "', 1"
    (lit,) = [x for x in lex(pin_backslashes(sql)).literals if x.kind == "string"]
    assert lit.value == value
