"""Per-column keys derived from the master key, cached.

No data key is ever stored: each is HKDF-SHA256(master key) with an ``info``
that binds

* the purpose: ``enc`` (AES-256-GCM envelopes), ``idx`` (blind-index HMAC),
  ``audit`` (the audit log's HMAC chain);
* the key id: a column id such as ``public.users.email``, or a join-group
  name for index keys shared by several columns;
* the key version (rotation).

``info = b"pgcloak-v1" | u8 len | purpose | u16 len | key id (UTF-8) | u32 version``;
the length prefixes make the encoding injective, so two different triples
never share a key. The salt is a fixed label: the master key is already
uniformly random, the salt only separates pgcloak's use of it.

Rotation: encryption uses the key id's *current* version (default 1);
decryption accepts any version from 1 to current. Index keys have their own
current version because rotating one means re-indexing every stored value.

The caches are plain dicts: lookups and inserts are atomic under the GIL and
a racing derivation computes the same key twice, harmlessly. Their size is
capped because key ids in envelopes come from the database (anyone able to
write a column could otherwise grow the cache): past the cap the cache is
cleared and rebuilt from use.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .keys import MasterKey

KEY_LENGTH: Final = 32
MAX_KEY_VERSION: Final = 0xFFFF  # the envelope stores the version as u16
_HKDF_SALT: Final = b"pgcloak hkdf salt v1"
_INFO_LABEL: Final = b"pgcloak-v1"
AUDIT_KEY_ID: Final = "audit"


class Purpose(StrEnum):
    """What a derived key is for; part of the HKDF info."""

    ENC = "enc"
    IDX = "idx"
    AUDIT = "audit"


def _check_key_id(key_id: str) -> bytes:
    if not isinstance(key_id, str) or not key_id:
        raise ValueError("a key id is a non-empty string")
    encoded = key_id.encode("utf-8")
    if len(encoded) > 0xFFFF:
        raise ValueError("a key id is at most 65535 bytes of UTF-8")
    return encoded


def _check_version(version: int) -> int:
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= MAX_KEY_VERSION
    ):
        raise ValueError(f"a key version is an integer in 1..{MAX_KEY_VERSION}, got {version!r}")
    return version


def hkdf_info(purpose: Purpose, key_id: str, version: int) -> bytes:
    """The HKDF ``info`` for one derived key (see the module docstring)."""
    purpose_bytes = Purpose(purpose).value.encode("ascii")
    key_id_bytes = _check_key_id(key_id)
    return b"".join(
        (
            _INFO_LABEL,
            len(purpose_bytes).to_bytes(1, "big"),
            purpose_bytes,
            len(key_id_bytes).to_bytes(2, "big"),
            key_id_bytes,
            _check_version(version).to_bytes(4, "big"),
        )
    )


def derive_key(master_key: MasterKey, purpose: Purpose, key_id: str, version: int) -> bytes:
    """HKDF-SHA256 of the master key for (purpose, key id, version); 32 bytes."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LENGTH,
        salt=_HKDF_SALT,
        info=hkdf_info(purpose, key_id, version),
    )
    return hkdf.derive(master_key.expose_secret())


