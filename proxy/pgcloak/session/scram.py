"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) for proxy-side authentication.

pgcloak authenticates clients itself, the way PgBouncer does: it holds the role's
SCRAM verifier (the ``pg_authid.rolpassword`` text), runs the *server* side of the
exchange with the client (:class:`ScramServer`), recovers the client's ClientKey
from its proof, and then logs in to PostgreSQL as a SCRAM *client*
(:class:`ScramClient`) with that ClientKey instead of a password. PostgreSQL holds
the same verifier (same salt and iteration count), so the proof we compute is the
one it expects; ServerKey lets us check PostgreSQL's ServerSignature. No plaintext
password is stored or needed anywhere.

Formulas (RFC 5802 section 3)::

    SaltedPassword  := Hi(Normalize(password), salt, i)      # PBKDF2-HMAC-SHA-256
    ClientKey       := HMAC(SaltedPassword, "Client Key")
    StoredKey       := H(ClientKey)
    AuthMessage     := client-first-message-bare + "," +
                       server-first-message + "," +
                       client-final-message-without-proof
    ClientSignature := HMAC(StoredKey, AuthMessage)
    ClientProof     := ClientKey XOR ClientSignature
    ServerKey       := HMAC(SaltedPassword, "Server Key")
    ServerSignature := HMAC(ServerKey, AuthMessage)

so a server that knows StoredKey recovers ``ClientKey = ClientProof XOR ClientSignature``
and checks ``H(ClientKey) == StoredKey``.

Behaviour follows PostgreSQL's ``auth-scram.c`` / libpq's ``fe-auth-scram.c``:

* the username in client-first-message is ignored (the role comes from the startup
  packet); an authorization identity (``a=``) and mandatory extensions (``m=``) are
  refused;
* channel binding type ``tls-server-end-point`` only (RFC 5929);
* a client that sends the ``y`` flag to a server that offered SCRAM-SHA-256-PLUS is
  refused (downgrade protection);
* passwords are prepared with SASLprep (RFC 4013); if that fails (prohibited
  characters, bidi rule, empty result) the raw password is used, as PostgreSQL does.

This module is pure: no IO, no asyncio, no imports from the rest of pgcloak.
Errors are :class:`ScramError` with a SQLSTATE and a message that is safe to show a
client (it never contains a key, proof, nonce or password).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

__all__ = [
    "MECHANISM",
    "MECHANISM_PLUS",
    "SQLSTATE_FEATURE_NOT_SUPPORTED",
    "SQLSTATE_INTERNAL_ERROR",
    "SQLSTATE_INVALID_AUTHORIZATION",
    "SQLSTATE_INVALID_PASSWORD",
    "SQLSTATE_PROTOCOL_VIOLATION",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "ScramVerifier",
    "saslprep",
    "tls_server_end_point",
]

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE: Final = "tls-server-end-point"

SQLSTATE_INVALID_PASSWORD: Final = "28P01"  # invalid_password
SQLSTATE_PROTOCOL_VIOLATION: Final = "08P01"  # protocol_violation
SQLSTATE_INVALID_AUTHORIZATION: Final = "28000"  # invalid_authorization_specification
SQLSTATE_FEATURE_NOT_SUPPORTED: Final = "0A000"  # feature_not_supported
SQLSTATE_INTERNAL_ERROR: Final = "XX000"  # internal_error (bad stored verifier)

KEY_LEN: Final = 32  # SHA-256 output
DEFAULT_ITERATIONS: Final = 4096  # PostgreSQL's scram_iterations default
DEFAULT_SALT_LEN: Final = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
RAW_NONCE_LEN: Final = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN (server and libpq)
_MAX_ITERATIONS: Final = 2**31 - 1  # PostgreSQL stores the count in an int
_VERIFIER_PREFIX: Final = "SCRAM-SHA-256$"


