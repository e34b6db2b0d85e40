"""Applying plans to values: encrypt / blind-index what goes in, decrypt what comes out.

A :class:`Protection` bundles one policy, its planner and the keyring. The server
holds exactly one and swaps it whole on a policy reload, so a session always sees a
consistent triple. Nothing here does IO: the session feeds it message bodies.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pgcloak.crypto.blind_index import INDEX_LENGTH, blind_index, compose
from pgcloak.crypto.envelope import ENVELOPE_PREFIX, decrypt, encrypt, parse_header
from pgcloak.crypto.errors import (
    CryptoError,
    MalformedEnvelopeError,
    NormalizationError,
    WrongKeyError,
)
from pgcloak.crypto.keyring import Keyring
from pgcloak.policy import Policy, ReadView, mask_value
from pgcloak.sql import Literal, Plan, Planner, ValueAction
from pgcloak.sql.search_path import DEFAULT_PATH
from pgcloak.wire.copy_data import CopyReader, Field, csv_value, record_line, text_value

_I32 = struct.Struct("!i")
_PARSE_CACHE_SIZE = 4096
#: Planners kept for other search_paths (each with its own plan caches).
_MAX_VARIANTS = 256
_ARRAY_HEAD = struct.Struct("!iiI")
_DIM = struct.Struct("!ii")

#: A stored value anywhere in a text row: optional ``<index>.`` then an envelope.
_STORED = re.compile(
    rb"(?:[A-Za-z0-9_-]{" + str(INDEX_LENGTH).encode() + rb"}\.)?" + re.escape(ENVELOPE_PREFIX) + rb"[A-Za-z0-9_-]+"
)


class ValueRefused(Exception):
    """A value that cannot be protected (e.g. a phone number that is not one)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class DecryptionFailed(Exception):
    """A stored envelope failed authentication: tampered, or the wrong master key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.sqlstate = "XX001"  # data_corrupted
        self.message = message


class ReadDenied(Exception):
    """A stored value the session's roles may not read (policy decision ``deny``)."""

    def __init__(self, key_id: str, *, masked_inside: bool = False, searched: bool = False) -> None:
        message = (
            f"permission denied for protected column {key_id}: "
            f"the pgcloak policy does not let this role read it{', nor search by it' if searched else ''}"
        )
        if masked_inside:
            message = (
                f"permission denied for protected column {key_id} inside a row, array or JSON "
                "value: the pgcloak policy lets this role read it masked, and only a column's "
                "own value can be masked; select the column itself"
            )
        super().__init__(message)
        self.sqlstate = "42501"  # insufficient_privilege
        self.message = message


@dataclass(frozen=True, slots=True)
class ParsePlan:
    """A Parse text's plan plus what the session sends for it.

    ``static`` is the rewritten query text when it is the same on every execution (no
    literal in it is encrypted, since encryption is randomized); ``literals`` are the
    text's literals when it must be rendered per message.
    """

    plan: Plan
    static: bytes | None
    literals: tuple[Literal, ...]


