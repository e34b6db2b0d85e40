"""Loading policies: every kind of error names the file, line, column and reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pgcloak.policy import (
    Policy,
    PolicyError,
    load_policy,
    load_policy_or_keep,
    parse_policy,
    policy_from_mapping,
)


def _err(text: str, source: str = "p.yaml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text).lstrip("\n"), source)
    return info.value


def test_wrong_enum_points_at_the_value() -> None:
    err = _err(
        """
        version: 1
        tables:
          public.users:
            email: {index: exakt}
        """
    )
    assert (err.file, err.line, err.column) == ("p.yaml", 4, 20)
    assert err.path == "tables.public.users.email.index"
    assert err.reason == "Input should be 'exact' (got 'exakt')"
    assert str(err) == (
        "p.yaml:4:20: tables.public.users.email.index: Input should be 'exact' (got 'exakt')"
    )


def test_unknown_key_points_at_the_key_and_suggests() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email:
              encrypt: true
              indx: exact
        """
    )
    assert (err.line, err.column) == (6, 7)
    assert err.path == "tables.users.email.indx"
    assert err.reason.startswith("unknown key 'indx'; did you mean 'index'?")
    assert "allowed: encrypt, index, normalize, join_group, hash_only, key_version" in err.reason


def test_unknown_top_level_key() -> None:
    err = _err("version: 1\ntabels: {}\n")
    assert (err.line, err.column, err.path) == (2, 1, "tabels")
    assert "did you mean 'tables'?" in err.reason


def test_duplicate_key_is_an_error() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email: {index: exact}
            email: {}
        """
    )
    assert (err.line, err.column) == (5, 5)
    assert "duplicate key 'email' (first given at line 4, column 5)" in err.reason


def test_duplicate_top_level_key() -> None:
    err = _err("version: 1\nversion: 1\n")
    assert (err.line, err.column) == (2, 1)
    assert "duplicate key 'version'" in err.reason


def test_yaml_syntax_error_has_a_line() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email: {index: exact
        roles: {}
        """
    )
    assert err.line == 5
    assert err.reason.startswith("YAML syntax error:")
    assert err.path == ""
    assert str(err).startswith("p.yaml:5:")


def test_tab_indentation_is_a_syntax_error() -> None:
    err = _err("version: 1\ntables:\n\tusers: {}\n")
    assert err.line == 3
    assert "YAML syntax error" in err.reason


def test_bad_combination_hash_only_without_index() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            ssn: {hash_only: true}
        """
    )
    assert (err.line, err.path) == (4, "tables.users.ssn")
    assert err.reason == "hash_only: true requires index: exact (the stored value is the index)"


@pytest.mark.parametrize(
    ("column", "fragment"),
    [
        ("{hash_only: true, index: exact, encrypt: true}", "cannot be combined with encrypt"),
        ("{encrypt: false}", "encrypt: false leaves the column unprotected"),
        ("{encrypt: false, index: exact}", "encrypt: false leaves the column unprotected"),
        ("{join_group: g}", "join_group requires index: exact"),
        ("{index: exact, join_group: Bad.Group}", "join group names are lowercase"),
        ("{key_version: 0}", "greater than or equal to 1"),
        ("{key_version: '2'}", "valid integer (got '2')"),
        ("{encrypt: 'true'}", "valid boolean (got 'true')"),
        ("{normalize: mail}", "Input should be 'email', 'phone' or 'none' (got 'mail')"),
        ("true", "expected a mapping, got true"),
    ],
)
def test_column_errors(column: str, fragment: str) -> None:
    err = _err(f"version: 1\ntables:\n  users:\n    c: {column}\n")
    assert fragment in err.reason
    assert err.path.startswith("tables.users.c")
    assert err.line == 4


def test_missing_version_points_at_document() -> None:
    err = _err("tables: {}\n")
    assert (err.line, err.column, err.path, err.reason) == (
        1,
        1,
        "version",
        "required key is missing",
    )


def test_wrong_version() -> None:
    err = _err("version: 2\n")
    assert (err.line, err.column, err.path) == (1, 10, "version")
    assert "Input should be 1" in err.reason


def test_empty_and_non_mapping_documents() -> None:
    assert _err("").reason == "the policy is empty"
    assert _err("# only a comment\n").line == 1
    assert _err("- 1\n").reason == "expected a mapping, got a list"


def test_several_documents_are_refused() -> None:
    err = _err("version: 1\n---\nversion: 1\n")
    assert err.line == 2
    assert "single document" in err.reason


def test_unsafe_tags_are_refused() -> None:
    err = _err("version: !!python/object:os.system {}\n")
    assert err.line == 1
    assert "python/object" in err.reason


def test_all_problems_are_reported_in_document_order() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email: {index: exakt}
        guards: {max_pii_rows: 0, unbounded_select: maybe}
        """
    )
    assert [(i.line, i.path) for i in err.issues] == [
        (4, "tables.users.email.index"),
        (5, "guards.max_pii_rows"),
        (5, "guards.unbounded_select"),
    ]
    assert len(str(err).splitlines()) == 3


