"""Unit tests for pgcloak.session.scram (RFC 5802 / RFC 7677 / RFC 5929)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.session.scram import (
    ScramClient,
    ScramError,
    ScramServer,
    ScramVerifier,
    saslprep,
    tls_server_end_point,
)

# RFC 7677 section 3 test vector (user "user", password "pencil").
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Verifiers stored by a real PostgreSQL 15.18 server (password_encryption = scram-sha-256)
# for CREATE ROLE ... PASSWORD <password>, read back from pg_authid.rolpassword.
PG_VERIFIERS = [
    (  # ASCII
        "secret",
        "SCRAM-SHA-256$4096:/QBDko6yh4FeMeBsTrJkJA==$b0Qd9LRTRLp/pbtBKc7oEVo0Zju5I6i3yeQ5"
        "Gtrd42M=:rC98HGfpyvthYMU6CPNvpqtDf0yuUbizx+rzksBh5MY=",
    ),
    (  # U&'I\00ADX': SASLprep maps the soft hyphen to nothing
        "I\u00adX",
        "SCRAM-SHA-256$4096:aGVYJxZBTkgYvS4eTwChig==$PHSNSP4tfuoJv2jKMwEuzcc9EVM6uSAjd/pc"
        "Azgb0xY=:Gq2NFvReIV6OzC1FvjTk0c6MXFB0gYguG6L42AFFONM=",
    ),
    (  # U&'\0627\0031': fails the bidi rule, so PostgreSQL hashes the raw bytes
        "\u0627\u0031",
        "SCRAM-SHA-256$4096:NMCoI/0l/1oBhd52dkHpGw==$fuZ5fYE1bI2yQXFEsqPhIMCPFEPW4lc0H7bV"
        "dFFwh+I=:kgWASXXhm9QVdY0PnRtdKSGIb5CO63XqDkWNqA4wgjg=",
    ),
    (  # 1103 bytes: PostgreSQL 15 applies SASLprep to long passwords too
        "I\u00adX" + "a" * 1100,
        "SCRAM-SHA-256$4096:K+iHNaopD3sdSKnseFc8gQ==$/pGJ+roteQlLwAPVtYNOaoIiYzY/xne0bDtE"
        "WarlJ20=:vMpCu4ae41wh6sWKAbwm65a8Rumgc3w1E3BC6yW8Yj8=",
    ),
]

CB = hashlib.sha256(b"pretend this is a DER certificate").digest()
FAST = 64  # iteration count for tests that do not need PostgreSQL's default


def independent_verifier(password: bytes, salt: bytes, iterations: int) -> str:
    """RFC 5802 formulas, written out separately from the module under test."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def exchange(server: ScramServer, client: ScramClient) -> None:
    mech, first = client.client_first()
    server_first = server.handle_client_first(mech, first)
    final = client.handle_server_first(server_first)
    client.handle_server_final(server.handle_client_final(final))


@pytest.fixture(scope="module")
def verifier() -> ScramVerifier:
    return ScramVerifier.from_password("correct horse", b"0123456789abcdef", FAST)


# --------------------------------------------------------------------------- RFC 7677


