"""The fast literal scanner agrees with the sqlglot-based lexer, and the planner uses it.

``scan_literals(sql)`` either gives up (None) or returns exactly ``lex(sql).literals``
and the planner's shape key; it never accepts a text that ``lex`` refuses. Checked
differentially on random SQL-ish texts built from fragments chosen to hit sqlglot's
quirks, on random character soup, and on fixed cases.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pgcloak.sql.lexer as lexer_mod
import pgcloak.sql.planner as planner_mod
from pgcloak.policy import Policy, parse_policy
from pgcloak.sql import Literal, Planner
from pgcloak.sql.lexer import LexError, lex, scan_literals
from pgcloak.sql.planner import _shape_key


def check_agrees(sql: str) -> bool:
    """Whether the fast path took ``sql``; fails when it disagrees with lex()."""
    fast = scan_literals(sql)
    if fast is None:
        return False
    try:
        lexed = lex(sql)
    except LexError as exc:  # pragma: no cover - a failure report
        pytest.fail(f"scan_literals accepted {sql!r}, which lex() refuses: {exc}")
    literals, key = fast
    assert literals == lexed.literals, sql
    assert key == _shape_key(sql, lexed), sql
    for lit in literals:
        assert sql[lit.start : lit.end] == lit.raw
    return True


# -- fragments: keywords, identifiers, strings, numbers, comments, operators ----------------

KEYWORDS = [
    "select", "SELECT", "from", "where", "and", "in", "is", "null", "as", "insert into",
    "values", "update", "set", "group by", "ORDER  BY", "order by1", "double precision",
    "character varying", "user-defined", "USER-DEFINED", "uescape", "UESCAPE", '"ue\u017fcape"',
]
IDENTIFIERS = [
    "users", "email", "E", "e", "N", "n", "B", "b", "X", "x", "U", "u", "U&", "u&", "user",
    "a", "b1", "_x", "x$y", "a$1", "ünï", "é", "typE", "an", "1a",
]
STRINGS = [
    "'abc'", "''", "'it''s'", "'a\\'", "'\\'", "'a''", "'", "'é€😀'", "'x\ny'", "'$$'", "'--'",
    "'/*'", "E'a\\'b'", "e'\\\\'", "E'\\n\\t\\x41\\101\\u00e9\\U0001F600'", "E'\\xC3\\xA9'",
    "E'\\xff'", "E'\\u'", "E'\\uD83D\\uDE00'", "E'\\uD800'", "E'\\0'", "E'\\400'", "E'a''b'",
    "E'\\", "E'", "N'x'", "n'it''s'", "B'0101'", "b'12'", "X'1F'", "x'zz'", "X''",
    "B'1''0'", "U&'d\\0061t'", "u&'\\+01F600'", "U&'\\D800'", "U&'a\\\\b'", "U&'\\00'", "U&'x'",
]
DOLLARS = [
    "$$x$$", "$$", "$a$body$a$", "$a$ $b$ $a$", "$_1$x$_1$", "$a$", "$a$$a$", "$A$x$a$",
    "$1", "$2", "$12", "$1$", "$ab", "$", "$$''$$", "$$'$$", "$1,", "$1 ", "@", "@ 1.5",
]
NUMBERS = [
    "1", "42", "1.5", "1.", "1.5e-3", "1e5", "1e5+3", "1e+5", "1e", "1ex", "1e5.3", ".5",
    "0x1F", "0X", "0b101", "0b2", "1_000", "00", "1.2.3", "1..2", "9e9e9", "1E'x'",
]
COMMENTS = [
    "--c", "-- x 'y'\n", "--\r", "/* c */", "/* /* n */ */", "/*/ x */", "/**/",
    "/* unterminated", "/*+ hint */", "*/", "/*/*/", "/* a */* b */",
]
OPERATORS = [
    "::", "::int", "::text", "(", ")", ",", ";", ".", "=", "<>", "!=", "<=", ">=", "<->",
    "<<->>", "->", "->>", "#>", "#>>", "#-", "#--", "#", "-|-", "-|--", "|/", "|/*", "||",
    "||/", "~", "~*", "~~", "~~*", "?", "??", "?|", "?&", "?::", "@>", "<@", "@@", "^@",
    "&&", "&", "|", "-", "+", "*", "/", "%", "\\", "[", "]", "{", "}", "`", "!", ":", ":=",
    "=>", "==", "{#", "#}", "{%", '"id"', '"a""b"', '"', '"uescape"', '"é"',
]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\f", "\v", "\x1c", "\u00a0", "\u2028", "\x00", "\x7f"]

FRAGMENT = st.sampled_from(
    KEYWORDS + IDENTIFIERS + STRINGS + DOLLARS + NUMBERS + COMMENTS + OPERATORS + SPACES
)
# literal-ish text with quotes, backslashes and non-ASCII inside quotes
QUOTED = st.text(alphabet="ab'\\é€$\n", max_size=6).map(lambda body: "'" + body.replace("'", "''") + "'")
E_QUOTED = st.text(alphabet="ab'\\nx0741é", max_size=8).map(lambda body: "E'" + body.replace("\\'", "'") + "'")
SEPARATOR = st.sampled_from(["", " ", "", " ", "\n", "\t"])
SQLISH = st.lists(st.tuples(st.one_of(FRAGMENT, QUOTED, E_QUOTED), SEPARATOR), max_size=14).map(
    lambda parts: "".join(a + b for a, b in parts)
)
SOUP = st.lists(
    st.sampled_from(
        [
            *"abeEnNxXbBuU&'\"$01239.+-*/#|@<>=()[],;:!?^~%\\ \t\n\r_",
            *("--", "/*", "*/", "''", "$$", "$a$", "é", "\f"),
        ]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(SQLISH)
@example("select $1, $2 from t where a = $1")
@example("select * from users where email = 'x' group by$a$$a$ 1")
def test_fast_scan_agrees_with_lex_on_fragments(sql: str) -> None:
    check_agrees(sql)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(SOUP)
def test_fast_scan_agrees_with_lex_on_character_soup(sql: str) -> None:
    check_agrees(sql)


# -- fixed cases --------------------------------------------------------------------------------

TYPICAL = [
    "SELECT id, phone FROM users WHERE email = 'alice.smith@example.com' AND id > 42 LIMIT 10",
    "INSERT INTO users (email, phone) VALUES ('bob@example.org', '+1 555 0100') ON CONFLICT (email) DO NOTHING",
    "UPDATE users SET phone = E'+44 20 7946\\t0958', email = 'c@d.io' WHERE id = 7 -- fix",
    'SELECT "users"."id" FROM "users" WHERE "users"."email" = \'it\'\'s@x.io\' AND "users".n >= -1.5e-3',
    "select * from users where email in ('a', N'b', $$c$$, $q$d'$q$) /* note */ and x = .5",
    "select 1; select 'two'::text; insert into users(email) values (E'\\x41\\u00e9')",
    "select email from users where id = any('{1,2}') and note <> U&'d\\0061t'",
    "PREPARE q(text) AS SELECT * FROM users WHERE email = $1 AND id = 3",
    "select a, b from users u join orders o on o.uid = u.id where o.total <@ int4range(1, 10) or o.x @> '[1]'",
    "",
]


@pytest.mark.parametrize("sql", TYPICAL)
def test_typical_statements_take_the_fast_path(sql: str) -> None:
    assert check_agrees(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "select $1,$2",  # sqlglot reads a dollar quote tagged '1,'
        "select $1, ''",  # sqlglot trips over the trailing '' while looking for a tag
        "x = $1.5",
        "x = @ 1.5",  # after sqlglot's '@' parameter a number stops at the dot
        "x = @1",
        "select 1 group by$a$$a$",  # a multi-word keyword ends at '$'
        "x$1",
        "$$x$$E'y'",
        "a #--b\n 1",  # '#-' is an operator, so no comment starts there
        "a -|--b\n 1",
        "a |/*b*/ 1",
        "USER-DEFINED1",
        "1e5+3",
        "1ex",
        "1_000",
        "0x1F",
        "B'12'",
        "B'1''0'",
        "U&'x' UESCAPE '!'",
        "U&'x' \"uescape\"",
        "U&'x' \"ue\u017fcape\"",  # '\u017f'.upper() is 'S': lex() sees UESCAPE
        "select 'unterminated",
        "select /* unterminated",
        "select ünï from t",
        "select {1}",
        "select 1\f",
    ],
)
def test_doubtful_texts_fall_back(sql: str) -> None:
    assert scan_literals(sql) is None
    check_agrees(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "select /* /* nested */ 'no' */ 'yes'",
        "select /*/ 'no' */ 'yes'",  # '/*' right after '/*' does not nest
        "select /* a */* b 'no' */ 'yes'",  # ... but the '/' of '*/' can start one
        "select /* a */ 1 /* b */ 2",
        "select $a$ 'no' $b$ $a$, 'yes'",
        "select $$$$, 1",
        "select $1 , 2",
        "select a.5, 1.5.3, 1..2",
        "select typE'x', an'y', ab&'z', u&'\\0061'",
        "select 'a' 'b' E'c' \"d\"1",
        "select x-1, x--1\n, x/1, x/**/1",
        "select a<@b, a@>b, a@@b, a@?b",
    ],
)
def test_tricky_texts_agree(sql: str) -> None:
    assert check_agrees(sql)


def test_literal_values_and_shape_key() -> None:
    sql = r"select 'a''b', E'c\'d\\e\n\x41\101\u00e9', $t$x'y$t$, N'n', U&'d\0061t', -5, 1.5e3, $1"
    found = scan_literals(sql)
    assert found is not None
    literals, key = found
    assert [lit.value for lit in literals] == ["a'b", "c'd\\e\nAAé", "x'y", "n", "dat", "5", "1.5e3"]
    assert [lit.kind for lit in literals] == ["string"] * 5 + ["number"] * 2
    assert key == "select \x00s, \x00s, \x00s, \x00s, \x00s, -\x00n, \x00n, $1"
    assert scan_literals("select 1 from t") == ([Literal("1", "1", 7, 8, "number")], "select \x00n from t")
    text = "select a from t"
    assert scan_literals(text) == ([], text)


def test_undecodable_strings_stay_verbatim() -> None:
    # an escape that is not valid UTF-8 is no literal slot for lex() either
    sql = "select E'\\xff', 'ok'"
    found = scan_literals(sql)
    assert found is not None
    assert [lit.value for lit in found[0]] == ["ok"]
    assert found[1] == "select E'\\xff', \x00s"
    check_agrees(sql)


def test_fast_literals_are_ordinary_literals() -> None:
    made = lexer_mod._make_literal("v", "'v'", 3, 6, "string")
    plain = Literal("v", "'v'", 3, 6, "string")
    assert type(made) is Literal
    assert made == plain
    assert hash(made) == hash(plain)
    assert repr(made) == repr(plain)


# -- the planner's hit path -------------------------------------------------------------------

POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY)


def test_cache_hits_do_not_tokenize(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    planner = Planner(policy, index_length=22)
    first, first_literals = planner.plan_simple("select id from users where email = 'a@x' and id = 1")
    assert [lit.value for lit in first_literals] == ["a@x", "1"]

    def no_lex(sql: str) -> object:
        raise AssertionError(f"lex() called for a cache hit: {sql!r}")

    monkeypatch.setattr(planner_mod, "lex", no_lex)
    sql = "select id from users where email = 'b@y''z' and id = 22"
    plan, literals = planner.plan_simple(sql)
    assert plan is first
    assert literals == lex(sql).literals
    assert planner.hits == 1 and planner.misses == 1
    assert planner.render(plan, literals) == planner.render(plan, lex(sql).literals)


def test_fast_and_slow_paths_plan_alike(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    statements = [
        *TYPICAL,
        "select * from users where email = 'x' group by$a$$a$ 1",
        "select * from users where email = $1,$2",
        "select * from users where email = 'unterminated",
        "select * from users where email = U&'!0061' UESCAPE '!'",
        "select email from users where phone = E'+1 555\\n' and 1 = 1",
    ]
    fast = Planner(policy, index_length=22)
    results = [fast.plan_simple(sql) for sql in statements * 2]
    monkeypatch.setattr(planner_mod, "scan_literals", lambda sql: None)
    slow = Planner(policy, index_length=22)
    assert [slow.plan_simple(sql) for sql in statements * 2] == results
    assert (fast.hits, fast.misses) == (slow.hits, slow.misses)


# -- E'' decoding ---------------------------------------------------------------------------------


def reference_escape_decoding(body: str) -> str | None:
    """decode_escape_string as first written: one character at a time."""
    simple = {"b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09}
    octal, hexdigits = "01234567", "0123456789abcdefABCDEF"
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == "'":
            out += b"'"
            i += 2
            continue
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        i += 1
        if i >= n:
            return None
        c = body[i]
        if c in simple:
            out.append(simple[c])
            i += 1
        elif c in octal:
            j = i
            while j < n and j < i + 3 and body[j] in octal:
                j += 1
            out.append(int(body[i:j], 8) & 0xFF)
            i = j
        elif c == "x" and i + 1 < n and body[i + 1] in hexdigits:
            j = i + 1
            while j < n and j < i + 3 and body[j] in hexdigits:
                j += 1
            out.append(int(body[i + 1 : j], 16))
            i = j
        elif c in ("u", "U"):
            width = 4 if c == "u" else 8
            digits = body[i + 1 : i + 1 + width]
            if len(digits) != width or any(d not in hexdigits for d in digits):
                return None
            try:
                out += chr(int(digits, 16)).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                return None
            i += 1 + width
        else:
            out += c.encode("utf-8")
            i += 1
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


# E'' bodies as the tokenizers cut them: quotes only doubled, a backslash always
# followed by something
E_BODY = st.lists(
    st.one_of(
        st.sampled_from(["''", "a", "é", "€", "😀", "\x00", "\n", "0", "7", "8", "f", "F", "g"]),
        st.sampled_from(list("bfnrtxuU01234567'\\\"az9")).map(lambda c: "\\" + c),
        st.characters(exclude_characters="'\\"),
    ),
    max_size=16,
).map("".join)


@settings(max_examples=1000)
@given(E_BODY)
@example("\\xC3\\xA9\\u00e9\\U0001F600\\101\\400\\x4g''\\'")
@example("a\\")
def test_escape_decoding_matches_reference(body: str) -> None:
    try:
        expected = lexer_mod.decode_escape_string(body)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            reference_escape_decoding(body)
        return
    assert expected == reference_escape_decoding(body)


def test_lone_surrogates_in_e_strings_are_left_to_lex() -> None:
    sql = "select E'\udc80', 'x'"
    assert scan_literals(sql) is None
    with pytest.raises(UnicodeEncodeError):  # unchanged behaviour of lex()
        lex(sql)


def test_every_scanner_alternative_is_handled() -> None:
    # scan_literals dispatches on these group names; a new alternative needs a branch
    assert set(lexer_mod._SCAN.groupindex) == {
        "str", "num", "end", "estr", "nstr", "ustr", "comment", "dollar", "param", "bits", "hex",
    }


@pytest.mark.parametrize(
    ("sql", "copies"),
    [
        ("COPY t FROM STDIN", True),
        ("copy t (a, b) from stdin with (format csv)", True),
        ("/* x */ COPY t FROM /**/ STDIN", True),
        ("SELECT 1; COPY t FROM STDIN", True),  # not only the first statement
        ("COPY t TO STDOUT", False),
        ("SELECT 'copy t from stdin'", False),  # in a string
        ("COPY (SELECT 1) TO STDOUT; SELECT 'stdin'", False),
        ("COPY t FROM 'stdin'", False),  # a file named stdin
        ("COPY t FROM STDIN $1,$2", True),  # not tokenizable: counted as one (harmless)
    ],
)
def test_copies_from_stdin(sql: str, copies: bool) -> None:
    from pgcloak.sql.lexer import copies_from_stdin

    assert copies_from_stdin(sql) is copies


@pytest.mark.parametrize("sql", ["SELECT 9006 #--5, 'a'", "SELECT a #--\n b", "SELECT a #-- x"])
def test_operator_run_into_a_comment_start_is_not_lexed(sql: str) -> None:
    """PostgreSQL cuts an operator where ``--`` or ``/*`` starts; sqlglot reads ``#-``."""
    with pytest.raises(LexError, match="comment start"):
        lex(sql)
    assert scan_literals(sql) is None


@pytest.mark.parametrize("sql", ["SELECT a #- '{b}' -- c", "SELECT a #-/*x*/ b", "SELECT 1 ->-- x", "SELECT 1 #- -- x", "SELECT '#--'"])
def test_operators_that_end_before_a_comment_lex_as_postgresql_does(sql: str) -> None:
    lex(sql)
