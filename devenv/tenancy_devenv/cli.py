"""``tenancy-dev up|down|run|status``: a local stack for trying the operator by hand."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from types import FrameType

from tenancy_devenv.binaries import postgres_bindir, repo_root
from tenancy_devenv.process import DevEnvError
from tenancy_devenv.stack import DEV_TARGETS, LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tenancy-dev", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="state, data and logs (default: <repo>/.dev)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("up", "start the stack in the background and return when it is ready"),
        ("run", "start the stack in the foreground; Ctrl-C stops it"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--no-operator", action="store_true", help="do not start the operator (run it yourself)")
        p.add_argument(
            "--targets", default=",".join(DEV_TARGETS),
            help=f"comma-separated database target names (default: {','.join(DEV_TARGETS)})",
        )
        p.add_argument(
            "--postgres-major",
            type=int,
            default=None,
            help="PostgreSQL major version, e.g. 15 or 17 (default: the one this workdir was created with, "
            "else the newest of Debian's); a workdir keeps its data, so change it with `down --purge`",
        )
    down = sub.add_parser("down", help="stop every process of the stack")
    down.add_argument("--purge", action="store_true", help="also delete the workdir (etcd and database data)")
    sub.add_parser("status", help="show which processes run")
    args = parser.parse_args(argv)

    workdir: Path = args.workdir or repo_root() / ".dev"
    try:
        if args.command == "down":
            LocalStack(workdir, detached=True).down(purge=args.purge)
            print("stack stopped")
            return 0
        if args.command == "status":
            return _status(LocalStack(workdir, detached=True))
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        pg_bindir = None if args.postgres_major is None else postgres_bindir(args.postgres_major)
        stack = LocalStack(
            workdir, targets, detached=args.command == "up", with_operator=not args.no_operator, pg_bindir=pg_bindir
        )
        if args.command == "up":
            stack.up()
            _print_usage(stack)
            return 0
        return _run(stack)
    except DevEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.command in ("up", "run"):
            print("fix the cause and run `up` again, or stop everything with `tenancy-dev down`", file=sys.stderr)
        return 1


def _run(stack: LocalStack) -> int:
    """Foreground: children die with us even on SIGKILL; Ctrl-C or SIGTERM stops them in order."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        stack.up()
        _print_usage(stack)
        print("\nrunning; press Ctrl-C to stop", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    finally:
        stack.down()
    return 0


def _status(stack: LocalStack) -> int:
    status = stack.status()
    for name, pid in status.items():
        print(f"{name:26} {'running, pid ' + str(pid) if pid else 'stopped'}")
    if any(status.values()):
        print(f"\nsource {stack.env_file}")
    return 0


def _print_usage(stack: LocalStack) -> None:
    env_file = _relative(stack.env_file)
    credentials = _relative(stack.objectstore.credentials_dir)
    print(f"""
stack ready (logs in {stack.workdir / "logs"})
  source {env_file}
  kubectl get tenancy -A
  psql "$TENANCY_DATABASE_URL"
  archives: {stack.archive_store_config()["url"]} at $TENANCY_S3_ENDPOINT (keys in {credentials}/)
""")


def _relative(path: Path) -> Path:
    """``path`` relative to the current directory if under it: shorter to read and to paste."""
    with contextlib.suppress(ValueError):
        return path.relative_to(Path.cwd())
    return path


if __name__ == "__main__":
    raise SystemExit(main())
