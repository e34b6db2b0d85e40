"""The command line's settings flags: a secret given as a flag is refused with the way to
give it instead (never argparse's "ambiguous option", never echoing the value), and the
README's settings table lists every setting `pgcloak run --help` does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgcloak import cli
from pgcloak.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "c2VjcmV0LXZhbHVlLW5ldmVyLWVjaG9lZA=="


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--master-key", SECRET],
        ["run", f"--master-key={SECRET}"],
        ["run", "--master-key"],
        ["backfill", "p.yaml", "--dsn", "postgresql://db/app", "--master-key", SECRET],
        ["audit", "verify", "--master-key", SECRET, "audit.jsonl"],
        ["audit", "who-accessed", "--master-key", SECRET, "--column", "users.email", "--value", "v", "--policy", "p"],
    ],
)
def test_a_master_key_flag_says_how_to_give_the_key(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ambiguous" not in err and SECRET not in err
    assert "--master-key is not accepted" in err
    assert "PGCLOAK_MASTER_KEY, --master-key-file or --master-key-shares" in err


def test_an_auth_password_flag_says_how_to_give_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--auth-password", SECRET])
    err = capsys.readouterr().err
    assert SECRET not in err and "PGCLOAK_AUTH_PASSWORD" in err


def test_the_key_flags_that_exist_still_parse() -> None:
    args = cli.build_parser().parse_args(["run", "--master-key-file", "k", "--master-key-shares", "a,b"])
    assert (args.master_key_file, args.master_key_shares) == ("k", "a,b")
    assert not hasattr(args, "master_key")  # nothing for the settings to pick up


def test_the_readme_settings_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    first_cells = [line.split("|")[1] for line in readme.splitlines() if line.startswith("| `")]
    listed = set(re.findall(r"`([a-z_]+)`", " ".join(first_cells)))
    assert set(Settings.model_fields) <= listed, sorted(set(Settings.model_fields) - listed)
