"""Masked forms of protected values, for roles whose decision is ``mask``.

A mask must be useful to a support agent ("is this the customer's address?")
without handing out the value, and must not leak the value's length: every
masked form has a fixed number of mask characters.

* email: first character of the local part and the full domain, ``a***@example.com``
  (a one-character local part shows no character). The domain is shown as written,
  so its length is visible.
* phone: the last two digits, ``****42``, only when the number has at least six digits.
* anything else (and malformed emails or phones): ``****``.
"""

from __future__ import annotations

MASK = "****"
_EMAIL_STARS = "***"
_DIGITS = frozenset("0123456789")
_MIN_PHONE_DIGITS = 6


def mask_value(value: str, normalize: str) -> str:
    """Mask ``value`` according to the column's ``normalize`` setting (see module doc)."""
    if normalize == "email":
        local, at, domain = value.strip().rpartition("@")
        if not at or not local or not domain:
            return MASK
        head = local[0] if len(local) >= 2 else ""
        return f"{head}{_EMAIL_STARS}@{domain}"
    if normalize == "phone":
        digits = [c for c in value if c in _DIGITS]
        if len(digits) < _MIN_PHONE_DIGITS:
            return MASK
        return MASK + "".join(digits[-2:])
    return MASK
