"""SessionAudit: statement events completed from the server's replies, in order.

Pure: real Rewriter and planner, real message bytes; the log is a recorder that keeps
what the session hands it (the AuditLog itself is tested with its sinks elsewhere).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pgcloak.audit.chain import Chain
from pgcloak.audit.events import InvalidEventError, SessionInfo
from pgcloak.audit.templates import Completed, StatementTemplate
from pgcloak.crypto.envelope import ENVELOPE_PREFIX
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey
from pgcloak.policy import parse_policy
from pgcloak.session import auditing
from pgcloak.session.auditing import (
    _SKIP_EXECUTE,
    _SKIP_QUERY,
    _SYNC,
    REPLY_ENDS,
    SessionAudit,
    _Slow,
    _Unit,
    _Watched,
)
from pgcloak.session.protection import Protection
from pgcloak.session.rewriter import Rewriter
from pgcloak.wire.framing import scan_marked
from pgcloak.wire.messages import (
    Bind,
    BindComplete,
    CommandComplete,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    Parse,
    ParseComplete,
    PortalSuspended,
    Query,
    ReadyForQuery,
    Sync,
)

POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
default_read: reveal
audit:
  statements: pii
"""
INFO = SessionInfo(session="1-1", user="app", database="db", application_name="t", client="127.0.0.1:1")
B, E, S, P, Q = ord("B"), ord("E"), ord("S"), ord("P"), ord("Q")


class Recorder:
    """Stands in for AuditLog: chains what it is given, so events are read back as JSON."""

    full = False
    healthy = True

    def __init__(self) -> None:
        self.chain = Chain(bytes(32), "c")
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))

    def emit_statement(self, completed: Completed) -> None:
        self.events.append(json.loads(self.chain.append_completed(completed).line))


@pytest.fixture
def session() -> tuple[Rewriter, SessionAudit, Recorder]:
    protection = Protection.build(parse_policy(POLICY), Keyring(MasterKey(bytes(range(32)))))
    recorder = Recorder()
    audit = SessionAudit(recorder, lambda: INFO, "pii")  # type: ignore[arg-type]
    return Rewriter(lambda: protection, audit), audit, recorder


def _send(rw: Rewriter, *messages: Any) -> None:
    for m in messages:
        data = m.encode()
        rw.client_message(data[0], data)


def _feed(audit: SessionAudit, chunk: bytes) -> None:
    """What the session does with a chunk of whole server messages."""
    end, marks, tail_rows = scan_marked(chunk, 1 << 30, REPLY_ENDS)
    assert end == len(chunk)
    audit.backend(chunk, marks, tail_rows)


def _reply(audit: SessionAudit, *messages: Any, split: bool = False) -> None:
    chunks = [m.encode() for m in messages]
    if split:  # one message per chunk, as a slow server might send them
        for c in chunks:
            _feed(audit, c)
    else:
        _feed(audit, b"".join(chunks))


def _prepare(rw: Rewriter, audit: SessionAudit, name: str, sql: str) -> None:
    _send(rw, Parse(name, sql))
    _reply(audit, ParseComplete())


LOOKUP = "SELECT id FROM users WHERE email = $1"
PLAIN = "SELECT 1 FROM other WHERE id = $1"
INSERT = "INSERT INTO users (email) VALUES ($1)"


