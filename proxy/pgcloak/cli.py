"""Command line: wiring only. Each subcommand calls into the package."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pgcloak import __version__
from pgcloak.config import ConfigError, Settings, load_settings
from pgcloak.crypto.errors import CryptoError
from pgcloak.policy import PolicyError

if TYPE_CHECKING:
    from pgcloak.admin.http import AdminServer
    from pgcloak.crypto.keys import MasterKey
    from pgcloak.inject.mutate import InjectorConfig
    from pgcloak.session.server import ProxyServer

NOBODY_READS = (
    "no role may read the protected columns (default_read: deny and no roles: entry); "
    "add one for the application's PostgreSQL role, e.g. roles: {app: {read: reveal}}"
)

# Settings that must not be given on a command line (visible in `ps`).
_NO_FLAG = {"auth_password", "master_key"}

_KEY_SOURCES = "PGCLOAK_MASTER_KEY, --master-key-file or --master-key-shares"


def _refuse_secret_flag(flag: str, how: str) -> type[argparse.Action]:
    """An action for ``flag`` (never offered) that says how the secret is given instead:
    without it argparse answers ``--master-key`` with "ambiguous option". The value is
    never echoed."""

    class Refuse(argparse.Action):
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: object,
            option_string: str | None = None,
        ) -> None:
            parser.error(f"{flag} is not accepted: a secret on the command line shows in ps and shell history; {how}")

    return Refuse


def _add_secret_refusals(parser: argparse.ArgumentParser, *, config: bool) -> None:
    also = " (or master_key in the --config file)" if config else ""
    parser.add_argument(
        "--master-key",
        nargs="?",
        default=argparse.SUPPRESS,
        action=_refuse_secret_flag("--master-key", f"give the master key with {_KEY_SOURCES}{also}"),
        help=argparse.SUPPRESS,
    )
    if config:
        parser.add_argument(
            "--auth-password",
            nargs="?",
            default=argparse.SUPPRESS,
            action=_refuse_secret_flag(
                "--auth-password", "give it with PGCLOAK_AUTH_PASSWORD or auth_password in the --config file"
            ),
            help=argparse.SUPPRESS,
        )


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
    return run(settings, services=[_admin_service] if settings.admin_listen else [])


def _admin_service(server: ProxyServer, worker: int | None) -> AdminServer:
    """The admin endpoints of one worker: worker i listens on admin_listen's port + i."""
    from pgcloak.admin.http import AdminServer
    from pgcloak.config import split_host_port

    assert server.settings.admin_listen is not None
    host, port = split_host_port(server.settings.admin_listen)
    if port and worker:
        port += worker
    return AdminServer(host, port, server, worker)


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
        if policy.nobody_reads:
            print(f"{path}: note: {NOBODY_READS}", file=sys.stderr)
    return status


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from pgcloak.policy import schema_json

    sys.stdout.write(schema_json())
    return 0


