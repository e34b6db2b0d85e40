"""TLS contexts for the two legs, built once at start-up from the settings."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pgcloak.config import Settings
from pgcloak.session.scram import tls_server_end_point


@dataclass(frozen=True)
class TlsContexts:
    client: ssl.SSLContext | None  # server side, facing clients
    backend: ssl.SSLContext | None  # client side, facing PostgreSQL
    #: tls-server-end-point channel-binding data of our client-facing certificate.
    client_channel_binding: bytes | None


def build_tls(settings: Settings) -> TlsContexts:
    client_ctx: ssl.SSLContext | None = None
    binding: bytes | None = None
    if settings.effective_client_tls_mode != "disable":
        assert settings.client_tls_cert and settings.client_tls_key
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        client_ctx.load_cert_chain(settings.client_tls_cert, settings.client_tls_key)
        pem = settings.client_tls_cert.read_bytes()
        binding = tls_server_end_point(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER))
    backend_ctx: ssl.SSLContext | None = None
    mode = settings.backend_tls_mode
    if mode != "disable":
        backend_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        backend_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if mode in ("verify-ca", "verify-full"):
            backend_ctx.load_verify_locations(settings.backend_tls_ca)
            backend_ctx.check_hostname = mode == "verify-full"
            backend_ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            # prefer / require encrypt without authenticating the server, as libpq does.
            backend_ctx.check_hostname = False
            backend_ctx.verify_mode = ssl.CERT_NONE
        if settings.backend_tls_cert and settings.backend_tls_key:
            backend_ctx.load_cert_chain(settings.backend_tls_cert, settings.backend_tls_key)
    return TlsContexts(client_ctx, backend_ctx, binding)