@pytest.mark.parametrize("split", [False, True])
def test_pipeline_events_carry_rows_and_errors_in_order(
    session: tuple[Rewriter, SessionAudit, Recorder], split: bool
) -> None:
    rw, audit, rec = session
    _prepare(rw, audit, "look", LOOKUP)
    _prepare(rw, audit, "plain", PLAIN)
    _prepare(rw, audit, "ins", INSERT)
    # One batch: a lookup (2 rows), an unrecorded statement, an insert that fails, and
    # a lookup after it that the server skips (aborted until Sync): no event for it.
    _send(
        rw,
        Bind("", "look", (), (b"alice@example.com",), ()), Execute(""),
        Bind("", "plain", (), (b"7",), ()), Execute(""),
        Bind("", "ins", (), (b"bob@example.com",), ()), Execute(""),
        Bind("", "look", (), (b"carol@example.com",), ()), Execute(""),
        Sync(),
    )  # fmt: skip
    _reply(
        audit,
        BindComplete(), DataRow((b"1",)), DataRow((b"2",)), CommandComplete("SELECT 2"),
        BindComplete(), DataRow((b"1",)), CommandComplete("SELECT 1"),
        BindComplete(), ErrorResponse.make("23505", "duplicate"),
        ReadyForQuery("E"),
        split=split,
    )  # fmt: skip
    assert not audit.pending
    assert [(e["kind"], e["rows"], e["sqlstate"]) for e in rec.events] == [
        ("select", 2, None),
        ("insert", None, "23505"),
    ]
    lookup, failed = rec.events
    assert lookup["lookups"]["public.users.email"][0] != "alice@example.com"
    assert len(lookup["lookups"]["public.users.email"][0]) == 22
    assert failed["reason"] == "failed in PostgreSQL"
    assert all(e["duration_ms"] >= 0 for e in rec.events)
    assert "alice" not in json.dumps(rec.events) and "bob@" not in json.dumps(rec.events)


@pytest.mark.parametrize("split", [False, True])
def test_portal_suspended_counts_the_rows_sent(
    session: tuple[Rewriter, SessionAudit, Recorder], split: bool
) -> None:
    rw, audit, rec = session
    _prepare(rw, audit, "look", LOOKUP)
    _send(rw, Bind("cur", "look", (), (b"a@example.com",), ()), Execute("cur", 3), Execute("cur", 3), Sync())
    _reply(
        audit,
        BindComplete(), DataRow((b"1",)), DataRow((b"2",)), DataRow((b"3",)), PortalSuspended(),
        DataRow((b"4",)), CommandComplete("SELECT 1"), ReadyForQuery("T"),
        split=split,  # split: the rows arrive in chunks of their own, before the tag
    )  # fmt: skip
    assert [e["rows"] for e in rec.events] == [3, 1]


def test_simple_query_sums_its_statements_and_records_failures(
    session: tuple[Rewriter, SessionAudit, Recorder],
) -> None:
    rw, audit, rec = session
    _send(rw, Query("SELECT email FROM users WHERE id = 1; SELECT email FROM users WHERE id = 2"))
    _send(rw, Query("SELECT 1"))  # names no protected column: not recorded in "pii" mode
    _send(rw, Query("SELECT email FROM users WHERE id = 3"))
    _send(rw, Query(""))
    _reply(
        audit,
        DataRow((None,)), CommandComplete("SELECT 1"), DataRow((None,)), DataRow((None,)),
        CommandComplete("SELECT 2"), ReadyForQuery("I"),
        DataRow((b"1",)), CommandComplete("SELECT 1"), ReadyForQuery("I"),
        ErrorResponse.make("57014", "canceled"), ReadyForQuery("I"),
        EmptyQueryResponse(), ReadyForQuery("I"),
        split=True,
    )  # fmt: skip
    assert [(e["rows"], e["sqlstate"]) for e in rec.events] == [(3, None), (None, "57014")]
    assert not audit.pending


