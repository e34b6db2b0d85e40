"""Who reads what: read decisions (reveal / mask / deny) and the guards, without sockets.

The session's pure half: statements refused before they run (a denied column in the
SELECT list, an unbounded SELECT of encrypted columns), values decided by their
envelopes in the result (what the planner cannot see), and the per-statement cap on
rows carrying stored values.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from pgcloak import cli
from pgcloak.crypto.blind_index import blind_index, compose
from pgcloak.crypto.envelope import encrypt
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key
from pgcloak.policy import parse_policy
from pgcloak.session.protection import Protection, ReadDenied
from pgcloak.session.rewriter import Rewriter
from pgcloak.wire.framing import iter_messages
from pgcloak.wire.messages import (
    Bind,
    CommandComplete,
    CopyData,
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
    loyalty: {hash_only: true, index: exact}
default_read: deny
roles:
  app_rw: {read: reveal}
  support:
    read: {users.email: mask, users.phone: mask, users.ssn: deny}
guards: {unbounded_select: deny, max_pii_rows: 3}
"""
KEYRING = Keyring(generate_master_key())


@pytest.fixture(scope="module")
def protection() -> Protection:
    return Protection.build(parse_policy(POLICY), KEYRING)


def _stored(p: Protection, column: str, value: str, normalize: str = "none") -> bytes:
    key_id = f"public.users.{column}"
    envelope = encrypt(p.keyring, key_id, value.encode())
    if normalize == "none":
        return envelope.encode()
    return compose(blind_index(p.keyring, key_id, value, normalize), envelope).encode()


def _messages(out: bytes) -> list[object]:
    return [decode_backend(t, out[s:e]) for t, s, e in iter_messages(out)]


# -- the planner's guard -----------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM users",
        "SELECT * FROM users",
        "SELECT u.email FROM users u JOIN orders o ON o.user_id = u.id",
        "SELECT email FROM users UNION ALL SELECT email FROM users",
        "SELECT ssn FROM users OFFSET 10",
    ],
)
def test_unbounded_select_of_encrypted_columns_is_refused(protection: Protection, sql: str) -> None:
    plan = protection.planner.plan(sql)
    assert not plan.decision.allowed
    assert plan.decision.sqlstate == "42501"
    assert "guards.unbounded_select" in plan.decision.message


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM users LIMIT 10",
        "SELECT email FROM users WHERE id > 0",
        "SELECT email FROM users FETCH FIRST 5 ROWS ONLY",
        "SELECT count(*) FROM users",
        "SELECT id, name FROM users",
        "SELECT loyalty FROM users",  # hash-only: a pseudonym, nothing to decrypt
        "WITH u AS (SELECT email FROM users WHERE id < 9) SELECT email FROM u",
        "SELECT id FROM users WHERE id IN (SELECT id FROM users)",
    ],
)
def test_bounded_or_pii_free_selects_pass_the_guard(protection: Protection, sql: str) -> None:
    assert protection.planner.plan(sql).decision.allowed


def test_the_guard_can_be_turned_off() -> None:
    policy = parse_policy(POLICY.replace("unbounded_select: deny", "unbounded_select: allow"))
    assert Protection.build(policy, KEYRING).planner.plan("SELECT * FROM users").decision.allowed


def test_a_refusal_for_ciphertext_reasons_keeps_its_own_sqlstate(protection: Protection) -> None:
    plan = protection.planner.plan("SELECT email FROM users ORDER BY email")
    assert plan.decision.sqlstate == "0A000"


# -- values decided by their envelopes ---------------------------------------------------


