"""What `pgcloak backfill` stores for one existing value of a protected column.

An existing database adopting pgcloak holds its PII in clear; a policy edit may add a
blind index to an encrypted column (or drop one); a bumped ``key_version`` leaves the
values sealed under the old version until they are written again. Each of these leaves
values the proxy cannot serve as the policy says: a plaintext row is missed by a lookup
(which compares blind indexes) and returned as it is to every role. This module decides,
value by value, what the column should hold instead. It never touches a socket: the
runner feeds it the values and writes back what it returns.

Pure (no IO).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from pgcloak.crypto.blind_index import INDEX_LENGTH, blind_index, compose, stored_pattern
from pgcloak.crypto.envelope import ENVELOPE_PREFIX_TEXT, decrypt, encrypt, parse_header
from pgcloak.crypto.errors import CryptoError, NormalizationError, WrongKeyError
from pgcloak.crypto.keyring import Keyring
from pgcloak.policy import Policy

__all__ = ["ColumnJob", "ConvertError", "Converter", "Outcome", "column_jobs"]

#: What happened to one value: ``encrypted`` (it was plaintext), ``relaid`` (a stored
#: value of another layout, e.g. without the blind index the policy now asks for),
#: ``rotated`` (sealed under an older key version or another column's key).
Outcome = Literal["encrypted", "relaid", "rotated"]

#: A stored value with or without a blind index in front: ``[<index>.]pgc1:...``.
_ANY_STORED: Final = re.compile(
    r"^(?:[A-Za-z0-9_-]{" + str(INDEX_LENGTH) + r"}\.)?" + re.escape(ENVELOPE_PREFIX_TEXT) + r"[A-Za-z0-9_-]+$"
)


class ConvertError(Exception):
    """A value that cannot be brought to the policy's form. The message never holds the
    value: it is printed, and the value is PII."""


@dataclass(frozen=True, slots=True)
class ColumnJob:
    """One protected column as the policy wants it stored."""

    table: str  #: ``schema.table``, canonical
    column: str
    key_id: str  #: the column's key id (names its envelope key)
    index_key_id: str | None  #: the blind index key (a join group's), None without index
    normalize: str
    encrypt: bool
    hash_only: bool
    #: The stored form as a regular expression (POSIX and Python alike): what the
    #: ``pgcloak policy ddl`` CHECK constraint holds the column to.
    pattern: str

    @property
    def schema_name(self) -> str:
        return self.table.partition(".")[0]

    @property
    def table_name(self) -> str:
        return self.table.partition(".")[2]


def column_jobs(policy: Policy, tables: set[str] | None = None) -> dict[str, list[ColumnJob]]:
    """The policy's protected columns by table (``schema.table``), in a stable order;
    only ``tables`` when given. Raises ``KeyError`` naming a table the policy does not
    protect."""
    protected = policy.protected_tables()
    if tables is not None:
        unknown = sorted(tables - protected)
        if unknown:
            raise KeyError(f"not protected by the policy: {', '.join(unknown)}")
    out: dict[str, list[ColumnJob]] = {}
    for table in sorted(protected):
        if tables is not None and table not in tables:
            continue
        jobs = []
        for column, col in sorted(policy.columns_of(table).items()):
            indexed = col.index is not None
            jobs.append(
                ColumnJob(
                    table,
                    column,
                    policy.key_id(table, column),
                    policy.index_key_id(table, column) if indexed else None,
                    col.normalize,
                    col.encrypt,
                    col.hash_only,
                    stored_pattern(encrypt=col.encrypt, index=indexed),
                )
            )
        out[table] = jobs
    return out


class Converter:
    """Brings values to a column's stored form under the keyring's current versions
    (set them from the policy first: :meth:`for_policy`)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._patterns: dict[str, re.Pattern[str]] = {}

    @classmethod
    def for_policy(cls, policy: Policy, keyring: Keyring) -> Converter:
        for table in policy.protected_tables():
            for column, col in policy.columns_of(table).items():
                keyring.set_current_version(policy.key_id(table, column), col.key_version)
        return cls(keyring)

    def store(self, job: ColumnJob, plaintext: str) -> str:
        """The stored form of ``plaintext``, as the proxy writes it."""
        try:
            index = (
                blind_index(self.keyring, job.index_key_id, plaintext, job.normalize)
                if job.index_key_id is not None
                else None
            )
        except NormalizationError as exc:
            raise ConvertError(str(exc)) from None  # the normalizers never echo the value
        if job.hash_only:
            assert index is not None
            return index
        envelope = encrypt(self.keyring, job.key_id, plaintext.encode("utf-8"))
        return envelope if index is None else compose(index, envelope)

    def convert(self, job: ColumnJob, value: str, *, rotate: bool = False) -> tuple[str, Outcome] | None:
        """What ``value`` (as stored now, not NULL) should become, and why; None when it
        already is what the policy asks for.

        Without ``rotate`` only values not in the column's stored form change: plaintext
        is encrypted (or hashed), and a stored value of another layout is decrypted and
        stored again. With ``rotate``, envelopes sealed under an older key version of the
        column, or under another column's key (a value copied between columns), are
        sealed again under the current one. A hash-only column's plaintext cannot be
        told from its stored form when it is 22 base64url characters: such a value is
        left as it is. Text in the column's stored shape that is no envelope
        (``pgc1:hello``) is plaintext; the runner reads such values only with ``rotate``
        (its SQL takes the shape for the stored form, as the CHECK constraint does).
        """
        pattern = self._patterns.get(job.pattern)
        if pattern is None:
            pattern = self._patterns[job.pattern] = re.compile(job.pattern)
        # fullmatch: Python's ``$`` also matches before a final newline, PostgreSQL's not.
        if pattern.fullmatch(value) is not None:
            if job.hash_only:
                return None
            try:
                key_id, version = parse_header(value)
            except CryptoError:
                # Text that merely looks like an envelope ("pgc1:hello"): plaintext.
                return self.store(job, value), "encrypted"
            if not rotate or (key_id == job.key_id and version >= self.keyring.current_version(key_id)):
                return None
            return self.store(job, self._open(value)), "rotated"
        if _ANY_STORED.fullmatch(value) is not None:
            try:
                parse_header(value)
            except CryptoError:
                pass  # text that merely looks like a stored value: plaintext
            else:
                return self.store(job, self._open(value)), "relaid"
        return self.store(job, value), "encrypted"

    def _open(self, stored: str) -> str:
        try:
            plain = decrypt(self.keyring, stored)
        except WrongKeyError as exc:
            raise ConvertError(f"cannot decrypt a stored value: {exc}") from None
        except CryptoError:
            raise ConvertError("a stored value failed authentication (altered?)") from None
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError("a stored value does not decrypt to UTF-8 text") from None