def _one_statement_batches(split: bool) -> tuple[list[tuple[object, ...]], SessionAudit]:
    protection = Protection.build(parse_policy(POLICY), Keyring(MasterKey(bytes(range(32)))))
    rec = Recorder()
    audit = SessionAudit(rec, lambda: INFO, "pii")  # type: ignore[arg-type]
    rw = Rewriter(lambda: protection, audit)
    # As the session wires them (Session._start_audit).
    audit.masked_of, audit.columns_of_keys = rw.masked_columns, rw.columns_of_keys
    audit.is_column_key = rw.is_column_key
    _prepare(rw, audit, "look", LOOKUP)
    _prepare(rw, audit, "plain", PLAIN)
    _prepare(rw, audit, "ins", INSERT)
    envelope = protection.transform(rw.statements["ins"].plan.params[0], "x@example.com")
    assert envelope is not None
    batches: list[tuple[list[Any], list[Any]]] = [
        ([Bind("", "look", (), (b"a@example.com",), ())], [BindComplete(), DataRow((b"1",)), CommandComplete("SELECT 1")]),
        ([Bind("", "plain", (), (b"7",), ())], [BindComplete(), DataRow((b"7",)), CommandComplete("SELECT 1")]),
        # A plain statement whose result holds a protected value (a view, a function).
        ([Bind("", "plain", (), (b"8",), ())], [BindComplete(), DataRow((envelope.encode(),)), CommandComplete("SELECT 1")]),
        ([Bind("", "ins", (), (b"b@example.com",), ())], [BindComplete(), CommandComplete("INSERT 0 1")]),
        ([Bind("", "ins", (), (b"b@example.com",), ())], [BindComplete(), ErrorResponse.make("23505", "duplicate")]),
        # The unnamed statement parsed in the batch (pgbench -M extended, most drivers).
        ([Parse("", LOOKUP), Bind("", "", (), (b"c@example.com",), ())],
         [ParseComplete(), BindComplete(), DataRow((b"3",)), DataRow((b"4",)), CommandComplete("SELECT 2")]),
        ([Parse("", PLAIN), Bind("", "", (), (b"9",), ())],
         [ParseComplete(), BindComplete(), DataRow((envelope.encode(),)), CommandComplete("SELECT 1")]),
        ([Parse("", PLAIN), Bind("", "", (), (b"9",), ())], [ParseComplete(), BindComplete(), CommandComplete("SELECT 0")]),
        ([Query("SELECT email FROM users WHERE id = 3")], [DataRow((None,)), CommandComplete("SELECT 1")]),
        ([Query("SELECT 1")], [DataRow((b"1",)), CommandComplete("SELECT 1")]),
        ([Query("SELECT email FROM users WHERE id = 4")], [ErrorResponse.make("57014", "canceled")]),
    ]
    for sent, replies in batches:
        extended = not isinstance(sent[0], Query)
        _send(rw, *sent, *((Execute(""), Sync()) if extended else ()))
        _reply(audit, *replies, ReadyForQuery("I"), split=split)
        assert not audit.pending
    return [(e["kind"], e["rows"], e["sqlstate"], e["columns_read"], e["fingerprint"]) for e in rec.events], audit


def test_a_whole_reply_in_one_chunk_is_recorded_as_one_walked_message_by_message() -> None:
    """The usual chunk (one statement's whole reply) takes a shortcut: the same events as
    when its messages arrive one by one, watched statements and failures included."""
    whole, _ = _one_statement_batches(split=False)
    walked, _ = _one_statement_batches(split=True)
    assert whole == walked
    assert [(kind, rows, sqlstate) for kind, rows, sqlstate, _, _ in whole] == [
        ("select", 1, None),
        ("select", 1, None),  # the plain statement that returned a protected value
        ("insert", 1, None),
        ("insert", None, "23505"),
        ("select", 2, None),
        ("select", 1, None),
        ("select", 1, None),
        ("select", None, "57014"),
    ]


def test_a_session_reuses_one_template_per_plan(session: tuple[Rewriter, SessionAudit, Recorder]) -> None:
    rw, audit, rec = session
    _prepare(rw, audit, "look", LOOKUP)
    for _ in range(3):
        _send(rw, Bind("", "look", (), (b"a@example.com",), ()), Execute(""), Sync())
        _reply(audit, BindComplete(), CommandComplete("SELECT 0"), ReadyForQuery("I"))
    assert len(audit._recipes) == 1
    assert len({e["id"] for e in rec.events}) == 3
    assert [e["seq"] for e in rec.events] == [1, 2, 3]


def test_lookups_that_are_not_blind_index_values_never_reach_the_trail(
    session: tuple[Rewriter, SessionAudit, Recorder],
) -> None:
    """The last line of defence: a lookup value shaped like PII (a bug upstream) is
    refused where the statement is chained, and the refusal does not quote it (the
    writer then logs it and counts it lost: test_audit_events)."""
    rw, audit, rec = session
    _prepare(rw, audit, "look", LOOKUP)
    plan = rw.statements["look"].plan
    audit.bind(b"", plan, {"public.users.email": ["alice@example.com"]})
    audit.execute(b"")
    audit.sync()
    with pytest.raises(InvalidEventError, match="lookups") as refused:
        _reply(audit, BindComplete(), CommandComplete("SELECT 0"), ReadyForQuery("I"))
    assert rec.events == [] and "alice" not in str(refused.value)




