"""SQL-level prepared statements: ``EXECUTE name(args)`` sent as the statement itself.

pgcloak cannot see which statement PostgreSQL holds under a name: a ``PREPARE`` it
refuses (42P05: the name exists, e.g. after a ``DEALLOCATE`` that failed in an aborted
transaction or was skipped after an error), one run again from a statement the client
prepared with the protocol, or one made by a function behind pgcloak's back. If
``EXECUTE`` ran the server's statement with arguments transformed for the one pgcloak
believes in, a protected value could reach the server in clear. So pgcloak never lets
``EXECUTE`` run the server's statement: it sends the statement it knows for the name
with the arguments in place of ``$n`` (cast to the declared types), which it then plans
like any other text: what runs is what pgcloak encrypts for, whatever the server holds.

Pure (no IO).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlglot.tokenizer_core import Token, TokenType

from pgcloak.sql.lexer import LexError, escaped_name, matching_paren, split_statements, tokenize

__all__ = ["Definition", "InlineRefused", "fold_name", "inline_executes", "truncated"]

#: PostgreSQL's identifiers are at most NAMEDATALEN - 1 bytes: longer ones are truncated.
_MAX_IDENTIFIER_BYTES = 63


@dataclass(frozen=True, slots=True)
class Definition:
    """What ``PREPARE name [(types)] AS body`` prepared: the body as the client wrote it
    (planned again at each EXECUTE, under the rules then in force) and the declared
    parameter types (as written; may be fewer than the body's parameters)."""

    body: str
    types: tuple[str, ...] = ()


class InlineRefused(Exception):
    """An EXECUTE pgcloak cannot send as its statement: ``sqlstate`` and ``message``."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def truncated(name: str) -> str:
    """A name as PostgreSQL keeps it: at most 63 bytes, longer ones cut (statement names
    from the protocol too), never inside a character."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _MAX_IDENTIFIER_BYTES:
        return name
    return raw[:_MAX_IDENTIFIER_BYTES].decode("utf-8", "ignore")


def fold_name(tok: Token) -> str:
    """A statement name as PostgreSQL folds it: ASCII letters lowercased unless quoted
    (PostgreSQL leaves other letters alone in UTF-8), truncated to 63 bytes."""
    if tok.token_type == TokenType.IDENTIFIER:
        return truncated(tok.text)
    return truncated("".join(c.lower() if "A" <= c <= "Z" else c for c in tok.text))


def comma_items(toks: list[Token], lo: int, hi: int) -> list[tuple[int, int]]:
    """Token ranges of the comma-separated items in ``[lo, hi)`` (nesting respected)."""
    out: list[tuple[int, int]] = []
    depth, start = 0, lo
    for j in range(lo, hi):
        tt = toks[j].token_type
        if tt in (TokenType.L_PAREN, TokenType.L_BRACKET):
            depth += 1
        elif tt in (TokenType.R_PAREN, TokenType.R_BRACKET):
            depth -= 1
        elif tt == TokenType.COMMA and depth == 0:
            out.append((start, j))
            start = j + 1
    if hi > start:
        out.append((start, hi))
    return out


def _definition(sql: str, toks: list[Token], a: int, b: int) -> tuple[str, Definition] | None:
    """``PREPARE name [(types)] AS body`` at tokens ``[a, b)``; None if not that shape."""
    if a + 1 >= b or escaped_name(toks, a + 1):
        return None
    name = fold_name(toks[a + 1])
    i = a + 2
    types: tuple[str, ...] = ()
    if i < b and toks[i].token_type == TokenType.L_PAREN:
        close = matching_paren(toks, i, b)
        types = tuple(sql[toks[lo].start : toks[hi - 1].end + 1] for lo, hi in comma_items(toks, i + 1, close))
        i = close + 1
    if i + 1 >= b or toks[i].text.upper() != "AS":
        return None
    if toks[i + 1].text.upper() not in _PREPARABLE and toks[i + 1].token_type != TokenType.L_PAREN:
        return None  # PostgreSQL refuses it (EXECUTE, PREPARE, DEALLOCATE... cannot be prepared)
    return name, Definition(sql[toks[i + 1].start : toks[b - 1].end + 1], types)


#: What PostgreSQL lets PREPARE prepare (besides a parenthesized query).
_PREPARABLE = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "WITH", "TABLE"})


