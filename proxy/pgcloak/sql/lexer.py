"""Finding literals and statement boundaries in SQL text, and quoting values back.

sqlglot's tokenizer finds the spans (it knows comments, dollar quotes, ``E''``
escapes and quoted identifiers); the values are decoded here by PostgreSQL's rules
(``standard_conforming_strings = on``), because the planner must transform exactly
the value the server would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import TokenError
from sqlglot.tokenizer_core import Token, TokenType

from pgcloak.sql.plan import Literal


class _Tokenizer(Postgres.Tokenizer):
    # sqlglot turns the rest of a "command" statement (EXPLAIN, DO, PREPARE, VACUUM...)
    # into one opaque string token; the planner needs the real tokens inside.
    COMMANDS: ClassVar[set[TokenType]] = set()


_TOKENIZER = _Tokenizer(dialect=Postgres())

_STRING_TYPES = frozenset(
    {
        TokenType.STRING,
        TokenType.NATIONAL_STRING,
        TokenType.BYTE_STRING,
        TokenType.HEREDOC_STRING,
        TokenType.UNICODE_STRING,
    }
)


class LexError(ValueError):
    """The text cannot be split into tokens (an unterminated string, say)."""


@dataclass(frozen=True, slots=True)
class Lexed:
    """Tokens of a text plus its literal slots (``literals[i]`` is slot ``i``)."""

    tokens: list[Token]
    literals: list[Literal]
    #: token index -> slot index, for tokens that are literal slots
    slot_of_token: dict[int, int]


def tokenize(sql: str) -> list[Token]:
    try:
        return _TOKENIZER.tokenize(sql)
    except TokenError as exc:
        raise LexError(str(exc)) from None


_NUMBER = TokenType.NUMBER
_PARAMETER = TokenType.PARAMETER
_VAR = TokenType.VAR
_UNICODE = TokenType.UNICODE_STRING


def lex(sql: str) -> Lexed:
    """Tokenize and extract literal slots, in order of appearance."""
    tokens = tokenize(sql)
    literals: list[Literal] = []
    slot_of_token: dict[int, int] = {}
    n = len(tokens)
    strings = _STRING_TYPES
    for i, tok in enumerate(tokens):
        tt = tok.token_type
        if tt is _NUMBER:
            start, end = tok.start, tok.end + 1
            if i:
                prev = tokens[i - 1]
                if prev.token_type is _PARAMETER and prev.end + 1 == start:
                    continue  # the n of $n
            if i + 1 < n:
                nxt = tokens[i + 1]
                if nxt.start == end and nxt.token_type is _VAR:
                    continue  # 1_000 (PostgreSQL 16) tokenizes oddly: leave it verbatim
            raw = sql[start:end]
            slot_of_token[i] = len(literals)
            literals.append(Literal(raw, raw, start, end, "number"))
        elif tt in strings:
            start, end = tok.start, tok.end + 1
            if tt is _UNICODE and i + 1 < n and tokens[i + 1].text.upper() == "UESCAPE":
                continue  # custom escape character: left verbatim (refused by the planner)
            raw = sql[start:end]
            value = decode_string(tt, raw)
            if value is None:
                continue
            slot_of_token[i] = len(literals)
            literals.append(Literal(value, raw, start, end, "string"))
    return Lexed(tokens, literals, slot_of_token)


def decode_string(tt: TokenType, raw: str) -> str | None:
    """The value of a string constant as PostgreSQL reads it; None when not decodable."""
    if tt == TokenType.HEREDOC_STRING:
        tag_end = raw.index("$", 1) + 1
        return raw[tag_end : len(raw) - tag_end]
    if tt == TokenType.NATIONAL_STRING:
        return raw[2:-1].replace("''", "'")
    if tt == TokenType.BYTE_STRING:
        if raw[:1] not in ("e", "E"):
            return None
        return decode_escape_string(raw[2:-1])
    if tt == TokenType.UNICODE_STRING:
        if raw[:3].lower() != "u&'":
            return None
        return decode_unicode_string(raw[3:-1].replace("''", "'"))
    if raw[:1] != "'":
        return None
    return raw[1:-1].replace("''", "'")


_SIMPLE_ESCAPES = {"b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09}
_OCTAL = "01234567"
_HEX = "0123456789abcdefABCDEF"


def decode_escape_string(body: str) -> str | None:
    """Decode the body of ``E'...'`` (backslash escapes; byte escapes form UTF-8)."""
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == "'":  # '' inside E'' is one quote
            out += b"'"
            i += 2
            continue
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        i += 1
        if i >= n:
            return None
        c = body[i]
        if c in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[c])
            i += 1
        elif c in _OCTAL:
            j = i
            while j < n and j < i + 3 and body[j] in _OCTAL:
                j += 1
            out.append(int(body[i:j], 8) & 0xFF)
            i = j
        elif c == "x" and i + 1 < n and body[i + 1] in _HEX:
            j = i + 1
            while j < n and j < i + 3 and body[j] in _HEX:
                j += 1
            out.append(int(body[i + 1 : j], 16))
            i = j
        elif c in ("u", "U"):
            width = 4 if c == "u" else 8
            digits = body[i + 1 : i + 1 + width]
            if len(digits) != width or any(d not in _HEX for d in digits):
                return None
            try:
                out += chr(int(digits, 16)).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                return None
            i += 1 + width
        else:
            out += c.encode("utf-8")
            i += 1
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def decode_unicode_string(body: str) -> str | None:
    """Decode the body of ``U&'...'`` with the default escape character ``\\``."""
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if body[i + 1 : i + 2] == "\\":
            out.append("\\")
            i += 2
            continue
        if body[i + 1 : i + 2] == "+":
            digits, i = body[i + 2 : i + 8], i + 8
            width = 6
        else:
            digits, i = body[i + 1 : i + 5], i + 5
            width = 4
        if len(digits) != width or any(d not in _HEX for d in digits):
            return None
        try:
            out.append(chr(int(digits, 16)))
        except ValueError:
            return None
    text = "".join(out)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None
    return None if "\x00" in text else text


def quote_literal(value: str) -> str:
    """A string constant that reads back as ``value`` under either setting of
    ``standard_conforming_strings`` (``E''`` when it contains a backslash)."""
    if "\x00" in value:
        raise ValueError("a string constant cannot contain NUL")
    body = value.replace("'", "''")
    if "\\" in value:
        return "E'" + body.replace("\\", "\\\\") + "'"
    return "'" + body + "'"


def split_statements(tokens: list[Token]) -> list[tuple[int, int]]:
    """Token index ranges ``[a, b)`` of the statements (``;`` separated, empty ones dropped)."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for i, tok in enumerate(tokens):
        if tok.token_type == TokenType.SEMICOLON:
            if i > start:
                ranges.append((start, i))
            start = i + 1
    if len(tokens) > start:
        ranges.append((start, len(tokens)))
    return ranges