def test_rfc7677_client() -> None:
    client = ScramClient(password="pencil", username="user", nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == ("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL)
    assert client.authenticated


def test_rfc7677_server() -> None:
    verifier = ScramVerifier.from_password("pencil", RFC_SALT, 4096)
    server = ScramServer(verifier, None, nonce=RFC_SERVER_NONCE)
    assert server.mechanisms() == ["SCRAM-SHA-256"]
    assert server.handle_client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.authenticated
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.new(salted, b"Client Key", hashlib.sha256).digest()


def test_rfc7677_client_key_mode_reproduces_the_same_proof() -> None:
    verifier = ScramVerifier.from_password("pencil", RFC_SALT, 4096)
    server = ScramServer(verifier, None, nonce=RFC_SERVER_NONCE)
    server.handle_client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    server.handle_client_final(RFC_CLIENT_FINAL)
    client = ScramClient(
        client_key=server.client_key,
        server_key=verifier.server_key,
        username="user",
        nonce=RFC_CLIENT_NONCE,
    )
    assert client.client_first()[1] == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL)


# --------------------------------------------------------------------------- full exchanges


def test_password_exchange(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, None)
    client = ScramClient(password="correct horse")
    mech, first = client.client_first()
    assert mech == "SCRAM-SHA-256"
    assert first.startswith(b"n,,n=,r=")  # libpq style: empty user name
    assert len(first) == len(b"n,,n=,r=") + 24  # 18 random bytes, base64
    exchange_rest = server.handle_client_first(mech, first)
    client.handle_server_final(
        server.handle_client_final(client.handle_server_first(exchange_rest))
    )
    assert server.authenticated and client.authenticated
    assert hashlib.sha256(server.client_key).digest() == verifier.stored_key


def test_plus_exchange(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, CB)
    assert server.mechanisms() == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    client = ScramClient(password="correct horse", channel_binding=CB, use_plus=True)
    mech, first = client.client_first()
    assert mech == "SCRAM-SHA-256-PLUS"
    assert first.startswith(b"p=tls-server-end-point,,n=,r=")
    exchange(server, ScramClient(password="correct horse", channel_binding=CB, use_plus=True))
    assert server.authenticated


def test_plain_mechanism_accepted_on_tls_with_n_flag(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, CB)
    exchange(server, ScramClient(password="correct horse"))
    assert server.authenticated


def test_y_flag_accepted_when_server_offered_no_plus(verifier: ScramVerifier) -> None:
    client = ScramClient(password="correct horse", channel_binding=CB)
    assert client.client_first()[1].startswith(b"y,,")
    exchange(ScramServer(verifier, None), ScramClient(password="correct horse", channel_binding=CB))


def test_client_key_relay_logs_in_to_second_server(verifier: ScramVerifier) -> None:
    """The proxy flow: client leg recovers ClientKey, backend leg uses it."""
    front = ScramServer(verifier, CB)
    exchange(front, ScramClient(password="correct horse", channel_binding=CB, use_plus=True))
    backend_cb = hashlib.sha256(b"backend certificate").digest()
    backend = ScramServer(ScramVerifier.parse(verifier.to_text()), backend_cb)
    relay = ScramClient(
        client_key=front.client_key,
        server_key=verifier.server_key,
        channel_binding=backend_cb,
        use_plus=True,
    )
    exchange(backend, relay)
    assert backend.authenticated and relay.authenticated
    assert backend.client_key == front.client_key


def test_client_key_relay_fails_against_other_verifier(verifier: ScramVerifier) -> None:
    front = ScramServer(verifier, None)
    exchange(front, ScramClient(password="correct horse"))
    other = ScramVerifier.from_password("correct horse", b"another salt....", FAST)
    relay = ScramClient(client_key=front.client_key, server_key=verifier.server_key)
    with pytest.raises(ScramError) as err:
        exchange(ScramServer(other, None), relay)
    assert err.value.sqlstate == "28P01"


@settings(max_examples=25, deadline=None)
@given(password=st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s))
def test_any_password_round_trips(password: str) -> None:
    v = ScramVerifier.from_password(password, b"salt-salt-salt!!", 8)
    server = ScramServer(v, None)
    exchange(server, ScramClient(password=password))
    relay = ScramClient(client_key=server.client_key, server_key=v.server_key)
    exchange(ScramServer(v, CB), relay)


# --------------------------------------------------------------------------- failures


def test_wrong_password(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, None)
    client = ScramClient(password="wrong horse")
    mech, first = client.client_first()
    final = client.handle_server_first(server.handle_client_first(mech, first))
    with pytest.raises(ScramError) as err:
        server.handle_client_final(final)
    assert err.value.sqlstate == "28P01"
    text = f"{err.value} {err.value.detail}"
    proof = final.rsplit(b"p=", 1)[1].decode()
    assert proof not in text and "horse" not in text
    assert not server.authenticated
    with pytest.raises(RuntimeError):
        _ = server.client_key
    with pytest.raises(ScramError):  # the exchange is dead
        server.handle_client_final(final)


def _start(server: ScramServer, client: ScramClient) -> bytes:
    mech, first = client.client_first()
    return client.handle_server_first(server.handle_client_first(mech, first))


def test_tampered_proof(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, None)
    final = _start(server, ScramClient(password="correct horse"))
    head, proof = final.rsplit(b",p=", 1)
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(ScramError) as err:
        server.handle_client_final(head + b",p=" + base64.b64encode(bytes(raw)))
    assert err.value.sqlstate == "28P01"


