"""The periodic quota pass: every tenant this replica holds measured with one query per measure and
database target, and evaluated (QuotaService.apply), a slice of tenants per turn of the event loop.

Tenants and Quotas come from the watch caches, LISTed instead every RELIST_EVERY passes (a cache
can miss what it was never sent). Sharded, the pass also sets the slice label of the Quotas this
replica sees (quota_cluster.py), and forgets the tenants neither a Tenant nor a Quota names any more.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from tenancy_operator.api.tenant import serving_database
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.quota_cluster import QUOTAS, TENANTS, first_provisioning, read_version, tenant_ref
from tenancy_operator.reconcilers.quota_limits import sort_quotas
from tenancy_operator.reconcilers.quota_types import LOCK_KIND, Key, Probe, Subject

if TYPE_CHECKING:
    from tenancy_operator.reconcilers.quota import QuotaService

log = get_logger(__name__)
T = TypeVar("T")

RELIST_EVERY = 10
"""Every how many periodic passes Tenants and Quotas are LISTed instead of read from the watch cache."""
PASS_SLICE = 32
"""Tenants a periodic pass evaluates per turn of the event loop."""


async def in_slices(items: Sequence[T], work: Callable[[T], Awaitable[None]]) -> None:
    """``work`` on every item, PASS_SLICE at once, the event loop serving everything else between
    slices: work that finds nothing to do never waits, so one gather over the whole fleet would run
    in a single turn of the loop, and a FeatureFlag edit arriving meanwhile would wait for all of it."""
    for start in range(0, len(items), PASS_SLICE):
        await asyncio.gather(*(work(item) for item in items[start:start + PASS_SLICE]))
        await asyncio.sleep(0)


class QuotaPass:
    """The periodic pass of one QuotaService (its loop calls ``run``)."""

    def __init__(self, service: QuotaService) -> None:
        self.service = service
        self.passes = 0
        self.relist_next = False

    async def run(self) -> int:
        """Measure and evaluate every tenant; returns how many subjects were evaluated."""
        svc = self.service
        started = time.monotonic()
        epochs = dict(svc.epochs)
        listing_due = self.passes % RELIST_EVERY == 0 or self.relist_next
        relist = {TENANTS: listing_due, QUOTAS: listing_due}
        if self.passes == 0:  # at start Kopf's listing fills the caches: read them, not a second LIST
            relist = {plural: not await svc.cluster.filled_by_watch(plural) for plural in relist}
        # The start-up counts can be off by objects created or deleted meanwhile: the next pass LISTs.
        self.relist_next = self.passes == 0 and not all(relist.values())
        self.passes += 1
        watched = svc.cluster.watched
        tenants = [t for t in await svc.cluster.every(TENANTS, relist[TENANTS]) if watched(t["metadata"]["namespace"])]
        quotas = [q for q in await svc.cluster.every(QUOTAS, relist[QUOTAS]) if watched(q["metadata"]["namespace"])]
        if not svc.caches_read:  # from here on, events of other versions are evaluated on their own
            svc.first_read = {read_version(b) for b in (*tenants, *quotas)}
            svc.caches_read = True
        subjects: dict[Key, Subject] = {}
        for t in tenants:
            key = (t["metadata"]["namespace"], t["metadata"]["name"])
            subjects[key] = Subject(key[0], key[1], t, [])
        for q in quotas:
            ref = tenant_ref(q)
            if ref is None:
                continue
            key = (q["metadata"]["namespace"], ref)
            subjects.setdefault(key, Subject(key[0], key[1], None, [])).quotas.append(q)
        if not relist[TENANTS]:
            # A Quota whose Tenant the cache has not seen may name a Tenant that Kopf has not
            # delivered yet (thousands created at once): only a LIST may conclude TenantNotFound.
            # Its own events judge it meanwhile (a Quota event reads a missing Tenant with a GET).
            subjects = {k: s for k, s in subjects.items() if s.tenant is not None or k in svc.memory}
        if svc.ctx.ownership.sharded:
            await self._label(subjects, tenants_listed=relist[TENANTS])
            subjects = {k: s for k, s in subjects.items() if svc.cluster.ours(k, s.tenant, s.quotas)}
        for s in subjects.values():
            s.quotas = sort_quotas(s.quotas)

        # Tenants in their first provisioning wait for their Ready (or Stalled) event, like a new
        # Quota's handler does: measuring them now would only write a status replaced seconds later.
        now = datetime.now(UTC)
        waiting = {k for k, s in subjects.items()
                   if s.tenant is not None and k not in svc.applied and first_provisioning(s.tenant, now)}
        svc.deferred |= waiting
        by_target: dict[str, list[Subject]] = defaultdict(list)
        for k, s in subjects.items():
            if k not in waiting and s.tenant is not None and not s.tenant["metadata"].get("deletionTimestamp"):
                by_target[serving_database(s.tenant)].append(s)
        probes: dict[Key, Probe] = {}
        for target, items in by_target.items():
            with metrics.QUOTA_MEASURE_DURATION.labels(target=target).time():
                probes.update(await svc.probes.probe_target(target, items, load=True))

        sem = asyncio.Semaphore(svc.ctx.settings.reconcile_concurrency)

        async def one(s: Subject) -> None:
            async with sem, svc.ctx.lock(LOCK_KIND, s.namespace, s.name):
                if svc.epochs.get(s.key, 0) != epochs.get(s.key, 0):
                    return  # a handler evaluated it from fresher reads meanwhile
                try:
                    await svc.apply(s, probes.get(s.key), trigger="interval")
                except Exception as exc:  # one tenant's failure never stops the pass
                    log.warning("quota evaluation failed", namespace=s.namespace, tenant=s.name,
                                error=type(exc).__name__, detail=str(exc)[:200])

        await in_slices([s for k, s in subjects.items() if k not in waiting], one)
        remembered = set(svc.memory) | svc.series.tenants() | set(svc.expiries) | svc.probes.load_series
        for key in remembered - set(subjects):
            svc.forget(key)  # neither a Tenant nor a Quota names it any more
        svc.series.update_aggregates()
        metrics.QUOTA_PASS_DURATION.observe(time.monotonic() - started)
        return len(subjects)

    async def _label(self, subjects: Mapping[Key, Subject], *, tenants_listed: bool) -> None:
        """Sharded: the slice label of each Quota this replica sees, from its Tenant as this pass
        knows it (ours from the cache, another replica's or none from this pass's LIST)."""
        svc = self.service
        todo: list[tuple[Subject, str | None]] = []  # each subject with its Tenant's uid
        now = datetime.now(UTC)
        for key, s in subjects.items():
            if s.tenant is not None:
                if key not in svc.applied and first_provisioning(s.tenant, now):
                    continue  # its evaluation at Ready labels it: no burst of writes in a mass creation
                uid: str | None = str(s.tenant["metadata"].get("uid") or "")
            elif tenants_listed:
                uid = svc.cluster.elsewhere.get(key)
            else:
                continue  # only a LIST says which replica's, or whether it exists
            if any(svc.cluster.label_to_set(q, uid)[0] for q in s.quotas):
                todo.append((s, uid))

        async def one(item: tuple[Subject, str | None]) -> None:
            s, uid = item
            try:
                await svc.cluster.label_quotas(s.quotas, uid)
            except ApiError as exc:  # the next pass labels it
                log.warning("labelling quotas failed", namespace=s.namespace, tenant=s.name, status=exc.status)

        await in_slices(todo, one)