# -- the per-statement calls in C (pgcloak/session/_reply_core.c) against the Python ones --

QUEUED = [
    ("templated", True),
    ("templated", False),
    ("templated", False),
    ("watched", False),
    ("watched-seen", False),
    ("slow", False),
    ("skipped", False),
]
TEMPLATE = StatementTemplate(INFO, kind="select", fingerprint="SELECT 1")


def _twin_audits(head: str, simple: bool, rows: int | None, tail: str) -> tuple[SessionAudit, list[Completed]]:
    """A SessionAudit with one unit queued (and what follows it), and what it emits."""
    emitted: list[Completed] = []

    class Log:
        full, healthy = False, True

        def emit(self, event: dict[str, Any]) -> None:
            raise AssertionError("not on this path")

        def emit_statement(self, completed: Completed) -> None:
            emitted.append(completed)

    audit = SessionAudit(Log(), lambda: INFO, "pii")  # type: ignore[arg-type]
    recipe: Any = {
        "templated": TEMPLATE,
        "watched": _Watched(None),  # type: ignore[arg-type]
        "watched-seen": _Watched(None),  # type: ignore[arg-type]
        "slow": _Slow(None),  # type: ignore[arg-type]
        "skipped": None,
    }[head]
    unit = _Unit(recipe, {"public.users.email": ["x" * 22]}, simple)
    unit.started = 12.5
    unit.rows = rows
    if head == "watched-seen":
        unit.keys = {"public.users.email"}
    audit._units.append(unit)
    for extra in tail:
        audit._units.append({"S": _SYNC, "Q": _SKIP_QUERY, "E": _SKIP_EXECUTE}[extra])
    return audit, emitted


REPLY_MESSAGES: dict[str, Any] = {
    "parsed": ParseComplete(),
    "bound": BindComplete(),
    "row": DataRow((b"1",)),
    "envelope-row": DataRow((ENVELOPE_PREFIX + b"abc",)),
    "ready": ReadyForQuery("I"),
    "error": ErrorResponse((("S", "ERROR"), ("C", "23505"), ("M", "x"))),
    "empty": EmptyQueryResponse(),
    "suspended": PortalSuspended(),
}
usual_reply = st.tuples(
    st.sampled_from([[], ["parsed"], ["bound"], ["parsed", "bound"], ["error"]]),
    st.lists(st.sampled_from(["row", "envelope-row"]), max_size=2),
    st.sampled_from(
        [["complete", "ready"]] * 4
        + [["complete"], ["error", "ready"], ["empty", "ready"], ["suspended", "ready"], ["complete", "complete", "ready"]]
    ),
).map(lambda t: t[0] + t[1] + t[2])


@settings(max_examples=500, deadline=None)
@given(
    queued=st.sampled_from(QUEUED),
    rows=st.sampled_from([None, None, 2]),
    tail=st.sampled_from(["usual"] * 6 + ["", "S", "SS", "E", "Q", "ES"]),  # usual: "S" after an Execute
    replies=usual_reply,
    tag=st.sampled_from(["SELECT 3", "INSERT 0 1", "SELECT", "UPDATE 99999999999999999999999", "", "SELECT x1", "COPY 5", "SELECT ٣"]),
    tail_rows=st.integers(0, 3),
)
def test_the_usual_reply_in_c_decides_and_emits_what_python_does(
    queued: tuple[str, bool], rows: int | None, tail: str, replies: list[str], tag: str, tail_rows: int
) -> None:
    assert auditing._one_reply is not SessionAudit._one_reply, "the C reply is not built"
    messages = REPLY_MESSAGES | {"complete": CommandComplete(tag)}
    chunk = b"".join(messages[r].encode() for r in replies)
    _, marks, _rows = scan_marked(chunk, 1 << 30, REPLY_ENDS | frozenset(b"13G"))
    assume(2 <= len(marks) <= 3)  # backend() asks the fast path only then
    head, simple = queued
    if tail == "usual":
        tail = "" if simple else "S"
    c_audit, c_emitted = _twin_audits(head, simple, rows, tail)
    py_audit, py_emitted = _twin_audits(head, simple, rows, tail)
    done = auditing._one_reply(c_audit, chunk, marks, tail_rows)
    assert done == py_audit._one_reply(chunk, marks, tail_rows)
    assert (c_audit._returned, len(c_audit._units)) == (py_audit._returned, len(py_audit._units))
    assert len(c_emitted) == len(py_emitted) == (1 if done and head == "templated" else 0)
    for got, want in zip(c_emitted, py_emitted, strict=True):
        # (template, lookups, started, ended, wall, rows, sqlstate): the clocks are read again
        assert got[0] is want[0] is TEMPLATE and (got[1], got[2], got[5], got[6]) == (want[1], want[2], want[5], want[6])
        assert got[3] >= got[2] and abs(got[4] - want[4]) < 10**9 and type(got[5]) is type(want[5])