def test_tampered_nonce(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, None)
    final = _start(server, ScramClient(password="correct horse"))
    c, r, p = final.split(b",")
    with pytest.raises(ScramError) as err:
        server.handle_client_final(b",".join([c, r[:-1] + b"A" if r[-1:] != b"A" else b"B", p]))
    assert err.value.sqlstate == "08P01"


def test_channel_binding_mismatch(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, CB)
    wrong = hashlib.sha256(b"a different certificate (MITM)").digest()
    final = _start(
        server, ScramClient(password="correct horse", channel_binding=wrong, use_plus=True)
    )
    with pytest.raises(ScramError) as err:
        server.handle_client_final(final)
    assert err.value.sqlstate == "28000"  # as PostgreSQL
    assert "channel binding" in str(err.value)


def test_channel_binding_data_stripped(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, CB)
    final = _start(server, ScramClient(password="correct horse", channel_binding=CB, use_plus=True))
    _, r, p = final.split(b",")
    c = b"c=" + base64.b64encode(b"p=tls-server-end-point,,")
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(b",".join([c, r, p]))


def test_plain_client_final_with_cbind_data_rejected(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, CB)
    final = _start(server, ScramClient(password="correct horse"))
    _, r, p = final.split(b",")
    c = b"c=" + base64.b64encode(b"n,," + CB)
    with pytest.raises(ScramError) as err:
        server.handle_client_final(b",".join([c, r, p]))
    assert err.value.sqlstate == "08P01"


def test_y_flag_downgrade_rejected(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, CB)
    client = ScramClient(password="correct horse", channel_binding=CB)  # "y": thinks no PLUS
    mech, first = client.client_first()
    assert first.startswith(b"y,,")
    with pytest.raises(ScramError) as err:
        server.handle_client_first(mech, first)
    assert err.value.sqlstate == "28000"  # as PostgreSQL
    assert "channel binding negotiation" in str(err.value)


@pytest.mark.parametrize(
    ("cb", "mechanism", "message", "match", "sqlstate"),
    [
        (CB, "SCRAM-SHA-256-PLUS", b"n,,n=,r=abc", "does not include channel binding", "08P01"),
        (CB, "SCRAM-SHA-256-PLUS", b"y,,n=,r=abc", "does not include channel binding", "08P01"),
        (
            CB,
            "SCRAM-SHA-256",
            b"p=tls-server-end-point,,n=,r=abc",
            "includes channel binding",
            "08P01",
        ),
        (None, "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc", "invalid SASL", "08P01"),
        (CB, "SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=,r=abc", "unsupported SCRAM channel", "08P01"),
        (None, "SCRAM-SHA-1", b"n,,n=,r=abc", "invalid SASL", "08P01"),
        (None, "SCRAM-SHA-256", b"n,a=admin,n=,r=abc", "authorization identity", "0A000"),
        (None, "SCRAM-SHA-256", b"n,,m=ext,n=,r=abc", "unsupported SCRAM extension", "0A000"),
        (None, "SCRAM-SHA-256", b"", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,n=,r=ab\x00c", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,n=", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,n=,r=", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,n=,r=ab\x7fc", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,n=,x=abc", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,r=abc,n=", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"x,,n=,r=abc", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,zz,n=,r=abc", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"n,,n=,r=abc,garbage", "malformed", "08P01"),
        (None, "SCRAM-SHA-256", b"\xff\xfe", "malformed", "08P01"),
    ],
)
def test_bad_client_first(
    verifier: ScramVerifier,
    cb: bytes | None,
    mechanism: str,
    message: bytes,
    match: str,
    sqlstate: str,
) -> None:
    server = ScramServer(verifier, cb)
    with pytest.raises(ScramError) as err:
        server.handle_client_first(mechanism, message)
    assert match in f"{err.value} {err.value.detail}"
    assert err.value.sqlstate == sqlstate
    assert not server.authenticated


def test_client_first_extensions_and_user_name_ignored(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, None)
    out = server.handle_client_first("SCRAM-SHA-256", b"n,,n=someone=2Celse,r=abc,x=ext")
    assert out.startswith(b"r=abc") and len(out.split(b",")[0]) == len(b"r=abc") + 24


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c, r, p: b"",
        lambda c, r, p: c + b"," + r,  # no proof
        lambda c, r, p: r + b"," + c + b"," + p,  # wrong order
        lambda c, r, p: b"c=b!ws," + r + b"," + p,  # bad base64
        lambda c, r, p: c + b"," + r + b",p=AAAA",  # short proof
        lambda c, r, p: c + b"," + r + b",p=not base64!",
        lambda c, r, p: c + b"," + r + b"," + p + b",x=trailing",
        lambda c, r, p: c + b"," + r + b",junk," + p,
        lambda c, r, p: c + b"," + r + b"," + p + b"\x00",
    ],
)
def test_malformed_client_final(verifier: ScramVerifier, mutate: object) -> None:
    server = ScramServer(verifier, None)
    c, r, p = _start(server, ScramClient(password="correct horse")).split(b",")
    assert callable(mutate)
    with pytest.raises(ScramError) as err:
        server.handle_client_final(mutate(c, r, p))
    assert err.value.sqlstate == "08P01"