def test_read_union_errors_hide_pydantic_tags() -> None:
    err = _err(
        """
        version: 1
        tables: {users: {email: {}}}
        roles:
          support: {read: {users.email: hide}}
          other: {read: sometimes}
        """
    )
    assert [(i.path, i.line, i.column) for i in err.issues] == [
        ("roles.support.read.users.email", 4, 33),
        ("roles.other.read", 5, 17),
    ]
    assert err.issues[1].reason.endswith(
        "or a mapping from columns to one of those (got 'sometimes')"
    )


def test_reference_to_unknown_column_points_at_the_key() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email: {}
        roles:
          support:
            read:
              users.emial: mask
        """
    )
    assert (err.line, err.column, err.path) == (8, 7, "roles.support.read.users.emial")
    assert err.reason == (
        "public.users.emial is not a protected column (protected columns of public.users: email)"
    )


def test_reference_to_unknown_table() -> None:
    err = _err("version: 1\ntables: {users: {email: {}}}\nroles: {r: {read: {orders.*: mask}}}\n")
    assert "public.orders is not a protected table (protected tables: public.users)" in err.reason


def test_rule_stricter_than_default_read_is_refused() -> None:
    err = _err(
        "version: 1\ndefault_read: mask\ntables: {users: {email: {}}}\n"
        "roles: {analyst: {read: deny}}\n"
    )
    assert (err.line, err.path) == (4, "roles.analyst.read")
    assert "stricter than default_read 'mask'" in err.reason


def test_join_group_members_must_share_normalize() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email: {index: exact, normalize: email, join_group: customer_email}
          orders:
            buyer_email: {index: exact, join_group: customer_email}
        """
    )
    assert (err.line, err.path) == (6, "tables.orders.buyer_email.join_group")
    assert "mixes normalize 'none' here with 'email' on public.users.email" in err.reason


def test_names_colliding_after_folding_are_refused() -> None:
    err = _err("version: 1\ntables:\n  users: {a: {}}\n  Public.Users: {b: {}}\n")
    assert (err.line, err.column) == (4, 3)
    assert err.reason == "'Public.Users' is table public.users, already listed as 'users'"
    err = _err("version: 1\ntables:\n  users: {Email: {}, email: {}}\n")
    assert "'email' is column email, already listed as 'Email'" in err.reason
    err = _err(
        "version: 1\ntables: {users: {e: {}}}\nroles: {app: {read: reveal}, APP: {read: reveal}}\n"
    )
    assert err.path == "roles.APP"


@pytest.mark.parametrize(
    "name",
    ["a b", "a.b.c", "1users", '"a.b"', '""', "users.", "x" * 64],
)
def test_bad_table_names(name: str) -> None:
    quoted = name.replace("'", "''")
    err = _err(f"version: 1\ntables:\n  '{quoted}': {{email: {{}}}}\n")
    assert (err.line, err.column) == (3, 3)
    assert err.path == f"tables.{name}"


def test_public_is_not_a_role() -> None:
    err = _err("version: 1\nroles: {public: {read: reveal}}\n")
    assert "use default_read" in err.reason


def test_yaml_keys_named_like_booleans_are_columns() -> None:
    policy = parse_policy("version: 1\ntables:\n  t:\n    on: {}\n    no: {}\n")
    assert set(policy.columns_of("public.t")) == {"on", "no"}


def test_anchors_and_merge_keys() -> None:
    policy = parse_policy(
        textwrap.dedent(
            """
            version: 1
            tables:
              users:
                email: &lookup {index: exact, normalize: email}
                backup_email: *lookup
                alt_email: {<<: *lookup, key_version: 2}
            """
        )
    )
    cols = policy.columns_of("public.users")
    assert cols["backup_email"] == cols["email"]
    assert cols["alt_email"].key_version == 2
    assert cols["alt_email"].normalize == "email"


