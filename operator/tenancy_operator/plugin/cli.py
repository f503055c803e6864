"""`kubectl tenancy` commands. Reads and writes go through the Kubernetes API only; the operator
does the work (it honours spec.state and its annotations), the plugin asks for it and, with
`--wait`, watches the Tenant's status until the operator reports it done.

This module parses the arguments and runs one command: the read-only ones are views.py's, psql is
psql.py's, the requests to the operator are actions.py's."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

try:
    from tenancy_operator.k8s.kubectl import FIELD_MANAGER, KubeError, PluginKube, resolve
except ModuleNotFoundError as missing:  # the operator's own install leaves the plugin's extra out
    if missing.name != "kubernetes_asyncio":
        raise
    sys.exit("kubectl tenancy reads kubeconfigs with kubernetes_asyncio: pip install 'tenancy-operator[kubectl]'")
from tenancy_operator.plugin.actions import (
    cmd_resume,
    cmd_retry,
    cmd_rollout_request,
    cmd_rotate,
    cmd_suspend,
)
from tenancy_operator.plugin.psql import cmd_psql
from tenancy_operator.plugin.session import EXIT_FAILED, ROLLOUT_KINDS, CommandError, Session
from tenancy_operator.plugin.views import cmd_archives, cmd_describe, cmd_flags_eval, cmd_rollouts, cmd_status

# --- arguments --------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Connection options, accepted before and after the command (as kubectl does)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: $KUBECONFIG, "
                        "else ~/.kube/config)")
    common.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context (default: current)")
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS,
                        help="namespace (default: the context's, else default)")
    common.add_argument("--field-manager", default=argparse.SUPPRESS,
                        help=f"name recorded as the author of changes, shown as the job's requestedBy "
                             f"(default: {FIELD_MANAGER})")
    return common


def _waiting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="wait until the operator reports it done")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="kubectl tenancy", parents=[common],
        description="Operate tenancy.dev tenants through the Kubernetes API (no database login).",
        epilog="Docs: docs/kubectl-plugin.md. psql arguments go after --: kubectl tenancy psql acme -- -c 'select 1'",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", parents=[common], help="fleet overview: phases, failures, versions, quota pressure")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="tenants of every namespace")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("describe", parents=[common], help="one tenant: conditions, credentials, jobs, archives, "
                       "quota, flags, events")
    p.add_argument("tenant")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("psql", parents=[common], help="psql as the tenant's login, with the credentials of its Secret")
    p.add_argument("tenant")
    p.add_argument("--read-only", action="store_true", help="use the read-only login (<tenant>-db-readonly)")
    p.add_argument("--host", help="connect here instead of the Secret's host (e.g. 127.0.0.1 after "
                   "kubectl port-forward)")
    p.add_argument("--port", help="connect to this port instead of the Secret's")
    p.add_argument("--psql", help="psql executable (default: psql on PATH)")
    p.set_defaults(func=cmd_psql)

    for name, func, text in (("suspend", cmd_suspend, "suspend a tenant (spec.state: Suspended; logins revoked, "
                                                      "data kept)"),
                             ("resume", cmd_resume, "resume a suspended tenant (spec.state: Active)")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("tenant")
        _waiting(p)
        p.set_defaults(func=func)

    p = sub.add_parser("rotate", parents=[common], help="rotate the tenant's credentials now")
    p.add_argument("tenant")
    p.add_argument("--value", help="annotation value to set (default: a new timestamp)")
    _waiting(p)
    p.set_defaults(func=cmd_rotate)

    p = sub.add_parser("retry", parents=[common], help="one more attempt of a stalled job")
    p.add_argument("tenant")
    p.add_argument("--value", help="annotation value to set (default: a new timestamp)")
    _waiting(p)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("archives", parents=[common], help="the archives kept (TenantArchives), and recent Events "
                                                      "about archives, restores and data at deletion")
    p.add_argument("tenant", nargs="?")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_archives)

    p = sub.add_parser("rollouts", parents=[common], help="schema rollouts and stepped flag rollouts: where each "
                       "stands")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_rollouts)

    rollout = sub.add_parser("rollout", help="resume or roll back a rollout")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    for name, text in (("resume", "go on after a halt, a rollback or a hand edit (tenancy.dev/resume-rollout)"),
                       ("rollback", "run the down migrations back to the base version (SchemaRollouts; "
                                    "tenancy.dev/rollback-rollout)")):
        p = rollout_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("kind", choices=sorted(ROLLOUT_KINDS))
        p.add_argument("name")
        p.add_argument("--value", help="annotation value to set (default: a new timestamp)")
        p.set_defaults(func=cmd_rollout_request)

    flags = sub.add_parser("flags", help="feature flags as the operator published them")
    flag_sub = flags.add_subparsers(dest="flags_command", required=True, metavar="COMMAND")
    p = flag_sub.add_parser("eval", parents=[common], help="the variant a tenant's user gets, and why")
    p.add_argument("flag", help="FeatureFlag name")
    p.add_argument("--tenant", required=True)
    p.add_argument("--user", help="the user's targeting key (without: percentages cannot place the user)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_flags_eval)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:  # everything after the first -- is psql's
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = build_parser().parse_args(argv)
    if extra and args.command != "psql":
        build_parser().error("arguments after -- are for psql only")
    args.psql_args = extra
    return args


async def _main(args: argparse.Namespace) -> int:
    target = resolve(getattr(args, "kubeconfig", None), getattr(args, "context", None))
    kube = await PluginKube.from_kubeconfig(getattr(args, "kubeconfig", None), getattr(args, "context", None),
                                            field_manager=getattr(args, "field_manager", None) or FIELD_MANAGER)
    try:
        session = Session(args, kube, getattr(args, "namespace", None) or target.namespace)
        return int(await args.func(session))
    finally:
        await kube.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(_main(args))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KubeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
