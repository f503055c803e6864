"""Quota handlers: thin entry points into the quota service (reconcilers/quota.py).

Quotas are followed through their watch events only, with no Kopf create/update/resume handler:
those stored a last-handled annotation on every Quota (one PATCH and one watch event each); the
service decides from the Quota's generation what still needs evaluating. Nor is Kopf's per-object
queue the right one: an evaluation is of a tenant, not of one Quota (its Tenant's events and every
Quota naming it share it), so the service queues by tenant (keyed_work.KeyedWork). Quotas get no
finalizer: nothing must be undone before one disappears, and its deletion is seen as a watch event
(tenant back to tier defaults at once). The periodic pass catches anything an event missed, so a
deletion while the operator is down is handled at the next start.
"""

from __future__ import annotations

from typing import Any

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.handlers.common import WATCH_HANDLER_ID, services
from tenancy_operator.reconcilers.quota import QuotaService

KIND, PLURAL = "Quota", "quotas"


SERVICE = QuotaService
"""The kind's service class (runtime.py makes one per process); its ``run_forever`` (measure,
enforce, expire overrides) runs in the background."""


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the Quota handlers to ``registry`` (Tenant events reach the service through the
    Tenant handlers' watch: QuotaService.tenant_changed)."""
    service = services(KIND, QuotaService)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id=WATCH_HANDLER_ID)
    async def quota_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        service(memo).cluster.observe(type, body)
        if type == "DELETED":
            await service(memo).quota_deleted(body)
        else:
            service(memo).quota_changed(type, body)
