"""HKDF derivation: determinism, separation, versions, caching."""

from __future__ import annotations

import hashlib
import hmac
import itertools

import pytest

from pgcloak.crypto.keyring import Keyring, Purpose, derive_key, hkdf_info
from pgcloak.crypto.keys import MasterKey, generate_master_key

KEY = bytes(range(32))


def rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF written out from RFC 5869, independent of `cryptography`."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def test_rfc5869_reference_self_check() -> None:
    # RFC 5869 appendix A.1 (test case 1), to trust the reference above.
    okm = rfc5869_hkdf_sha256(
        bytes.fromhex("0b" * 22),
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_info_layout_and_derivation_match_reference() -> None:
    info = hkdf_info(Purpose.ENC, "public.users.email", 7)
    assert info == (
        b"pgcloak-v1" + b"\x03enc" + b"\x00\x12public.users.email" + (7).to_bytes(4, "big")
    )
    expected = rfc5869_hkdf_sha256(KEY, b"pgcloak hkdf salt v1", info)
    assert derive_key(MasterKey(KEY), Purpose.ENC, "public.users.email", 7) == expected


def test_deterministic() -> None:
    a = derive_key(MasterKey(KEY), Purpose.IDX, "public.users.email", 1)
    b = Keyring(MasterKey(KEY)).key(Purpose.IDX, "public.users.email", 1)
    assert a == b
    assert len(a) == 32


def test_separation() -> None:
    master_keys = [MasterKey(KEY), MasterKey(bytes(reversed(KEY)))]
    key_ids = ["public.users.email", "public.users.phone", "a", "ab", "join:customers", "é"]
    derived = {
        (mk.fingerprint, purpose, key_id, version): derive_key(mk, purpose, key_id, version)
        for mk, purpose, key_id, version in itertools.product(
            master_keys, list(Purpose), key_ids, [1, 2, 65535]
        )
    }
    assert len(set(derived.values())) == len(derived)


def test_info_is_injective_on_tricky_ids() -> None:
    # Length prefixes keep ("a", v) and ("a\x00...", ...) apart.
    pairs = [
        (Purpose.ENC, "a", 1),
        (Purpose.ENC, "a\x00\x00\x00\x00\x01", 1),
        (Purpose.IDX, "a", 1),
    ]
    infos = {hkdf_info(*p) for p in pairs}
    assert len(infos) == len(pairs)


def test_keyring_caches() -> None:
    keyring = Keyring(MasterKey(KEY))
    first = keyring.key(Purpose.ENC, "t.c", 1)
    assert keyring.key(Purpose.ENC, "t.c", 1) is first
    assert keyring.key("enc", "t.c", 1) is first  # type: ignore[arg-type]
    assert keyring.aead("t.c", 1) is keyring.aead("t.c", 1)
    assert keyring.index_hmac("t.c") is keyring.index_hmac("t.c")


def test_cache_is_bounded() -> None:
    keyring = Keyring(MasterKey(KEY), max_cached=3)
    for i in range(10):
        keyring.key(Purpose.ENC, f"t.c{i}", 1)
        keyring.aead(f"t.c{i}", 1)
        keyring.index_hmac(f"t.c{i}")
        keyring.current_aead(f"t.c{i}")
    assert len(keyring._keys) <= 3
    assert len(keyring._aeads) <= 3
    assert len(keyring._hmacs) <= 3
    assert len(keyring._current) <= 3


def test_versions() -> None:
    keyring = Keyring(MasterKey(KEY), versions={"t.a": 3}, index_versions={"g": 2})
    assert keyring.current_version("t.a") == 3
    assert keyring.current_version("t.other") == 1
    assert keyring.index_version("g") == 2
    assert keyring.index_version("t.a") == 1
    assert keyring.current_aead("t.a")[0] == 3
    keyring.set_current_version("t.a", 4)
    assert keyring.current_aead("t.a")[0] == 4
    assert keyring.index_key("g") == derive_key(MasterKey(KEY), Purpose.IDX, "g", 2)
    assert keyring.index_key("g", 1) == derive_key(MasterKey(KEY), Purpose.IDX, "g", 1)
    keyring.set_index_version("g", 3)
    assert keyring.index_key("g") == derive_key(MasterKey(KEY), Purpose.IDX, "g", 3)


@pytest.mark.parametrize("version", [0, -1, 65536, True, 1.0])
def test_bad_versions(version: object) -> None:
    keyring = Keyring(MasterKey(KEY))
    with pytest.raises(ValueError, match="key version"):
        keyring.set_current_version("t.a", version)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key version"):
        keyring.set_index_version("t.a", version)  # type: ignore[arg-type]


def test_bad_key_ids() -> None:
    keyring = Keyring(MasterKey(KEY))
    with pytest.raises(ValueError, match="key id"):
        keyring.set_current_version("", 1)
    with pytest.raises(ValueError, match="key id"):
        derive_key(MasterKey(KEY), Purpose.ENC, "x" * 65536, 1)


def test_audit_key() -> None:
    keyring = Keyring(MasterKey(KEY))
    assert keyring.audit_key() == derive_key(MasterKey(KEY), Purpose.AUDIT, "audit", 1)
    assert keyring.audit_key() != keyring.key(Purpose.ENC, "audit", 1)
    assert keyring.audit_key("audit", 2) != keyring.audit_key()


def test_repr_hides_keys() -> None:
    mk = generate_master_key()
    keyring = Keyring(mk, versions={"t.a": 2})
    derived = keyring.key(Purpose.ENC, "t.a", 2)
    text = repr(keyring)
    assert mk.fingerprint in text
    assert "t.a" in text
    assert mk.expose_secret().hex() not in text
    assert derived.hex() not in text
