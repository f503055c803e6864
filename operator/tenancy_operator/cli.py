"""The ``tenancy-operator`` command: run the operator, audit, flags, jobs, generate CRDs and API docs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args: argparse.Namespace) -> int:
    # Kopf imports the synchronous `kubernetes` client whenever it is installed (a development
    # environment has it, for the tests), only to recognise that client's objects, which the
    # operator never hands to Kopf: about 6 MB of each replica's memory that the image does not carry.
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
    from tenancy_operator.config import Settings
    from tenancy_operator.observability.logging import configure_logging
    from tenancy_operator.peering import PeeringLost
    from tenancy_operator.runtime import run_operator
    from tenancy_operator.sharding import ShardingUnsupported

    try:
        cfg = Settings()
        targets = cfg.targets
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level, cfg.log_format)
    if not targets:
        print("configuration error: no database target; set TENANCY_DATABASE_TARGETS", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_operator(cfg))
    except ShardingUnsupported as exc:
        print(f"refusing to run sharded: {exc}", file=sys.stderr)
        return 3
    except PeeringLost as exc:
        print(f"stopped: {exc}; restart to rejoin", file=sys.stderr)
        return 4
    return 0


def _docstrings_kept() -> bool:
    if sys.flags.optimize >= 2:
        print("the CRDs and the API reference take their descriptions from docstrings, which -OO "
              "(or PYTHONOPTIMIZE=2) drops: run this without it", file=sys.stderr)
        return False
    return True


def _crds(args: argparse.Namespace) -> int:
    from tenancy_operator.api.crdgen import write_crds

    if not _docstrings_kept():
        return 2
    for path in write_crds(Path(args.output)):
        print(path)
    return 0


def _api_docs(args: argparse.Namespace) -> int:
    from tenancy_operator.api.apidocs import write_api_docs

    if not _docstrings_kept():
        return 2
    print(write_api_docs(Path(args.output)))
    return 0


async def _audit_target(dsn: str, args: argparse.Namespace) -> Any:
    import psycopg
    from psycopg.rows import dict_row

    from tenancy_operator.db import audit

    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row, connect_timeout=10, application_name="tenancy-operator-audit",
    ) as conn:
        tenants = await audit.live_tenants(conn, args.control_schema, args.namespace or ())
        if args.tenant:
            tenants = {r: t for r, t in tenants.items() if t.name == args.tenant}
        return await audit.audit(conn, args.control_schema, fix=args.fix, tenants=tenants)


def _audit(argv: list[str]) -> int:
    """``tenancy-operator audit``: the sweep's isolation audit on demand, one line per finding."""
    import psycopg

    from tenancy_operator.cli_database import add_database_arguments, database_dsns
    from tenancy_operator.db.audit import Report

    parser = argparse.ArgumentParser(
        prog="tenancy-operator audit",
        description="List what tenant roles hold beyond their own schemas (catalog reads only); with --fix,"
                    " revoke what the login can. Exit codes: 0 nothing found, 1 findings, 2 usage or"
                    " connection error.")
    add_database_arguments(parser)
    parser.add_argument("-n", "--namespace", action="append", help="only tenants of this namespace (repeatable)")
    parser.add_argument("--tenant", help="only the Tenant of this name")
    parser.add_argument("--fix", action="store_true", help="revoke what is found (default: read only)")
    args = parser.parse_args(argv)
    dsns = database_dsns(args, parser)
    found = failed = 0
    for target, dsn in dsns.items():
        try:
            report: Report = asyncio.run(_audit_target(dsn, args))
        except psycopg.Error as exc:
            print(f"{target}: cannot audit: {type(exc).__name__}: {str(exc).strip()[:200]}", file=sys.stderr)
            failed += 1
            continue
        for f in report.findings:
            ref = report.tenants[f.role]
            print(f"{target}\t{ref.namespace}/{ref.name}\t{f.role}\t{f.kind.value}\t{f.describe()}"
                  f"\t{report.outcome(f)}")
        found += len(report.findings)
        roles = len({f.role for f in report.findings})
        print(f"{target}: {len(report.findings)} finding(s) for {roles} of {len(report.tenants)} tenant role(s)"
              + (f", {len(report.revoked)} revoked" if report.fixed else ""), file=sys.stderr)
    return 1 if found else 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["jobs"]:
        from tenancy_operator.jobs_cli import main as jobs_main

        return jobs_main(argv[1:])
    if argv[:1] == ["audit"]:
        return _audit(argv[1:])
    if argv[:1] == ["flags"]:
        from tenancy_operator.flags_cli import main as flags_main

        return flags_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tenancy-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the operator (configured by TENANCY_* environment variables)")
    sub.add_parser("flags", help="feature flags in Postgres: flags eval | export | history")
    sub.add_parser("jobs", help="a tenant's lifecycle job history: jobs <tenant> [-n namespace]")
    sub.add_parser("audit", help="what tenant roles hold beyond their schemas: audit [--target NAME] [--fix]")
    crds = sub.add_parser("crds", help="write the CRD YAML generated from the API models")
    crds.add_argument("--output", default=str(REPO_ROOT / "crds"))
    api_docs = sub.add_parser("api-docs", help="write the API reference (docs/api.md) generated from the API models")
    api_docs.add_argument("--output", default=str(REPO_ROOT / "docs" / "api.md"))
    args = parser.parse_args(argv)
    handlers = {"run": _run, "crds": _crds, "api-docs": _api_docs}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
