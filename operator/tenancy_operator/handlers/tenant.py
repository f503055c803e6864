"""Tenant handlers: create/update/resume and the sweep share one idempotent reconcile."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.conditions import Cond, merge, status_differs
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.tenant import (
    ACK_SCHEMA_RECREATED_ANNOTATION,
    Outcome,
    Retry,
    TenantReconciler,
    secret_name,
)
from tenancy_operator.runtime_context import OperatorContext

KIND, PLURAL = "Tenant", "tenants"
log = get_logger(__name__)


def _key(body: Mapping[str, Any]) -> str:
    return f"{body['metadata']['namespace']}/{body['metadata']['name']}"


def desired_status(body: Mapping[str, Any], out: Outcome, ident: str | None) -> dict[str, Any]:
    meta, spec = body["metadata"], body.get("spec") or {}
    generation = int(meta.get("generation") or 0)
    old = (body.get("status") or {}).get("conditions")
    if out.ready:
        conds = [Cond("Ready", "True", out.reason, out.message or f"tenant is {out.phase}")]
        drop = ["Reconciling", "Stalled"]
    elif out.stalled:
        conds = [Cond("Ready", "False", out.reason, out.message), Cond("Stalled", "True", out.reason, out.message)]
        drop = ["Reconciling"]
    else:
        conds = [Cond("Ready", "False", out.reason, out.message),
                 Cond("Reconciling", "True", "Retrying", out.message)]
        drop = ["Stalled"]
    if out.data_loss:
        conds.append(Cond(
            "SchemaRecreated", "True", "SchemaDroppedOutOfBand",
            "the schema was dropped outside the operator and re-created empty; its data is gone."
            f" Annotate {ACK_SCHEMA_RECREATED_ANNOTATION}=<new value> once handled.",
        ))
    else:
        drop.append("SchemaRecreated")
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": out.phase,
        "conditions": merge(old, conds, generation, drop=drop),
        "database": spec.get("database", "default"),
    }
    if ident and out.tenant_id:
        status.update({"tenantId": out.tenant_id, "schema": ident, "role": ident,
                       "secretName": secret_name(meta["name"])})
    if out.schema_version:
        status["schemaVersion"] = out.schema_version
    return status


class TenantService:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.reconciler = TenantReconciler(ctx)

    async def write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        if status_differs(body.get("status"), status):
            meta = body["metadata"]
            await self.ctx.kube.patch_status(PLURAL, meta["namespace"], meta["name"], status)

    async def run(self, body: Mapping[str, Any], retry: int = 0) -> None:
        """One reconcile with its reporting. Raises kopf.TemporaryError to be retried."""

        meta = body["metadata"]
        key = _key(body)
        metrics.PENDING.add(KIND, key)
        if not body.get("status"):  # first sight: tell GitOps tools we are working on it
            generation = int(meta.get("generation") or 0)
            await self.write_status(body, {
                "observedGeneration": generation, "phase": "Provisioning",
                "conditions": merge(None, [Cond("Ready", "Unknown", "Provisioning", "provisioning started"),
                                           Cond("Reconciling", "True", "Provisioning", "provisioning started")],
                                    generation),
            })
        async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
            with metrics.observe_reconcile(KIND):
                try:
                    out = await self.reconciler.reconcile(body)
                except Retry as exc:
                    metrics.record_result(KIND, False, exc.reason)
                    out = Outcome(False, exc.reason, exc.message, "Provisioning"
                                  if not (body.get("status") or {}).get("tenantId") else "Failed")
                    await self._report(body, out)
                    delay = min(60.0, 2.0 ** min(retry, 6)) * random.uniform(0.8, 1.2)  # noqa: S311
                    raise kopf.TemporaryError(exc.message, delay=delay) from exc
                except Exception:
                    metrics.record_result(KIND, False, "Internal")
                    raise
        metrics.record_result(KIND, out.ready, None if out.ready else out.reason)
        await self._report(body, out)
        metrics.PENDING.discard(KIND, key)

    async def _report(self, body: Mapping[str, Any], out: Outcome) -> None:
        from tenancy_operator.api.tenant import tenant_identifier

        try:
            ident: str | None = tenant_identifier(body["metadata"]["name"])
        except ValueError:
            ident = None
        old_ready: dict[str, Any] = next((c for c in (body.get("status") or {}).get("conditions") or []
                          if c.get("type") == "Ready"), {})
        for type_, reason, message in out.events:
            self.ctx.events.post(body, type_, reason, message)
        if not out.ready and old_ready.get("reason") != out.reason:
            self.ctx.events.warning(body, out.reason, out.message)  # once per transition, not per retry
        log.info("reconciled", kind=KIND, namespace=body["metadata"]["namespace"],
                 name=body["metadata"]["name"], tenant=ident, result="ready" if out.ready else out.reason,
                 repairs=out.repairs or None)
        await self.write_status(body, desired_status(body, out, ident))

    async def delete(self, body: Mapping[str, Any], retry: int = 0) -> None:
        key = _key(body)
        metrics.PENDING.add(KIND, key)
        meta = body["metadata"]
        async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
            try:
                evs = await self.reconciler.finalize(body)
            except Retry as exc:
                metrics.record_result(KIND, False, exc.reason)
                await self.write_status(body, {
                    "phase": "Deleting",
                    "conditions": merge((body.get("status") or {}).get("conditions"),
                                        [Cond("Ready", "False", exc.reason, exc.message)],
                                        int(meta.get("generation") or 0)),
                })
                delay = min(60.0, 2.0 ** min(retry, 6)) * random.uniform(0.8, 1.2)  # noqa: S311
                raise kopf.TemporaryError(exc.message, delay=delay) from exc
        for type_, reason, message in evs:
            self.ctx.events.post(body, type_, reason, message)
        metrics.PENDING.discard(KIND, key)
        self.ctx.locks.pop((KIND, meta["namespace"], meta["name"]), None)


def create_service(ctx: OperatorContext) -> TenantService:
    return TenantService(ctx)


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the Tenant handlers to ``registry`` (no import-time side effects)."""

    def service(memo: Any) -> TenantService:
        return memo.services[KIND]  # type: ignore[no-any-return]

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    async def tenant_reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        await service(memo).run(body, retry)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="finalize")
    async def tenant_delete(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        await service(memo).delete(body, retry)
