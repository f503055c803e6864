"""Quota enforcement: effective limits per tenant, measured usage, role attributes, status.

One code path for everything: a *subject* is one tenant key (namespace, tenant name) with its
Tenant, the Quotas naming it and what the database says about it (reconcilers/quota_probe.py
measures it). ``evaluate`` (pure, reconcilers/quota_policy.py) turns a subject into a plan;
``QuotaService.apply`` carries it out (role attributes, registry, status, Events, metrics). The
periodic pass measures every tenant of a target with one query per measure and evaluates all
subjects; Quota and Tenant watch events evaluate one subject in the background at once (edits take
effect immediately; keyed_work.py runs one evaluation per tenant at a time); a scheduled wake-up
evaluates the subjects whose override ends now.

Level-based: role attributes and the registry are compared with the computed limits and changed
only where they differ. Our own status is read only to avoid repeating Events across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tenancy_operator.api.names import OPERATOR
from tenancy_operator.api.quota import (
    QuotaSpec,
)
from tenancy_operator.api.tenant import serving_database
from tenancy_operator.db import jobs as dbjobs
from tenancy_operator.db import quota as dbq
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.keyed_work import KeyedWork
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, Retry, database_retry
from tenancy_operator.reconcilers.lifecycle import is_transient
from tenancy_operator.reconcilers.quota_metrics import QuotaSeries
from tenancy_operator.reconcilers.quota_policy import (
    EXPIRY_GRACE,
    STALE_MEASUREMENTS,
    Key,
    Memory,
    Plan,
    Probe,
    Subject,
    effective_limits,
    evaluate,
    parse_time,
    quota_version,
    sort_quotas,
)
from tenancy_operator.reconcilers.quota_probe import QuotaProbes
from tenancy_operator.runtime_context import OperatorContext
from tenancy_operator.watch_cache import WatchCache

log = get_logger(__name__)

KIND = "Quota"
QUOTAS, TENANTS = "quotas", "tenants"
LOCK_KIND = "QuotaTenant"
RETRY_FAILED_PASS_SECONDS = 5.0
RELIST_EVERY = 10
"""Every how many periodic passes Tenants and Quotas are LISTed instead of read from the watch cache."""
PASS_SLICE = 32
"""Tenants a periodic pass evaluates per turn of the event loop."""
UNSEEN_TENANT_GRACE_SECONDS = 10.0
"""How long a new Quota waits for its Tenant to show in the watch before reading it with a GET."""
FIRST_PROVISIONING_GRACE = timedelta(minutes=10)
"""A tenant in its first provisioning is evaluated when its Tenant reports Ready (or Stalled), not
before: its Quota's first status is then the final one instead of a TenantNotReady that Ready
replaces seconds later. Past this age the periodic pass evaluates it anyway."""


# --- The service --------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TENANT_METADATA = ("name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp",
                   "deletionTimestamp")
TENANT_STATUS = ("conditions", "effectiveLimits", "database", "phase")
"""What an evaluation reads of a Tenant (quota_policy.evaluate, serving_database, Events about it)."""


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
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


def _slim_tenant(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the cache keeps of a Tenant: the fields an evaluation reads. The cache holds every
    Tenant the replica owns, so its size per Tenant is most of this service's memory."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in TENANT_METADATA if k in meta},
        "spec": body.get("spec") or {},
        **({"status": {k: status[k] for k in TENANT_STATUS if k in status}} if "status" in body else {}),
    }


def _tenant_ref(quota: Mapping[str, Any]) -> str | None:
    ref = ((quota.get("spec") or {}).get("tenantRef") or {}).get("name")
    return str(ref) if ref else None


def _tenant_of(quota: Mapping[str, Any]) -> Key | None:
    """The tenant key a Quota names (the quota cache's index)."""
    ref = _tenant_ref(quota)
    return (quota["metadata"]["namespace"], ref) if ref is not None else None


def _tenant_state(tenant: Mapping[str, Any]) -> tuple[str, str]:
    """What a Tenant's limits depend on: (uid, tier)."""
    return (str(tenant["metadata"].get("uid") or ""), str((tenant.get("spec") or {}).get("tier") or "free"))


def _first_provisioning(tenant: Mapping[str, Any], now: datetime) -> bool:
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


def _is_ready(body: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


class QuotaService:
    """The quota loop and the per-tenant reconcile the handlers call."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.memory: dict[Key, Memory] = {}
        self.expiries: dict[Key, datetime] = {}
        self.epochs: defaultdict[Key, int] = defaultdict(int)
        self.applied: dict[Key, tuple[str, str]] = {}
        """Tenants this process enforced, with (uid, tier): a Tenant event for anything else
        (new, re-created, tier changed) triggers an immediate evaluation."""
        self.enforced_quotas: dict[Key, set[tuple[str, int]]] = {}
        """(uid, generation) of the Quotas naming a tenant at its last enforced evaluation: a Quota
        handler for a version already enforced has nothing to change (the pass re-measures)."""
        self.initial_pass_done = False
        self._wake: asyncio.Event | None = None
        self.work: KeyedWork[Trigger] = KeyedWork(KIND, self._evaluate, pending=lambda t: t.quota)
        """Evaluations in the background, one per tenant at a time (Quota and Tenant events)."""
        self._deferred: set[Key] = set()
        """Tenants whose new Quota waits for the end of their first provisioning (see reconcile_tenant)."""
        # What the watch streams last showed (watch_cache.py): a Tenant event must not cost a LIST
        # of every Quota, and with the Quotas indexed by the tenant they name, one tenant's
        # evaluation does not scan every Quota of its namespace (a mass creation stays linear).
        self.quotas = WatchCache(_slim, index=_tenant_of)
        self.tenants = WatchCache(_slim_tenant)
        self._caches = {QUOTAS: self.quotas, TENANTS: self.tenants}
        for plural, cache in self._caches.items():
            ctx.status.keep_fresh(plural, cache)
        self._elsewhere: set[Key] = set()
        """Sharded replicas: Tenants that exist and another replica owns, as of the last LIST (their
        Quotas are that replica's to evaluate; Quotas are watched whole, Tenants by slice)."""
        self._passes = 0
        self.probes = QuotaProbes(ctx, noisy=lambda key: bool((m := self.memory.get(key)) is not None and m.noisy))
        self.series = QuotaSeries(per_tenant=lambda: self.ctx.settings.quota_per_tenant_metrics,
                                  has_load=lambda key: key in self.probes.load_series,
                                  memories=lambda: self.memory.values())

    def observe(self, plural: str, type_: str | None, body: Mapping[str, Any]) -> None:
        """Keep the cache of Quotas and Tenants from their watch events (Kopf's initial listing too)."""
        self._caches[plural].observe(type_, body)

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
                self.initial_pass_done = True
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

    # --- reading the cluster --------------------------------------------------------------------

    def _watched(self, namespace: str) -> bool:
        namespaces = self.ctx.settings.namespace_list
        return not namespaces or namespace in namespaces

    def _ours(self, key: Key, tenant: Mapping[str, Any] | None, quotas: Sequence[Mapping[str, Any]]) -> bool:
        """Sharded replicas: a tenant's quotas are evaluated by the replica owning the Tenant; those
        naming no existing Tenant (TenantNotFound) by the one owning the Quota."""
        ownership = self.ctx.ownership
        if tenant is not None:
            return ownership.owns(tenant)
        return key not in self._elsewhere and any(ownership.owns(q) for q in quotas)

    async def _get_tenant(self, namespace: str, name: str) -> dict[str, Any] | None:
        cached = self.tenants.get((namespace, name))
        if cached is not None:
            return cached
        return await self.ctx.kube.get_object(TENANTS, namespace, name)

    async def _tenant_quotas(self, namespace: str, tenant: str) -> list[dict[str, Any]]:
        """The Quotas naming ``tenant``: from the watch cache, from a LIST before it filled."""
        if self.quotas.listed:
            return self.quotas.group((namespace, tenant))
        return [q for q in await self.ctx.kube.list_objects(QUOTAS, namespace) if _tenant_ref(q) == tenant]

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
            if defer_first_provisioning and key not in self.tenants and self.tenants.listed:
                # A new Quota whose Tenant the watch has not shown yet: in a bulk creation, the
                # Tenant created just before it. The Tenant's own events evaluate it (at its first
                # Ready); only if it stays unseen is it read (a GET for each would be one per tenant).
                self._deferred.add(key)
                asyncio.get_running_loop().call_later(UNSEEN_TENANT_GRACE_SECONDS, self._still_unseen, key)
                return None
            try:
                tenant = await self._get_tenant(namespace, name)
                # The watch cache may have seen more than a GET that just returned (a Stalled status).
                latest = self.tenants.get(key) or tenant
                if (defer_first_provisioning and latest is not None and key not in self.applied
                        and _first_provisioning(latest, _now())):
                    self._deferred.add(key)
                    log.debug("quota evaluation deferred until the tenant is provisioned",
                              namespace=namespace, tenant=name, trigger=trigger)
                    return None
                quotas = sort_quotas(await self._tenant_quotas(namespace, name))
            except ApiError as exc:
                raise Retry("KubernetesAPI", f"reading Tenant/Quotas failed: {exc.status}") from exc
            if self.ctx.ownership.sharded and not self._ours(key, tenant, quotas):
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
        self._deferred.discard(key)
        memory = self.memory.get(key)
        plan = evaluate(subject, probe, tier_limits=self.ctx.settings.tier_limits, now=_now(), memory=memory,
                        stale_after=self.stale_after)
        if plan.enforce and (plan.role_changes or plan.publish is not None or plan.ledger):
            await self._write_database(plan)
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
            self.applied[key] = _tenant_state(subject.tenant)
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

    async def _write_database(self, plan: Plan) -> None:
        assert plan.target
        assert plan.ident
        assert plan.role is not None
        role, want = plan.ident, plan.role
        try:
            # Every step is idempotent: a try that met a concurrent change of the same role
            # (a rotation, a deletion) is simply made again.
            async for attempt in AsyncRetrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(4),
                                               wait=wait_exponential_jitter(multiplier=0.1, max=1.0), reraise=True):
                with attempt:
                    # Pipeline mode: the statements go in one round trip (an error skips the rest,
                    # and the whole attempt is made again).
                    async with self.ctx.targets.connection(plan.target) as conn:
                        # The owner's attributes are the record; its login roles get the same.
                        roles = [role, *await sqlt.existing_logins(conn, role)] if plan.role_changes else [role]
                    async with self.ctx.targets.connection(plan.target) as conn, conn.pipeline():
                        for r in roles:
                            if "connections" in plan.role_changes:
                                await dbq.set_connection_limit(conn, r, want.connection_limit)
                            if "statementTimeout" in plan.role_changes:
                                await dbq.set_statement_timeout(conn, r, want.statement_timeout_ms)
                            if "readOnly" in plan.role_changes:
                                await dbq.set_read_only(conn, r, want.read_only)
                                # Sessions keep the default they logged in with: end them so the change holds.
                                await sqlt.terminate_sessions(conn, r)
                        if plan.publish is not None and plan.tenant_id:
                            await dbq.publish(conn, self.control, plan.tenant_id, plan.publish)
                        for kind, detail in plan.ledger:
                            if plan.tenant_id:
                                await dbjobs.record(conn, self.control, plan.tenant_id, kind, detail=detail,
                                                    requested_by=OPERATOR)
        except psycopg.errors.UndefinedObject:
            log.info("role vanished while applying limits", role=role)  # dropped meanwhile: nothing to limit
        except DATABASE_ERRORS as exc:
            raise database_retry(exc, f"database {plan.target!r}") from exc

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
        self._deferred.discard(key)
        self.epochs.pop(key, None)
        self.series.update_series(key, None)
        self.probes.forget(key)

    # --- the periodic pass --------------------------------------------------------------------------

    async def _every(self, plural: str, relist: bool) -> list[dict[str, Any]]:
        """Every Tenant or Quota, from the watch cache; from a LIST (which then refreshes the
        cache) when ``relist`` or before any watch event came: parsing every object of a large
        fleet at every pass would hold the event loop for long; the periodic LIST still drops what
        a watch re-list may have missed (a deletion while the stream was down)."""
        cache = self._caches[plural]
        if cache.listed and not relist:
            return cache.values()
        items = await self.ctx.kube.list_objects(plural)
        if plural == TENANTS and self.ctx.ownership.sharded:
            mine = self.ctx.ownership.mine(items)
            self._elsewhere = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in items} - {
                (o["metadata"]["namespace"], o["metadata"]["name"]) for o in mine}
            items = mine
        cache.replace_all(items)
        return items

    async def pass_once(self) -> int:
        """Measure and evaluate every tenant; returns how many subjects were evaluated."""
        started = time.monotonic()
        epochs = dict(self.epochs)
        relist = self._passes % RELIST_EVERY == 0
        self._passes += 1
        tenants = [t for t in await self._every(TENANTS, relist) if self._watched(t["metadata"]["namespace"])]
        quotas = [q for q in await self._every(QUOTAS, relist) if self._watched(q["metadata"]["namespace"])]
        subjects: dict[Key, Subject] = {}
        for t in tenants:
            key = (t["metadata"]["namespace"], t["metadata"]["name"])
            subjects[key] = Subject(key[0], key[1], t, [])
        for q in quotas:
            ref = _tenant_ref(q)
            if ref is None:
                continue
            key = (q["metadata"]["namespace"], ref)
            subjects.setdefault(key, Subject(key[0], key[1], None, [])).quotas.append(q)
        if not relist:
            # A Quota whose Tenant the cache has not seen may name a Tenant that Kopf has not
            # delivered yet (thousands created at once): only a LIST may conclude TenantNotFound.
            # Its own events judge it meanwhile (a Quota event reads a missing Tenant with a GET).
            subjects = {k: s for k, s in subjects.items() if s.tenant is not None or k in self.memory}
        if self.ctx.ownership.sharded:
            subjects = {k: s for k, s in subjects.items() if self._ours(k, s.tenant, s.quotas)}
        for s in subjects.values():
            s.quotas = sort_quotas(s.quotas)

        # Tenants in their first provisioning wait for their Ready (or Stalled) event, like a new
        # Quota's handler does: measuring them now would only write a status replaced seconds later.
        now = _now()
        waiting = {k for k, s in subjects.items()
                   if s.tenant is not None and k not in self.applied and _first_provisioning(s.tenant, now)}
        self._deferred |= waiting
        by_target: dict[str, list[Subject]] = defaultdict(list)
        for k, s in subjects.items():
            if k not in waiting and s.tenant is not None and not s.tenant["metadata"].get("deletionTimestamp"):
                by_target[serving_database(s.tenant)].append(s)
        probes: dict[Key, Probe] = {}
        for target, items in by_target.items():
            with metrics.QUOTA_MEASURE_DURATION.labels(target=target).time():
                probes.update(await self.probes.probe_target(target, items, load=True))

        sem = asyncio.Semaphore(self.ctx.settings.reconcile_concurrency)

        async def one(s: Subject) -> None:
            async with sem, self.ctx.lock(LOCK_KIND, s.namespace, s.name):
                if self.epochs.get(s.key, 0) != epochs.get(s.key, 0):
                    return  # a handler evaluated it from fresher reads meanwhile
                try:
                    await self.apply(s, probes.get(s.key), trigger="interval")
                except Exception as exc:  # one tenant's failure never stops the pass
                    log.warning("quota evaluation failed", namespace=s.namespace, tenant=s.name,
                                error=type(exc).__name__, detail=str(exc)[:200])

        # In slices: an evaluation that changes nothing never waits, so one gather over every
        # subject would run them all in a single turn of the event loop, and a FeatureFlag edit
        # arriving meanwhile would wait for the whole fleet. Between slices the loop serves
        # everything else.
        due = [s for k, s in subjects.items() if k not in waiting]
        for start in range(0, len(due), PASS_SLICE):
            await asyncio.gather(*(one(s) for s in due[start:start + PASS_SLICE]))
            await asyncio.sleep(0)
        remembered = set(self.memory) | set(self.series.held) | set(self.expiries) | self.probes.load_series
        for key in remembered - set(subjects):
            self.forget(key)  # neither a Tenant nor a Quota names it any more
        self.series.update_aggregates()
        metrics.QUOTA_PASS_DURATION.observe(time.monotonic() - started)
        return len(subjects)

    # --- handler entry points -------------------------------------------------------------------------

    def _quota_enforced(self, key: Key, version: tuple[str, int]) -> bool:
        """This version of a Quota is enforced on the tenant as the cache shows it (a tenant-changed
        evaluation that saw the new Quota, a rerun, or our own status write's event): measuring
        again cannot change anything."""
        tenant = self.tenants.get(key)
        return (
            version in self.enforced_quotas.get(key, ())
            and tenant is not None
            and not tenant["metadata"].get("deletionTimestamp")
            and self.applied.get(key) == _tenant_state(tenant)
        )

    def quota_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Quota watch event: evaluate its tenant in the background unless this version of the
        Quota is enforced already.

        This replaces Kopf's create/update/resume handlers, which stored a last-handled annotation
        on every Quota after each evaluation: one PATCH and one more watch event per Quota, for a
        decision the generation makes as well (the evaluation reads the newest Quota from the
        cache, so events handled out of order cannot apply an older spec)."""
        if not self.initial_pass_done:
            return  # the start-up pass evaluates every tenant in bulk
        ref = _tenant_ref(body)
        if ref is None:
            return
        key = (body["metadata"]["namespace"], ref)
        if self._quota_enforced(key, quota_version(body)):
            return
        if key not in self.tenants and not self.ctx.ownership.owns(body):
            return  # sharded: the Tenant's owner evaluates it (its events), or it is unseen yet
        meta = body["metadata"]
        self.work.submit(key, Trigger("quota-changed", quota=f"{meta['namespace']}/{meta['name']}",
                                      version=quota_version(body), created=type_ == "ADDED"))

    async def quota_deleted(self, body: Mapping[str, Any]) -> None:
        """A deleted Quota returns its tenant to tier defaults (or lets a conflicting one apply)."""
        ref = _tenant_ref(body)
        if ref is not None and ((body["metadata"]["namespace"], ref) in self.tenants or self.ctx.ownership.owns(body)):
            self.spawn(body["metadata"]["namespace"], ref, "quota-deleted")

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
        return effective_limits(self.ctx.settings.tier_limits.get(tier, {}), spec, _now())

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Tenant watch event (TenantWatcher): keep the cache, evaluate if needed."""
        self.observe(TENANTS, type_, body)
        self.tenant_event(type_, body)

    def tenant_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Tenant changed: evaluate it now if this process has not enforced it as it is now
        (new, re-created or tier changed), or if it is gone (its Quota reports TenantNotFound)."""
        if not self.initial_pass_done:
            return  # the first pass covers every tenant at start-up
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if not self._watched(key[0]):
            return
        if type_ == "DELETED":
            self.applied.pop(key, None)
            self.spawn(key[0], key[1], "tenant-deleted")
            return
        if self._tenant_changed(key, body):
            self.spawn(key[0], key[1], "tenant-changed")
        elif key in self._deferred and not _first_provisioning(body, _now()):
            self._deferred.discard(key)  # not Ready, but no longer provisioning (e.g. Stalled)
            self.spawn(key[0], key[1], "tenant-settled")

    def _still_unseen(self, key: Key) -> None:
        if key not in self.tenants and key in self._deferred:
            self._deferred.discard(key)
            self.spawn(key[0], key[1], "tenant-unseen")  # reads it: TenantNotFound, or evaluated

    def _tenant_changed(self, key: Key, body: Mapping[str, Any] | None) -> bool:
        """A Ready Tenant this process has not enforced as it is now (new, re-created, new tier)."""
        return body is not None and _is_ready(body) and self.applied.get(key) != _tenant_state(body)

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
                return ("tenant-changed" in causes and self._tenant_changed(key, self.tenants.get(key))) or any(
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
        if "tenant-deleted" in causes and not await self._tenant_quotas(*key):
            self.forget(key)
        self.series.update_aggregates()
