"""The crypto hot paths' shortcuts change no byte and no error.

Reference implementations written out here from the documented formats (HMAC from
the standard library, AES-GCM with a fixed nonce) are compared with ``blind_index``,
``encrypt`` and ``decrypt``; the caches behind them (current index HMAC, envelope
header per key version, parsed headers, current AEAD) must follow rotations.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from pgcloak.crypto import envelope
from pgcloak.crypto.blind_index import blind_index, compose, normalize, normalize_phone
from pgcloak.crypto.envelope import decrypt, encrypt, parse_header
from pgcloak.crypto.errors import (
    MalformedEnvelopeError,
    NormalizationError,
    TamperedError,
    WrongKeyError,
)
from pgcloak.crypto.keyring import Keyring, Purpose, derive_key
from pgcloak.crypto.keys import MasterKey

MASTER = MasterKey(bytes(range(32)))
KEY_ID = "public.users.email"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def reference_phone(value: str) -> str:
    """normalize_phone as first written: one character at a time."""
    stripped = value.strip()
    plus = stripped.startswith("+")
    digits = "".join(
        c for c in (stripped[1:] if plus else stripped) if not (c.isspace() or c in "-()./")
    )
    if not (digits.isascii() and digits.isdigit()) and (digits or plus):
        raise NormalizationError("not a phone number")
    return "+" + digits if plus else digits


def reference_index(key: bytes, message: bytes) -> str:
    return b64e(hmac.new(key, message, hashlib.sha256).digest()[:16])


def reference_envelope(key_id: str, version: int, nonce: bytes, plaintext: bytes) -> str:
    """The documented version-1 layout, sealed with the derived ``enc`` key."""
    encoded = key_id.encode()
    header = MASTER.check_value + bytes([len(encoded)]) + encoded + version.to_bytes(2, "big")
    key = derive_key(MASTER, Purpose.ENC, key_id, version)
    sealed = AESGCM(key).encrypt(nonce, plaintext, b"pgc1:" + header + nonce)
    return "pgc1:" + b64e(header + nonce + sealed)


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(MASTER)


@pytest.fixture
def nonces(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Make encrypt() take its nonces from a list, in order."""
    queue: list[bytes] = []

    def fixed(n: int) -> bytes:
        assert n == 12
        return queue.pop(0)

    monkeypatch.setattr(envelope, "_urandom", fixed)
    yield queue


# -- normalize_phone ----------------------------------------------------------------------


PHONE_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("+0123456789 -()./\t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000٣x"),
        st.characters(),
    ),
    max_size=20,
)


@given(PHONE_TEXT)
def test_phone_normalization_matches_reference(value: str) -> None:
    try:
        expected = reference_phone(value)
    except NormalizationError:
        with pytest.raises(NormalizationError):
            normalize_phone(value)
    else:
        assert normalize_phone(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+1 (555) 010-0123", "+15550100123"),
        ("\u3000+44\u00a020\u20037946\u2028 0958\x1c", "+442079460958"),  # Unicode spaces
        ("555.010/0123", "5550100123"),
        ("", ""),
        (" - ", ""),
    ],
)
def test_phone_normalization_examples(value: str, expected: str) -> None:
    assert normalize_phone(value) == expected


@pytest.mark.parametrize("value", ["+", "+ -", "555 01x", "٣٣", "+1 555\u200b0100"])
def test_phone_normalization_refusals(value: str) -> None:
    with pytest.raises(NormalizationError):
        normalize_phone(value)


# -- blind_index ------------------------------------------------------------------------------


@given(st.text(max_size=30), st.sampled_from(["email", "none", "phone"]))
def test_blind_index_matches_reference(value: str, normalizer: str) -> None:
    keyring = Keyring(MASTER)
    key = derive_key(MASTER, Purpose.IDX, KEY_ID, 1)
    try:
        message = normalize(value, normalizer).encode("utf-8")
    except (NormalizationError, UnicodeEncodeError) as exc:
        with pytest.raises(type(exc)):
            blind_index(keyring, KEY_ID, value, normalizer)
        return
    assert blind_index(keyring, KEY_ID, value, normalizer) == reference_index(key, message)


