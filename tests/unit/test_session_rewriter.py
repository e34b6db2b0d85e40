"""Applying plans to message bytes, without sockets: the session's pure half."""

from __future__ import annotations

import struct

import pytest

from pgcloak.crypto.blind_index import INDEX_LENGTH, blind_index
from pgcloak.crypto.envelope import decrypt, encrypt
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key
from pgcloak.policy import parse_policy
from pgcloak.session.protection import (
    CopyInRewriter,
    Protection,
    ValueRefused,
    parse_text_array,
    render_text_array,
)
from pgcloak.session.rewriter import Rewriter
from pgcloak.sql import ValueAction
from pgcloak.wire.framing import iter_messages
from pgcloak.wire.messages import (
    Bind,
    CommandComplete,
    CopyData,
    CopyDone,
    DataRow,
    ErrorResponse,
    Parse,
    Query,
    ReadyForQuery,
    decode_backend,
)

POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
    ssn: {encrypt: true}
default_read: reveal
"""


@pytest.fixture(scope="module")
def protection() -> Protection:
    return Protection.build(parse_policy(POLICY), Keyring(generate_master_key()))


@pytest.fixture
def rewriter(protection: Protection) -> Rewriter:
    return Rewriter(lambda: protection)


def _index(p: Protection, value: str, normalize: str = "email") -> str:
    return blind_index(p.keyring, "public.users.email", value, normalize)


def test_query_literals_are_encrypted_and_indexed(rewriter: Rewriter, protection: Protection) -> None:
    msg = Query("INSERT INTO users (email, ssn) VALUES ('Bob@X.org', 'o''reilly\\1')").encode()
    out = Query.decode(rewriter.client_message(ord("Q"), msg)[5:]).sql
    assert "Bob@X.org" not in out and "reilly" not in out
    stored_email = out.split("'")[1]
    assert stored_email[:INDEX_LENGTH] == _index(protection, "bob@x.org")
    assert decrypt(protection.keyring, stored_email) == b"Bob@X.org"
    stored_ssn = out.split("'")[3]
    assert decrypt(protection.keyring, stored_ssn) == b"o'reilly\\1"


def test_lookup_rewrites_to_index_prefix(rewriter: Rewriter, protection: Protection) -> None:
    out = Query.decode(
        rewriter.client_message(ord("Q"), Query("SELECT id FROM users WHERE email = 'A@B.c'").encode())[5:]
    ).sql
    assert out == f"SELECT id FROM users WHERE left(email, {INDEX_LENGTH}) = '{_index(protection, 'a@b.c')}'"


def test_unprotected_query_is_forwarded_as_the_same_bytes(rewriter: Rewriter) -> None:
    msg = Query("SELECT abalance FROM pgbench_accounts WHERE aid = 7").encode()
    assert rewriter.client_message(ord("Q"), msg) is msg


def test_parse_then_bind_text_and_binary_params(rewriter: Rewriter, protection: Protection) -> None:
    parse = Parse("s1", "SELECT * FROM users WHERE email = $1 AND id = $2", (0, 0)).encode()
    rewritten = Parse.decode(rewriter.client_message(ord("P"), parse)[5:])
    assert rewritten.name.startswith("pgcloak_stmt_") and rewritten.param_types == (0, 0)  # the server's name
    assert f"left(email, {INDEX_LENGTH}) = $1" in rewritten.query
    for fmt in (0, 1):
        bind = Bind("", "s1", (fmt,), (b"X@Y.z", b"\x00\x00\x00\x07"), ()).encode()
        out = Bind.decode(rewriter.client_message(ord("B"), bind)[5:])
        assert out.statement == rewritten.name
        assert out.params == (_index(protection, "x@y.z").encode(), b"\x00\x00\x00\x07")
        assert out.param_formats == (fmt,)


def test_bind_of_binary_array_param(rewriter: Rewriter, protection: Protection) -> None:
    rewriter.client_message(ord("P"), Parse("a", "SELECT id FROM users WHERE email = ANY($1)", ()).encode())
    elems = [b"a@b.c", None]
    body = struct.pack("!iiIii", 1, 1, 25, 2, 1)
    for e in elems:
        body += struct.pack("!i", -1) if e is None else struct.pack("!i", len(e)) + e
    out = Bind.decode(rewriter.client_message(ord("B"), Bind("", "a", (1,), (body,), ()).encode())[5:])
    raw = out.params[0]
    assert raw is not None
    ndim, flags, oid, size, lbound = struct.unpack_from("!iiIii", raw)
    assert (ndim, flags, oid, size, lbound) == (1, 1, 25, 2, 1)
    n = struct.unpack_from("!i", raw, 20)[0]
    assert raw[24 : 24 + n].decode() == _index(protection, "a@b.c")
    assert struct.unpack_from("!i", raw, 24 + n)[0] == -1


def test_refusal_is_replaced_in_server_order(rewriter: Rewriter) -> None:
    sent = rewriter.client_message(ord("Q"), Query("SELECT * FROM users WHERE email LIKE 'a%'").encode())
    marker = Query.decode(sent[5:]).sql
    assert marker.startswith("pgcloak_refused_")
    server_error = ErrorResponse.make("42601", f'syntax error at or near "{marker}"').encode()
    chunk = server_error + ReadyForQuery("I").encode()
    out = rewriter.backend_chunk(chunk)
    msgs = [decode_backend(t, out[s:e]) for t, s, e in iter_messages(out)]
    assert isinstance(msgs[0], ErrorResponse)
    assert msgs[0].code == "0A000" and "email" in msgs[0].message and "LIKE" in msgs[0].message
    assert msgs[1] == ReadyForQuery("I")


def test_results_are_decrypted_by_envelope(rewriter: Rewriter, protection: Protection) -> None:
    env = encrypt(protection.keyring, "public.users.ssn", b"123-45-6789")
    stored = f"{_index(protection, 'a@b.c')}.{encrypt(protection.keyring, 'public.users.email', b'a@b.c')}"
    rows = DataRow((b"1", env.encode(), None, stored.encode())).encode() + CommandComplete("SELECT 1").encode()
    assert rewriter.needs_inspection(rows)
    out = rewriter.backend_chunk(rows)
    first = next(iter_messages(out))
    assert DataRow.decode(out[first[1] : first[2]]).values == (b"1", b"123-45-6789", None, b"a@b.c")


def test_tampered_value_gives_an_error_and_drops_the_rest_of_the_result(
    rewriter: Rewriter, protection: Protection
) -> None:
    env = encrypt(protection.keyring, "public.users.ssn", b"secret")
    bad = env[:-3] + ("A" if env[-3] != "A" else "B") + env[-2:]
    chunk = (
        DataRow((bad.encode(),)).encode()
        + DataRow((b"x",)).encode()
        + CommandComplete("SELECT 2").encode()
        + ReadyForQuery("I").encode()
    )
    out = rewriter.backend_chunk(chunk)
    msgs = [decode_backend(t, out[s:e]) for t, s, e in iter_messages(out)]
    assert [type(m).__name__ for m in msgs] == ["ErrorResponse", "ReadyForQuery"]
    assert isinstance(msgs[0], ErrorResponse) and msgs[0].code == "XX001"
    assert b"secret" not in out


def test_copy_in_text_rows_split_across_messages(rewriter: Rewriter, protection: Protection) -> None:
    rewriter.client_message(ord("Q"), Query("COPY users (email, name) FROM STDIN").encode())
    part1 = rewriter.client_message(ord("d"), CopyData(b"a@b.c\tAnn\nc@").encode())
    part2 = rewriter.client_message(ord("d"), CopyData(b"d.e\t\\N\n").encode())
    rows = (CopyData.decode(part1[5:]).data + CopyData.decode(part2[5:]).data).decode().splitlines()
    assert [r.split("\t")[1] for r in rows] == ["Ann", "\\N"]
    assert [decrypt(protection.keyring, r.split("\t")[0]) for r in rows] == [b"a@b.c", b"c@d.e"]


def _copied(protection: Protection, out: bytes) -> list[tuple[bytes, str]]:
    """The (email, name) rows of the CopyData messages in ``out``, the email decrypted."""
    data = b"".join(out[start:end] for kind, start, end in iter_messages(out) if kind == ord("d"))
    rows = [line.split("\t") for line in data.decode().splitlines()]
    return [(decrypt(protection.keyring, email), name) for email, name in rows]


def test_copy_data_fed_in_slices_is_rewritten_as_the_whole_message(protection: Protection) -> None:
    # The session feeds a big CopyData to copy_data a slice at a time: the slices cut
    # records, escapes and CRLF line ends anywhere.
    data = b"".join(f"u{i}@b.c\tN\\{i}\r\n".encode() for i in range(50))
    copy, done = Query("COPY users (email, name) FROM STDIN").encode(), CopyDone().encode()
    whole = Rewriter(lambda: protection)
    whole.client_message(ord("Q"), copy)
    expected = whole.client_message(ord("d"), CopyData(data).encode()) + whole.client_message(ord("c"), done)
    for size in (1, 2, 7, 64):
        sliced = Rewriter(lambda: protection)
        sliced.client_message(ord("Q"), copy)
        out = b"".join(sliced.copy_data(data[i : i + size]) for i in range(0, len(data), size))
        assert sliced.copying_in
        out += sliced.client_message(ord("c"), done)
        assert not sliced.copying_in
        assert _copied(protection, out) == _copied(protection, expected)
        assert len(_copied(protection, out)) == 50


def test_a_refused_slice_ends_the_copy_and_drops_the_rest(rewriter: Rewriter) -> None:
    rewriter.client_message(ord("Q"), Query("COPY users (email, phone) FROM STDIN").encode())
    data = b"a@b.c\t+1 555\n" * 20 + b"d@e.f\tcall me maybe\n" + b"g@h.i\t+1 555\n" * 20
    outs = [rewriter.copy_data(data[i : i + 16]) for i in range(0, len(data), 16)]
    failed = [i for i, out in enumerate(outs) if out.startswith(b"f")]
    assert len(failed) == 1 and not rewriter.copying_in
    assert not any(outs[failed[0] + 1 :])  # nothing of the rest, in clear or not
    assert b"call me" not in b"".join(outs)


def test_copy_messages_after_a_refusal_are_dropped_until_the_copy_ends(rewriter: Rewriter) -> None:
    rewriter.client_message(ord("Q"), Query("COPY users (email, phone) FROM STDIN").encode())
    refused = rewriter.client_message(ord("d"), CopyData(b"a@b.c\tcall me maybe\n").encode())
    assert refused.startswith(b"f") and not rewriter.copying_in
    # PostgreSQL ignores the rest of the client's COPY; none of it is sent, in clear or not.
    assert rewriter.client_message(ord("d"), CopyData(b"secret@example.com\t+1 555\n").encode()) == b""
    assert rewriter.client_message(ord("c"), CopyDone().encode()) == b""
    # The next COPY (of a table without protected columns) is the client's own again.
    rewriter.client_message(ord("Q"), Query("COPY plain_contacts FROM STDIN").encode())
    data = CopyData(b"x\ty\n").encode()
    assert rewriter.client_message(ord("d"), data) == data


def test_copy_in_csv_quoted_newlines_and_nulls(protection: Protection) -> None:
    action = ValueAction("store", "public.users", "ssn", "public.users.ssn", None, "none", True, False, False)
    rw = CopyInRewriter((action, ValueAction("pass")), "csv", protection.transform)
    out = rw.feed(b'"multi\nline",x\n,"keep, me"\n""') + rw.finish()
    lines = out.decode().split("\n")
    assert decrypt(protection.keyring, lines[0].split(",")[0]) == b"multi\nline"
    assert lines[1] == ',"keep, me"'  # unquoted empty = NULL stays NULL
    assert decrypt(protection.keyring, lines[2]) == b""  # quoted empty = empty string


def test_copy_out_rows_are_decrypted_and_escaped(protection: Protection) -> None:
    env = encrypt(protection.keyring, "public.users.ssn", b"tab\there")
    row = f"1\t{env}\n".encode()
    assert protection.reveal_copy_row(row, csv=False) == b"1\ttab\\there\n"
    assert protection.reveal_copy_row(f"1,{env}\n".encode(), csv=True) == b'1,"tab\there"\n'


def test_invalid_phone_is_refused_without_echoing_it(rewriter: Rewriter) -> None:
    sent = rewriter.client_message(ord("Q"), Query("INSERT INTO users (phone) VALUES ('call me maybe')").encode())
    assert Query.decode(sent[5:]).sql.startswith("pgcloak_refused_")
    assert b"call me" not in sent


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("{}", []),
        ("{a,b}", ["a", "b"]),
        ('{"x,y","q\\"z",NULL, c }', ["x,y", 'q"z', None, "c"]),
        ('{"NULL"}', ["NULL"]),
    ],
)
def test_text_arrays_round_trip(text: str, items: list[str | None]) -> None:
    assert parse_text_array(text) == items
    assert parse_text_array(render_text_array(items)) == items


def test_nested_text_array_is_refused() -> None:
    with pytest.raises(ValueRefused):
        parse_text_array("{{a},{b}}")


# -- SQL-level PREPARE / EXECUTE: the registry follows every statement of a text ------------


def _sent_sql(rewriter: Rewriter, sql: str) -> str:
    return Query.decode(rewriter.client_message(ord("Q"), Query(sql).encode())[5:]).sql


def test_every_prepare_of_a_text_is_registered(rewriter: Rewriter, protection: Protection) -> None:
    """Only the first used to be: EXECUTE of the second then sent its values in clear."""
    _sent_sql(rewriter, "PREPARE a AS SELECT 1; PREPARE ins AS INSERT INTO users (email, ssn) VALUES ($1, $2)")
    sent = _sent_sql(rewriter, "EXECUTE ins('mallory@example.com', '999-99-9999')")
    # EXECUTE goes out as the statement pgcloak knows for the name, values encrypted.
    assert sent.startswith("INSERT INTO users (email, ssn) VALUES (")
    assert "mallory" not in sent and "999-99" not in sent
    assert decrypt(protection.keyring, sent.split("'")[1]) == b"mallory@example.com"
    # A Bind to the SQL-level name would run the server's statement: refused.
    bind = Bind("", "ins", (), (b"eve@example.com", b"111-11-1111"), ()).encode()
    out = rewriter.client_message(ord("B"), bind)
    assert b"pgcloak_refused_" in out and b"eve@" not in out
    # DEALLOCATE in a text with other statements is followed too.
    _sent_sql(rewriter, "SELECT 1; DEALLOCATE ins")
    assert "pgcloak_refused_" in _sent_sql(rewriter, "EXECUTE ins('x@example.com', '1')")


def test_execute_of_a_statement_prepared_in_the_same_text(rewriter: Rewriter, protection: Protection) -> None:
    sent = _sent_sql(
        rewriter, "PREPARE ins2 AS INSERT INTO users (email) VALUES ($1); EXECUTE ins2('oscar@example.com')"
    )
    assert "oscar" not in sent
    stored = sent.split("'")[1]
    assert decrypt(protection.keyring, stored) == b"oscar@example.com"


def test_unknown_statement_names_are_refused_as_postgresql_does(rewriter: Rewriter) -> None:
    """A statement prepared some way pgcloak did not see must not run with raw values."""
    sent = rewriter.client_message(ord("B"), Bind("", "nobody", (), (b"alice@example.com",), ()).encode())
    assert b"alice@" not in sent and b"pgcloak_refused_" in sent
    marker = Bind.decode(sent[5:]).statement
    server = ErrorResponse.make("26000", f'prepared statement "{marker}" does not exist').encode()
    msgs = [decode_backend(t, o[s:e]) for o in [rewriter.backend_chunk(server)] for t, s, e in iter_messages(o)]
    assert isinstance(msgs[0], ErrorResponse)
    assert (msgs[0].code, msgs[0].message) == ("26000", 'prepared statement "nobody" does not exist')
    assert "pgcloak_refused_" in _sent_sql(rewriter, "EXECUTE nobody('alice@example.com')")
    assert "alice@" not in _sent_sql(rewriter, "EXECUTE nobody('alice@example.com')")


@pytest.mark.parametrize(
    "arg",
    [
        "'x'::text || '900-00-0004'",  # only the cast literal used to be encrypted
        "''::varchar || '222-33-4444'",
        "'a'::text || '900-00-' || '0010'",
        "'900-00-0004'::varchar(5)",  # would cut the envelope
        "'900-00-0004'::name",
        "'900-00-0004'::char(5)",
        "'900-00-0004'::text IS NULL",
    ],
)
def test_execute_argument_that_is_more_than_a_literal_is_refused(rewriter: Rewriter, arg: str) -> None:
    _sent_sql(rewriter, "PREPARE ex(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)")
    sent = _sent_sql(rewriter, f"EXECUTE ex('e@example.com', {arg})")
    assert "pgcloak_refused_" in sent
    assert "900-00" not in sent and "222-33" not in sent and "e@example.com" not in sent


@pytest.mark.parametrize("cast", ["", "::text", "::TEXT", "::varchar"])
def test_execute_argument_literal_with_a_whole_text_cast_is_encrypted(
    rewriter: Rewriter, protection: Protection, cast: str
) -> None:
    _sent_sql(rewriter, "PREPARE ex2(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)")
    sent = _sent_sql(rewriter, f"EXECUTE ex2('e@example.com'{cast}, '900-00-0004'{cast})")
    assert "pgcloak_refused_" not in sent and "900-00" not in sent
    assert decrypt(protection.keyring, sent.split("'")[3]) == b"900-00-0004"
    assert sent.startswith("INSERT INTO users (email, ssn) VALUES (")


@pytest.mark.parametrize(
    "sql",
    [
        'DEALLOCATE U&"\\0066oo"',
        'PREPARE U&"\\0066oo"(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)',
        "EXECUTE U&\"\\0066oo\"('x@example.com', '078-05-1120')",
    ],
)
def test_statement_names_pgcloak_cannot_follow_are_refused(rewriter: Rewriter, sql: str) -> None:
    """PostgreSQL decodes U&"\\0066oo" to foo: pgcloak would have filed it under another name."""
    sent = _sent_sql(rewriter, sql)
    assert "pgcloak_refused_" in sent and "078-05" not in sent


def test_statement_names_are_truncated_as_postgresql_does(rewriter: Rewriter, protection: Protection) -> None:
    """PostgreSQL keeps 63 bytes of a name: EXECUTE of another spelling with the same
    first 63 runs the same statement, and pgcloak must give it the same actions."""
    base = "a" * 63
    _sent_sql(rewriter, f"PREPARE {base}x1(text) AS INSERT INTO users (ssn) VALUES ($1)")
    sent = _sent_sql(rewriter, f"EXECUTE {base}x2('078-05-1120')")
    assert "078-05" not in sent and "pgcloak_refused_" not in sent
    assert decrypt(protection.keyring, sent.split("'")[1]) == b"078-05-1120"
    # PostgreSQL folds ASCII letters only: "FÖÖ" unquoted is fÖÖ, not föö.
    _sent_sql(rewriter, 'PREPARE "föö"(text) AS SELECT $1')
    _sent_sql(rewriter, "PREPARE FÖÖ(text) AS INSERT INTO users (ssn) VALUES ($1)")
    sent = _sent_sql(rewriter, "EXECUTE FÖÖ('078-05-1120')")
    assert sent.startswith("INSERT INTO users (ssn)") and "078-05" not in sent


def test_execute_never_runs_the_servers_statement(rewriter: Rewriter, protection: Protection) -> None:
    """DEALLOCATE failed (in an aborted transaction), so PostgreSQL kept the INSERT and
    refused the second PREPARE (42P05): EXECUTE is sent as the statement pgcloak knows
    for the name, so whatever the server holds, the values are encrypted for what runs."""
    _sent_sql(rewriter, "PREPARE dw(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)")
    _sent_sql(rewriter, "DEALLOCATE dw")
    _sent_sql(rewriter, "PREPARE dw(text, text) AS SELECT $1, $2")
    sent = _sent_sql(rewriter, "EXECUTE dw('n@example.com', '078-05-1120')")
    assert sent == "SELECT ('n@example.com')::text, ('078-05-1120')::text"  # pgcloak's, not the server's
    # A second PREPARE of a name without DEALLOCATE is refused by PostgreSQL: not taken.
    _sent_sql(rewriter, "PREPARE two(text) AS INSERT INTO users (ssn) VALUES ($1); PREPARE two(text) AS SELECT $1")
    sent = _sent_sql(rewriter, "EXECUTE two('078-05-1120')")
    assert sent.startswith("INSERT INTO users (ssn) VALUES (") and "078-05" not in sent
    assert decrypt(protection.keyring, sent.split("'")[1]) == b"078-05-1120"


def test_execute_inside_another_statement_is_refused(rewriter: Rewriter) -> None:
    _sent_sql(rewriter, "PREPARE sel(text) AS SELECT id FROM users WHERE email = $1")
    for sql in ("EXPLAIN EXECUTE sel('a@example.com')", "CREATE TABLE t AS EXECUTE sel('a@example.com')"):
        sent = _sent_sql(rewriter, sql)
        assert "pgcloak_refused_" in sent and "a@example.com" not in sent, sql
    assert "pgcloak_refused_" in _sent_sql(rewriter, "EXECUTE nope('a@example.com')")


# -- a review of EXECUTE sent as its statement ---------------------------------------------
def test_glued_parameters_in_a_text_with_execute(rewriter: Rewriter) -> None:
    """sqlglot reads "$1,$2" as a dollar quote: the text used to go out as it came."""
    _sent_sql(rewriter, "PREPARE g(text,text) AS INSERT INTO users (email, ssn) VALUES ($1,$2)")
    sent = _sent_sql(rewriter, "EXECUTE g('g@example.com','078-05-1120'); PREPARE zz AS SELECT $1,$2")
    assert "078-05" not in sent and "g@example.com" not in sent
    assert sent.startswith("INSERT INTO users (email, ssn) VALUES (")


def test_a_protocol_parse_of_a_sql_prepared_name_is_refused(rewriter: Rewriter) -> None:
    _sent_sql(rewriter, "PREPARE pp(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)")
    out = rewriter.client_message(ord("P"), Parse("pp", "SELECT $1::text, $2::text", ()).encode())
    assert b"pgcloak_refused_" in out  # PostgreSQL refuses it too (42P05)
    bind = rewriter.client_message(ord("B"), Bind("", "pp", (), (b"x@example.com", b"078-05-1120"), ()).encode())
    assert b"pgcloak_refused_" in bind and b"078-05" not in bind


@pytest.mark.parametrize(
    "body",
    [
        "EXECUTE q($1, $2)",  # PostgreSQL refuses to prepare it; pgcloak must not take it
        "DEALLOCATE pgcloak_reprepared_7",
        "PREPARE pgcloak_reprepared_999(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)",
    ],
)
def test_a_body_postgresql_would_not_prepare_is_not_taken(rewriter: Rewriter, body: str) -> None:
    _sent_sql(rewriter, "PREPARE q(text, text) AS INSERT INTO users (email, ssn) VALUES ($1, $2)")
    _sent_sql(rewriter, f"PREPARE outer1(text, text) AS {body}")
    sent = _sent_sql(rewriter, "EXECUTE outer1('n@example.com', '078-05-1120')")
    assert "pgcloak_refused_" in sent and "078-05" not in sent


def test_a_body_is_planned_under_the_rules_in_force_at_execute() -> None:
    """Accepted while contacts was not protected, the body uses $1 twice: once the policy
    protects contacts.email, the other use would send the value in clear."""
    keyring = Keyring(generate_master_key())
    before = Protection.build(parse_policy(POLICY), keyring)
    widened = POLICY.replace("tables:\n", "tables:\n  public.contacts:\n    email: {encrypt: true, index: exact}\n")
    after = Protection.build(parse_policy(widened), keyring)
    current = [before]
    rw = Rewriter(lambda: current[0])
    rw.client_message(ord("Q"), Query("PREPARE c(text) AS SELECT id, $1 AS asked FROM contacts WHERE email = $1").encode())
    current[0] = after
    sent = Query.decode(rw.client_message(ord("Q"), Query("EXECUTE c('bob@example.com')").encode())[5:]).sql
    assert "pgcloak_refused_" in sent and "bob@" not in sent


def test_protocol_statement_names_are_kept_as_postgresql_keeps_them(rewriter: Rewriter) -> None:
    """PostgreSQL truncates a Parse's name to 63 bytes too: two spellings, one statement."""
    x, y = "k" * 63 + "x", "k" * 63 + "y"
    rewriter.client_message(ord("P"), Parse(x, "SELECT $1::text", ()).encode())
    _sent_sql(rewriter, f"DEALLOCATE {y}")  # the server drops "k" * 63
    rewriter.client_message(ord("P"), Parse(y, "INSERT INTO users (ssn) VALUES ($1)", ()).encode())
    bind = rewriter.client_message(ord("B"), Bind("", x, (), (b"078-05-1120",), ()).encode())
    assert b"078-05" not in bind  # the INSERT the server holds: encrypted for it


def test_deallocate_of_a_statement_named_all_in_quotes(rewriter: Rewriter) -> None:
    rewriter.client_message(ord("P"), Parse("s", "INSERT INTO users (ssn) VALUES ($1)", ()).encode())
    _sent_sql(rewriter, 'DEALLOCATE "ALL"')  # a statement named ALL, not every statement
    bind = rewriter.client_message(ord("B"), Bind("", "s", (), (b"078-05-1120",), ()).encode())
    assert b"078-05" not in bind and b"pgcloak_refused_" not in bind