def test_reveal_mask_and_deny_by_key_id(protection: Protection) -> None:
    email = _stored(protection, "email", "alice@example.com", "email")
    phone = _stored(protection, "phone", "+1 555 010 9999", "phone")
    ssn = _stored(protection, "ssn", "078-05-1120")
    app = protection.policy.read_view({"app_rw"})
    support = protection.policy.read_view({"support", "agent"})
    assert app.reveals_all and not support.reveals_all
    assert protection.reveal(email, app) == b"alice@example.com"
    assert protection.reveal(email, support) == b"a***@example.com"
    assert protection.reveal(phone, support) == b"****99"
    with pytest.raises(ReadDenied) as denied:
        protection.reveal(ssn, support)
    assert denied.value.sqlstate == "42501"
    assert "public.users.ssn" in denied.value.message and "078" not in denied.value.message
    # Nobody listed: default_read (deny) for every column.
    with pytest.raises(ReadDenied):
        protection.reveal(email, protection.policy.read_view({"outsider"}))


def test_text_that_only_contains_the_prefix_is_left_alone(protection: Protection) -> None:
    view = protection.policy.read_view({"support"})
    assert protection.reveal(b"see pgc1:not-an-envelope", view) == b"see pgc1:not-an-envelope"


# -- the session: static refusals ----------------------------------------------------------


def _refusal(rw: Rewriter, sent: bytes) -> ErrorResponse:
    """What the client gets for a refused statement (the server echoes our marker)."""
    body = sent[5:]
    marker = body[body.find(b"pgcloak_refused_") :].split(b"\0")[0].decode()
    server = ErrorResponse.make("42601", f'syntax error at or near "{marker}"').encode()
    msgs = _messages(rw.backend_chunk(server + ReadyForQuery("I").encode()))
    assert isinstance(msgs[0], ErrorResponse)
    return msgs[0]


def test_a_denied_column_in_the_select_list_is_refused_before_it_runs(protection: Protection) -> None:
    rw = Rewriter(lambda: protection, roles=frozenset({"agent", "support"}))
    sent = rw.client_message(ord("Q"), Query("SELECT ssn FROM users WHERE id = 1").encode())
    assert b"SELECT ssn" not in sent
    error = _refusal(rw, sent)
    assert error.code == "42501"
    assert "public.users.ssn" in error.message
    # SELECT * reads ssn too; masked columns and unprotected ones pass.
    assert b"pgcloak_refused_" in rw.client_message(ord("P"), Parse("", "SELECT * FROM users WHERE id = $1", ()).encode())
    ok = Query("SELECT email, phone, name FROM users WHERE id = 1").encode()
    assert rw.client_message(ord("Q"), ok) is ok


def test_roles_combine_most_permissive_first(protection: Protection) -> None:
    both = Rewriter(lambda: protection, roles=frozenset({"agent", "support", "app_rw"}))
    msg = Query("SELECT ssn FROM users WHERE id = 1").encode()
    assert both.client_message(ord("Q"), msg) is msg


# -- the session: results ------------------------------------------------------------------


def test_result_values_are_masked_or_refused_by_envelope(protection: Protection) -> None:
    rw = Rewriter(lambda: protection, roles=frozenset({"agent", "support"}))
    email = _stored(protection, "email", "bob@example.org", "email")
    ssn = _stored(protection, "ssn", "078-05-1120")
    out = rw.backend_chunk(DataRow((b"1", email)).encode() + CommandComplete("SELECT 1").encode())
    row = _messages(out)[0]
    assert isinstance(row, DataRow) and row.values == (b"1", b"b***@example.org")
    # A view the planner cannot see: the ssn envelope decides, the rest is dropped.
    chunk = (
        DataRow((ssn,)).encode() + DataRow((ssn,)).encode() + CommandComplete("SELECT 2").encode()
        + ReadyForQuery("I").encode()
    )  # fmt: skip
    msgs = _messages(rw.backend_chunk(chunk))
    assert [type(m) for m in msgs] == [ErrorResponse, ReadyForQuery]
    assert isinstance(msgs[0], ErrorResponse) and msgs[0].code == "42501"
    assert b"078-05" not in rw.backend_chunk(chunk)


