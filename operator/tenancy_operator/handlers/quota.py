"""Quota handlers: thin entry points into the quota service (reconcilers/quota.py).

Quotas get no finalizer: nothing must be undone before one disappears, and its deletion is seen
as a watch event (tenant back to tier defaults at once). The periodic pass catches anything an
event missed, so a deletion while the operator is down is handled at the next start.
"""

from __future__ import annotations

from typing import Any

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.handlers.common import backoff
from tenancy_operator.observability.logging import WATCH_HANDLER_ID
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.quota import QuotaService
from tenancy_operator.runtime_context import OperatorContext

KIND, PLURAL = "Quota", "quotas"


def create_service(ctx: OperatorContext) -> QuotaService:
    """The quota service; its ``run_forever`` (measure, enforce, expire overrides) runs in the background."""
    return QuotaService(ctx)


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the Quota handlers to ``registry`` (Tenant events reach the service through the
    Tenant handlers' watch: QuotaService.tenant_changed)."""

    def service(memo: Any) -> QuotaService:
        return memo.services[KIND]  # type: ignore[no-any-return]

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    async def quota_reconcile(
        body: kopf.Body, memo: kopf.Memo, retry: int, reason: str, **_: Any
    ) -> None:
        svc = service(memo)
        if reason == kopf.Reason.RESUME.value and not svc.initial_pass_done:
            return  # the start-up pass evaluates every tenant in bulk
        try:
            await svc.handle_quota(body, retry, created=reason == kopf.Reason.CREATE.value)
        except Retry as exc:
            raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id=WATCH_HANDLER_ID)
    async def quota_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        service(memo).observe(PLURAL, type, body)
        if type == "DELETED":
            await service(memo).quota_deleted(body)