@dataclass(frozen=True)
class Protection:
    policy: Policy
    keyring: Keyring
    planner: Planner
    #: Parse texts already planned, keyed by their raw bytes (extended-protocol
    #: clients parse the same few texts over and over).
    parse_cache: dict[bytes, ParsePlan] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    #: The same policy planned for other search_paths (shared by all of them; see
    #: :meth:`for_search_path`), by the path's schemas that hold protected tables.
    variants: dict[tuple[str, ...] | None, Protection] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(cls, policy: Policy, keyring: Keyring) -> Protection:
        for table in policy.protected_tables():
            for column, col in policy.columns_of(table).items():
                keyring.set_current_version(policy.key_id(table, column), col.key_version)
        return cls(policy, keyring, Planner(policy, index_length=INDEX_LENGTH))

    def for_search_path(self, search_path: tuple[str, ...] | None) -> Protection:
        """This protection for a session whose ``search_path`` is ``search_path`` (None:
        not known at the moment).

        Only the schemas that hold protected tables matter to name resolution, so every
        path whose such schemas are none or ``public`` alone (the usual case) gets
        ``self``; others get a sibling with a planner (and caches) of its own.
        """
        key: tuple[str, ...] | None = None
        if search_path is not None:
            schemas = self.policy.protected_schemas()
            key = tuple(s for s in search_path if s in schemas)
            if key in ((), (DEFAULT_PATH[0],)) and self.planner.search_path == DEFAULT_PATH:
                return self
        found = self.variants.get(key)
        if found is None:
            if len(self.variants) >= _MAX_VARIANTS:
                del self.variants[next(iter(self.variants))]  # the oldest
            planner = Planner(
                self.policy,
                index_length=self.planner.index_length,
                cache_size=self.planner.cache_size,
                search_path=key,
            )
            found = Protection(self.policy, self.keyring, planner, variants=self.variants)
            self.variants[key] = found
        return found

    def plan_parse(self, query: bytes) -> ParsePlan:
        found = self.parse_cache.get(query)
        if found is not None:
            return found
        text = query.decode("utf-8", "surrogateescape")
        plan = self.planner.plan(text)
        static: bytes | None = None
        literals: tuple[Literal, ...] = ()
        if plan.decision.allowed and plan.needs_render:
            lits = self.planner.plan_simple(text)[1]
            if any(a.kind != "pass" for a in plan.literals):
                literals = tuple(lits)
            else:
                static = self.planner.render(plan, lits).encode("utf-8", "surrogateescape")
        entry = ParsePlan(plan, static, literals)
        if len(self.parse_cache) >= _PARSE_CACHE_SIZE:
            self.parse_cache.clear()
        self.parse_cache[query] = entry
        return entry

    # -- values going in --------------------------------------------------------------
    def transform(
        self, action: ValueAction, value: str | None, lookups: dict[str, list[str]] | None = None
    ) -> str | None:
        """The stored or compared form of one plaintext value (None stays NULL).

        ``lookups`` collects the blind-index values searched, per column key id: what
        the audit trail records instead of the looked-up value.
        """
        if value is None:
            return None
        if action.array:
            return render_text_array([self._one(action, v, lookups) for v in parse_text_array(value)])
        return self._one(action, value, lookups)

    def _one(
        self, action: ValueAction, value: str | None, lookups: dict[str, list[str]] | None = None
    ) -> str | None:
        if value is None or action.kind == "pass":
            return value
        try:
            if action.kind == "lookup" or action.hash_only:
                assert action.index_key_id is not None
                index = blind_index(self.keyring, action.index_key_id, value, action.normalize)
                if lookups is not None and action.kind == "lookup" and action.key_id is not None:
                    lookups.setdefault(action.key_id, []).append(index)
                return index
            assert action.key_id is not None
            envelope = encrypt(self.keyring, action.key_id, value.encode("utf-8"))
            if action.index:
                assert action.index_key_id is not None
                return compose(blind_index(self.keyring, action.index_key_id, value, action.normalize), envelope)
            return envelope
        except NormalizationError as exc:
            raise ValueRefused("22023", f"invalid value for {action.table}.{action.column}: {exc}") from None
        except UnicodeEncodeError:
            # Statement text that is not UTF-8 (decoded with surrogateescape): PostgreSQL
            # would refuse it as well; never encrypt or index what it is not.
            raise ValueRefused("22021", f"value for {action.table}.{action.column} is not valid UTF-8") from None

    def transform_param(
        self, action: ValueAction, raw: bytes, binary: bool, lookups: dict[str, list[str]] | None = None
    ) -> bytes:
        """A Bind parameter in text or binary format (text columns: UTF-8 either way)."""
        if action.array and binary:
            return self._binary_array(action, raw, lookups)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueRefused("22021", f"value for {action.table}.{action.column} is not valid UTF-8") from None
        out = self.transform(action, text, lookups)
        assert out is not None
        return out.encode("utf-8")

    def _binary_array(self, action: ValueAction, raw: bytes, lookups: dict[str, list[str]] | None) -> bytes:
        try:
            ndim, flags, elem_oid = _ARRAY_HEAD.unpack_from(raw, 0)
            if ndim == 0:
                return raw
            if ndim != 1:
                raise ValueRefused("0A000", f"only one-dimensional arrays can be compared with {action.column}")
            size, lbound = _DIM.unpack_from(raw, 12)
            pos = 20
            items: list[bytes | None] = []
            for _ in range(size):
                (n,) = _I32.unpack_from(raw, pos)
                pos += 4
                if n < 0:
                    items.append(None)
                    continue
                items.append(raw[pos : pos + n])
                pos += n
        except struct.error:
            raise ValueRefused("08P01", "malformed binary array parameter") from None
        single = dataclasses.replace(action, array=False)
        out = [_ARRAY_HEAD.pack(1, flags, elem_oid), _DIM.pack(len(items), lbound)]
        for item in items:
            if item is None:
                out.append(_I32.pack(-1))
            else:
                value = self.transform_param(single, item, True, lookups)
                out.append(_I32.pack(len(value)) + value)
        return b"".join(out)

    # -- values coming out ------------------------------------------------------------
    def reveal(self, value: bytes, view: ReadView | None = None) -> bytes:
        """What the session gets for a stored value that carries an envelope: its
        plaintext, or its masked form, or :class:`ReadDenied`, as ``view`` decides by the
        envelope's key id (None: reveal everything). Other values come back unchanged."""
        if ENVELOPE_PREFIX not in value:
            return value
        decision = "reveal"
        if view is not None:
            try:
                key_id = parse_header(value)[0]
            except MalformedEnvelopeError:
                self._check_nested(value, view)
                return value  # ordinary text, or stored values inside a composite
            decision = view.decision(key_id)
            if decision == "deny":
                raise ReadDenied(key_id)
        try:
            plain = decrypt(self.keyring, value)
        except MalformedEnvelopeError:
            if view is not None:  # an envelope followed by more text: a composite
                self._check_nested(value, view)
            return value
        except WrongKeyError:
            raise DecryptionFailed(
                "a stored value could not be decrypted: it was encrypted under a different master key"
            ) from None
        except CryptoError:
            raise DecryptionFailed("a stored value failed authentication: the ciphertext was altered") from None
        if decision == "mask":
            column = self.policy.column_for_key_id(key_id)
            text = plain.decode("utf-8", "replace")
            return mask_value(text, column.normalize if column is not None else "none").encode("utf-8")
        return plain

    def _check_nested(self, value: bytes, view: ReadView) -> None:
        """Stored values inside a larger value (``SELECT u FROM users u``, ``row_to_json``,
        arrays) stay as they are stored, so only a role that may read them in clear gets
        them: anyone else is refused, which :class:`ReadDenied` says."""
        masked: str | None = None
        for m in _STORED.finditer(value):
            try:
                key_id = parse_header(m.group(0))[0]
            except MalformedEnvelopeError:
                continue
            decision = view.decision(key_id)
            if decision == "deny":
                raise ReadDenied(key_id)
            if decision == "mask" and masked is None:
                masked = key_id
        if masked is not None:
            raise ReadDenied(masked, masked_inside=True)

    def reveal_row(
        self, values: tuple[bytes | None, ...], view: ReadView | None = None
    ) -> tuple[bytes | None, ...] | None:
        """A DataRow's values as :meth:`reveal` gives them, or None when nothing changed."""
        changed = False
        out: list[bytes | None] = []
        for v in values:
            if v is not None and ENVELOPE_PREFIX in v:
                nv = self.reveal(v, view)
                changed = changed or nv is not v
                out.append(nv)
            else:
                out.append(v)
        return tuple(out) if changed else None

    def reveal_copy_row(self, row: bytes, csv: bool, view: ReadView | None = None) -> bytes:
        """A COPY TO STDOUT row (text or CSV) with each stored value replaced as
        :meth:`reveal` decides, escaped for the format (envelopes never need escaping)."""

        def replace(m: re.Match[bytes]) -> bytes:
            plain = self.reveal(m.group(0), view)
            if not csv:
                return text_value(plain)
            start, end = m.span()
            if row[start - 1 : start] == b'"' and row[end : end + 1] == b'"':
                # already quoted by the server (FORCE_QUOTE): escape inside the quotes
                return plain.replace(b'"', b'""')
            return _csv_quote(plain)

        return _STORED.sub(replace, row)