def test_merged_keys_keep_their_positions_for_errors() -> None:
    err = _err(
        """
        version: 1
        tables:
          users:
            email: {<<: {index: exakt}, normalize: email}
        """
    )
    assert (err.line, err.column, err.path) == (4, 25, "tables.users.email.index")


def test_recursive_alias_is_refused() -> None:
    err = _err("version: 1\ntables: &t {users: *t}\n")
    assert "too deeply" in err.reason


def test_load_policy_from_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ntables: {users: {email: {}}}\n")
    policy = load_policy(path)
    assert policy.source == str(path)
    assert policy.protected_tables() == frozenset({"public.users"})


def test_load_policy_io_and_encoding_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert info.value.file == str(missing)
    assert info.value.line is None
    assert info.value.reason.startswith("cannot read the policy")
    assert str(info.value).startswith(f"{missing}: cannot read the policy")

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(bad)
    assert (info.value.line, info.value.column) == (2, 6)
    assert "UTF-8" in info.value.reason


def test_load_policy_or_keep(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ntables: {users: {email: {}}}\n")
    first, err = load_policy_or_keep(path, None)
    assert isinstance(first, Policy) and err is None

    path.write_text("version: 1\ntables: {users: {email: {index: nope}}}\n")
    kept, err = load_policy_or_keep(path, first)
    assert kept is first
    assert err is not None and err.line == 2

    path.write_text("version: 1\ntables: {users: {phone: {}}}\n")
    second, err = load_policy_or_keep(path, first)
    assert err is None and second is not None and second is not first
    assert second.fingerprint != first.fingerprint


def test_policy_from_mapping_reports_paths_without_lines() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"version": 1, "tables": {"users": {"email": {"index": "x"}}}})
    assert (info.value.line, info.value.path) == (None, "tables.users.email.index")
    assert str(info.value).startswith("<mapping>: tables.users.email.index: ")


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    err = _err("\n".join(lines) + "\n")
    assert "too large" in err.reason


def test_control_characters_are_refused_with_a_position() -> None:
    err = _err("version: 1\ntables: {}\n# bell \x07\n")
    assert (err.line, err.column) == (3, 8)
    assert "special characters are not allowed" in err.reason


def test_columns_count_characters_not_bytes() -> None:
    err = _err('version: 1\ntables:\n  "é": {x: {index: exakt}}\n')
    assert (err.line, err.column) == (3, 20)


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        ("[" * 5000 + "\n", (1, 1001), "nesting depth"),
        ("{" * 5000 + "\n", (1, 1001), "nesting depth"),
        ("- " * 5000 + "x\n", None, "nest"),
        ("version: 1" + "0" * 5000 + "\ntables: {}\n", (1, 10), "int value cannot be read"),
        ("version: 1\ntables: {users: {email: {key_version: 1" + "0" * 5000 + "}}}\n", (2, 39), "int value"),
        ("version: 1\ntables: {}\nx: 2020-13-01\n", (3, 4), "timestamp value cannot be read"),
        ("version: 1\ntables: {}\nx: !!int nope-secret\n", (3, 4), "int value cannot be read"),
        ("version: 1\ntables: {}\nx: !!float nope-secret\n", (3, 4), "float value cannot be read"),
    ],
    ids=["brackets", "braces", "dashes", "huge-int", "huge-key-version", "bad-date", "bad-int", "bad-float"],
)
def test_yaml_that_breaks_the_parser_or_a_constructor_is_a_policy_error(
    tmp_path: Path, text: str, where: tuple[int, int] | None, fragment: str
) -> None:
    """Not a RecursionError or a ValueError escaping: a reload would die of it, and
    ``pgcloak run`` would print a traceback instead of the file and the reason."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert err.file == str(path)
    assert fragment in err.reason
    if where is not None:
        assert (err.line, err.column) == where
    assert "secret" not in str(err)  # the value is not repeated
    assert len(str(err)) < 300


def test_any_other_failure_is_a_policy_error_without_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgcloak.policy import loader

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("postgresql://audit:hunter2@db/x")

    monkeypatch.setattr(loader, "_build", boom)
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ntables: {}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: the policy cannot be read (RuntimeError)"