def _inline(definition: Definition, args: list[str], name: str) -> str:
    """The body with ``$n`` replaced by argument n (cast to its declared type)."""
    try:
        toks = tokenize(definition.body)
    except LexError:
        raise InlineRefused("0A000", f'prepared statement "{name}" could not be read by pgcloak') from None
    out: list[str] = []
    at = 0
    used = 0
    for j, tok in enumerate(toks):
        if tok.token_type != TokenType.PARAMETER or j + 1 >= len(toks):
            continue
        number = toks[j + 1]
        if number.token_type != TokenType.NUMBER or not number.text.isdigit() or number.start != tok.end + 1:
            continue
        n = int(number.text)
        if not 1 <= n <= len(args):
            raise InlineRefused(
                "42601", f'wrong number of parameters for prepared statement "{name}": ${n}, got {len(args)}'
            )
        used = max(used, n)
        value = f"({args[n - 1]})"
        if n <= len(definition.types):
            value += f"::{definition.types[n - 1]}"
        out.append(definition.body[at : tok.start])
        out.append(value)
        at = number.end + 1
    out.append(definition.body[at:])
    if len(args) != max(used, len(definition.types)):
        raise InlineRefused(
            "42601",
            f'wrong number of parameters for prepared statement "{name}": expected '
            f"{max(used, len(definition.types))}, got {len(args)}",
        )
    return "".join(out)


def inline_executes(
    sql: str,
    known: Mapping[str, Definition],
    protocol_text: Callable[[str], str | None] = lambda name: None,
    vet: Callable[[str, Definition], None] = lambda name, definition: None,
    server_name: Callable[[str], str | None] = lambda name: None,
    discards: bool = True,
) -> tuple[str, dict[str, Definition]]:
    """``sql`` with every ``EXECUTE name(args)`` statement replaced by the statement
    ``name`` stands for, and the session's SQL-level definitions once the text ran.

    ``known``: the definitions before this text. A PREPARE of a name already defined is
    not taken (PostgreSQL refuses it, 42P05). ``protocol_text``: the text of a statement
    the client prepared with the protocol (its ``$n`` are its parameters). Raises
    :class:`InlineRefused` for an EXECUTE of a name neither knows (26000), one written
    ``U&"..."``, or with arguments that do not fit.
    ``vet`` sees each definition before it is used (with its ``$n``: the caller plans it
    under the rules in force and raises :class:`InlineRefused` for what they refuse,
    which the inlined text alone would not show, e.g. one parameter used twice).
    ``server_name``: the name the server knows a protocol-level statement by; a
    ``DEALLOCATE`` of it is sent with that name. ``discards``: whether a ``DISCARD ALL``
    takes effect (PostgreSQL refuses it in a transaction block).
    """
    toks = tokenize(sql)
    local = dict(known)
    out: list[str] = []
    at = 0
    for a, b in split_statements(toks):
        word = toks[a].text.upper()
        if word == "PREPARE":
            found = _definition(sql, toks, a, b)
            if found is not None and found[0] not in local:
                local[found[0]] = found[1]
            continue
        if word == "DISCARD":
            if discards and a + 1 < b and toks[a + 1].text.upper() == "ALL":
                local.clear()
            continue
        if word == "DEALLOCATE":
            names = [t for t in toks[a + 1 : b] if t.text.upper() != "PREPARE"]
            if names and names[0].text.upper() == "ALL" and names[0].token_type != TokenType.IDENTIFIER:
                local.clear()
            elif names and not escaped_name(names, 0):
                name = fold_name(names[0])
                server = None if name in local else server_name(name)
                local.pop(name, None)
                if server is not None:
                    out.append(sql[at : names[0].start])
                    out.append(server)
                    at = names[0].end + 1
            continue
        if word != "EXECUTE":
            continue  # (EXECUTE inside another statement: the planner refuses it)
        if a + 1 >= b or escaped_name(toks, a + 1):
            raise InlineRefused(
                "0A000", 'EXECUTE of a name written U&"..." is not supported by pgcloak: use a plain or quoted name'
            )
        name = fold_name(toks[a + 1])
        args: list[str] = []
        i = a + 2
        if i < b and toks[i].token_type == TokenType.L_PAREN:
            close = matching_paren(toks, i, b)
            args = [sql[toks[lo].start : toks[hi - 1].end + 1] for lo, hi in comma_items(toks, i + 1, close)]
            i = close + 1
        if i < b:
            raise InlineRefused("0A000", f"EXECUTE {name} followed by more than its arguments is not supported by pgcloak")
        definition = local.get(name)
        if definition is None:
            text = protocol_text(name)
            if text is None:
                raise InlineRefused("26000", f'prepared statement "{name}" does not exist')
            definition = Definition(text)
        vet(name, definition)
        out.append(sql[at : toks[a].start])
        out.append(_inline(definition, args, name))
        at = toks[b - 1].end + 1
    out.append(sql[at:])
    return "".join(out), local

