"""COPY FROM STDIN data read as PostgreSQL reads it (pgcloak.wire.copy_data), and the
COPY rewriter that re-writes it: every case here once let a protected field through
unencrypted, because the old reader split records or fields differently (review of
session 13). tests/integration/test_copy_oracle.py checks the reader against a real
server on generated input."""

from __future__ import annotations

import pytest

from pgcloak.session.protection import CopyInRewriter
from pgcloak.sql import ValueAction
from pgcloak.wire.copy_data import CopyFormatError, CopyReader, csv_value, text_value


def _read(data: bytes, csv: bool = False, chunk: int = 0) -> list[list[bytes | None]]:
    reader = CopyReader(csv)
    records = []
    if chunk:
        for i in range(0, len(data), chunk):
            records += reader.feed(data[i : i + chunk])
    else:
        records += reader.feed(data)
    records += reader.finish()
    return [[f.value for f in fields] for fields in records]


@pytest.mark.parametrize("chunk", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("data", "csv", "rows"),
    [
        (b"a\tb\nc\td\n", False, [[b"a", b"b"], [b"c", b"d"]]),
        (b"a\tb\r\nc\td\r\n", False, [[b"a", b"b"], [b"c", b"d"]]),
        # lines that end in a bare CR (the first line decides)
        (b"a\tb\rc\td\r", False, [[b"a", b"b"], [b"c", b"d"]]),
        (b"a,b\rc,d\r", True, [[b"a", b"b"], [b"c", b"d"]]),
        # a backslash makes the next byte data: TAB, LF, CR included
        (b"a\\\tb\tc\n", False, [[b"a\tb", b"c"]]),
        (b"a\\\nb\tc\n", False, [[b"a\nb", b"c"]]),
        (b"\\N\t\\\\N\t\\x41\\101\\n\\q\n", False, [[None, b"\\N", b"AA\nq"]]),
        # a quote anywhere in a CSV field opens a quoted section
        (b'x"b,c,d"e,f\n', True, [[b"xb,c,de", b"f"]]),
        (b'"a""b",,""\n', True, [[b'a"b', None, b""]]),
        (b'"multi\nline",x\n', True, [[b"multi\nline", b"x"]]),
        # the end of the data; what follows it is not data
        (b"a\tb\n\\.\njunk\tjunk\n", False, [[b"a", b"b"]]),
        (b"a,b\n\\.\njunk,junk\n", True, [[b"a", b"b"]]),
        (b"a\tb", False, [[b"a", b"b"]]),
        (b"", False, []),
    ],
)
def test_records_and_fields_are_read_as_postgresql_reads_them(
    data: bytes, csv: bool, rows: list[list[bytes | None]], chunk: int
) -> None:
    assert _read(data, csv, chunk) == rows


@pytest.mark.parametrize(
    ("data", "csv"),
    [
        (b"a\nb\r", False),  # line ends that change style
        (b"a\r\nb\n", False),
        (b"a\rb\n", True),
        (b'"open,b\n', True),  # a quote never closed
        (b"a\\.\n", False),  # an end marker after data
    ],
)
def test_data_postgresql_refuses_is_refused(data: bytes, csv: bool) -> None:
    with pytest.raises(CopyFormatError):
        _read(data, csv)


def test_values_written_again_read_back_the_same() -> None:
    tricky = [b"", b"\\", b"\\N", b"a\tb", b"a\nb\rc", b'q"u,o', b"\\.", None]
    line = b"\t".join(text_value(v) for v in tricky) + b"\n"
    assert _read(line) == [tricky]
    line = b",".join(csv_value(v) for v in tricky) + b"\n"
    assert _read(line, csv=True) == [tricky]


def _rewriter(fmt: str, header: bool = False) -> CopyInRewriter:
    """Field 2 (of name, email) is "protected": replaced by a marker of its value."""

    def transform(action: ValueAction, value: str | None) -> str | None:
        return None if value is None else f"ENC[{len(value)}]"

    return CopyInRewriter((ValueAction("pass"), ValueAction("encrypt")), fmt, transform, header)


@pytest.mark.parametrize(
    ("fmt", "data", "out"),
    [
        ("text", b"n\\\tx\talice@example.com\n", b"n\\\tx\tENC[17]\n"),
        ("text", b"n\talice@example.com\rm\tbob@example.com\r", b"n\tENC[17]\nm\tENC[15]\n"),
        ("text", b"n\t\\N\n", b"n\t\\N\n"),
        ("csv", b'n"b,c,d"e,alice@example.com\n', b'n"b,c,d"e,ENC[17]\n'),
        ("csv", b'n,""\n', b"n,ENC[0]\n"),
        ("csv", b"n,\n", b"n,\n"),
        ("text", b"n\ta@b\n\\.\nm\tplain@example.com\n", b"n\tENC[3]\n"),
    ],
)
def test_the_rewriter_changes_the_field_postgresql_stores(fmt: str, data: bytes, out: bytes) -> None:
    rw = _rewriter(fmt)
    got = b"".join(rw.feed(data[i : i + 5]) for i in range(0, len(data), 5)) + rw.finish()
    assert got == out


def test_a_header_line_is_passed_on_as_it_came() -> None:
    rw = _rewriter("csv", header=True)
    assert rw.feed(b"name,email\nn,alice@example.com\n") == b"name,email\nn,ENC[17]\n"
