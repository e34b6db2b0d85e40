"""The master key, its text form, and its k-of-n share text form.

The master key is 32 random bytes from which every data key is derived
(:mod:`pgcloak.crypto.keyring`); nothing else is secret. :class:`MasterKey`
keeps the bytes out of ``repr``/``str``/logs and refuses pickling, so the key
does not leak through the usual accidents. (Python cannot wipe memory
reliably; keeping core dumps off is the process's job.)

Text forms:

* master key: standard base64 of the 32 bytes (what ``openssl rand -base64 32``
  prints). Reading also accepts base64url, missing padding, and 64 hex digits
  (``openssl rand -hex 32``).
* share: ``pgcloak-share-v1:<k>:<x>:<payload>:<check>`` where ``k`` is the
  threshold, ``x`` the share index (1..255), ``payload`` unpadded base64url of
  the share bytes, ``check`` 8 hex digits of SHA-256 over the text before it
  (catches a mistyped share and names it). The shared secret is
  ``key || sha256(tag || key)[:4]``: the 4-byte checksum travels *inside* the
  sharing, so fewer than k shares still reveal nothing, while combining a wrong
  or incomplete set is detected (probability of a miss: 2^-32) instead of
  returning a garbage key.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any, Final, NoReturn, final

from . import _b64, shamir
from .errors import KeyMaterialError, ShareError

MASTER_KEY_LENGTH: Final = 32
SHARE_PREFIX: Final = "pgcloak-share-v1"

_CHECK_VALUE_TAG: Final = b"pgcloak key check value v1"
CHECK_VALUE_LENGTH: Final = 3
_SHARE_CHECKSUM_TAG: Final = b"pgcloak share checksum v1"
_SHARE_CHECKSUM_LENGTH: Final = 4
_SHARE_TEXT_CHECK_HEX: Final = 8


@final
class MasterKey:
    """32 secret bytes that never show up in ``repr``, ``str`` or pickles.

    ``check_value`` (3 bytes of HMAC-SHA256 keyed by the master key) is public:
    envelopes carry it so a wrong master key is reported as such, and
    ``fingerprint`` (its hex) identifies a key in logs. 24 bits of a PRF output
    do not help an attacker search a 256-bit key space. Three bytes because
    they are exactly four base64 characters (see ``envelope``).
    """

    __slots__ = ("_check_value", "_key")

    def __init__(self, key: bytes | bytearray) -> None:
        if not isinstance(key, bytes | bytearray):
            raise KeyMaterialError(f"a master key is bytes, got {type(key).__name__}")
        if len(key) != MASTER_KEY_LENGTH:
            raise KeyMaterialError(
                f"a master key is {MASTER_KEY_LENGTH} bytes, got {len(key)} bytes"
            )
        self._key = bytes(key)
        self._check_value = hmac.digest(self._key, _CHECK_VALUE_TAG, "sha256")[:CHECK_VALUE_LENGTH]

    @classmethod
    def generate(cls) -> MasterKey:
        """A new key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(MASTER_KEY_LENGTH))

    def expose_secret(self) -> bytes:
        """The raw key bytes. Call sites are where the key leaves this wrapper."""
        return self._key

    @property
    def check_value(self) -> bytes:
        """3 public bytes identifying this key (embedded in every envelope)."""
        return self._check_value

    @property
    def fingerprint(self) -> str:
        """``check_value`` as 6 hex digits, for logs and error messages."""
        return self._check_value.hex()

    def __repr__(self) -> str:
        return f"MasterKey(<redacted>, fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKey cannot be pickled (it would write the key out)")

    def __copy__(self) -> MasterKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> MasterKey:
        return self


def generate_master_key() -> MasterKey:
    """A new random master key."""
    return MasterKey.generate()


def master_key_to_text(master_key: MasterKey) -> str:
    """Standard padded base64 (44 characters) of the key."""
    return binascii.b2a_base64(master_key.expose_secret(), newline=False).decode("ascii")


