"""PostgreSQL identifier rules for names written in a policy file.

A policy names tables, columns and roles the way SQL does, so they are matched
the way PostgreSQL matches them: an unquoted name is folded to lowercase, a
name in double quotes keeps its exact spelling (``""`` stands for one ``"``).
Writing ``Users`` therefore protects the table created by ``CREATE TABLE Users``
(stored as ``users``); protecting a table created as ``"Users"`` takes
``'"Users"'`` in YAML (the single quotes are YAML's, the double quotes are SQL's).

Canonical names are the catalog spelling (``users``, ``Users``). Key ids join
canonical names with dots (``public.users.email``); that is unambiguous because
names containing a dot are refused, even quoted.
"""

from __future__ import annotations

import re

DEFAULT_SCHEMA = "public"
#: PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1 bytes), so a
#: longer name in the policy could never match what the catalog holds.
MAX_IDENTIFIER_BYTES = 63

_UNQUOTED = r"[A-Za-z_][A-Za-z0-9_$]*"
_QUOTED = r'"(?:[^".]|"")+"'
_IDENT = f"(?:{_UNQUOTED}|{_QUOTED})"
#: JSON Schema patterns for the keys of ``tables``, columns, ``roles`` and ``read``.
TABLE_KEY_PATTERN = f"^{_IDENT}(?:\\.{_IDENT})?$"
IDENT_KEY_PATTERN = f"^{_IDENT}$"
READ_KEY_PATTERN = f"^(?:default|{_IDENT}(?:\\.{_IDENT}){{0,1}}\\.(?:{_IDENT}|\\*))$"

_TOKEN = re.compile(f"({_UNQUOTED})|({_QUOTED})")
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*\Z")


class InvalidName(ValueError):
    """A name in the policy is not a valid (optionally qualified) identifier."""


def split_identifiers(text: str, *, what: str) -> tuple[str, ...]:
    """Split ``a.B."C"`` into canonical parts ``("a", "b", "C")``.

    ``what`` names the kind of thing for the error message ("table", "column").
    """
    parts: list[str] = []
    pos = 0
    n = len(text)
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise InvalidName(_bad_name_reason(text, what))
        unquoted, quoted = m.group(1), m.group(2)
        name = unquoted.lower() if unquoted is not None else quoted[1:-1].replace('""', '"')
        if len(name.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
            raise InvalidName(
                f"{what} name {text!r} has a part longer than {MAX_IDENTIFIER_BYTES} bytes; "
                "PostgreSQL truncates identifiers, so it could never match"
            )
        if "\x00" in name:
            raise InvalidName(f"{what} name {text!r} contains a NUL character")
        parts.append(name)
        pos = m.end()
        if pos == n:
            return tuple(parts)
        if text[pos] != ".":
            raise InvalidName(_bad_name_reason(text, what))
        pos += 1


def _bad_name_reason(text: str, what: str) -> str:
    return (
        f"invalid {what} name {text!r}: use SQL identifiers (letters, digits, _ and $, "
        "not starting with a digit), or double-quote a name to keep its case; names may "
        "not contain '.'"
    )


#: PostgreSQL's keywords that cannot be a table, column or index name unquoted (the
#: "reserved" and "reserved (can be function or type)" ones of the SQL Key Words
#: appendix of the PostgreSQL manual).
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case
    cast check collate collation column concurrently constraint create cross
    current_catalog current_date current_role current_schema current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign freeze from full grant group having ilike in initially inner
    intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps
    placing primary references returning right select session_user similar some
    symmetric system_user table tablesample then to trailing true union unique user
    using variadic verbose when where window with""".split()  # noqa: SIM905 - a word list reads best as text
)


def quote_ident(name: str) -> str:
    """Spell a canonical name as SQL takes it: bare when it reads back the same
    (lowercase, not a reserved word), in double quotes otherwise."""
    if _PLAIN.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def parse_table_name(text: str) -> tuple[str, str]:
    """``users`` -> ``("public", "users")``; ``Sales.Orders`` -> ``("sales", "orders")``."""
    parts = split_identifiers(text, what="table")
    if len(parts) == 1:
        return DEFAULT_SCHEMA, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise InvalidName(f"table name {text!r} must be 'table' or 'schema.table'")


def parse_single_name(text: str, *, what: str) -> str:
    """A column or role name: exactly one identifier."""
    parts = split_identifiers(text, what=what)
    if len(parts) != 1:
        raise InvalidName(f"{what} name {text!r} must be a single identifier, not a dotted name")
    return parts[0]
