"""FeatureFlag handlers: create/update/resume, a periodic sweep and Tenant changes share one
idempotent reconcile (reconcilers/featureflag.py).

The sweep re-checks every flag every TENANCY_SWEEP_INTERVAL_SECONDS, which repairs rows or
ConfigMaps changed behind our back; a Tenant appearing or disappearing re-checks at once the flags
of its namespace that name it in an override, so `unknownTenants` follows the Tenants without
waiting for the sweep. Those re-checks are gathered for a moment, read the flags from a cache the
flags' watch keeps (``FeatureFlagService.flags``) and the namespace's Tenant names once for all
its flags: creating a thousand Tenants costs no LIST per re-check. A flag's size grows with its
overrides, and a bulk creation re-checks every half second, so a LIST each time would decode the
namespace's flags over and over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Mapping
from typing import Any

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.api.featureflag import FeatureFlagStatus, RolloutStatus
from tenancy_operator.api.names import FINALIZER
from tenancy_operator.conditions import Cond, merge, readiness, status_patch
from tenancy_operator.handlers.common import Rechecks, backoff, reconciled_by
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.featureflag import FeatureFlagReconciler, Outcome
from tenancy_operator.reconcilers.featureflag_policy import PLURAL
from tenancy_operator.runtime_context import OperatorContext
from tenancy_operator.watch_cache import WatchCache

KIND = "FeatureFlag"
SOURCE_CONDITION = "NamespaceSourcePublished"
"""Condition: the namespace's flagd source (ConfigMap tenancy-flagd-source) is current."""
GATHER_SECONDS = 0.5
"""How long Tenant changes are gathered before the flags naming them are re-checked."""
log = get_logger(__name__)
ALL = "*"
"""In a nudge: every flag of the namespace, not only those naming a tenant."""
NAMES_TTL_SECONDS = 30.0
"""How long a LIST of a namespace's Tenant names serves flag edits and re-checks, kept current by the watch."""


def tenants_resolved(unknown: list[str]) -> Cond:
    """The TenantsResolved condition for the tenants overrides name that do not exist."""
    if unknown:
        return Cond("TenantsResolved", "False", "UnknownTenants",
                    f"no Tenant named {', '.join(unknown)} in this namespace; their overrides are "
                    "kept and apply to whatever passes that tenant name")
    return Cond("TenantsResolved", "True", "AllTenantsExist", "every tenant named in an override exists")


def resolved_status(body: Mapping[str, Any], tenants: set[str],
                    named: frozenset[str] | None = None) -> dict[str, Any] | None:
    """After a Tenant named by the flag appeared or went away: the status with unknownTenants and
    TenantsResolved for ``tenants`` (the namespace's), when the flag's status shows its generation
    published (nothing else of a reconcile depends on which Tenants exist); None otherwise."""
    status = body.get("status") or {}
    generation = int(body["metadata"].get("generation") or 0)
    held = {c.get("type"): c for c in status.get("conditions") or []}
    if (status.get("observedGeneration") != generation or (held.get("Ready") or {}).get("status") != "True"
            or "TenantsResolved" not in held):
        return None
    unknown = sorted((named_tenants(body) if named is None else named) - tenants)
    return {"conditions": merge(status.get("conditions"), [tenants_resolved(unknown)], generation),
            "unknownTenants": unknown}


def desired_status(body: Mapping[str, Any], out: Outcome) -> dict[str, Any]:
    generation = int(body["metadata"].get("generation") or 0)
    old = (body.get("status") or {}).get("conditions")
    conds, drop = readiness(out.ready, out.stalled, out.reason, out.message)
    if out.definition is not None:
        conds.append(tenants_resolved(out.unknown_tenants))
    if out.source is not None:
        conds.append(Cond(SOURCE_CONDITION, "True" if out.source.published else "False", out.source.reason,
                          out.source.message))
    elif out.stalled:
        drop.append(SOURCE_CONDITION)  # refused (key conflict, invalid spec): not published by this object
    d = out.definition
    record = FeatureFlagStatus(
        conditions=[],
        unknown_tenants=out.unknown_tenants,
        variant_shares=d.variant_shares() if d is not None else {},
        tenant_overrides=len(d.tenants) if d is not None else 0,
        user_overrides=len(d.users) if d is not None else 0,
        key=d.key if d is not None else None,
        rollout=out.rollout,
        last_written_at=out.written_at.astimezone(datetime.UTC).replace(microsecond=0) if out.written_at else None,
        config_map=out.config_map,
    )
    # What this reconcile knows; the rest stays as the status holds it: without a definition (an
    # invalid spec, the database down) the shares and counts last published still describe what
    # is served, and a reconcile that wrote nothing leaves lastWrittenAt and configMap alone.
    known = {"unknown_tenants"}
    if d is not None:
        known |= {"variant_shares", "tenant_overrides", "user_overrides", "key", "rollout"}
    if out.written_at is not None:
        known.add("last_written_at")
    if out.config_map is not None:
        known.add("config_map")
    # exclude_unset: a rollout's fields it never set are absent (null), as before they were written.
    fields = record.model_dump(mode="json", include=known, exclude_unset=True)
    if fields.get("rollout") is not None:
        fields["rollout"] = RolloutStatus.with_nulls(fields["rollout"])
    return {"observedGeneration": generation, "conditions": merge(old, conds, generation, drop=drop), **fields}