def test_blind_index_inputs_and_errors(keyring: Keyring) -> None:
    key = derive_key(MASTER, Purpose.IDX, KEY_ID, 1)
    expected = reference_index(key, b"a@b.c")
    for value in ("A@B.C ", b"A@B.C ", bytearray(b"A@B.C "), memoryview(b"A@B.C ")):
        assert blind_index(keyring, KEY_ID, value, "email") == expected
    assert blind_index(keyring, KEY_ID, b"\xff", "none") == reference_index(key, b"\xff")
    with pytest.raises(NormalizationError, match="UTF-8"):
        blind_index(keyring, KEY_ID, b"\xff", "email")
    with pytest.raises(NormalizationError, match="UTF-8"):  # decoding comes first
        blind_index(keyring, KEY_ID, b"\xff", "nope")
    with pytest.raises(ValueError, match="unknown normalizer"):
        blind_index(keyring, KEY_ID, "x", "nope")
    with pytest.raises(ValueError, match="unknown normalizer"):
        blind_index(keyring, KEY_ID, b"x", "nope")


def test_index_cache_follows_index_rotation(keyring: Keyring) -> None:
    def key(version: int) -> bytes:
        return derive_key(MASTER, Purpose.IDX, KEY_ID, version)

    assert blind_index(keyring, KEY_ID, "v") == reference_index(key(1), b"v")
    assert KEY_ID in keyring._current_hmacs
    keyring.set_index_version(KEY_ID, 2)
    assert KEY_ID not in keyring._current_hmacs
    assert blind_index(keyring, KEY_ID, "v") == reference_index(key(2), b"v")
    assert blind_index(keyring, KEY_ID, "v", version=1) == reference_index(key(1), b"v")
    assert blind_index(keyring, KEY_ID, "v") == reference_index(key(2), b"v")
    keyring.set_current_version(KEY_ID, 7)  # encryption rotation leaves the index alone
    assert blind_index(keyring, KEY_ID, "v") == reference_index(key(2), b"v")


def test_current_index_cache_is_bounded() -> None:
    keyring = Keyring(MASTER, max_cached=3)
    for i in range(10):
        blind_index(keyring, f"t.c{i}", "v")
    assert len(keyring._current_hmacs) <= 3
    assert blind_index(keyring, "t.c0", "v") == reference_index(
        derive_key(MASTER, Purpose.IDX, "t.c0", 1), b"v"
    )


# -- envelopes ----------------------------------------------------------------------------------


def test_envelope_bytes_match_reference(keyring: Keyring, nonces: list[bytes]) -> None:
    for key_id in (KEY_ID, "public.t.ünïcode", "k" * 255):
        for plaintext in (b"", b"alice@example.com", bytes(range(256))):
            nonce = bytes([len(plaintext) % 256]) * 12
            nonces.append(nonce)
            sealed = encrypt(keyring, key_id, plaintext)
            assert sealed == reference_envelope(key_id, 1, nonce, plaintext)
            assert decrypt(keyring, sealed) == plaintext


def test_rotation_updates_the_cached_header(keyring: Keyring, nonces: list[bytes]) -> None:
    nonces.extend([b"\x01" * 12, b"\x02" * 12, b"\x03" * 12, b"\x04" * 12])
    v1 = encrypt(keyring, KEY_ID, b"one")
    assert v1 == reference_envelope(KEY_ID, 1, b"\x01" * 12, b"one")
    state, head, _ = keyring._envelope_heads[KEY_ID]
    assert state is keyring.current_aead(KEY_ID)
    keyring.set_current_version(KEY_ID, 2)
    assert KEY_ID not in keyring._envelope_heads
    v2 = encrypt(keyring, KEY_ID, b"two")
    assert v2 == reference_envelope(KEY_ID, 2, b"\x02" * 12, b"two")
    assert parse_header(v2) == (KEY_ID, 2)
    assert keyring._envelope_heads[KEY_ID][1] != head
    # back to an older current version (a configuration rollback)
    keyring.set_current_version(KEY_ID, 1)
    assert encrypt(keyring, KEY_ID, b"three") == reference_envelope(KEY_ID, 1, b"\x03" * 12, b"three")
    with pytest.raises(WrongKeyError, match="newer than the current version 1"):
        decrypt(keyring, v2)
    assert decrypt(keyring, v1) == b"one"
    keyring.set_current_version(KEY_ID, 2)
    assert decrypt(keyring, v2) == b"two"
    assert decrypt(keyring, v1) == b"one"
    assert encrypt(keyring, KEY_ID, b"four") == reference_envelope(KEY_ID, 2, b"\x04" * 12, b"four")


