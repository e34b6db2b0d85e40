"""pgcloak.crypto.

A leaf package (no asyncio, no sockets, no other pgcloak package):

* ``keys``        MasterKey, its text form, k-of-n share texts (CLI functions).
* ``sources``     KeySource protocol: environment, file, Shamir shares; KMS protocol.
* ``shamir``      Shamir secret sharing over GF(2^8) (AES polynomial 0x11B).
* ``keyring``     HKDF-SHA256 per-column keys (enc / idx / audit), versions, caches.
* ``envelope``    ``pgc1:`` AES-256-GCM text envelopes: encrypt, decrypt, parse_header.
* ``blind_index`` HMAC-SHA256 blind index, normalizers, ``<index>.<envelope>`` layout.
* ``errors``      CryptoError and subclasses; messages never carry keys or plaintext.
"""
