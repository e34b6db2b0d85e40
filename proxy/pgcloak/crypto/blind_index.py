"""Blind index: keyed hashes for equality lookups on encrypted columns.

``index = base64url(HMAC-SHA256(index key, UTF-8(normalize(value)))[:16])``,
22 characters. The index key is the ``idx`` key of a column id, or of a join
group's name when several columns must compare equal (they must then share a
normalizer too).

Stored value (DESIGN §3): ``<index>.<envelope>`` in the application's own text
column, or just ``<index>`` for a hash-only (irreversible pseudonymization)
column. SQL compares ``left(col, INDEX_LENGTH)``.

Leakage, by design: equal normalized plaintexts have equal indexes in the same
column (or join group), so anyone who reads the table sees which rows share a
value and how often each value occurs (frequency analysis on low-entropy
columns), and anyone who can insert a chosen value and read the table learns
which rows hold it. Without the key, the index reveals nothing else.

Truncation to 128 bits: two different values collide with probability 2^-128;
among n distinct values of one column the chance of any collision is about
n^2 / 2^129 (about 1.5e-21 for a billion values). A collision makes a lookup
return an extra row, or a unique index refuse a second distinct value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final, Literal

from . import _b64
from ._constants import (
    ENVELOPE_PREFIX_TEXT,
    INDEX_BYTES,
    INDEX_LENGTH,
    INDEX_SEPARATOR,
)
from .errors import MalformedEnvelopeError, NormalizationError
from .keyring import Keyring

__all__ = [
    "INDEX_LENGTH",
    "INDEX_SEPARATOR",
    "NORMALIZERS",
    "NormalizerName",
    "blind_index",
    "compose",
    "normalize",
    "normalize_email",
    "normalize_none",
    "normalize_phone",
    "split",
    "stored_pattern",
]

NormalizerName = Literal["email", "phone", "none"]

#: What normalize_phone drops: whitespace (``str.isspace()``, which is what ``\s``
#: matches in a str pattern) and - ( ) . /; for ASCII text, as bytes to delete.
_PHONE_JUNK: Final = re.compile(r"[\s\-()./]")
_PHONE_JUNK_ASCII: Final = bytes(code for code in range(128) if _PHONE_JUNK.match(chr(code)))
_INDEX_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)


def normalize_email(value: str) -> str:
    """Trim surrounding whitespace and lowercase.

    Lowercasing the local part is not RFC 5321 (it is case-sensitive) but is
    what every major provider does and what users expect of a lookup.
    """
    return value.strip().lower()


def normalize_phone(value: str) -> str:
    """E.164-style digits: keep one leading ``+``, drop whitespace and ``- ( ) . /``.

    A simplification of E.164: no country inference, so ``+1 555 0100`` and
    ``555 0100`` stay different, and ``00`` is not turned into ``+``. Anything
    else than ASCII digits after that (letters, extensions) is refused rather
    than silently hashed, with a message that does not echo the value.
    """
    stripped = value.strip()
    plus = stripped.startswith("+")
    rest = stripped[1:] if plus else stripped
    if rest.isascii():
        digits = rest.encode("ascii").translate(None, _PHONE_JUNK_ASCII).decode("ascii")
    else:
        digits = _PHONE_JUNK.sub("", rest)
    if not (digits.isascii() and digits.isdigit()) and (digits or plus):
        raise NormalizationError(
            "value is not a phone number: only digits, one leading '+', spaces and - ( ) . / "
            "are allowed"
        )
    return "+" + digits if plus else digits


def normalize_none(value: str) -> str:
    """Identity: exact, case-sensitive matching."""
    return value


_NORMALIZERS: Final[dict[str, Callable[[str], str]]] = {
    "email": normalize_email,
    "phone": normalize_phone,
    "none": normalize_none,
}
NORMALIZERS: Final[Mapping[str, Callable[[str], str]]] = MappingProxyType(_NORMALIZERS)


def _normalizer(name: NormalizerName | str) -> Callable[[str], str]:
    function = _NORMALIZERS.get(name)
    if function is None:
        raise ValueError(f"unknown normalizer {name!r}; expected one of {sorted(NORMALIZERS)}")
    return function


def normalize(value: str, normalizer: NormalizerName | str = "none") -> str:
    """Apply the named normalizer."""
    return _normalizer(normalizer)(value)


def blind_index(
    keyring: Keyring,
    key_id: str,
    value: str | bytes,
    normalizer: NormalizerName | str = "none",
    *,
    version: int | None = None,
) -> str:
    """The 22-character blind index of ``value`` for a column or join group.

    ``bytes`` are taken as UTF-8 text; with the ``none`` normalizer they are
    hashed as they are, so ``"x"`` and ``b"x"`` index the same.
    """
    if isinstance(value, str):
        message = _normalizer(normalizer)(value).encode()
    elif normalizer == "none" and isinstance(value, bytes | bytearray | memoryview):
        message = bytes(value)
    else:
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise NormalizationError("value is not valid UTF-8 text") from None
        message = _normalizer(normalizer)(text).encode()
    context = keyring.index_hmac(key_id, version).copy()
    context.update(message)
    return _b64.encode(context.finalize()[:INDEX_BYTES])


def _looks_like_index(text: str) -> bool:
    return len(text) == INDEX_LENGTH and _INDEX_ALPHABET.issuperset(text)


def compose(index: str, envelope: str | None) -> str:
    """The stored value: ``<index>.<envelope>``, or ``<index>`` alone (hash-only)."""
    if not _looks_like_index(index):
        raise ValueError(f"a blind index is {INDEX_LENGTH} base64url characters")
    if envelope is None:
        return index
    if not envelope.startswith(ENVELOPE_PREFIX_TEXT):
        raise ValueError("compose() takes an envelope as returned by encrypt()")
    return index + INDEX_SEPARATOR + envelope


#: base64url characters of the shortest envelope body (check 3, key id length 1, key id 1,
#: version 2, nonce 12, tag 16 bytes).
_MIN_ENVELOPE_BODY_CHARS = -(-(3 + 1 + 1 + 2 + 12 + 16) * 4 // 3)


def stored_pattern(*, encrypt: bool, index: bool) -> str:
    """A regular expression (POSIX and Python alike) that every value pgcloak stores in
    such a column matches, and no plaintext a person would type does: what a database
    CHECK constraint can hold the column to, so that a write pgcloak never saw (through
    a view, a function, a trigger, a direct connection) cannot store plaintext."""
    b64 = "[A-Za-z0-9_-]"
    # The shortest body (a 1-byte key id, an empty plaintext) is 35 bytes: 47 characters.
    # A short "pgc1:078-05-1120" is plaintext dressed up, not an envelope.
    envelope = re.escape(ENVELOPE_PREFIX_TEXT) + b64 + f"{{{_MIN_ENVELOPE_BODY_CHARS},}}"
    if not encrypt:
        return f"^{b64}{{{INDEX_LENGTH}}}$"
    if index:
        return f"^{b64}{{{INDEX_LENGTH}}}{re.escape(INDEX_SEPARATOR)}{envelope}$"
    return f"^{envelope}$"


def split(stored: str) -> tuple[str, str | None]:
    """``(index, envelope)`` of a stored value; ``envelope`` is None when hash-only.

    Checks the layout, not authenticity (``decrypt`` does that).
    """
    index = stored[:INDEX_LENGTH]
    if not _looks_like_index(index):
        raise MalformedEnvelopeError("stored value does not start with a blind index")
    if len(stored) == INDEX_LENGTH:
        return index, None
    if stored[INDEX_LENGTH] != INDEX_SEPARATOR or not stored.startswith(
        ENVELOPE_PREFIX_TEXT, INDEX_LENGTH + 1
    ):
        raise MalformedEnvelopeError("stored value has a blind index but no envelope after it")
    return index, stored[INDEX_LENGTH + 1 :]
