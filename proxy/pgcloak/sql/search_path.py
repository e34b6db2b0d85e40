"""``search_path``: which schemas an unqualified table name may mean, and statements that change it.

pgcloak has no catalog, so it resolves an unqualified table name against the session's
``search_path`` and the policy: the first schema on the path under which the policy
protects a table of that name (see :meth:`pgcloak.sql.planner.Planner`). For that the
session must know its path. It asks PostgreSQL at start-up, and follows the statements
that change it, which this module recognizes:

* ``SET [SESSION | LOCAL] search_path {TO | =} {DEFAULT | item [, ...]}``;
* ``RESET search_path``, ``RESET ALL``, ``DISCARD ALL`` (back to the session default);
* refused, because pgcloak could not follow them: ``set_config('search_path', ...)`` or
  ``set_config`` with a name that is not a constant, ``SET search_path FROM CURRENT``,
  and a change sent in one Query string together with other statements (the statements
  after it would be planned for the old path).

Pure (no IO); results are cached by text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from sqlglot.tokenizer_core import Token, TokenType

from pgcloak.policy import Policy
from pgcloak.sql.lexer import LexError, decode_string, split_statements, tokenize

__all__ = [
    "DEFAULT_PATH",
    "SearchPathChange",
    "parse_setting",
    "resolve_items",
    "resolve_table",
    "search_path_change",
]

#: What PostgreSQL's default ``search_path`` is.
DEFAULT_SETTING: Final = '"$user", public'

#: The path pgcloak assumes where it knows no other (the planner's default).
DEFAULT_PATH: Final = ("public",)
_CACHE_SIZE = 1024
_cache: dict[str, SearchPathChange | None] = {}


@dataclass(frozen=True, slots=True)
class SearchPathChange:
    """What one statement text does to the session's ``search_path``.

    ``kind``: ``set`` (to ``items``, as written, ``$user`` included), ``reset`` (to the
    session default) or ``refuse`` (``message`` says why; SQLSTATE 0A000). ``local``: a
    ``SET LOCAL``, which ends with the transaction.
    """

    kind: Literal["set", "reset", "refuse"]
    items: tuple[str, ...] = ()
    local: bool = False
    message: str = ""


def resolve_table(policy: Policy, search_path: tuple[str, ...], name: str) -> str:
    """The table an unqualified ``name`` means: ``schema.name`` for the first schema on
    the path under which the policy protects ``name``; ``public.name`` when none does.

    Without a catalog, pgcloak cannot see an unprotected table of the same name earlier
    on the path; it then treats the name as the protected table (values are encrypted
    that need not be: the safe side).
    """
    protected = policy.protected_tables()
    for schema in search_path:
        qualified = f"{schema}.{name}"
        if qualified in protected:
            return qualified
    return f"public.{name}"


def search_path_change(sql: str) -> SearchPathChange | None:
    """The change ``sql`` makes to the search_path, or None when it makes none."""
    # A cheap test first (every Query and Parse passes here): lowercasing and four
    # substring searches cost a tenth of one case-insensitive regular expression.
    low = sql.lower()
    if "search_path" not in low and "reset" not in low and "discard" not in low and "set_config" not in low:
        return None
    if sql in _cache:
        return _cache[sql]
    result = _change_of(sql)
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[sql] = result
    return result


def _refuse(why: str) -> SearchPathChange:
    return SearchPathChange(
        "refuse",
        message=f"{why}: pgcloak resolves unqualified table names by the session's search_path "
        "and could not follow this change (change it with SET search_path ... sent as a "
        "statement of its own)",
    )


def _change_of(sql: str) -> SearchPathChange | None:
    try:
        tokens = tokenize(sql)
    except LexError:
        return None  # the planner refuses or passes it; PostgreSQL will not run it either
    ranges = split_statements(tokens)
    found: SearchPathChange | None = None
    for a, b in ranges:
        change = _statement_change(sql, tokens[a:b])
        if change is not None and (found is None or change.kind == "refuse"):
            found = change
    if found is not None and found.kind != "refuse" and len(ranges) > 1:
        return _refuse("a search_path change sent with other statements in one Query")
    return found


def _word(tok: Token) -> str:
    return tok.text if tok.token_type == TokenType.IDENTIFIER else tok.text.lower()


def _statement_change(sql: str, toks: list[Token]) -> SearchPathChange | None:
    if not toks:
        return None
    head = toks[0].text.upper()
    words = [_word(t) for t in toks[:3]]
    if head == "SET":
        i = 1
        local = False
        if i < len(toks) and toks[i].text.upper() in ("SESSION", "LOCAL"):
            local = toks[i].text.upper() == "LOCAL"
            i += 1
        if i < len(toks) and _word(toks[i]).lower() == "search_path":
            return _set_items(sql, toks[i + 1 :], local)
    elif (head == "RESET" and len(words) == 2 and words[1].lower() in ("search_path", "all")) or (head == "DISCARD" and len(words) == 2 and words[1].lower() == "all"):
        return SearchPathChange("reset")
    return _set_config(sql, toks)


def _string(sql: str, tok: Token) -> str | None:
    """The value of a string constant token, or None when ``tok`` is not one."""
    if tok.token_type not in (TokenType.STRING, TokenType.NATIONAL_STRING):
        return None
    return decode_string(tok.token_type, sql[tok.start : tok.end + 1])


def _set_items(sql: str, toks: list[Token], local: bool) -> SearchPathChange:
    if not toks:
        return _refuse("an incomplete SET search_path")
    if toks[0].text.upper() == "FROM":
        return _refuse("SET search_path FROM CURRENT")
    if toks[0].text.upper() not in ("TO", "="):
        return _refuse("an unrecognized SET search_path")
    rest = toks[1:]
    if len(rest) == 1 and rest[0].text.upper() == "DEFAULT":
        return SearchPathChange("reset", local=local)
    items: list[str] = []
    expect_item = True
    for tok in rest:
        if expect_item:
            value = _string(sql, tok)
            if value is not None:
                items.append(value)
            elif tok.token_type == TokenType.IDENTIFIER:
                items.append(tok.text)
            elif tok.token_type == TokenType.VAR and tok.text and (tok.text[0].isalpha() or tok.text[0] == "_"):
                items.append(tok.text.lower())
            else:
                return _refuse("an unrecognized SET search_path")
        elif tok.token_type != TokenType.COMMA:
            return _refuse("an unrecognized SET search_path")
        expect_item = not expect_item
    if expect_item:  # empty, or a trailing comma
        return _refuse("an unrecognized SET search_path")
    return SearchPathChange("set", tuple(items), local)


def _set_config(sql: str, toks: list[Token]) -> SearchPathChange | None:
    """``set_config(name, ...)`` with ``search_path`` or a name that is not a constant."""
    for i, tok in enumerate(toks):
        if tok.text.lower() != "set_config" or i + 2 >= len(toks):
            continue
        if toks[i + 1].token_type != TokenType.L_PAREN:
            continue
        name = _string(sql, toks[i + 2])
        if name is None or (i + 3 < len(toks) and toks[i + 3].token_type != TokenType.COMMA):
            return _refuse("set_config() with a setting name that is not a constant")
        if name.strip().lower() == "search_path":
            return _refuse("set_config('search_path', ...)")
    return None


def parse_setting(setting: str, user: str) -> tuple[str, ...]:
    """The schemas of a ``search_path`` value as ``current_setting`` shows it.

    ``"$user", public`` for the user ``alice`` is ``("alice", "public")``: unquoted names
    fold to lowercase, quoted ones are taken as written. Text pgcloak cannot read gives
    the default path (PostgreSQL would not have accepted it).
    """
    items: list[str] = []
    for raw in _split_list(setting):
        items.append(user if raw == "$user" else raw)
    return tuple(items)


def resolve_items(items: tuple[str, ...], user: str) -> tuple[str, ...]:
    """``SET search_path`` items as schemas (``$user`` is the session user)."""
    return tuple(user if item == "$user" else item for item in items)


_ITEM = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^",\s]+))\s*(?:,|$)')


def _split_list(setting: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = setting.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None or m.end() == pos:
            return ["$user", "public"]
        quoted, bare = m.group(1), m.group(2)
        out.append(quoted.replace('""', '"') if quoted is not None else bare.lower())
        pos = m.end()
    return out
