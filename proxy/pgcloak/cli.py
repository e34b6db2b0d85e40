"""Command line: wiring only. Each subcommand calls into the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pgcloak import __version__
from pgcloak.config import ConfigError, Settings, load_settings

# Settings that must not be given on a command line (visible in `ps`).
_NO_FLAG = {"auth_password", "master_key"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override --config and PGCLOAK_* variables)")
    for name, field in Settings.model_fields.items():
        if name in _NO_FLAG:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default
        desc = field.description or ""
        hint = f"{desc} (default: {default})" if default is not None else desc
        group.add_argument(flag, dest=name, default=None, help=hint or None)


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return load_settings(args.config, flags)


def cmd_run(args: argparse.Namespace) -> int:
    from pgcloak.logs import setup_logging
    from pgcloak.session.server import run

    settings = _settings_from(args)
    setup_logging(settings.log_format, settings.log_level)
    return run(settings)


def cmd_demo(args: argparse.Namespace) -> int:
    from pgcloak.demo.run import run_demo

    return run_demo(listen=args.listen, backend=args.backend, keep=args.keep_data)


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from pgcloak.policy import PolicyError, load_policy

    status = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            print(str(exc), file=sys.stderr)
            status = 1
            continue
        tables = ", ".join(sorted(policy.protected_tables())) or "none"
        print(f"{path}: OK (protected tables: {tables}; fingerprint {policy.fingerprint[:12]})")
    return status


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from pgcloak.policy import schema_json

    sys.stdout.write(schema_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgcloak", description="PostgreSQL privacy proxy")
    parser.add_argument("--version", action="version", version=f"pgcloak {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy in front of a PostgreSQL server")
    run.add_argument("--config", type=Path, default=None, help="YAML settings file")
    _add_settings_flags(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="a throwaway PostgreSQL with pgcloak in front, for trying it out")
    demo.add_argument("--listen", default="127.0.0.1:6432", help="where the proxy listens")
    demo.add_argument(
        "--backend",
        default=None,
        help="use this PostgreSQL (postgresql://USER:PASSWORD@HOST:PORT/DB, a superuser) instead of starting one",
    )
    demo.add_argument("--keep-data", action="store_true", help="do not delete the throwaway server's data")
    demo.set_defaults(func=cmd_demo)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    validate = policy.add_parser("validate", help="check policy files; errors give file:line:column")
    validate.add_argument("files", nargs="+", type=Path)
    validate.set_defaults(func=cmd_policy_validate)
    schema = policy.add_parser("schema", help="print the policy JSON Schema")
    schema.set_defaults(func=cmd_policy_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"pgcloak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
