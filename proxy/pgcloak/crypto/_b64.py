"""Strict, canonical, unpadded base64url.

The standard library's decoders accept padding, other alphabets and
non-canonical trailing bits, so two different strings could decode to the same
envelope. We accept exactly one spelling per byte string: that keeps "a changed
character is detected" true for envelopes.
"""

from __future__ import annotations

import binascii
from typing import Final

_STD_TO_URL: Final = bytes.maketrans(b"+/", b"-_")
# '+', '/' and '=' are not base64url: map them to '*', which strict mode rejects.
_URL_TO_STD: Final = bytes.maketrans(b"-_+/=", b"+/***")
_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_VALUE: Final = [_ALPHABET.find(bytes([c])) for c in range(256)]


def encode(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return (
        binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=").decode("ascii")
    )


def decode(text: bytes) -> bytes:
    """Decode canonical unpadded base64url; ``ValueError`` on anything else."""
    rem = len(text) % 4
    if rem:
        if rem == 1:
            raise ValueError("invalid base64url length")
        # The unused low bits of the last character must be zero (canonical form).
        unused = 0x0F if rem == 2 else 0x03
        if _VALUE[text[-1]] & unused:
            raise ValueError("non-canonical base64url")
        std = text.translate(_URL_TO_STD) + (b"==" if rem == 2 else b"=")
    else:
        std = text.translate(_URL_TO_STD)
    try:
        return binascii.a2b_base64(std, strict_mode=True)
    except binascii.Error:
        raise ValueError("invalid base64url") from None


def decoded_length(text_length: int) -> int:
    """Bytes that ``text_length`` characters of unpadded base64url decode to."""
    return text_length * 3 // 4