# -- PostgreSQL array text format (one dimension, as `= ANY($1)` needs) ------------------


def parse_text_array(text: str) -> list[str | None]:
    """``{a,"b c",NULL}`` -> ["a", "b c", None]. Multi-dimensional arrays are refused."""
    s = text.strip()
    if s.startswith("[") and "=" in s:
        s = s[s.index("=") + 1 :].strip()
    if len(s) < 2 or s[0] != "{" or s[-1] != "}":
        raise ValueRefused("22P02", "malformed array literal")
    body = s[1:-1]
    items: list[str | None] = []
    if not body.strip():
        return items
    i, n = 0, len(body)
    while i <= n:
        while i < n and body[i].isspace():
            i += 1
        if i < n and body[i] == "{":
            raise ValueRefused("0A000", "only one-dimensional arrays are supported for protected columns")
        if i < n and body[i] == '"':
            i += 1
            buf: list[str] = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            if i >= n:
                raise ValueRefused("22P02", "malformed array literal")
            i += 1
            items.append("".join(buf))
            while i < n and body[i].isspace():
                i += 1
        else:
            start = i
            buf = []
            while i < n and body[i] != ",":
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            raw = body[start:i].strip()
            items.append(None if raw.upper() == "NULL" else "".join(buf).strip())
        if i < n and body[i] != ",":
            raise ValueRefused("22P02", "malformed array literal")
        i += 1
    return items


