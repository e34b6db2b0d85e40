"""pgcloak answers protocol-version negotiation itself and speaks 3.0 on both legs."""

from __future__ import annotations

import asyncio

from pgcloak.wire.framing import scan
from pgcloak.wire.messages import AuthenticationSASL, NegotiateProtocolVersion, decode_backend
from pgcloak.wire.startup import PROTOCOL_3_2, StartupMessage


async def _first_messages(port: int, startup: bytes, count: int) -> list[object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(startup)
        buf = b""
        out: list[object] = []
        while len(out) < count:
            buf += await asyncio.wait_for(reader.read(65536), 10)
            end = scan(buf, 1 << 20)
            pos = 0
            while pos < end:
                length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                out.append(decode_backend(buf[pos], buf[pos + 5 : pos + 1 + length]))
                pos += 1 + length
            buf = buf[end:]
        return out[:count]
    finally:
        writer.close()


async def test_newer_minor_version_and_extensions_are_negotiated_down(pgcloak, pg_app_user):
    startup = StartupMessage(
        {"user": pg_app_user.user, "database": pg_app_user.dbname, "_pq_.future_feature": "on"}, PROTOCOL_3_2
    ).encode()
    negotiate, auth = await _first_messages(pgcloak.port, startup, 2)
    assert negotiate == NegotiateProtocolVersion(0, ("_pq_.future_feature",))
    assert isinstance(auth, AuthenticationSASL)
    assert auth.mechanisms == ("SCRAM-SHA-256",)


async def test_plain_3_0_startup_gets_no_negotiation(pgcloak, pg_app_user):
    startup = StartupMessage({"user": pg_app_user.user, "database": pg_app_user.dbname}).encode()
    (first,) = await _first_messages(pgcloak.port, startup, 1)
    assert isinstance(first, AuthenticationSASL)
