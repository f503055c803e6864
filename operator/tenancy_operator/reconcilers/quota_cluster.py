"""What the quota service knows of the cluster: the Tenants and Quotas it evaluates.

The watch streams feed two caches (watch_cache.py): a Tenant event must not cost a LIST of every
Quota, and with the Quotas indexed by the tenant they name, one tenant's evaluation does not scan
every Quota of its namespace (a mass creation stays linear). The periodic pass LISTs now and then
(``every``), which also drops what a watch re-list may have missed. The status writer stores our
own status writes here (status_writer.keep_fresh), so the next evaluation compares with them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.names import SLICE_LABEL
from tenancy_operator.api.quota import QuotaSpec
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.quota_limits import effective_limits, parse_time, sort_quotas
from tenancy_operator.reconcilers.quota_types import Key
from tenancy_operator.runtime_context import OperatorContext
from tenancy_operator.watch_cache import WatchCache

QUOTAS, TENANTS = "quotas", "tenants"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
FIRST_PROVISIONING_GRACE = timedelta(minutes=10)
"""A tenant in its first provisioning is evaluated when its Tenant reports Ready (or Stalled), not
before: its Quota's first status is then the final one instead of a TenantNotReady that Ready
replaces seconds later. Past this age the periodic pass evaluates it anyway."""
FILL_STALL_SECONDS = 10.0
"""At start, how long the first pass waits for a cache that has stopped growing short of the
kind's count before it LISTs the kind instead (filled_by_watch)."""
FILL_POLL_SECONDS = 0.25


