"""Quota enforcement: effective limits per tenant, measured usage, role attributes, status.

One code path for everything: a *subject* is one tenant key (namespace, tenant name) with its
Tenant and the Quotas naming it (quota_cluster.py: the watch caches) and what the database says
about it (quota_probe.py measures it). ``evaluate`` (pure, quota_policy.py, on the limit arithmetic
of quota_limits.py) turns a subject into a plan (quota_types.py); ``QuotaService.apply`` carries it
out: the database part (quota_enforce.py), status, Events and metrics (quota_metrics.py). The
periodic pass (quota_pass.py) measures every tenant of a target with one query per measure and
evaluates all subjects; Quota and Tenant watch events evaluate one subject in the background at once (edits take
effect immediately; keyed_work.py runs one evaluation per tenant at a time); a scheduled wake-up
evaluates the subjects whose override ends now.

Level-based: role attributes and the registry are compared with the computed limits and changed
only where they differ. Our own status is read only to avoid repeating Events across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tenancy_operator.api.tenant import serving_database
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.keyed_work import KeyedWork
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.quota_cluster import (
    QUOTAS,
    TENANTS,
    QuotaCluster,
    first_provisioning,
    is_ready,
    read_version,
    tenant_ref,
    tenant_state,
)
from tenancy_operator.reconcilers.quota_enforce import write_database
from tenancy_operator.reconcilers.quota_limits import quota_version, sort_quotas
from tenancy_operator.reconcilers.quota_metrics import Memories, QuotaSeries
from tenancy_operator.reconcilers.quota_pass import QuotaPass
from tenancy_operator.reconcilers.quota_policy import STALE_MEASUREMENTS, evaluate
from tenancy_operator.reconcilers.quota_probe import QuotaProbes
from tenancy_operator.reconcilers.quota_types import LOCK_KIND, Key, Plan, Probe, Subject
from tenancy_operator.runtime_context import OperatorContext

log = get_logger(__name__)

KIND = "Quota"
RETRY_FAILED_PASS_SECONDS = 5.0
UNSEEN_TENANT_GRACE_SECONDS = 10.0
"""How long a new Quota waits for its Tenant to show in the watch before reading it with a GET."""
EXPIRY_GRACE = timedelta(milliseconds=50)
"""Wake a little after an override's expiry so the evaluation sees it expired."""
# --- The service --------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Trigger:
    """Why a tenant is evaluated in the background (QuotaService.spawn, quota_changed)."""

    cause: str
    """tenant-changed, tenant-settled, tenant-unseen, tenant-deleted, quota-changed, quota-deleted"""
    quota: str | None = None
    """The Quota (namespace/name) whose event this is: queue_depth counts it until evaluated."""
    version: tuple[str, int] | None = None
    """That Quota's (uid, generation)."""
    created: bool = False
    """The Quota is new (its ADDED event)."""


