"""pgc1: envelopes: round trips, the documented layout, tamper and wrong-key detection."""

from __future__ import annotations

import base64
import string

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.crypto import envelope
from pgcloak.crypto.blind_index import blind_index, compose
from pgcloak.crypto.envelope import (
    ENVELOPE_PREFIX,
    decrypt,
    encrypt,
    is_envelope,
    parse_header,
)
from pgcloak.crypto.errors import (
    CryptoError,
    MalformedEnvelopeError,
    TamperedError,
    WrongKeyError,
)
from pgcloak.crypto.keyring import Keyring, Purpose, derive_key
from pgcloak.crypto.keys import MasterKey, generate_master_key

KEY_ID = "public.users.email"
URL_ALPHABET = set(string.ascii_letters + string.digits + "-_")


@pytest.fixture(scope="module")
def master_key() -> MasterKey:
    return generate_master_key()


@pytest.fixture
def keyring(master_key: MasterKey) -> Keyring:
    return Keyring(master_key)


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def body_of(sealed: str) -> bytes:
    assert sealed.startswith("pgc1:")
    return b64d(sealed[5:])


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"a", "Zoë 🙂 naïve 東京".encode(), b"\x00\xff" * 7, bytes(range(256)) * 40],
    ids=["empty", "one", "unicode", "binary", "10KB"],
)
def test_round_trip(keyring: Keyring, plaintext: bytes) -> None:
    sealed = encrypt(keyring, KEY_ID, plaintext)
    assert isinstance(sealed, str)
    assert sealed.startswith("pgc1:")
    assert set(sealed[5:]) <= URL_ALPHABET
    assert decrypt(keyring, sealed) == plaintext
    assert decrypt(keyring, sealed.encode()) == plaintext
    assert decrypt(keyring, bytearray(sealed.encode())) == plaintext
    assert decrypt(keyring, memoryview(sealed.encode())) == plaintext
    assert decrypt(Keyring(keyring._master_key), sealed) == plaintext  # fresh cache


@settings(max_examples=50, deadline=None)
@given(
    plaintext=st.binary(max_size=300),
    key_id=st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
)
def test_round_trip_property(plaintext: bytes, key_id: str) -> None:
    keyring = Keyring(MasterKey(bytes(32)))
    sealed = encrypt(keyring, key_id, plaintext)
    assert parse_header(sealed) == (key_id, 1)
    assert decrypt(keyring, sealed) == plaintext


def test_encryption_is_randomized(keyring: Keyring) -> None:
    assert encrypt(keyring, KEY_ID, b"same") != encrypt(keyring, KEY_ID, b"same")


def test_length_of_a_short_value(keyring: Keyring) -> None:
    # documented: 30 bytes with an 18-character key id -> 115 characters
    assert len(encrypt(keyring, KEY_ID, b"x" * 30)) == 115


# -- the documented layout, checked independently ------------------------------------


def test_layout_matches_the_spec(master_key: MasterKey) -> None:
    keyring = Keyring(master_key, versions={KEY_ID: 258})
    sealed = encrypt(keyring, KEY_ID, b"alice@example.com")
    body = body_of(sealed)
    assert body[:3] == master_key.check_value
    n = body[3]
    assert n == len(KEY_ID)
    assert body[4 : 4 + n] == KEY_ID.encode()
    assert int.from_bytes(body[4 + n : 6 + n], "big") == 258
    nonce = body[6 + n : 18 + n]
    ciphertext = body[18 + n :]
    assert len(ciphertext) == len(b"alice@example.com") + 16
    data_key = derive_key(master_key, Purpose.ENC, KEY_ID, 258)
    associated = b"pgc1:" + body[: 18 + n]
    assert AESGCM(data_key).decrypt(nonce, ciphertext, associated) == b"alice@example.com"
    # the check value is exactly the first four base64 characters
    assert sealed[5:9] == b64e(master_key.check_value)


def test_parse_header(keyring: Keyring) -> None:
    keyring.set_current_version("public.t.ünïcode", 9)
    sealed = encrypt(keyring, "public.t.ünïcode", b"v")
    assert parse_header(sealed) == ("public.t.ünïcode", 9)
    assert parse_header(sealed.encode()) == ("public.t.ünïcode", 9)
    long_id = "k" * 255
    big = encrypt(keyring, long_id, b"x" * 20000)
    assert parse_header(big) == (long_id, 1)
    index = blind_index(keyring, KEY_ID, "a@b.c", "email")
    assert parse_header(compose(index, encrypt(keyring, KEY_ID, b"v"))) == (KEY_ID, 1)


