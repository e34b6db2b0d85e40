"""Text-safe AES-256-GCM envelopes.

Format (version 1)::

    envelope = "pgc1:" base64url-no-padding(body)
    body     = check       3 bytes   master key check value (MasterKey.check_value)
               key_id_len  u8        1..255
               key_id      UTF-8     the column id, e.g. "public.users.email"
               version     u16 BE    key version, 1..65535
               nonce       12 bytes  random
               ciphertext  n bytes   AES-256-GCM of the plaintext (n = plaintext length)
               tag         16 bytes

The associated data is ``b"pgc1:" + body[:ciphertext start]``: the prefix and
the whole header, so the key id and version (which select the key) and the
check value are authenticated too. A 30-byte value with an 18-character key
id is 115 characters.

A stored value with a blind index, ``<22-char index>.<envelope>``, is accepted
wherever an envelope is (``decrypt``, ``parse_header``): the result path can
hand over a column value as it is. Because the envelope keeps its prefix, a
plain ``ENVELOPE_PREFIX in chunk`` finds both forms in raw backend bytes.

Telling a wrong key from tampering: GCM alone cannot (both are a failed tag).
The check value names the master key that sealed the envelope:

* check value matches and the tag fails: ``TamperedError``.
* check value differs and the tag fails under our key: ``WrongKeyError``.
* check value differs but the tag verifies once our own check value is put
  back into the associated data: only the check value was altered,
  ``TamperedError``.
* key version newer than the keyring's current version for the key id: the
  tag is verified first (failure: ``TamperedError``), then ``WrongKeyError``.

The check value sits first and fills exactly the first four base64
characters, so a change to any other byte or character (the key id length
included) cannot move or touch it: a single altered byte or character
anywhere is reported as ``TamperedError`` (or its subclass
``MalformedEnvelopeError`` when the change breaks the syntax). A wrong key
whose check value collides by chance (2^-24) is reported as tampering; no
case returns garbage plaintext.

Not provided: binding to a row. An envelope copied to another row of any
column still decrypts, under its own key id, so readers are authorized by
the envelope's key id, not by the column it was found in. Random 96-bit
nonces: keep each (key id, version) under 2^32 encryptions; rotate before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _b64
from ._constants import ENVELOPE_PREFIX, ENVELOPE_PREFIX_TEXT, INDEX_LENGTH, INDEX_SEPARATOR
from .errors import MalformedEnvelopeError, TamperedError, WrongKeyError
from .keyring import Keyring
from .keys import CHECK_VALUE_LENGTH

__all__ = [
    "ENVELOPE_PREFIX",
    "ENVELOPE_PREFIX_TEXT",
    "MAX_KEY_ID_LENGTH",
    "decrypt",
    "encrypt",
    "is_envelope",
    "key_id_in",
    "key_ids_in",
    "parse_header",
]

MAX_KEY_ID_LENGTH: Final = 255
NONCE_LENGTH: Final = 12
TAG_LENGTH: Final = 16
CHECK_LENGTH: Final = CHECK_VALUE_LENGTH
_PREFIX_LENGTH: Final = len(ENVELOPE_PREFIX)
_urandom: Final = os.urandom
_SEPARATOR_BYTE: Final = ord(INDEX_SEPARATOR)
_COMPOSED_OFFSET: Final = INDEX_LENGTH + 1
# Base64 characters covering the longest possible header before the nonce.
_MAX_HEADER_CHARS: Final = -(-(CHECK_LENGTH + 1 + MAX_KEY_ID_LENGTH + 2) // 3) * 4
_KEY_ID_START: Final = CHECK_LENGTH + 1
#: ``key_id_len | key_id | version`` -> ``(key_id, version, offset of the nonce)``, for
#: decryption. Capped like the keyring's caches (bodies come from the database).
_parsed_headers: dict[bytes, tuple[str, int, int]] = {}
_MAX_PARSED_HEADERS: Final = 4096


def _header_start(key_id: str, version: int, check_value: bytes) -> bytes:
    """``check | key_id_len | key_id | version`` for encryption."""
    encoded = key_id.encode("utf-8")
    if not 1 <= len(encoded) <= MAX_KEY_ID_LENGTH:
        raise ValueError(f"a key id is 1..{MAX_KEY_ID_LENGTH} bytes of UTF-8")
    return check_value + bytes((len(encoded),)) + encoded + version.to_bytes(2, "big")


def _sealing(
    keyring: Keyring, key_id: str, state: tuple[int, AESGCM]
) -> tuple[tuple[int, AESGCM], bytes, bytes]:
    """``(state, header start, associated data start)``, remembered by the keyring for
    as long as ``state`` (``keyring.current_aead(key_id)``) is the current one."""
    head = _header_start(key_id, state[0], keyring.check_value)
    entry = (state, head, ENVELOPE_PREFIX + head)
    cache = keyring._envelope_heads
    if len(cache) >= keyring.max_cached:
        cache.clear()
    cache[key_id] = entry
    return entry


def encrypt(keyring: Keyring, key_id: str, plaintext: bytes) -> str:
    """Seal ``plaintext`` for column ``key_id`` under its current key version."""
    state = keyring.current_aead(key_id)
    entry = keyring._envelope_heads.get(key_id)
    if entry is None or entry[0] is not state:  # a new version gives a new state
        entry = _sealing(keyring, key_id, state)
    nonce = _urandom(NONCE_LENGTH)
    sealed = state[1].encrypt(nonce, plaintext, entry[2] + nonce)
    return ENVELOPE_PREFIX_TEXT + _b64.encode(entry[1] + nonce + sealed)


def _as_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    if value.__class__ is bytes:
        return value
    if isinstance(value, str):
        try:
            return value.encode("ascii")
        except UnicodeEncodeError:
            raise MalformedEnvelopeError("value is not a pgcloak envelope (non-ASCII)") from None
    return bytes(value)


def _body_text(data: bytes) -> bytes:
    """The base64 part of an envelope or of a composed ``<index>.<envelope>`` value."""
    if data.startswith(ENVELOPE_PREFIX):
        return data[_PREFIX_LENGTH:]
    if (
        len(data) > _COMPOSED_OFFSET
        and data[INDEX_LENGTH] == _SEPARATOR_BYTE
        and data.startswith(ENVELOPE_PREFIX, _COMPOSED_OFFSET)
    ):
        return data[_COMPOSED_OFFSET + _PREFIX_LENGTH :]
    raise MalformedEnvelopeError("value is not a pgcloak envelope (no pgc1: prefix)")


def is_envelope(value: str | bytes | bytearray | memoryview) -> bool:
    """Cheap syntactic test: starts with the prefix, directly or after an index."""
    try:
        _body_text(_as_bytes(value))
    except MalformedEnvelopeError:
        return False
    return True


def _parse_key_id_version(head: bytes) -> tuple[str, int, int]:
    """``(key_id, version, offset of the nonce)`` from the start of a body."""
    start = _KEY_ID_START
    if len(head) < start:
        raise MalformedEnvelopeError("envelope header is truncated")
    end = start + head[CHECK_LENGTH]
    if end == start or len(head) < end + 2:
        raise MalformedEnvelopeError("envelope header is truncated")
    header = head[CHECK_LENGTH : end + 2]
    parsed = _parsed_headers.get(header)
    if parsed is not None:
        return parsed
    try:
        key_id = head[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("envelope key id is not UTF-8") from None
    version = int.from_bytes(head[end : end + 2], "big")
    if version == 0:
        raise MalformedEnvelopeError("envelope key version 0 is invalid")
    parsed = (key_id, version, end + 2)
    if len(_parsed_headers) >= _MAX_PARSED_HEADERS:
        _parsed_headers.clear()
    _parsed_headers[header] = parsed
    return parsed


def parse_header(envelope: str | bytes | bytearray | memoryview) -> tuple[str, int]:
    """``(key_id, version)`` of an envelope without decrypting it.

    Decodes only the first few hundred characters, so it is cheap on large
    values. It checks syntax, not authenticity: use the key id to decide
    whether to decrypt, and let ``decrypt`` authenticate.
    """
    text = _body_text(_as_bytes(envelope))
    try:
        if len(text) <= _MAX_HEADER_CHARS:
            head = _b64.decode(text)
            total = len(head)
        else:
            head = _b64.decode(text[:_MAX_HEADER_CHARS])
            total = _b64.decoded_length(len(text))
    except ValueError:
        raise MalformedEnvelopeError("envelope is not valid base64url") from None
    key_id, version, nonce_start = _parse_key_id_version(head)
    if total < nonce_start + NONCE_LENGTH + TAG_LENGTH:
        raise MalformedEnvelopeError("envelope is truncated")
    return key_id, version


def key_id_in(body: bytes) -> str | None:
    """The key id of the envelope whose base64url body starts with ``body`` (bytes found
    in a server message, possibly running past the envelope), or None if it cannot be
    read. Only the header is decoded; nothing is authenticated: for labelling, not for
    deciding anything about the value."""
    usable = min(len(body), _MAX_HEADER_CHARS)
    try:
        head = _b64.decode(body[: usable - usable % 4])
        return _parse_key_id_version(head)[0]
    except (ValueError, MalformedEnvelopeError):
        return None


#: An envelope in a server message: the start of its base64url body, as much as can hold
#: a header (it may run on past the value; only the header is read).
_ENVELOPE_IN_TEXT: Final = re.compile(re.escape(ENVELOPE_PREFIX) + rb"([A-Za-z0-9_-]{8,400})")


def key_ids_in(data: bytes, start: int = 0, stop: int | None = None) -> Iterator[str | None]:
    """The key id of every envelope in ``data[start:stop]`` (a server message or a run
    of them), None for one whose header cannot be read; see :func:`key_id_in`."""
    for found in _ENVELOPE_IN_TEXT.finditer(data, start, len(data) if stop is None else stop):
        yield key_id_in(found.group(1))


def decrypt(keyring: Keyring, envelope: str | bytes | bytearray | memoryview) -> bytes:
    """Authenticate and open an envelope (or a composed ``<index>.<envelope>``)."""
    try:
        body = _b64.decode(_body_text(_as_bytes(envelope)))
    except ValueError:
        raise MalformedEnvelopeError("envelope is not valid base64url") from None
    key_id, version, nonce_start = _parse_key_id_version(body)
    ciphertext_start = nonce_start + NONCE_LENGTH
    if len(body) < ciphertext_start + TAG_LENGTH:
        raise MalformedEnvelopeError("envelope is truncated")
    expected_check = keyring.check_value
    foreign = not body.startswith(expected_check)
    if foreign:
        associated = ENVELOPE_PREFIX + expected_check + body[CHECK_LENGTH:ciphertext_start]
    else:
        associated = ENVELOPE_PREFIX + body[:ciphertext_start]
    current, aead = keyring.decryption_aead(key_id, version)
    try:
        plaintext = aead.decrypt(
            body[nonce_start:ciphertext_start], body[ciphertext_start:], associated
        )
    except InvalidTag:
        if foreign:
            raise WrongKeyError(
                f"envelope for key id {key_id!r} was sealed under another master key "
                f"(fingerprint {body[:CHECK_LENGTH].hex()}, loaded key {expected_check.hex()})"
            ) from None
        raise TamperedError(
            f"envelope for key id {key_id!r} version {version} failed authentication "
            "(modified or corrupted)"
        ) from None
    if foreign:
        raise TamperedError(f"envelope for key id {key_id!r} has an altered key check value")
    if version > current:
        raise WrongKeyError(
            f"envelope for key id {key_id!r} uses key version {version}, newer than the "
            f"current version {current} configured here"
        )
    return plaintext
