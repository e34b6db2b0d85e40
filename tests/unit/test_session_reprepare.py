"""Statements prepared again under new rules, and hiding the replies to pgcloak's own
Parse and Close (pure parts: the rewriter's messages and the reply bookkeeping)."""

from __future__ import annotations

from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key
from pgcloak.policy import parse_policy
from pgcloak.session.protection import Protection
from pgcloak.session.reprepare import INTERNAL_PREFIX, STATEMENT_PREFIX, Acks, cut
from pgcloak.session.rewriter import Rewriter
from pgcloak.session.search_path import SessionSearchPath
from pgcloak.wire.framing import iter_messages, scan_marked
from pgcloak.wire.messages import Bind, Close, Parse, Query, Sync

POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
default_read: reveal
guards: {unbounded_select: allow}
"""
LOOKUP = "SELECT id FROM users WHERE phone = $1"
P, B, C, S = ord("P"), ord("B"), ord("C"), ord("S")
Z_IDLE = b"Z\x00\x00\x00\x05I"
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = b"1\x00\x00\x00\x04", b"2\x00\x00\x00\x04", b"3\x00\x00\x00\x04"


def _messages(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(k), data[s:e]) for k, s, e in iter_messages(data)]


class _Session:
    """A rewriter whose rules can change, with the session's batch accounting."""

    def __init__(self) -> None:
        keyring = Keyring(generate_master_key())
        without_phone = POLICY.replace("    phone: {encrypt: true, index: exact, normalize: phone}\n", "")
        self.before = Protection.build(parse_policy(without_phone), keyring)
        self.after = Protection.build(parse_policy(POLICY), keyring)
        self.current = self.before
        self.path = SessionSearchPath("app", ("public",))
        self.rewriter = Rewriter(lambda: self.current, search_path=self.path)

    def send(self, kind: int, msg: bytes) -> list[tuple[str, bytes]]:
        return _messages(self.rewriter.client_message(kind, msg))

    def reply(self, data: bytes) -> bytes:
        """What the client gets of the server's ``data`` (as the session does it)."""
        _, marks, _ = scan_marked(data, 1 << 31, frozenset(b"CIsEZ13"))
        ours = self.rewriter.follow_acks(marks) if self.rewriter.acks.busy else []
        for kind, _pos, _end, _rows in marks:
            if kind == ord("Z"):
                self.path.ready(ord("I"))
        return cut(data, ours)


def test_a_stale_bind_is_sent_to_the_text_prepared_again() -> None:
    s = _Session()
    s.send(P, Parse("s1", LOOKUP, ()).encode())
    s.send(S, Sync().encode())
    assert s.reply(PARSE_COMPLETE + Z_IDLE) == PARSE_COMPLETE + Z_IDLE
    s.current = s.after  # phone is now compared on its blind index
    out = s.send(B, Bind("", "s1", (), (b"555 0100",), ()).encode())
    assert [k for k, _ in out] == ["P", "B"]
    parse = Parse.decode(out[0][1])
    assert parse.name.startswith(INTERNAL_PREFIX)
    assert parse.query != LOOKUP  # planned for the new rules
    bound = Bind.decode(out[1][1])
    assert bound.statement == parse.name
    assert bound.params[0] != b"555 0100"  # the value transformed for the new rules
    s.send(S, Sync().encode())
    # The server answers our Parse first: the client sees only its Bind's reply.
    assert s.reply(PARSE_COMPLETE + BIND_COMPLETE + Z_IDLE) == BIND_COMPLETE + Z_IDLE
    # Bound again under the same rules: no second Parse.
    again = s.send(B, Bind("", "s1", (), (b"555 0100",), ()).encode())
    assert [k for k, _ in again] == ["B"] and Bind.decode(again[0][1]).statement == parse.name
    s.send(S, Sync().encode())
    assert s.reply(BIND_COMPLETE + Z_IDLE) == BIND_COMPLETE + Z_IDLE
    # The client's Close closes ours too; only the client's CloseComplete is delivered.
    closed = s.send(C, Close("S", "s1").encode())
    names = [(k, Close.decode(b).name) for k, b in closed]
    assert [k for k, _ in names] == ["C", "C"] and names[0][1].startswith(STATEMENT_PREFIX) and names[1][1] == parse.name
    s.send(S, Sync().encode())
    assert s.reply(CLOSE_COMPLETE + CLOSE_COMPLETE + Z_IDLE) == CLOSE_COMPLETE + Z_IDLE
    assert not s.rewriter.acks.busy


