"""Templated statement events: byte for byte what the builder + Chain.append would write."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcloak.audit.chain import GENESIS, Chain, ChainedRecord, canonical, mac_ok
from pgcloak.audit.events import InvalidEventError, SessionInfo, format_ns, statement_event
from pgcloak.audit.templates import FAILED_REASON, PendingStatement, StatementTemplate
from pgcloak.audit.verify import verify

KEY = bytes(range(32))
TS = "2026-11-27T12:00:00.123456Z"
INFO = SessionInfo(session="7-1", user="app", database="shop", application_name="api", client="10.0.0.7:5100")
INDEX = "mV3cX0pQyqJ8rM2tTq9oXw"

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
key_id = st.sampled_from(["public.users.email", "public.users.phone", 'app."Weird %s".col'])


def _expected(info: SessionInfo, pending: PendingStatement, facts: dict[str, object]) -> dict[str, object]:
    """What statement_event builds for the same values."""
    failed = pending.sqlstate is not None
    event = statement_event(
        info,
        **facts,  # type: ignore[arg-type]
        lookups=pending.lookups,
        rows=pending.rows,
        reason=FAILED_REASON if failed else None,
        sqlstate=pending.sqlstate,
        duration_ms=pending.duration_ms,
    )
    return dict(event)


@settings(max_examples=300, deadline=None)
@given(
    session=text.filter(bool),
    user=st.none() | text,
    app=st.none() | text,
    client=st.none() | text,
    worker=st.none() | st.integers(0, 64),
    kind=st.sampled_from(["select", "insert", "update", "select_insert", "copy"]),
    fingerprint=text,
    read=st.lists(key_id, max_size=3),
    written=st.lists(key_id, max_size=2),
    masked=st.lists(key_id, max_size=2),
    tables=st.lists(st.sampled_from(["public.users", "a.b%c", 'x."y{}"']), max_size=2),
    rows=st.none() | st.integers(0, 10**12),
    sqlstate=st.none() | st.sampled_from(["23505", "XX000", "40P01"]),
    duration=st.none() | st.floats(0, 1e9),
    looked=st.dictionaries(
        key_id, st.lists(st.from_regex(r"\A[A-Za-z0-9_-]{16,40}\Z"), min_size=1, max_size=3), max_size=2
    ),
)
def test_render_is_the_canonical_record(
    session: str,
    user: str | None,
    app: str | None,
    client: str | None,
    worker: int | None,
    kind: str,
    fingerprint: str,
    read: list[str],
    written: list[str],
    masked: list[str],
    tables: list[str],
    rows: int | None,
    sqlstate: str | None,
    duration: float | None,
    looked: dict[str, list[str]],
) -> None:
    info = SessionInfo(session=session, user=user, database="db", application_name=app, client=client, worker=worker)
    facts: dict[str, object] = {
        "kind": kind,
        "fingerprint": fingerprint,
        "tables": tables,
        "columns_read": read,
        "columns_written": written,
        "masked": masked,
    }
    template = StatementTemplate(info, **facts)  # type: ignore[arg-type]
    pending = PendingStatement(template, TS, duration, rows, sqlstate, looked)
    chain = Chain(KEY, "w0-test-%s")
    first = chain.append_pending(pending)
    second = chain.append_pending(pending)

    for seq, record, prev in ((1, first, GENESIS), (2, second, first.mac)):
        parsed = json.loads(record.line)
        body = {k: v for k, v in parsed.items() if k != "mac"}
        # The line is the canonical serialization with the mac appended, as Chain.append writes.
        assert record.line == canonical(body).decode()[:-1] + f',"mac":"{parsed["mac"]}"}}'
        assert mac_ok(KEY, parsed)
        assert (parsed["seq"], parsed["prev"], parsed["chain"]) == (seq, prev, "w0-test-%s")
        assert (record.seq, record.mac, record.ts, record.type) == (seq, parsed["mac"], TS, "statement")
        expected = _expected(info, pending, facts)
        expected.update(id=parsed["id"], ts=TS)
        assert body == {**expected, "seq": seq, "chain": "w0-test-%s", "prev": prev}
    assert json.loads(first.line)["id"] != json.loads(second.line)["id"]


def test_a_templated_trail_verifies_and_an_edit_is_caught(tmp_path: object) -> None:
    template = StatementTemplate(INFO, kind="select", fingerprint="SELECT email FROM users WHERE id = $1",
                                 tables=["public.users"], columns_read=["public.users.email"])  # fmt: skip
    chain = Chain(KEY, "w0-c")
    lines = [chain.append_pending(PendingStatement(template, TS, 0.5, n, None, None)).line for n in range(5)]
    lines.append(chain.seal("shutdown").line)
    assert verify([("trail", lines)], KEY).ok  # type: ignore[arg-type]
    lines[2] = lines[2].replace('"rows":2', '"rows":3')
    report = verify([("trail", lines)], KEY)  # type: ignore[arg-type]
    assert not report.ok


@pytest.mark.parametrize(
    ("field", "args"),
    [
        ("rows", (0.5, -1, None, None)),
        ("sqlstate", (0.5, 1, "not-a-state", None)),
        ("duration_ms", (float("nan"), 1, None, None)),
        ("duration_ms", (-1.0, 1, None, None)),
        ("lookups", (0.5, 1, None, {"public.users.email": ["alice@example.com"]})),
        ("lookups", (0.5, 1, None, {"not a key id": [INDEX]})),
    ],
)
def test_pending_values_are_checked(field: str, args: tuple[object, ...]) -> None:
    template = StatementTemplate(INFO, kind="select", fingerprint="SELECT 1")
    with pytest.raises(InvalidEventError, match=field):
        PendingStatement(template, TS, *args)  # type: ignore[arg-type]


def test_a_failed_statement_records_no_rows() -> None:
    template = StatementTemplate(INFO, kind="insert", fingerprint="INSERT INTO users VALUES ($1)")
    record = Chain(KEY, "c").append_pending(PendingStatement(template, TS, 1.0, 5, "23505", None)).record
    assert (record["rows"], record["sqlstate"], record["reason"]) == (None, "23505", FAILED_REASON)


def test_template_refuses_what_the_builder_refuses() -> None:
    with pytest.raises(InvalidEventError, match="kind"):
        StatementTemplate(INFO, kind="Select; DROP", fingerprint="x")
    with pytest.raises(InvalidEventError, match="columns_read"):
        StatementTemplate(INFO, kind="select", fingerprint="x", columns_read=["no dots here"])


def test_a_static_value_shaped_like_a_slot_is_kept() -> None:
    # Slots are found with their quotes, which an encoded string value cannot contain.
    odd = 'SELECT \'\x003\x00\', "\x004\x00"'
    template = StatementTemplate(INFO, kind="select", fingerprint=odd)
    record = Chain(KEY, "c").append_pending(PendingStatement(template, TS, None, 2, None, None)).record
    assert (record["fingerprint"], record["rows"]) == (odd, 2)


def test_percent_and_braces_in_static_fields_survive() -> None:
    odd = "SELECT '%s %% {0} {}' FROM t"
    template = StatementTemplate(INFO, kind="select", fingerprint=odd, tables=[string.punctuation])
    record = Chain(KEY, "c").append_pending(PendingStatement(template, TS, None, None, None, None)).record
    assert (record["fingerprint"], record["tables"]) == (odd, [string.punctuation])


@pytest.mark.parametrize("key", [bytes(range(16)), bytes(range(64)), bytes(range(80))])
def test_the_chain_mac_is_hmac_sha256_for_any_key_length(key: bytes) -> None:
    # Keys over the 64-byte block are hashed first (RFC 2104), as hmac.new does.
    template = StatementTemplate(INFO, kind="select", fingerprint="SELECT 1")
    chain = Chain(key, "c")
    for record in (
        chain.append_pending(PendingStatement(template, TS, 1.0, 1, None, None)),
        chain.seal("shutdown"),
    ):
        assert mac_ok(key, json.loads(record.line))
        assert not mac_ok(bytes(32), json.loads(record.line))


completed_values = st.tuples(
    st.none() | st.integers(0, 10**12),  # rows
    st.none() | st.sampled_from(["23505", "XX000", "40P01"]),  # sqlstate
    st.floats(0, 1e6),  # seconds the statement ran
    st.integers(0, 4 * 10**18),  # time_ns() when it ended
    st.dictionaries(
        key_id, st.lists(st.from_regex(r"\A[A-Za-z0-9_-]{16,40}\Z"), min_size=1, max_size=3), max_size=2
    ),
)


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(completed_values, min_size=1, max_size=8), fingerprint=text)
def test_a_batch_of_completed_statements_is_what_pending_statements_render(
    batch: list[tuple[int | None, str | None, float, int, dict[str, list[str]]]], fingerprint: str
) -> None:
    """Chain.append_completed_many fills the template inline (the writer's hot loop): the
    same records, field for field, as the checked PendingStatement path renders, each
    MAC valid, the seqs consecutive and the trail verifiable."""
    template = StatementTemplate(INFO, kind="select", fingerprint=fingerprint, columns_read=["public.users.email"])
    inline, reference = Chain(KEY, "w0-a"), Chain(KEY, "w0-a")
    out: list[ChainedRecord] = []
    items = [(template, looked or None, 10.0, 10.0 + ran, wall, rows, state) for rows, state, ran, wall, looked in batch]
    assert inline.append_completed_many(items, out) == []
    assert len(out) == len(batch) and inline.next_seq == len(batch) + 1 and inline.since_seal == len(batch)
    for record, (rows, state, ran, wall, looked) in zip(out, batch, strict=True):
        ts = format_ns(wall)
        ms = (10.0 + ran - 10.0) * 1000.0  # as the writer computes it from the two clock readings
        expected = reference.append_pending(PendingStatement(template, ts, ms, rows, state, looked or None))
        got, want = json.loads(record.line), json.loads(expected.line)
        assert record.data == record.line.encode() + b"\n"
        assert mac_ok(KEY, got)
        assert (record.seq, record.ts, record.type, record.chain) == (expected.seq, ts, "statement", "w0-a")
        for name in ("id", "prev", "mac"):
            del got[name], want[name]
        assert got == want
    lines = [r.line for r in out] + [inline.seal("shutdown").line]
    assert verify([("trail", lines)], KEY).ok  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("lookups", {"lookups": {"public.users.email": ["alice@example.com"]}}),
        ("rows", {"rows": -1}),
        ("rows", {"rows": True}),
        ("sqlstate", {"sqlstate": "bad"}),
        ("duration_ms", {"ended": float("nan")}),
        ("duration_ms", {"ended": 9.0}),
    ],
)
def test_a_refused_statement_is_left_out_of_the_batch_and_the_chain_goes_on(field: str, bad: dict[str, object]) -> None:
    template = StatementTemplate(INFO, kind="select", fingerprint="SELECT 1")

    def item(**values: object) -> tuple[object, ...]:
        v: dict[str, object] = {"lookups": None, "ended": 10.5, "rows": 1, "sqlstate": None} | values
        return (template, v["lookups"], 10.0, v["ended"], 1_700_000_000_000_000_000, v["rows"], v["sqlstate"])

    chain = Chain(KEY, "w0-b")
    out: list[ChainedRecord] = []
    refused = chain.append_completed_many([item(), item(**bad), item(rows=7)], out)  # type: ignore[list-item]
    assert [type(e) for e in refused] == [InvalidEventError] and field in str(refused[0])
    assert "alice" not in str(refused[0])
    assert [(r.seq, json.loads(r.line)["rows"]) for r in out] == [(1, 1), (2, 7)]
    assert json.loads(out[1].line)["prev"] == out[0].mac
    with pytest.raises(InvalidEventError, match=field):
        chain.append_completed(item(**bad))  # type: ignore[arg-type]
    assert chain.next_seq == 3  # unchanged by a refusal
    assert verify([("trail", [r.line for r in out] + [chain.seal("shutdown").line])], KEY).ok  # type: ignore[arg-type]


def test_a_statement_whose_text_is_not_unicode_is_refused_and_the_chain_goes_on() -> None:
    """Undecodable statement text reaches a fingerprint as lone surrogates, which cannot be
    written: that one statement is refused (its error never quotes the text into a log
    here: the writer logs the error's type only), and the records before and after it
    link up as if it had never been queued."""
    good = StatementTemplate(INFO, kind="select", fingerprint="SELECT 1")
    odd = StatementTemplate(INFO, kind="select", fingerprint="SELECT '\udcff'")
    chain = Chain(KEY, "w0-c")
    out: list[ChainedRecord] = []
    items = [(t, None, 1.0, 1.5, 1_700_000_000_000_000_000, 1, None) for t in (good, odd, good)]
    malformed = (good, None, 1.0)  # not a Completed at all: refused, not the writer's end
    refused = chain.append_completed_many([*items, malformed], out)  # type: ignore[list-item]
    assert [type(e) for e in refused] == [UnicodeEncodeError, ValueError]
    assert [r.seq for r in out] == [1, 2] and chain.next_seq == 3 and chain.since_seal == 2
    assert json.loads(out[1].line)["prev"] == out[0].mac and chain.prev == out[1].mac
    lines = [r.line for r in out] + [chain.seal("shutdown").line]
    assert verify([("trail", lines)], KEY).ok  # type: ignore[arg-type]
