"""Shamir over GF(2^8): published vectors, an independent reference, properties."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.crypto import shamir
from pgcloak.crypto.errors import CryptoError, ShareError

# -- an independent, deliberately naive reference over GF(2^8) / 0x11B ---------


def ref_mul(a: int, b: int) -> int:
    """Shift-and-add multiplication, reducing by x^8 + x^4 + x^3 + x + 1."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
    return product


def ref_inv(a: int) -> int:
    """a^254 = a^-1 (the multiplicative group has order 255)."""
    result = 1
    for _ in range(254):
        result = ref_mul(result, a)
    return result


def ref_eval(coefficients: Sequence[int], x: int) -> int:
    """sum(c_j * x^j)."""
    total, power = 0, 1
    for c in coefficients:
        total ^= ref_mul(c, power)
        power = ref_mul(power, x)
    return total


def ref_interpolate_at_zero(points: Sequence[tuple[int, bytes]]) -> bytes:
    """Textbook Lagrange interpolation at 0, byte by byte."""
    length = len(points[0][1])
    out = bytearray(length)
    for position in range(length):
        acc = 0
        for i, (xi, yi) in enumerate(points):
            term = yi[position]
            for j, (xj, _) in enumerate(points):
                if i != j:
                    term = ref_mul(term, ref_mul(xj, ref_inv(xj ^ xi)))
            acc ^= term
        out[position] = acc
    return bytes(out)


# -- field arithmetic -----------------------------------------------------------


def test_fips197_multiplication_examples() -> None:
    # FIPS-197 section 4.2 and 4.2.1.
    assert shamir.gf_mul(0x57, 0x83) == 0xC1
    assert shamir.gf_mul(0x57, 0x13) == 0xFE
    assert ref_mul(0x57, 0x83) == 0xC1
    assert ref_mul(0x57, 0x13) == 0xFE


def test_fips197_inverse_example() -> None:
    # The AES S-box is built on the inverse; {53}^-1 = {CA}.
    assert shamir.gf_inv(0x53) == 0xCA
    assert ref_inv(0x53) == 0xCA


def test_mul_matches_reference_everywhere() -> None:
    for a in range(256):
        for b in range(256):
            assert shamir.gf_mul(a, b) == ref_mul(a, b)