def master_key_from_text(text: str | bytes) -> MasterKey:
    """Parse base64 (standard or url-safe, padding optional) or 64 hex digits."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise KeyMaterialError("master key text must be ASCII") from None
    stripped = text.strip()
    if len(stripped) == 2 * MASTER_KEY_LENGTH:
        try:
            return MasterKey(bytes.fromhex(stripped))
        except ValueError:
            raise KeyMaterialError("master key text of 64 characters must be hex digits") from None
    unpadded = stripped.rstrip("=").replace("+", "-").replace("/", "_")
    if len(unpadded) == 43:  # ceil(32 * 4 / 3)
        try:
            return MasterKey(_b64.decode(unpadded.encode("ascii")))
        except (ValueError, UnicodeEncodeError):
            pass
    raise KeyMaterialError(
        "master key text must be base64 of 32 bytes (44 characters) or 64 hex digits "
        f"(got {len(stripped)} characters)"
    )


def _secret_checksum(key: bytes) -> bytes:
    return hashlib.sha256(_SHARE_CHECKSUM_TAG + key).digest()[:_SHARE_CHECKSUM_LENGTH]


def _share_text_check(body: str) -> str:
    return hashlib.sha256(body.encode("ascii")).hexdigest()[:_SHARE_TEXT_CHECK_HEX]


def split_master_key(master_key: MasterKey, shares: int, threshold: int) -> list[str]:
    """Split the key into ``shares`` share texts, any ``threshold`` of which recover it."""
    key = master_key.expose_secret()
    points = shamir.split(key + _secret_checksum(key), shares, threshold)
    texts = []
    for x, y in points:
        body = f"{SHARE_PREFIX}:{threshold}:{x}:{_b64.encode(y)}"
        texts.append(f"{body}:{_share_text_check(body)}")
    return texts


def parse_share(text: str, position: int = 1) -> tuple[int, int, bytes]:
    """``(threshold, x, payload)`` of one share text; ``position`` names it in errors."""
    fields = text.strip().split(":")
    where = f"share #{position}"
    if len(fields) != 5 or fields[0] != SHARE_PREFIX:
        raise ShareError(
            f"{where} is not a pgcloak share (expected {SHARE_PREFIX}:<k>:<x>:<data>:<check>)"
        )
    prefix, k_text, x_text, payload_text, check = fields
    body = ":".join((prefix, k_text, x_text, payload_text))
    if not body.isascii() or not hmac.compare_digest(
        check.encode(), _share_text_check(body).encode()
    ):
        raise ShareError(
            f"{where} is damaged: its checksum does not match (mistyped or truncated?)"
        )
    if not (k_text.isdecimal() and x_text.isdecimal()):
        raise ShareError(f"{where} has a non-numeric threshold or index")
    threshold, x = int(k_text), int(x_text)
    if not shamir.MIN_THRESHOLD <= threshold <= shamir.MAX_SHARES:
        raise ShareError(f"{where} has threshold {threshold}, outside 2..255")
    if not 1 <= x <= shamir.MAX_SHARES:
        raise ShareError(f"{where} has index {x}, outside 1..255")
    try:
        payload = _b64.decode(payload_text.encode("ascii"))
    except ValueError:
        raise ShareError(f"{where} has invalid share data") from None
    if len(payload) != MASTER_KEY_LENGTH + _SHARE_CHECKSUM_LENGTH:
        raise ShareError(f"{where} has {len(payload)} bytes of data, not a master key share")
    return threshold, x, payload


def combine_shares(texts: Sequence[str]) -> MasterKey:
    """Recover the master key from at least ``threshold`` share texts."""
    if not texts:
        raise ShareError("no shares given")
    parsed = [parse_share(text, position) for position, text in enumerate(texts, start=1)]
    thresholds = {threshold for threshold, _, _ in parsed}
    if len(thresholds) != 1:
        raise ShareError(
            f"shares disagree on the threshold ({sorted(thresholds)}): they come from different splits"
        )
    threshold = thresholds.pop()
    xs = [x for _, x, _ in parsed]
    duplicates = sorted({x for x in xs if xs.count(x) > 1})
    if duplicates:
        raise ShareError(f"share index {duplicates} given more than once: need distinct shares")
    if len(parsed) < threshold:
        raise ShareError(f"need {threshold} shares to recover the master key, got {len(parsed)}")
    secret = shamir.combine([(x, payload) for _, x, payload in parsed])
    key, checksum = secret[:MASTER_KEY_LENGTH], secret[MASTER_KEY_LENGTH:]
    if not hmac.compare_digest(checksum, _secret_checksum(key)):
        raise ShareError(
            "shares do not reconstruct a valid key (shares from different splits, "
            "or one share is wrong)"
        )
    return MasterKey(key)
