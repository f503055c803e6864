"""``tenancy-operator jobs <tenant>``: a tenant's lifecycle job history, read from the ledger."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tenancy_operator.db.jobs import history


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return str(value)


async def _fetch(dsn: str, control: str, namespace: str, name: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return await history(conn, control, namespace, name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tenancy-operator jobs", description=__doc__)
    parser.add_argument("tenant", help="Tenant name")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--dsn", default=os.environ.get("TENANCY_DATABASE_URL"),
                        help="database of the tenant's target (default: $TENANCY_DATABASE_URL)")
    parser.add_argument("--control-schema", default=os.environ.get("TENANCY_CONTROL_SCHEMA", "tenancy"))
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    if not args.dsn:
        print("no database: pass --dsn or set TENANCY_DATABASE_URL", file=sys.stderr)
        return 2
    import asyncio

    try:
        rows = asyncio.run(_fetch(args.dsn, args.control_schema, args.namespace, args.tenant))
    except psycopg.Error as exc:
        print(f"cannot read the job ledger: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(rows, default=str, indent=2))
        return 0
    if not rows:
        print(f"no jobs recorded for tenant {args.namespace}/{args.tenant}")
        return 0
    header = ("STARTED", "FINISHED", "KIND", "STATE", "ATTEMPT", "GEN", "DETAIL")
    table = [header] + [
        (_fmt(r["started_at"]), _fmt(r["finished_at"]), r["kind"], r["state"], str(r["attempt"]),
         _fmt(r["generation"]), " | ".join(x for x in (r["detail"], r["note"], r["error"]) if x) or "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return 0