def test_max_pii_rows_counts_rows_with_stored_values_per_statement(protection: Protection) -> None:
    rw = Rewriter(lambda: protection, roles=frozenset({"app_rw"}))
    email = _stored(protection, "email", "carol@example.net", "email")
    three = b"".join(DataRow((email,)).encode() for _ in range(3))
    plain = b"".join(DataRow((b"x",)).encode() for _ in range(10))
    # Three per statement pass, twice in a row: the count restarts at CommandComplete.
    ok = three + plain + CommandComplete("SELECT 13").encode() + three + CommandComplete("SELECT 3").encode()
    assert [type(m) for m in _messages(rw.backend_chunk(ok))].count(DataRow) == 16
    # The fourth row of a statement fails it; the rest up to ReadyForQuery is dropped,
    # and the next statement starts from zero.
    rw.backend_chunk(DataRow((email,)).encode())  # rows may arrive in several chunks
    msgs = _messages(rw.backend_chunk(three + CommandComplete("SELECT 4").encode() + ReadyForQuery("I").encode()))
    assert [type(m) for m in msgs] == [DataRow, DataRow, ErrorResponse, ReadyForQuery]
    error = msgs[2]
    assert isinstance(error, ErrorResponse) and error.code == "54000"
    assert "max_pii_rows" in error.message
    assert [type(m) for m in _messages(rw.backend_chunk(three + ReadyForQuery("I").encode()))].count(DataRow) == 3


def test_max_pii_rows_applies_to_copy_out(protection: Protection) -> None:
    rw = Rewriter(lambda: protection, roles=frozenset({"app_rw"}))
    email = _stored(protection, "email", "dave@example.com", "email")
    rows = b"".join(CopyData(b"1\t" + email + b"\n").encode() for _ in range(5))
    msgs = _messages(rw.backend_chunk(rows + CommandComplete("COPY 5").encode() + ReadyForQuery("I").encode()))
    assert [type(m) for m in msgs] == [CopyData, CopyData, CopyData, ErrorResponse, ReadyForQuery]
    first = msgs[0]
    assert isinstance(first, CopyData) and first.data == b"1\tdave@example.com\n"


def test_no_limit_when_the_policy_sets_none() -> None:
    policy = parse_policy(POLICY.replace("max_pii_rows: 3", "max_pii_rows: null"))
    protection = Protection.build(policy, KEYRING)
    rw = Rewriter(lambda: protection, roles=frozenset({"app_rw"}))
    email = _stored(protection, "email", "erin@example.com", "email")
    chunk = b"".join(DataRow((email,)).encode() for _ in range(50)) + CommandComplete("SELECT 50").encode()
    assert [type(m) for m in _messages(rw.backend_chunk(chunk))].count(DataRow) == 50


# -- pgcloak explain --role ------------------------------------------------------------------


def _explain(tmp_path: Path, *argv: str) -> tuple[int, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["explain", *argv, "--policy", str(policy)])
    return code, out.getvalue()


def test_explain_shows_the_decisions_for_roles(tmp_path: Path) -> None:
    code, text = _explain(tmp_path, "SELECT email, ssn FROM users WHERE id = 1", "--role", "support")
    assert code == 1
    assert "public.users.email: mask" in text and "public.users.ssn: deny" in text
    assert "refused (SQLSTATE 42501)" in text
    code, text = _explain(tmp_path, "SELECT email, ssn FROM users WHERE id = 1", "--role", "support", "--role", "app_rw")
    assert code == 0 and "public.users.ssn: reveal" in text
    code, text = _explain(tmp_path, "SELECT email FROM users WHERE id = 1")
    assert code == 0 and "as " not in text  # no role asked: the plan only
    # A search by a denied column is refused too, as the session refuses it.
    code, text = _explain(tmp_path, "SELECT id FROM users WHERE email = 'x@example.com'", "--role", "outsider")
    assert code == 1 and "public.users.email may not be searched by" in text