def test_header_cache_is_per_keyring(nonces: list[bytes]) -> None:
    other_master = MasterKey(bytes(range(1, 33)))
    ours, theirs = Keyring(MASTER), Keyring(other_master)
    nonces.extend([b"\x05" * 12, b"\x06" * 12])
    a = encrypt(ours, KEY_ID, b"x")
    b = encrypt(theirs, KEY_ID, b"x")
    assert b64d(a[5:])[:3] == MASTER.check_value
    assert b64d(b[5:])[:3] == other_master.check_value
    assert decrypt(ours, a) == decrypt(theirs, b) == b"x"
    with pytest.raises(WrongKeyError, match="another master key"):
        decrypt(ours, b)


def test_envelope_heads_cache_is_bounded() -> None:
    keyring = Keyring(MASTER, max_cached=3)
    for i in range(10):
        assert decrypt(keyring, encrypt(keyring, f"t.c{i}", b"v")) == b"v"
    assert len(keyring._envelope_heads) <= 3


def test_encrypt_key_id_errors(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        encrypt(keyring, "", b"x")
    with pytest.raises(ValueError, match=r"1\.\.255 bytes"):
        encrypt(keyring, "k" * 256, b"x")
    with pytest.raises(ValueError, match=r"1\.\.255 bytes"):  # not remembered as valid
        encrypt(keyring, "k" * 256, b"x")


def test_decrypt_inputs(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"secret")
    stored = compose(blind_index(keyring, KEY_ID, "s@x.io", "email"), sealed)
    for value in (sealed, sealed.encode(), bytearray(sealed.encode()), memoryview(sealed.encode())):
        assert decrypt(keyring, value) == b"secret"
    for value in (stored, stored.encode()):
        assert decrypt(keyring, value) == b"secret"
    with pytest.raises(MalformedEnvelopeError, match="non-ASCII"):
        decrypt(keyring, sealed + "é")


def test_parsed_header_cache_keeps_errors(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"secret")
    assert decrypt(keyring, sealed) == b"secret"  # its header is now cached
    body = bytearray(b64d(sealed[5:]))
    version_at = 4 + len(KEY_ID)
    body[version_at : version_at + 2] = b"\x00\x00"
    with pytest.raises(MalformedEnvelopeError, match="version 0"):
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))
    with pytest.raises(MalformedEnvelopeError, match="version 0"):  # not cached
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))
    body[version_at : version_at + 2] = b"\x00\x01"
    body[4] ^= 0x80  # the key id is no longer UTF-8
    with pytest.raises(MalformedEnvelopeError, match="UTF-8"):
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))
    body[4] ^= 0x80
    body[0] ^= 1  # a different check value, same header otherwise
    with pytest.raises(TamperedError, match="altered key check value"):
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))
    body[0] ^= 1
    body[-1] ^= 1
    with pytest.raises(TamperedError, match="failed authentication"):
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))


def test_parsed_header_cache_is_bounded(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "_MAX_PARSED_HEADERS", 3)
    monkeypatch.setattr(envelope, "_parsed_headers", {})
    for i in range(10):
        assert decrypt(keyring, encrypt(keyring, f"t.bounded{i}", b"v")) == b"v"
        assert len(envelope._parsed_headers) <= 3


def test_decryption_aead(keyring: Keyring) -> None:
    keyring.set_current_version(KEY_ID, 2)
    assert keyring.decryption_aead(KEY_ID, 2) is keyring.current_aead(KEY_ID)
    current, older = keyring.decryption_aead(KEY_ID, 1)
    assert current == 2
    assert older is keyring.aead(KEY_ID, 1)
    current, newer = keyring.decryption_aead(KEY_ID, 3)
    assert current == 2
    assert (KEY_ID, 3) not in keyring._aeads  # only tried, never kept
    assert isinstance(newer, AESGCM)
    fresh = Keyring(MASTER)
    assert fresh.decryption_aead(KEY_ID, 1) is fresh.current_aead(KEY_ID)
