"""pgcloak.backfill.convert: the column jobs of a policy, and what one existing value of
a protected column becomes (encrypted, relaid, rotated, or left as it is).

Pure: no database. Every result is checked independently of the converter: against the
column's stored pattern (as the CHECK constraint holds it, whole string), by decrypting
it, and by recomputing the blind index of the normalized value.
"""

from __future__ import annotations

import re

import pytest

from pgcloak.backfill.convert import ColumnJob, Converter, ConvertError, column_jobs
from pgcloak.crypto.blind_index import blind_index, compose, split, stored_pattern
from pgcloak.crypto.envelope import decrypt, encrypt, parse_header
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey, generate_master_key
from pgcloak.policy import Policy, parse_policy

# Columns listed out of alphabetical order on purpose: the jobs come out sorted.
POLICY = """
version: 1
tables:
  public.users:
    ssn: {encrypt: true, key_version: 2}
    phone: {encrypt: true, index: exact, normalize: phone, key_version: 3}
    email: {encrypt: true, index: exact, normalize: email, join_group: mail}
  public.orders:
    loyalty_id: {hash_only: true, index: exact}
    buyer_email: {encrypt: true, index: exact, normalize: email, join_group: mail}
  crm."Contacts":
    note: {encrypt: true}
"""
ENVELOPE_ONLY = "^pgc1:[A-Za-z0-9_-]{47,}$"
INDEXED = r"^[A-Za-z0-9_-]{22}\.pgc1:[A-Za-z0-9_-]{47,}$"
HASH_ONLY = "^[A-Za-z0-9_-]{22}$"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY)


@pytest.fixture(scope="module")
def master_key() -> MasterKey:
    return generate_master_key()


@pytest.fixture(scope="module")
def other_master_key() -> MasterKey:
    return generate_master_key()


@pytest.fixture(scope="module")
def jobs(policy: Policy) -> dict[str, ColumnJob]:
    """``schema.table.column`` -> its job."""
    return {f"{j.table}.{j.column}": j for js in column_jobs(policy).values() for j in js}


@pytest.fixture
def keyring(master_key: MasterKey) -> Keyring:
    """A fresh keyring of the master key (Converter.for_policy sets its versions)."""
    return Keyring(master_key)


@pytest.fixture
def converter(policy: Policy, keyring: Keyring) -> Converter:
    return Converter.for_policy(policy, keyring)


@pytest.fixture
def old_keyring(master_key: MasterKey) -> Keyring:
    """The same master key with every column at version 1 (before a key_version bump)."""
    return Keyring(master_key)


def text_of(keyring: Keyring, stored: str) -> str:
    return decrypt(keyring, stored).decode("utf-8")


def stored_form(job: ColumnJob, stored: str) -> None:
    """``stored`` is in the column's stored form, as a whole string (a CHECK constraint
    in PostgreSQL reads ``$`` as the end of the string)."""
    assert re.fullmatch(job.pattern, stored) is not None, stored
    assert "\n" not in stored


# -- column_jobs ---------------------------------------------------------------------


def test_column_jobs_lists_every_protected_column_in_a_stable_order(policy: Policy) -> None:
    by_table = column_jobs(policy)
    assert list(by_table) == ["crm.Contacts", "public.orders", "public.users"]
    assert [[j.column for j in js] for js in by_table.values()] == [
        ["note"],
        ["buyer_email", "loyalty_id"],
        ["email", "phone", "ssn"],
    ]
    assert all(j.table == table for table, js in by_table.items() for j in js)
    assert column_jobs(policy) == by_table  # the same again


def test_column_jobs_fields(jobs: dict[str, ColumnJob]) -> None:
    assert jobs["public.users.email"] == ColumnJob(
        "public.users", "email", "public.users.email", "mail", "email", True, False, INDEXED
    )
    # A join group shares the index key, not the envelope key.
    assert jobs["public.orders.buyer_email"] == ColumnJob(
        "public.orders", "buyer_email", "public.orders.buyer_email", "mail", "email", True, False, INDEXED
    )
    assert jobs["public.users.phone"] == ColumnJob(
        "public.users", "phone", "public.users.phone", "public.users.phone", "phone", True, False, INDEXED
    )
    assert jobs["public.users.ssn"] == ColumnJob(
        "public.users", "ssn", "public.users.ssn", None, "none", True, False, ENVELOPE_ONLY
    )
    assert jobs["public.orders.loyalty_id"] == ColumnJob(
        "public.orders", "loyalty_id", "public.orders.loyalty_id", "public.orders.loyalty_id",
        "none", False, True, HASH_ONLY,
    )
    assert jobs["crm.Contacts.note"] == ColumnJob(
        "crm.Contacts", "note", "crm.Contacts.note", None, "none", True, False, ENVELOPE_ONLY
    )
    # The patterns are the DDL's.
    assert jobs["public.users.email"].pattern == stored_pattern(encrypt=True, index=True)
    assert jobs["public.users.ssn"].pattern == stored_pattern(encrypt=True, index=False)
    assert jobs["public.orders.loyalty_id"].pattern == stored_pattern(encrypt=False, index=True)