def test_a_skipped_reprepare_is_made_again_at_the_next_bind() -> None:
    s = _Session()
    s.send(P, Parse("s1", LOOKUP, ()).encode())
    s.send(S, Sync().encode())
    s.reply(PARSE_COMPLETE + Z_IDLE)
    s.current = s.after
    first = s.send(B, Bind("", "s1", (), (b"555 0100",), ()).encode())
    s.send(S, Sync().encode())
    error = b"E\x00\x00\x00\x0cCXX000\x00\x00"
    # Our Parse failed (or was skipped): its error goes to the client, nothing is cut.
    assert s.reply(error + Z_IDLE) == error + Z_IDLE
    second = s.send(B, Bind("", "s1", (), (b"555 0100",), ()).encode())
    assert [k for k, _ in second] == ["P", "B"]
    assert Parse.decode(second[0][1]).name != Parse.decode(first[0][1]).name


def test_client_names_with_the_internal_prefix_are_refused() -> None:
    s = _Session()
    out = s.send(P, Parse(INTERNAL_PREFIX + "1", "SELECT 1", ()).encode())
    assert Parse.decode(out[0][1]).query.startswith("pgcloak_refused_")


def test_acks_are_matched_by_batch_and_order() -> None:
    acks = Acks()
    acks.sent(0)  # the client's Parse, batch 0
    acks.sent_ours(1, parse=True, client_name="s", internal="i1")
    acks.sent(1)  # the client's Parse after ours, batch 1
    data = PARSE_COMPLETE + Z_IDLE + PARSE_COMPLETE + PARSE_COMPLETE + Z_IDLE
    _, marks, _ = scan_marked(data, 1 << 31, frozenset(b"Z13"))
    cuts, failed = acks.replies(marks, 0)
    assert cuts == [(len(PARSE_COMPLETE + Z_IDLE), len(PARSE_COMPLETE + Z_IDLE) + 5)]
    assert failed == [] and not acks.busy
    assert cut(data, cuts) == PARSE_COMPLETE + Z_IDLE + PARSE_COMPLETE + Z_IDLE


def test_acks_of_a_failed_batch_are_dropped_at_its_ready() -> None:
    acks = Acks()
    acks.sent(3)
    acks.sent_ours(3, parse=True, client_name="s", internal="i1")
    acks.sent_ours(4, parse=False, client_name="", internal="i0")
    error = b"E\x00\x00\x00\x0cCXX000\x00\x00"
    data = error + Z_IDLE
    _, marks, _ = scan_marked(data, 1 << 31, frozenset(b"EZ13"))
    cuts, failed = acks.replies(marks, 3)
    assert cuts == [] and [getattr(f, "internal", None) for f in failed] == ["i1"]
    assert acks.busy  # batch 4's Close is still to be answered
    _, marks, _ = scan_marked(CLOSE_COMPLETE, 1 << 31, frozenset(b"Z13"))
    assert acks.replies(marks, 4) == ([(0, 5)], [])


# -- what a Bind runs is what pgcloak parsed under the name ---------------------------------
INSERT = "INSERT INTO users (email) VALUES ($1)"
ECHO = "SELECT $1::text"
ERROR = b"E\x00\x00\x00\x0cCXX000\x00\x00"


def _refused(out: list[tuple[str, bytes]]) -> bool:
    """pgcloak answered with its own error (a Bind to a marker statement)."""
    return [k for k, _ in out] == ["B"] and Bind.decode(out[0][1]).statement.startswith("pgcloak_refused_")


def _server_name(out: list[tuple[str, bytes]]) -> str:
    (kind, body), = out
    assert kind == "P"
    return Parse.decode(body).name


def test_a_named_statement_is_known_to_the_server_by_a_name_of_pgcloaks() -> None:
    """A Close or DEALLOCATE that failed may have left the name's old statement on the
    server, which would refuse a new Parse of it (42P05) and run the old one at each
    Bind: the server never sees the client's names, only names pgcloak never reuses."""
    s = _Session()
    server = _server_name(s.send(P, Parse("s1", ECHO, ()).encode()))
    assert server.startswith(STATEMENT_PREFIX)
    assert Bind.decode(s.send(B, Bind("", "s1", (), (b"x",), ()).encode())[0][1]).statement == server
    described = s.send(ord("D"), b"D\x00\x00\x00\x08Ss1\x00")
    assert described == [("D", b"S" + server.encode() + b"\x00")]
    assert s.send(ord("D"), b"D\x00\x00\x00\x06P\x00") == [("D", b"P\x00")]  # a portal: as it came
    assert [k for k, _ in s.send(P, Parse("", ECHO, ()).encode())] == ["P"]  # the unnamed one stays unnamed
    s.send(S, Sync().encode())
    # The client's own replies, as they come: nothing of pgcloak's in between.
    assert s.reply(PARSE_COMPLETE * 2 + BIND_COMPLETE + Z_IDLE) == PARSE_COMPLETE * 2 + BIND_COMPLETE + Z_IDLE
    closed = s.send(C, Close("S", "s1").encode())
    assert [(k, Close.decode(b).name) for k, b in closed] == [("C", server)]
    again = _server_name(s.send(P, Parse("s1", INSERT, ()).encode()))
    assert again.startswith(STATEMENT_PREFIX) and again != server  # never the same name twice