@pytest.mark.parametrize("parsed", [False, True])
@pytest.mark.parametrize("simple", [False, True])
def test_the_usual_reply_is_taken_in_c(parsed: bool, simple: bool) -> None:
    chunk = (ParseComplete().encode() if parsed else b"") + CommandComplete("SELECT 7").encode() + ReadyForQuery("I").encode()
    _, marks, _rows = scan_marked(chunk, 1 << 30, REPLY_ENDS | frozenset(b"13G"))
    audit, emitted = _twin_audits("templated", simple, None, "" if simple else "S")
    assert auditing._one_reply(audit, chunk, marks, 2) is True
    assert not audit.pending and audit._returned == 2
    ((template, lookups, started, ended, _wall, rows, sqlstate),) = emitted
    assert (template, lookups, started, rows, sqlstate) == (TEMPLATE, {"public.users.email": ["x" * 22]}, 12.5, 7, None)
    assert ended > started


bind_step = st.tuples(
    st.just("bind"),
    st.sampled_from([b"", b"p1", b"p2"]),
    st.sampled_from(["lookup", "plain", None]),
    st.sampled_from([{}, {"public.users.email": ["x" * 22]}]),
    st.sampled_from([None, "SELECT 1"]),
)
other_step = st.tuples(st.sampled_from(["execute", "close"]), st.sampled_from([b"", b"p1", b"p2", b"p3"]))
#: Execute messages as the session hands them over whole, and malformed ones (no NUL
#: after the name, nothing after the header) read as Python's slicing reads them.
message_step = st.tuples(
    st.just("execute_message"),
    st.sampled_from(
        [b"E\0\0\0\x09\0\0\0\0\0", b"E\0\0\0\x0bp1\0\0\0\0\0", b"E\0\0\0\x0bp2\0\0\0\0\x05", b"E\0\0\0\x07p1",
         b"E\0\0\0\x04", b"E\0\0\0\x05\0", b"E\0\0\0\x0ap3\0\0\0\0"]
    ),
)
query_step = st.tuples(
    st.just("query"),
    st.sampled_from(["lookup", "plain", None]),
    st.sampled_from([{}, {"public.users.email": ["x" * 22]}]),
    st.sampled_from([None, "SELECT 1"]),
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(bind_step | other_step | query_step | message_step, max_size=12), max_portals=st.sampled_from([2, 10_000]))
def test_bind_execute_and_query_in_c_keep_what_python_keeps(steps: list[tuple[Any, ...]], max_portals: int) -> None:
    assert SessionAudit.bind is not SessionAudit._bind_py and SessionAudit.execute is not SessionAudit._execute_py
    protection = Protection.build(parse_policy(POLICY), Keyring(MasterKey(bytes(range(32)))))
    plans = {"lookup": protection.planner.plan(LOOKUP), "plain": protection.planner.plan(PLAIN), None: None}
    twins = [SessionAudit(Recorder(), lambda: INFO, "pii") for _ in range(2)]  # type: ignore[arg-type]
    limit = auditing._MAX_PORTALS
    with pytest.MonkeyPatch.context() as m:
        m.setattr(auditing, "_MAX_PORTALS", max_portals)
        auditing._reply_core.configure(
            StatementTemplate, _Watched, _SYNC, ENVELOPE_PREFIX, auditing.monotonic, auditing.time_ns,
            _Unit, _SKIP_EXECUTE, max_portals, _SKIP_QUERY,
        )  # fmt: skip
        try:
            for audit, bind, execute, query, message in (
                (twins[0], SessionAudit.bind, SessionAudit.execute, SessionAudit.query, SessionAudit.execute_message),
                (
                    twins[1],
                    SessionAudit._bind_py,
                    SessionAudit._execute_py,
                    SessionAudit._query_py,
                    lambda a, msg: SessionAudit._execute_py(a, msg[5 : msg.find(b"\0", 5)]),
                ),
            ):
                for step in steps:
                    if step[0] == "bind":
                        bind(audit, step[1], plans[step[2]], step[3], step[4])
                    elif step[0] == "execute":
                        execute(audit, step[1])
                    elif step[0] == "execute_message":
                        message(audit, step[1])
                    elif step[0] == "query":
                        query(audit, plans[step[1]], step[2], step[3])
                    else:
                        audit.close_portal(step[1])
        finally:
            auditing._reply_core.configure(
                StatementTemplate, _Watched, _SYNC, ENVELOPE_PREFIX, auditing.monotonic, auditing.time_ns,
                _Unit, _SKIP_EXECUTE, limit, _SKIP_QUERY,
            )  # fmt: skip
    c, py = twins

    def portals(audit: SessionAudit) -> list[Any]:
        return [(k, type(v[0]).__name__, v[1], v[2], v[3]) for k, v in audit._portals.items()]

    def units(audit: SessionAudit) -> list[Any]:
        return [
            u if u in (_SKIP_EXECUTE, _SKIP_QUERY) else (type(u.recipe).__name__, u.lookups, u.simple, u.plan, u.text, u.keys, u.rows, u.sqlstate)
            for u in audit._units
        ]

    assert portals(c) == portals(py) and units(c) == units(py) and c.statements == py.statements
    assert all(type(u) is _Unit and type(u.started) is float for u in c._units if u not in (_SKIP_EXECUTE, _SKIP_QUERY))
    assert SessionAudit.query is not SessionAudit._query_py
    assert SessionAudit.execute_message is not SessionAudit._execute_message_py


