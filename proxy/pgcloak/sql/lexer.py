"""Finding literals and statement boundaries in SQL text, and quoting values back.

sqlglot's tokenizer finds the spans (it knows comments, dollar quotes, ``E''``
escapes and quoted identifiers); the values are decoded here by PostgreSQL's rules
(``standard_conforming_strings = on``), because the planner must transform exactly
the value the server would have seen.

:func:`scan_literals` is the hot-path shortcut: one compiled regular expression that
finds the same literals (and the planner's shape key) as :func:`lex` without
building tokens, for the texts it fully understands; it returns None for anything
else (non-ASCII outside quotes, ``$n`` followed by another ``$`` without a space,
sqlglot's multi-character operators that swallow a comment start, ...), and the
caller then uses :func:`lex`. A differential test keeps both in agreement.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar
from typing import Literal as TLiteral

from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import TokenError
from sqlglot.tokenizer_core import Token, TokenType

from pgcloak.sql.plan import Literal


class _Tokenizer(Postgres.Tokenizer):
    # sqlglot turns the rest of a "command" statement (EXPLAIN, DO, PREPARE, VACUUM...)
    # into one opaque string token; the planner needs the real tokens inside.
    COMMANDS: ClassVar[set[TokenType]] = set()


_TOKENIZER = _Tokenizer(dialect=Postgres())

#: Every kind of string constant (all values, whatever they hold).
STRING_TYPES = frozenset(
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


_UNTOKENIZABLE = "the statement could not be tokenized (an unterminated string, quote or comment?)"


def tokenize(sql: str) -> list[Token]:
    """sqlglot's tokens of ``sql``. :class:`LexError` carries no part of the text (it
    would reach an error message, and the text holds values)."""
    try:
        tokens = _TOKENIZER.tokenize(sql)
    except TokenError:
        try:
            # sqlglot 30 fails on a text that ends in '' after a $n parameter ("... AND
            # name <> ''"); whitespace after it tokenizes the same, positions included.
            tokens = _TOKENIZER.tokenize(sql + "\n")
        except TokenError:
            raise LexError(_UNTOKENIZABLE) from None
    if ("--" in sql or "/*" in sql) and _swallowed_comment(sql, tokens):
        raise LexError(
            "an operator is followed by a comment start (--, /*): pgcloak cannot read it as "
            "PostgreSQL does; put a space between them"
        )
    return tokens


#: PostgreSQL's operator characters: a run of them is one operator, cut where ``--`` or
#: ``/*`` starts (that is a comment).
_OPERATOR_CHARS = frozenset("+-*/<>=~!@#%^&|`?")


def _swallowed_comment(sql: str, tokens: list[Token]) -> bool:
    """Whether sqlglot read an operator (``#-``, say) into what PostgreSQL reads as the
    start of a comment: ``#--5`` is ``#`` and a comment for the server, ``#-`` and ``-5``
    for sqlglot, and the rest of the line would be read differently."""
    for tok in tokens:
        text = tok.text
        if len(text) < 2 or text[-1] not in "-/" or not _OPERATOR_CHARS.issuperset(text):
            continue
        if sql[tok.start : tok.end + 1] != text:
            continue  # a string or a quoted name that holds such characters
        after = sql[tok.end + 1 : tok.end + 2]
        if ("--" in text or "/*" in text) or after == ("-" if text[-1] == "-" else "*"):
            return True
    return False


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
    strings = STRING_TYPES
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
    if "\\" not in body:
        text = body.replace("''", "'")  # '' inside E'' is one quote
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate raises, as it does below
        return None if "\x00" in text else text
    out = bytearray()
    i, n = 0, len(body)
    find = body.find
    while i < n:
        j = find("\\", i)
        if j != i:  # text up to the next backslash, '' being one quote
            out += body[i : n if j < 0 else j].replace("''", "'").encode("utf-8")
            if j < 0:
                break
        i = j + 1
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


class NationalBackslash(LexError):
    """An ``N'...'`` constant holds a backslash: it has no ``E''`` spelling to pin it to."""


class _EscapingTokenizer(_Tokenizer):
    # standard_conforming_strings = off: a backslash escapes the next character in '...'.
    STRING_ESCAPES: ClassVar[list[str]] = ["'", "\\"]


_ESCAPING_TOKENIZER = _EscapingTokenizer(dialect=Postgres())


def pin_backslashes(sql: str, *, escaping: bool = False) -> str:
    """``sql`` with each plain ``'...'`` constant that holds a backslash spelled ``E''``.

    Such a constant reads differently under the two settings of
    ``standard_conforming_strings``; spelled ``E''`` it reads the same under both, so the
    server runs what pgcloak planned even if the setting changed behind pgcloak's back
    (a pipelined SET, a function that sets it). ``escaping``: read ``sql`` as the server
    does with the setting off (the backslash escapes), else with it on (pgcloak's own
    reading, which the rest of the planner assumes). The text is returned unchanged
    when no such constant is in it.
    """
    if "\\" not in sql:
        return sql
    try:
        tokens = (_ESCAPING_TOKENIZER if escaping else _TOKENIZER).tokenize(sql)
    except TokenError:
        raise LexError(_UNTOKENIZABLE) from None
    out: list[str] = []
    at = 0
    for tok in tokens:
        tt = tok.token_type
        if tt is not TokenType.STRING and tt is not TokenType.NATIONAL_STRING:
            continue
        start, end = tok.start, tok.end + 1
        raw = sql[start:end]
        if "\\" not in raw:
            continue
        if raw[:1] != "'":
            raise NationalBackslash("N'...' string constants with a backslash are not supported by pgcloak")
        out.append(sql[at:start])
        out.append("E" + raw if escaping else "E'" + raw[1:-1].replace("\\", "\\\\") + "'")
        at = end
    if not out:
        return sql
    out.append(sql[at:])
    return "".join(out)


# -- fast path --------------------------------------------------------------------
#
# What sqlglot's Postgres tokenizer (as configured above) does, restricted to what
# the scanner accepts. Anything outside it makes the regex fail and the scan give up.
#
# * A token starts after whitespace or punctuation; a word (letters, digits, ``_``,
#   ``$``) runs up to whitespace or punctuation. So ``E'``, ``N'``, ``B'``, ``X'``
#   and ``U&'`` prefix a string only at the start of a word (``typE'x'`` is a word
#   and a plain string), and a digit inside a word starts no number. The regex
#   skips runs of harmless characters in one step and looks behind a quote or a
#   digit to tell these cases apart.
# * A number is ASCII digits with an optional fraction and exponent. sqlglot also
#   takes ``1e5+3``, ``1e5.3`` or ``1e`` as one number and leaves ``1x``, ``1_000``
#   or ``0x1F`` verbatim: a number followed by a character that could continue it
#   gives up. ``@`` is sqlglot's parameter token, which changes how the number after
#   it is read: ``@`` followed by a number gives up.
# * Strings: ``'..''..'``, ``E'..\'..'``, ``N'..'``, ``U&'..'`` (gives up when
#   ``uescape`` appears later in the text: lex() leaves ``U&'..' UESCAPE '!'``
#   verbatim), ``$tag$..$tag$`` with an identifier tag, ``B'01'``/``X'1F'`` (no
#   literals; anything but bit/hex digits gives up, sqlglot refuses some).
# * ``"ident"``, ``-- ...`` and ``/* */``; a comment with ``/*`` inside goes through
#   :func:`_comment_end` (sqlglot's nesting rule); an unterminated one gives up.
# * ``$`` after a word gives up (sqlglot ends a multi-word keyword such as
#   ``GROUP BY`` there, but not other words), as does a word right after a dollar
#   quote. ``$n`` is a parameter, its digits no literal, when the text up to the
#   next ``$`` holds whitespace or there is no next ``$``; otherwise sqlglot reads a
#   dollar quote with tag ``n...`` (and usually fails): give up.
# * Operators need no tokens, except where one of sqlglot's multi-character
#   operators swallows the start of a comment (``#--``, ``-|--``, ``|/*``): those
#   give up, as do ``user-`` (sqlglot's ``USER-DEFINED`` keyword can be glued to a
#   number), ``{``, ``}``, backquotes, control characters other than tab, CR and LF,
#   and anything non-ASCII outside quotes and comments.
_SCAN = re.compile(
    r"""
    (?:
        [^'"$0-9\-/|\#@{}`\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\U0010ffff]++
      | (?<=[A-Za-z_])[0-9]++
      | "[^"]*+(?:""[^"]*+)*+"
      | --[^\n\r]*+
      | /\*(?:[^*/]++|\*(?!/)|/(?!\*))*+\*/
      | (?<![uU][sS][eE][rR])-(?!\|--)
      | /(?!\*)
      | \|(?!/\*)
      | \#(?!--)
      | @(?![ \t\n\r]*+(?:[0-9]|--|/\*))
    )*+
    (?:
        (?:
            (?<![bBeEnNxX&])              # the usual case: no prefix letter before
          | (?<=[A-Za-z0-9_$][bBeEnNxX])  # a letter, but inside a word: typE'x'
          | (?<=[A-Za-z0-9_$][uU]&)
          | (?<=&)(?<![uU]&)
        )(?P<str>'[^']*+(?:''[^']*+)*+')
      | (?P<num>[0-9]++(?:\.[0-9]*+)?+(?:
            (?![0-9A-Za-z_$\x80-\U0010ffff])
          | [eE][+-]?[0-9]++(?![0-9A-Za-z_$.+\-\x80-\U0010ffff])
        ))
      | (?P<end>\Z)
      | (?<=[eE])(?<![A-Za-z0-9_$][eE])(?P<estr>'(?:[^'\\]++|''|\\.)*+')
      | (?<=[nN])(?<![A-Za-z0-9_$][nN])(?P<nstr>'[^']*+(?:''[^']*+)*+')
      | (?P<comment>/\*)
      | (?<![A-Za-z0-9_])(?P<dollar>\$(?:[A-Za-z_][A-Za-z0-9_]*+)?\$)
      | (?<![A-Za-z0-9_])(?P<param>\$[0-9]++(?![0-9A-Za-z_$.\x80-\U0010ffff]))
      | (?<=[uU]&)(?<![A-Za-z0-9_$][uU]&)(?P<ustr>'[^']*+(?:''[^']*+)*+')
      | (?<=[bB])(?<![A-Za-z0-9_$][bB])(?P<bits>'[01]*+'(?!'))
      | (?<=[xX])(?<![A-Za-z0-9_$][xX])(?P<hex>'[0-9A-Fa-f]*+'(?!'))
    )
    """,
    re.VERBOSE | re.DOTALL,
)
_G = _SCAN.groupindex
_T_STR, _T_NUM, _T_END, _T_ESTR, _T_NSTR = _G["str"], _G["num"], _G["end"], _G["estr"], _G["nstr"]
_T_COMMENT, _T_DOLLAR, _T_PARAM, _T_USTR = _G["comment"], _G["dollar"], _G["param"], _G["ustr"]
_T_BITS, _T_HEX = _G["bits"], _G["hex"]
_COMMENT_MARK = re.compile(r"/\*|\*/")
_SPACE = re.compile(r"\s")  # the characters of str.isspace(), sqlglot's test
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$")
_LITERAL_FIELDS = ("value", "raw", "start", "end", "kind")


def _literal_maker() -> Callable[[str, str, int, int, TLiteral["string", "number"]], Literal]:
    """``Literal(...)`` for the scanner, about twice as fast.

    The frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    which is half the cost of a literal in :func:`scan_literals`. While ``Literal``
    is exactly a slots class of these five fields with no ``__post_init__``, setting
    the slots directly makes an identical object; otherwise use the class itself.
    """
    if (
        tuple(f.name for f in dataclasses.fields(Literal)) != _LITERAL_FIELDS
        or getattr(Literal, "__slots__", None) != _LITERAL_FIELDS
        or hasattr(Literal, "__post_init__")
    ):
        return Literal
    new = object.__new__
    set_value, set_raw, set_start, set_end, set_kind = (
        getattr(Literal, name).__set__ for name in _LITERAL_FIELDS
    )

    def make(
        value: str, raw: str, start: int, end: int, kind: TLiteral["string", "number"]
    ) -> Literal:
        literal = new(Literal)
        set_value(literal, value)
        set_raw(literal, raw)
        set_start(literal, start)
        set_end(literal, end)
        set_kind(literal, kind)
        return literal

    return make


_make_literal = _literal_maker()


def _comment_end(sql: str, start: int) -> int:
    """End of the nested ``/* */`` comment opening at ``start``; -1 when unterminated.

    sqlglot's rule: the character right after an opening ``/*`` cannot start another
    opening (``/*/*`` opens once), while the ``/`` of a ``*/`` that leaves the comment
    open can (``*/*`` closes and reopens).
    """
    depth = 1
    pos = after_open = start + 2
    search = _COMMENT_MARK.search
    while True:
        m = search(sql, pos)
        if m is None:
            return -1
        at = m.start()
        if sql[at] == "*":
            depth -= 1
            if not depth:
                return at + 2
            pos = at + 1
        elif at == after_open:
            pos = at + 1
        else:
            depth += 1
            pos = after_open = at + 2


def _is_parameter(sql: str, dollar: int) -> bool:
    """Whether sqlglot reads the ``$`` at ``dollar`` (followed by digits) as a parameter."""
    nxt = sql.find("$", dollar + 1)
    if nxt < 0:
        # sqlglot reads a would-be tag to the end of the text, and a '' pair there
        # makes it fail
        return not sql.endswith("''")
    return _SPACE.search(sql, dollar + 1, nxt) is not None


def scan_literals(sql: str) -> tuple[list[Literal], str] | None:
    """``(lex(sql).literals, shape key)`` without tokenizing; None when unsure.

    The shape key is the text with each literal replaced by ``"\\x00s"`` (string)
    or ``"\\x00n"`` (number), the text itself when it has none: what the planner
    caches plans by. None means "ask :func:`lex`" (which may raise :class:`LexError`).
    """
    literals: list[Literal] = []
    parts: list[str] = []
    match = _SCAN.match
    make = _make_literal
    uescape: int | None = None  # where "UESCAPE" last appears, once a U&'' needs it
    pos = last = 0
    while True:
        m = match(sql, pos)
        if m is None:
            return None
        group = m.lastindex or 0  # always set: every alternative is a group
        start, pos = m.span(group)
        if group == _T_STR:
            raw = sql[start:pos]
            parts += (sql[last:start], "\x00s")
            literals.append(make(raw[1:-1].replace("''", "'"), raw, start, pos, "string"))
        elif group == _T_NUM:
            raw = sql[start:pos]
            parts += (sql[last:start], "\x00n")
            literals.append(make(raw, raw, start, pos, "number"))
        elif group == _T_END:
            break
        elif group == _T_COMMENT:
            pos = _comment_end(sql, start)
            if pos < 0:
                return None
            continue
        elif group == _T_PARAM:
            if not _is_parameter(sql, start):
                return None
            continue
        elif group == _T_BITS or group == _T_HEX:  # noqa: SIM109 (not literals)
            continue
        else:
            value: str | None
            if group == _T_DOLLAR:
                close = sql.find(sql[start:pos], pos)
                if close < 0:
                    return None
                value = sql[pos:close]
                pos = close + pos - start
                if pos < len(sql) and sql[pos] in _WORD_CHARS:
                    return None  # sqlglot starts a token there, the regex would not
            elif group == _T_ESTR:
                start -= 1
                try:
                    value = decode_escape_string(sql[start + 2 : pos - 1])
                except UnicodeEncodeError:  # a lone surrogate: let lex() fail as it does
                    return None
            elif group == _T_NSTR:
                start -= 1
                value = sql[start + 2 : pos - 1].replace("''", "'")
            elif group == _T_USTR:
                if uescape is None:
                    # as lex() compares: upper() maps "\u017f" to "S"; it never shortens
                    # the text, so a position found here is never too small
                    uescape = sql.upper().rfind("UESCAPE")
                if uescape >= pos:
                    return None
                start -= 2
                value = decode_unicode_string(sql[start + 3 : pos - 1].replace("''", "'"))
            else:  # pragma: no cover - every alternative of _SCAN is handled above
                return None
            if value is None:
                continue  # not decodable: lex() leaves it verbatim too
            parts += (sql[last:start], "\x00s")
            literals.append(make(value, sql[start:pos], start, pos, "string"))
        last = pos
    if not literals:
        return literals, sql
    parts.append(sql[last:])
    return literals, "".join(parts)


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


def copies_from_stdin(sql: str) -> bool:
    """Whether a statement of ``sql`` is ``COPY ... FROM STDIN`` (comments anywhere).
    True for a text that cannot be tokenized but mentions STDIN: the caller only counts
    the client's Syncs as tentative for it, which a COPY that never starts undoes."""
    if "stdin" not in sql.lower():
        return False
    try:
        toks = tokenize(sql)
    except LexError:
        return True
    for a, b in split_statements(toks):
        if toks[a].text.upper() != "COPY":
            continue
        for i in range(a, b - 1):
            after = toks[i + 1]
            if toks[i].text.upper() == "FROM" and after.text.upper() == "STDIN" and after.token_type != TokenType.STRING:
                return True
    return False


def matching_paren(toks: list[Token], i: int, end: int) -> int:
    """Index of the parenthesis closing the one at ``toks[i]`` (``end - 1`` if none)."""
    depth = 0
    for j in range(i, end):
        tt = toks[j].token_type
        if tt == TokenType.L_PAREN:
            depth += 1
        elif tt == TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return j
    return end - 1


def escaped_name(toks: Sequence[Token], at: int) -> bool:
    """``U&"..."`` at ``toks[at]``: a name with Unicode escapes (sqlglot reads ``U``,
    ``&``, the rest), which pgcloak does not decode."""
    return at + 1 < len(toks) and toks[at].text.upper() == "U" and toks[at + 1].token_type == TokenType.AMP


def runs_execute(toks: list[Token], a: int, b: int) -> bool:
    """Statement ``[a, b)`` holds an EXECUTE of a prepared statement without being one:
    ``EXPLAIN [...] EXECUTE``, ``CREATE TABLE ... AS EXECUTE`` (the server's statement
    would run; pgcloak sends a top-level EXECUTE as its own statement instead)."""
    if toks[a].text.upper() == "EXPLAIN" and any(t.token_type == TokenType.EXECUTE for t in toks[a + 1 : b]):
        return True
    return any(toks[j].token_type == TokenType.EXECUTE and toks[j - 1].text.upper() == "AS" for j in range(a + 1, b))
