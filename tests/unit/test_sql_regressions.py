"""Regressions found by the encryption integration tests (tests/integration/test_encryption_*.py).

Each test names the bug it pins. Most are in pgcloak.sql (pure planning); two are in
the pure parts of pgcloak.session (COPY out CSV re-quoting, EXECUTE sent with Parse).
"""

from __future__ import annotations

import pytest

from pgcloak.crypto.blind_index import INDEX_LENGTH
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import generate_master_key
from pgcloak.policy import Policy, parse_policy
from pgcloak.session.protection import CopyInRewriter, Protection
from pgcloak.session.rewriter import Rewriter
from pgcloak.sql import Plan, Planner
from pgcloak.wire.messages import Parse, Query

POLICY = """
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
    phone: {encrypt: true, index: exact, normalize: phone}
    ssn: {encrypt: true}
# These tests are about what works on ciphertext, not about who reads what (test_read_guards.py).
default_read: reveal
guards: {unbounded_select: allow}
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY)


@pytest.fixture()
def planner(policy: Policy) -> Planner:
    return Planner(policy, index_length=INDEX_LENGTH)


def denied(plan: Plan, *fragments: str) -> None:
    assert not plan.decision.allowed, "expected a refusal"
    assert plan.decision.sqlstate == "0A000"
    for fragment in fragments:
        assert fragment in plan.decision.message, plan.decision.message


def allowed(plan: Plan) -> None:
    assert plan.decision.allowed, plan.decision.message


# -- INSERT ... SELECT from an unprotected table wrote plaintext ------------------------------
# The unqualified `email` of the SELECT was resolved in the INSERT's scope (the target,
# users.email), taken for a copy of the same protected column and allowed.


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO users (email) SELECT email FROM plain_contacts",
        "INSERT INTO users (email, phone) SELECT email, phone FROM plain_contacts WHERE id = $1",
        "WITH x AS (INSERT INTO users (email) SELECT email FROM plain_contacts RETURNING id) SELECT * FROM x",
        "INSERT INTO users (email) VALUES (email)",
    ],
)
def test_insert_body_does_not_see_the_target_columns(planner: Planner, sql: str) -> None:
    denied(planner.plan(sql), "public.users.email")


def test_insert_select_from_the_same_protected_column_still_allowed(planner: Planner) -> None:
    allowed(planner.plan("INSERT INTO users (email, phone) SELECT email, phone FROM users WHERE id = $1"))
    plan = planner.plan(
        "INSERT INTO users (email) VALUES ($1) ON CONFLICT (email) DO UPDATE SET phone = excluded.phone "
        "RETURNING email, phone"
    )
    allowed(plan)
    assert plan.params[0].kind == "store"


# -- COPY ... TO STDOUT (FORMAT csv) was decrypted with text-format escaping ------------------


@pytest.mark.parametrize(
    ("sql", "fmt"),
    [
        ("COPY users (id, ssn) TO STDOUT WITH (FORMAT csv)", "csv"),
        ("COPY users TO STDOUT CSV HEADER", "csv"),
        ("COPY users (email) TO STDOUT", "text"),
        ("COPY (SELECT email FROM users WHERE email = $1) TO STDOUT (FORMAT csv, FORCE_QUOTE *)", "csv"),
        ("COPY (SELECT email FROM users) TO STDOUT", "text"),
    ],
)
def test_copy_out_records_its_format(planner: Planner, sql: str, fmt: str) -> None:
    plan = planner.plan(sql)
    allowed(plan)
    assert plan.copy_out and plan.copy_in is None
    assert plan.copy_format == fmt


def test_copy_out_csv_values_are_quoted_once() -> None:
    protection = Protection.build(parse_policy(POLICY), Keyring(generate_master_key()))
    from pgcloak.crypto.envelope import encrypt

    stored = encrypt(protection.keyring, "public.users.ssn", b'a "b", c\\d').encode()
    assert protection.reveal_copy_row(b"1," + stored + b"\n", csv=True) == b'1,"a ""b"", c\\d"\n'
    # FORCE_QUOTE: the server already put the stored value in quotes
    assert protection.reveal_copy_row(b'"1","' + stored + b'"\n', csv=True) == b'"1","a ""b"", c\\d"\n'
    assert protection.reveal_copy_row(b"1\t" + stored + b"\n", csv=False) == b'1\ta "b", c\\\\d\n'


# -- DO / CALL naming a protected table: the message did not say which ------------------------


def test_opaque_refusal_names_the_table(planner: Planner) -> None:
    denied(planner.plan("DO $$ BEGIN UPDATE users SET email = 'x'; END $$"), "(users)", "DO")


# -- SQLAlchemy's insertmanyvalues (ORM add_all) was refused ----------------------------------
# INSERT ... SELECT p0::VARCHAR FROM (VALUES ($1::VARCHAR, 0), ...) AS imp_sen(p0, sen_counter)


def test_insert_select_from_values_list_stores_its_parameters(planner: Planner) -> None:
    plan = planner.plan(
        "INSERT INTO users (email, phone, name) SELECT p0::VARCHAR, p1::VARCHAR, p2::VARCHAR FROM "
        "(VALUES ($1::VARCHAR, $2::VARCHAR, $3::VARCHAR, 0), ($4::VARCHAR, NULL, $5::VARCHAR, 1)) "
        "AS imp_sen(p0, p1, p2, sen_counter) ORDER BY sen_counter RETURNING users.id, users.id AS id__1"
    )
    allowed(plan)
    assert [(a.kind, a.column) for a in plan.params] == [
        ("store", "email"), ("store", "phone"), ("pass", None), ("store", "email"), ("pass", None),
    ]
    plan = planner.plan("INSERT INTO users (email) SELECT v.column1 FROM (VALUES ($1), ($2)) v")
    allowed(plan)
    assert [a.kind for a in plan.params] == ["store", "store"]
    plan, _ = planner.plan_simple("INSERT INTO users (email) SELECT x FROM (VALUES ('a@b.c')) AS v(x)")
    allowed(plan)
    assert [a.kind for a in plan.literals] == ["store"]


def test_insert_select_from_values_list_with_expression_refused(planner: Planner) -> None:
    denied(planner.plan("INSERT INTO users (email) SELECT v.x FROM (VALUES ($1), (lower($2))) v(x)"),
           "public.users.email", "LOWER")


# -- a cast with a length silently truncated the stored ciphertext -----------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO users (email) VALUES ($1::varchar(30))",
        "INSERT INTO users (ssn) VALUES ($1::char)",
        "INSERT INTO users (ssn) VALUES (CAST($1 AS name))",
        "UPDATE users SET email = $1::varchar(10) WHERE id = $2",
        "INSERT INTO users (email) SELECT x::char(5) FROM (VALUES ($1)) v(x)",
    ],
)
def test_truncating_cast_on_a_stored_value_refused(planner: Planner, sql: str) -> None:
    denied(planner.plan(sql), "cast")


def test_whole_text_casts_still_allowed(planner: Planner) -> None:
    plan = planner.plan("INSERT INTO users (email, ssn, phone) VALUES ($1::text, CAST($2 AS varchar), $3::bpchar)")
    allowed(plan)
    assert [a.kind for a in plan.params] == ["store", "store", "store"]


# -- EXECUTE sent in a Parse message (asyncpg, psycopg) got no value transformation -----------


def test_execute_in_parse_transforms_its_literals(policy: Policy) -> None:
    protection = Protection.build(policy, Keyring(generate_master_key()))
    rewriter = Rewriter(lambda: protection)
    rewriter.client_message(ord("Q"), Query("PREPARE f(text) AS SELECT id FROM users WHERE email = $1").encode())
    out = rewriter.client_message(ord("P"), Parse("", "EXECUTE f('Alice@Example.com')", ()).encode())
    sent = Parse.decode(out[5:]).query
    index = protection.transform(protection.planner.plan("SELECT 1 FROM users WHERE email = $1").params[0], "alice@example.com")
    # sent as the statement itself (never the server's), the lookup by blind index
    assert sent == f"SELECT id FROM users WHERE left(email, 22) = ('{index}')::text"
    # and PREPARE sent in a Parse is remembered for a later EXECUTE
    rewriter.client_message(ord("P"), Parse("", "PREPARE g(text) AS INSERT INTO users (ssn) VALUES ($1)", ()).encode())
    out = rewriter.client_message(ord("P"), Parse("", "EXECUTE g('123')", ()).encode())
    assert Parse.decode(out[5:]).query.startswith("INSERT INTO users (ssn) VALUES (('pgc1:")


# -- COPY FROM STDIN with DELIMITER ',' stored a protected value in plaintext ------------------
# The rewriter split rows on tabs; the server split them on commas: `bob,alice@x.com` for
# (name, email) was one unprotected field to pgcloak and two fields to PostgreSQL.


@pytest.mark.parametrize(
    ("sql", "option"),
    [
        ("COPY users (name, email) FROM STDIN (DELIMITER ',')", "DELIMITER"),
        ("COPY users (name, email) FROM STDIN DELIMITER ',' CSV", "DELIMITER"),
        ("COPY users (name, email) FROM STDIN (FORMAT csv, QUOTE '''')", "QUOTE"),
        ("COPY users (name, email) FROM STDIN (FORMAT csv, ESCAPE '\\')", "ESCAPE"),
        ("COPY users (name, email) FROM STDIN (FORMAT csv, NULL 'NUL')", "NULL"),
        ("COPY users (name, email) FROM STDIN WITH NULL AS ''", "NULL"),
        ("COPY users (name, email) FROM STDIN (FORMAT csv, FORCE_NULL (email))", "FORCE_NULL"),
        ("COPY users (name, email) FROM STDIN (ENCODING 'LATIN1')", "ENCODING"),
    ],
)
def test_copy_in_options_the_rewriter_does_not_implement_refused(planner: Planner, sql: str, option: str) -> None:
    denied(planner.plan(sql), "public.users", option)


@pytest.mark.parametrize(
    "sql",
    [
        "COPY users (email, phone) FROM STDIN",
        "COPY users (email, phone) FROM STDIN csv",
        "COPY users (email, phone) FROM STDIN (FORMAT csv, HEADER true, ENCODING 'UTF8')",
        "COPY plain (a, b) FROM STDIN (DELIMITER ',')",
    ],
)
def test_copy_in_default_options_allowed(planner: Planner, sql: str) -> None:
    allowed(planner.plan(sql))


# -- COPY FROM STDIN text format with \r\n line ends kept the \r in the encrypted value --------


def test_copy_in_text_crlf_line_ends(policy: Policy, planner: Planner) -> None:
    protection = Protection.build(policy, Keyring(generate_master_key()))
    plan = planner.plan("COPY users (name, ssn) FROM STDIN")
    assert plan.copy_in is not None
    rewriter = CopyInRewriter(plan.copy_in, "text", protection.transform)
    out = rewriter.feed(b"bob\tsecret\r\nann\t\\N\r\n") + rewriter.finish()
    rows = [line.split(b"\t") for line in out.split(b"\n") if line]
    assert [r[0] for r in rows] == [b"bob", b"ann"]
    assert protection.reveal(rows[0][1]) == b"secret"
    assert rows[1][1] == b"\\N"


# -- a statement prepared before a policy edit failed on every later call ----------------------
# Drivers with a statement cache (asyncpg) kept binding the stale statement; PostgreSQL's
# own signal for a stale cached plan (0A000 from RevalidateCachedQuery) makes them re-prepare.


def test_stale_prepared_statement_refusal_looks_like_a_stale_cached_plan() -> None:
    from pgcloak.wire.messages import Bind, ErrorResponse

    keyring = Keyring(generate_master_key())
    before = Protection.build(parse_policy(POLICY.replace("    phone: {encrypt: true, index: exact, normalize: phone}\n", "")), keyring)
    after = Protection.build(parse_policy(POLICY), keyring)
    current = [before]
    rewriter = Rewriter(lambda: current[0])
    rewriter.client_message(ord("P"), Parse("s1", "SELECT id FROM users WHERE phone = $1", ()).encode())
    current[0] = after
    out = rewriter.client_message(ord("B"), Bind("", "s1", (), (b"555",), ()).encode())
    marker = Bind.decode(out[5:]).statement
    assert marker.startswith("pgcloak_refused_")
    server_error = ErrorResponse.make("26000", f'prepared statement "{marker}" does not exist').encode()
    error = ErrorResponse.decode(rewriter.backend_chunk(server_error)[5:])
    assert error.code == "0A000"
    assert error.get("R") == "RevalidateCachedQuery"
    assert "policy changed" in error.message


# -- COPY ... TO STDOUT (FORMAT binary) sent a corrupt stream ----------------------------------
# Decrypted values replaced ciphertext inside length-prefixed binary fields.


@pytest.mark.parametrize(
    "sql",
    [
        "COPY users (email) TO STDOUT (FORMAT binary)",
        "COPY users TO STDOUT BINARY",
        "COPY (SELECT email, ssn FROM users) TO STDOUT WITH (FORMAT binary)",
    ],
)
def test_binary_copy_out_of_protected_columns_refused(planner: Planner, sql: str) -> None:
    denied(planner.plan(sql), "binary")


def test_binary_copy_out_without_protected_columns_allowed(planner: Planner) -> None:
    allowed(planner.plan("COPY users (id, name) TO STDOUT (FORMAT binary)"))
    allowed(planner.plan("COPY (SELECT id FROM users) TO STDOUT (FORMAT binary)"))


# -- COPY ... TO STDOUT (DELIMITER ',') split a decrypted value holding a comma ---------------


@pytest.mark.parametrize(
    ("sql", "option"),
    [
        ("COPY users (email) TO STDOUT (DELIMITER ',')", "DELIMITER"),
        ("COPY (SELECT email FROM users) TO STDOUT WITH DELIMITER '|'", "DELIMITER"),
        ("COPY users (email) TO STDOUT (FORMAT csv, QUOTE '''')", "QUOTE"),
        ("COPY (SELECT ssn FROM users) TO STDOUT (FORMAT csv, ESCAPE '\\')", "ESCAPE"),
    ],
)
def test_copy_out_options_decryption_cannot_honour_refused(planner: Planner, sql: str, option: str) -> None:
    denied(planner.plan(sql), option)


def test_copy_out_csv_delimiter_allowed(planner: Planner) -> None:
    allowed(planner.plan("COPY users (email) TO STDOUT (FORMAT csv, DELIMITER ';', HEADER)"))
    allowed(planner.plan("COPY users (id) TO STDOUT (DELIMITER ',')"))


# -- SELECT DISTINCT / UNION over an encrypted column silently kept duplicates -----------------


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELECT DISTINCT email FROM users", "SELECT DISTINCT"),
        ("SELECT DISTINCT * FROM users WHERE id = $1", "SELECT DISTINCT"),
        ("SELECT email FROM users UNION SELECT email FROM users WHERE id = $1", "UNION (without ALL)"),
        ("SELECT ssn FROM users INTERSECT SELECT ssn FROM users", "INTERSECT (without ALL)"),
        ("SELECT u.phone AS p FROM users u EXCEPT SELECT $1", "EXCEPT (without ALL)"),
        ("SELECT * FROM (SELECT email FROM users) s UNION SELECT $1", "UNION (without ALL)"),
    ],
)
def test_duplicate_elimination_over_encrypted_column_refused(planner: Planner, sql: str, fragment: str) -> None:
    denied(planner.plan(sql), fragment, "public.users.")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM users UNION ALL SELECT email FROM users",
        "SELECT DISTINCT id, name FROM users WHERE email = $1",
        "SELECT id FROM users UNION SELECT id FROM users WHERE email = $1",
        "SELECT count(*) FROM (SELECT DISTINCT name FROM users) s",
    ],
)
def test_duplicate_elimination_without_encrypted_output_allowed(planner: Planner, sql: str) -> None:
    allowed(planner.plan(sql))


# -- a failed re-Parse of a named statement let plaintext through -----------------------------
# Parse(s1, INSERT ... email $1) succeeded; Parse(s1, SELECT $1::text) failed on the server
# (42P05, the name exists) but replaced pgcloak's plan; Bind(s1, email) reached the INSERT
# with the value untransformed.


def _rewriter(policy: Policy) -> Rewriter:
    protection = Protection.build(policy, Keyring(generate_master_key()))
    return Rewriter(lambda: protection)


def _bind_refused(rewriter: Rewriter, statement: str) -> bool:
    from pgcloak.wire.messages import Bind

    out = rewriter.client_message(ord("B"), Bind("", statement, (), (b"x@example.com",), ()).encode())
    sent = Bind.decode(out[5:])
    return sent.statement.startswith("pgcloak_refused_")


def test_named_statement_reparsed_with_same_actions_still_binds(policy: Policy) -> None:
    rewriter = _rewriter(policy)
    for _ in range(2):
        rewriter.client_message(ord("P"), Parse("s2", "INSERT INTO users (email) VALUES ($1)", ()).encode())
    assert not _bind_refused(rewriter, "s2")
    rewriter.client_message(ord("P"), Parse("", "INSERT INTO users (email) VALUES ($1)", ()).encode())
    rewriter.client_message(ord("P"), Parse("", "SELECT $1::text", ()).encode())
    assert not _bind_refused(rewriter, "")  # the unnamed statement is simply replaced


def test_sql_prepare_redefined_then_execute_refused(policy: Policy) -> None:
    """A second PREPARE of a name PostgreSQL refuses (42P05): EXECUTE is sent as the first
    one's statement, its value encrypted; after DEALLOCATE the name is free again."""
    rewriter = _rewriter(policy)
    rewriter.client_message(ord("Q"), Query("PREPARE p1(text) AS INSERT INTO users (email) VALUES ($1)").encode())
    rewriter.client_message(ord("Q"), Query("PREPARE p1(text) AS SELECT $1").encode())
    out = rewriter.client_message(ord("Q"), Query("EXECUTE p1('x@example.com')").encode())
    sent = Query.decode(out[5:]).sql
    assert sent.startswith("INSERT INTO users (email) VALUES (") and "pgc1:" in sent and "x@example" not in sent
    rewriter.client_message(ord("Q"), Query("DEALLOCATE p1").encode())
    rewriter.client_message(ord("Q"), Query("PREPARE p1(text) AS SELECT $1").encode())
    out = rewriter.client_message(ord("Q"), Query("EXECUTE p1('x@example.com')").encode())
    assert Query.decode(out[5:]).sql == "SELECT ('x@example.com')::text"



