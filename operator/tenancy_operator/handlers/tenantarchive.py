"""TenantArchive handlers: create/update/resume show the catalog's record in status and carry
spec.protected into the catalog; deletion purges the archive (reconcilers/tenantarchive.py).
Kopf's finalizer holds a deleted object until its archive is purged, or for as long as it is
protected."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.handlers.common import backoff, reconciled_by, write_record
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.tenantarchive import PLURAL, Outcome, TenantArchiveReconciler
from tenancy_operator.runtime_context import OperatorContext

KIND = "TenantArchive"
PROTECTED_RECHECK_SECONDS = 10.0
"""How soon a deletion held by spec.protected looks again (Kopf runs no update handler meanwhile)."""
log = get_logger(__name__)


class TenantArchiveService:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.reconciler = TenantArchiveReconciler(ctx)

    async def run(self, body: Mapping[str, Any], retry: int = 0, *, deleting: bool = False) -> None:
        meta = body["metadata"]
        async with self.ctx.lock(KIND, str(meta["namespace"]), str(meta["name"])):
            with metrics.observe_reconcile(KIND):
                try:
                    out = await (self.reconciler.finalize(body) if deleting else self.reconciler.reconcile(body))
                except Retry as exc:
                    metrics.record_result(KIND, False, exc.reason)
                    await self._report(body, Outcome(False, exc.reason, exc.message))
                    raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc
            metrics.record_result(KIND, out.ready, None if out.ready else out.reason)
            if not (deleting and out.done):
                await self._report(body, out)
            else:
                for type_, reason, message in out.events:
                    self.ctx.events.post(body, type_, reason, message)
        if deleting and not out.done:
            delay = PROTECTED_RECHECK_SECONDS if out.reason == "Protected" else backoff(retry)
            raise kopf.TemporaryError(out.message, delay=delay)

    async def _report(self, body: Mapping[str, Any], out: Outcome) -> None:
        meta = body["metadata"]
        for type_, reason, message in out.events:
            self.ctx.events.post(body, type_, reason, message)
        if out.events or not out.ready:
            log.info("reconciled", kind=KIND, namespace=meta["namespace"], name=meta["name"],
                     result="ready" if out.ready else out.reason)
        await write_record(self.ctx.status, PLURAL, body, out, out.status)  # False: gone meanwhile


SERVICE = TenantArchiveService
"""The kind's service class: runtime.py makes one per process (memo.services[KIND])."""


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the TenantArchive handlers to ``registry``."""
    service = reconciled_by(registry, KIND, PLURAL, TenantArchiveService)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="purge")
    async def tenantarchive_purge(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        await service(memo).run(body, retry, deleting=True)