def render_text_array(items: list[str | None]) -> str:
    parts = ["NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in items]
    return "{" + ",".join(parts) + "}"


# -- COPY formats ----------------------------------------------------------------------------

def _csv_quote(value: bytes) -> bytes:
    return b'"' + value.replace(b'"', b'""') + b'"'


class CopyInRewriter:
    """Transforms the protected fields of a COPY FROM STDIN stream, record by record.

    Records and fields are found by PostgreSQL's rules (:mod:`pgcloak.wire.copy_data`),
    then written again in one canonical form, so that PostgreSQL stores each field where
    pgcloak decided: CopyData messages split records anywhere, and a record is rewritten
    once it is whole. With ``header``, the first record is PostgreSQL's to skip (or
    match against the column names): passed on as it came.
    """

    def __init__(
        self,
        actions: tuple[ValueAction, ...],
        fmt: str,
        transform: Callable[[ValueAction, str | None], str | None],
        header: bool = False,
    ) -> None:
        self.actions = actions
        self.csv = fmt == "csv"
        self._transform = transform
        self._reader = CopyReader(self.csv)
        self._header = header

    def feed(self, data: bytes) -> bytes:
        return self._lines(self._reader.feed(data))

    def finish(self) -> bytes:
        return self._lines(self._reader.finish())

    def _lines(self, records: list[list[Field]]) -> bytes:
        if not records:
            return b""
        out: list[bytes] = []
        csv = self.csv
        actions = self.actions
        escape = csv_value if csv else text_value
        for fields in records:
            line = [f.raw for f in fields]
            if self._header:
                self._header = False
            else:
                for i, action in enumerate(actions):
                    if action.kind != "pass" and i < len(fields):
                        value = fields[i].value
                        new = self._transform(action, None if value is None else value.decode("utf-8"))
                        line[i] = escape(None if new is None else new.encode("utf-8"))
            out.append(record_line(line, csv))
        return b"".join(out)
