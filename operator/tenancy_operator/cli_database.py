"""The database options every administrator command takes (`jobs`, `flags`, `audit`), resolved the
way the operator resolves its own targets: run inside the operator's pod (`kubectl exec
deploy/tenancy-operator -- tenancy-operator jobs ...`) they need no options at all.

    --dsn DSN              one database, given directly
    --target NAME          one of the configured targets (TENANCY_DATABASE_TARGETS or the files
                           of TENANCY_DATABASE_TARGETS_DIR, as the chart mounts them)
    --control-schema NAME  the operator's control schema (default: $TENANCY_CONTROL_SCHEMA or tenancy)

Without --dsn: the configured targets (all of them, or --target's), else $TENANCY_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import os

from tenancy_operator.config import Settings


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL DSN of one database (default: the configured targets)")
    parser.add_argument("--target", help="one configured database target (default: every one, or 'default')")
    parser.add_argument("--control-schema", "--schema", dest="control_schema",
                        default=os.environ.get("TENANCY_CONTROL_SCHEMA") or "tenancy",
                        help="the operator's control schema (default: $TENANCY_CONTROL_SCHEMA or tenancy)")


def database_dsns(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Target name -> DSN, from the options above. Raises ValueError with a message for the user;
    with ``parser``, exits as argparse does for a usage error (the message, exit code 2)."""
    if parser is not None:
        try:
            return database_dsns(args)
        except ValueError as exc:
            parser.error(str(exc))
    if args.dsn:
        return {args.target or "default": args.dsn}
    targets = Settings().targets
    if targets:
        if args.target is None:
            return dict(targets)
        if args.target not in targets:
            raise ValueError(f"no database target {args.target!r}; configured: {', '.join(sorted(targets))}")
        return {args.target: targets[args.target]}
    if os.environ.get("TENANCY_DATABASE_URL"):
        return {args.target or "default": os.environ["TENANCY_DATABASE_URL"]}
    raise ValueError("no database: pass --dsn, or set TENANCY_DATABASE_TARGETS or TENANCY_DATABASE_URL")


def one_database(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> str:
    """The DSN of the one database a command reads: --dsn, --target's, the only target or 'default'
    (errors as database_dsns)."""
    dsns = database_dsns(args, parser)
    if len(dsns) == 1:
        return next(iter(dsns.values()))
    if "default" in dsns:
        return dsns["default"]
    message = f"several database targets ({', '.join(sorted(dsns))}): pass --target"
    if parser is not None:
        parser.error(message)
    raise ValueError(message)