def slim_quota(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the cache keeps of a Quota: not its managedFields nor kubectl's copy of its last
    applied spec, never read here and often its largest parts."""
    out = dict(body)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    out["metadata"] = meta
    return out


def tenant_ref(quota: Mapping[str, Any]) -> str | None:
    ref = ((quota.get("spec") or {}).get("tenantRef") or {}).get("name")
    return str(ref) if ref else None


def tenant_of(quota: Mapping[str, Any]) -> Key | None:
    """The tenant key a Quota names (the quota cache's index)."""
    ref = tenant_ref(quota)
    return (quota["metadata"]["namespace"], ref) if ref is not None else None


def tenant_state(tenant: Mapping[str, Any]) -> tuple[str, str]:
    """What a Tenant's limits depend on: (uid, tier)."""
    return (str(tenant["metadata"].get("uid") or ""), str((tenant.get("spec") or {}).get("tier") or "free"))


def read_version(body: Mapping[str, Any]) -> tuple[str, str]:
    """Which version of an object was read: (uid, resourceVersion)."""
    meta = body["metadata"]
    return (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))


def is_ready(body: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def first_provisioning(tenant: Mapping[str, Any], now: datetime) -> bool:
    """The Tenant's own status says its first provisioning is under way: no status yet, or
    Reconciling without ever having been provisioned (no tenantId) and neither Ready nor Stalled;
    and it was created less than FIRST_PROVISIONING_GRACE ago (past that, its Quota is evaluated
    anyway and says TenantNotReady)."""
    meta = tenant["metadata"]
    created = parse_time(meta.get("creationTimestamp"))
    if meta.get("deletionTimestamp") or created is None or now - created > FIRST_PROVISIONING_GRACE:
        return False
    status = tenant.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if not conds:
        return True
    return (not status.get("tenantId") and conds.get("Reconciling") == "True"
            and conds.get("Ready") != "True" and conds.get("Stalled") != "True")


class QuotaCluster:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        # What this run's Quota watch brings (ownership.quota_selector): the answer to a write that
        # labelled a Quota for another replica's slice must not keep it here.
        self.quotas = WatchCache(slim_quota, index=tenant_of, admit=lambda q: ctx.ownership.watches_quota(q))
        self.tenants = ctx.tenants
        self._caches = {QUOTAS: self.quotas, TENANTS: self.tenants}
        ctx.status.keep_fresh(QUOTAS, self.quotas)
        # Each run's caches replace the last run's in these series.
        metrics.WATCH_CACHE_OBJECTS.labels(kind="Quota").set_function(lambda: len(self.quotas))
        metrics.WATCH_CACHE_OBJECTS.labels(kind="Tenant").set_function(lambda: len(self.tenants))
        self.elsewhere: dict[Key, str] = {}
        """Sharded replicas: Tenants that exist and another replica owns, as of the last LIST, with
        their uids (their Quotas are that replica's to evaluate, and carry its slice's label)."""

    def observe(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Quota watch event (type None: Kopf's initial listing). The Tenants' cache is the
        runtime context's, fed by the Tenant watch (handlers/tenant.py)."""
        self.quotas.observe(type_, body)

    def watched(self, namespace: str) -> bool:
        namespaces = self.ctx.settings.namespace_list
        return not namespaces or namespace in namespaces

    def ours(self, key: Key, tenant: Mapping[str, Any] | None, quotas: Sequence[Mapping[str, Any]]) -> bool:
        """Sharded replicas: a tenant's quotas are evaluated by the replica owning the Tenant; those
        naming no existing Tenant (TenantNotFound) by the one owning the Quota."""
        ownership = self.ctx.ownership
        if tenant is not None:
            return ownership.owns(tenant)
        return key not in self.elsewhere and any(ownership.owns(q) for q in quotas)

    async def get_tenant(self, namespace: str, name: str) -> dict[str, Any] | None:
        cached = self.tenants.get((namespace, name))
        if cached is not None:
            return cached
        tenant = await self.ctx.kube.get_object(TENANTS, namespace, name)
        if tenant is not None and self.ctx.ownership.owns(tenant):
            # A Tenant this run's watch brings, which has not shown it yet (in a burst its events
            # wait behind the others'): the version read serves the next evaluations instead of
            # a GET each (the cache keeps whichever version is newer).
            self.tenants.store(tenant)
        return tenant

    async def tenant_quotas(self, namespace: str, tenant: str) -> list[dict[str, Any]]:
        """The Quotas naming ``tenant``: from the watch cache, from a LIST before it filled."""
        if self.quotas.listed:
            return self.quotas.group((namespace, tenant))
        return [q for q in await self.ctx.kube.list_objects(QUOTAS, namespace) if tenant_ref(q) == tenant]

    async def filled_by_watch(self, plural: str) -> bool:
        """At start: wait until the watch (Kopf's initial listing) has brought every object of
        the kind into the cache, so the first pass reads the cache instead of decoding the whole
        fleet a second time beside Kopf's resume. True once the cache holds as many objects as the API server counts.

        False (the caller LISTs) when the kind is watched by slice (the Tenants of a replica that
        holds some of the slices: the count is of all), when the API server gives no count, or
        when the cache stops growing short of it for FILL_STALL_SECONDS. The count can be off by
        objects created or deleted while it was taken; the pass after the first LISTs
        (QuotaService.pass_once)."""
        if plural == TENANTS and not self.ctx.ownership.whole:
            return False
        if plural == QUOTAS and self.ctx.ownership.quota_selector() is not None:
            return False  # watched by label: the count is of all
        try:
            count = await self.ctx.kube.count(plural)
        except ApiError:
            return False
        if count is None:
            return False
        cache = self._caches[plural]
        loop = asyncio.get_running_loop()
        size, since = len(cache), loop.time()
        while len(cache) < count:
            if len(cache) != size:
                size, since = len(cache), loop.time()
            elif loop.time() - since > FILL_STALL_SECONDS:
                return False
            await asyncio.sleep(FILL_POLL_SECONDS)  # the cache grows with Kopf's resume: no event to wait on
        return cache.listed or count == 0

    async def every(self, plural: str, relist: bool) -> list[dict[str, Any]]:
        """Every Tenant or Quota, from the watch cache; from a LIST (which then refreshes the
        cache) when ``relist`` or before any watch event came: parsing every object of a large
        fleet at every pass would hold the event loop for long; the periodic LIST still drops what
        a watch re-list may have missed (a deletion while the stream was down)."""
        cache = self._caches[plural]
        if cache.listed and not relist:
            return cache.values()
        ownership = self.ctx.ownership
        if plural != TENANTS or not ownership.sharded:
            labels = (ownership.quota_selector() if plural == QUOTAS else None) or ""
            await cache.relist(self.ctx.kube.list_pages(plural, label_selector=labels))
            return cache.values()
        # The API server selects by slice: this replica decodes its own Tenants whole and only the
        # names and uids of the others' (ownership.owns: a second line behind the selectors).
        await cache.relist(self.ctx.kube.list_pages(plural, shard_selector=ownership.selector()),
                           keep=ownership.owns)
        others = ownership.others_selector()
        elsewhere: dict[Key, str] = {}
        for item in await self.ctx.kube.list_uids(plural, others) if others else []:
            meta = item["metadata"]
            if not ownership.owns(item):
                elsewhere[(meta["namespace"], meta["name"])] = str(meta.get("uid") or "")
        self.elsewhere = elsewhere
        return cache.values()

    def label_to_set(self, quota: Mapping[str, Any], tenant_uid: str | None) -> tuple[bool, str | None]:
        """Sharded: whether this replica sets the Quota's slice label, and to what: its Tenant's
        slice (``tenant_uid``), or none when the Tenant is gone (then every replica sees it). The
        Tenant's holder labels a new Quota; another replica only corrects a label it sees, one
        naming its own slices or another slice count (a Tenant re-created elsewhere, a hand edit).
        A replica holding every slice (the first to start, a lone survivor) labels too: the labels
        are in place when the others join or restart, instead of one write per Quota then."""
        ownership = self.ctx.ownership
        if not ownership.sharded:
            return False, None
        want = ownership.label_for(tenant_uid) if tenant_uid else None
        have = (quota["metadata"].get("labels") or {}).get(SLICE_LABEL)
        if have == want or (have is None and tenant_uid and not ownership.owns_uid(tenant_uid)):
            return False, None
        return True, want

    async def label_quotas(self, quotas: Sequence[Mapping[str, Any]], tenant_uid: str | None) -> None:
        """Set the slice labels ``label_to_set`` asks for. A Quota with its Tenant's label is seen
        by that Tenant's holder only (shards.Ownership.quota_selector)."""
        for q in quotas:
            change, want = self.label_to_set(q, tenant_uid)
            if change:
                meta = q["metadata"]
                written = await self.ctx.kube.set_label(QUOTAS, meta["namespace"], meta["name"], SLICE_LABEL, want,
                                                        uid=str(meta.get("uid") or ""))
                if written is not None:
                    self.quotas.store(written)  # the next evaluation does not label it again

    async def quotas_of(self, namespace: str, tenant: str) -> list[dict[str, Any]]:
        """The Quotas naming ``tenant``, read from the API server (a fieldSelector on
        spec.tenantRef.name) and stored in the cache: before a Tenant's first evaluation applies
        its tier's defaults, as the cache shows no Quota for it, though its Quota may be on its way
        in the watch (made at the same moment). Empty when the API server cannot select on that
        field (a CRD older than this operator)."""
        found: list[dict[str, Any]] = []
        try:
            async for page in self.ctx.kube.list_pages(QUOTAS, namespace,
                                                       field_selector=f"spec.tenantRef.name={tenant}"):
                found += page.items
        except ApiError as exc:
            if exc.status != 400:
                raise
            return []
        for q in found:
            self.quotas.store(q)
        return [q for q in found if tenant_ref(q) == tenant]

    def expected_limits(self, tenant: Mapping[str, Any]) -> dict[str, str] | None:
        """The effective limits this Tenant's next evaluation will publish, from the watch cache:
        the Tenant's own first status carries them, so the evaluation right after it has nothing
        to write there (one status PATCH and one watch event fewer per new tenant). None before
        any Quota was seen."""
        if not self.quotas.listed:
            return None
        meta = tenant["metadata"]
        quotas = sort_quotas(self.quotas.group((meta["namespace"], meta["name"])))
        spec: QuotaSpec | None = None
        if quotas:
            with contextlib.suppress(ValidationError):
                spec = QuotaSpec.model_validate(quotas[0].get("spec") or {})
        tier = str((tenant.get("spec") or {}).get("tier") or "free")
        return effective_limits(self.ctx.settings.tier_limits.get(tier, {}), spec, datetime.now(UTC))
