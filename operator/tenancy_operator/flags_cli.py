"""`tenancy-operator flags ...`: evaluate and inspect feature flags as they are stored in Postgres.

    tenancy-operator flags eval new-dashboard --tenant acme-corp --user u-42 [--namespace acme]
    tenancy-operator flags export new-dashboard      # the flagd definition, from Postgres
    tenancy-operator flags history new-dashboard     # the audit trail (feature_flag_changes)

The database options are those of every administrator command (cli_database: --dsn, --target,
--control-schema); inside the operator's pod none is needed. --namespace may be left out when the key exists in one
namespace only. Exit codes: 0 found, 1 flag not found, 2 usage or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tenancy_operator.cli_database import add_database_arguments, one_database
from tenancy_operator.db import flags as dbf
from tenancy_operator.flags.bucketing import bucket_hash
from tenancy_operator.flags.evaluation import Evaluation, Reason, evaluate
from tenancy_operator.flags.flagd import flagd_document
from tenancy_operator.flags.model import FlagDefinition

NOT_FOUND, USAGE = 1, 2


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _dsn(args: argparse.Namespace) -> str:
    try:
        return one_database(args)
    except ValueError as exc:
        raise CliError(USAGE, str(exc)) from exc


def _position(flag: FlagDefinition, user: str | None, weights: tuple[tuple[str, int], ...]) -> str:
    if not user:
        return ""
    total = sum(max(0, w) for _, w in weights)
    bucket = (bucket_hash(flag.key, user) * total) >> 32
    return f" (bucket {bucket} of 0-{total - 1})"


def explain(flag: FlagDefinition, tenant: str | None, user: str | None, ev: Evaluation) -> str:
    """Why `ev` is the answer, in words."""
    if ev.reason is Reason.KILL_SWITCH:
        return "the flag is disabled (kill switch): everyone gets the default variant"
    if ev.reason is Reason.USER_OVERRIDE:
        return f"user {user!r} of tenant {tenant!r} has an override"
    if ev.reason is Reason.TENANT_OVERRIDE:
        rule = flag.tenants[tenant or ""]
        if rule.percentage is None:
            return f"tenant {tenant!r} has an override for all its users"
        return (f"tenant {tenant!r} has an override: {rule.percentage}% of its users get {rule.variant!r}"
                + _position(flag, user, rule.fractions(flag.default_variant) or ()))
    if ev.reason is Reason.ROLLOUT:
        assert flag.rollout is not None
        fractions = flag.rollout.fractions(flag.default_variant)
        if flag.rollout.weights is not None:
            split = ", ".join(f"{v}={w}" for v, w in fractions)
            return f"the rollout's weights ({split}) place the user here" + _position(flag, user, fractions)
        return (f"the rollout gives {flag.rollout.variant!r} to {flag.rollout.percentage}% of users"
                + _position(flag, user, fractions))
    if not user and (flag.rollout is not None or (tenant is not None and tenant in flag.tenants)):
        return "a percentage applies but no user was given to place: default variant"
    return "no override or rollout applies: default variant"


async def _find(conn: psycopg.AsyncConnection[Any], schema: str, key: str, namespace: str | None) -> dbf.StoredFlag:
    if namespace is None:
        found = await dbf.namespaces_with_key(conn, schema, key)
        if not found:
            raise CliError(NOT_FOUND, f"no feature flag with key {key!r} in schema {schema!r}")
        if len(found) > 1:
            raise CliError(USAGE, f"flag key {key!r} exists in namespaces {', '.join(found)}: pass --namespace")
        namespace = found[0]
    stored = await dbf.load(conn, schema, namespace, key)
    if stored is None:
        raise CliError(NOT_FOUND, f"no feature flag with key {key!r} in namespace {namespace!r}")
    return stored


async def _main(args: argparse.Namespace) -> int:
    dsn = _dsn(args)
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise CliError(USAGE, f"cannot connect to the database: {type(exc).__name__}") from exc
    async with conn:
        try:
            stored = await _find(conn, args.control_schema, args.flag, args.namespace)
            history = []
            if args.command == "history":
                history = await dbf.changes(conn, args.control_schema, stored.namespace, args.flag)
        except psycopg.errors.UndefinedTable as exc:
            raise CliError(NOT_FOUND, f"schema {args.control_schema!r} has no feature flags"
                                      " (operator never ran?)") from exc
    flag = stored.definition
    if args.command == "eval":
        ev = evaluate(flag, args.tenant, args.user)
        result = {
            "namespace": stored.namespace, "flag": flag.key, "tenant": args.tenant, "user": args.user,
            "variant": ev.variant, "value": ev.value, "reason": str(ev.reason),
            "why": explain(flag, args.tenant, args.user, ev), "generation": stored.generation,
        }
        if args.output == "json":
            print(json.dumps(result))
        else:
            print(f"{ev.variant}\t{json.dumps(ev.value)}\t{ev.reason}\t{result['why']}")
    elif args.command == "export":
        print(json.dumps(flagd_document([flag], {"namespace": stored.namespace, "featureflag": stored.name}),
                         indent=2))
    else:
        for row in history:
            print(json.dumps(row, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenancy-operator flags", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("flag", help="the flag key (spec.key, or the FeatureFlag's name)")
    common.add_argument("--namespace", "-n", help="the FeatureFlag's namespace (needed when the key is in several)")
    add_database_arguments(common)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", parents=[common], help="the variant a user of a tenant gets, and why")
    ev.add_argument("--tenant", "-t", help="the Tenant's name (evaluation context attribute `tenant`)")
    ev.add_argument("--user", "-u", help="the user's targeting key")
    ev.add_argument("--output", "-o", choices=["text", "json"], default="text",
                    help="text: variant, value, reason, why (tab-separated); json: one object")
    sub.add_parser("export", parents=[common], help="print the flag in flagd's format, as stored")
    sub.add_parser("history", parents=[common], help="print the flag's audit trail, one JSON object a line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