def test_prefix_scan_finds_both_forms(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"secret")
    stored = compose(blind_index(keyring, KEY_ID, "x"), sealed)
    chunk = b"D\x00\x00\x00\x20\x00\x02" + stored.encode() + b"plain"
    assert ENVELOPE_PREFIX in chunk
    assert ENVELOPE_PREFIX in sealed.encode()
    assert ENVELOPE_PREFIX not in b"ordinary row data: alice@example.com"
    assert is_envelope(sealed) and is_envelope(stored) and is_envelope(stored.encode())
    assert not is_envelope("hello") and not is_envelope("") and not is_envelope("é")
    assert decrypt(keyring, stored) == b"secret"


# -- tampering ----------------------------------------------------------------------------


def test_every_flipped_bit_of_the_body_is_detected(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"alice@example.com")
    body = body_of(sealed)
    for position in range(len(body)):
        for bit in (0x01, 0x80):
            altered = bytearray(body)
            altered[position] ^= bit
            with pytest.raises(TamperedError):
                decrypt(keyring, "pgc1:" + b64e(bytes(altered)))


def test_every_changed_character_is_detected(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"alice@example.com")
    for position in range(len(sealed)):
        for replacement in ("A", "_", "=", "+", "~"):
            if sealed[position] == replacement:
                continue
            altered = sealed[:position] + replacement + sealed[position + 1 :]
            with pytest.raises(TamperedError):
                decrypt(keyring, altered)


def test_truncation_and_extension_are_detected(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"alice@example.com")
    for length in range(len(sealed)):
        with pytest.raises(TamperedError):
            decrypt(keyring, sealed[:length])
    for suffix in ("A", "AA", "AAA", "AAAA", " ", "\n"):
        with pytest.raises(TamperedError):
            decrypt(keyring, sealed + suffix)


def test_altered_check_value_alone_is_tampering(keyring: Keyring) -> None:
    sealed = encrypt(keyring, KEY_ID, b"v")
    body = bytearray(body_of(sealed))
    body[0:3] = b"\x00\x00\x00" if body[0:3] != b"\x00\x00\x00" else b"\x01\x01\x01"
    with pytest.raises(TamperedError, match="check value") as info:
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))
    assert not isinstance(info.value, WrongKeyError)


def test_moved_key_id_is_tampering(keyring: Keyring) -> None:
    # Relabel an email envelope as another column: authentication fails.
    sealed = encrypt(keyring, "public.users.email", b"v")
    body = body_of(sealed)
    assert body[3:22] == b"\x12public.users.email"
    relabeled = body[:3] + b"\x12public.users.phone" + body[22:]
    with pytest.raises(TamperedError):
        decrypt(keyring, "pgc1:" + b64e(relabeled))


def test_error_messages_carry_no_plaintext_or_key(keyring: Keyring, master_key: MasterKey) -> None:
    sealed = encrypt(keyring, KEY_ID, b"alice@example.com")
    altered = sealed[:-5] + ("A" if sealed[-5] != "A" else "B") + sealed[-4:]
    with pytest.raises(TamperedError) as info:
        decrypt(keyring, altered)
    message = str(info.value)
    assert KEY_ID in message
    assert "alice" not in message
    assert master_key.expose_secret().hex() not in message
    assert keyring.key(Purpose.ENC, KEY_ID, 1).hex() not in message
    assert info.value.__suppress_context__


# -- wrong keys and versions -----------------------------------------------------------------


def test_wrong_master_key(keyring: Keyring, master_key: MasterKey) -> None:
    sealed = encrypt(keyring, KEY_ID, b"alice@example.com")
    other = Keyring(generate_master_key())
    with pytest.raises(WrongKeyError, match="another master key") as info:
        decrypt(other, sealed)
    message = str(info.value)
    assert master_key.fingerprint in message
    assert other.fingerprint in message
    assert master_key.expose_secret().hex() not in message
    assert other._master_key.expose_secret().hex() not in message