def status_update(body: Mapping[str, Any], out: Outcome) -> dict[str, Any]:
    """The merge patch that writes ``desired_status``. The rollout goes whole when it changes: the
    body may be a snapshot older than this process's last write (a recheck's GET that waited
    while a handler decided and wrote), and a difference from it alone would leave some of the
    last write's fields beside this decision's (a phase Progressing with a reason PausedBySpec)."""
    return status_patch(body.get("status"), desired_status(body, out), whole=("rollout",))


class FeatureFlagService:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.reconciler = FeatureFlagReconciler(ctx)
        self.flags = WatchCache(slim_flag)
        """The flags as the watch shows them (and as our status writes leave them): what the
        re-checks after Tenant changes read."""
        ctx.status.keep_fresh(PLURAL, self.flags)
        self._nudged: dict[str, set[str]] = {}
        """namespace -> names of Tenants that appeared or went away (ALL: re-check every flag)."""
        self._wake = asyncio.Event()
        self._names: dict[str, tuple[float, set[str]]] = {}
        """namespace -> (when LISTed, its Tenant names, kept current by the Tenant watch since): a
        burst of new Tenants re-checks flags without a LIST of every Tenant each half second."""
        self._listing: dict[str, list[tuple[str | None, str]]] = {}
        """Tenant events that arrived while a namespace's LIST was in flight, applied after it."""
        self._listing_lock: dict[str, asyncio.Lock] = {}
        """namespace -> held while its Tenant names are LISTed: the flags asking meanwhile (at
        start-up every flag of a namespace asks at once) take that LIST's answer."""
        self._named: dict[str, tuple[int, frozenset[str]]] = {}
        """flag uid -> (generation, the Tenant names its overrides mention): each nudge checks every
        flag of its namespace, and a flag may name thousands of Tenants. Pruned by the full sweeps."""
        self.rechecks = Rechecks(self._recheck, ctx.settings.rollout_check_seconds)
        """Running stepped rollouts: when each wants another look."""

    async def run(self, body: Mapping[str, Any], retry: int = 0, tenants: set[str] | None = None) -> None:
        """One reconcile with its reporting. Raises kopf.TemporaryError to be retried."""
        meta = body["metadata"]
        with metrics.PENDING.outstanding(KIND, f"{meta['namespace']}/{meta['name']}"):
            await self._run(body, retry, tenants)

    async def _run(self, body: Mapping[str, Any], retry: int, tenants: set[str] | None) -> None:
        meta = body["metadata"]
        if tenants is None:
            # From the names kept by the Tenant watch, not a LIST of every Tenant per edit (its cost
            # grows with the namespace's Tenants); a Tenant the watch has not shown yet re-checks
            # the flags naming it when it appears.
            try:
                tenants = await self.tenant_names(meta["namespace"], fresh=False)
            except Retry:
                tenants = None  # the reconcile reads them itself and reports what fails
        # The status is written under the lock too: a recheck and a handler deciding one after the
        # other must also write in that order, or the older decision's write lands last.
        async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
            if meta.get("uid") in self.ctx.gone:  # a sweep's snapshot of a flag deleted meanwhile
                return
            failed: Retry | None = None
            with metrics.observe_reconcile(KIND):
                try:
                    out = await self.reconciler.reconcile(body, tenants)
                except Retry as exc:
                    metrics.record_result(KIND, False, exc.reason)
                    failed, out = exc, Outcome(False, exc.reason, exc.message)
                except Exception:
                    metrics.record_result(KIND, False, "Internal")
                    raise
            if out.stale:
                return
            self.rechecks.schedule((meta["namespace"], meta["name"]), out.check_in)
            if failed is None:
                metrics.record_result(KIND, out.ready, None if out.ready else out.reason)
            reported = await self._report(body, out)
        if not reported:
            await self._clean_up_gone(body)  # nothing left to report on or to retry
            return
        if failed is not None:
            raise kopf.TemporaryError(failed.message, delay=backoff(retry)) from failed
        if out.retry:
            raise kopf.TemporaryError(out.message, delay=backoff(retry))

    async def _report(self, body: Mapping[str, Any], out: Outcome) -> bool:
        """Events, the log line and the status; False when the FeatureFlag is gone."""
        for type_, reason, message in out.events:
            self.ctx.events.post(body, type_, reason, message)
        old_ready: dict[str, Any] = next((c for c in (body.get("status") or {}).get("conditions") or []
                                          if c.get("type") == "Ready"), {})
        if not out.ready and old_ready.get("reason") != out.reason:
            self.ctx.events.warning(body, out.reason, out.message)  # once per transition, not per retry
        old_source: dict[str, Any] = next((c for c in (body.get("status") or {}).get("conditions") or []
                                           if c.get("type") == SOURCE_CONDITION), {})
        if out.source is not None and not out.source.published and old_source.get("reason") != out.source.reason:
            self.ctx.events.warning(body, f"NamespaceSource{out.source.reason}", out.source.message)
        patch = status_update(body, out)
        # The sweep re-checks every flag: only what changed something is worth an info line.
        quiet = out.ready and not out.events and not patch
        (log.debug if quiet else log.info)(
            "reconciled", kind=KIND, namespace=body["metadata"]["namespace"], name=body["metadata"]["name"],
            result="ready" if out.ready else out.reason)
        stepped = out.rollout is not None and out.rollout.steps is not None  # a record to keep current
        if not await self.ctx.status.patch(PLURAL, body, patch,
                                           written=self.reconciler.rollout_written if stepped else None):
            return False
        meta = body["metadata"]
        metrics.STALLED.update(KIND, f"{meta['namespace']}/{meta['name']}", out.reason if out.stalled else None)
        return True

    async def _clean_up_gone(self, body: Mapping[str, Any]) -> None:
        """The FeatureFlag vanished while it was reconciled, and its finalizer never ran (the API
        server's race between a delete and the finalizer's patch, kubernetes/kubernetes#77988, or
        the finalizer removed by hand): the rows and ConfigMap written for it go, as its deletion
        would have removed them."""
        meta = body["metadata"]
        async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
            if meta.get("uid") in self.ctx.gone:
                return
            try:
                await self.reconciler.finalize(body, same_uid=True)
            except Retry as exc:
                log.error("featureflag gone without its deletion: its rows are left in the database",
                          kind=KIND, namespace=meta["namespace"], name=meta["name"], reason=exc.reason)
                return
            self.ctx.gone.add(meta.get("uid"))
        log.warning("featureflag gone without its deletion: its rows were removed", kind=KIND,
                    namespace=meta["namespace"], name=meta["name"])

    async def delete(self, body: Mapping[str, Any], retry: int = 0) -> None:
        meta = body["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        with metrics.PENDING.outstanding(KIND, key):
            async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
                try:
                    events = await self.reconciler.finalize(body)
                except Retry as exc:
                    metrics.record_result(KIND, False, exc.reason)
                    await self.ctx.status.write(PLURAL, body, {"conditions": merge(
                        (body.get("status") or {}).get("conditions"), [Cond("Ready", "False", exc.reason, exc.message)],
                        int(meta.get("generation") or 0))})
                    raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc
                self.ctx.gone.add(meta.get("uid"))  # before the lock is released to a waiting snapshot
            for type_, reason, message in events:
                self.ctx.events.post(body, type_, reason, message)
        metrics.STALLED.forget(KIND, key)
        self.rechecks.schedule((meta["namespace"], meta["name"]), None)
        self.nudge(meta["namespace"])  # a FeatureFlag refused for a key conflict may take the key now

    # --- sweep and Tenant changes ---------------------------------------------------------------

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Tenant watch event (TenantWatcher): one appearing or going away may resolve overrides."""
        namespace, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])
        if namespace in self._listing:
            self._listing[namespace].append((type_, name))
        self._note_tenant(namespace, type_, name)
        if type_ in ("ADDED", "DELETED"):
            self.nudge(namespace, name)

    def _note_tenant(self, namespace: str, type_: str | None, name: str) -> None:
        entry = self._names.get(namespace)
        if entry is not None:
            (entry[1].discard if type_ == "DELETED" else entry[1].add)(name)

    async def tenant_names(self, namespace: str, *, fresh: bool) -> set[str]:
        """The Tenant names of a namespace: LISTed when older than NAMES_TTL_SECONDS or, when
        ``fresh``, LISTed since this call."""
        loop = asyncio.get_running_loop()
        asked = loop.time()
        async with self._listing_lock.setdefault(namespace, asyncio.Lock()):
            entry = self._names.get(namespace)
            if entry is None or loop.time() - entry[0] > NAMES_TTL_SECONDS or (fresh and entry[0] <= asked):
                during = self._listing.setdefault(namespace, [])
                try:
                    entry = (loop.time(), await self.reconciler.tenant_names(namespace))
                    self._names[namespace] = entry
                    for type_, name in during:
                        self._note_tenant(namespace, type_, name)
                finally:
                    if self._listing.get(namespace) is during:
                        del self._listing[namespace]
        return set(entry[1])

    def nudge(self, namespace: str, tenant: str = ALL) -> None:
        """Tenant `tenant` appeared or went away in `namespace`: re-check soon the flags naming it
        (every flag of the namespace without a tenant)."""
        self._nudged.setdefault(namespace, set()).add(tenant)
        self._wake.set()

    # --- stepped rollouts ------------------------------------------------------------------------

    async def _recheck(self, key: tuple[str, str]) -> None:
        """The flag read afresh (its newest spec and annotations) and reconciled: a running stepped
        rollout's next look (its gate, its next step), or a re-check its cached copy did not settle."""
        body = await self.ctx.kube.get_object(PLURAL, *key)
        if body is None:
            return
        meta = body["metadata"]
        if meta.get("deletionTimestamp") or FINALIZER not in (meta.get("finalizers") or []):
            return  # the handlers' to do
        await self.run(body)

    async def run_forever(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sweep_forever())
            group.create_task(self.rechecks.run_forever())

    async def _sweep_forever(self) -> None:
        interval = self.ctx.settings.sweep_interval_seconds
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, next_sweep - loop.time()))
            full = loop.time() >= next_sweep
            if not full:  # gather the other Tenant changes of a burst
                await asyncio.sleep(GATHER_SECONDS)
            self._wake.clear()
            nudged, self._nudged = self._nudged, {}
            if full:
                next_sweep = loop.time() + interval
            try:
                await self.sweep_once(None if full else nudged)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("featureflag sweep failed", error=type(exc).__name__, detail=str(exc)[:200])

    async def _list(self, namespaces: set[str] | None) -> list[dict[str, Any]]:
        """The flags of ``namespaces`` (None: all) for a sweep: a re-check's from the watch's cache
        once the watch has filled it, the periodic sweep's from a LIST."""
        if namespaces is not None and self.flags.listed:
            return [f for f in self.flags.values() if f["metadata"]["namespace"] in namespaces]
        # Decoded with safejson: one flag nested too deep for Python's json must not fail the sweep.
        # Sharded, the API server sends only this replica's slices.
        shard = self.ctx.ownership.selector()
        watched = self.ctx.settings.namespace_list
        if namespaces is None and not watched:
            return await self.ctx.kube.list_objects(PLURAL, shard_selector=shard)
        items: list[dict[str, Any]] = []
        for ns in sorted(namespaces if namespaces is not None else set(watched)):
            if watched and ns not in watched:
                continue
            items += await self.ctx.kube.list_objects(PLURAL, ns, shard_selector=shard)
        return items

    def names_in(self, item: Mapping[str, Any]) -> frozenset[str]:
        """``named_tenants(item)``, computed once per generation of the flag."""
        meta = item["metadata"]
        uid, generation = str(meta.get("uid") or ""), int(meta.get("generation") or 0)
        held = self._named.get(uid)
        if held is None or held[0] != generation:
            held = self._named[uid] = (generation, named_tenants(item))
        return held[1]

    async def _resolve_tenants(self, item: Mapping[str, Any], tenants: set[str]) -> bool:
        """A nudge's re-check of a flag whose status shows its generation published: only
        unknownTenants and TenantsResolved can change, so only they are written (when they
        differ), without the database reads and the ConfigMap of a whole reconcile: at a burst of
        new Tenants each flag is re-checked every GATHER_SECONDS, and a whole reconcile costs as
        much as the flag has overrides. False when the whole reconcile must run (the status is
        not current, or the flag changed since it was listed)."""
        desired = resolved_status(item, tenants, self.names_in(item))
        if desired is None:
            return False
        patch = status_patch(item.get("status"), desired)
        if not patch:
            return True
        meta = item["metadata"]
        async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
            if meta.get("uid") in self.ctx.gone:
                return True
            # Only onto the status as listed: a reconcile that wrote since has the newer word.
            return await self.ctx.status.patch(PLURAL, item, patch, if_version=meta["resourceVersion"])

    async def sweep_once(self, nudged: Mapping[str, set[str]] | None = None) -> int:
        """Reconcile every flag (or, for `nudged` namespaces, the flags naming one of its tenants);
        returns how many were checked.

        Each flag is re-read inside its lock-protected reconcile; a flag that changes meanwhile is
        protected by the generation check in the database write (an older body never wins)."""
        checked = 0
        tenants: dict[str, set[str]] = {}
        seen: set[str] = set()
        uids: set[str] = set()
        for item in self.ctx.ownership.mine(await self._list(None if nudged is None else set(nudged))):
            meta = item["metadata"]
            seen.add(meta["namespace"])
            uids.add(str(meta.get("uid") or ""))
            if meta.get("deletionTimestamp") or FINALIZER not in (meta.get("finalizers") or []):
                continue  # not taken over by the handlers yet, or being deleted: theirs to do
            namespace = meta["namespace"]
            if nudged is not None:
                changed = nudged.get(namespace, set())
                if ALL not in changed and not changed & self.names_in(item):
                    continue  # none of the Tenants that changed matters to this flag
            try:
                if namespace not in tenants:
                    tenants[namespace] = await self.tenant_names(namespace, fresh=nudged is None)
                if nudged is None:
                    await self.run(item, tenants=tenants[namespace])
                elif not await self._resolve_tenants(item, tenants[namespace]):
                    # The whole reconcile on the flag as it is now: the cache's copy may lag
                    # behind the watch.
                    await self._recheck((namespace, meta["name"]))
            except (kopf.TemporaryError, Retry):
                pass  # reported in status; the handler's own retries or the next sweep go on
            except ApiError as exc:
                log.warning("featureflag sweep: API error", name=meta["name"], status=exc.status)
            except Exception as exc:  # one broken flag must not stop the sweep of the others
                log.warning("featureflag sweep: reconcile failed", name=meta["name"], error=type(exc).__name__)
            checked += 1
        if nudged is None:  # each namespace's flagd source once a sweep: repairs it if changed by hand
            self._named = {uid: v for uid, v in self._named.items() if uid in uids}
            for namespace in sorted(seen):
                try:
                    await self.reconciler.source.publish(namespace)
                except Retry as exc:
                    log.warning("featureflag sweep: namespace flagd source", namespace=namespace,
                                reason=exc.reason, detail=exc.message)
        return checked


def slim_flag(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the flag cache keeps: the whole flag but its managedFields."""
    meta = body.get("metadata") or {}
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def named_tenants(item: Mapping[str, Any]) -> frozenset[str]:
    """Tenant names a FeatureFlag's overrides mention (read leniently: the spec may be invalid)."""
    spec = item.get("spec") or {}
    overrides = [*(spec.get("tenants") or []), *(spec.get("users") or [])]
    return frozenset(str(o["tenant"]) for o in overrides if isinstance(o, Mapping) and o.get("tenant"))


SERVICE = FeatureFlagService
"""The kind's service class: runtime.py makes one per process (memo.services[KIND])."""


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the FeatureFlag handlers to ``registry``."""
    service = reconciled_by(registry, KIND, PLURAL, FeatureFlagService)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="cache")
    async def featureflag_seen(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        service(memo).flags.observe(type, body)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="finalize")
    async def featureflag_delete(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        await service(memo).delete(body, retry)
        if hasattr(memo, "diffbase"):
            memo.diffbase.forget(body.metadata.uid)  # Kopf's last-handled state of the flag