class QuotaService:
    """The quota loop and the per-tenant reconcile the handlers call."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.memory = Memories()
        self.expiries: dict[Key, datetime] = {}
        self.epochs: defaultdict[Key, int] = defaultdict(int)
        self.applied: dict[Key, tuple[str, str]] = {}
        """Tenants this process enforced, with (uid, tier): a Tenant event for anything else
        (new, re-created, tier changed) triggers an immediate evaluation."""
        self.enforced_quotas: dict[Key, set[tuple[str, int]]] = {}
        """(uid, generation) of the Quotas naming a tenant at its last enforced evaluation: a Quota
        handler for a version already enforced has nothing to change (the pass re-measures)."""
        self.caches_read = False
        """The first pass has read the caches (or LISTed): events before that are in what it
        evaluates (Kopf's listing at start, thousands of them). After that, an event is evaluated
        on its own unless it brings a version the first pass read (``first_read``): the pass
        enforces what it read, and the next pass is an interval away."""
        self.first_read: set[tuple[str, str]] = set()
        """(uid, resourceVersion) of each Tenant and Quota the first pass read, while it runs."""
        self._wake: asyncio.Event | None = None
        self.work: KeyedWork[Trigger] = KeyedWork(KIND, self._evaluate, pending=lambda t: t.quota)
        """Evaluations in the background, one per tenant at a time (Quota and Tenant events)."""
        self.deferred: set[Key] = set()
        """Tenants whose new Quota waits for the end of their first provisioning (see reconcile_tenant)."""
        self.cluster = QuotaCluster(ctx)
        self.periodic = QuotaPass(self)
        self.probes = QuotaProbes(ctx, noisy=lambda key: bool((m := self.memory.get(key)) is not None and m.noisy))
        self.series = QuotaSeries(per_tenant=lambda: self.ctx.settings.quota_per_tenant_metrics,
                                  memories=self.memory)

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.ctx.settings.quota_interval_seconds * STALE_MEASUREMENTS)

    # --- scheduling ----------------------------------------------------------------------------

    def poke(self) -> None:
        """Make the loop recompute when to wake (a new, earlier override expiry)."""
        if self._wake is not None:
            self._wake.set()

    async def run_forever(self) -> None:
        try:
            await self._loop()
        finally:  # shutdown: background evaluations must not outlive the clients they use
            self.work.cancel()
            self.probes.cancel()

    async def _loop(self) -> None:
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_pass = loop.time()
        interval = self.ctx.settings.quota_interval_seconds
        while True:
            if loop.time() >= next_pass:
                wait = interval
                try:
                    await self.pass_once()
                except asyncio.CancelledError:
                    raise
                except ApiError as exc:  # e.g. 429 while the API server starts
                    log.warning("quota pass failed", error="KubernetesAPI", status=exc.status)
                    wait = min(interval, RETRY_FAILED_PASS_SECONDS)
                except Exception:
                    log.exception("quota pass failed")
                    wait = min(interval, RETRY_FAILED_PASS_SECONDS)
                self.caches_read = True  # also when the pass failed before it read them
                self.first_read = set()
                next_pass = loop.time() + wait
            await self.expire_due()
            delay = next_pass - loop.time()
            upcoming = min(self.expiries.values(), default=None)
            if upcoming is not None:
                delay = min(delay, (upcoming + EXPIRY_GRACE - _now()).total_seconds())
            self._wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def expire_due(self) -> None:
        """Evaluate now every tenant whose override has just ended (not at the next pass)."""
        now = _now()
        due = [key for key, at in self.expiries.items() if at + EXPIRY_GRACE <= now]
        for key in due:
            try:
                await self.reconcile_tenant(*key, trigger="override-expiry")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # try again shortly, without spinning
                log.warning("override expiry evaluation failed", namespace=key[0], tenant=key[1],
                            error=type(exc).__name__)
                self.expiries[key] = now + timedelta(seconds=5)

    # --- reading the databases ---------------------------------------------------------------------

    # --- evaluating and applying --------------------------------------------------------------------

    async def reconcile_tenant(
        self, namespace: str, name: str, *, trigger: str, wanted: Callable[[], bool] | None = None,
        defer_first_provisioning: bool = False,
    ) -> Plan | None:
        """Evaluate one tenant now, from fresh reads. Raises Retry for transient failures (after
        reporting them in status). None is returned when no evaluation was needed: ``wanted``, asked
        once the tenant's lock is held, found another evaluation did it meanwhile, or, with
        ``defer_first_provisioning``, the Tenant is being provisioned for the first time (its Ready
        or Stalled status triggers the evaluation, which writes the Quota's status once)."""
        key = (namespace, name)
        async with self.ctx.lock(LOCK_KIND, namespace, name):
            if wanted is not None and not wanted():
                log.debug("quota evaluation not needed", namespace=namespace, tenant=name, trigger=trigger)
                return None
            if defer_first_provisioning and key not in self.cluster.tenants and self.cluster.tenants.listed:
                # A new Quota whose Tenant the watch has not shown yet: in a bulk creation, the
                # Tenant created just before it. The Tenant's own events evaluate it (at its first
                # Ready); only if it stays unseen is it read (a GET for each would be one per tenant).
                self.deferred.add(key)
                asyncio.get_running_loop().call_later(UNSEEN_TENANT_GRACE_SECONDS, self._still_unseen, key)
                return None
            try:
                tenant = await self.cluster.get_tenant(namespace, name)
                # The watch cache may have seen more than a GET that just returned (a Stalled status).
                latest = self.cluster.tenants.get(key) or tenant
                if (defer_first_provisioning and latest is not None and key not in self.applied
                        and first_provisioning(latest, _now())):
                    self.deferred.add(key)
                    log.debug("quota evaluation deferred until the tenant is provisioned",
                              namespace=namespace, tenant=name, trigger=trigger)
                    return None
                quotas = sort_quotas(await self.cluster.tenant_quotas(namespace, name))
                if (not quotas and tenant is not None and key not in self.applied and self.cluster.quotas.listed
                        and self.ctx.ownership.owns(tenant)):
                    quotas = sort_quotas(await self.cluster.quotas_of(namespace, name))
                await self.cluster.label_quotas(quotas, tenant["metadata"].get("uid") if tenant is not None else None)
            except ApiError as exc:
                raise Retry("KubernetesAPI", f"reading or labelling Tenant/Quotas failed: {exc.status}") from exc
            if self.ctx.ownership.sharded and not self.cluster.ours(key, tenant, quotas):
                return None  # another replica's tenant
            subject = Subject(namespace, name, tenant, quotas)
            probe = None
            if tenant is not None and not tenant["metadata"].get("deletionTimestamp"):
                target = serving_database(tenant)
                probe = await self.probes.probe_one(target, subject)
            plan = await self.apply(subject, probe, trigger=trigger)
            self.epochs[key] += 1
        if probe is not None and probe.problem and probe.problem[0] in ("DatabaseUnavailable", "DatabaseBusy"):
            raise Retry(*probe.problem)
        return plan

    async def apply(self, subject: Subject, probe: Probe | None, *, trigger: str) -> Plan:
        """Evaluate one subject and carry the plan out. Call with the subject's lock held."""
        key = subject.key
        self.deferred.discard(key)
        memory = self.memory.get(key)
        plan = evaluate(subject, probe, tier_limits=self.ctx.settings.tier_limits, now=_now(), memory=memory,
                        stale_after=self.stale_after)
        if plan.enforce and (plan.role_changes or plan.publish is not None or plan.ledger):
            await write_database(self.ctx, plan)
        for body, patch in plan.quota_patches:
            await self._patch_status(QUOTAS, body, patch)
        if plan.tenant_patch and subject.tenant is not None:
            await self._patch_status(TENANTS, subject.tenant, plan.tenant_patch, if_version=plan.tenant_version)
        for body, type_, reason, message in plan.events:
            self.ctx.events.post(body, type_, reason, message)
        if plan.memory is not None:
            self.memory[key] = plan.memory
        else:
            self.memory.pop(key, None)
        if plan.next_expiry is not None:
            if self.expiries.get(key) != plan.next_expiry:
                self.expiries[key] = plan.next_expiry
                self.poke()
        else:
            self.expiries.pop(key, None)
        if plan.enforce and subject.tenant is not None and (subject.tenant.get("status") or {}).get("conditions"):
            self.applied[key] = tenant_state(subject.tenant)
            self.enforced_quotas[key] = {quota_version(q) for q in subject.quotas}
        else:
            # Not enforced, or enforced before the Tenant's first status (which effectiveLimits
            # waits for): its next Ready event evaluates it again.
            self.enforced_quotas.pop(key, None)
            if subject.tenant is None or plan.enforce:
                self.applied.pop(key, None)
        self.series.update_series(key, plan if subject.tenant is not None else None)
        if plan.role_changes or plan.publish is not None or plan.expired:
            log.info("quota applied", namespace=key[0], tenant=key[1], trigger=trigger,
                     role_changes=plan.role_changes or None, published=plan.publish is not None,
                     sessions_ended=plan.terminate or None, overrides_expired=plan.expired or None)
        return plan

    async def _patch_status(self, plural: str, body: Mapping[str, Any], patch: dict[str, Any],
                            if_version: str | None = None) -> None:
        try:
            await self.ctx.status.patch(plural, body, patch, if_version=if_version)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"writing {plural} status failed: {exc.status}") from exc

    def forget(self, key: Key) -> None:
        """Drop what this process remembers about a tenant key (its Tenant and Quotas are gone)."""
        self.memory.pop(key, None)
        self.expiries.pop(key, None)
        self.applied.pop(key, None)
        self.enforced_quotas.pop(key, None)
        self.deferred.discard(key)
        self.epochs.pop(key, None)
        self.series.update_series(key, None)
        self.probes.forget(key)

    # --- the periodic pass --------------------------------------------------------------------------

    async def pass_once(self) -> int:
        """Measure and evaluate every tenant; returns how many subjects were evaluated (quota_pass.py)."""
        return await self.periodic.run()

    # --- handler entry points -------------------------------------------------------------------------

    def _quota_enforced(self, key: Key, version: tuple[str, int]) -> bool:
        """This version of a Quota is enforced on the tenant as the cache shows it (a tenant-changed
        evaluation that saw the new Quota, a rerun, or our own status write's event): measuring
        again cannot change anything."""
        tenant = self.cluster.tenants.get(key)
        return (
            version in self.enforced_quotas.get(key, ())
            and tenant is not None
            and not tenant["metadata"].get("deletionTimestamp")
            and self.applied.get(key) == tenant_state(tenant)
        )

    def _in_first_pass(self, body: Mapping[str, Any]) -> bool:
        """This version of the object is (or will be) evaluated by the first pass (caches_read)."""
        return not self.caches_read or read_version(body) in self.first_read

    def quota_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Quota watch event: evaluate its tenant in the background unless this version of the
        Quota is enforced already.

        This replaces Kopf's create/update/resume handlers, which stored a last-handled annotation
        on every Quota after each evaluation: one PATCH and one more watch event per Quota, for a
        decision the generation makes as well (the evaluation reads the newest Quota from the
        cache, so events handled out of order cannot apply an older spec)."""
        if self._in_first_pass(body):
            return
        ref = tenant_ref(body)
        if ref is None:
            return
        key = (body["metadata"]["namespace"], ref)
        if self._quota_enforced(key, quota_version(body)):
            return
        if key not in self.cluster.tenants and not self.ctx.ownership.owns(body) \
                and not self.ctx.ownership.labelled_mine(body):
            return  # sharded: the Tenant's owner evaluates it (its events), or it is unseen yet
        meta = body["metadata"]
        self.work.submit(key, Trigger("quota-changed", quota=f"{meta['namespace']}/{meta['name']}",
                                      version=quota_version(body), created=type_ == "ADDED"))

    async def quota_deleted(self, body: Mapping[str, Any]) -> None:
        """A deleted Quota returns its tenant to tier defaults (or lets a conflicting one apply)."""
        ref = tenant_ref(body)
        if ref is None:
            return
        key = (body["metadata"]["namespace"], ref)
        tenant = self.cluster.tenants.get(key)
        if tenant is not None:
            if self.ctx.ownership.sharded and await self._relabelled_away(body, tenant):
                return
            self.spawn(key[0], key[1], "quota-deleted")
        elif not self.ctx.ownership.sharded:
            if self.ctx.ownership.owns(body):
                self.spawn(key[0], key[1], "quota-deleted")
        elif not self.cluster.quotas.group(key):
            # Sharded, a Tenant this replica does not hold: nothing of it to evaluate here. The
            # watch also says DELETED when a Quota gets the label of another replica's slice.
            self.forget(key)

    async def _relabelled_away(self, body: Mapping[str, Any], tenant: Mapping[str, Any]) -> bool:
        """A Quota of one of our Tenants left this replica's watch: deleted, or given another
        slice's label (by hand: the watch says DELETED for an object its selector stops matching).
        In the latter case the label is set back, and the Tenant keeps its Quota's limits."""
        meta = body["metadata"]
        try:
            current = await self.ctx.kube.get_object(QUOTAS, meta["namespace"], meta["name"])
            if (current is None or current["metadata"].get("uid") != meta.get("uid")
                    or tenant_ref(current) != tenant["metadata"]["name"]):
                return False
            await self.cluster.label_quotas([current], str(tenant["metadata"].get("uid") or ""))
        except ApiError as exc:
            log.warning("reading a Quota that left the watch failed", namespace=meta["namespace"],
                        quota=meta["name"], status=exc.status)
            return False
        return True

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Tenant watch event (TenantWatcher, after the runtime's Tenant cache took it): evaluate
        it now if this process has not enforced it as it is now (new, re-created or tier
        changed), or if it is gone (its Quota reports TenantNotFound)."""
        if self._in_first_pass(body):
            return
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if not self.cluster.watched(key[0]):
            return
        if type_ == "DELETED":
            self.applied.pop(key, None)
            self.spawn(key[0], key[1], "tenant-deleted")
            return
        if self._tenant_changed(key, body):
            self.spawn(key[0], key[1], "tenant-changed")
        elif key in self.deferred and not first_provisioning(body, _now()):
            self.deferred.discard(key)  # not Ready, but no longer provisioning (e.g. Stalled)
            self.spawn(key[0], key[1], "tenant-settled")

    def _still_unseen(self, key: Key) -> None:
        if key not in self.cluster.tenants and key in self.deferred:
            self.deferred.discard(key)
            self.spawn(key[0], key[1], "tenant-unseen")  # reads it: TenantNotFound, or evaluated

    def _tenant_changed(self, key: Key, body: Mapping[str, Any] | None) -> bool:
        """A Ready Tenant this process has not enforced as it is now (new, re-created, new tier)."""
        return body is not None and is_ready(body) and self.applied.get(key) != tenant_state(body)

    def spawn(self, namespace: str, name: str, trigger: str) -> None:
        """Evaluate a tenant in the background, so a Kopf event handler never waits on it."""
        self.work.submit((namespace, name), Trigger(trigger))

    async def _evaluate(self, key: Key, triggers: Sequence[Trigger]) -> None:
        """One background evaluation of a tenant, for every trigger that came since the last.

        Triggers that only say "this may have changed" are asked again once the tenant's lock is
        held: a ``tenant-changed`` evaluation is skipped when the cached Tenant is enforced as it
        is, a ``quota-changed`` one when each Quota version it names is (another evaluation did
        it: a Quota event's, or the one before this, whose own status writes caused the event).
        A new Quota of a Tenant in its first provisioning waits for the Tenant's Ready (or
        Stalled) status instead of reporting TenantNotReady for a few seconds: one status write
        instead of two; the periodic pass reports TenantNotReady if provisioning takes longer."""
        causes = {t.cause for t in triggers}
        quota_events = [t for t in triggers if t.quota is not None]
        wanted: Callable[[], bool] | None = None
        if causes <= {"tenant-changed", "quota-changed"}:  # each may find nothing left to do

            def wanted() -> bool:
                return ("tenant-changed" in causes
                        and self._tenant_changed(key, self.cluster.tenants.get(key))) or any(
                    t.version is None or not self._quota_enforced(key, t.version) for t in quota_events)
        evaluate = self.reconcile_tenant(
            key[0], key[1], trigger=",".join(sorted(causes)), wanted=wanted,
            defer_first_provisioning=causes == {"quota-changed"} and all(t.created for t in quota_events),
        )
        if not quota_events:
            await evaluate
        else:  # a Quota's own reconcile, as reconcile_total and the failure reasons count it
            try:
                with metrics.observe_reconcile(KIND):
                    await evaluate
            except Retry as exc:
                metrics.record_result(KIND, False, exc.reason)
                raise
            except Exception:
                metrics.record_result(KIND, False, "Internal")
                raise
            metrics.record_result(KIND, True)
        if "tenant-deleted" in causes and not await self.cluster.tenant_quotas(*key):
            self.forget(key)
        self.series.update_aggregates()
