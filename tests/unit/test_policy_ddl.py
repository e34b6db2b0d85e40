"""`pgcloak policy ddl`: names spelled so that PostgreSQL reads back the policy's tables.

The integration fixtures (encryption_fixtures.policy_ddl) run this output against a real
server, mixed-case schema included; here, the spelling rules one by one.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from pgcloak import cli
from pgcloak.policy.names import quote_ident, split_identifiers

POLICY = """\
version: 1
tables:
  public.users:
    email: {encrypt: true, index: exact, normalize: email}
  crm."Contacts":
    '"Email"': {encrypt: true, index: exact}
  public."order":
    user: {encrypt: true, index: exact}
    note: {encrypt: true}
"""


def ddl(tmp_path: Path, *unique: str) -> tuple[int, str]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["policy", "ddl", str(path), *(a for u in unique for a in ("--unique", u))])
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("name", "spelled"),
    [
        ("users", "users"),
        ("Contacts", '"Contacts"'),
        ("user", '"user"'),  # reserved: a bare `user` is CURRENT_USER
        ("order", '"order"'),
        ("email_2$", "email_2$"),
        ('say "hi"', '"say ""hi"""'),
    ],
)
def test_quote_ident_reads_back_as_the_same_name(name: str, spelled: str) -> None:
    assert quote_ident(name) == spelled
    assert split_identifiers(spelled, what="column") == (name,)


def test_mixed_case_and_reserved_names_are_quoted(tmp_path: Path) -> None:
    code, text = ddl(tmp_path)
    assert code == 0
    assert 'ALTER TABLE crm."Contacts" ALTER COLUMN "Email" TYPE text;' in text
    assert 'CREATE INDEX IF NOT EXISTS "Contacts_Email_pgcloak_idx" ON crm."Contacts" ((left("Email", 22)));' in text
    assert 'ALTER TABLE public."order" ALTER COLUMN "user" TYPE text;' in text
    assert 'ON public."order" ((left("user", 22)));' in text
    # Plain names stay bare; a column with no index gets no index.
    assert "CREATE INDEX IF NOT EXISTS users_email_pgcloak_idx ON public.users ((left(email, 22)));" in text
    assert "note_pgcloak_idx" not in text


def test_unique_takes_names_as_sql_spells_them(tmp_path: Path) -> None:
    code, text = ddl(tmp_path, 'crm."Contacts"."Email"', "USERS.Email")
    assert code == 0
    assert 'CREATE UNIQUE INDEX IF NOT EXISTS "Contacts_Email_pgcloak_idx"' in text
    assert "CREATE UNIQUE INDEX IF NOT EXISTS users_email_pgcloak_idx" in text  # unquoted: folded
    assert 'DROP CONSTRAINT "Contacts_Email_key"' in text
    # Unquoted, Contacts.Email folds to contacts.email: not the mixed-case table.
    code, text = ddl(tmp_path, "crm.Contacts.Email")
    assert code == 0 and "UNIQUE" not in text


def test_a_malformed_unique_name_is_an_error(tmp_path: Path) -> None:
    code, text = ddl(tmp_path, 'users."email')
    assert code == 2 and "--unique column" in text


def test_every_protected_column_gets_a_ciphertext_only_check(tmp_path: Path) -> None:
    code, text = ddl(tmp_path)
    assert code == 0
    assert (
        'ALTER TABLE crm."Contacts" DROP CONSTRAINT IF EXISTS "Contacts_Email_pgcloak_check", '
        'ADD CONSTRAINT "Contacts_Email_pgcloak_check" CHECK ("Email" IS NULL OR "Email" ~ '
        "'^[A-Za-z0-9_-]{22}\\.pgc1:[A-Za-z0-9_-]{47,}$') NOT VALID;"
    ) in text
    assert "CHECK (note IS NULL OR note ~ '^pgc1:[A-Za-z0-9_-]{47,}$') NOT VALID;" in text
    assert text.count("ADD CONSTRAINT") == 4  # one per protected column
    path = tmp_path / "policy.yaml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["policy", "ddl", str(path), "--no-check"]) == 0
    assert "CHECK" not in out.getvalue() and "pgcloak_idx" in out.getvalue()


