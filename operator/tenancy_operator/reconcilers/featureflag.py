"""FeatureFlag reconcile: make every database target and the flagd ConfigMap hold the declared flag.

Level-based and idempotent: each target's rows are compared with the declared definition inside
the writing transaction (db/flags.py) and rewritten only when they differ; the ConfigMap is read and
replaced only when it differs. Our own status is never an input. What is published is worked out
in featureflag_policy.py; the namespace's flagd source is featureflag_source.py's.

Decisions (docs/featureflags.md):
- Rows are keyed by (namespace, flag key): two namespaces may use the same key. Two FeatureFlags of
  one namespace with the same key conflict; the one that wrote first keeps it.
- "Which tenants exist" is asked of the Kubernetes API (Tenant objects of that name in the flag's
  namespace), not of a target's registry: the Tenant object is what the user declared, it exists
  before and independently of provisioning, and its database may be any target.
- The flagd ConfigMap is `<name>-flagd`, owned by the FeatureFlag (ownerReference, so the garbage
  collector removes it too), with the document under `flagd.json`.
- Besides, one ConfigMap per namespace, `tenancy-flagd-source`, holds every flag of the namespace in
  one flagd document (featureflag_source.py).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.featureflag import FeatureFlagSpec, RolloutStatus
from tenancy_operator.api.names import (
    FLAG_LABEL,
    GENERATION_ANNOTATION,
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    RESUME_ROLLOUT_ANNOTATION,
    request_token,
)
from tenancy_operator.db import flags as dbf
from tenancy_operator.flags.diff import summarize
from tenancy_operator.flags.model import FlagDefinition
from tenancy_operator.flags.stepping import Decision, decide, wants_gate
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.k8s.managed_fields import parse_time
from tenancy_operator.observability import metrics, prometheus
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.observability.prometheus import GateReading
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, Retry, Verdict, combined, database_retry
from tenancy_operator.reconcilers.featureflag_policy import (
    PLURAL,
    configmap_body,
    configmap_name,
    last_spec_change,
    owned_by,
    stored_rollout,
)
from tenancy_operator.reconcilers.featureflag_source import NamespaceSource, SourceState
from tenancy_operator.reconcilers.records import LatestRecords
from tenancy_operator.runtime_context import OperatorContext

log = get_logger(__name__)


@dataclass
class Outcome(Verdict):
    """What one reconcile found and did; the handler turns it into status, Events and metrics."""

    retry: bool = False
    stale: bool = False
    """A newer generation was already written: this (older) body must not report anything."""
    definition: FlagDefinition | None = None
    unknown_tenants: list[str] = field(default_factory=list)
    written_at: datetime.datetime | None = None
    config_map: str | None = None
    source: SourceState | None = None
    """The namespace's flagd source, when this reconcile published the flag."""
    rollout: RolloutStatus | None = None
    """status.rollout: the share served now and, with steps, their progress."""
    check_in: float | None = None
    """A stepped rollout wants another look in this many seconds."""


