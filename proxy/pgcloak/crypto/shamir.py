"""Shamir secret sharing over GF(2^8), byte by byte.

The field is the AES field: polynomial x^8 + x^4 + x^3 + x + 1 (0x11B), the
same as draft-mcgrew-tss-03 (whose published test vector our tests check).
Each byte of the secret is the constant term of its own polynomial of degree
``threshold - 1`` whose other coefficients come from :mod:`secrets`; share
``x`` (1..n) holds that polynomial evaluated at ``x`` for every byte. Any
``threshold`` shares determine the polynomials (Lagrange interpolation at 0);
fewer are, information-theoretically, independent of the secret.

Arithmetic is done on whole byte strings: multiplying every byte by a constant
is one ``bytes.translate`` with that constant's 256-byte product table, and
addition is XOR of big integers. This is not constant-time; splitting and
combining are offline operations (CLI, start-up), not exposed to a remote peer.

This module works on raw bytes; :mod:`pgcloak.crypto.keys` defines the share
text format and the integrity checks around it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from functools import cache
from typing import Final

from .errors import ShareError

MIN_THRESHOLD: Final = 2
MAX_SHARES: Final = 255


def _tables() -> tuple[list[int], list[int]]:
    """exp/log tables for generator 0x03 (a primitive element of the AES field)."""
    exp = [0] * 510
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        # value *= 3, i.e. value ^ (value * 2), reduced by 0x11B
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= 0x11B
        value ^= doubled
    for power in range(255, 510):
        exp[power] = exp[power - 255]
    return exp, log


_EXP, _LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements."""
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return _EXP[255 - _LOG[a]]


@cache
def _mul_table(c: int) -> bytes:
    """``translate`` table mapping every byte v to c*v."""
    return bytes(gf_mul(c, v) for v in range(256))


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def split(secret: bytes, shares: int, threshold: int) -> list[tuple[int, bytes]]:
    """Split ``secret`` into ``shares`` points ``(x, y)``; any ``threshold`` recover it."""
    if not MIN_THRESHOLD <= threshold <= shares <= MAX_SHARES:
        raise ShareError(
            f"need {MIN_THRESHOLD} <= threshold <= shares <= {MAX_SHARES}, "
            f"got threshold={threshold} shares={shares}"
        )
    if not secret:
        raise ShareError("cannot split an empty secret")
    length = len(secret)
    # coefficients[j] holds the x^j coefficient of every byte's polynomial.
    coefficients = [bytes(secret)] + [secrets.token_bytes(length) for _ in range(threshold - 1)]
    points = []
    for x in range(1, shares + 1):
        table = _mul_table(x)
        y = coefficients[-1]
        for coefficient in reversed(coefficients[:-1]):  # Horner's rule
            y = _xor(y.translate(table), coefficient)
        points.append((x, y))
    return points


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """Interpolate the points at x = 0.

    With fewer shares than the threshold this returns a value unrelated to
    the secret; callers that must notice carry a checksum inside the secret
    (see :func:`pgcloak.crypto.keys.combine_shares`).
    """
    if len(shares) < MIN_THRESHOLD:
        raise ShareError(f"need at least {MIN_THRESHOLD} shares, got {len(shares)}")
    xs = [x for x, _ in shares]
    for position, x in enumerate(xs, start=1):
        if not 1 <= x <= MAX_SHARES:
            raise ShareError(f"share #{position} has index {x}, outside 1..{MAX_SHARES}")
    if len(set(xs)) != len(xs):
        duplicates = sorted({x for x in xs if xs.count(x) > 1})
        raise ShareError(f"duplicate share index {duplicates}: each share must be different")
    length = len(shares[0][1])
    if length == 0 or any(len(y) != length for _, y in shares):
        raise ShareError("shares have different lengths: they come from different secrets")
    result = bytes(length)
    for i, (xi, yi) in enumerate(shares):
        # Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i); '-' is XOR here.
        numerator = 1
        denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = gf_mul(numerator, xj)
                denominator = gf_mul(denominator, xj ^ xi)
        basis = gf_mul(numerator, gf_inv(denominator))
        result = _xor(result, yi.translate(_mul_table(basis)))
    return result