def test_reply_completes_the_usual_reply_and_hands_anything_else_to_backend(
    session: tuple[Rewriter, SessionAudit, Recorder],
) -> None:
    """SessionAudit.reply is what the session calls when nothing was cut short: the usual
    whole reply in one step, a split one (here: the rows, then the rest) by the walk."""
    rw, audit, rec = session
    _prepare(rw, audit, "look", LOOKUP)
    for split in (False, True):
        _send(rw, Bind("", "look", (), (b"a@example.com",), ()), Execute(""), Sync())
        chunks = [BindComplete().encode() + DataRow((b"1",)).encode(), CommandComplete("SELECT 1").encode() + ReadyForQuery("I").encode()]
        for chunk in chunks if split else [b"".join(chunks)]:
            end, marks, tail_rows = scan_marked(chunk, 1 << 30, REPLY_ENDS)
            assert end == len(chunk)
            audit.reply(chunk, marks, tail_rows)
    assert not audit.pending
    assert [(e["kind"], e["rows"]) for e in rec.events] == [("select", 1), ("select", 1)]


def test_units_nested_deep_are_freed_without_recursion() -> None:
    """Unit's dealloc uses the trashcan (found by review: a deep chain overflowed the stack)."""
    base: Any = _Unit.__mro__[1]
    for make in (lambda: _Unit(None, None, True), base):
        head = make()
        for _ in range(200_000):
            outer = make()
            outer.recipe, head = head, outer
        del head, outer


# -- SessionAudit's state in C (_reply_core.Core) -------------------------------------------


