"""The file sinks' batch write: lines handed to writev(2) as they are, never joined."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from pgcloak.audit import sinks


def _lines(n: int) -> list[bytes]:
    return [b"x" * (i % 97) + b"%d\n" % i for i in range(n)]


def _written(path: Path, lines: list[bytes]) -> bytes:
    """What ``_writev_all`` leaves in a new file at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        sinks._writev_all(fd, lines)
    finally:
        os.close(fd)
    return path.read_bytes()


def test_every_line_is_written_in_order_past_the_iov_limit(tmp_path: Path) -> None:
    lines = _lines(3 * sinks._IOV_MAX + 5)
    assert _written(tmp_path / "out", lines) == b"".join(lines)


@pytest.mark.parametrize("short", [1, 50, 97])
def test_a_short_write_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: int) -> None:
    """writev(2) may write less than asked (a signal, a full disk); the rest follows, whole."""
    real = os.writev
    calls: list[int] = []

    def writev_some(fd: int, buffers: Sequence[bytes]) -> int:
        calls.append(len(buffers))
        data = b"".join(buffers)
        return real(fd, [data[: max(0, len(data) - short)]]) if len(calls) == 1 else real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev_some)
    lines = _lines(40)
    assert _written(tmp_path / "out", lines) == b"".join(lines)
    assert calls == [40]  # one writev(2), short; the rest in plain writes