class Keyring:
    """Derives, caches and versions the data keys of one master key."""

    def __init__(
        self,
        master_key: MasterKey,
        *,
        versions: Mapping[str, int] | None = None,
        index_versions: Mapping[str, int] | None = None,
        max_cached: int = 4096,
    ) -> None:
        self._master_key = master_key
        self._check_value = master_key.check_value
        self._versions: dict[str, int] = {}
        self._index_versions: dict[str, int] = {}
        self._max_cached = max_cached
        self._keys: dict[tuple[Purpose, str, int], bytes] = {}
        self._aeads: dict[tuple[str, int], AESGCM] = {}
        self._current: dict[str, tuple[int, AESGCM]] = {}
        self._hmacs: dict[tuple[str, int], HMAC] = {}
        #: key id -> HMAC context of its current index version (the blind-index hot path)
        self._current_hmacs: dict[str, HMAC] = {}
        #: key id -> (current_aead() state, envelope header start, associated data
        #: start): kept here by the envelope module, valid while that state is current
        self._envelope_heads: dict[str, tuple[tuple[int, AESGCM], bytes, bytes]] = {}
        for key_id, version in (versions or {}).items():
            self.set_current_version(key_id, version)
        for key_id, version in (index_versions or {}).items():
            self.set_index_version(key_id, version)

    def __repr__(self) -> str:
        return (
            f"Keyring(fingerprint={self.fingerprint}, versions={self._versions!r}, "
            f"index_versions={self._index_versions!r})"
        )

    @property
    def check_value(self) -> bytes:
        """The master key's public 4-byte check value (see :class:`MasterKey`)."""
        return self._check_value

    @property
    def fingerprint(self) -> str:
        return self._master_key.fingerprint

    @property
    def max_cached(self) -> int:
        """Entries a cache holds before it is cleared and rebuilt from use."""
        return self._max_cached

    # -- versions -----------------------------------------------------------

    def current_version(self, key_id: str) -> int:
        """Version used to encrypt for ``key_id`` (newest that decryption accepts)."""
        return self._versions.get(key_id, 1)

    def set_current_version(self, key_id: str, version: int) -> None:
        _check_key_id(key_id)
        self._versions[key_id] = _check_version(version)
        self._current.pop(key_id, None)
        self._envelope_heads.pop(key_id, None)

    def index_version(self, key_id: str) -> int:
        """Version of the blind-index key for ``key_id`` (column or join group)."""
        return self._index_versions.get(key_id, 1)

    def set_index_version(self, key_id: str, version: int) -> None:
        _check_key_id(key_id)
        self._index_versions[key_id] = _check_version(version)
        self._current_hmacs.pop(key_id, None)

    # -- keys ---------------------------------------------------------------

    def key(self, purpose: Purpose, key_id: str, version: int) -> bytes:
        """The derived key for (purpose, key id, version), cached."""
        slot = (purpose, key_id, version)
        key = self._keys.get(slot)
        if key is None:
            key = derive_key(self._master_key, purpose, key_id, version)
            if len(self._keys) >= self._max_cached:
                self._keys.clear()
            self._keys[slot] = key
        return key

    def aead(self, key_id: str, version: int, *, cache: bool = True) -> AESGCM:
        """AES-256-GCM with the ``enc`` key of (key id, version).

        ``cache=False`` derives without remembering, for versions the keyring
        would refuse anyway (only tried to tell tampering from a newer key).
        """
        slot = (key_id, version)
        aead = self._aeads.get(slot)
        if aead is None:
            if not cache:
                return AESGCM(derive_key(self._master_key, Purpose.ENC, key_id, version))
            aead = AESGCM(self.key(Purpose.ENC, key_id, version))
            if len(self._aeads) >= self._max_cached:
                self._aeads.clear()
            self._aeads[slot] = aead
        return aead

    def current_aead(self, key_id: str) -> tuple[int, AESGCM]:
        """``(current version, its AESGCM)`` for ``key_id``: the encryption hot path.

        The tuple is the same object until the version changes (or the cache is
        cleared), so callers may key their own per-version data on its identity.
        """
        state = self._current.get(key_id)
        if state is None:
            version = self.current_version(key_id)
            state = (version, self.aead(key_id, version))
            if len(self._current) >= self._max_cached:
                self._current.clear()
            self._current[key_id] = state
            if self._versions.get(key_id, 1) != version:
                # set_current_version() ran meanwhile (another thread): do not keep it
                self._current.pop(key_id, None)
        return state

    def decryption_aead(self, key_id: str, version: int) -> tuple[int, AESGCM]:
        """``(current version, AESGCM of version)`` for opening an envelope.

        A version above the current one is derived but not cached: the caller only
        uses it to tell tampering from a newer key, then refuses the envelope.
        """
        state = self._current.get(key_id)
        if state is not None and state[0] == version:
            return state
        current = self.current_version(key_id)
        if version == current:
            return self.current_aead(key_id)
        return current, self.aead(key_id, version, cache=version <= current)

    def index_key(self, key_id: str, version: int | None = None) -> bytes:
        """HMAC key of the blind index for ``key_id``; current index version by default."""
        return self.key(
            Purpose.IDX, key_id, self.index_version(key_id) if version is None else version
        )

    def index_hmac(self, key_id: str, version: int | None = None) -> HMAC:
        """A keyed HMAC-SHA256 context for the blind index; ``copy()`` it, never update it."""
        if version is None:
            context = self._current_hmacs.get(key_id)
            if context is None:
                version = self.index_version(key_id)
                context = self._index_hmac(key_id, version)
                if len(self._current_hmacs) >= self._max_cached:
                    self._current_hmacs.clear()
                self._current_hmacs[key_id] = context
                if self._index_versions.get(key_id, 1) != version:
                    # set_index_version() ran meanwhile (another thread): do not keep it
                    self._current_hmacs.pop(key_id, None)
            return context
        return self._index_hmac(key_id, version)

    def _index_hmac(self, key_id: str, version: int) -> HMAC:
        slot = (key_id, version)
        context = self._hmacs.get(slot)
        if context is None:
            context = HMAC(self.key(Purpose.IDX, *slot), hashes.SHA256())
            if len(self._hmacs) >= self._max_cached:
                self._hmacs.clear()
            self._hmacs[slot] = context
        return context

    def audit_key(self, key_id: str = AUDIT_KEY_ID, version: int = 1) -> bytes:
        """HMAC key of the audit chain."""
        return self.key(Purpose.AUDIT, key_id, version)
