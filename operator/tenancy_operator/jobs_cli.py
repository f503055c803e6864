"""``tenancy-operator jobs <tenant>``: a tenant's lifecycle job history, read from the ledger.

Details, notes and errors often carry text the tenant wrote (a PostgreSQL error its migration
raised): every text cell is printed through ``clean_message``, bounded and without control
characters, so the ledger cannot write escape sequences to an SRE's terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tenancy_operator.cli_database import add_database_arguments, one_database
from tenancy_operator.db.jobs import history
from tenancy_operator.observability.text import clean_message

TEXT_COLUMNS = ("kind", "state", "detail", "note", "error", "requested_by")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return clean_message(value)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its free-text columns cleaned (see the module docstring)."""
    return {k: clean_message(v) if k in TEXT_COLUMNS and v is not None else v for k, v in row.items()}


async def _fetch(dsn: str, control: str, namespace: str, name: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return await history(conn, control, namespace, name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tenancy-operator jobs", description=__doc__)
    parser.add_argument("tenant", help="Tenant name")
    parser.add_argument("-n", "--namespace", default="default")
    add_database_arguments(parser)
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    dsn = one_database(args, parser)
    import asyncio

    try:
        rows = asyncio.run(_fetch(dsn, args.control_schema, args.namespace, args.tenant))
    except psycopg.Error as exc:
        print(f"cannot read the job ledger: {clean_message(exc)}", file=sys.stderr)
        return 1
    if not rows and args.output == "table":
        print(f"no jobs recorded for tenant {args.namespace}/{args.tenant}")
        return 0
    print(render(rows, args.output))
    return 0


def render(rows: list[dict[str, Any]], output: str = "table") -> str:
    """The ledger rows as the CLI prints them: a table, or JSON; text columns cleaned."""
    rows = [_clean(r) for r in rows]
    if output == "json":
        return json.dumps(rows, default=str, indent=2)
    header = ("STARTED", "FINISHED", "KIND", "STATE", "ATTEMPT", "GEN", "REQUESTED BY", "DETAIL")
    table = [header] + [
        (_fmt(r["started_at"]), _fmt(r["finished_at"]), _fmt(r["kind"]), _fmt(r["state"]), _fmt(r["attempt"]),
         _fmt(r["generation"]), _fmt(r.get("requested_by")),
         " | ".join(x for x in (r["detail"], r["note"], r["error"]) if x) or "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in table
    )
