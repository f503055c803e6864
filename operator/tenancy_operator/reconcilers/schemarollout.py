"""SchemaRollout reconcile: observe the template, its Tenants and the gate; decide the waves
(reconcilers/waves.py, pure); the outcome's status is what Tenants obey.

The admission a Tenant obeys (baseVersion, canary, admitBelow) is the rollout's record in its
status: the Tenant reconcile reads it from there (reconcilers/tenant_base.py, RolloutCache), and
the Tenant handlers migrate the template's Tenants when it widens. The record of this process's
last decision is kept in memory too, so that an older snapshot never admits or halts twice.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.names import (
    RESUME_ROLLOUT_ANNOTATION,
    ROLLBACK_ROLLOUT_ANNOTATION,
    SCHEMA_PIN_ANNOTATION,
    request_token,
)
from tenancy_operator.api.schemarollout import (
    SCHEMA_ROLLOUT,
    SchemaRolloutSpec,
    SchemaRolloutStatus,
    governing,
    tenant_bucket,
)
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability import prometheus
from tenancy_operator.reconcilers.errors import Retry, Verdict
from tenancy_operator.reconcilers.records import LatestRecords
from tenancy_operator.reconcilers.waves import TenantState, decide
from tenancy_operator.runtime_context import OperatorContext

PLURAL = SCHEMA_ROLLOUT.plural


@dataclass
class Outcome(Verdict):
    status: SchemaRolloutStatus | None = None
    """The rollout's record to write (None: the spec could not be read)."""
    check_in: float | None = None


def tenant_state(namespace: str, template: str, body: Mapping[str, Any]) -> TenantState:
    meta, status = body["metadata"], body.get("status") or {}
    ready: Mapping[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return TenantState(
        name=str(meta["name"]), bucket=tenant_bucket(namespace, template, str(meta["name"])),
        version=status.get("schemaVersion"), ready=ready.get("status") == "True", reason=ready.get("reason"),
        message=str(ready.get("message") or ""),
        pinned=bool((meta.get("annotations") or {}).get(SCHEMA_PIN_ANNOTATION)),
    )


def _stored_record(body: Mapping[str, Any]) -> SchemaRolloutStatus | None:
    """The record in the object's status (None: none yet, or unreadable: the rollout starts over)."""
    raw = body.get("status")
    if not isinstance(raw, Mapping) or not raw.get("baseVersion"):
        return None
    try:  # the record only: conditions are the reconcile's report, not part of the rollout's position
        return SchemaRolloutStatus.model_validate({k: v for k, v in raw.items()
                                                   if k not in ("conditions", "observedGeneration")})
    except ValidationError:
        return None


class SchemaRolloutReconciler:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.records: LatestRecords[SchemaRolloutStatus] = LatestRecords(_stored_record)
        """The rollout's record as last decided here (reconcilers/records.py)."""

    def forget(self, uid: str | None) -> None:
        self.records.forget(uid)

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        meta = body["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        try:
            spec = SchemaRolloutSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            return Outcome(False, "InvalidSpec", str(exc).splitlines()[0], stalled=True)
        kube, check = self.ctx.kube, self.ctx.settings.rollout_check_seconds
        try:
            rollouts = await kube.list_objects(PLURAL, namespace)
            configmap = await kube.get_configmap(namespace, spec.template)
            tenants = [t for t in await kube.list_objects("tenants", namespace)
                       if (t.get("spec") or {}).get("schemaTemplate") == spec.template
                       and not t["metadata"].get("deletionTimestamp")]
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"reading the rollout's template and tenants failed: {exc.status}") from exc
        holder = governing(rollouts, spec.template)
        if holder is not None and holder["metadata"]["name"] != name:
            return Outcome(False, "Conflict", f"SchemaRollout {holder['metadata']['name']} (older) already paces "
                                              f"template {spec.template}; delete one of them", stalled=True)
        if configmap is None:
            return Outcome(False, "TemplateNotFound", f"schema template ConfigMap {namespace}/{spec.template} not "
                                                      "found", check_in=check)
        versions = [m.version for m in tm.migrations_from_data(configmap.get("data") or {})]
        previous = self.records.get(body)
        gate = None
        if spec.gate is not None and previous is not None and previous.phase == "Progressing":
            settings = self.ctx.settings
            gate = await prometheus.read_gate(settings.prometheus_url, spec.gate.query,
                                              deadline=settings.prometheus_timeout_seconds)
        decision = decide(
            spec, previous, namespace=namespace, versions=versions,
            tenants=[tenant_state(namespace, spec.template, t) for t in tenants],
            resume_token=request_token(meta, RESUME_ROLLOUT_ANNOTATION),
            rollback_token=request_token(meta, ROLLBACK_ROLLOUT_ANNOTATION),
            now=datetime.datetime.now(datetime.UTC).replace(microsecond=0), gate=gate, check_seconds=check,
        )
        self.records.put(body, decision.status)
        st = decision.status
        halted = st.phase == "Halted" or (st.phase == "RolledBack" and st.failed > 0)
        return Outcome(not halted, st.reason or st.phase or "Idle", st.message or "", stalled=halted, status=st,
                       events=decision.events, check_in=decision.check_in)
