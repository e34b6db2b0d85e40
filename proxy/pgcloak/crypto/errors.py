"""Exceptions of pgcloak.crypto.

Every message is written here, by hand, and names only public facts (a key id,
a file path, a share's position, a length): never key material, never
plaintext. Errors raised while parsing secrets are re-raised ``from None`` so a
traceback does not carry a lower-level message either.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class of every error raised by ``pgcloak.crypto``."""


class KeyMaterialError(CryptoError, ValueError):
    """Text that should hold a master key or a key share does not."""


class ShareError(KeyMaterialError):
    """Shamir shares that are invalid, inconsistent or insufficient."""


class KeySourceError(CryptoError):
    """A key source could not produce the master key (missing, unsafe, invalid)."""


class WrongKeyError(CryptoError):
    """The envelope was sealed under a key this keyring will not use.

    Either a different master key (detected by the envelope's key check value)
    or a key version newer than the configured current version.
    """


class TamperedError(CryptoError):
    """The envelope failed authentication: it was modified or corrupted."""


class MalformedEnvelopeError(TamperedError):
    """The value is not a syntactically valid envelope.

    A subclass of :class:`TamperedError` because an envelope that we produced
    and that no longer parses has, by definition, been altered. Callers that
    scan arbitrary column values and want to pass through text that merely
    looks like an envelope catch this class first.
    """


class NormalizationError(CryptoError, ValueError):
    """A value cannot be normalized for a blind index (e.g. not a phone number)."""
