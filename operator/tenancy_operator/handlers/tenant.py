"""Tenant handlers: create/update/resume and the sweep share one idempotent reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import kopf
import psycopg

from tenancy_operator import GROUP, VERSION
from tenancy_operator.api.names import ACK_SCHEMA_RECREATED_ANNOTATION
from tenancy_operator.api.schemarollout import SCHEMA_ROLLOUT
from tenancy_operator.api.tenant import CredentialsStatus, MoveRecord, TenantStatus, tenant_identifier
from tenancy_operator.conditions import Cond, merge, readiness
from tenancy_operator.handlers.common import WATCH_HANDLER_ID, backoff, on_reconcile, services
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.resume import ResumeChecker
from tenancy_operator.reconcilers.tenant import TenantReconciler
from tenancy_operator.reconcilers.tenant_base import ArchiveBlocked, Outcome, admission, secret_name
from tenancy_operator.runtime_context import OperatorContext
from tenancy_operator.status_writer import Report

KIND, PLURAL = "Tenant", "tenants"
_FIRST_SIGHT = (kopf.Reason.CREATE.value, kopf.Reason.RESUME.value)
log = get_logger(__name__)


def _key(body: Mapping[str, Any]) -> str:
    return f"{body['metadata']['namespace']}/{body['metadata']['name']}"


def _deleting_outcome() -> Outcome:
    """What a reconcile returns when the Tenant's deletion handler owns its status."""
    return Outcome(False, "Deleting", "the tenant is being deleted", "Deleting")


def _left_to_deletion(listed: contextlib.ExitStack | None) -> Outcome | None:
    """What ``_run`` returns once the Tenant's deletion has begun: None for a LISTed snapshot."""
    return None if listed is not None else _deleting_outcome()