def _write_secret(path: Path, text: str) -> None:
    """Create a 0600 file (refusing to overwrite) so key material is never world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


def _read_master_key(args: argparse.Namespace) -> MasterKey:
    from pgcloak.crypto.keys import master_key_from_text
    from pgcloak.crypto.sources import EnvKeySource, FileKeySource

    if args.key_file is not None:
        return FileKeySource(args.key_file).load()
    if os.environ.get("PGCLOAK_MASTER_KEY"):
        return EnvKeySource().load()
    return master_key_from_text(sys.stdin.readline())


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from pgcloak.crypto.keys import generate_master_key, master_key_to_text

    text = master_key_to_text(generate_master_key())
    if args.out is None:
        print(text)
    else:
        _write_secret(args.out, text)
        print(f"wrote {args.out} (mode 0600)", file=sys.stderr)
    return 0


def cmd_keys_split(args: argparse.Namespace) -> int:
    from pgcloak.crypto.keys import split_master_key

    shares = split_master_key(_read_master_key(args), args.shares, args.threshold)
    if args.out_dir is None:
        print("\n".join(shares))
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for n, share in enumerate(shares, 1):
        _write_secret(args.out_dir / f"share-{n}", share)
    print(f"wrote {len(shares)} shares to {args.out_dir}; any {args.threshold} recover the key", file=sys.stderr)
    return 0


def cmd_keys_combine(args: argparse.Namespace) -> int:
    from pgcloak.crypto.keys import combine_shares, master_key_to_text
    from pgcloak.crypto.sources import read_secret_file

    texts = [t for f in args.files for t in read_secret_file(f).split()]
    text = master_key_to_text(combine_shares(texts))
    if args.out is None:
        print(text)
    else:
        _write_secret(args.out, text)
        print(f"wrote {args.out} (mode 0600)", file=sys.stderr)
    return 0


def _injector_config(args: argparse.Namespace) -> InjectorConfig:
    import yaml
    from pydantic import ValidationError

    from pgcloak.inject.mutate import InjectorConfig

    data: dict[str, object] = {}
    if args.config is not None:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of injector settings")
        data.update(loaded)
    if args.image:
        data["image"] = args.image
    try:
        return InjectorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"injector settings: {exc}") from None


def cmd_inject_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from pgcloak.config import split_host_port
    from pgcloak.inject.server import CERT_POLL, InjectorServer, ServingCertificate
    from pgcloak.logs import setup_logging
    from pgcloak.session.server import install_event_loop_policy

    config = _injector_config(args)
    setup_logging("json" if args.log_json else "text", "info")
    host, port = split_host_port(args.listen)
    # --tls-cert/--tls-key are re-read when they change (a renewed certificate); how
    # often they are looked at is a hidden knob, for tests.
    poll_text = os.environ.get("PGCLOAK_INJECT_CERT_POLL_SECONDS", str(CERT_POLL))
    try:
        poll = float(poll_text)
    except ValueError:
        poll = -1.0
    if not 0 < poll <= 3600:
        raise ConfigError(f"PGCLOAK_INJECT_CERT_POLL_SECONDS: expected seconds in (0, 3600], got {poll_text!r}")
    certificate = ServingCertificate(args.tls_cert, args.tls_key, poll=poll)
    install_event_loop_policy()

    async def main() -> None:
        server = InjectorServer(host, port, certificate, config)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()

    asyncio.run(main())
    return 0


def cmd_inject_mutate(args: argparse.Namespace) -> int:
    """Answer an AdmissionReview from a file: what the webhook would do, without a cluster."""
    import json

    from pgcloak.inject.mutate import mutate

    config = _injector_config(args)
    try:
        review = json.loads(Path(args.review).read_text() if args.review != "-" else sys.stdin.read())
        if not isinstance(review, dict):
            raise ValueError("not a JSON object")
        answer = mutate(review, config)
    except ValueError as exc:
        raise ConfigError(f"{args.review}: expected an AdmissionReview (admission.k8s.io/v1): {exc}") from None
    print(json.dumps(answer, indent=2))
    return 0 if answer["response"]["allowed"] else 1


def cmd_explain(args: argparse.Namespace) -> int:
    from pgcloak.crypto.blind_index import INDEX_LENGTH
    from pgcloak.policy import load_policy
    from pgcloak.sql import Planner, explain_text, read_denial
    from pgcloak.sql.search_path import parse_setting

    policy = load_policy(args.policy)
    path = parse_setting(args.search_path, args.user)
    plan = Planner(policy, index_length=INDEX_LENGTH, search_path=path).plan(args.sql)
    print(explain_text(plan))
    allowed = plan.decision.allowed
    if args.role:
        # What a session whose login holds these roles gets (memberships included).
        view = policy.read_view(args.role)
        print(f"as {', '.join(args.role)}:")
        for key_id in plan.audit.pii_read:
            print(f"  {key_id}: {view.decision(key_id)}")
        denied = read_denial(plan, view.decision)  # what the session refuses, the same way
        if denied is not None:
            allowed = False
            if plan.decision.allowed:
                how = "searched by" if denied[1] else "read"
                print(f"  refused (SQLSTATE 42501): {denied[0]} may not be {how}")
        if not plan.decision.allowed:
            print("  refused (see above)")
        elif allowed:
            print("  allowed; values of other protected columns in the result are decided by their key ids")
    return 0 if allowed else 1


def cmd_policy_ddl(args: argparse.Namespace) -> int:
    from pgcloak.policy import load_policy
    from pgcloak.policy.ddl import policy_ddl
    from pgcloak.policy.names import InvalidName, split_identifiers

    policy = load_policy(args.file)
    try:  # spelled as in SQL: users.email, crm."Contacts"."Email"
        unique = {split_identifiers(u, what="--unique column") for u in args.unique}
    except InvalidName as exc:
        print(f"pgcloak policy ddl: {exc}", file=sys.stderr)
        return 2
    for line in policy_ddl(policy, unique, checks=not args.no_check):
        print(line)
    return 0


_COLUMN_FACTS_SQL = """
SELECT format_type(a.atttypid, a.atttypmod) AS type,
       (SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
         WHERE c.conrelid = t.oid AND c.conname = $4 AND c.contype = 'c') AS check_def,
       coalesce((SELECT c.convalidated FROM pg_constraint c
         WHERE c.conrelid = t.oid AND c.conname = $4 AND c.contype = 'c'), false) AS validated,
       (SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
         WHERE x.indrelid = t.oid AND i.relname = $5) AS index_name,
       EXISTS (SELECT 1 FROM pg_attrdef ad WHERE ad.adrelid = t.oid AND ad.adnum = a.attnum
                 AND pg_get_expr(ad.adbin, ad.adrelid) NOT ILIKE 'NULL%') AS has_default,
       t.oid AS table_oid
  FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
  LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attname = $3 AND NOT a.attisdropped
 WHERE n.nspname = $1 AND t.relname = $2