def test_inverse_everywhere() -> None:
    for a in range(1, 256):
        assert shamir.gf_mul(a, shamir.gf_inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        shamir.gf_inv(0)


# -- published vector -------------------------------------------------------------

# draft-mcgrew-tss-03, section 9 ("official test case"): secret "test\0",
# threshold 2, share index 1 -> B9FA07E185, share index 2 -> F5409B4511.
TSS_SECRET = bytes.fromhex("7465737400")
TSS_SHARES = [(1, bytes.fromhex("B9FA07E185")), (2, bytes.fromhex("F5409B4511"))]


def test_tss_draft_vector() -> None:
    assert shamir.combine(TSS_SHARES) == TSS_SECRET
    assert shamir.combine(list(reversed(TSS_SHARES))) == TSS_SECRET
    assert ref_interpolate_at_zero(TSS_SHARES) == TSS_SECRET


# -- vectors computed by the reference ------------------------------------------


def _fixed_token_bytes(rows: list[bytes]) -> Iterator[bytes]:
    yield from rows


def test_split_matches_reference_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = bytes([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x53])
    rows = [
        bytes([0x11, 0x22, 0x33, 0x44, 0x55, 0x66]),
        bytes([0xA5, 0x00, 0xFF, 0x01, 0x5A, 0xC3]),
    ]
    supply = _fixed_token_bytes(rows)
    monkeypatch.setattr(secrets, "token_bytes", lambda n: next(supply))
    shares = shamir.split(secret, shares=5, threshold=3)
    assert [x for x, _ in shares] == [1, 2, 3, 4, 5]
    for x, y in shares:
        expected = bytes(
            ref_eval([secret[p], rows[0][p], rows[1][p]], x) for p in range(len(secret))
        )
        assert y == expected
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(subset) == secret
        assert ref_interpolate_at_zero(subset) == secret


def test_one_share_of_two_is_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    # Perfect secrecy for k = 2, checked exhaustively: over all 256 random
    # coefficients, share x takes every byte value exactly once, whatever the secret.
    for secret in (0x00, 0x5A, 0xFF):
        seen: dict[int, list[int]] = {x: [] for x in (1, 2, 3)}
        for coefficient in range(256):
            monkeypatch.setattr(secrets, "token_bytes", lambda n, c=coefficient: bytes([c]) * n)
            for x, y in shamir.split(bytes([secret]), shares=3, threshold=2):
                seen[x].append(y[0])
        for values in seen.values():
            assert sorted(values) == list(range(256))


# -- properties -------------------------------------------------------------------


@st.composite
def split_cases(draw: st.DrawFn) -> tuple[bytes, int, int, list[int]]:
    secret = draw(st.binary(min_size=16, max_size=48))
    threshold = draw(st.integers(min_value=2, max_value=6))
    n = draw(st.integers(min_value=threshold, max_value=8))
    chosen = draw(st.permutations(range(n)))
    return secret, n, threshold, list(chosen)


@settings(max_examples=60, deadline=None)
@given(split_cases())
def test_any_threshold_shares_recover(case: tuple[bytes, int, int, list[int]]) -> None:
    secret, n, threshold, order = case
    shares = shamir.split(secret, shares=n, threshold=threshold)
    assert len(shares) == n
    picked = [shares[i] for i in order[:threshold]]
    assert shamir.combine(picked) == secret
    assert shamir.combine([shares[i] for i in order]) == secret  # more than k is fine
    if threshold > 2:
        fewer = [shares[i] for i in order[: threshold - 1]]
        assert shamir.combine(fewer) != secret


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=8), st.integers(min_value=2, max_value=4))
def test_reference_agrees_with_module(secret: bytes, threshold: int) -> None:
    shares = shamir.split(secret, shares=threshold + 1, threshold=threshold)
    assert ref_interpolate_at_zero(shares[1:]) == secret


def test_splits_are_randomized() -> None:
    secret = b"\x00" * 32
    assert shamir.split(secret, 3, 2) != shamir.split(secret, 3, 2)


def test_two_shares_of_a_3_of_3_are_not_the_secret() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, shares=3, threshold=3)
    for pair in itertools.combinations(shares, 2):
        assert shamir.combine(pair) != secret


def test_max_parameters() -> None:
    secret = b"\x42" * 4
    shares = shamir.split(secret, shares=255, threshold=255)
    assert shares[-1][0] == 255
    assert shamir.combine(shares) == secret


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(3, 1), (2, 3), (256, 2), (1, 1), (0, 0), (300, 300)])
def test_bad_parameters(n: int, k: int) -> None:
    with pytest.raises(ShareError, match="threshold"):
        shamir.split(b"secret", shares=n, threshold=k)


def test_empty_secret_refused() -> None:
    with pytest.raises(ShareError, match="empty"):
        shamir.split(b"", 3, 2)


def test_duplicate_shares_refused() -> None:
    shares = shamir.split(b"secret", 3, 2)
    with pytest.raises(ShareError, match="duplicate"):
        shamir.combine([shares[0], shares[0]])
    with pytest.raises(ShareError, match="duplicate"):
        shamir.combine([shares[0], (1, shares[1][1])])


def test_mismatched_lengths_refused() -> None:
    a = shamir.split(b"secret", 3, 2)
    b = shamir.split(b"longer secret", 3, 2)
    with pytest.raises(ShareError, match="lengths"):
        shamir.combine([a[0], b[1]])


def test_bad_index_and_too_few() -> None:
    shares = shamir.split(b"secret", 3, 2)
    with pytest.raises(ShareError, match="index 0"):
        shamir.combine([(0, shares[0][1]), shares[1]])
    with pytest.raises(ShareError, match="index 256"):
        shamir.combine([(256, shares[0][1]), shares[1]])
    with pytest.raises(ShareError, match="at least 2"):
        shamir.combine(shares[:1])
    assert issubclass(ShareError, CryptoError)