def test_a_close_the_server_skipped_is_sent_again() -> None:
    s = _Session()
    server = _server_name(s.send(P, Parse("s1", ECHO, ()).encode()))
    s.send(S, Sync().encode())
    s.reply(PARSE_COMPLETE + Z_IDLE)
    s.send(B, Bind("", "no_such", (), (), ()).encode())
    s.send(C, Close("S", "s1").encode())
    s.send(S, Sync().encode())
    s.reply(ERROR + Z_IDLE)
    out = s.send(P, Parse("s2", ECHO, ()).encode())  # pgcloak's Close goes with the next Parse
    assert ("C", server) in [(k, Close.decode(b).name) for k, b in out if k == "C"]


def test_sql_deallocate_of_a_protocol_statement_names_the_servers_name() -> None:
    s = _Session()
    server = _server_name(s.send(P, Parse("s1", ECHO, ()).encode()))
    out = s.send(ord("Q"), Query("DEALLOCATE s1").encode())
    assert Query.decode(out[0][1]).sql == f"DEALLOCATE {server}"
    assert _refused(s.send(B, Bind("", "s1", (), (b"x",), ()).encode()))
    refused = s.send(ord("Q"), Query(f"DEALLOCATE {server}").encode())  # the client may not name it
    assert Query.decode(refused[0][1]).sql.startswith("pgcloak_refused_")


def test_a_name_whose_parse_is_unanswered_may_be_parsed_again() -> None:
    """Pipelined: the first Parse may have failed, which would leave the name free; the
    second is taken, and the first's server statement closed."""
    s = _Session()
    first = _server_name(s.send(P, Parse("s1", INSERT, ()).encode()))
    s.send(S, Sync().encode())
    out = s.send(P, Parse("s1", ECHO, ()).encode())
    second = Parse.decode(next(b for k, b in out if k == "P")).name
    assert second != first and ("C", first) in [(k, Close.decode(b).name) for k, b in out if k == "C"]
    assert Bind.decode(s.send(B, Bind("", "s1", (), (b"x",), ()).encode())[0][1]).statement == second


def test_extended_discard_all_keeps_its_own_statement() -> None:
    s = _Session()
    s.send(P, Parse("s1", ECHO, ()).encode())
    s.send(P, Parse("", "DISCARD ALL", ()).encode())
    assert [k for k, _ in s.send(B, Bind("", "", (), (), ()).encode())] == ["B"]
    assert _refused(s.send(B, Bind("", "s1", (), (b"x",), ()).encode()))


def test_an_unanswered_unnamed_parse_is_refused_while_the_batch_count_is_uncertain() -> None:
    s = _Session()
    s.send(P, Parse("", ECHO, ()).encode())
    s.send(S, Sync().encode())
    s.path.uncertain = True
    out = s.send(B, Bind("", "", (), (b"x",), ()).encode())
    assert _refused(out)


def test_a_refused_parse_is_sent_without_a_close() -> None:
    """pgcloak's refusal is a Parse the server fails; it must not close a statement the
    server holds under the name (pgcloak may not know of it)."""
    s = _Session()
    s.current = s.after
    refused = s.send(P, Parse("s2", "SELECT id FROM users ORDER BY phone", ()).encode())
    assert [k for k, _ in refused] == ["P"] and Parse.decode(refused[0][1]).query.startswith("pgcloak_refused_")


def test_a_name_parsed_again_is_refused_and_keeps_its_statement() -> None:
    """PostgreSQL refuses a name it holds (42P05) and keeps the first statement: so does
    pgcloak, and a Bind runs the first, planned as it was."""
    s = _Session()
    s.current = s.after
    s.send(P, Parse("s1", "INSERT INTO users (phone) VALUES ($1)", ()).encode())
    s.send(S, Sync().encode())
    s.reply(PARSE_COMPLETE + Z_IDLE)
    again = s.send(P, Parse("s1", "SELECT $1::text", ()).encode())
    assert [k for k, _ in again] == ["P"] and Parse.decode(again[0][1]).query.startswith("pgcloak_refused_")
    s.send(S, Sync().encode())
    s.reply(ERROR + Z_IDLE)
    bound = s.send(B, Bind("", "s1", (), (b"555 0100",), ()).encode())
    assert [k for k, _ in bound] == ["B"] and Bind.decode(bound[0][1]).params[0] != b"555 0100"


