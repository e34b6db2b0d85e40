"""MasterKey, its text form and share texts; nothing leaks the key."""

from __future__ import annotations

import base64
import copy
import itertools
import pickle

import pytest

from pgcloak.crypto import keys
from pgcloak.crypto.errors import CryptoError, KeyMaterialError, ShareError
from pgcloak.crypto.keys import (
    MasterKey,
    combine_shares,
    generate_master_key,
    master_key_from_text,
    master_key_to_text,
    parse_share,
    split_master_key,
)

KEY = bytes(range(1, 33))


def spellings(key: bytes) -> list[str]:
    """Every way the key could be written out."""
    b64 = base64.b64encode(key).decode()
    url = base64.urlsafe_b64encode(key).decode()
    return [key.hex(), key.hex().upper(), b64, b64.rstrip("="), url, url.rstrip("="), repr(key)]


def assert_no_leak(text: str, key: bytes = KEY) -> None:
    for spelling in spellings(key):
        assert spelling not in text
    # also no long fragment of the hex form
    assert key.hex()[:16] not in text


def test_master_key_validation() -> None:
    assert MasterKey(KEY).expose_secret() == KEY
    assert MasterKey(bytearray(KEY)).expose_secret() == KEY
    with pytest.raises(KeyMaterialError, match="32 bytes, got 31"):
        MasterKey(KEY[:31])
    with pytest.raises(KeyMaterialError, match="bytes, got str"):
        MasterKey(KEY.hex())  # type: ignore[arg-type]


def test_repr_str_format_never_show_the_key() -> None:
    mk = MasterKey(KEY)
    for text in (repr(mk), str(mk), f"{mk}", f"{mk!r}", format(mk), repr([mk]), repr({"k": mk})):
        assert "redacted" in text
        assert_no_leak(text)
    assert mk.fingerprint in repr(mk)


def test_fingerprint_is_stable_and_distinct() -> None:
    mk = MasterKey(KEY)
    assert mk.fingerprint == MasterKey(KEY).fingerprint
    assert len(mk.fingerprint) == 6
    assert len(mk.check_value) == 3
    assert mk.fingerprint != generate_master_key().fingerprint


def test_equality_copy_pickle_hash() -> None:
    mk = MasterKey(KEY)
    assert mk == MasterKey(KEY)
    assert mk != MasterKey(bytes(32))
    assert mk != KEY
    assert copy.copy(mk) is mk
    assert copy.deepcopy(mk) is mk
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(mk)
    with pytest.raises(TypeError):
        hash(mk)


def test_generate() -> None:
    a, b = generate_master_key(), generate_master_key()
    assert a != b
    assert len(a.expose_secret()) == 32


# -- text form ----------------------------------------------------------------------


def test_text_round_trip() -> None:
    mk = generate_master_key()
    text = master_key_to_text(mk)
    assert len(text) == 44
    assert base64.b64decode(text) == mk.expose_secret()
    assert master_key_from_text(text) == mk


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(KEY).decode(),  # openssl rand -base64 32
        base64.b64encode(KEY).decode() + "\n",
        base64.b64encode(KEY).decode().rstrip("="),
        base64.urlsafe_b64encode(KEY).decode(),
        base64.urlsafe_b64encode(KEY).decode().rstrip("="),
        KEY.hex(),  # openssl rand -hex 32
        KEY.hex().upper(),
        "  " + KEY.hex() + "\r\n",
    ],
)
def test_text_spellings_accepted(text: str) -> None:
    assert master_key_from_text(text) == MasterKey(KEY)
    assert master_key_from_text(text.encode()) == MasterKey(KEY)


@pytest.mark.parametrize(
    "text",
    [
        "",
        KEY.hex()[:-1],
        KEY.hex() + "00",
        KEY.hex()[:-1] + "g",
        base64.b64encode(KEY[:31]).decode(),
        base64.b64encode(KEY + b"\x00").decode(),
        base64.b64encode(KEY).decode()[:-2] + "!=",
        base64.b64encode(KEY).decode()[:-2] + "B=",  # non-canonical trailing bits
        "\u00e9" * 44,
    ],
)
def test_bad_text_refused_without_echo(text: str) -> None:
    with pytest.raises(KeyMaterialError) as info:
        master_key_from_text(text)
    message = str(info.value)
    assert_no_leak(message)
    if len(text) > 8:
        assert text.strip()[:8] not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


def test_non_ascii_bytes_refused() -> None:
    with pytest.raises(KeyMaterialError, match="ASCII"):
        master_key_from_text(b"\xff" * 44)


# -- share texts --------------------------------------------------------------------


