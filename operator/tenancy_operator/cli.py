"""The ``tenancy-operator`` command: run the operator, drive the local stack, generate CRDs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args: argparse.Namespace) -> int:
    from tenancy_operator.config import Settings
    from tenancy_operator.observability.logging import configure_logging
    from tenancy_operator.runtime import run_operator

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
    asyncio.run(run_operator(cfg))
    return 0


def _crds(args: argparse.Namespace) -> int:
    from tenancy_operator.api.crdgen import write_crds

    for path in write_crds(Path(args.output)):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["jobs"]:
        from tenancy_operator.jobs_cli import main as jobs_main

        return jobs_main(argv[1:])
    if argv[:1] == ["dev"]:
        from tenancy_operator.devenv.cli import main as dev_main

        return dev_main(argv[1:])
    if argv[:1] == ["flags"]:
        from tenancy_operator.flags.cli import main as flags_main

        return flags_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tenancy-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the operator (configured by TENANCY_* environment variables)")
    sub.add_parser("dev", help="local stack: dev up | down | run | status")
    sub.add_parser("flags", help="feature flags in Postgres: flags eval | export | history")
    sub.add_parser("jobs", help="a tenant's lifecycle job history: jobs <tenant> [-n namespace]")
    crds = sub.add_parser("crds", help="write the CRD YAML generated from the API models")
    crds.add_argument("--output", default=str(REPO_ROOT / "crds"))
    args = parser.parse_args(argv)
    handlers = {"run": _run, "crds": _crds}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
