"""Masked forms reveal a bounded amount and never the value's length."""

from __future__ import annotations

import pytest

from pgcloak.policy import MASK, mask_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "a***@example.com"),
        ("  Bob.Smith@Example.COM ", "B***@Example.COM"),
        ("a@example.com", "***@example.com"),
        ('"odd@local"@example.com', '"***@example.com'),
        ("not-an-email", MASK),
        ("@example.com", MASK),
        ("alice@", MASK),
        ("", MASK),
    ],
)
def test_email(value: str, expected: str) -> None:
    assert mask_value(value, "email") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+1 (555) 010-9942", "****42"),
        ("+44 20 7946 0018", "****18"),
        ("12345", MASK),
        ("n/a", MASK),
    ],
)
def test_phone(value: str, expected: str) -> None:
    assert mask_value(value, "phone") == expected


def test_other_values_get_a_fixed_mask() -> None:
    assert mask_value("123-45-6789", "none") == MASK
    assert mask_value("x" * 1000, "none") == MASK
    assert mask_value("secret", "anything-else") == MASK


def test_length_is_not_revealed() -> None:
    short = mask_value("ab@example.com", "email")
    long = mask_value("abcdefghijklmnop@example.com", "email")
    assert len(short) == len(long)
    assert len(mask_value("+1 555 010 99 42", "phone")) == len(mask_value("5550109942", "phone"))