def test_share_text_format() -> None:
    mk = MasterKey(KEY)
    texts = split_master_key(mk, shares=5, threshold=3)
    assert len(texts) == 5
    for x, text in enumerate(texts, start=1):
        prefix, k, index, payload, check = text.split(":")
        assert (prefix, k, index) == ("pgcloak-share-v1", "3", str(x))
        assert len(check) == 8
        assert len(payload) == 48  # 36 bytes: key + 4-byte checksum
        assert_no_leak(text)
        assert parse_share(text)[:2] == (3, x)


def test_every_threshold_subset_recovers() -> None:
    mk = generate_master_key()
    texts = split_master_key(mk, shares=5, threshold=3)
    for subset in itertools.combinations(texts, 3):
        assert combine_shares(list(subset)) == mk
        assert combine_shares(list(reversed(subset))) == mk
    assert combine_shares(texts) == mk
    assert combine_shares([" " + texts[0] + "\n", texts[1], texts[4]]) == mk


def test_too_few_shares() -> None:
    texts = split_master_key(MasterKey(KEY), shares=5, threshold=3)
    with pytest.raises(ShareError, match="need 3 shares"):
        combine_shares(texts[:2])
    with pytest.raises(ShareError, match="no shares"):
        combine_shares([])


def test_forged_threshold_is_detected() -> None:
    # Rewrite two shares of a 3-of-5 to claim k=2 (with a valid text checksum):
    # combining them is the "insufficient set" case the embedded checksum catches.
    texts = split_master_key(MasterKey(KEY), shares=5, threshold=3)
    forged = []
    for text in texts[:2]:
        prefix, _, x, payload, _ = text.split(":")
        body = f"{prefix}:2:{x}:{payload}"
        forged.append(f"{body}:{keys._share_text_check(body)}")
    with pytest.raises(ShareError, match="do not reconstruct a valid key") as info:
        combine_shares(forged)
    assert_no_leak(str(info.value))


def test_shares_from_different_splits() -> None:
    mk = MasterKey(KEY)
    first = split_master_key(mk, shares=3, threshold=2)
    second = split_master_key(mk, shares=3, threshold=2)
    with pytest.raises(ShareError, match="do not reconstruct a valid key"):
        combine_shares([first[0], second[1]])
    other = split_master_key(generate_master_key(), shares=3, threshold=2)
    with pytest.raises(ShareError, match="do not reconstruct a valid key"):
        combine_shares([first[0], other[1]])
    third = split_master_key(mk, shares=3, threshold=3)
    with pytest.raises(ShareError, match="disagree on the threshold"):
        combine_shares([first[0], third[1], third[2]])


def test_duplicate_share_refused() -> None:
    texts = split_master_key(MasterKey(KEY), shares=3, threshold=2)
    with pytest.raises(ShareError, match="more than once"):
        combine_shares([texts[0], texts[0]])


def test_damaged_share_is_named() -> None:
    texts = split_master_key(MasterKey(KEY), shares=3, threshold=2)
    prefix, k, x, payload, check = texts[1].split(":")
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    damaged = ":".join((prefix, k, x, flipped, check))
    with pytest.raises(ShareError, match="share #2 is damaged") as info:
        combine_shares([texts[0], damaged])
    assert payload not in str(info.value)
    assert flipped not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "pgcloak-share-v2:2:1:AAAA:00000000",
        "pgcloak-share-v1:2:1:AAAA",
        "pgcloak-share-v1:2:1:AAAA:00000000:extra",
    ],
)
def test_not_a_share(text: str) -> None:
    with pytest.raises(ShareError, match="not a pgcloak share"):
        parse_share(text)


def _with_check(body: str) -> str:
    return f"{body}:{keys._share_text_check(body)}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("pgcloak-share-v1:x:1:AAAA", "non-numeric"),
        ("pgcloak-share-v1:1:1:AAAA", "threshold 1"),
        ("pgcloak-share-v1:2:0:AAAA", "index 0"),
        ("pgcloak-share-v1:2:256:AAAA", "index 256"),
        ("pgcloak-share-v1:2:1:A", "invalid share data"),
        ("pgcloak-share-v1:2:1:AAAA", "3 bytes"),
    ],
)
def test_invalid_share_fields(body: str, message: str) -> None:
    with pytest.raises(ShareError, match=message):
        parse_share(_with_check(body))


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 1), (2, 3), (256, 3)])
def test_split_parameters(n: int, k: int) -> None:
    with pytest.raises(ShareError):
        split_master_key(MasterKey(KEY), shares=n, threshold=k)


def test_error_hierarchy() -> None:
    assert issubclass(ShareError, KeyMaterialError)
    assert issubclass(KeyMaterialError, CryptoError)
    assert issubclass(KeyMaterialError, ValueError)