@pytest.mark.parametrize(
    ("column", "encrypt", "index"),
    [
        ({"encrypt": True, "index": "exact", "normalize": "email"}, True, True),
        ({"encrypt": True}, True, False),
        ({"hash_only": True, "index": "exact"}, False, True),
    ],
)
def test_the_check_pattern_takes_what_pgcloak_stores_and_refuses_plaintext(
    column: dict[str, object], encrypt: bool, index: bool
) -> None:
    import re

    from pgcloak.crypto.blind_index import stored_pattern
    from pgcloak.crypto.keyring import Keyring
    from pgcloak.crypto.keys import generate_master_key
    from pgcloak.policy import parse_policy
    from pgcloak.session.protection import Protection

    spec = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in column.items())
    policy = parse_policy(f"version: 1\ntables:\n  public.t:\n    c: {{{spec}}}\n")
    protection = Protection.build(policy, Keyring(generate_master_key()))
    plan = protection.planner.plan("INSERT INTO t (c) VALUES ($1)")
    pattern = re.compile(stored_pattern(encrypt=encrypt, index=index))
    for value in ["alice@example.com", "", "x" * 500, "ünïcødé 😀"]:
        stored = protection.transform(plan.params[0], value)
        assert stored is not None and pattern.fullmatch(stored), stored
    plaintext_dressed_up = ["pgc1:078-05-1120", "pgc1:alice_example_com", "X" * 22 + ".pgc1:555-0100"]
    for plain in ["alice@example.com", "555-0100", "pgc1:", "123-45-6789", "pgc1:has space", *plaintext_dressed_up]:
        assert not pattern.fullmatch(plain)


def test_long_object_names_stay_distinct_within_postgresqls_limit() -> None:
    from pgcloak.policy.ddl import object_name

    table = "customer_relationship_management_contacts"
    home = object_name(table, "emergency_contact_phone_home", "_pgcloak_check")
    work = object_name(table, "emergency_contact_phone_work", "_pgcloak_check")
    assert home != work
    assert len(home.encode()) <= 63 and len(work.encode()) <= 63
    assert home.endswith("_pgcloak_check") and home.startswith("customer_relationship")
    assert object_name("users", "email", "_pgcloak_idx") == "users_email_pgcloak_idx"  # short: as before
    wide = object_name("таблица_" * 5, "колонка", "_pgcloak_check")  # cut on a character boundary
    assert len(wide.encode()) <= 63 and wide.encode().decode() == wide


def test_judge_names_what_a_column_lacks() -> None:
    from pgcloak.policy import parse_policy
    from pgcloak.policy.ddl import ColumnFacts, column_needs, judge

    users = "version: 1\ntables:\n  public.users:\n    email: {encrypt: true, index: exact}\n    ssn: {encrypt: true}\n"
    (email, ssn) = column_needs(parse_policy(users))
    good = f"CHECK (((email IS NULL) OR (email ~ '{email.pattern}'::text)))"
    assert judge(email, ColumnFacts("text", good, True, email.index)) == ([], [])
    problems, notes = judge(email, ColumnFacts("character varying(64)", good, False, None))
    assert [p.split(" ")[0] for p in problems] == ["type", "no"] and "NOT VALID" in notes[0]
    problems, _ = judge(email, ColumnFacts("text", "CHECK ((email <> ''::text))", True, email.index))
    assert problems and "is not pgcloak's" in problems[0]
    # The pattern of pgcloak before envelopes had a minimum length: run the DDL again.
    older = good.replace("{47,}", "+")
    problems, _ = judge(email, ColumnFacts("text", older, True, email.index))
    assert problems and "older pgcloak" in problems[0] and "policy ddl" in problems[0]
    assert judge(ssn, None)[0] == ["column public.users.ssn does not exist"]
    assert ssn.index is None and "no lookup index" not in " ".join(judge(ssn, ColumnFacts("text", None, False, None))[0])