def test_client_final_extension_before_proof_is_ignored(verifier: ScramVerifier) -> None:
    """Extensions sit inside client-final-message-without-proof, so they are signed."""
    server = ScramServer(verifier, None)
    client = ScramClient(password="correct horse")
    mech, first = client.client_first()
    server_first = server.handle_client_first(mech, first)
    c, r, _ = client.handle_server_first(server_first).split(b",")
    # re-sign with an extension: compute the proof by hand
    salted = hashlib.pbkdf2_hmac("sha256", b"correct horse", b"0123456789abcdef", FAST)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = c + b"," + r + b",x=ext"
    auth = first[3:] + b"," + server_first + b"," + without_proof
    sig = hmac.new(hashlib.sha256(client_key).digest(), auth, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    server.handle_client_final(without_proof + b",p=" + base64.b64encode(proof))
    assert server.authenticated


def test_out_of_order_server(verifier: ScramVerifier) -> None:
    with pytest.raises(ScramError):
        ScramServer(verifier, None).handle_client_final(b"c=biws,r=abc,p=AAAA")
    server = ScramServer(verifier, None)
    server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_doomed_mock_authentication() -> None:
    mock = ScramVerifier.mock("nobody", b"server secret")
    assert mock == ScramVerifier.mock("nobody", b"server secret")  # stable salt
    assert mock.salt != ScramVerifier.mock("somebody", b"server secret").salt
    real = ScramVerifier.from_password("pw", mock.salt, mock.iterations)
    server = ScramServer(real, None, doomed=True)  # even the right password fails
    with pytest.raises(ScramError) as err:
        exchange(server, ScramClient(password="pw"))
    assert err.value.sqlstate == "28P01"


# --------------------------------------------------------------------------- client side


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"r={n}",
        b"r=someoneelse,s=c2FsdA==,i=4096",  # does not extend our nonce
        b"r={n},s=c2FsdA==,i=4096",  # nonce not extended at all
        b"r={n}xyz,s=c2FsdA==,i=0",
        b"r={n}xyz,s=c2FsdA==,i=-1",
        b"r={n}xyz,s=c2FsdA==,i=4k",
        b"r={n}xyz,s=c2FsdA==,i=99999999999",
        b"r={n}xyz,s=!!!,i=4096",
        b"r={n}xyz,s=,i=4096",
        b"s=c2FsdA==,r={n}xyz,i=4096",
        b"m=ext,r={n}xyz,s=c2FsdA==,i=4096",
        b"r={n}xyz,s=c2FsdA==,i=4096,junk",
        b"r={n}x\x00z,s=c2FsdA==,i=4096",
    ],
)
def test_client_rejects_bad_server_first(server_first: bytes) -> None:
    client = ScramClient(password="pw", nonce="clientnonce")
    client.client_first()
    with pytest.raises(ScramError) as err:
        client.handle_server_first(server_first.replace(b"{n}", b"clientnonce"))
    assert err.value.sqlstate == "08P01"


