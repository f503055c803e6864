"""SchemaRollout handlers: create/update/resume run one reconcile (reconcilers/schemarollout.py),
and a running rollout is looked at again every TENANCY_ROLLOUT_CHECK_SECONDS (its Tenants'
progress, its gate, the next wave when due). Nothing to clean up on deletion (the Tenants then
follow their template freely), so no finalizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.handlers.common import Rechecks, backoff, reconciled_by, write_record
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.schemarollout import PLURAL, Outcome, SchemaRolloutReconciler
from tenancy_operator.runtime_context import OperatorContext

KIND = "SchemaRollout"
log = get_logger(__name__)


class SchemaRolloutService:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.reconciler = SchemaRolloutReconciler(ctx)
        self.rechecks = Rechecks(self._recheck, ctx.settings.rollout_check_seconds)

    async def _recheck(self, key: tuple[str, str]) -> None:
        body = await self.ctx.kube.get_object(PLURAL, *key)
        if body is not None and not body["metadata"].get("deletionTimestamp"):
            await self.run(body)

    async def run(self, body: Mapping[str, Any], retry: int = 0) -> None:
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        async with self.ctx.lock(KIND, *key):
            with metrics.observe_reconcile(KIND):
                try:
                    out = await self.reconciler.reconcile(body)
                except Retry as exc:
                    metrics.record_result(KIND, False, exc.reason)
                    out = Outcome(False, exc.reason, exc.message)
                    await self._report(body, out)
                    raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc
            metrics.record_result(KIND, out.ready, None if out.ready else out.reason)
            await self._report(body, out)
        self.rechecks.schedule(key, out.check_in)

    async def _report(self, body: Mapping[str, Any], out: Outcome) -> None:
        meta = body["metadata"]
        for type_, reason, message in out.events:
            self.ctx.events.post(body, type_, reason, message)
        if out.status is not None:
            st = out.status
            for state in ("migrated", "failed", "pending", "pinned"):
                metrics.SCHEMA_ROLLOUT_TENANTS.labels(namespace=meta["namespace"], rollout=meta["name"],
                                                      state=state).set(getattr(st, state))
        if out.events or not out.ready:
            log.info("reconciled", kind=KIND, namespace=meta["namespace"], name=meta["name"],
                     result="ready" if out.ready else out.reason, phase=out.status.phase if out.status else None)
        await write_record(self.ctx.status, PLURAL, body, out, out.status,  # False: gone meanwhile
                           written=self.reconciler.records.written)
        metrics.STALLED.update(KIND, f"{meta['namespace']}/{meta['name']}", out.reason if out.stalled else None)

    def forget(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self.reconciler.forget(meta.get("uid"))
        self.rechecks.schedule((str(meta["namespace"]), str(meta["name"])), None)
        metrics.STALLED.forget(KIND, f"{meta['namespace']}/{meta['name']}")
        for state in ("migrated", "failed", "pending", "pinned"):
            metrics.SCHEMA_ROLLOUT_TENANTS.remove(meta["namespace"], meta["name"], state)

    async def run_forever(self) -> None:
        await self.rechecks.run_forever()


SERVICE = SchemaRolloutService
"""The kind's service class: runtime.py makes one per process (memo.services[KIND])."""


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the SchemaRollout handlers to ``registry``."""
    service = reconciled_by(registry, KIND, PLURAL, SchemaRolloutService)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="schemarollout-gone")
    async def schemarollout_gone(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            service(memo).forget(body)