class ScramError(Exception):
    """A failed or malformed SCRAM exchange.

    ``sqlstate`` uses the codes PostgreSQL's ``auth-scram.c`` reports:

    * ``28P01`` invalid_password: the proof does not verify (wrong password, or a
      doomed/mock exchange); the server sent ``e=...``;
    * ``08P01`` protocol_violation: malformed or out-of-order messages, wrong
      mechanism, nonce mismatch, inconsistent channel-binding flags;
    * ``28000`` invalid_authorization_specification: channel-binding data mismatch,
      the ``y`` flag sent to a server that offered -PLUS (downgrade), and on the
      client side a server signature that does not verify;
    * ``0A000`` feature_not_supported: authzid (``a=``) or a mandatory extension;
    * ``XX000`` internal_error: an unusable stored verifier.

    ``message`` (= ``str(exc)``) and ``detail`` are safe to send to a client: they
    never contain a key, proof, nonce or password.
    """

    def __init__(
        self, message: str, sqlstate: str = SQLSTATE_PROTOCOL_VIOLATION, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail


def _malformed(detail: str) -> ScramError:
    return ScramError("malformed SCRAM message", SQLSTATE_PROTOCOL_VIOLATION, detail)


# --------------------------------------------------------------------------- primitives


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _b64decode(data: bytes | str) -> bytes:
    """Strict standard base64 (alphabet and padding checked)."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid base64") from exc


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)


def _new_nonce() -> str:
    return base64.b64encode(secrets.token_bytes(RAW_NONCE_LEN)).decode("ascii")


def _is_printable_nonce(nonce: bytes) -> bool:
    # RFC 5802: printable = %x21-2B / %x2D-7E  (printable ASCII except ",")
    return bool(nonce) and all(0x21 <= c <= 0x7E and c != 0x2C for c in nonce)


def _check_nonce_override(nonce: str | None) -> str | None:
    if nonce is not None and not _is_printable_nonce(nonce.encode("utf-8")):
        raise ValueError("nonce must be non-empty printable ASCII without ','")
    return nonce


# --------------------------------------------------------------------------- SASLprep


def saslprep(password: str) -> str | None:
    """SASLprep (RFC 4013) as PostgreSQL's ``pg_saslprep`` applies it.

    Returns the prepared string, or ``None`` when SASLprep rejects the input (the
    caller then uses the raw password, like PostgreSQL). Mirrors PostgreSQL's
    choices: pure-ASCII input is returned unchanged (even control characters);
    the mapping step (RFC 4013 2.1: non-ASCII spaces -> U+0020, "commonly mapped to
    nothing" removed) runs first; an empty mapped result is rejected; then NFKC;
    the prohibited (RFC 4013 2.3, incl. unassigned code points of Unicode 3.2) and
    bidi (RFC 3454 section 6) checks run on the mapped string, as in PostgreSQL.
    Tables come from the stdlib ``stringprep`` module (RFC 3454 / Unicode 3.2);
    NFKC uses the interpreter's Unicode version, which can differ slightly from the
    PostgreSQL build's for characters assigned after 3.2 (those are rejected as
    unassigned anyway).
    """
    if password.isascii():
        return password
    mapped: list[str] = []
    for ch in password:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")
        elif stringprep.in_table_b1(ch):
            continue
        else:
            mapped.append(ch)
    if not mapped:
        return None
    normalized = unicodedata.normalize("NFKC", "".join(mapped))
    for ch in mapped:
        if (
            stringprep.in_table_c12(ch)
            or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch)
            or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch)
            or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch)
            or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch)
            or stringprep.in_table_a1(ch)
        ):
            return None
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return None
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return None
    return normalized


def _password_bytes(password: str) -> bytes:
    raw = password.encode("utf-8")
    if b"\x00" in raw:
        raise ValueError("password must not contain NUL characters")
    prepared = saslprep(password)
    return raw if prepared is None else prepared.encode("utf-8")


# --------------------------------------------------------------------------- verifier


@dataclass(frozen=True)
class ScramVerifier:
    """A SCRAM-SHA-256 verifier, as stored in ``pg_authid.rolpassword``.

    The keys are left out of ``repr()`` so a verifier never lands in a log by accident.
    """

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.iterations, bool)
            or not isinstance(self.iterations, int)
            or not 1 <= self.iterations <= _MAX_ITERATIONS
        ):
            raise ScramError(
                "invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad iteration count"
            )
        if not isinstance(self.salt, bytes) or not self.salt:
            raise ScramError("invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad salt")
        for key in (self.stored_key, self.server_key):
            if not isinstance(key, bytes) or len(key) != KEY_LEN:
                raise ScramError(
                    "invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad key length"
                )

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``.

        Raises :class:`ScramError` (sqlstate ``XX000``: a bad stored secret is a
        server-side problem) on any format error; the message never echoes the text.
        """
        if not isinstance(text, str) or not text.startswith(_VERIFIER_PREFIX):
            raise ScramError("invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "not SCRAM-SHA-256")
        parts = text[len(_VERIFIER_PREFIX) :].split("$")
        if len(parts) != 2:
            raise ScramError("invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad format")
        iter_salt = parts[0].split(":")
        keys = parts[1].split(":")
        if len(iter_salt) != 2 or len(keys) != 2:
            raise ScramError("invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad format")
        iter_text = iter_salt[0]
        if not (iter_text.isascii() and iter_text.isdigit()) or len(iter_text) > 10:
            raise ScramError(
                "invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad iteration count"
            )
        try:
            salt = _b64decode(iter_salt[1])
            stored_key = _b64decode(keys[0])
            server_key = _b64decode(keys[1])
        except ValueError:
            raise ScramError(
                "invalid SCRAM verifier", SQLSTATE_INTERNAL_ERROR, "bad base64"
            ) from None
        return cls(int(iter_text), salt, stored_key, server_key)

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """Build the verifier PostgreSQL would store for ``password``.

        ``salt`` defaults to 16 random bytes, like PostgreSQL. The password goes
        through :func:`saslprep` (raw password if SASLprep rejects it).
        Raises ``ValueError`` for a password containing NUL (impossible in PostgreSQL).
        """
        if salt is None:
            salt = secrets.token_bytes(DEFAULT_SALT_LEN)
        if not salt:
            raise ValueError("salt must not be empty")
        if not 1 <= iterations <= _MAX_ITERATIONS:
            raise ValueError("iterations out of range")
        salted = _salted_password(password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, _h(client_key), _hmac(salted, b"Server Key"))

    @classmethod
    def mock(
        cls, username: str, secret: bytes, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """A stable fake verifier for a role that does not exist (or has no SCRAM secret).

        Like PostgreSQL's mock authentication: the exchange runs normally with a
        salt derived from ``secret`` and the user name (so repeated attempts see the
        same salt) and then fails with 28P01, so a client cannot tell a missing role
        from a wrong password. Use with ``ScramServer(..., doomed=True)``.
        """
        seed = _hmac(secret, b"pgcloak scram mock\x00" + username.encode("utf-8"))
        salt = _hmac(seed, b"salt")[:DEFAULT_SALT_LEN]
        return cls(iterations, salt, _hmac(seed, b"stored"), _hmac(seed, b"server"))

    def to_text(self) -> str:
        """The ``pg_authid.rolpassword`` form."""
        return (
            f"{_VERIFIER_PREFIX}{self.iterations}:{_b64(self.salt).decode('ascii')}"
            f"${_b64(self.stored_key).decode('ascii')}:{_b64(self.server_key).decode('ascii')}"
        )


# --------------------------------------------------------------------------- channel binding


def tls_server_end_point(cert_der: bytes) -> bytes:
    """Channel-binding data of type ``tls-server-end-point`` (RFC 5929 section 4.1).

    The hash of the DER certificate with the hash function of the certificate's
    signature algorithm, where MD5 and SHA-1 are replaced by SHA-256. Raises
    ``ValueError`` when the signature algorithm has no single hash function (e.g.
    Ed25519/Ed448): channel binding is then not possible, as in PostgreSQL, and
    SCRAM-SHA-256-PLUS must not be offered.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError("cannot determine the certificate's signature hash algorithm") from exc
    if algorithm is None:
        raise ValueError("certificate signature algorithm has no hash function")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


# --------------------------------------------------------------------------- message parsing


def _message(data: object) -> bytes:
    """``data`` as bytes, after the checks PostgreSQL makes on every SCRAM message."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed("The SCRAM message is not a byte string.")
    out = bytes(data)
    if not out:
        raise _malformed("The message is empty.")
    if b"\x00" in out:
        raise _malformed("The message contains a NUL byte.")
    return out


def _attr(part: bytes, name: bytes, what: str) -> bytes:
    """Value of ``<name>=<value>``; raises if ``part`` is a different attribute."""
    if len(part) < 2 or part[:1] != name or part[1:2] != b"=":
        raise _malformed(f'Expected attribute "{name.decode()}" in {what}.')
    return part[2:]


def _is_attr(part: bytes) -> bool:
    return len(part) >= 2 and part[1:2] == b"=" and part[:1].isalpha()


def _saslname(username: str) -> bytes:
    return username.encode("utf-8").replace(b"=", b"=3D").replace(b",", b"=2C")


# --------------------------------------------------------------------------- server


class ScramServer:
    """Server side of SCRAM-SHA-256[-PLUS], for the client leg.

    ``channel_binding`` is the tls-server-end-point data of *our* certificate when
    the client leg is TLS, else ``None``. Usage::

        srv = ScramServer(verifier, cb)
        -> AuthenticationSASL(srv.mechanisms())
        <- SASLInitialResponse(mech, data);  -> SASLContinue(srv.handle_client_first(mech, data))
        <- SASLResponse(data);               -> SASLFinal(srv.handle_client_final(data))
        srv.client_key  # for ScramClient(client_key=..., server_key=verifier.server_key)

    Every method raises :class:`ScramError`; after one, the exchange is dead.
    ``nonce`` replaces the random server nonce (tests only). ``doomed=True`` runs
    the exchange and fails the proof unconditionally (mock authentication).
    """

    def __init__(
        self,
        verifier: ScramVerifier,
        channel_binding: bytes | None,
        *,
        nonce: str | None = None,
        doomed: bool = False,
    ) -> None:
        if channel_binding is not None and not channel_binding:
            raise ValueError("channel_binding must be None or non-empty")
        self._verifier = verifier
        self._cb = None if channel_binding is None else bytes(channel_binding)
        self._nonce_override = _check_nonce_override(nonce)
        self._doomed = doomed
        self._state = "init"
        self._plus = False
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""
        self._client_key: bytes | None = None

    def mechanisms(self) -> list[str]:
        """Mechanisms for AuthenticationSASL, preferred first."""
        if self._cb is not None:
            return [MECHANISM_PLUS, MECHANISM]
        return [MECHANISM]

    @property
    def authenticated(self) -> bool:
        return self._state == "done"

    @property
    def client_key(self) -> bytes:
        """The client's ClientKey, recovered from its proof (after success only)."""
        if self._client_key is None:
            raise RuntimeError("SCRAM exchange has not completed successfully")
        return self._client_key

    def _fail(self, exc: ScramError) -> ScramError:
        self._state = "failed"
        return exc

    def handle_client_first(self, mechanism: str, data: bytes) -> bytes:
        """Process SASLInitialResponse; return the server-first-message."""
        if self._state != "init":
            raise self._fail(ScramError("unexpected SCRAM client-first-message"))
        try:
            out = self._client_first(mechanism, _message(data))
        except ScramError as exc:
            raise self._fail(exc) from None
        self._state = "first"
        return out

    def _client_first(self, mechanism: str, data: bytes) -> bytes:
        if mechanism not in self.mechanisms():
            raise ScramError("client selected an invalid SASL authentication mechanism")
        self._plus = mechanism == MECHANISM_PLUS
        parts = data.split(b",")
        if len(parts) < 4:
            raise _malformed("Incomplete client-first-message.")
        flag, authzid = parts[0], parts[1]
        if flag == b"n" or flag == b"y":
            if self._plus:
                raise _malformed(
                    "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message "
                    "does not include channel binding data."
                )
            if flag == b"y" and self._cb is not None:
                raise ScramError(
                    "SCRAM channel binding negotiation error",
                    SQLSTATE_INVALID_AUTHORIZATION,
                    "The client supports SCRAM channel binding but thinks the server does "
                    "not. However, this server does support channel binding.",
                )
        elif flag.startswith(b"p="):
            if not self._plus:
                raise _malformed(
                    "The client selected SCRAM-SHA-256 without channel binding, but the "
                    "SCRAM message includes channel binding data."
                )
            if flag[2:] != CHANNEL_BINDING_TYPE.encode("ascii"):
                raise ScramError("unsupported SCRAM channel-binding type")
        else:
            raise _malformed("Unexpected channel-binding flag.")
        if authzid:
            if authzid.startswith(b"a="):
                raise ScramError(
                    "client uses authorization identity, but it is not supported",
                    SQLSTATE_FEATURE_NOT_SUPPORTED,
                )
            raise _malformed("Unexpected attribute in client-first-message.")
        bare = parts[2:]
        if bare[0].startswith(b"m="):
            raise ScramError(
                "client requires an unsupported SCRAM extension", SQLSTATE_FEATURE_NOT_SUPPORTED
            )
        _attr(bare[0], b"n", "client-first-message")  # user name: ignored, like PostgreSQL
        client_nonce = _attr(bare[1], b"r", "client-first-message")
        if not _is_printable_nonce(client_nonce):
            raise _malformed("non-printable characters in SCRAM nonce")
        for ext in bare[2:]:  # optional extensions: none supported, ignored
            if not _is_attr(ext):
                raise _malformed("Malformed extension in client-first-message.")

        server_nonce = self._nonce_override or _new_nonce()
        self._gs2_header = flag + b"," + authzid + b","
        self._client_first_bare = b",".join(bare)
        self._nonce = client_nonce + server_nonce.encode("ascii")
        self._server_first = (
            b"r="
            + self._nonce
            + b",s="
            + _b64(self._verifier.salt)
            + b",i="
            + str(self._verifier.iterations).encode("ascii")
        )
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """Process the SASLResponse; return the server-final-message (``v=...``)."""
        if self._state != "first":
            raise self._fail(ScramError("unexpected SCRAM client-final-message"))
        try:
            out = self._client_final(_message(data))
        except ScramError as exc:
            raise self._fail(exc) from None
        self._state = "done"
        return out

    def _client_final(self, data: bytes) -> bytes:
        parts = data.split(b",")
        if len(parts) < 3:
            raise _malformed("Incomplete client-final-message.")
        try:
            cbind_input = _b64decode(_attr(parts[0], b"c", "client-final-message"))
        except ValueError:
            raise _malformed("Malformed channel-binding data.") from None
        expected = self._gs2_header + ((self._cb or b"") if self._plus else b"")
        if not hmac.compare_digest(cbind_input, expected):
            if self._plus:
                raise ScramError(
                    "SCRAM channel binding check failed", SQLSTATE_INVALID_AUTHORIZATION
                )
            raise ScramError("unexpected SCRAM channel-binding attribute in client-final-message")
        nonce = _attr(parts[1], b"r", "client-final-message")
        for ext in parts[2:-1]:
            if not _is_attr(ext) or ext.startswith(b"p="):
                raise _malformed("Malformed extension in client-final-message.")
        try:
            proof = _b64decode(_attr(parts[-1], b"p", "client-final-message"))
        except ValueError:
            raise _malformed("Malformed proof in client-final-message.") from None
        if len(proof) != KEY_LEN:
            raise _malformed("Malformed proof in client-final-message.")
        if not hmac.compare_digest(nonce, self._nonce):
            raise ScramError(
                "invalid SCRAM response", SQLSTATE_PROTOCOL_VIOLATION, "Nonce does not match."
            )

        without_proof = b",".join(parts[:-1])
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        client_signature = _hmac(self._verifier.stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        ok = hmac.compare_digest(_h(client_key), self._verifier.stored_key)
        if not ok or self._doomed:
            raise ScramError("password authentication failed", SQLSTATE_INVALID_PASSWORD)
        self._client_key = client_key
        return b"v=" + _b64(_hmac(self._verifier.server_key, auth_message))


# --------------------------------------------------------------------------- client


class ScramClient:
    """Client side of SCRAM-SHA-256[-PLUS], for the backend leg.

    Give either ``password`` (SaltedPassword is derived from the salt and iteration
    count the server sends) or ``client_key`` together with ``server_key`` (from the
    proxy's verifier; the server's salt and count then only enter the AuthMessage,
    and ``server_key`` verifies the server's signature -- it is required, so a
    backend impersonator cannot complete the login).

    ``channel_binding`` is the tls-server-end-point data of the *backend's*
    certificate. gs2 flag: ``p=tls-server-end-point`` with ``use_plus`` (the server
    offered SCRAM-SHA-256-PLUS), ``y`` with channel binding data but no
    ``use_plus``, ``n`` without channel binding data.

    ``username`` goes into ``n=`` (empty by default, like libpq: PostgreSQL takes
    the role from the startup packet); ``nonce`` replaces the random client nonce
    (tests only).
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        channel_binding: bytes | None = None,
        use_plus: bool = False,
        username: str = "",
        nonce: str | None = None,
    ) -> None:
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password or client_key")
        if client_key is not None:
            if len(client_key) != KEY_LEN:
                raise ValueError("client_key must be 32 bytes")
            if server_key is None:
                raise ValueError("client_key requires server_key to verify the server")
        if server_key is not None and len(server_key) != KEY_LEN:
            raise ValueError("server_key must be 32 bytes")
        if channel_binding is not None and not channel_binding:
            raise ValueError("channel_binding must be None or non-empty")
        if use_plus and channel_binding is None:
            raise ValueError("use_plus requires channel_binding data")
        if password is not None:
            _password_bytes(password)  # fail early on NUL
        self._password = password
        self._client_key = None if client_key is None else bytes(client_key)
        self._server_key = None if server_key is None else bytes(server_key)
        self._cb = None if channel_binding is None else bytes(channel_binding)
        self._plus = use_plus
        self._username = username
        self._client_nonce = (_check_nonce_override(nonce) or _new_nonce()).encode("ascii")
        self._state = "init"
        self._client_first_bare = b""
        self._expected_server_signature = b""

    @property
    def mechanism(self) -> str:
        return MECHANISM_PLUS if self._plus else MECHANISM

    @property
    def _gs2_header(self) -> bytes:
        if self._plus:
            return b"p=" + CHANNEL_BINDING_TYPE.encode("ascii") + b",,"
        if self._cb is not None:
            return b"y,,"
        return b"n,,"

    def client_first(self) -> tuple[str, bytes]:
        """Mechanism name and client-first-message for SASLInitialResponse."""
        if self._state != "init":
            raise RuntimeError("client_first() already called")
        self._client_first_bare = b"n=" + _saslname(self._username) + b",r=" + self._client_nonce
        self._state = "first"
        return self.mechanism, self._gs2_header + self._client_first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """Process AuthenticationSASLContinue; return the client-final-message."""
        if self._state != "first":
            raise ScramError("unexpected SCRAM server-first-message")
        self._state = "failed"
        server_first = _message(data)
        parts = server_first.split(b",")
        if parts[0].startswith(b"m="):
            raise ScramError("server requires an unsupported SCRAM extension")
        if len(parts) < 3:
            raise _malformed("Incomplete server-first-message.")
        nonce = _attr(parts[0], b"r", "server-first-message")
        if (
            not _is_printable_nonce(nonce)
            or len(nonce) <= len(self._client_nonce)
            or not hmac.compare_digest(nonce[: len(self._client_nonce)], self._client_nonce)
        ):
            raise ScramError("invalid SCRAM nonce from server")
        try:
            salt = _b64decode(_attr(parts[1], b"s", "server-first-message"))
        except ValueError:
            raise _malformed("Malformed salt in server-first-message.") from None
        iter_text = _attr(parts[2], b"i", "server-first-message")
        if not salt:
            raise _malformed("Empty salt in server-first-message.")
        if not iter_text.isdigit() or len(iter_text) > 10:
            raise _malformed("Malformed iteration count in server-first-message.")
        iterations = int(iter_text)
        if not 1 <= iterations <= _MAX_ITERATIONS:
            raise _malformed("Invalid iteration count in server-first-message.")
        for ext in parts[3:]:
            if not _is_attr(ext):
                raise _malformed("Malformed extension in server-first-message.")

        if self._client_key is not None:
            client_key = self._client_key
            server_key = self._server_key
        else:
            assert self._password is not None
            salted = _salted_password(self._password, salt, iterations)
            client_key = _hmac(salted, b"Client Key")
            server_key = _hmac(salted, b"Server Key")
        assert server_key is not None

        cbind_input = self._gs2_header + ((self._cb or b"") if self._plus else b"")
        without_proof = b"c=" + _b64(cbind_input) + b",r=" + nonce
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._expected_server_signature = _hmac(server_key, auth_message)
        self._state = "final"
        return without_proof + b",p=" + _b64(proof)

    def handle_server_final(self, data: bytes) -> None:
        """Process AuthenticationSASLFinal; raise :class:`ScramError` unless it verifies."""
        if self._state != "final":
            raise ScramError("unexpected SCRAM server-final-message")
        self._state = "failed"
        server_final = _message(data)
        parts = server_final.split(b",")
        if parts[0].startswith(b"e="):
            reason = parts[0][2:].decode("ascii", "replace")
            safe = "".join(c for c in reason[:64] if c.isalnum() or c in "-_ ")
            raise ScramError(
                "SCRAM authentication failed", SQLSTATE_INVALID_PASSWORD, f"server error: {safe}"
            )
        try:
            signature = _b64decode(_attr(parts[0], b"v", "server-final-message"))
        except ValueError:
            raise _malformed("Malformed server signature.") from None
        for ext in parts[1:]:
            if not _is_attr(ext):
                raise _malformed("Malformed extension in server-final-message.")
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise ScramError("incorrect server signature", SQLSTATE_INVALID_AUTHORIZATION)
        self._state = "done"

    @property
    def authenticated(self) -> bool:
        """True once the server's signature has verified."""
        return self._state == "done"
