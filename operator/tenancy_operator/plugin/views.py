"""The read-only commands of `kubectl tenancy`: status, describe, archives, rollouts and flags
eval. They list and read through the API; the formatting is render.py's."""

from __future__ import annotations

import asyncio
import json
import sys

from tenancy_operator.api.names import GENERATION_ANNOTATION
from tenancy_operator.k8s.kubectl import KubeError
from tenancy_operator.plugin import render
from tenancy_operator.plugin.session import (
    ARCHIVES,
    EXIT_USAGE,
    FLAGS,
    QUOTAS,
    SCHEMA_ROLLOUTS,
    TENANTS,
    CommandError,
    Session,
    now,
    print_json,
)

# --- status -----------------------------------------------------------------------------------


async def cmd_status(s: Session) -> int:
    scope = None if s.args.all_namespaces else s.namespace
    tenants, quotas = await asyncio.gather(s.kube.list_all(TENANTS, scope), s.kube.list_all(QUOTAS, scope))
    rows = render.fleet_rows(tenants, quotas)
    if s.args.output == "json":
        print_json(render.fleet_json(rows))
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
        s.kube.read_events(s.namespace, selector))
    secret_names = [(tenant.get("status") or {}).get("secretName") or secret_name(name), readonly_secret_name(name)]
    # Only whether they exist: nothing of them is printed.
    present = {n: await _secret_exists(s, n) for n in secret_names}
    if s.args.output == "json":
        print_json({
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
                               now=now()))
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
    objects, events = await asyncio.gather(s.kube.list_all(ARCHIVES, scope), s.kube.read_events(scope, selector))
    archives = render.archive_objects(objects, s.args.tenant)
    rows = render.archive_rows(events)
    if s.args.output == "json":
        print_json({"archives": archives, "events": rows})
        return 0
    wide = bool(s.args.all_namespaces)
    print(render.archive_objects_table(archives, now(), all_namespaces=wide) if archives else "No archives.")
    if rows:
        print("\nRecent Events:\n" + render.archives_table(rows, now(), all_namespaces=wide))
    return 0


# --- rollouts ---------------------------------------------------------------------------------


async def cmd_rollouts(s: Session) -> int:
    scope = None if s.args.all_namespaces else s.namespace
    waves, flags = await asyncio.gather(s.kube.list_all(SCHEMA_ROLLOUTS, scope), s.kube.list_all(FLAGS, scope))
    rows = render.rollout_rows(waves, flags)
    if s.args.output == "json":
        print_json(rows)
    elif rows:
        print(render.rollouts_table(rows, all_namespaces=bool(s.args.all_namespaces)))
    else:
        print("No SchemaRollouts or stepped FeatureFlag rollouts" + ("." if s.args.all_namespaces
                                                                     else f" in namespace {s.namespace}."))
    return 0


# --- flags ------------------------------------------------------------------------------------


async def cmd_flags_eval(s: Session) -> int:
    from tenancy_operator.flags.evaluation import evaluate
    from tenancy_operator.flags.published import NotOurs, definition_from_document
    from tenancy_operator.reconcilers.featureflag_policy import FLAGD_DATA_KEY, configmap_name

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
        print_json(out)
    else:
        print(render.table(["KEY", "TENANT", "USER", "VARIANT", "VALUE", "REASON"],
                           [[definition.key, s.args.tenant, s.args.user or "-", result.variant,
                             json.dumps(result.value), str(result.reason)]]))
        print(f"(evaluated against ConfigMap {cm_name}, published from generation {published})")
    if published < generation:
        print(f"warning: FeatureFlag {name} is at generation {generation}; the operator has published "
              f"{published} so far: applications still get the answer above", file=sys.stderr)
    return 0
