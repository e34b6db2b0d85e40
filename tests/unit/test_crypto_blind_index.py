"""Blind index: determinism, normalization, separation, the stored-value layout."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.crypto.blind_index import (
    INDEX_LENGTH,
    INDEX_SEPARATOR,
    NORMALIZERS,
    blind_index,
    compose,
    normalize,
    normalize_email,
    normalize_phone,
    split,
)
from pgcloak.crypto.envelope import ENVELOPE_PREFIX, decrypt, encrypt, parse_header
from pgcloak.crypto.errors import MalformedEnvelopeError, NormalizationError
from pgcloak.crypto.keyring import Keyring, Purpose, derive_key
from pgcloak.crypto.keys import MasterKey

EMAIL = "public.users.email"
URL_ALPHABET = set(string.ascii_letters + string.digits + "-_")


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(MasterKey(bytes(range(32))))


def test_constants() -> None:
    assert INDEX_LENGTH == 22
    assert INDEX_SEPARATOR not in URL_ALPHABET
    assert INDEX_SEPARATOR.encode() not in ENVELOPE_PREFIX
    assert set(NORMALIZERS) == {"email", "phone", "none"}


def test_matches_independent_hmac(keyring: Keyring) -> None:
    key = derive_key(MasterKey(bytes(range(32))), Purpose.IDX, EMAIL, 1)
    digest = hmac.new(key, b"alice@example.com", hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")
    assert blind_index(keyring, EMAIL, " Alice@Example.COM ", "email") == expected


def test_shape_and_determinism(keyring: Keyring) -> None:
    first = blind_index(keyring, EMAIL, "alice@example.com", "email")
    assert len(first) == INDEX_LENGTH
    assert set(first) <= URL_ALPHABET
    assert blind_index(keyring, EMAIL, "alice@example.com", "email") == first
    fresh = Keyring(MasterKey(bytes(range(32))))
    assert blind_index(fresh, EMAIL, "alice@example.com", "email") == first


def test_email_normalization(keyring: Keyring) -> None:
    expected = blind_index(keyring, EMAIL, "alice@example.com", "email")
    for spelling in ("Alice@Example.COM", "  ALICE@EXAMPLE.COM\n", "\talice@example.com "):
        assert blind_index(keyring, EMAIL, spelling, "email") == expected
    assert blind_index(keyring, EMAIL, "bob@example.com", "email") != expected
    assert normalize_email(" Alice@Example.COM ") == "alice@example.com"


@pytest.mark.parametrize(
    "spelling",
    [
        "+1 (555) 010-9999",
        "+1.555.010.9999",
        "+15550109999",
        " +1 555 010 9999 ",
        "+1-555-010-9999",
        "+1/555/0109999",
    ],
)
def test_phone_normalization(keyring: Keyring, spelling: str) -> None:
    assert normalize_phone(spelling) == "+15550109999"
    assert blind_index(keyring, "public.users.phone", spelling, "phone") == blind_index(
        keyring, "public.users.phone", "+15550109999", "phone"
    )


def test_phone_simplifications() -> None:
    assert normalize_phone("(555) 010-9999") == "5550109999"  # no country inference
    assert normalize_phone("0044 20 7946 0000") == "00442079460000"  # 00 kept as is
    assert normalize_phone("") == ""


@pytest.mark.parametrize(
    "value", ["+", "555-CALL-NOW", "1+555", "++1555", "\uff15\uff15\uff15", "ext. 12"]
)
def test_phone_refuses_non_numbers_without_echo(value: str) -> None:
    with pytest.raises(NormalizationError, match="not a phone number") as info:
        normalize_phone(value)
    if len(value) > 2:
        assert value not in str(info.value)


def test_none_is_exact(keyring: Keyring) -> None:
    a = blind_index(keyring, "t.c", "Value")
    assert blind_index(keyring, "t.c", "value") != a
    assert blind_index(keyring, "t.c", "Value ") != a
    assert blind_index(keyring, "t.c", b"Value") == a
    assert blind_index(keyring, "t.c", "Value", "none") == a


def test_bytes_input(keyring: Keyring) -> None:
    assert blind_index(keyring, EMAIL, b"Alice@Example.com", "email") == blind_index(
        keyring, EMAIL, "alice@example.com", "email"
    )
    assert blind_index(keyring, "t.c", b"\xff\xfe") != blind_index(keyring, "t.c", b"\xff")
    with pytest.raises(NormalizationError, match="UTF-8"):
        blind_index(keyring, EMAIL, b"\xff\xfe", "email")


def test_unknown_normalizer(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="unknown normalizer"):
        blind_index(keyring, EMAIL, "x", "soundex")
    with pytest.raises(ValueError, match="unknown normalizer"):
        normalize("x", "EMAIL")


def test_separation(keyring: Keyring) -> None:
    value = "alice@example.com"
    base = blind_index(keyring, EMAIL, value, "email")
    assert blind_index(keyring, "public.admins.email", value, "email") != base
    assert blind_index(keyring, EMAIL, value, "email", version=2) != base
    assert blind_index(Keyring(MasterKey(bytes(32))), EMAIL, value, "email") != base
    # index keys are not encryption keys
    assert keyring.index_key(EMAIL) != keyring.key(Purpose.ENC, EMAIL, 1)


def test_join_group_shares_an_index(keyring: Keyring) -> None:
    # Two columns in one join group both index under the group's key id.
    group = "join:customer_email"
    assert blind_index(keyring, group, "A@x.io", "email") == blind_index(
        keyring, group, "a@x.io", "email"
    )


def test_index_version(keyring: Keyring) -> None:
    v1 = blind_index(keyring, EMAIL, "a@x.io", "email")
    keyring.set_index_version(EMAIL, 2)
    assert blind_index(keyring, EMAIL, "a@x.io", "email") != v1
    assert blind_index(keyring, EMAIL, "a@x.io", "email", version=1) == v1
    keyring.set_current_version(EMAIL, 5)  # encryption rotation leaves the index alone
    assert blind_index(keyring, EMAIL, "a@x.io", "email", version=1) == v1


# -- stored layout -----------------------------------------------------------------------


def test_compose_split_and_decrypt(keyring: Keyring) -> None:
    index = blind_index(keyring, EMAIL, "alice@example.com", "email")
    sealed = encrypt(keyring, EMAIL, b"alice@example.com")
    stored = compose(index, sealed)
    assert stored == index + "." + sealed
    assert stored[:INDEX_LENGTH] == index  # what SQL's left(col, INDEX_LENGTH) sees
    assert split(stored) == (index, sealed)
    assert ENVELOPE_PREFIX in stored.encode()
    assert decrypt(keyring, stored) == b"alice@example.com"
    assert parse_header(stored) == (EMAIL, 1)


def test_hash_only(keyring: Keyring) -> None:
    index = blind_index(keyring, "public.users.ssn", "123-45-6789")
    assert compose(index, None) == index
    assert split(index) == (index, None)
    with pytest.raises(MalformedEnvelopeError):
        decrypt(keyring, index)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "short",
        "A" * 21,
        "A" * 21 + "!",
        "A" * 22 + ":pgc1:xyz",
        "A" * 22 + ".",
        "A" * 22 + ".hello",
        "A" * 23,
    ],
)
def test_split_refuses_bad_layouts(stored: str) -> None:
    with pytest.raises(MalformedEnvelopeError):
        split(stored)


def test_compose_refuses_bad_parts(keyring: Keyring) -> None:
    sealed = encrypt(keyring, EMAIL, b"v")
    with pytest.raises(ValueError, match="22 base64url"):
        compose("A" * 21, sealed)
    with pytest.raises(ValueError, match="22 base64url"):
        compose("A" * 21 + ".", sealed)
    with pytest.raises(ValueError, match="envelope"):
        compose("A" * 22, "plain text")


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=80))
def test_email_normalization_is_idempotent(value: str) -> None:
    once = normalize_email(value)
    assert normalize_email(once) == once


@settings(max_examples=50, deadline=None)
@given(st.from_regex(r"\+?[0-9][0-9 ().-]{0,20}", fullmatch=True))
def test_phone_normalization_keeps_only_digits(value: str) -> None:
    normalized = normalize_phone(value)
    assert normalized.lstrip("+").isdigit()
    assert normalize_phone(normalized) == normalized