def test_column_job_schema_and_table_name(jobs: dict[str, ColumnJob]) -> None:
    job = jobs["crm.Contacts.note"]
    assert (job.schema_name, job.table_name) == ("crm", "Contacts")
    job = jobs["public.orders.loyalty_id"]
    assert (job.schema_name, job.table_name) == ("public", "orders")


def test_column_jobs_restricted_to_tables(policy: Policy) -> None:
    full = column_jobs(policy)
    only = column_jobs(policy, tables={"public.users"})
    assert list(only) == ["public.users"]
    assert only["public.users"] == full["public.users"]
    two = column_jobs(policy, tables={"public.users", "crm.Contacts"})
    assert list(two) == ["crm.Contacts", "public.users"]
    assert column_jobs(policy, tables=set()) == {}


def test_column_jobs_unknown_table_is_a_key_error_naming_it(policy: Policy) -> None:
    with pytest.raises(KeyError) as info:
        column_jobs(policy, tables={"public.users", "public.nope", "aaa.zzz"})
    message = str(info.value)
    assert "public.nope" in message
    assert "aaa.zzz" in message
    assert message.index("aaa.zzz") < message.index("public.nope")  # sorted
    assert "public.users" not in message  # only the unknown ones
    with pytest.raises(KeyError, match="users"):
        column_jobs(policy, tables={"users"})  # not canonical: schema.table


# -- Converter.for_policy ------------------------------------------------------------


def test_for_policy_sets_the_current_versions(policy: Policy, master_key: MasterKey) -> None:
    keyring = Keyring(master_key, versions={"public.users.ssn": 7, "crm.Contacts.note": 4})
    converter = Converter.for_policy(policy, keyring)
    assert converter.keyring is keyring
    assert keyring.current_version("public.users.ssn") == 2  # overrides what was set
    assert keyring.current_version("public.users.phone") == 3
    assert keyring.current_version("crm.Contacts.note") == 1  # the policy's default
    assert keyring.current_version("public.users.email") == 1
    assert keyring.current_version("public.orders.buyer_email") == 1


