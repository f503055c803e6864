"""The periodic, operator-wide drift sweep.

Kopf's handlers fire on changes to Tenants; nothing tells us when someone drops a role or a
Secret behind our back. Instead of one Kopf timer per object (a task and a finalizer each), one
loop checks every tenant of a target with a few bulk catalog queries and one Secret list, then
reconciles only the tenants that differ.

Each sweep also audits isolation (db/audit.py): whatever a tenant role holds beyond its own schema
is revoked, and reported with a Warning Event ``IsolationViolation``, the Tenant's
``IsolationBreach`` condition, ``isolation_violations_total`` and a warning log line.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg_pool

from tenancy_operator.api.durations import parse_duration
from tenancy_operator.api.names import FINALIZER, MANAGED_BY, TENANT_LABEL
from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.conditions import Cond, merge
from tenancy_operator.db import audit, logins, registry
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.archive_catalog import CatalogSweep
from tenancy_operator.reconcilers.drift import drifted
from tenancy_operator.reconcilers.tenant_base import secret_name
from tenancy_operator.reconcilers.tenant_move import drop_moved_copies
from tenancy_operator.runtime_context import OperatorContext, slim_tenant

if TYPE_CHECKING:
    from tenancy_operator.handlers.tenant import TenantService

log = get_logger(__name__)
BREACH = "IsolationBreach"
UNSETTLED = "status.phase!=Active,status.phase!=Suspended"
"""The Tenants the catch-up reads (the Tenant CRD's selectable field status.phase): being
provisioned (or never reconciled), failed, or being deleted."""


def _ready(body: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def ready_since_listed(listed: Mapping[str, Any], seen: Mapping[str, Any] | None) -> bool:
    """A Tenant LISTed as not Ready that the watch (``seen``: the Tenant cache's copy) has shown
    Ready since, at the same generation: its handler's reconcile did the work meanwhile. In a
    mass creation a sweep's LIST finds thousands not Ready yet, and reconciling each of them again
    once its turn comes would double the work of every one already done."""
    if seen is None:
        return False
    meta, now = listed["metadata"], seen["metadata"]
    return (now.get("uid") == meta.get("uid") and now.get("generation") == meta.get("generation")
            and _ready(seen))


def _taken_on(body: Mapping[str, Any]) -> bool:
    """Not being deleted, and taken on by Kopf (our finalizer is set): reconciling one before that
    would make it Ready with nothing to stop its deletion from skipping the deletion policy."""
    meta = body["metadata"]
    return not meta.get("deletionTimestamp") and FINALIZER in (meta.get("finalizers") or [])


def left_to_handler(listed: Mapping[str, Any], seen: Mapping[str, Any] | None) -> bool:
    """A LISTed Tenant the sweep leaves alone: listed as not Ready, and Ready since (with or without
    its Secret at the sweep's Secret LIST: the reconcile that made it Ready made its Secret too; in
    a mass creation most are listed before their Secret exists). One listed Ready without its
    Secret is drift, and is reconciled."""
    return not _ready(listed) and ready_since_listed(listed, seen)


class Sweeper:
    def __init__(self, ctx: OperatorContext, tenants: TenantService) -> None:
        self.ctx = ctx
        self.archives = CatalogSweep(ctx, ctx.settings.archive_catalog_check_seconds)
        self.tenants = tenants
        self._held: dict[tuple[str, str], frozenset[tuple[Any, ...]]] = {}
        """(target, role) -> keys of the findings still held after the last audit: reported already."""
        for kind in audit.Kind:
            metrics.ISOLATION_VIOLATIONS.labels(kind=kind.value)  # series at 0, so increase() sees the first
            metrics.ISOLATION_VIOLATIONS_HELD.labels(kind=kind.value).set(0)

    async def run_forever(self) -> None:
        try:
            await self.catch_up()
        except asyncio.CancelledError:
            raise
        except Exception:  # the first sweep does it all again
            log.exception("catch-up failed")
        while True:
            await asyncio.sleep(self.ctx.settings.sweep_interval_seconds)
            try:
                await self.sweep_once()
                self.ctx.last_sweep_ok = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed")

    def _watched(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        namespaces = set(self.ctx.settings.namespace_list)
        return [b for b in bodies if b["metadata"]["namespace"] in namespaces] if namespaces else bodies

    async def catch_up(self) -> int:
        """At the start of a run: reconcile now every Tenant of this replica's that is not Ready.

        Kopf resumes every object in the order of its LIST. After a hand-over the Tenants a dead
        replica left half provisioned would wait behind the thousands already in sync; this takes
        them at once, beside Kopf (a Tenant's reconciles take its lock in turn, and one Kopf has
        made Ready meanwhile is left alone). Drift checks and the chores wait for the first sweep.
        Returns how many were reconciled.

        Each page's Tenants are reconciled while the next pages are read: the first of those a
        dead replica left start at once, not after the whole fleet has been listed. Only the
        Tenants not yet settled (phase neither Active nor Suspended) are listed: at a restart of
        a converged fleet that is none, instead of decoding every Tenant beside Kopf's resume.
        One Active but not Ready (edited while no replica ran) is Kopf's to resume."""
        sem = asyncio.Semaphore(self.ctx.settings.reconcile_concurrency)
        listed = 0
        batches: list[asyncio.Task[int]] = []
        async with asyncio.TaskGroup() as group:
            async for page in self.ctx.kube.list_pages("tenants", field_selector=UNSETTLED,
                                                       shard_selector=self.ctx.ownership.selector()):
                todo = [b for b in self.ctx.ownership.mine(self._watched(page.items)) if not _ready(b) and _taken_on(b)]
                listed += len(todo)
                if todo:
                    batches.append(group.create_task(self._reconcile_listed(todo, sem)))
        reconciled = sum(batch.result() for batch in batches)
        if reconciled:
            log.info("caught up", tenants=reconciled, listed=listed)
        return reconciled

    async def _reconcile_listed(self, todo: list[dict[str, Any]], sem: asyncio.Semaphore | None = None) -> int:
        """Reconcile the listed snapshots, a bounded number at a time (``sem``: shared with other
        batches); returns how many were (the others: deleted or edited meanwhile, their handler's
        reconcile in flight, or done by it)."""
        sem = sem or asyncio.Semaphore(self.ctx.settings.reconcile_concurrency)
        reconciled = 0

        async def one(body: dict[str, Any]) -> None:
            nonlocal reconciled
            async with sem:
                meta = body["metadata"]
                if left_to_handler(body, self.ctx.tenants.get((meta["namespace"], meta["name"]))):
                    return
                try:
                    if await self.tenants.run_listed(body, unless_in_flight=True) is not None:
                        reconciled += 1
                except Exception as exc:  # the handler's retry will report; keep sweeping
                    reconciled += 1
                    log.warning("sweep reconcile failed", namespace=meta["namespace"], name=meta["name"],
                                error=type(exc).__name__)

        await asyncio.gather(*(one(b) for b in todo))
        return reconciled

    async def sweep_once(self) -> int:
        """Returns how many tenants were reconciled because they differed.

        The Tenants are read and checked a page of the LIST at a time (Kube.list_pages): only the
        ones to reconcile are kept whole, and slim copies of the rest for the chores, so a sweep
        of a large fleet does not hold every Tenant's body for its whole length (what the
        allocators keep after such a burst stays in the process's RSS)."""
        self.ctx.targets.update_pool_metrics()
        secrets = {
            (s["metadata"]["namespace"], s["metadata"]["name"])
            for s in await self.ctx.kube.list_secret_metadata(
                ",".join(f"{k}={v}" for k, v in MANAGED_BY.items()) + f",{TENANT_LABEL}"
            )
        }
        phases: Counter[str] = Counter()
        everyone: list[dict[str, Any]] = []
        todo: list[dict[str, Any]] = []
        # The replica doing the chores reads every Tenant (the isolation audit reports on each);
        # the others only their slices' (the API server selects them).
        ownership = self.ctx.ownership
        shard = None if ownership.chores else ownership.selector()
        async for page in self.ctx.kube.list_pages("tenants", shard_selector=shard):
            listed = self._watched(page.items)
            if ownership.chores:
                everyone += [slim_tenant(b) for b in listed]
            bodies = ownership.mine(listed)  # sharded: this replica's slices only
            phases.update((b.get("status") or {}).get("phase", "Provisioning") for b in bodies)
            todo += await self._to_reconcile(bodies, secrets)
        for phase in ("Provisioning", "Active", "Suspended", "Deleting", "Failed"):
            metrics.TENANTS.labels(phase=phase).set(phases.get(phase, 0))
        reconciled = await self._reconcile_listed(todo)
        if ownership.chores:
            await self.chores(everyone)
        if reconciled:
            # Listed ones left out: deleted or edited meanwhile, or their handler's reconcile in flight.
            log.info("sweep repaired", tenants=reconciled, listed=len(todo))
        return reconciled

    async def _to_reconcile(self, bodies: list[dict[str, Any]], secrets: set[tuple[str, str]]) -> list[dict[str, Any]]:
        """Those of ``bodies`` that are not Ready, lack their Secret, drifted from their spec in
        the database, or are due a credential rotation."""
        by_target: dict[str, list[tuple[dict[str, Any], TenantSpec, str]]] = defaultdict(list)
        todo: list[dict[str, Any]] = []
        for body in bodies:
            if not _taken_on(body):
                continue
            try:
                spec = TenantSpec.model_validate(body.get("spec") or {})
                ident = tenant_identifier(body["metadata"]["name"])
            except ValueError:  # e.g. a spec stored before the CRD's bounds: its own reconcile reports it
                continue
            has_secret = (body["metadata"]["namespace"], secret_name(body["metadata"]["name"])) in secrets
            if not _ready(body) or not has_secret:
                todo.append(body)
            else:
                by_target[spec.database].append((body, spec, ident))
        for target, items in by_target.items():
            try:
                async with self.ctx.targets.connection(target) as conn:
                    idents = [ident for _, _, ident in items]
                    observed = await sqlt.observe(conn, idents)
                    login_obs = await logins.observe_logins_of(conn, idents)
                    due = await registry.credentials_due(conn, self.ctx.settings.control_schema, idents)
                    creds = await registry.credentials_rows(conn, self.ctx.settings.control_schema, idents)
            except (psycopg_pool.PoolTimeout, psycopg.OperationalError, LookupError):
                todo.extend(body for body, _, _ in items)  # the reconcile reports why
                continue
            now = datetime.now(UTC)
            for body, spec, ident in items:
                every = spec.credentials.rotate_every
                cred = creds.get(ident)
                rotated = cred.rotated_at if cred else None
                scheduled = every is not None and rotated is not None and rotated + parse_duration(str(every)) <= now
                if drifted(spec, ident, observed[ident], login_obs[ident], cred) or ident in due or scheduled:
                    todo.append(body)
        return todo

    async def chores(self, bodies: list[dict[str, Any]]) -> None:
        """Each target's work that belongs to no single Tenant (one replica does it when sharded)."""
        for target in self.ctx.targets.pools:
            try:
                await self.ctx.ensure_control_schema(target)
                purged = await self.archives.run(target)
                for tenant in await drop_moved_copies(self.ctx, target):
                    log.info("moved tenant's old copy dropped", target=target, tenant=tenant)
                async with self.ctx.targets.connection(target) as conn:
                    # Temporary logins of dumps and restores a crash interrupted.
                    for user in await sqlt.stale_delegates(conn):
                        await sqlt.drop_delegate(conn, user)
                        log.info("temporary login dropped", target=target, role=user)
            except (psycopg_pool.PoolTimeout, psycopg.OperationalError):
                continue
            except (psycopg.Error, ApiError) as exc:  # one bad row must not stop the sweep for every tenant
                log.warning("archive catalog sweep failed", target=target, error=type(exc).__name__)
                continue
            if purged:
                log.info("archives purged", target=target, archives=purged)
        await self.audit_isolation(bodies)

    async def audit_isolation(self, bodies: list[dict[str, Any]]) -> int:
        """Audit every target, revoke what tenant roles hold beyond their schemas, report it.
        Returns the number of findings still held."""
        tenants = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in bodies}
        held: Counter[str] = Counter()
        for target in self.ctx.targets.pools:
            try:
                async with self.ctx.targets.connection(target) as conn:
                    report = await audit.audit(conn, self.ctx.settings.control_schema, fix=True,
                                               namespaces=self.ctx.settings.namespace_list)
            except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
                log.warning("isolation audit failed", target=target, error=type(exc).__name__)
                continue
            by_role = report.by_role()
            # A tenant's roles (its owner and its logins) share one condition: what any of them holds.
            per_tenant: dict[tuple[str, str], tuple[audit.TenantRef, dict[str, Any], _RoleFindings]] = {}
            for role, ref in report.tenants.items():
                body = tenants.get((ref.namespace, ref.name))
                if body is not None and ref.k8s_uid and body["metadata"].get("uid") != ref.k8s_uid:
                    body = None  # a Tenant of the same name, not the one this role is for
                findings = by_role.get(role, [])
                held.update(f.kind.value for f in report.remaining(role))
                try:
                    await self._report_isolation(target, ref, body, report, findings)
                except ApiError as exc:
                    log.warning("isolation report failed", target=target, namespace=ref.namespace, name=ref.name,
                                error=f"ApiError {exc.status}")
                if body is not None:
                    per_tenant.setdefault((ref.namespace, ref.name), (ref, body, []))[2].append((role, findings))
            for ref, body, roles in per_tenant.values():
                try:
                    await self._set_condition(body, _breach_condition(report, roles))
                except ApiError as exc:
                    log.warning("isolation report failed", target=target, namespace=ref.namespace, name=ref.name,
                                error=f"ApiError {exc.status}")
            for key in [k for k in self._held if k[0] == target and k[1] not in report.tenants]:
                del self._held[key]
        for kind in audit.Kind:
            metrics.ISOLATION_VIOLATIONS_HELD.labels(kind=kind.value).set(held.get(kind.value, 0))
        return sum(held.values())

    async def _report_isolation(self, target: str, ref: audit.TenantRef, body: dict[str, Any] | None,
                                report: audit.Report, findings: list[audit.Finding]) -> None:
        previously = self._held.get((target, ref.role), frozenset())
        remaining = frozenset(f.key for f in report.remaining(ref.role))
        if remaining:
            self._held[(target, ref.role)] = remaining
        else:  # only roles that hold something are kept: the others would be an entry per tenant role
            self._held.pop((target, ref.role), None)
        new = [f for f in findings if f.key not in previously]
        if new:
            for f in new:
                metrics.ISOLATION_VIOLATIONS.labels(kind=f.kind.value).inc()
            revoked = [f.describe() for f in new if report.outcome(f) == "revoked"]
            kept = [f"{f.describe()} ({report.outcome(f)})" for f in new if report.outcome(f) != "revoked"]
            log.warning("isolation violation", target=target, namespace=ref.namespace, name=ref.name,
                        role=ref.role, revoked=revoked or None, not_revoked=kept or None)
            if body is not None:
                self.ctx.events.warning(body, "IsolationViolation", _summary(ref.role, report, new))

    async def _set_condition(self, body: dict[str, Any], cond: Cond) -> None:
        """Write one condition over the Tenant's newest status (read now, written only if that is
        still the newest: a reconcile's status written meanwhile is never overwritten)."""
        meta = body["metadata"]
        if condition_settled((body.get("status") or {}).get("conditions") or [], cond):
            return  # as listed: no read of each Tenant of the fleet at every sweep
        for _ in range(3):
            fresh = await self.ctx.kube.get_object("tenants", meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
                return
            old = (fresh.get("status") or {}).get("conditions") or []
            if condition_settled(old, cond):
                return
            generation = int(fresh["metadata"].get("generation") or 0)
            if await self.ctx.status.write("tenants", fresh, {"conditions": merge(old, [cond], generation)},
                                           if_version=fresh["metadata"]["resourceVersion"]):
                return


_RoleFindings = list[tuple[str, list[audit.Finding]]]


def condition_settled(conditions: list[dict[str, Any]], cond: Cond) -> bool:
    """The conditions say what ``cond`` says: the same status, reason and message, or no such
    condition at all where ``cond`` is False (never breached)."""
    current = next((c for c in conditions if c.get("type") == cond.type), None)
    if current is None:
        return cond.status == "False"
    return (current.get("status"), current.get("reason"), current.get("message")) == (
        cond.status, cond.reason, cond.message)


def _breach_condition(report: audit.Report, roles: _RoleFindings) -> Cond:
    """The IsolationBreach condition of one tenant from the findings of each of its roles."""
    found = [(role, findings) for role, findings in roles if findings]
    if not found:
        return Cond(BREACH, "False", "NoneFound",
                    "the last isolation audit found nothing the tenant's roles hold beyond its schema")
    all_revoked = all(report.outcome(f) == "revoked" for _, findings in found for f in findings)
    message = " | ".join(_summary(role, report, findings) for role, findings in found)
    return Cond(BREACH, "True", "PrivilegesRevoked" if all_revoked else "PrivilegesHeld",
                message if len(message) <= 900 else message[:899] + "…")


def _summary(role: str, report: audit.Report, findings: list[audit.Finding], limit: int = 900) -> str:
    """What the audit found for one role and what became of it; catalog names made printable."""
    parts = [f"{f.describe()}: {report.outcome(f)}" for f in findings]
    text = f"role {role} held {len(findings)} privilege(s) beyond its schema: " + "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"