def test_a_parse_the_server_refused_is_forgotten() -> None:
    s = _Session()
    s.send(P, Parse("s1", INSERT, ()).encode())
    s.send(S, Sync().encode())
    assert s.reply(ERROR + Z_IDLE) == ERROR + Z_IDLE
    assert _refused(s.send(B, Bind("", "s1", (), (b"a@example.com",), ()).encode()))


def test_a_parse_skipped_after_an_error_is_forgotten() -> None:
    """Skipped: the server kept the unnamed statement before it (an INSERT here), which a
    later Bind planned for the skipped text would run with its values as they came."""
    s = _Session()
    s.send(P, Parse("", INSERT, ()).encode())
    s.send(S, Sync().encode())
    s.reply(PARSE_COMPLETE + Z_IDLE)
    s.send(B, Bind("", "no_such", (), (), ()).encode())
    s.send(P, Parse("", ECHO, ()).encode())
    s.send(S, Sync().encode())
    s.reply(ERROR + Z_IDLE)
    assert _refused(s.send(B, Bind("", "", (), (b"a@example.com",), ()).encode()))


def test_an_unnamed_statement_bound_in_a_later_batch_is_parsed_again_first() -> None:
    """Had the server skipped its Parse, the unnamed statement before it would run the
    Bind: the text goes again, in the Bind's batch, whether or not pgcloak saw an answer
    (replies are matched by position: never what decides what a Bind runs)."""
    s = _Session()
    s.send(P, Parse("", ECHO, ()).encode())
    s.send(S, Sync().encode())
    out = s.send(B, Bind("", "", (), (b"a@example.com",), ()).encode())
    assert [k for k, _ in out] == ["P", "B"]
    again = Parse.decode(out[0][1])
    assert again.name == "" and again.query == ECHO and Bind.decode(out[1][1]).statement == ""
    # A second Bind in the same batch needs nothing more.
    assert [k for k, _ in s.send(B, Bind("", "", (), (b"a@example.com",), ()).encode())] == ["B"]
    s.send(S, Sync().encode())
    assert s.reply(PARSE_COMPLETE + Z_IDLE + PARSE_COMPLETE + BIND_COMPLETE * 2 + Z_IDLE) == (
        PARSE_COMPLETE + Z_IDLE + BIND_COMPLETE * 2 + Z_IDLE
    )
    # Answered, and bound in a later batch again: parsed again all the same.
    assert [k for k, _ in s.send(B, Bind("", "", (), (b"a@example.com",), ()).encode())] == ["P", "B"]
    # In the same batch as its Parse: bound as it is.
    s.send(S, Sync().encode())
    s.send(P, Parse("", ECHO, ()).encode())
    assert [k for k, _ in s.send(B, Bind("", "", (), (b"a@example.com",), ()).encode())] == ["B"]


def test_the_unnamed_statement_parsed_again_keeps_its_transformed_literals() -> None:
    s = _Session()
    s.current = s.after
    s.send(P, Parse("", "SELECT id FROM users WHERE phone = '555 0100' AND id = $1", ()).encode())
    s.send(S, Sync().encode())
    out = s.send(B, Bind("", "", (), (b"1",), ()).encode())
    query = Parse.decode(out[0][1]).query
    assert "555 0100" not in query and "phone" in query


def test_discard_all_forgets_every_statement() -> None:
    s = _Session()
    s.send(ord("Q"), Query("PREPARE p(text) AS SELECT $1").encode())
    s.send(P, Parse("s1", ECHO, ()).encode())
    s.send(ord("Q"), Query("DISCARD ALL").encode())
    executed = s.send(ord("Q"), Query("EXECUTE p('x')").encode())
    assert Query.decode(executed[0][1]).sql.startswith("pgcloak_refused_")  # 26000, as PostgreSQL says
    assert _refused(s.send(B, Bind("", "s1", (), (b"x",), ()).encode()))
    assert _server_name(s.send(P, Parse("p", ECHO, ()).encode())).startswith(STATEMENT_PREFIX)  # free again


def test_pgcloaks_statement_names_cannot_be_guessed() -> None:
    """A function could PREPARE the next name first: its Parse would then fail (42P05) and
    a Bind run the function's statement."""
    from pgcloak.session.reprepare import internal_name, statement_name

    for make, prefix in ((internal_name, INTERNAL_PREFIX), (statement_name, STATEMENT_PREFIX)):
        a, b = make(), make()
        assert a.startswith(prefix) and b.startswith(prefix)
        suffixes = {a.rsplit("_", 1)[1], b.rsplit("_", 1)[1]}
        assert len(suffixes) == 2 and all(len(x) == 12 for x in suffixes)