def test_client_rejects_bad_server_signature(verifier: ScramVerifier) -> None:
    server = ScramServer(verifier, None)
    front_client = ScramClient(password="correct horse")
    exchange(server, front_client)
    # A backend impersonator that learned StoredKey (not ServerKey) cannot finish:
    forged = ScramVerifier(verifier.iterations, verifier.salt, verifier.stored_key, b"\x01" * 32)
    relay = ScramClient(client_key=server.client_key, server_key=verifier.server_key)
    with pytest.raises(ScramError) as err:
        exchange(ScramServer(forged, None), relay)
    assert err.value.sqlstate == "28000"
    assert not relay.authenticated


@pytest.mark.parametrize(
    ("server_final", "sqlstate"),
    [
        (b"e=invalid-proof", "28P01"),
        (b"v=AAAA", "28000"),
        (b"v=***", "08P01"),
        (b"x=1", "08P01"),
        (b"", "08P01"),
    ],
)
def test_client_rejects_bad_server_final(server_final: bytes, sqlstate: str) -> None:
    client = ScramClient(password="pencil", username="user", nonce=RFC_CLIENT_NONCE)
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError) as err:
        client.handle_server_final(server_final)
    assert err.value.sqlstate == sqlstate


def test_client_out_of_order() -> None:
    client = ScramClient(password="pencil")
    with pytest.raises(ScramError):
        client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError):
        client.handle_server_final(RFC_SERVER_FINAL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"password": "x", "client_key": b"k" * 32, "server_key": b"s" * 32},
        {"client_key": b"k" * 32},  # no server_key: cannot verify the backend
        {"client_key": b"k" * 31, "server_key": b"s" * 32},
        {"password": "x", "use_plus": True},
        {"password": "x", "nonce": "a,b"},
        {"password": "x\x00y"},
    ],
)
def test_client_constructor_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ScramClient(**kwargs)  # type: ignore[arg-type]


def test_gs2_flags() -> None:
    assert ScramClient(password="x").client_first()[1][:3] == b"n,,"
    assert ScramClient(password="x", channel_binding=CB).client_first()[1][:3] == b"y,,"
    mech, first = ScramClient(password="x", channel_binding=CB, use_plus=True).client_first()
    assert (mech, first[:24]) == ("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,")
    assert (
        ScramClient(password="x", username="a,b=c").client_first()[1].startswith(b"n,,n=a=2Cb=3Dc,")
    )


def test_nonces_are_random() -> None:
    a = ScramClient(password="x").client_first()[1]
    b = ScramClient(password="x").client_first()[1]
    assert a != b


# --------------------------------------------------------------------------- verifier


def test_verifier_matches_independent_computation() -> None:
    salt = bytes(range(16))
    expected = independent_verifier(b"secret", salt, 4096)
    assert ScramVerifier.from_password("secret", salt, 4096).to_text() == expected
    assert ScramVerifier.from_password("secret", salt).to_text() == expected  # 4096 default


@pytest.mark.parametrize(("password", "stored"), PG_VERIFIERS)
def test_verifier_matches_postgresql(password: str, stored: str) -> None:
    pg = ScramVerifier.parse(stored)
    assert pg.iterations == 4096 and len(pg.salt) == 16
    assert pg.to_text() == stored
    assert ScramVerifier.from_password(password, pg.salt, pg.iterations) == pg
    assert (
        independent_verifier((saslprep(password) or password).encode(), pg.salt, pg.iterations)
        == stored
    )


def test_verifier_random_salt() -> None:
    a = ScramVerifier.from_password("secret", iterations=FAST)
    b = ScramVerifier.from_password("secret", iterations=FAST)
    assert len(a.salt) == 16 and a.salt != b.salt
    assert ScramVerifier.parse(a.to_text()) == a


def test_verifier_repr_hides_keys(verifier: ScramVerifier) -> None:
    text = repr(verifier)
    assert base64.b64encode(verifier.stored_key).decode() not in text
    assert "stored_key" not in text and "server_key" not in text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abcdef0123456789abcdef01234567",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 44,  # not 32 bytes
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 44,
        "SCRAM-SHA-256$4096$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$abc:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$-1:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2Fsd!==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44 + "$x",
    ],
)
def test_verifier_parse_rejects(text: str) -> None:
    with pytest.raises(ScramError):
        ScramVerifier.parse(text)


