"""COPY FROM STDIN data in text or CSV format, read the way PostgreSQL reads it.

pgcloak encrypts the protected fields of COPY data on its way to the server, so it has
to know which bytes PostgreSQL will store in which column. A reader that splits rows or
fields differently from PostgreSQL (a bare CR ending a line, a backslash before a TAB, a
quote in the middle of a CSV field) encrypts the wrong field and lets the right one
through in clear. So records and fields are found by PostgreSQL's own rules
(``copyfromparse.c``: CopyReadLineText, CopyReadAttributesText, CopyReadAttributesCSV):

* a line ends at LF, CR or CRLF, whichever the first line used (another one later is an
  error, as in PostgreSQL);
* in text format a backslash escapes the byte after it, even a TAB, CR or LF, and ``\\.``
  alone on a line ends the data;
* in CSV format a quote anywhere in a field opens a quoted section, in which ``""`` is a
  quote and CR and LF are data; an unquoted empty field is NULL;
* whatever follows the end of the data is ignored.

Then each record is written again in one canonical form (LF line ends, the fields
pgcloak kept as they came, the ones it changed escaped or quoted afresh), so that what
PostgreSQL parses is what pgcloak decided, field for field, whatever the server's
version makes of odd input. Only the formats' default delimiter, quote, escape and NULL
marker are read (the planner refuses COPY options that change them).

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["CopyFormatError", "CopyReader", "Field", "csv_value", "record_line", "text_value"]

_LF: Final = 0x0A
_CR: Final = 0x0D
_BACKSLASH: Final = 0x5C
_DOT: Final = 0x2E
_QUOTE: Final = 0x22
_COMMA: Final = 0x2C
_TAB: Final = 0x09

_UNKNOWN, _NL, _CR_ONLY, _CRNL = 0, 1, 2, 3

#: Bytes that matter while looking for the end of a line.
_TEXT_LINE: Final = re.compile(rb"[\\\r\n]")
_CSV_LINE: Final = re.compile(rb'["\r\n]')
#: What ends a run of plain lines (bytes.split does the rest).
_TEXT_OTHER: Final = re.compile(rb"[\\\r]")
_CSV_OTHER: Final = re.compile(rb'["\r]')
_TEXT_FIELD: Final = re.compile(rb"[\t\\]")
_CSV_FIELD: Final = re.compile(rb'[,"]')
#: A backslash escape of text format: octal (1-3 digits), hex (1-2), or any byte; a
#: backslash at the end of a line is dropped.
_TEXT_ESCAPE: Final = re.compile(rb"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.|\Z)", re.S)
_CONTROL: Final = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_NEEDS_QUOTES: Final = re.compile(rb'[,"\r\n]')


class CopyFormatError(ValueError):
    """COPY data PostgreSQL would refuse too (or that pgcloak will not guess about)."""

    sqlstate = "22P04"  # bad_copy_file_format


class Field:
    """One field as sent (``raw``: escaped or quoted) and as PostgreSQL reads it
    (``value``; None for the NULL marker)."""

    __slots__ = ("raw", "value")

    def __init__(self, raw: bytes, value: bytes | None) -> None:
        self.raw = raw
        self.value = value

    def __repr__(self) -> str:
        return f"Field({self.raw!r}, {self.value!r})"


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    if not code:
        return b""  # a backslash ending the line
    first = code[0]
    if 0x30 <= first <= 0x37:
        return bytes((int(code, 8) & 0xFF,))
    if first == 0x78 and len(code) > 1:  # x
        return bytes((int(code[1:], 16),))
    return _CONTROL.get(code, code)


def _text_fields(line: bytes) -> list[Field]:
    fields: list[Field] = []
    start = 0
    n = len(line)
    while True:
        pos = start
        end = n
        while True:
            found = _TEXT_FIELD.search(line, pos)
            if found is None:
                break
            at = found.start()
            if line[at] == _TAB:
                end = at
                break
            pos = at + 2  # the escaped byte, whatever it is, is data
        raw = line[start:end]
        if raw == b"\\N":
            fields.append(Field(raw, None))
        else:
            fields.append(Field(raw, _TEXT_ESCAPE.sub(_unescape, raw) if b"\\" in raw else raw))
        if end >= n:
            return fields
        start = end + 1


def _csv_fields(line: bytes) -> list[Field]:
    fields: list[Field] = []
    start = 0
    n = len(line)
    while True:
        pos = start
        parts: list[bytes] = []
        quoted = False
        delimited = False
        while True:
            found = _CSV_FIELD.search(line, pos)
            if found is None:
                parts.append(line[pos:])
                pos = n
                break
            at = found.start()
            parts.append(line[pos:at])
            if line[at] == _COMMA:
                pos = at + 1
                delimited = True
                break
            quoted = True  # a quote anywhere opens a quoted section
            pos = at + 1
            while True:
                close = line.find(b'"', pos)
                if close < 0:
                    raise CopyFormatError("unterminated CSV quoted field")
                parts.append(line[pos:close])
                if close + 1 < n and line[close + 1] == _QUOTE:
                    parts.append(b'"')
                    pos = close + 2
                    continue
                pos = close + 1
                break
        raw = line[start : pos - 1 if delimited else n]
        fields.append(Field(raw, None if not quoted and not raw else b"".join(parts)))
        if not delimited:
            return fields
        start = pos


class CopyReader:
    """Records of a COPY FROM STDIN stream, fed as the CopyData messages come.

    Linear in the data however it is split: the buffer is consumed by offset, and a
    run of lines with nothing special in it (no CR; in text format no backslash, in CSV
    no quote) is split with ``bytes.split``, the common case of a bulk load.
    """

    def __init__(self, csv: bool) -> None:
        self.csv = csv
        self._buf = b""
        #: Where the current (unfinished) line starts in ``_buf``.
        self._start = 0
        #: Where the search for its end resumes (bytes before it belong to the line:
        #: whole escapes, and in CSV the quoted state below).
        self._scan = 0
        self._in_quote = False
        self._eol = _UNKNOWN
        #: The end-of-copy marker was read: what follows is not data.
        self.ended = False

    def feed(self, data: bytes) -> list[list[Field]]:
        """The records that ``data`` completes."""
        if self.ended:
            return []
        if self._start:
            self._buf = self._buf[self._start :]
            self._scan -= self._start
            self._start = 0
        self._buf = self._buf + data if self._buf else data
        return self._records(final=False)

    def finish(self) -> list[list[Field]]:
        """The stream ended (CopyDone): its last line, if it had no line end."""
        if self.ended:
            return []
        records = self._records(final=True)
        self._buf = b""
        self._start = self._scan = 0
        return records

    def _records(self, final: bool) -> list[list[Field]]:
        records: list[list[Field]] = []
        split = _csv_fields if self.csv else _text_fields
        while not self.ended:
            if self._scan == self._start and not self._in_quote:
                self._plain_lines(records)
            line = self._line(final)
            if line is None:
                break
            if self.csv and line == b"\\.":  # PostgreSQL before 18 ends CSV data there, as psql does
                self.ended = True
                break
            records.append(split(line))
        if self.ended:
            self._buf = b""
            self._start = self._scan = 0
        return records

    def _plain_lines(self, records: list[list[Field]]) -> None:
        """Whole lines from the current one on with nothing special in them, split fast."""
        if self._eol not in (_UNKNOWN, _NL):
            return
        buf = self._buf
        start = self._start
        # the lines up to the last LF before the first byte that needs the slow path
        found = (_CSV_OTHER if self.csv else _TEXT_OTHER).search(buf, start)
        end = buf.rfind(b"\n", start, len(buf) if found is None else found.start())
        if end < 0:
            return
        lines = buf[start:end].split(b"\n")
        self._eol = _NL
        if self.csv:
            for line in lines:
                if line == b"\\.":
                    self.ended = True
                    self._start = self._scan = end + 1
                    return
                records.append([Field(raw, raw if raw else None) for raw in line.split(b",")])
        else:
            for line in lines:
                records.append([Field(raw, raw) for raw in line.split(b"\t")])
        self._start = self._scan = end + 1

    def _line(self, final: bool) -> bytes | None:
        """The next whole line (without its end), or None until more data comes."""
        buf = self._buf
        n = len(buf)
        if final and self._start >= n:
            return None
        pos = self._scan
        pattern = _CSV_LINE if self.csv else _TEXT_LINE
        while True:
            found = pattern.search(buf, pos)
            if found is None:
                if not final:
                    self._scan = n
                    return None
                return self._take(n, n)
            at = found.start()
            c = buf[at]
            if c == _QUOTE:
                self._in_quote = not self._in_quote
                pos = at + 1
                continue
            if self.csv and self._in_quote:
                pos = at + 1  # CR and LF inside quotes are data
                continue
            if c == _BACKSLASH:
                if at + 1 >= n:
                    if not final:
                        self._scan = at
                        return None
                    return self._take(n, n)
                if buf[at + 1] == _DOT:
                    return self._marker(at, final)
                pos = at + 2
                continue
            if c == _LF:
                if self._eol in (_CR_ONLY, _CRNL):
                    raise CopyFormatError("literal newline found in data (the data's lines end in CR)")
                self._eol = _NL
                return self._take(at, at + 1)
            # CR
            if self._eol in (_UNKNOWN, _CRNL):
                if at + 1 >= n and not final:
                    self._scan = at
                    return None
                if at + 1 < n and buf[at + 1] == _LF:
                    self._eol = _CRNL
                    return self._take(at, at + 2)
                if self._eol == _CRNL:
                    raise CopyFormatError("literal carriage return found in data (the data's lines end in CRLF)")
                self._eol = _CR_ONLY
                return self._take(at, at + 1)
            if self._eol == _NL:
                raise CopyFormatError("literal carriage return found in data (the data's lines end in LF)")
            return self._take(at, at + 1)

    def _marker(self, at: int, final: bool) -> bytes | None:
        """``\\.`` in text format: the end of the data, if alone on its line."""
        buf = self._buf
        if at > self._start:
            raise CopyFormatError("end-of-copy marker is not alone on its line")
        after = buf[at + 2 : at + 4]
        if not final and len(after) < (2 if self._eol in (_UNKNOWN, _CRNL) else 1) and not after.startswith(b"\n"):
            self._scan = at
            return None
        if after and not after.startswith((b"\n", b"\r")):
            raise CopyFormatError("end-of-copy marker is not alone on its line")
        self.ended = True
        return None

    def _take(self, end: int, after: int) -> bytes:
        line = self._buf[self._start : end]
        self._start = self._scan = after
        self._in_quote = False
        return line


def text_value(value: bytes | None) -> bytes:
    """``value`` as a text-format field (``\\N`` for NULL)."""
    if value is None:
        return b"\\N"
    return (
        value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    )


def csv_value(value: bytes | None) -> bytes:
    """``value`` as a CSV field (unquoted empty for NULL, quoted when it must be)."""
    if value is None:
        return b""
    if not value or value == b"\\." or _NEEDS_QUOTES.search(value):
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


def record_line(fields: list[bytes], csv: bool) -> bytes:
    """One record, its fields already in the format's form, as a line."""
    return (b"," if csv else b"\t").join(fields) + b"\n"