def test_stored_values_inside_composites_are_refused_unless_revealed(protection: Protection) -> None:
    email = _stored(protection, "email", "fay@example.com", "email")
    ssn = _stored(protection, "ssn", "078-05-1120")
    record = b"(1," + email + b"," + ssn + b")"
    as_json = b'{"id":1,"email":"' + email + b'"}'
    support = protection.policy.read_view({"support"})
    with pytest.raises(ReadDenied) as denied:
        protection.reveal(record, support)
    assert "public.users.ssn" in denied.value.message and "inside" not in denied.value.message
    with pytest.raises(ReadDenied) as masked:
        protection.reveal(as_json, support)
    assert "public.users.email inside a row" in masked.value.message
    # A role that may read them in clear gets the composite as stored (not decrypted).
    assert protection.reveal(record, protection.policy.read_view({"app_rw"})) == record


def test_a_denied_column_cannot_be_searched_either(protection: Protection) -> None:
    """Else a lookup would tell a role denied the SSN whether someone has a given one."""
    policy = parse_policy(POLICY.replace("    ssn: {encrypt: true}", "    ssn: {encrypt: true, index: exact}"))
    indexed = Protection.build(policy, KEYRING)
    rw = Rewriter(lambda: indexed, roles=frozenset({"support"}))
    for msg in (
        Query("SELECT id FROM users WHERE ssn = '078-05-1120'"),
        Parse("", "DELETE FROM users WHERE ssn = $1", ()),
    ):
        sent = rw.client_message(ord("Q") if isinstance(msg, Query) else ord("P"), msg.encode())
        assert b"078-05" not in sent and b"pgcloak_refused_" in sent
        error = _refusal(rw, sent)
        assert error.code == "42501" and "nor search by it" in error.message
    # Masked columns can still be searched: the agent finds a customer by email.
    ok = Query("SELECT id FROM users WHERE email = 'x@example.com'").encode()
    assert b"pgcloak_refused_" not in rw.client_message(ord("Q"), ok)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT u FROM users u WHERE id = 1",
        "SELECT row_to_json(u) FROM users u WHERE id = 1",
        "SELECT users FROM users WHERE id = 1",
        "SELECT s FROM (SELECT email FROM users WHERE id = 1) s",
        "SELECT concat(u.*) FROM users u WHERE id = 1",
        "SELECT row_to_json(u.*) FROM users u WHERE id = 1",
    ],
)
def test_whole_row_references_to_encrypted_columns_are_refused(protection: Protection, sql: str) -> None:
    """Only a column's own value can be decrypted: a row as one value would come back encrypted."""
    plan = protection.planner.plan(sql)
    assert not plan.decision.allowed and plan.decision.sqlstate == "0A000"
    assert "whole-row reference" in plan.decision.message and "public.users.email" in plan.decision.message
    assert "public.users.email" in plan.audit.pii_read  # the trail says what it tried to read


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(u) FROM users u",
        "SELECT count(u.*) FROM users u",
        "SELECT u.* FROM users u WHERE id = 1",
        "SELECT id FROM users u WHERE u IS NOT NULL LIMIT 1",
        "SELECT u.name FROM users u WHERE id = 1",
        "SELECT x FROM generate_series(1, 3) x",
        "SELECT o FROM orders o",
    ],
)
def test_other_row_references_pass(protection: Protection, sql: str) -> None:
    assert protection.planner.plan(sql).decision.allowed


def test_a_prepared_lookup_on_a_denied_column_is_refused_at_prepare(protection: Protection) -> None:
    """PREPARE's own $n are the EXECUTE's: its lookups count, not only the outer text's."""
    rw = Rewriter(lambda: protection, roles=frozenset({"outsider"}))  # default_read: deny
    sent = rw.client_message(ord("Q"), Query("PREPARE p AS SELECT id, name FROM users WHERE email = $1").encode())
    error = _refusal(rw, sent)
    assert error.code == "42501" and "public.users.email" in error.message
    # so a Bind to it finds nothing to run
    assert b"pgcloak_refused_" in rw.client_message(ord("B"), Bind("", "p", (), (b"alice@example.com",), ()).encode())


