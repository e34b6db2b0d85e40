"""Throwaway TLS material for the demo and the test-suite.

A private CA signs a server certificate (and optionally a client certificate), so
clients can use ``sslmode=verify-full`` against ``localhost``/``127.0.0.1``/``::1``
without touching any system trust store.  Keys are EC P-256 because generating
them is ~100x faster than RSA, which matters when every test session makes a set.
Signatures are always SHA-256: SCRAM channel binding (``tls-server-end-point``)
hashes the server certificate with its signature hash, and clients only agree on
that value when the hash is a plain, well-known one.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsFiles", "make_tls_files"]

#: Certificates are generated fresh for each run; a year is long enough for any
#: demo left running and short enough to never be mistaken for real material.
_VALIDITY = _dt.timedelta(days=365)
#: Back-date ``not_valid_before`` so small clock skew between hosts is harmless.
_BACKDATE = _dt.timedelta(hours=1)


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files written by :func:`make_tls_files`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgcloak throwaway"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _leaf_builder(
    subject: str,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    now: _dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` so the file never exists with looser permissions than ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_tls_files(
    directory: Path,
    common_name: str = "localhost",
    *,
    client_common_name: str | None = None,
) -> TlsFiles:
    """Create a CA, a server certificate for ``common_name`` and write them as PEM.

    The server certificate's SAN always covers ``localhost``, ``127.0.0.1`` and
    ``::1`` (plus ``common_name`` when it differs), so ``verify-full`` works for
    every way a test reaches a local server.  With ``client_common_name`` a client
    certificate for that CN is made too (PostgreSQL ``cert`` auth maps CN to role).
    Private keys are written 0600, certificates 0644.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)

    ca_key = _new_key()
    ca_name = _name(f"pgcloak throwaway CA for {common_name}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    dns_names = ["localhost"]
    if common_name not in dns_names:
        try:
            ipaddress.ip_address(common_name)
        except ValueError:
            dns_names.append(common_name)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]

    server_key = _new_key()
    server_cert = (
        _leaf_builder(
            common_name, ca_name, ca_key, server_key, ExtendedKeyUsageOID.SERVER_AUTH, now
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt" if client_common_name else None,
        client_key=directory / "client.key" if client_common_name else None,
    )
    _write(files.ca_key, _key_pem(ca_key), 0o600)
    _write(files.ca_cert, _cert_pem(ca_cert), 0o644)
    _write(files.server_key, _key_pem(server_key), 0o600)
    _write(files.server_cert, _cert_pem(server_cert), 0o644)

    if client_common_name and files.client_cert and files.client_key:
        client_key = _new_key()
        client_cert = _leaf_builder(
            client_common_name, ca_name, ca_key, client_key, ExtendedKeyUsageOID.CLIENT_AUTH, now
        ).sign(ca_key, hashes.SHA256())
        _write(files.client_key, _key_pem(client_key), 0o600)
        _write(files.client_cert, _cert_pem(client_cert), 0o644)

    return files
