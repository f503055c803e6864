"""`kubectl tenancy` commands. Reads and writes go through the Kubernetes API only; the operator
does the work (it honours spec.state and its annotations), the plugin asks for it and, with
`--wait`, watches the Tenant's status until the operator reports it done."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tenancy_operator.api.names import (
    GENERATION_ANNOTATION,
    RESUME_ROLLOUT_ANNOTATION,
    RETRY_ANNOTATION,
    ROLLBACK_ROLLOUT_ANNOTATION,
    ROTATE_ANNOTATION,
    SECRET_ROTATION_ANNOTATION,
)
from tenancy_operator.k8s.kubectl import FIELD_MANAGER, KubeError, PluginKube, resolve
from tenancy_operator.plugin import render

TENANTS, QUOTAS, FLAGS, SCHEMA_ROLLOUTS = "tenants", "quotas", "featureflags", "schemarollouts"
ARCHIVES = "tenantarchives"
ROLLOUT_KINDS = {"schemarollout": SCHEMA_ROLLOUTS, "featureflag": FLAGS}
POLL_INTERVAL = 1.0
EXIT_FAILED, EXIT_USAGE = 1, 2
PSQL_CONNECTION_FAILED = 2
"""psql's exit status when it could not connect (the psql manual, "Exit Status")."""


