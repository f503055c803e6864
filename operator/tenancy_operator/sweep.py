"""The periodic, operator-wide drift sweep.

Kopf's handlers fire on changes to Tenants; nothing tells us when someone drops a role or a
Secret behind our back. Instead of one Kopf timer per object (a task and a finalizer each), one
loop checks every tenant of a target with a few bulk catalog queries and one Secret list, then
reconciles only the tenants that differ.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg_pool

from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.tenant import MANAGED_BY, TENANT_LABEL, purge_expired_archives, secret_name
from tenancy_operator.runtime_context import OperatorContext

if TYPE_CHECKING:
    from tenancy_operator.handlers.tenant import TenantService

log = get_logger(__name__)
FINALIZER = "tenancy.dev/finalizer"


def _ready(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def drifted(spec: TenantSpec, ident: str, obs: sqlt.Observed) -> list[str]:
    """What differs between a provisioned tenant's declaration and the catalog."""
    want_login = str(getattr(spec.state, "value", spec.state)) != "Suspended"
    checks = {
        "role": obs.role_exists,
        "schema": obs.schema_exists,
        "schema-owner": obs.schema_owned,
        "grants": obs.schema_privileges,
        "search-path": obs.search_path in (ident, f'"{ident}"'),
        "login": obs.can_login == want_login,
    }
    return [k for k, ok in checks.items() if not ok]


class Sweeper:
    def __init__(self, ctx: OperatorContext, tenants: TenantService) -> None:
        self.ctx = ctx
        self.tenants = tenants

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.settings.sweep_interval_seconds)
            try:
                await self.sweep_once()
                self.ctx.last_sweep_ok = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed")

    async def sweep_once(self) -> int:
        """Returns how many tenants were reconciled because they differed."""
        self.ctx.targets.update_pool_metrics()
        bodies = await self.ctx.kube.list_objects("tenants")
        namespaces = set(self.ctx.settings.namespace_list)
        if namespaces:
            bodies = [b for b in bodies if b["metadata"]["namespace"] in namespaces]
        phases = Counter((b.get("status") or {}).get("phase", "Provisioning") for b in bodies)
        for phase in ("Provisioning", "Active", "Suspended", "Deleting", "Failed"):
            metrics.TENANTS.labels(phase=phase).set(phases.get(phase, 0))
        secrets = {
            (s["metadata"]["namespace"], s["metadata"]["name"])
            for s in await self.ctx.kube.list_secrets(
                ",".join(f"{k}={v}" for k, v in MANAGED_BY.items()) + f",{TENANT_LABEL}"
            )
        }
        by_target: dict[str, list[tuple[dict[str, Any], TenantSpec, str]]] = defaultdict(list)
        todo: list[dict[str, Any]] = []
        for body in bodies:
            meta = body["metadata"]
            # Only objects Kopf has taken on (our finalizer is set): reconciling one before that would
            # make it Ready with nothing to stop its deletion from skipping the deletion policy.
            if meta.get("deletionTimestamp") or FINALIZER not in (meta.get("finalizers") or []):
                continue
            spec = TenantSpec.model_validate(body.get("spec") or {})
            try:
                ident = tenant_identifier(body["metadata"]["name"])
            except ValueError:
                continue
            has_secret = (body["metadata"]["namespace"], secret_name(body["metadata"]["name"])) in secrets
            if not _ready(body) or not has_secret:
                todo.append(body)
            else:
                by_target[spec.database].append((body, spec, ident))
        for target, items in by_target.items():
            try:
                async with self.ctx.targets.connection(target) as conn:
                    observed = await sqlt.observe(conn, [ident for _, _, ident in items])
            except (psycopg_pool.PoolTimeout, psycopg.OperationalError, LookupError):
                todo.extend(body for body, _, _ in items)  # the reconcile reports why
                continue
            for body, spec, ident in items:
                if drifted(spec, ident, observed[ident]):
                    todo.append(body)
        sem = asyncio.Semaphore(self.ctx.settings.reconcile_concurrency)
        reconciled = 0

        async def one(body: dict[str, Any]) -> None:
            nonlocal reconciled
            async with sem:
                try:
                    if await self.tenants.run_listed(body, unless_in_flight=True) is not None:
                        reconciled += 1
                except Exception as exc:  # the handler's retry will report; keep sweeping
                    reconciled += 1
                    log.warning("sweep reconcile failed", namespace=body["metadata"]["namespace"],
                                name=body["metadata"]["name"], error=type(exc).__name__)

        await asyncio.gather(*(one(b) for b in todo))
        for target in self.ctx.targets.pools:
            try:
                await self.ctx.ensure_control_schema(target)
                purged = await purge_expired_archives(self.ctx, target)
            except (psycopg_pool.PoolTimeout, psycopg.OperationalError):
                continue
            if purged:
                log.info("archives purged", target=target, archives=purged)
        if reconciled:
            # Listed ones left out: deleted or edited meanwhile, or their handler's reconcile in flight.
            log.info("sweep repaired", tenants=reconciled, listed=len(todo))
        return reconciled
