"""Proxy settings: YAML file, overridden by PGCLOAK_* environment variables, overridden by flags.

One flat model so that every key has exactly one spelling in each of the three
places: ``backend_tls_mode`` in YAML, ``PGCLOAK_BACKEND_TLS_MODE`` in the
environment, ``--backend-tls-mode`` on the command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "PGCLOAK_"

ClientTlsMode = Literal["disable", "allow", "require"]
BackendTlsMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]


class ConfigError(Exception):
    """A setting that cannot be used; the message names the setting and where it came from."""


class Settings(BaseModel):
    """Everything ``pgcloak run`` needs. Secrets are SecretStr so they never print."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:6432", description="HOST:PORT to accept clients on")
    backend: str = Field(
        "postgresql://127.0.0.1:5432",
        description="PostgreSQL server: postgresql://HOST:PORT[/DB]; DB is used for the proxy's own side connections",
    )
    client_tls_mode: ClientTlsMode | None = Field(
        None, description="disable | allow | require; default allow when a certificate is set"
    )
    client_tls_cert: Path | None = None
    client_tls_key: Path | None = None
    backend_tls_mode: BackendTlsMode = "prefer"
    backend_tls_ca: Path | None = Field(None, description="CA file for verify-ca / verify-full")
    backend_tls_cert: Path | None = Field(None, description="client certificate towards PostgreSQL")
    backend_tls_key: Path | None = None
    auth_mode: Literal["relay", "scram"] = Field(
        "relay", description="relay: PostgreSQL authenticates the client; scram: pgcloak does"
    )
    auth_file: Path | None = Field(
        None, description='scram mode: lines of "user" "SCRAM-SHA-256$..." (PgBouncer userlist format)'
    )
    auth_user: str | None = Field(None, description="scram mode: role for the auth query connection")
    auth_password: SecretStr | None = None
    auth_query: str = "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
    auth_dbname: str = Field(
        "postgres", description="scram mode: database of the auth query connection when backend names none"
    )
    policy: Path | None = Field(None, description="YAML policy naming the protected columns (enables encryption)")
    policy_poll_interval: float = Field(1.0, gt=0, description="seconds between checks of the policy file for edits")
    master_key: SecretStr | None = Field(None, description="base64 master key (use PGCLOAK_MASTER_KEY, never a flag)")
    master_key_file: Path | None = Field(None, description="file holding the base64 master key (mode 0600)")
    master_key_shares: str | None = Field(
        None, description="comma-separated files of k-of-n Shamir shares of the master key"
    )
    max_client_connections: int = Field(
        1000, ge=1, description="client connections open at once, logged in or not; past it: 53300"
    )
    client_login_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds from accept to the end of the login (TLS, StartupMessage, "
        "authentication); then FATAL 08P01",
    )
    drain_timeout: float = Field(30.0, ge=0, description="seconds sessions may finish after SIGTERM")
    connect_timeout: float = Field(
        10.0, gt=0, description="seconds to wait for a TCP connection to PostgreSQL (a session's, the auth query's)"
    )
    max_message_size: int = Field(256 * 1024 * 1024, ge=1024)
    workers: int = Field(1, ge=1, le=64)
    admin_listen: str | None = Field(
        None,
        description="HOST:PORT serving /healthz, /readyz and /metrics (off when unset; with "
        "--workers N, worker i serves PORT+i)",
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        split_host_port(v)
        return v

    @field_validator("admin_listen")
    @classmethod
    def _check_admin_listen(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v)
        return v

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str) -> str:
        parse_backend(v)
        return v

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]

    @property
    def backend_host(self) -> str:
        return parse_backend(self.backend)[0]

    @property
    def backend_port(self) -> int:
        return parse_backend(self.backend)[1]

    @property
    def backend_dbname(self) -> str | None:
        return parse_backend(self.backend)[2]

    @property
    def effective_client_tls_mode(self) -> ClientTlsMode:
        if self.client_tls_mode is not None:
            return self.client_tls_mode
        return "allow" if self.client_tls_cert else "disable"


def split_host_port(text: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_backend(url: str) -> tuple[str, int, str | None]:
    """Parse postgresql://HOST:PORT[/DB] (credentials are refused: they would end up in logs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"backend must be a postgresql:// URL, got scheme {parts.scheme!r}")
    if parts.username or parts.password:
        raise ValueError("backend URL must not carry credentials; use auth_user / PGCLOAK_AUTH_PASSWORD")
    try:
        port = parts.port or 5432
    except ValueError as exc:
        raise ValueError(f"bad backend port in {url!r}") from exc
    db = unquote(parts.path.lstrip("/")) or None
    return parts.hostname or "127.0.0.1", port, db


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = Settings.model_fields
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                out[name] = value
    return out


def load_settings(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge file < environment < flags and validate; errors say which setting and where."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{config_file}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: expected a mapping of settings")
        for k, v in data.items():
            merged[str(k).replace("-", "_")] = v
            source[str(k).replace("-", "_")] = str(config_file)
    for k, v in _env_overrides(os.environ if environ is None else environ).items():
        merged[k] = v
        source[k] = f"{ENV_PREFIX}{k.upper()}"
    for k, v in (flags or {}).items():
        if v is not None:
            merged[k] = v
            source[k] = "--" + k.replace("_", "-")
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        reasons = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "settings"
            where = source.get(str(err["loc"][0]), "default") if err["loc"] else "settings"
            reasons.append(f"{key} (from {where}): {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(reasons)) from None
    _check_consistency(settings)
    return settings


def _check_consistency(s: Settings) -> None:
    mode = s.effective_client_tls_mode
    if mode != "disable" and not (s.client_tls_cert and s.client_tls_key):
        raise ConfigError(f"client_tls_mode={mode} needs client_tls_cert and client_tls_key")
    if s.backend_tls_mode in ("verify-ca", "verify-full") and not s.backend_tls_ca:
        raise ConfigError(f"backend_tls_mode={s.backend_tls_mode} needs backend_tls_ca")
    if s.policy is not None and not (s.master_key or s.master_key_file or s.master_key_shares):
        raise ConfigError(
            "a policy needs a master key: PGCLOAK_MASTER_KEY, master_key_file or master_key_shares "
            "(create one with `pgcloak keys generate`)"
        )
    if s.auth_mode == "scram" and not (s.auth_file or s.auth_user):
        raise ConfigError("auth_mode=scram needs auth_file or auth_user (for the auth query)")