def test_verifier_parse_error_does_not_echo_secret() -> None:
    text = "SCRAM-SHA-256$4096:c2FsdA==$" + "Q" * 44 + ":" + "Z" * 43
    with pytest.raises(ScramError) as err:
        ScramVerifier.parse(text)
    assert "QQQQ" not in f"{err.value} {err.value.detail}"


# --------------------------------------------------------------------------- SASLprep


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        ("user", "user"),
        ("USER", "USER"),
        ("\x07bell", "\x07bell"),  # pure ASCII is passed through, as in PostgreSQL
        ("I\u00adX", "IX"),  # RFC 4013 examples: soft hyphen mapped to nothing
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space -> SPACE
        ("caf\u0065\u0301", "caf\u00e9"),  # NFKC composes
        ("\u0627\u0031", None),  # bidi: RandALCat must be first and last
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),
        ("\u0627a\u0628", None),  # RandALCat and LCat mixed
        ("\u00e9\x07", None),  # control character in a non-ASCII string
        ("\u00e9\ue000", None),  # private use
        ("\u00e9\u0221", None),  # unassigned in Unicode 3.2
        ("\u00ad", None),  # maps to the empty string
    ],
)
def test_saslprep(given_: str, expected: str | None) -> None:
    assert saslprep(given_) == expected


def test_saslprep_applied_and_raw_fallback() -> None:
    salt = b"0123456789abcdef"
    # normalized: stored as PostgreSQL would for "IX"
    assert ScramVerifier.from_password("I\u00adX", salt, FAST).to_text() == independent_verifier(
        b"IX", salt, FAST
    )
    # prohibited: PostgreSQL falls back to the raw UTF-8 bytes
    raw = "\u0627\u0031"
    assert ScramVerifier.from_password(raw, salt, FAST).to_text() == independent_verifier(
        raw.encode(), salt, FAST
    )
    # the client prepares the same way, so both spellings log in
    v = ScramVerifier.from_password("I\u00adX", salt, FAST)
    exchange(ScramServer(v, None), ScramClient(password="IX"))


# --------------------------------------------------------------------------- tls-server-end-point


def _self_signed(key: object, algorithm: hashes.HashAlgorithm | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgcloak-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return cert.public_bytes(Encoding.DER)


def test_tls_server_end_point_sha256() -> None:
    der = _self_signed(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_tls_server_end_point_sha384() -> None:
    der = _self_signed(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


# A throwaway self-signed ecdsa-with-SHA1 certificate (openssl req -x509 -sha1); current
# cryptography releases refuse to sign with SHA-1, so it is embedded. No private key.
SHA1_CERT_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBezCCASKgAwIBAgIUdjoMt5sK5II4C343RpZelQLPo8owCQYHKoZIzj0EATAU\n"
    "MRIwEAYDVQQDDAlzaGExLXRlc3QwHhcNMjYxMTI3MDkwMDAzWhcNMzYxMTI0MDkw\n"
    "MDAzWjAUMRIwEAYDVQQDDAlzaGExLXRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMB\n"
    "BwNCAASAoZLtfFQutYEJ0BE/MaI//QdMlpZbqk7bbXVb9KI81C/FD43EmxtmLQpG\n"
    "0prpVcYrcAA6hOxcLhLLMyXOAEMho1MwUTAdBgNVHQ4EFgQUZQHt//UnOCrm0K4X\n"
    "6OB2Bv4Nb+owHwYDVR0jBBgwFoAUZQHt//UnOCrm0K4X6OB2Bv4Nb+owDwYDVR0T\n"
    "AQH/BAUwAwEB/zAJBgcqhkjOPQQBA0gAMEUCIGTDZI8xHOzuVzQzcKzsw/r0ldEf\n"
    "Y5X/v9dt1Gh+On2BAiEAo011p9f+xGeXSRHntjgGemEv/awbXlIDEWwP1ksneBc=\n"
    "-----END CERTIFICATE-----\n"
)


def test_tls_server_end_point_sha1_upgraded_to_sha256() -> None:
    cert = x509.load_pem_x509_certificate(SHA1_CERT_PEM.encode())
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA1)
    der = cert.public_bytes(Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_tls_server_end_point_unsupported() -> None:
    with pytest.raises(ValueError):
        tls_server_end_point(_self_signed(ed25519.Ed25519PrivateKey.generate(), None))
    with pytest.raises(ValueError):
        tls_server_end_point(b"not a certificate")
