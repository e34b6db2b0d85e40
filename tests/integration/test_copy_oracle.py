"""pgcloak's COPY reader against PostgreSQL itself, on generated COPY data.

The COPY rewriter encrypts the field PostgreSQL will store in a protected column only
if it splits records and fields exactly as PostgreSQL does. So the data, built from the
bytes that matter to either format (delimiters, quotes, backslashes, CR, LF, the end
marker, the NULL marker), goes to a real server straight (no proxy) into a table of
three text columns, and to :class:`~pgcloak.wire.copy_data.CopyReader`:

* when both accept it, the rows must be the same, NULLs included;
* when PostgreSQL refuses it, pgcloak may read it (what it then sends is its own canonical
  data, see the module) or refuse it too;
* when pgcloak refuses data PostgreSQL accepts, that is counted, and must stay rare
  (refusing is safe, but a user's data would not load).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgcloak.demo.postgres import TemporaryPostgres
from pgcloak.wire.copy_data import CopyFormatError, CopyReader

PIECES = [b"a", b"b", b"\t", b",", b'"', b'""', b"\\", b"\\\\", b"\r", b"\n", b"\r\n", b"\\.", b"\\N", b"N"]
PIECES += [b"\\t", b"\\x4", b"\\101", b".", b"\xc3\xa9"]


@pytest.fixture(scope="module")
def conn(pg: TemporaryPostgres) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS copy_oracle")
        c.execute("CREATE UNLOGGED TABLE copy_oracle (n serial, a text, b text, c text)")
        yield c


def _server(conn: psycopg.Connection, data: bytes, csv: bool) -> list[tuple[str | None, ...]] | None:
    conn.execute("TRUNCATE copy_oracle RESTART IDENTITY")
    sql = "COPY copy_oracle (a, b, c) FROM STDIN" + (" (FORMAT csv)" if csv else "")
    try:
        with conn.cursor() as cur, cur.copy(sql) as copy:
            copy.write(data)
    except psycopg.Error:
        return None
    return [row[1:] for row in conn.execute("SELECT * FROM copy_oracle ORDER BY n").fetchall()]


def _ours(data: bytes, csv: bool) -> list[tuple[str | None, ...]] | None:
    reader = CopyReader(csv)
    try:
        records = reader.feed(data[: len(data) // 2]) + reader.feed(data[len(data) // 2 :]) + reader.finish()
    except CopyFormatError:
        return None
    rows = []
    for fields in records:
        if len(fields) != 3:
            return []  # PostgreSQL refuses a row of another width: no comparison
        try:
            rows.append(tuple(None if f.value is None else f.value.decode("utf-8") for f in fields))
        except UnicodeDecodeError:
            return []
    return rows


refused_by_us: list[bytes] = []


@pytest.mark.parametrize("csv", [False, True], ids=["text", "csv"])
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=16), rows=st.integers(1, 3))
def test_pgcloak_reads_copy_data_as_postgresql_does(
    conn: psycopg.Connection, csv: bool, pieces: list[bytes], rows: int
) -> None:
    delim = b"," if csv else b"\t"
    # three fields a row, so that most examples load; the pieces go into them
    line = delim.join([b"".join(pieces[0::3]), b"".join(pieces[1::3]), b"".join(pieces[2::3])])
    data = b"\n".join([line] * rows) + b"\n"
    ours = _ours(data, csv)
    assume(ours != [])
    theirs = _server(conn, data, csv)
    if theirs is None:
        return  # PostgreSQL refuses it: pgcloak's reading does not matter
    if ours is None:
        refused_by_us.append(data)
        return
    assert ours == theirs, f"pgcloak and PostgreSQL read {data!r} differently"


def test_pgcloak_rarely_refuses_what_postgresql_loads() -> None:
    # Runs after the property above (same module, file order): the data pgcloak refused
    # although PostgreSQL loaded it (e.g. "\\." after data on a line, which PostgreSQL
    # 15 loads and 18 refuses).
    assert len(refused_by_us) <= 30, refused_by_us[:5]