class FeatureFlagReconciler:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self._rollouts: LatestRecords[RolloutStatus] = LatestRecords(stored_rollout)
        """Each flag's stepped rollout as last decided here: a lagging snapshot must neither step
        twice nor undo a rollback (reconcilers/records.py)."""
        self.source = NamespaceSource(ctx, self._served)
        """The namespace's flagd source, rebuilt after each change this reconciler publishes."""

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    # --- Kubernetes reads ---------------------------------------------------------------------

    async def tenant_names(self, namespace: str) -> set[str]:
        try:
            return await self.ctx.kube.list_names("tenants", namespace)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"listing Tenants failed: {exc.status}") from exc

    async def _flag_exists(self, namespace: str, name: str) -> bool:
        try:
            return await self.ctx.kube.get_object(PLURAL, namespace, name) is not None
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"reading FeatureFlag {name} failed: {exc.status}") from exc

    # --- reconcile ----------------------------------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any], tenants: set[str] | None = None) -> Outcome:
        """``tenants``: the Tenant names of the flag's namespace when the caller listed them
        already (a sweep lists once for all the flags of a namespace)."""
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
        generation = int(meta.get("generation") or 0)
        try:
            spec = FeatureFlagSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            return Outcome(False, "InvalidSpec", str(exc).splitlines()[0], stalled=True)
        stepped = await self._step(body, spec)
        flag = FlagDefinition.from_spec(spec, name, stepped.status.percentage if stepped else None)
        existing = tenants if tenants is not None else await self.tenant_names(namespace)
        out = Outcome(True, "Published", "", definition=flag,
                      unknown_tenants=sorted(flag.tenant_names() - existing))
        if stepped is not None:
            out.rollout, out.check_in = stepped.status, stepped.check_in
            out.events += stepped.events
        elif flag.rollout is not None and flag.rollout.percentage is not None:
            out.rollout = RolloutStatus(percentage=flag.rollout.percentage)
        changed_by, changed_at = last_spec_change(meta)

        results: dict[str, dbf.WriteResult] = {}
        unavailable: dict[str, Retry] = {}
        for target in sorted(self.ctx.targets.pools):
            try:
                await self.ctx.ensure_control_schema(target)
                async with self.ctx.targets.connection(target) as conn:
                    kwargs: dict[str, Any] = {
                        "namespace": namespace, "name": name, "uid": uid, "generation": generation, "flag": flag,
                        "changed_by": changed_by, "changed_at": changed_at,
                        "automatic": stepped.change if stepped else None,
                    }
                    res = await dbf.replace(conn, self.control, **kwargs)
                    if res.conflict is not None and not await self._flag_exists(namespace, res.conflict):
                        res = await dbf.replace(conn, self.control, take_over=True, **kwargs)
            except DATABASE_ERRORS as exc:
                unavailable[target] = database_retry(exc, f"database {target!r}")
                continue
            results[target] = res

        if any(r.stale for r in results.values()):
            return Outcome(False, "Stale", "a newer generation was already written", stale=True)
        if stepped is not None:
            self._rollouts.put(body, stepped.status)
            for _, reason, _ in stepped.events:
                metrics.FLAG_ROLLOUT_TRANSITIONS.labels(transition=reason).inc()
        conflicts = sorted({r.conflict for r in results.values() if r.conflict is not None})
        if conflicts:
            return Outcome(
                False, "Conflict",
                f"flag key {flag.key!r} in namespace {namespace} already belongs to FeatureFlag "
                f"{', '.join(conflicts)}; give this one another spec.key", stalled=True, definition=flag,
                unknown_tenants=out.unknown_tenants,
            )
        self._changes(body, flag, results, out)
        written = [r.stored.written_at for r in results.values() if r.stored is not None]
        out.written_at = max(written) if written else None

        out.config_map, rewritten = await self._ensure_configmap(body, flag, out)
        changed = rewritten or any(r.operation is not None for r in results.values())
        out.source = await self.source.publish(namespace, changed=changed)

        if unavailable:
            trouble = combined(list(unavailable.values()))
            out.ready, out.retry, out.reason = False, True, trouble.reason
            out.message = f"{trouble.message}; written to {', '.join(sorted(results)) or 'none'}"
        else:
            out.message = (f"flag {flag.key!r} written to database target(s) {', '.join(sorted(results))} "
                           f"and ConfigMap {out.config_map}")
        return out

    # --- stepped rollouts ----------------------------------------------------------------------

    def rollout_record(self, body: Mapping[str, Any]) -> RolloutStatus | None:
        """The latest record of the flag's stepped rollout (reconcilers/records.py); None: none."""
        return self._rollouts.get(body)

    def rollout_written(self, written: Mapping[str, Any]) -> None:
        """The flag as a status write left it (a snapshot older than that is not another replica's)."""
        self._rollouts.written(written)

    def forget_rollout(self, uid: str | None) -> None:
        self._rollouts.forget(uid)

    async def _step(self, body: Mapping[str, Any], spec: FeatureFlagSpec) -> Decision | None:
        """The stepped rollout's decision for this reconcile (flags/stepping.py); None without steps."""
        rollout = spec.rollout
        if rollout is None or rollout.steps is None:
            self.forget_rollout(body["metadata"].get("uid"))
            return None
        previous = self.rollout_record(body)
        token = request_token(body["metadata"], RESUME_ROLLOUT_ANNOTATION)
        gate = None
        if rollout.gate is not None and wants_gate(rollout, previous, token, spec.enabled):
            gate = await self.read_gate(rollout.gate.query)
        settings = self.ctx.settings
        return decide(rollout, previous, resume_token=token, enabled=spec.enabled,
                      now=datetime.datetime.now(datetime.UTC).replace(microsecond=0), gate=gate,
                      check_seconds=settings.rollout_check_seconds)

    async def read_gate(self, query: str) -> GateReading:
        settings = self.ctx.settings
        return await prometheus.read_gate(settings.prometheus_url, query, deadline=settings.prometheus_timeout_seconds)

    def _served(self, item: Mapping[str, Any]) -> int | None:
        """The share a listed FeatureFlag's stepped rollout serves now (None: no record)."""
        record = self.rollout_record(item)
        return record.percentage if record is not None else None

    def _changes(
        self, body: Mapping[str, Any], flag: FlagDefinition, results: Mapping[str, dbf.WriteResult], out: Outcome
    ) -> None:
        """Events and metrics for what the writes changed (once, even when several targets did)."""
        done = [r for r in results.values() if r.operation is not None]
        if not done:
            return
        repairs = [r for r in done if r.operation == "repair"]
        for _ in repairs:
            metrics.DRIFT_REPAIRS.labels(kind="FeatureFlag", object="rows").inc()
        if repairs:
            out.events.append(("Normal", "DriftRepaired",
                               "feature_flags rows changed outside the operator were rewritten"))
        real = [r for r in done if r.operation in ("create", "update")]
        if not real:
            return
        first = real[0]
        metrics.FEATURE_FLAG_CHANGES.labels(change="create" if first.old is None else "update").inc()
        if first.old is None:
            out.events.append(("Normal", "FlagCreated", f"flag {flag.key!r} published"
                               + ("" if flag.enabled else " (disabled)")))
        else:
            out.events.append(("Normal", "FlagChanged", summarize(first.diff)))
            if first.old.enabled and not flag.enabled:
                out.events.append(("Warning", "KillSwitchThrown",
                                   f"flag {flag.key!r} disabled: every user now gets {flag.default_variant!r}"))
            elif not first.old.enabled and flag.enabled:
                out.events.append(("Normal", "KillSwitchReleased", f"flag {flag.key!r} enabled again"))

    # --- flagd ConfigMap ----------------------------------------------------------------------

    async def _ensure_configmap(
        self, body: Mapping[str, Any], flag: FlagDefinition, out: Outcome
    ) -> tuple[str, bool]:
        """The ConfigMap's name, and whether it was written."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], configmap_name(meta["name"])
        desired = configmap_body(body, flag)
        kube = self.ctx.kube
        try:
            current = await kube.get_configmap(namespace, name)
            if current is None:
                await kube.create_configmap(namespace, desired)
                return name, True
            cmeta = current.get("metadata") or {}
            labels = cmeta.get("labels") or {}
            ours = labels.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE
            if labels.get(FLAG_LABEL) != meta["name"] or not ours:
                raise Retry("Conflict", f"ConfigMap {name} exists and is not managed by tenancy-operator "
                                        f"for FeatureFlag {meta['name']}; delete or rename it")
            their_generation = int((cmeta.get("annotations") or {}).get(GENERATION_ANNOTATION) or 0)
            same_owner = owned_by(current, meta["uid"])
            if same_owner and their_generation > int(meta.get("generation") or 0):
                return name, False  # written from a newer generation already
            up_to_date = (
                current.get("data") == desired["data"] and same_owner
                and all(labels.get(k) == v for k, v in desired["metadata"]["labels"].items())
                and their_generation == int(meta.get("generation") or 0)
            )
            if up_to_date:
                return name, False
            if same_owner and their_generation == int(meta.get("generation") or 0):
                metrics.DRIFT_REPAIRS.labels(kind="FeatureFlag", object="configmap").inc()
                out.events.append(("Normal", "DriftRepaired",
                                   f"ConfigMap {name} changed outside the operator; rewritten"))
            desired["metadata"]["resourceVersion"] = cmeta.get("resourceVersion")
            await kube.replace_configmap(namespace, name, desired)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"writing ConfigMap {name} failed: {exc.status}") from exc
        return name, True

    # --- deletion -----------------------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any], *, same_uid: bool = False) -> list[tuple[str, str, str]]:
        """Remove the flag's rows from every target (with a `delete` audit row each) and its
        ConfigMap. Rows owned by another FeatureFlag with the same key are never touched.
        ``same_uid``: the FeatureFlag is gone; only what was written for this very object."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            key = FeatureFlagSpec.model_validate(body.get("spec") or {}).effective_key(name)
        except ValidationError:
            key = name
        removed = False
        unavailable: list[Retry] = []
        for target in sorted(self.ctx.targets.pools):
            try:
                await self.ctx.ensure_control_schema(target)
                async with self.ctx.targets.connection(target) as conn:
                    res = await dbf.remove(
                        conn, self.control, namespace=namespace, name=name, uid=meta.get("uid"), key=key,
                        generation=int(meta.get("generation") or 0),
                        changed_at=parse_time(meta.get("deletionTimestamp")), same_uid=same_uid,
                    )
                    removed = removed or res.operation is not None
            except DATABASE_ERRORS as exc:
                unavailable.append(database_retry(exc, f"database {target!r}"))
        if unavailable:
            raise combined(unavailable)
        try:
            current = await self.ctx.kube.get_configmap(namespace, configmap_name(name))
            if current is not None and (current["metadata"].get("labels") or {}).get(FLAG_LABEL) == name \
                    and (not same_uid or owned_by(current, str(meta.get("uid") or ""))):
                await self.ctx.kube.delete_configmap(namespace, configmap_name(name))
        except ApiError as exc:
            if exc.status != 404:
                raise Retry("KubernetesAPI", f"deleting ConfigMap failed: {exc.status}") from exc
        try:
            await self.source.publish(namespace)  # after the rows: a key's next holder is known
        except Retry as exc:
            if not same_uid:
                raise  # the finalizer holds the flag until the source no longer does
            # Gone already: nothing to retry on; the next sweep rebuilds the namespace's source.
            log.warning("namespace flagd source not rebuilt after a flag went", namespace=namespace,
                        reason=exc.reason, detail=exc.message)
        self.forget_rollout(meta.get("uid"))
        if removed:
            metrics.FEATURE_FLAG_CHANGES.labels(change="delete").inc()
            return [("Normal", "FlagDeleted", f"flag {key!r} removed from every database target")]
        return []