# -- where a copied value comes from: CTE bodies, set operations, (expr).* ------------------------
# A CTE body resolved its names in the statement it is attached to (users.email), a UNION
# column took its origin from the left branch only, and (expr).* counted as one column: each
# let plaintext from an unprotected source pass for users.email's stored form.


@pytest.mark.parametrize(
    "sql",
    [
        "WITH x AS (SELECT email FROM plain_contacts) INSERT INTO users (email) SELECT email FROM x",
        "WITH x AS (SELECT email FROM plain_contacts LIMIT 1) UPDATE users SET email = x.email FROM x WHERE users.id = 1",
        "WITH a AS (SELECT email FROM plain_contacts), b AS (SELECT email FROM a) INSERT INTO users (email) SELECT email FROM b",
        "WITH x(e) AS (SELECT email FROM plain_contacts) INSERT INTO users (email) SELECT e FROM x",
        "INSERT INTO users (email) SELECT s.email FROM "
        "(SELECT email FROM users WHERE false UNION ALL SELECT p.email FROM plain_contacts p) s",
        "INSERT INTO users (email) SELECT s.email FROM "
        "(SELECT email FROM users UNION ALL (SELECT email FROM users UNION ALL SELECT email FROM plain_contacts)) s",
        "INSERT INTO users (email) SELECT s.email FROM (SELECT email FROM users INTERSECT ALL SELECT email FROM plain_contacts) s",
        "INSERT INTO users (email, phone) SELECT s.email, s.phone FROM "
        "(SELECT email, phone FROM users UNION ALL SELECT phone, email FROM users) s",
        "WITH x AS (SELECT email FROM users WHERE false UNION SELECT email FROM plain_contacts) "
        "INSERT INTO users (email) SELECT email FROM x",
    ],
)
def test_copy_from_a_source_that_may_be_plaintext_refused(planner: Planner, sql: str) -> None:
    denied(planner.plan(sql), "public.users.")


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO users (id, ssn, name) VALUES ((ROW(9004, 'x')::plain2).*, 'decoy')",
        "INSERT INTO users (id, ssn, name) SELECT (p).*, 'decoy' FROM plain2 p",
        "INSERT INTO users (id, ssn) SELECT (x).* FROM (SELECT a, b FROM plain2) x",
    ],
)
def test_composite_expansion_into_a_protected_table_refused(planner: Planner, sql: str) -> None:
    plan = planner.plan(sql)
    denied(plan, "public.users", "(...).*")
    assert "9004" not in plan.decision.message and "decoy" not in plan.decision.message


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE users SET (id, ssn) = ((ROW(1, 'x')::plain2).*) WHERE id = 1",
        "UPDATE users SET (id, ssn) = (SELECT (p).* FROM plain2 p) WHERE id = 1",
    ],
)
def test_composite_expansion_in_update_set_list_refused(planner: Planner, sql: str) -> None:
    denied(planner.plan(sql), "public.users.ssn")


@pytest.mark.parametrize(
    "sql",
    [
        "WITH x AS (SELECT email FROM users WHERE id = $1) INSERT INTO users (email) SELECT email FROM x",
        "WITH x AS (SELECT email FROM users WHERE id = 1) UPDATE users SET email = x.email FROM x WHERE users.id = 2",
        "INSERT INTO users (email) SELECT s.email FROM "
        "(SELECT email FROM users WHERE id = 1 UNION ALL SELECT u.email FROM users u WHERE id = 2) s",
    ],
)
def test_copy_of_the_same_protected_column_through_cte_or_union_allowed(planner: Planner, sql: str) -> None:
    allowed(planner.plan(sql))
