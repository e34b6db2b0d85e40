"""client_login_timeout is declared like every other setting: file < environment < flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgcloak.cli import _settings_from, build_parser
from pgcloak.config import ConfigError, load_settings


def test_default_environment_flag_and_file(tmp_path: Path) -> None:
    assert load_settings(None, {}, environ={}).client_login_timeout == 60
    env = {"PGCLOAK_CLIENT_LOGIN_TIMEOUT": "2.5"}
    assert load_settings(None, {}, environ=env).client_login_timeout == 2.5
    assert load_settings(None, {"client_login_timeout": "7"}, environ=env).client_login_timeout == 7
    config = tmp_path / "pgcloak.yaml"
    config.write_text("client_login_timeout: 30\n")
    assert load_settings(config, {}, environ={}).client_login_timeout == 30


def test_command_line_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCLOAK_CLIENT_LOGIN_TIMEOUT", raising=False)
    args = build_parser().parse_args(["run", "--client-login-timeout", "1.5"])
    assert _settings_from(args).client_login_timeout == 1.5


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_refused_values_name_the_setting(value: str) -> None:
    with pytest.raises(ConfigError, match=r"client_login_timeout \(from --client-login-timeout\)"):
        load_settings(None, {"client_login_timeout": value}, environ={})