def test_new_envelopes_use_the_policy_key_version(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    for name, version in [("public.users.ssn", 2), ("public.users.phone", 3), ("crm.Contacts.note", 1)]:
        job = jobs[name]
        result = converter.convert(job, "+1 555 0100")
        assert result is not None
        assert parse_header(result[0]) == (name, version)


# -- plaintext -----------------------------------------------------------------------


def test_plaintext_in_an_envelope_only_column(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.ssn"]
    result = converter.convert(job, "123-45-6789")
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    assert text_of(keyring, stored) == "123-45-6789"
    assert parse_header(stored) == ("public.users.ssn", 2)


def test_plaintext_email_is_indexed_case_folded(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.email"]
    result = converter.convert(job, "  Alice@Example.COM ")
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    index, envelope = split(stored)
    # The join group's key, over the normalized text (hashed as it is here).
    assert index == blind_index(keyring, "mail", "alice@example.com", "none")
    assert index != blind_index(keyring, "public.users.email", "alice@example.com", "none")
    assert envelope is not None
    assert parse_header(envelope) == ("public.users.email", 1)
    assert text_of(keyring, stored) == "  Alice@Example.COM "  # the value as written
    # Same join group, same index: the columns compare equal.
    other = converter.convert(jobs["public.orders.buyer_email"], "alice@example.com")
    assert other is not None
    assert split(other[0])[0] == index
    assert parse_header(other[0]) == ("public.orders.buyer_email", 1)


def test_plaintext_phone_is_indexed_normalized(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.phone"]
    result = converter.convert(job, "+1 (555) 010-0100")
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    assert split(stored)[0] == blind_index(keyring, "public.users.phone", "+15550100100", "none")
    assert text_of(keyring, stored) == "+1 (555) 010-0100"
    assert parse_header(stored) == ("public.users.phone", 3)


def test_plaintext_in_a_hash_only_column_is_exactly_its_blind_index(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.orders.loyalty_id"]
    result = converter.convert(job, "LOY-0042")
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    assert stored == blind_index(keyring, "public.orders.loyalty_id", "LOY-0042", "none")
    assert "pgc1:" not in stored


def test_each_plaintext_gets_its_own_envelope(
    converter: Converter, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.email"]
    first = converter.convert(job, "bob@example.com")
    second = converter.convert(job, "bob@example.com")
    assert first is not None and second is not None
    assert first[0] != second[0]  # random nonces
    assert split(first[0])[0] == split(second[0])[0]  # same index


# -- already stored ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "plaintext"),
    [
        ("public.users.ssn", "123-45-6789"),
        ("public.users.email", "Carol@Example.com"),
        ("public.users.phone", "+44 20 7946 0000"),
        ("public.orders.loyalty_id", "LOY-0042"),
        ("crm.Contacts.note", "called on Monday"),
    ],
)
@pytest.mark.parametrize("rotate", [False, True])
def test_a_value_already_stored_is_left_as_it_is(
    converter: Converter, jobs: dict[str, ColumnJob], column: str, plaintext: str, rotate: bool
) -> None:
    job = jobs[column]
    stored = converter.store(job, plaintext)
    stored_form(job, stored)
    assert converter.convert(job, stored, rotate=rotate) is None


def test_the_stored_value_of_store_is_what_convert_writes(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.email"]
    stored = converter.store(job, "Dan@Example.com")
    assert split(stored)[0] == blind_index(keyring, "mail", "dan@example.com")
    assert text_of(keyring, stored) == "Dan@Example.com"


# -- rotation ------------------------------------------------------------------------


def test_an_older_key_version_is_rotated_only_with_rotate(
    converter: Converter, keyring: Keyring, old_keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.ssn"]
    assert keyring.current_version(job.key_id) == 2
    old = encrypt(old_keyring, job.key_id, b"123-45-6789")
    assert parse_header(old) == (job.key_id, 1)
    assert converter.convert(job, old) is None  # in the stored form already
    result = converter.convert(job, old, rotate=True)
    assert result is not None
    stored, outcome = result
    assert outcome == "rotated"
    stored_form(job, stored)
    assert parse_header(stored) == (job.key_id, 2)
    assert text_of(keyring, stored) == "123-45-6789"
    assert converter.convert(job, stored, rotate=True) is None  # done


def test_an_older_key_version_of_an_indexed_column_keeps_its_index(
    converter: Converter, keyring: Keyring, old_keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.phone"]
    index = blind_index(old_keyring, "public.users.phone", "+15550100100")
    old = compose(index, encrypt(old_keyring, job.key_id, b"+1 555 010 0100"))
    assert converter.convert(job, old) is None
    result = converter.convert(job, old, rotate=True)
    assert result is not None
    stored, outcome = result
    assert outcome == "rotated"
    stored_form(job, stored)
    assert split(stored)[0] == index
    assert parse_header(stored) == (job.key_id, 3)
    assert text_of(keyring, stored) == "+1 555 010 0100"


def test_another_columns_envelope_is_rotated_to_this_columns_key(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.ssn"]
    copied = encrypt(keyring, "crm.Contacts.note", b"123-45-6789")
    assert converter.convert(job, copied) is None
    result = converter.convert(job, copied, rotate=True)
    assert result is not None
    stored, outcome = result
    assert outcome == "rotated"
    stored_form(job, stored)
    assert parse_header(stored) == ("public.users.ssn", 2)
    assert text_of(keyring, stored) == "123-45-6789"


def test_a_value_copied_within_a_join_group_is_rotated_with_the_same_index(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    source = converter.store(jobs["public.users.email"], "Erin@Example.com")
    job = jobs["public.orders.buyer_email"]
    assert converter.convert(job, source) is None
    result = converter.convert(job, source, rotate=True)
    assert result is not None
    stored, outcome = result
    assert outcome == "rotated"
    stored_form(job, stored)
    assert split(stored)[0] == split(source)[0]
    assert parse_header(stored) == ("public.orders.buyer_email", 1)
    assert text_of(keyring, stored) == "Erin@Example.com"


# -- relaying (another layout) -------------------------------------------------------


def test_an_envelope_in_a_column_that_now_has_an_index_is_relaid(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.email"]
    before = encrypt(keyring, job.key_id, b" Frank@Example.COM")
    assert re.fullmatch(job.pattern, before) is None
    for rotate in (False, True):
        result = converter.convert(job, before, rotate=rotate)
        assert result is not None
        stored, outcome = result
        assert outcome == "relaid"
        stored_form(job, stored)
        assert split(stored)[0] == blind_index(keyring, "mail", "frank@example.com")
        assert text_of(keyring, stored) == " Frank@Example.COM"


def test_an_old_version_envelope_is_relaid_under_the_current_version(
    converter: Converter, keyring: Keyring, old_keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.phone"]
    before = encrypt(old_keyring, job.key_id, b"555-0100")
    result = converter.convert(job, before)
    assert result is not None
    stored, outcome = result
    assert outcome == "relaid"
    stored_form(job, stored)
    assert split(stored)[0] == blind_index(keyring, "public.users.phone", "5550100")
    assert parse_header(stored) == (job.key_id, 3)
    assert text_of(keyring, stored) == "555-0100"


def test_an_indexed_value_in_a_column_without_index_is_relaid_to_an_envelope(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.ssn"]
    before = compose(
        blind_index(keyring, job.key_id, "123-45-6789"), encrypt(keyring, job.key_id, b"123-45-6789")
    )
    assert re.fullmatch(job.pattern, before) is None
    result = converter.convert(job, before)
    assert result is not None
    stored, outcome = result
    assert outcome == "relaid"
    stored_form(job, stored)
    assert stored.startswith("pgc1:")
    assert parse_header(stored) == (job.key_id, 2)
    assert text_of(keyring, stored) == "123-45-6789"


def test_an_envelope_in_a_column_now_hash_only_is_relaid_to_its_index(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.orders.loyalty_id"]
    for before in (
        encrypt(keyring, job.key_id, b"LOY-0042"),
        compose(blind_index(keyring, "x.y.z", "other"), encrypt(keyring, job.key_id, b"LOY-0042")),
    ):
        result = converter.convert(job, before)
        assert result == (blind_index(keyring, job.key_id, "LOY-0042"), "relaid")


# -- text that merely looks like a stored value --------------------------------------


@pytest.mark.parametrize("text", ["pgc1:hello", "pgc1:AAAA", "pgc1:"])
def test_envelope_lookalike_text_in_an_indexed_column_is_plaintext(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob], text: str
) -> None:
    job = jobs["public.users.email"]
    result = converter.convert(job, text)
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    assert split(stored)[0] == blind_index(keyring, "mail", text.lower())
    assert text_of(keyring, stored) == text


def test_envelope_lookalike_text_in_a_phone_column_is_normalized_as_plaintext(
    converter: Converter, jobs: dict[str, ColumnJob]
) -> None:
    # Taken as plaintext (refused as a phone number), not as an altered stored value.
    with pytest.raises(ConvertError, match="not a phone number"):
        converter.convert(jobs["public.users.phone"], "pgc1:AAAA")


@pytest.mark.parametrize("text", ["pgc1:hello", "pgc1:AAAA", "AAAAAAAAAAAAAAAAAAAAAA.pgc1:AAAA"])
def test_envelope_lookalike_text_in_a_hash_only_column_is_plaintext(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob], text: str
) -> None:
    job = jobs["public.orders.loyalty_id"]
    assert converter.convert(job, text) == (blind_index(keyring, job.key_id, text), "encrypted")


@pytest.mark.parametrize("text", ["AAAAAAAAAAAAAAAAAAAAAA.pgc1:hello", "AAAAAAAAAAAAAAAAAAAAAA.pgc1:AAAA"])
def test_indexed_lookalike_text_in_an_envelope_only_column_is_plaintext(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob], text: str
) -> None:
    job = jobs["public.users.ssn"]
    result = converter.convert(job, text)
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    assert text_of(keyring, stored) == text


@pytest.mark.parametrize("text", ["pgc1:hello", "pgc1:AAAA"])
@pytest.mark.parametrize("rotate", [False, True])
def test_envelope_lookalike_text_in_an_envelope_only_column_is_plaintext(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob], text: str, rotate: bool
) -> None:
    job = jobs["public.users.ssn"]
    result = converter.convert(job, text, rotate=rotate)
    assert result is not None
    stored, outcome = result
    assert outcome == "encrypted"
    stored_form(job, stored)
    assert text_of(keyring, stored) == text


def test_a_22_character_plaintext_in_a_hash_only_column_is_left(
    converter: Converter, jobs: dict[str, ColumnJob]
) -> None:
    # Documented: it cannot be told from a stored index.
    assert converter.convert(jobs["public.orders.loyalty_id"], "ABCDEFGHIJKLMNOPQRSTUV") is None


def test_a_trailing_newline_is_not_the_stored_form(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.orders.loyalty_id"]
    text = "ABCDEFGHIJKLMNOPQRSTUV\n"
    assert converter.convert(job, text) == (blind_index(keyring, job.key_id, text), "encrypted")


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("phone", ["call 555-0100 ext. 12", "+1 555 0100 x7", "++15550100"])
def test_an_invalid_phone_number_is_a_convert_error_without_the_value(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob], phone: str
) -> None:
    job = jobs["public.users.phone"]
    with pytest.raises(ConvertError) as info:
        converter.convert(job, phone)
    assert "phone" in str(info.value)
    assert phone not in str(info.value)
    assert "555" not in str(info.value)
    # The same in the relaid path (an envelope of it, now to be indexed).
    with pytest.raises(ConvertError) as info:
        converter.convert(job, encrypt(keyring, job.key_id, phone.encode()))
    assert phone not in str(info.value)
    assert "555" not in str(info.value)


SECRET = "Grace Hopper 1906"


def test_an_envelope_of_another_master_key_in_the_relaid_path(
    converter: Converter, other_master_key: MasterKey, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.email"]
    foreign = encrypt(Keyring(other_master_key), job.key_id, SECRET.encode())
    with pytest.raises(ConvertError, match="another master key") as info:
        converter.convert(job, foreign)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("key_id", ["public.users.ssn", "crm.Contacts.note"])
def test_an_envelope_of_another_master_key_in_the_rotated_path(
    converter: Converter, other_master_key: MasterKey, jobs: dict[str, ColumnJob], key_id: str
) -> None:
    # Version 1 while the column is at 2, or another column's key id: both are opened.
    job = jobs["public.users.ssn"]
    foreign = encrypt(Keyring(other_master_key), key_id, SECRET.encode())
    assert converter.convert(job, foreign) is None  # not opened without rotate
    with pytest.raises(ConvertError, match="another master key") as info:
        converter.convert(job, foreign, rotate=True)
    assert SECRET not in str(info.value)


def tampered(stored: str) -> str:
    """One character of the authentication tag changed (still valid base64url)."""
    at = len(stored) - 8
    return stored[:at] + ("A" if stored[at] != "A" else "B") + stored[at + 1 :]


def test_a_tampered_envelope_in_the_relaid_path(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.email"]
    bad = tampered(encrypt(keyring, job.key_id, SECRET.encode()))
    assert parse_header(bad) == (job.key_id, 1)  # still reads as an envelope
    with pytest.raises(ConvertError, match="authentication") as info:
        converter.convert(job, bad)
    assert SECRET not in str(info.value)


def test_a_tampered_envelope_in_the_rotated_path(
    converter: Converter, old_keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    job = jobs["public.users.ssn"]
    bad = tampered(encrypt(old_keyring, job.key_id, SECRET.encode()))
    assert converter.convert(job, bad) is None  # not opened without rotate
    with pytest.raises(ConvertError, match="authentication") as info:
        converter.convert(job, bad, rotate=True)
    assert SECRET not in str(info.value)


def test_a_tampered_indexed_value_in_the_rotated_path(
    converter: Converter, keyring: Keyring, jobs: dict[str, ColumnJob]
) -> None:
    # Copied from another column (so opened), then altered.
    job = jobs["public.users.phone"]
    value = compose(blind_index(keyring, job.key_id, "5550100"), encrypt(keyring, "x.y.z", b"555 0100"))
    with pytest.raises(ConvertError) as info:
        converter.convert(job, tampered(value), rotate=True)
    assert "555" not in str(info.value)
