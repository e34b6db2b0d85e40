"""The PostgreSQL wire protocol by hand, on a psycopg connection's socket.

For tests that need an exact ordering of messages no driver sends, and to see every
reply as it arrived (a message pgcloak should have hidden, or one it lost).
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable

import psycopg


def message(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))


def bind(portal: str, stmt: str) -> bytes:
    return message(b"B", portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0))


def bind_params(portal: str, stmt: str, values: list[str]) -> bytes:
    """A Bind of text parameters."""
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!hh", 0, len(values))
    for v in values:
        body += struct.pack("!i", len(v.encode())) + v.encode()
    return message(b"B", body + struct.pack("!h", 0))


def close_statement(name: str) -> bytes:
    return message(b"C", b"S" + name.encode() + b"\0")


def describe_statement(name: str) -> bytes:
    return message(b"D", b"S" + name.encode() + b"\0")


def execute(portal: str) -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


SYNC = message(b"S", b"")


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def read_messages(conn: psycopg.Connection, done: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """Raw messages from pgcloak on psycopg's socket until ``done(messages)``."""
    fd = conn.pgconn.socket
    buf, out = b"", []
    while not done(out):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"nothing more within {timeout}s: {out}"
        chunk = os.read(fd, 65536)
        assert chunk, "closed"
        buf += chunk
        while len(buf) >= 5:
            (n,) = struct.unpack("!i", buf[1:5])
            if len(buf) < n + 1:
                break
            out.append((chr(buf[0]), buf[5 : n + 1]))
            buf = buf[n + 1 :]
    return out


def raw(conn: psycopg.Connection, data: bytes, readies: int) -> list[tuple[str, bytes]]:
    """Send ``data`` as it is; the replies up to the ``readies``-th ReadyForQuery."""
    os.write(conn.pgconn.socket, data)
    return read_messages(conn, lambda out: sum(t == "Z" for t, _ in out) >= readies)


def types(msgs: list[tuple[str, bytes]]) -> list[str]:
    """The message types of ``msgs``, in order."""
    return [t for t, _ in msgs]


def copy_data(text: str) -> bytes:
    return message(b"d", text.encode())


COPY_DONE = message(b"c", b"")


def sqlstates(msgs: list[tuple[str, bytes]]) -> list[str]:
    """The SQLSTATEs of the ErrorResponses among ``msgs``, in order."""
    out = []
    for t, body in msgs:
        if t == "E":
            fields = {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}
            out.append(fields["C"])
    return out