class CommandError(Exception):
    """A failure worth one line to the user; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _now() -> datetime:
    return datetime.now(UTC)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


class Session:
    """The parsed arguments and the API connection of one invocation."""

    def __init__(self, args: argparse.Namespace, kube: PluginKube, namespace: str) -> None:
        self.args = args
        self.kube = kube
        self.namespace = namespace

    async def tenant(self, name: str) -> dict[str, Any]:
        body = await self.kube.get_object(TENANTS, self.namespace, name)
        if body is None:
            raise CommandError(f"Tenant {self.namespace}/{name} not found", EXIT_USAGE)
        return body

    async def wait(self, what: str, check: Callable[[], Awaitable[str | None]]) -> str:
        """Poll ``check`` until it returns a message (done) or the timeout passes. ``check`` raises
        CommandError when the operator reports the request failed."""
        deadline = time.monotonic() + float(self.args.timeout)
        print(f"waiting up to {self.args.timeout:g}s for {what} ...", file=sys.stderr)
        while True:
            done = await check()
            if done is not None:
                return done
            if time.monotonic() > deadline:
                raise CommandError(f"timed out after {self.args.timeout:g}s waiting for {what}")
            await asyncio.sleep(POLL_INTERVAL)


# --- status -----------------------------------------------------------------------------------


async def cmd_status(s: Session) -> int:
    scope = None if s.args.all_namespaces else s.namespace
    tenants, quotas = await asyncio.gather(s.kube.list_all(TENANTS, scope), s.kube.list_all(QUOTAS, scope))
    rows = render.fleet_rows(tenants, quotas)
    if s.args.output == "json":
        _print_json(render.fleet_json(rows))
        return 0
    if rows:
        print(render.fleet_table(rows, all_namespaces=bool(s.args.all_namespaces)))
        print()
    elif not s.args.all_namespaces:
        print(f"No tenants in namespace {s.namespace}.")
        return 0
    print(render.summary_text(render.fleet_summary(rows)))
    return 0


# --- describe ---------------------------------------------------------------------------------


async def cmd_describe(s: Session) -> int:
    from tenancy_operator.reconcilers.tenant_base import readonly_secret_name, secret_name

    name = s.args.tenant
    tenant = await s.tenant(name)
    selector = f"involvedObject.kind=Tenant,involvedObject.name={name}"
    quotas, flags, events = await asyncio.gather(
        s.kube.list_all(QUOTAS, s.namespace), s.kube.list_all(FLAGS, s.namespace),
        s.kube.list_events(s.namespace, selector))
    secret_names = [(tenant.get("status") or {}).get("secretName") or secret_name(name), readonly_secret_name(name)]
    # Only whether they exist: nothing of them is printed.
    present = {n: await _secret_exists(s, n) for n in secret_names}
    if s.args.output == "json":
        _print_json({
            "tenant": {"metadata": {k: v for k, v in (tenant.get("metadata") or {}).items() if k != "managedFields"},
                       "spec": tenant.get("spec"), "status": tenant.get("status")},
            "secrets": present,
            "quotas": [q for q in quotas if ((q.get("spec") or {}).get("tenantRef") or {}).get("name") == name],
            "featureFlags": render.flag_targets(flags, name),
            "archives": render.archive_rows(events),
            "events": [{k: e.get(k) for k in ("type", "reason", "message")} | {"time": render.event_time(e)}
                       for e in render.sorted_events(events)],
        })
        return 0
    print(render.describe_text(tenant, quotas=quotas, flags=flags, events=events, secrets_present=present,
                               now=_now()))
    return 0


async def _secret_exists(s: Session, name: str) -> bool | None:
    """None: the user may not read Secrets (describe works without that right)."""
    try:
        return await s.kube.read_secret(s.namespace, name) is not None
    except KubeError as exc:
        if exc.status == 403:
            return None
        raise


# --- archives ---------------------------------------------------------------------------------


async def cmd_archives(s: Session) -> int:
    """The TenantArchive objects (every archive kept), then the recent Events about archives,
    restores and what deletion did with the data (Events expire)."""
    scope = None if s.args.all_namespaces else s.namespace
    selector = "involvedObject.kind=Tenant" + (f",involvedObject.name={s.args.tenant}" if s.args.tenant else "")
    objects, events = await asyncio.gather(s.kube.list_all(ARCHIVES, scope), s.kube.list_events(scope, selector))
    archives = render.archive_objects(objects, s.args.tenant)
    rows = render.archive_rows(events)
    if s.args.output == "json":
        _print_json({"archives": archives, "events": rows})
        return 0
    wide = bool(s.args.all_namespaces)
    print(render.archive_objects_table(archives, _now(), all_namespaces=wide) if archives else "No archives.")
    if rows:
        print("\nRecent Events:\n" + render.archives_table(rows, _now(), all_namespaces=wide))
    return 0


# --- psql -------------------------------------------------------------------------------------


def psql_environment(data: Mapping[str, str], *, host: str | None, port: str | None,
                     base: Mapping[str, str]) -> dict[str, str]:
    """libpq's environment for a credentials Secret's keys: the password goes to PGPASSWORD, never
    to argv (other users of the machine see argv in ps)."""
    env = dict(base)
    for var, key, override in (("PGHOST", "host", host), ("PGPORT", "port", port), ("PGUSER", "user", None),
                               ("PGDATABASE", "dbname", None), ("PGSSLMODE", "sslmode", None)):
        value = override or data.get(key)
        if value:
            env[var] = value
    env["PGPASSWORD"] = data.get("password", "")
    env.setdefault("PGAPPNAME", "kubectl-tenancy")
    return env


async def cmd_psql(s: Session) -> int:
    from tenancy_operator.reconcilers.tenant_base import readonly_secret_name, secret_name

    name = s.args.tenant
    await s.tenant(name)
    secret = readonly_secret_name(name) if s.args.read_only else secret_name(name)
    body = await s.kube.read_secret(s.namespace, secret)
    if body is None:
        hint = " (spec.credentials.readOnlyLogin: true makes it)" if s.args.read_only else ""
        raise CommandError(f"Secret {s.namespace}/{secret} not found{hint}")
    data = _decoded(body)
    psql = s.args.psql or shutil.which("psql")
    if not psql:
        raise CommandError("psql not found on PATH; install the PostgreSQL client or pass --psql", EXIT_USAGE)
    env = psql_environment(data, host=s.args.host, port=s.args.port, base=os.environ)
    with tempfile.TemporaryDirectory(prefix="kubectl-tenancy-") as tmp:
        if data.get("ca.crt"):  # the target's CA; the Secret's sslrootcert is a path on the operator's side
            ca = Path(tmp) / "ca.crt"
            ca.write_text(data["ca.crt"])
            env["PGSSLROOTCERT"] = str(ca)
        print(f"psql: {env.get('PGUSER')}@{env.get('PGHOST')}:{env.get('PGPORT')}/{env.get('PGDATABASE')} "
              f"(Secret {secret}, sslmode {env.get('PGSSLMODE', 'prefer')})", file=sys.stderr)
        # Ctrl-C belongs to psql (it cancels the query), not to us.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # Blocking on purpose: psql owns the terminal until it exits; nothing else runs meanwhile.
            code = subprocess.call([psql, *s.args.psql_args], env=env)  # noqa: ASYNC221
        finally:
            signal.signal(signal.SIGINT, previous)
    if code == PSQL_CONNECTION_FAILED and not s.args.host:
        print(f"hint: the Secret's host {env.get('PGHOST')} may not be reachable from here; forward a port "
              "(kubectl port-forward) and pass --host 127.0.0.1 --port <local port>", file=sys.stderr)
    return code


# --- requests to the operator ------------------------------------------------------------------


def _request_value(given: str | None) -> str:
    return given or f"{_now().strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _stalled(body: Mapping[str, Any]) -> str | None:
    stalled = render.condition(body, "Stalled")
    if stalled.get("status") == "True":
        return f"{stalled.get('reason')}: {stalled.get('message')}"
    return None


async def _set_state(s: Session, state: str) -> int:
    name = s.args.tenant
    before = await s.tenant(name)
    if (before.get("spec") or {}).get("state", "Active") == state:
        print(f"tenant {s.namespace}/{name}: spec.state is {state} already")
        after = before
    else:
        after = await s.kube.merge_patch(TENANTS, s.namespace, name, {"spec": {"state": state}})
        print(f"tenant {s.namespace}/{name}: spec.state set to {state} (generation {after['metadata']['generation']})")
    if not s.args.wait:
        return 0
    generation = int(after["metadata"].get("generation") or 0)

    async def done() -> str | None:
        body = await s.tenant(name)
        status = body.get("status") or {}
        if int(status.get("observedGeneration") or 0) < generation:
            return None
        if status.get("phase") == state and render.condition(body, "Ready").get("status") == "True":
            return f"tenant {s.namespace}/{name} is {state}"
        problem = _stalled(body)
        if problem:
            raise CommandError(f"the operator could not make the tenant {state}: {problem}")
        return None

    print(await s.wait(f"the operator to report phase {state}", done))
    return 0


async def cmd_suspend(s: Session) -> int:
    return await _set_state(s, "Suspended")


async def cmd_resume(s: Session) -> int:
    return await _set_state(s, "Active")


async def cmd_rotate(s: Session) -> int:
    from tenancy_operator.reconcilers.tenant_base import JOB_REASONS, secret_name

    name = s.args.tenant
    before = await s.tenant(name)
    current = ((before.get("metadata") or {}).get("annotations") or {}).get(ROTATE_ANNOTATION)
    value = _request_value(s.args.value)
    if value == current:
        raise CommandError(f"{ROTATE_ANNOTATION} is {value!r} already; a rotation needs a new value", EXIT_USAGE)
    await s.kube.merge_patch(TENANTS, s.namespace, name, {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    secret = (before.get("status") or {}).get("secretName") or secret_name(name)
    print(f"tenant {s.namespace}/{name}: rotation requested ({ROTATE_ANNOTATION}={value}); the operator puts a new "
          f"login into Secret {secret}, the old one keeps working for the grace period")
    if not s.args.wait:
        return 0

    told: set[str] = set()

    async def done() -> str | None:
        body = await s.kube.read_secret(s.namespace, secret)
        if body is None or (body["metadata"].get("annotations") or {}).get(SECRET_ROTATION_ANNOTATION) != value:
            tenant = await s.tenant(name)
            stalled = render.condition(tenant, "Stalled")
            if stalled.get("status") == "True" and stalled.get("reason") == JOB_REASONS["rotate"]:
                raise CommandError(f"the rotation failed: {_stalled(tenant)}")
            message = str(render.condition(tenant, "Ready").get("message") or "")
            if "rotation waits" in message and message not in told:  # the previous login is in its grace period
                told.add(message)
                print(f"  {message}", file=sys.stderr)
            return None
        user = _decoded(body).get("user")
        tenant = await s.tenant(name)
        creds = (tenant.get("status") or {}).get("credentials") or {}
        if creds.get("user") != user:
            return None  # the Secret is written; the status follows in the same reconcile
        retiring = f"; {creds['retiringUser']} keeps working until {creds.get('retiringAt')}" \
            if creds.get("retiringUser") else ""
        return f"rotated: Secret {secret} names login {user} now{retiring}"

    print(await s.wait("the operator to rotate the credentials", done))
    return 0


async def cmd_retry(s: Session) -> int:
    name = s.args.tenant
    before = await s.tenant(name)
    problem = _stalled(before)
    job_before = ((before.get("status") or {}).get("currentJob") or {}).get("id")
    value = _request_value(s.args.value)
    await s.kube.merge_patch(TENANTS, s.namespace, name, {"metadata": {"annotations": {RETRY_ANNOTATION: value}}})
    print(f"tenant {s.namespace}/{name}: one more attempt requested ({RETRY_ANNOTATION}={value})")
    if problem:
        print(f"  stalled on: {problem}")
    else:
        print("  note: nothing is stalled now; the value is used up only by a stalled job")
    if not s.args.wait:
        return 0

    async def done() -> str | None:
        body = await s.tenant(name)
        if render.condition(body, "Ready").get("status") == "True":
            return f"tenant {s.namespace}/{name} is Ready ({(body.get('status') or {}).get('phase')})"
        job = (body.get("status") or {}).get("currentJob") or {}
        again = _stalled(body)
        if again and job.get("id") and job.get("id") != job_before:
            raise CommandError(f"the retried job failed again: {again}")
        return None

    print(await s.wait("the retried job", done))
    return 0


# --- rollouts ---------------------------------------------------------------------------------


async def cmd_rollouts(s: Session) -> int:
    scope = None if s.args.all_namespaces else s.namespace
    waves, flags = await asyncio.gather(s.kube.list_all(SCHEMA_ROLLOUTS, scope), s.kube.list_all(FLAGS, scope))
    rows = render.rollout_rows(waves, flags)
    if s.args.output == "json":
        _print_json(rows)
    elif rows:
        print(render.rollouts_table(rows, all_namespaces=bool(s.args.all_namespaces)))
    else:
        print("No SchemaRollouts or stepped FeatureFlag rollouts" + ("." if s.args.all_namespaces
                                                                     else f" in namespace {s.namespace}."))
    return 0


async def cmd_rollout_request(s: Session) -> int:
    """Resume (a halted, paused-by-hand or rolled-back rollout) or roll back (SchemaRollouts) by
    annotation: the operator acts on each new value once."""
    kind, name = s.args.kind, s.args.name
    rollback = s.args.rollout_command == "rollback"
    if rollback and kind != "schemarollout":
        raise CommandError("only a SchemaRollout rolls back (a FeatureFlag's percentage is set in its spec)",
                           EXIT_USAGE)
    plural = ROLLOUT_KINDS[kind]
    body = await s.kube.get_object(plural, s.namespace, name)
    if body is None:
        raise CommandError(f"{kind} {s.namespace}/{name} not found", EXIT_USAGE)
    status = body.get("status") or {}
    phase = (status.get("rollout") or {}).get("phase") if kind == "featureflag" else status.get("phase")
    if phase in (None, "Idle", "Completed"):
        print(f"note: {kind} {s.namespace}/{name} has no rollout in progress ({phase or 'none'}); the request "
              "is taken as done", file=sys.stderr)
    annotation = ROLLBACK_ROLLOUT_ANNOTATION if rollback else RESUME_ROLLOUT_ANNOTATION
    value = _request_value(s.args.value)
    await s.kube.merge_patch(plural, s.namespace, name, {"metadata": {"annotations": {annotation: value}}})
    print(f"{kind} {s.namespace}/{name}: {'rollback' if rollback else 'resume'} requested ({annotation}={value})")
    return 0


# --- flags ------------------------------------------------------------------------------------


async def cmd_flags_eval(s: Session) -> int:
    from tenancy_operator.flags.evaluation import evaluate
    from tenancy_operator.flags.published import NotOurs, definition_from_document
    from tenancy_operator.reconcilers.featureflag import FLAGD_DATA_KEY, configmap_name

    name = s.args.flag
    flag = await s.kube.read_object(FLAGS, s.namespace, name)
    if flag is None:
        raise CommandError(f"FeatureFlag {s.namespace}/{name} not found", EXIT_USAGE)
    status = flag.get("status") or {}
    cm_name = status.get("configMap") or configmap_name(name)
    cm = await s.kube.read_configmap(s.namespace, cm_name)
    if cm is None or FLAGD_DATA_KEY not in (cm.get("data") or {}):
        raise CommandError(f"the operator has not published FeatureFlag {name} yet (no ConfigMap {cm_name} "
                           f"with {FLAGD_DATA_KEY}); see kubectl tenancy describe or the flag's Ready condition")
    try:
        definition = definition_from_document(json.loads(cm["data"][FLAGD_DATA_KEY]), status.get("key"))
    except (ValueError, NotOurs) as exc:
        raise CommandError(f"ConfigMap {cm_name} does not hold a flag as the operator publishes it: {exc}") from exc
    result = evaluate(definition, s.args.tenant, s.args.user)
    published = int((cm["metadata"].get("annotations") or {}).get(GENERATION_ANNOTATION) or 0)
    generation = int(flag["metadata"].get("generation") or 0)
    out = {"flag": name, "key": definition.key, "tenant": s.args.tenant, "user": s.args.user,
           "variant": result.variant, "value": result.value, "reason": str(result.reason),
           "configMap": cm_name, "publishedGeneration": published, "generation": generation}
    if s.args.output == "json":
        _print_json(out)
    else:
        print(render.table(["KEY", "TENANT", "USER", "VARIANT", "VALUE", "REASON"],
                           [[definition.key, s.args.tenant, s.args.user or "-", result.variant,
                             json.dumps(result.value), str(result.reason)]]))
        print(f"(evaluated against ConfigMap {cm_name}, published from generation {published})")
    if published < generation:
        print(f"warning: FeatureFlag {name} is at generation {generation}; the operator has published "
              f"{published} so far: applications still get the answer above", file=sys.stderr)
    return 0


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