def test_the_session_calls_are_the_c_methods_of_its_state() -> None:
    """The session calls reply/bind/execute/sync as methods of Core, whose struct holds the
    state they change; Python code reads and sets the same fields by name."""
    assert auditing._reply_core is not None, "the C calls are not built"
    core = auditing._reply_core.Core
    assert SessionAudit.__mro__[1] is core
    for name in ("reply", "bind", "execute", "sync", "query"):
        assert getattr(SessionAudit, name) is core.__dict__[name], name
    audit = SessionAudit(Recorder(), lambda: INFO, "pii")  # type: ignore[arg-type]
    assert audit.pending is audit._units
    with pytest.raises(AttributeError):
        audit.pending = type(audit._units)()  # type: ignore[misc]
    audit._returned, audit.statements = 7, 3
    audit.execute(b"nobody")
    audit.sync()
    assert (audit._returned, audit.statements, list(audit._units)) == (7, 4, [_SKIP_EXECUTE, _SYNC])


def test_a_replaced_queue_gets_the_calls_that_follow() -> None:
    """The C calls keep the queue's bound append and clear: a queue set later is used at once."""
    rw_audit = SessionAudit(Recorder(), lambda: INFO, "pii")  # type: ignore[arg-type]
    first = rw_audit._units
    rw_audit.sync()
    second: Any = type(first)()
    rw_audit._units = second
    rw_audit.execute(b"")
    rw_audit.sync()
    assert list(first) == [_SYNC] and list(second) == [_SKIP_EXECUTE, _SYNC]
    chunk = CommandComplete("SELECT 1").encode() + ReadyForQuery("I").encode()
    _, marks, tail_rows = scan_marked(chunk, 1 << 30, REPLY_ENDS)
    rw_audit.reply(chunk, marks, tail_rows)
    assert not second and list(first) == [_SYNC]


def test_state_never_set_raises_as_python_does() -> None:
    core: Any = auditing._reply_core.Core()
    with pytest.raises(AttributeError, match="_units"):
        core.sync()
    with pytest.raises(AttributeError, match="_portals"):
        core.execute(b"")
    with pytest.raises(AttributeError, match="_portals"):
        core.bind(b"", None, {})
    with pytest.raises(TypeError, match="SessionAudit"):
        auditing._reply_core.one_reply(object(), b"", [], 0)


def test_a_session_audit_in_a_cycle_is_collected() -> None:
    """Core takes part in garbage collection: a session's audit in a cycle is freed."""
    import gc
    import weakref

    audit = SessionAudit(Recorder(), lambda: INFO, "pii")  # type: ignore[arg-type]
    audit._portals[b"p"] = (TEMPLATE, None, None, audit)  # type: ignore[assignment]  # a cycle through C state
    audit._units.append(audit)  # type: ignore[arg-type]
    gone = weakref.ref(audit)
    del audit
    gc.collect()
    assert gone() is None


def test_cores_chained_deep_are_freed_without_recursion() -> None:
    """Core's dealloc uses the trashcan too (found by review: 300,000 bare cores chained
    through ``log`` overflowed the stack)."""
    core: Any = auditing._reply_core.Core
    head = core()
    for _ in range(300_000):
        outer = core()
        outer.log, head = head, outer
    del head, outer


def test_bind_stores_where_python_does_when_making_a_recipe_replaces_the_portals() -> None:
    """The recipe is made before the portals are read, as in Python (found by review: C
    stored the binding in the dict ``_new_recipe`` had just replaced)."""

    class Replacing(SessionAudit):
        def _new_recipe(self, plan: Any) -> Any:
            self._portals = {}
            return _Slow(plan)

    plan: Any = object()
    for bind in (SessionAudit.bind, SessionAudit._bind_py):
        audit = Replacing(Recorder(), lambda: INFO, "pii")  # type: ignore[arg-type]
        bind(audit, b"p", plan, {})
        assert list(audit._portals) == [b"p"], bind


def test_a_queue_of_another_type_is_called_as_python_calls_it() -> None:
    """Only a plain deque's methods are kept between calls: a subclass's are looked up
    each time (found by review: a patched append was ignored)."""
    seen: list[Any] = []

    class Watched(deque):  # type: ignore[type-arg]
        pass

    for sync in (SessionAudit.sync, SessionAudit._sync_py):
        audit = SessionAudit(Recorder(), lambda: INFO, "pii")  # type: ignore[arg-type]
        audit._units = Watched()
        sync(audit)
        audit._units.append = seen.append  # type: ignore[method-assign]
        sync(audit)
    assert seen == [_SYNC, _SYNC]