def test_every_bind_is_checked_against_the_current_decisions() -> None:
    """A statement prepared while its column was readable is refused once a policy edit
    denies it; one prepared with SQL runs as EXECUTE, planned under the rules then."""
    before = Protection.build(parse_policy(POLICY), KEYRING)
    after = Protection.build(parse_policy(POLICY.replace("users.email: mask", "users.email: deny")), KEYRING)
    current = [before]
    rw = Rewriter(lambda: current[0], roles=frozenset({"support"}))
    rw.client_message(ord("Q"), Query("PREPARE p AS SELECT id FROM users WHERE email = $1").encode())
    rw.client_message(ord("P"), Parse("s", "SELECT email FROM users WHERE id = $1", ()).encode())
    execute_p = Query("EXECUTE p('alice@example.com')").encode()
    bind_s = Bind("", "s", (), (b"1",), ()).encode()
    assert b"pgcloak_refused_" not in rw.client_message(ord("Q"), execute_p)
    bound = Bind.decode(rw.client_message(ord("B"), bind_s)[5:])
    assert bound.statement.startswith("pgcloak_stmt_") and bound.params == (b"1",)  # the server's name for s
    current[0] = after
    for kind, message in ((ord("Q"), execute_p), (ord("B"), bind_s)):
        sent = rw.client_message(kind, message)
        assert b"pgcloak_refused_" in sent and b"alice@" not in sent


def test_a_copy_in_after_a_refused_result_is_ended_for_the_server(protection: Protection) -> None:
    """The client was told its batch failed and waits for ReadyForQuery; a later COPY
    FROM STDIN of the batch would leave the server waiting for data: pgcloak ends it."""
    rw = Rewriter(lambda: protection, roles=frozenset({"support"}))
    ssn = _stored(protection, "ssn", "078-05-1120")
    chunk = DataRow((ssn,)).encode() + CommandComplete("SELECT 1").encode() + b"G\x00\x00\x00\x07\x00\x00\x00"
    msgs = _messages(rw.backend_chunk(chunk))
    assert [type(m) for m in msgs] == [ErrorResponse]  # the CopyInResponse is not the client's business
    assert len(rw.to_server) == 1 and rw.to_server[0][:1] == b"f"  # CopyFail
    # The server's error for the failed COPY and its ReadyForQuery: only the latter passes.
    after = ErrorResponse.make("57014", "COPY from stdin failed").encode() + ReadyForQuery("I").encode()
    assert [type(m) for m in _messages(rw.backend_chunk(after))] == [ReadyForQuery]


def test_an_envelope_followed_by_more_text_is_decided_like_a_composite(protection: Protection) -> None:
    """The first envelope parses, the whole value does not decrypt: what is inside still counts."""
    email = _stored(protection, "email", "gil@example.com", "email")
    ssn = _stored(protection, "ssn", "078-05-1120")
    value = email + b"A" * 400 + b" " + ssn
    with pytest.raises(ReadDenied) as denied:
        protection.reveal(value, protection.policy.read_view({"support"}))
    assert "public.users.ssn" in denied.value.message


def test_validate_notes_a_policy_nobody_may_read(tmp_path: Path) -> None:
    """default_read: deny with no roles: is safe and almost always a forgotten roles: entry."""
    lonely = tmp_path / "lonely.yaml"
    lonely.write_text("version: 1\ntables:\n  users:\n    email: {}\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text(POLICY)
    for path, noted in ((lonely, True), (listed, False)):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["policy", "validate", str(path)]) == 0
        assert "OK" in out.getvalue()
        assert ("no role may read the protected columns" in err.getvalue()) is noted
