"""``search_path``: which schemas an unqualified table name may mean, and statements that change it.

pgcloak has no catalog, so it resolves an unqualified table name against the session's
``search_path`` and the policy: the first schema on the path under which the policy
protects a table of that name (:func:`resolve_table`). The session asks PostgreSQL for its
path (at start-up, and again after any statement that may have changed it), and in
between predicts the effect of the changes its client sends, which this module
recognizes (:func:`search_path_change`):

* ``set``: ``SET [SESSION | LOCAL] search_path {TO | =} item [, ...]`` and ``SET SCHEMA``;
* ``probe``: a change whose result only PostgreSQL knows: ``RESET search_path``, ``RESET
  ALL``, ``DISCARD ALL``, ``SET ... search_path TO DEFAULT``, ``SET ROLE``, ``SET SESSION
  AUTHORIZATION`` (``"$user"``), ``set_config('search_path', ...)`` (or with a name that
  is not a constant), ``DO`` and ``CALL`` (their bodies may change it), text with ``U&``
  escapes, and SET syntax pgcloak does not read;
* ``refuse``: a change sent in one Query string together with other statements (they
  are planned together, before it runs).

Pure (no IO).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from sqlglot.tokenizer_core import Token, TokenType

from pgcloak.policy import Policy
from pgcloak.policy.names import quote_ident
from pgcloak.sql.lexer import LexError, decode_string, split_statements, tokenize

__all__ = [
    "DEFAULT_PATH",
    "PROBE",
    "SearchPathChange",
    "bound_spelling",
    "parse_setting",
    "resolve_items",
    "resolve_table",
    "search_path_change",
    "unknown_path_message",
]


#: Words one of which every text that may change the search_path contains (lowercase),
#: besides a leading DO or CALL.
_HINTS: Final = ("search_path", "schema", "role", "authorization", "reset", "discard", "set_config", "u&")
#: The path pgcloak assumes where it knows no other (the planner's default).
DEFAULT_PATH: Final = ("public",)
_CACHE_SIZE = 1024
#: Longer texts are not kept (a bulk INSERT that merely contains the word "reset").
_CACHE_TEXT_MAX = 2048
_cache: dict[str, SearchPathChange | None] = {}


@dataclass(frozen=True, slots=True)
class SearchPathChange:
    """What one statement text does to the session's ``search_path``.

    ``kind``: ``set`` (to ``items``, as written, ``$user`` included), ``probe`` (what it
    becomes only PostgreSQL can say) or ``refuse`` (``message`` says why; SQLSTATE
    0A000). ``local``: a ``SET LOCAL``, which ends with its transaction.
    """

    kind: Literal["set", "probe", "refuse"]
    items: tuple[str, ...] = ()
    local: bool = False
    message: str = ""


def resolve_table(policy: Policy, search_path: tuple[str, ...] | None, name: str) -> str | None:
    """The table an unqualified ``name`` means: ``schema.name`` for the first schema on
    the path under which the policy protects ``name``; ``public.name`` when none does.

    None when the path is unknown (``search_path`` None: a change the session has not
    learned the result of yet) and the policy protects ``name`` in some schema: the
    caller refuses the statement. Without a catalog, pgcloak cannot see an unprotected
    table of the same name earlier on the path; it then treats the name as the protected
    table (values are encrypted that need not be: the safe side).
    """
    if search_path is None:
        return None if name in policy.protected_names() else f"public.{name}"
    protected = policy.protected_tables()
    for schema in search_path:
        qualified = f"{schema}.{name}"
        if qualified in protected:
            return qualified
    return f"public.{name}"


def bound_spelling(resolved: str, name: str, spelled: str) -> str:
    """``spelled`` (an unqualified table name as written) qualified with the schema of
    ``resolved`` (what :func:`resolve_table` made of its canonical ``name``): what is sent
    for a name the policy protects outside ``public``, so that PostgreSQL reaches the table
    pgcloak resolved whatever its search_path has become."""
    return f"{quote_ident(resolved[: -len(name) - 1])}.{spelled}"


def unknown_path_message(name: str) -> str:
    """Why a statement naming ``name`` unqualified is refused while the path is unknown."""
    return (
        f"table name {name} is not schema-qualified and this session's search_path is not "
        "known to pgcloak yet (a statement sent after a search_path change before its reply "
        "came back); qualify the name, or wait for the change to complete"
    )


def search_path_change(sql: str) -> SearchPathChange | None:
    """The change ``sql`` makes to the search_path, or None when it makes none."""
    # A cheap test first (every Query and Parse passes here): lowercasing and a few
    # substring searches cost a tenth of one case-insensitive regular expression.
    low = sql.lower()
    if not any(word in low for word in _HINTS) and not low.lstrip(" \t\r\n(").startswith(("do", "call")):
        return None
    if sql in _cache:
        return _cache[sql]
    result = _change_of(sql)
    if len(sql) <= _CACHE_TEXT_MAX:
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
    if found is None and "u&" in sql.lower():
        found = _PROBE  # U&"..." names may spell set_config or search_path: ask afterwards
    if found is not None and found.kind != "refuse" and len(ranges) > 1:
        return _refuse("a search_path change sent with other statements in one Query")
    return found


def _word(tok: Token) -> str:
    return tok.text if tok.token_type == TokenType.IDENTIFIER else tok.text.lower()


_PROBE = SearchPathChange("probe")
#: A change whose result PostgreSQL is asked for.
PROBE: Final = _PROBE
_BARE_WORD = re.compile(r"[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*")


def _statement_change(sql: str, toks: list[Token]) -> SearchPathChange | None:
    if not toks:
        return None
    head = toks[0].text.upper()
    words = [_word(t).lower() for t in toks[:4]]
    if head == "SET":
        i = 1
        local = False
        if i < len(toks) and toks[i].text.upper() in ("SESSION", "LOCAL"):
            local = toks[i].text.upper() == "LOCAL"
            i += 1
        name = _word(toks[i]).lower() if i < len(toks) else ""
        if name == "search_path":
            return _set_items(sql, toks[i + 1 :], local)
        if name == "schema":  # SET SCHEMA 'x': an alias of SET search_path TO 'x'
            return _set_items(sql, toks[i + 1 :], local, value_only=True)
        if name == "role" or words[1:3] == ["session", "authorization"]:
            return _PROBE  # "$user" is the current user
    elif (head == "RESET" and len(words) >= 2 and (
        words[1] in ("search_path", "all", "role") or words[1:3] == ["session", "authorization"]
    )) or (head == "DISCARD" and words[1:2] == ["all"]) or head in ("DO", "CALL"):
        return _PROBE
    return _set_config(sql, toks)


def _string(sql: str, tok: Token) -> str | None:
    """The value of a string constant token, or None when ``tok`` is not one."""
    if tok.token_type not in (TokenType.STRING, TokenType.NATIONAL_STRING):
        return None
    return decode_string(tok.token_type, sql[tok.start : tok.end + 1])


def _set_items(sql: str, toks: list[Token], local: bool, *, value_only: bool = False) -> SearchPathChange:
    """``TO | = item [, ...]`` (``value_only``: the items alone, as SET SCHEMA has them)."""
    if value_only:
        rest = toks
    elif toks and toks[0].text.upper() in ("TO", "="):
        rest = toks[1:]
    else:
        return _PROBE  # FROM CURRENT, or a syntax PostgreSQL will refuse: ask it

    if len(rest) == 1 and rest[0].text.upper() == "DEFAULT":
        return _PROBE
    items: list[str] = []
    expect_item = True
    for tok in rest:
        if expect_item:
            value = _string(sql, tok)
            if value is not None:
                items.append(value)
            elif tok.token_type == TokenType.IDENTIFIER:
                items.append(tok.text)
            elif _BARE_WORD.fullmatch(tok.text):  # a name, keywords included (temp, json...)
                items.append(tok.text.lower())
            else:
                return _PROBE  # E'...', $$...$$, ...: PostgreSQL says what it made of it
        elif tok.token_type != TokenType.COMMA:
            return _PROBE
        expect_item = not expect_item
    if expect_item:  # empty, or a trailing comma: PostgreSQL refuses it
        return _PROBE
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
            return _PROBE  # a setting name that is not a constant
        if name.strip().lower() == "search_path":
            return _PROBE
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