def desired_status(body: Mapping[str, Any], out: Outcome, ident: str | None,
                   limits: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta, spec = body["metadata"], body.get("spec") or {}
    generation = int(meta.get("generation") or 0)
    old = (body.get("status") or {}).get("conditions")
    conds, drop = readiness(out.ready, out.stalled, out.reason,
                            (out.message or f"tenant is {out.phase}") if out.ready else out.message)
    if out.data_loss:
        conds.append(Cond(
            "SchemaRecreated", "True", "SchemaDroppedOutOfBand",
            "the schema was dropped outside the operator and re-created empty; its data is gone."
            f" Annotate {ACK_SCHEMA_RECREATED_ANNOTATION}=<new value> once handled.",
        ))
    else:
        drop.append("SchemaRecreated")
    provisioned = bool(ident and out.tenant_id)
    latest = out.jobs[0] if out.jobs else None
    record = TenantStatus(
        conditions=[],
        observed_generation=generation,
        phase=out.phase,
        database=out.database or spec.get("database", "default"),
        last_move=MoveRecord.model_validate(out.last_move) if out.last_move is not None else None,
        tenant_id=out.tenant_id if provisioned else None,
        schema_name=ident if provisioned else None,
        role=ident if provisioned else None,
        secret_name=secret_name(meta["name"]) if provisioned else None,
        schema_version=out.schema_version or None,
        credentials=CredentialsStatus.model_validate(out.credentials) if out.credentials is not None else None,
        effective_limits=dict(limits or {}),
        # currentJob: the job still needing attention (failed, awaiting a retry or an admin); else none.
        current_job=latest.summary() if latest is not None and latest.state != "succeeded" else None,
        recent_jobs=[j.summary() for j in out.jobs],
    )
    # What this reconcile knows; the rest stays as the status holds it (a reconcile that failed
    # before reading the registry still shows the schema, role and Secret it was given).
    known = {"observed_generation", "phase", "database"}
    if out.last_move is not None:
        known.add("last_move")
    if provisioned:
        known |= {"tenant_id", "schema_name", "role", "secret_name"}
    if out.schema_version:
        known.add("schema_version")
    if out.credentials is not None:
        known.add("credentials")  # its None fields remove what the status holds (a retired login)
    if limits and out.ready and not (body.get("status") or {}).get("effectiveLimits"):
        known.add("effective_limits")  # the quota service keeps them up to date from here
    if out.jobs:
        known |= {"current_job", "recent_jobs"}
    return {
        "conditions": merge(old, conds, generation, drop=drop),
        **record.model_dump(mode="json", include=known, exclude_unset=True),
    }


class TenantService:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.reconciler = TenantReconciler(ctx)
        # (namespace, template ConfigMap) -> tenants using it, kept by the reconciles themselves, so
        # a ConfigMap event costs a dict lookup. (A Kopf index would make every ConfigMap worker wait
        # for index readiness, which can starve the operator at start-up with many ConfigMaps.)
        self._template_users: dict[tuple[str, str], set[str]] = {}
        self.resume_check = ResumeChecker(ctx, self.reconciler.templates)
        self._in_flight: Counter[str] = Counter()
        """Tenants with a handler's reconcile waiting or running."""
        self.limits: Callable[[Mapping[str, Any]], Mapping[str, str] | None] | None = None
        """The quota service's expected_limits (wired at start-up), for the first Ready status."""

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        key, meta = _key(body), body["metadata"]
        if type_ == "DELETED":
            self.ctx.gone.add(meta.get("uid"))
            self.reconciler.forget_placement(str(meta.get("uid") or ""))
            metrics.PENDING.discard(KIND, key)  # whatever was waiting for it will not come
            metrics.STALLED.forget(KIND, key)

    def _deleting(self, body: Mapping[str, Any]) -> bool:
        """The watch has shown this Tenant's deletion begun (the runtime's Tenant cache)."""
        seen = self.ctx.tenants.get((body["metadata"]["namespace"], body["metadata"]["name"]))
        return seen is not None and bool(seen["metadata"].get("deletionTimestamp"))

    def _superseded(self, body: Mapping[str, Any]) -> bool:
        """A LISTed snapshot that must not be reconciled: its Tenant is gone, or the watch has
        delivered a newer generation (or a new Tenant of the same name), whose handler acts on it."""
        meta = body["metadata"]
        uid = str(meta.get("uid") or "")
        if uid in self.ctx.gone:
            return True
        seen = self.ctx.tenants.get((meta["namespace"], meta["name"]))
        return seen is not None and (str(seen["metadata"].get("uid") or "") != uid
                                     or int(seen["metadata"].get("generation") or 0) > int(meta.get("generation") or 0))

    def confirm_in_sync(self, body: Mapping[str, Any]) -> None:
        self._track_template(body)
        metrics.record_result(KIND, True)

    def uses_template(self, namespace: str, template: str) -> bool:
        return bool(self._template_users.get((namespace, template)))

    def _track_template(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        for key in [k for k in self._template_users if k[0] == namespace]:
            self._template_users[key].discard(name)
        template = (body.get("spec") or {}).get("schemaTemplate")
        if template and not deleted:
            self._template_users.setdefault((namespace, template), set()).add(name)

    async def run(self, body: Mapping[str, Any], retry: int = 0) -> Outcome:
        """One reconcile with its reporting. Raises kopf.TemporaryError to be retried.

        No "Reconciling" status is written first: until the operator reports, the API server
        serves the CRD's default status (observedGeneration 0), which kstatus, `kubectl wait` and
        the Argo CD health check already read as in progress.
        """
        key = _key(body)
        self._track_template(body)
        self._in_flight[key] += 1
        try:
            with metrics.PENDING.outstanding(KIND, key):
                out = await self._run(body, retry)
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
        assert out is not None  # only a listed snapshot is ever skipped
        return out

    async def run_listed(self, body: Mapping[str, Any], *, unless_in_flight: bool = False) -> Outcome | None:
        """A reconcile of a LISTed snapshot (the sweep's, a fleet migration's). None when, by the
        time the Tenant's lock is ours, the snapshot is out of date: the Tenant is being deleted
        or is gone (reconciling it would provision a deleted tenant again, with nothing left to
        drop it), or a newer generation has come (reconciling the old one would undo the edit).

        ``unless_in_flight`` (the sweep): also None when a handler's reconcile of it is waiting
        or running, which does the same work and reports it: otherwise a burst longer than the
        sweep interval has every Tenant still queued reconciled twice. (A fleet migration must
        not skip: a reconcile already running may have read the template before it changed.)"""
        if unless_in_flight and self._in_flight.get(_key(body)):
            return None
        with contextlib.ExitStack() as pending:
            return await self._run(body, 0, listed=pending)

    async def _run(self, body: Mapping[str, Any], retry: int, *,
                   listed: contextlib.ExitStack | None = None) -> Outcome | None:
        """``listed``: a LISTed snapshot's reconcile, which counts in queue_depth from the moment
        it is known to be current (a handler's counts from its event: ``run``)."""
        meta = body["metadata"]
        started = time.monotonic()
        # The object's lock is held until the status is written (the reconcile slot only while it
        # reconciles): a LISTed snapshot's reconcile and a handler's, decided one after the other,
        # must also write in that order, or the older decision's write lands last.
        async with self.ctx.lock(KIND, meta["namespace"], meta["name"]):
            async with self.ctx.reconcile_slots.hold(meta["namespace"]):
                if meta.get("uid") in self.ctx.gone:
                    # Finalized, or gone from the watch: Kopf can still run a handler on a body of it
                    # (its progress patch met the gone object, and the event its finalizer patch made
                    # came next). Provisioning it again would leave what nothing is left to drop.
                    gone = Outcome(False, "Deleted", "the tenant is gone", "Deleting")
                    return None if listed is not None else gone
                if listed is not None:
                    if self._deleting(body) or self._superseded(body):
                        return None
                    listed.enter_context(metrics.PENDING.outstanding(KIND, _key(body)))
                    self._track_template(body)
                elif self._deleting(body):
                    # The deletion handler owns it now; its status must not be overwritten here.
                    return _deleting_outcome()
                with metrics.observe_reconcile(KIND):
                    try:
                        out = await self.reconciler.reconcile(body)
                    except Retry as exc:
                        metrics.record_result(KIND, False, exc.reason)
                        if self._deleting(body):
                            # Its deletion began while this reconcile ran (waiting for the database,
                            # say): the deletion handler, next in line, owns the status now. A
                            # "Failed" written first would show a Tenant being deleted as failed.
                            return _left_to_deletion(listed)
                        out = Outcome(False, exc.reason, exc.message, "Provisioning"
                                      if not (body.get("status") or {}).get("tenantId") else "Failed")
                        report = await self._report(body, out, started)
                        if report is Report.WRITTEN:
                            raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc
                        if report is Report.DELETING:  # begun since the watch last showed it
                            return _left_to_deletion(listed)
                        await self._clean_up_gone(body)  # nothing left to retry for
                        return out
                    except Exception:
                        metrics.record_result(KIND, False, "Internal")
                        log.exception("reconcile crashed", kind=KIND, namespace=meta["namespace"],
                                      name=meta["name"], result="Internal")
                        raise
            metrics.record_result(KIND, out.ready, None if out.ready else out.reason)
            if self._deleting(body):  # as for a failure above: the deletion handler reports now
                return _left_to_deletion(listed)
            report = await self._report(body, out, started)
        if report is Report.DELETING:
            return _left_to_deletion(listed)
        if report is Report.GONE:
            async with (self.ctx.lock(KIND, meta["namespace"], meta["name"]),
                        self.ctx.reconcile_slots.hold(meta["namespace"])):
                await self._clean_up_gone(body)
            return out
        if out.retry:  # a job attempt failed; the next one comes after a backoff
            raise kopf.TemporaryError(out.message, delay=backoff(retry))
        return out

    async def _clean_up_gone(self, body: Mapping[str, Any]) -> None:
        """The Tenant vanished while it was reconciled, and its finalizer never ran. The API server
        can delete an object whose finalizer is being added at that very moment
        (kubernetes/kubernetes#77988): a Tenant deleted right after its creation, with Kopf's
        create handler run on the body its finalizer patch returned. What the reconcile provisioned
        must not outlive it: the deletion policy applies now, to the registry row that is still
        this object's. Called with the Tenant's lock and a reconcile slot held."""
        meta = body["metadata"]
        # Even if the uid is among the gone: the watch's DELETED event says the object is gone, not
        # that its deletion was applied. finalize(same_uid=True) finds nothing live of a Tenant
        # already finalized, so it is safe to repeat.
        try:
            events = await self.reconciler.finalize(body, same_uid=True)
        except (psycopg.Error, Retry, ArchiveBlocked) as exc:
            log.error("tenant gone without its deletion: what it was given is left in the database",
                      kind=KIND, namespace=meta["namespace"], name=meta["name"], error=type(exc).__name__)
            return
        self.ctx.gone.add(meta.get("uid"))
        self._track_template(body, deleted=True)
        log.warning("tenant gone without its deletion: its deletion policy was applied", kind=KIND,
                    namespace=meta["namespace"], name=meta["name"], done=[r for _, r, _ in events] or None)

    async def _report(self, body: Mapping[str, Any], out: Outcome, started: float) -> Report:
        """Events, the log line and the status, unless the Tenant is gone or its deletion has begun
        (StatusWriter.report: the watch may not have shown it yet)."""
        try:
            ident: str | None = tenant_identifier(body["metadata"]["name"])
        except ValueError:
            ident = None
        old_ready: dict[str, Any] = next(
            (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        for type_, reason, message in out.events:
            self.ctx.events.post(body, type_, reason, message)
        if not out.ready and old_ready.get("reason") != out.reason:
            self.ctx.events.warning(body, out.reason, out.message)  # once per transition, not per retry
        log_fn = log.info if out.ready else log.warning
        log_fn("reconciled", kind=KIND, namespace=body["metadata"]["namespace"], name=body["metadata"]["name"],
               tenant=ident, duration_seconds=round(time.monotonic() - started, 4),
               result="ready" if out.ready else "failure", reason=None if out.ready else out.reason,
               message=None if out.ready else out.message,
               repairs=out.repairs or None)
        limits = self.limits(body) if self.limits is not None and out.ready else None
        report = await self.ctx.status.report(PLURAL, body, desired_status(body, out, ident, limits))
        if report is Report.WRITTEN:
            metrics.STALLED.update(KIND, _key(body), out.reason if out.stalled else None)
        return report

    async def delete(self, body: Mapping[str, Any], retry: int = 0) -> None:
        with metrics.PENDING.outstanding(KIND, _key(body)):
            await self._delete(body, retry)

    async def _delete(self, body: Mapping[str, Any], retry: int) -> None:
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        async with (self.ctx.lock(KIND, meta["namespace"], meta["name"]),
                    self.ctx.reconcile_slots.hold(meta["namespace"])):
            try:
                evs = await self.reconciler.finalize(body)
            except psycopg.Error as exc:
                # E.g. "tuple concurrently updated" when the quota loop alters the same role: try
                # again soon, not after Kopf's default minute.
                metrics.record_result(KIND, False, "Internal")
                raise kopf.TemporaryError(f"deletion step failed: {type(exc).__name__}", delay=backoff(retry)) from exc
            except (Retry, ArchiveBlocked) as exc:
                reason = exc.reason if isinstance(exc, Retry) else "ArchiveFailed"
                message = exc.message if isinstance(exc, Retry) else (
                    f"nothing was dropped: the archive could not be written ({exc}); deletion retries until it can")
                metrics.record_result(KIND, False, reason)
                old = (body.get("status") or {}).get("conditions")
                old_reason = next((c.get("reason") for c in old or [] if c.get("type") == "Ready"), None)
                if old_reason != reason:
                    self.ctx.events.warning(body, reason, message)
                await self.ctx.status.write(PLURAL, body, {
                    "phase": "Deleting",
                    "conditions": merge(old, [Cond("Ready", "False", reason, message)], generation),
                })
                raise kopf.TemporaryError(message, delay=backoff(retry)) from exc
            self.ctx.gone.add(meta.get("uid"))  # before the lock is released to a waiting snapshot
        for type_, reason, message in evs:
            self.ctx.events.post(body, type_, reason, message)
        self._track_template(body, deleted=True)

    async def migrate_fleet(self, namespace: str, template: str, configmap: Mapping[str, Any]) -> None:
        """A template changed: reconcile every Tenant using it, a bounded number at a time.

        One tenant's failure is its own (condition, Event, metric); the others go on. The summary
        goes to the ConfigMap as an Event, so a rollout is visible without reading every Tenant.
        """
        bodies = [b for b in self.ctx.ownership.mine(await self.ctx.kube.list_objects(PLURAL, namespace))
                  if (b.get("spec") or {}).get("schemaTemplate") == template
                  and not b["metadata"].get("deletionTimestamp")]
        if not bodies:
            return
        sem = asyncio.Semaphore(self.ctx.settings.migration_concurrency)
        results: dict[str, str] = {}

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                name = body["metadata"]["name"]
                try:
                    out = await self.run_listed(body)
                    if out is None:
                        return  # deleted or edited meanwhile: not this migration's to report
                    results[name] = out.schema_version or "-" if out.ready else f"failed ({out.reason})"
                except kopf.TemporaryError as exc:
                    results[name] = f"failed ({str(exc)[:80]})"
                except Exception as exc:  # never let one tenant stop the fleet
                    results[name] = f"failed ({type(exc).__name__})"

        await asyncio.gather(*(one(b) for b in bodies))
        failed = sorted(n for n, r in results.items() if r.startswith("failed"))
        versions = Counter(r for r in results.values() if not r.startswith("failed"))
        summary = ", ".join(f"{n} at {v}" for v, n in sorted(versions.items()))
        message = f"{len(results)} tenant(s): {summary or 'none migrated'}"
        if failed:
            message += f"; failed: {', '.join(failed[:20])}"
        cm_ref = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": configmap["metadata"]}
        self.ctx.events.post(cm_ref, "Warning" if failed else "Normal", "FleetMigration", message)
        log.info("fleet migration", namespace=namespace, template=template, tenants=len(results), failed=len(failed))


SERVICE = TenantService
"""The kind's service class: runtime.py makes one per process (memo.services[KIND])."""


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the Tenant handlers to ``registry`` (no import-time side effects)."""
    service = services(KIND, TenantService)

    @on_reconcile(registry, PLURAL)
    async def tenant_reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, reason: str, **_: Any) -> None:
        svc = service(memo)
        # Kopf keeps its last-handled state in memory (handlers/common.py), so after a restart
        # every Tenant comes as a creation: confirmed from bulk facts, nothing to write. (A new
        # Tenant has no status yet and is not in sync: that check costs nothing.)
        if reason in _FIRST_SIGHT and retry == 0 and await svc.resume_check.in_sync(body):
            svc.confirm_in_sync(body)
            return
        await svc.run(body, retry)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id=WATCH_HANDLER_ID)
    async def tenant_watch(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # One watch handler for every service that follows Tenants (quotas, flag overrides): one
        # handler call per Tenant event instead of one per service. The Tenant cache first: the
        # services read it.
        memo.ctx.tenants.observe(type, body)  # the start-up handler made it before any watch
        for svc in getattr(memo, "tenant_watchers", ()):
            svc.tenant_changed(type, body)
        if type == "DELETED" and hasattr(memo, "diffbase"):
            memo.diffbase.forget(body.metadata.uid)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="finalize")
    async def tenant_delete(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        await service(memo).delete(body, retry)

    def is_used_template(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> bool:
        # Filtered before the handler runs: other ConfigMaps cost no handler call and no log line.
        return service(memo).uses_template(namespace or "", name)

    @kopf.on.event(GROUP, VERSION, SCHEMA_ROLLOUT.plural, registry=registry, id="rollout-admission")
    async def rollout_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # A SchemaRollout's admission (baseVersion, canary, admitBelow in its status) decides which
        # template versions each Tenant may have: a wider one migrates the template's Tenants now.
        svc = service(memo)
        rollouts = svc.reconciler.rollouts
        namespace, template = body.metadata.namespace or "", str((body.get("spec") or {}).get("template") or "")
        if type is None or not svc.uses_template(namespace, template):  # the start-up listing, or no Tenant to move
            (rollouts.deleted if type == "DELETED" else rollouts.seen)(body)
            return
        known, before = rollouts.peek(namespace, template)  # no LIST: it would show the change already
        (rollouts.deleted if type == "DELETED" else rollouts.seen)(body)
        after = admission(await rollouts.get(namespace, template))
        configmap = await svc.reconciler.templates.get(namespace, template)
        if (not known or after != admission(before)) and configmap is not None:
            await svc.migrate_fleet(namespace, template, configmap)

    @kopf.on.event("", "v1", "configmaps", registry=registry, id="template-changed", when=is_used_template)
    async def template_changed(type: str, body: kopf.Body, namespace: str | None, name: str,
                               memo: kopf.Memo, **_: Any) -> None:
        templates = service(memo).reconciler.templates
        if type == "DELETED":
            templates.deleted(namespace or "", name)
        else:
            templates.seen(body)
        # type is None for the initial listing at start-up: resume handlers cover that case.
        if type not in ("ADDED", "MODIFIED") or not service(memo).uses_template(namespace or "", name):
            return
        await service(memo).migrate_fleet(namespace or "", name, body)