def test_rotation(master_key: MasterKey) -> None:
    keyring = Keyring(master_key)
    old = encrypt(keyring, KEY_ID, b"old")
    keyring.set_current_version(KEY_ID, 2)
    new = encrypt(keyring, KEY_ID, b"new")
    assert parse_header(old) == (KEY_ID, 1)
    assert parse_header(new) == (KEY_ID, 2)
    assert decrypt(keyring, old) == b"old"
    assert decrypt(keyring, new) == b"new"
    assert body_of(old)[-20:] != body_of(new)[-20:]
    behind = Keyring(master_key)  # a proxy whose config still says version 1
    with pytest.raises(WrongKeyError, match="newer than the current version 1"):
        decrypt(behind, new)
    assert (KEY_ID, 2) not in behind._aeads  # not cached


def test_tampered_version_is_tampering(keyring: Keyring) -> None:
    keyring.set_current_version(KEY_ID, 2)
    sealed = encrypt(keyring, KEY_ID, b"v")
    body = bytearray(body_of(sealed))
    for version in (1, 3, 0x0102):
        body[4 + len(KEY_ID) : 6 + len(KEY_ID)] = version.to_bytes(2, "big")
        with pytest.raises(TamperedError):
            decrypt(keyring, "pgc1:" + b64e(bytes(body)))


# -- malformed -----------------------------------------------------------------------------------


def _body(key_id: bytes, version: int, rest: int = 28) -> str:
    head = b"\x00\x00\x00" + bytes([len(key_id)]) + key_id + version.to_bytes(2, "big")
    return "pgc1:" + b64e(head + bytes(rest))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "pgc1:",
        "pgc1",
        "pgc2:AAAA",
        "hello world",
        "pgc1:!!!!",
        "pgc1:A",
        "pgc1:AAAA",
        "pgc1:ÄÄ",
        _body(b"", 1),
        _body(b"k", 0),
        _body(b"\xff\xfe", 1),
        _body(b"k", 1, rest=12 + 15),
        "pgc1:" + b64e(b"\x00\x00\x00" + bytes([200]) + b"k" * 10),
        "pgc1:" + b64e(b"\x00\x00\x00"),
    ],
)
def test_malformed(keyring: Keyring, value: str) -> None:
    with pytest.raises(MalformedEnvelopeError):
        decrypt(keyring, value)
    with pytest.raises(MalformedEnvelopeError):
        parse_header(value)


def test_minimal_valid_body_parses() -> None:
    assert parse_header(_body(b"k", 1, rest=12 + 16)) == ("k", 1)


def test_hierarchy() -> None:
    assert issubclass(MalformedEnvelopeError, TamperedError)
    assert issubclass(TamperedError, CryptoError)
    assert issubclass(WrongKeyError, CryptoError)
    assert not issubclass(WrongKeyError, TamperedError)


@pytest.mark.parametrize("key_id", ["", "x" * 256, "é" * 128])
def test_invalid_key_ids_refused(keyring: Keyring, key_id: str) -> None:
    with pytest.raises(ValueError, match="key id"):
        encrypt(keyring, key_id, b"v")


def test_prefix_constant() -> None:
    assert ENVELOPE_PREFIX == b"pgc1:"
    assert envelope.ENVELOPE_PREFIX_TEXT == "pgc1:"


@settings(max_examples=80, deadline=None)
@given(
    plaintext=st.binary(max_size=64),
    key_id=st.text(alphabet="abcdefgh.é", min_size=1, max_size=40),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_change_is_tampering(
    plaintext: bytes, key_id: str, where: float, mask: int
) -> None:
    keyring = Keyring(MasterKey(b"\x07" * 32))
    body = bytearray(body_of(encrypt(keyring, key_id, plaintext)))
    body[int(where * len(body))] ^= mask
    with pytest.raises(TamperedError):
        decrypt(keyring, "pgc1:" + b64e(bytes(body)))


@pytest.mark.parametrize("plaintext", [b"", b"alice@example.com", b"x" * 2000])
def test_key_id_in_reads_the_key_id_from_bytes_found_in_a_server_message(
    keyring: Keyring, plaintext: bytes
) -> None:
    """The audit names the columns of values found in results: the bytes after the
    prefix may run past the value (the next message's type byte is a base64url letter)."""
    sealed = envelope.encrypt(keyring, "public.users.email", plaintext)
    body = sealed[len("pgc1:") :].encode()
    assert envelope.key_id_in(body) == "public.users.email"
    assert envelope.key_id_in(body + b"D") == "public.users.email"
    assert envelope.key_id_in(body[:6]) is None  # too short to hold a header
    assert envelope.key_id_in(b"not-an-envelope-at-all") is None