"""
#: Views that read a table, directly or through other views: pgcloak decrypts what they
#: return, and cannot see a write through one.
_VIEWS_SQL = """
WITH RECURSIVE readers(oid) AS (
    SELECT r.ev_class FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
     WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = $1 AND r.ev_class <> $1
    UNION
    SELECT r.ev_class FROM readers JOIN pg_depend d ON d.refobjid = readers.oid
      JOIN pg_rewrite r ON r.oid = d.objid
     WHERE d.classid = 'pg_rewrite'::regclass AND r.ev_class <> readers.oid
)
SELECT DISTINCT c.oid::regclass::text AS view
  FROM readers JOIN pg_class c ON c.oid = readers.oid
 WHERE c.relkind = 'v'
 ORDER BY 1
"""


def cmd_policy_check_db(args: argparse.Namespace) -> int:
    """Compare a database with what `policy ddl` gives the policy's protected columns."""
    import asyncio

    import asyncpg

    from pgcloak.policy import load_policy
    from pgcloak.policy.ddl import ColumnFacts, column_needs, judge
    from pgcloak.policy.names import quote_ident as q

    policy = load_policy(args.file)
    needs = column_needs(policy)

    async def facts() -> tuple[list[ColumnFacts | None], dict[str, list[str]]]:
        conn = await asyncpg.connect(args.dsn, timeout=30)
        try:
            found: list[ColumnFacts | None] = []
            views: dict[str, list[str]] = {}
            for need in needs:
                row = await conn.fetchrow(_COLUMN_FACTS_SQL, need.schema, need.table, need.column, need.check, need.index)
                if row is None:
                    found.append(None)
                    continue
                in_clear = None
                if args.scan and row["type"] == "text":  # (another type is reported as such)
                    table = f"{q(need.schema)}.{q(need.table)}"
                    in_clear = await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE {q(need.column)} IS NOT NULL AND {q(need.column)} !~ $1",
                        need.pattern,
                    )
                found.append(
                    ColumnFacts(
                        row["type"], row["check_def"], row["validated"], row["index_name"], in_clear, row["has_default"]
                    )
                )
                key = f"{need.schema}.{need.table}"
                if key not in views:
                    views[key] = [r["view"] for r in await conn.fetch(_VIEWS_SQL, row["table_oid"])]
            return found, views
        finally:
            await conn.close()

    try:
        found, views = asyncio.run(facts())
    except (TimeoutError, OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"pgcloak policy check-db: cannot read the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    status = 0
    for need, fact in zip(needs, found, strict=True):
        problems, notes = judge(need, fact)
        print(f"{need.key_id}: {'OK' if not problems else 'PROBLEM'}")
        for line in problems:
            print(f"  problem: {line}")
        for line in notes:
            print(f"  note: {line}")
        status = status or (1 if problems else 0)
    for table, names in sorted(views.items()):
        if names:
            print(
                f"views over {table}: {', '.join(names)} (pgcloak decrypts and audits what they return; "
                "a write through them reaches the table as sent, and only the CHECK constraints stop plaintext)"
            )
    return status


def _master_key_for(args: argparse.Namespace) -> MasterKey:
    """--master-key-file / --master-key-shares / PGCLOAK_MASTER_KEY, as `pgcloak run` takes them."""
    from pgcloak.session.server import load_master_key

    flags = {"master_key_file": args.master_key_file, "master_key_shares": args.master_key_shares}
    return load_master_key(load_settings(None, flags))


def cmd_backfill(args: argparse.Namespace) -> int:
    """Bring the values already in the database to the policy's stored form."""
    from pgcloak.backfill import command
    from pgcloak.crypto.keyring import Keyring
    from pgcloak.policy import load_policy

    if args.batch < 1:
        print("pgcloak backfill: --batch must be >= 1", file=sys.stderr)
        return 2
    policy = load_policy(args.policy)
    return command.run(
        policy,
        Keyring(_master_key_for(args)),
        args.dsn,
        tables=args.table or (),
        batch_rows=args.batch,
        rotate=args.rotate,
        dry_run=args.dry_run,
    )


def _audit_key(args: argparse.Namespace) -> bytes:
    from pgcloak.crypto.keyring import Keyring

    return Keyring(_master_key_for(args)).audit_key()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from pgcloak.audit import cli as audit_cli

    return audit_cli.verify(
        args.files,
        lambda: _audit_key(args),
        dsn=args.dsn,
        allow_open=args.live,
        require_genesis=not args.partial,
        ignore_foreign=args.ignore_foreign,
    )


def cmd_audit_who_accessed(args: argparse.Namespace) -> int:
    from pgcloak.audit import cli as audit_cli
    from pgcloak.crypto.blind_index import blind_index
    from pgcloak.crypto.keyring import Keyring
    from pgcloak.policy import load_policy

    policy = load_policy(args.policy)
    table, _, column = args.column.lower().rpartition(".")
    qualified = table if "." in table else f"public.{table}"
    col = policy.column(qualified, column)
    if col is None or col.index is None:
        print(f"pgcloak: {qualified}.{column} has no blind index in {args.policy}", file=sys.stderr)
        return 2
    keyring = Keyring(_master_key_for(args))
    index = blind_index(keyring, policy.index_key_id(qualified, column), args.value, col.normalize)
    return audit_cli.who_accessed(
        args.files,
        policy.key_id(qualified, column),
        [index],
        dsn=args.dsn,
        key=lambda: keyring.audit_key(),
        include_column_access=args.include_scans,
        fmt="json" if args.json else "text",
    )


def _add_key_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--master-key-file", type=Path, help="default: PGCLOAK_MASTER_KEY")
    parser.add_argument("--master-key-shares", help="comma-separated share files")
    _add_secret_refusals(parser, config=False)
    parser.add_argument("--dsn", help="read the PostgreSQL audit sink table too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgcloak", description="PostgreSQL privacy proxy")
    parser.add_argument("--version", action="version", version=f"pgcloak {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy in front of a PostgreSQL server")
    run.add_argument("--config", type=Path, default=None, help="YAML settings file")
    _add_settings_flags(run)
    _add_secret_refusals(run, config=True)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="a throwaway PostgreSQL with pgcloak in front, for trying it out")
    demo.add_argument("--listen", default="127.0.0.1:6432", help="where the proxy listens")
    demo.add_argument(
        "--backend",
        default=None,
        help="instead, relay to this existing PostgreSQL (postgresql://USER@HOST:PORT/DB): a plain "
        "pass-through, with no policy, no encryption and no demo table (nothing is created there); "
        "USER and DB only go into the psql command it prints",
    )
    demo.add_argument("--keep-data", action="store_true", help="do not delete the throwaway server's data")
    demo.set_defaults(func=cmd_demo)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    validate = policy.add_parser("validate", help="check policy files; errors give file:line:column")
    validate.add_argument("files", nargs="+", type=Path)
    validate.set_defaults(func=cmd_policy_validate)
    schema = policy.add_parser("schema", help="print the policy JSON Schema")
    schema.set_defaults(func=cmd_policy_schema)
    ddl = policy.add_parser(
        "ddl", help="print the DDL the protected columns need (text type, lookup indexes, ciphertext-only checks)"
    )
    ddl.add_argument("file", type=Path)
    ddl.add_argument(
        "--no-check",
        action="store_true",
        help="leave out the CHECK constraints that refuse plaintext (while existing rows are still in clear)",
    )
    ddl.add_argument(
        "--unique",
        action="append",
        default=[],
        metavar="[SCHEMA.]TABLE.COLUMN",
        help='the index carries uniqueness; names as in SQL (crm."Contacts"."Email")',
    )
    ddl.set_defaults(func=cmd_policy_ddl)
    check_db = policy.add_parser(
        "check-db", help="check a database against what `policy ddl` gives the protected columns"
    )
    check_db.add_argument("file", type=Path)
    check_db.add_argument("--dsn", help="PostgreSQL connection URL (default: the PG* environment)")
    check_db.add_argument(
        "--scan", action="store_true", help="also count values not in pgcloak's stored form (reads every row)"
    )
    check_db.set_defaults(func=cmd_policy_check_db)

    inject = sub.add_parser("inject", help="Kubernetes sidecar injection (a mutating admission webhook)")
    inject_sub = inject.add_subparsers(dest="inject_command", required=True)
    serve = inject_sub.add_parser("serve", help="serve the webhook over HTTPS (POST /mutate)")
    serve.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default 0.0.0.0:8443)")
    serve.add_argument("--tls-cert", type=Path, required=True, help="PEM certificate the API server trusts")
    serve.add_argument("--tls-key", type=Path, required=True)
    serve.add_argument("--log-json", action="store_true", help="JSON log lines")
    dry = inject_sub.add_parser("mutate", help="answer an AdmissionReview from a file ('-': stdin), no cluster")
    dry.add_argument("review")
    for p in (serve, dry):
        p.add_argument("--image", help="pgcloak image for the sidecar (or 'image' in --config)")
        p.add_argument("--config", type=Path, default=None, help="YAML injector settings")
    serve.set_defaults(func=cmd_inject_serve)
    dry.set_defaults(func=cmd_inject_mutate)

    explain = sub.add_parser("explain", help="show how pgcloak plans a statement (no connection)")
    explain.add_argument("sql")
    explain.add_argument("--policy", type=Path, required=True)
    explain.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="ROLE",
        help="also show the read decisions for a login holding ROLE (repeat for each role it is a member of)",
    )
    explain.add_argument(
        "--search-path",
        default="public",
        metavar="SCHEMAS",
        help="the session's search_path, as SHOW search_path prints it: unqualified table names "
        "mean the first of these schemas where the policy protects them (default: public)",
    )
    explain.add_argument("--user", default="", help='what "$user" in --search-path stands for')
    explain.set_defaults(func=cmd_explain)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check audit files: OK, or the first bad record and why")
    verify.add_argument("files", nargs="*", type=Path)
    verify.add_argument("--live", action="store_true", help="the proxy is still running (no shutdown seal yet)")
    verify.add_argument(
        "--partial",
        action="store_true",
        help="the oldest files were removed by retention: a chain may begin where a file began "
        "(nowhere else)",
    )
    verify.add_argument("--ignore-foreign", action="store_true", help="skip lines that are not audit records")
    _add_key_flags(verify)
    verify.set_defaults(func=cmd_audit_verify)
    who = audit.add_parser("who-accessed", help="every event that looked up one subject's value")
    who.add_argument("files", nargs="*", type=Path)
    who.add_argument("--column", required=True, metavar="TABLE.COLUMN")
    who.add_argument("--value", required=True, help="hashed with the column's blind-index key, never searched in clear")
    who.add_argument("--policy", type=Path, required=True)
    who.add_argument("--include-scans", action="store_true", help="also events that read the column without a lookup")
    who.add_argument("--json", action="store_true")
    _add_key_flags(who)
    who.set_defaults(func=cmd_audit_who_accessed)

    backfill = sub.add_parser(
        "backfill",
        help="encrypt the values already in the database (and re-encrypt under a new key_version)",
        description="Connects straight to PostgreSQL (not through the proxy) and brings every "
        "protected value to the policy's stored form: plaintext is encrypted (or hashed), a "
        "stored value of another layout is stored again; with --rotate, values sealed under "
        "an older key_version are sealed again. Batches of rows, each its own transaction; "
        "can be stopped and run again. Nothing is written when a table is missing, a column is "
        "not text, or stored values were sealed under another master key.",
    )
    backfill.add_argument("policy", type=Path)
    backfill.add_argument("--dsn", required=True, help="postgresql://... of the database itself (a role that may UPDATE the tables)")
    backfill.add_argument("--table", action="append", help="only this protected table (repeatable; default: all)")
    backfill.add_argument("--batch", type=int, default=1000, help="rows per transaction (default 1000)")
    backfill.add_argument("--rotate", action="store_true", help="also re-encrypt values under an older key_version")
    backfill.add_argument("--dry-run", action="store_true", help="count what would change; write nothing")
    backfill.add_argument("--master-key-file", type=Path, help="default: PGCLOAK_MASTER_KEY")
    backfill.add_argument("--master-key-shares", help="comma-separated share files")
    _add_secret_refusals(backfill, config=False)
    backfill.set_defaults(func=cmd_backfill)

    keys = sub.add_parser("keys", help="master key tools").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="a new random 256-bit master key")
    gen.add_argument("--out", type=Path, help="write to this new file (0600) instead of stdout")
    gen.set_defaults(func=cmd_keys_generate)
    split = keys.add_parser("split", help="split the master key into k-of-n Shamir shares")
    split.add_argument("--shares", type=int, required=True)
    split.add_argument("--threshold", type=int, required=True)
    split.add_argument("--key-file", type=Path, help="default: PGCLOAK_MASTER_KEY, else one line on stdin")
    split.add_argument("--out-dir", type=Path, help="write share-N files (0600) instead of stdout")
    split.set_defaults(func=cmd_keys_split)
    combine = keys.add_parser("combine", help="recover the master key from k shares")
    combine.add_argument("files", nargs="+", type=Path)
    combine.add_argument("--out", type=Path)
    combine.set_defaults(func=cmd_keys_combine)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, PolicyError, CryptoError, OSError) as exc:
        print(f"pgcloak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
