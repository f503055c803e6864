"""The sweeps and fleet migrations reconcile LISTed snapshots; by the time a snapshot's turn comes
its object may be deleted or edited. And the API server can delete a Tenant whose finalizer is
being added at that moment (kubernetes/kubernetes#77988), after which Kopf's create handler still
runs. These tests play each interleaving exactly: the operator's services run in this process on
the session's real API server and PostgreSQL, with the session's operator process stopped, so
that nothing else acts on the objects and no timing decides the outcome. The test does what Kopf
would (the finalizer, the watch events, the handler calls) in the order under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kopf
import psycopg
import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator.api.names import FINALIZER
from tenancy_operator.api.tenant import tenant_identifier
from tenancy_operator.config import Settings
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import DatabaseTargets
from tenancy_operator.handlers.featureflag import FeatureFlagService
from tenancy_operator.handlers.tenant import TenantService
from tenancy_operator.observability import metrics
from tenancy_operator.observability.events import EventRecorder
from tenancy_operator.reconcilers.featureflag_policy import configmap_name
from tenancy_operator.reconcilers.featureflag_source import SOURCE_CONFIGMAP
from tenancy_operator.runtime_context import OperatorContext

from .harness import Cluster, OperatorProcess, gateway, sql_value, tenant

TENANTS, FLAGS = "tenants", "featureflags"


@pytest.fixture(scope="module")
def alone(operator: OperatorProcess) -> Iterator[None]:
    """The session's operator process stopped for this module, started again after it."""
    operator.stop()
    yield
    operator.start()


@pytest.fixture
async def ctx(alone: None, stack: LocalStack) -> AsyncIterator[OperatorContext]:
    settings = Settings(database_targets=json.dumps({t: stack.operator_dsn(t) for t in stack.targets}))
    kube = await gateway(stack)
    # A short lock_timeout: one test holds a tenant's lock in another session to fail a reconcile.
    targets = DatabaseTargets(settings.targets, min_size=0, max_size=4, connect_timeout=5, lock_timeout="2s")
    context = OperatorContext(settings=settings, targets=targets, kube=kube, events=EventRecorder(kube))
    await targets.open()
    try:
        yield context
    finally:
        await context.events.drain()
        await targets.close()
        await kube.close()


def taken_on(cluster: Cluster, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Created, then given our finalizer as Kopf does first: the body its patch returns."""
    cluster.create(plural, namespace, obj)
    return cluster.patch(plural, namespace, obj["metadata"]["name"], {"metadata": {"finalizers": [FINALIZER]}})


def delete_marked(cluster: Cluster, plural: str, namespace: str, name: str) -> dict[str, Any]:
    """The user's delete: held by the finalizer, the object now has a deletionTimestamp."""
    cluster.delete(plural, namespace, name)
    return cluster.get(plural, namespace, name)


def release(cluster: Cluster, plural: str, namespace: str, name: str) -> None:
    """Kopf removes the finalizer once the deletion handler succeeded: the object is gone."""
    cluster.patch(plural, namespace, name, {"metadata": {"finalizers": None}})
    assert cluster.gone(plural, namespace, name)


def vanish(cluster: Cluster, plural: str, namespace: str, name: str) -> None:
    """How the API server's race ends, played in order: gone, and the finalizer never held it."""
    cluster.patch(plural, namespace, name, {"metadata": {"finalizers": None}})
    cluster.delete(plural, namespace, name)
    assert cluster.gone(plural, namespace, name)


def flag(name: str) -> dict[str, Any]:
    return {"apiVersion": "tenancy.dev/v1alpha1", "kind": "FeatureFlag", "metadata": {"name": name},
            "spec": {"variants": {"on": {"value": True}, "off": {"value": False}}, "defaultVariant": "on"}}


def flag_rows(stack: LocalStack, namespace: str, key: str) -> int:
    return int(sql_value(stack.admin_dsn(), "SELECT count(*) FROM tenancy.feature_flags"
                         " WHERE namespace = %s AND flag_key = %s", [namespace, key]))


def watch_event(ctx: OperatorContext, svc: TenantService, type_: str, body: dict[str, Any]) -> None:
    """A Tenant watch event as the Tenant watch handler delivers it: to the runtime's Tenant
    cache, then to the service."""
    ctx.tenants.observe(type_, body)
    svc.tenant_changed(type_, body)


async def provisioned(ctx: OperatorContext, cluster: Cluster, namespace: str, name: str, *,
                      watched: bool = True) -> tuple[TenantService, dict[str, Any]]:
    """A Tenant provisioned by Kopf's create handler, and the snapshot a sweep listed of it."""
    svc = TenantService(ctx)
    listed = taken_on(cluster, TENANTS, namespace, tenant(name, deletionPolicy="Delete"))
    if watched:
        watch_event(ctx, svc, "ADDED", listed)
    assert (await svc.run(listed)).ready
    return svc, cluster.get(TENANTS, namespace, name)


@contextlib.contextmanager
def tenant_lock_held(stack: LocalStack, body: dict[str, Any]) -> Iterator[None]:
    """The Tenant's advisory lock held by another session (as a replica handing its slices over
    holds it): the operator's reconcile of it fails with Conflict after its lock_timeout."""
    lock = [sqlt.TENANT_LOCK_CLASS, tenant_identifier(body["metadata"]["name"])]
    with psycopg.connect(stack.operator_dsn(body["spec"].get("database") or "default"), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", lock)
        try:
            yield
        finally:
            other.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", lock)


def role_count(stack: LocalStack, role: str) -> int:
    return int(sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_roles WHERE rolname = %s", [role]))


async def test_a_tenant_deleted_after_the_sweep_listed_it_is_not_provisioned_again(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    svc, listed = await provisioned(ctx, cluster, namespace, "lapsed")
    assert role_count(stack, "tenant_lapsed") == 1
    # The sweep lists it here; then the user deletes it, and the deletion runs to its end.
    deleting = delete_marked(cluster, TENANTS, namespace, "lapsed")
    watch_event(ctx, svc, "MODIFIED", deleting)
    await svc.delete(deleting)
    release(cluster, TENANTS, namespace, "lapsed")
    watch_event(ctx, svc, "DELETED", deleting)
    assert role_count(stack, "tenant_lapsed") == 0

    assert await svc.run_listed(listed) is None  # the sweep's turn comes

    assert role_count(stack, "tenant_lapsed") == 0
    assert sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_lapsed'") == 0
    assert sql_value(stack.admin_dsn(), "SELECT array_agg(state) FROM tenancy.tenants WHERE namespace = %s",
                     [namespace]) == ["dropped"]
    assert await ctx.kube.get_secret(namespace, "lapsed-db") is None


async def test_a_tenant_finalized_before_the_watch_shows_it_gone_is_not_provisioned_again(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """No watch event at all (the stream was down): the finalizer's run alone is remembered."""
    svc, listed = await provisioned(ctx, cluster, namespace, "unseen", watched=False)
    await svc.delete(delete_marked(cluster, TENANTS, namespace, "unseen"))
    release(cluster, TENANTS, namespace, "unseen")
    assert await svc.run_listed(listed) is None
    assert role_count(stack, "tenant_unseen") == 0


async def test_an_older_listed_generation_does_not_undo_an_edit(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    svc, listed = await provisioned(ctx, cluster, namespace, "edited")
    suspended = cluster.patch(TENANTS, namespace, "edited", {"spec": {"state": "Suspended"}})
    watch_event(ctx, svc, "MODIFIED", suspended)
    assert (await svc.run(suspended)).phase == "Suspended"  # Kopf's update handler

    assert await svc.run_listed(listed) is None  # the sweep's snapshot from before the edit

    assert sql_value(  # neither the owner nor a login role of the tenant logs in
        stack.admin_dsn(),
        "SELECT count(*) FROM pg_roles WHERE rolcanlogin"
        " AND (rolname = 'tenant_edited' OR rolname LIKE 'tl\\_edited\\_%')",
    ) == 0
    await svc.delete(delete_marked(cluster, TENANTS, namespace, "edited"))
    release(cluster, TENANTS, namespace, "edited")


async def test_a_flag_deleted_after_the_sweep_listed_it_is_not_written_again(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    svc = FeatureFlagService(ctx)
    listed = taken_on(cluster, FLAGS, namespace, flag("retired"))
    await svc.run(listed, tenants=set())
    assert flag_rows(stack, namespace, "retired") > 0
    assert await ctx.kube.get_configmap(namespace, SOURCE_CONFIGMAP) is not None
    await svc.delete(delete_marked(cluster, FLAGS, namespace, "retired"))
    release(cluster, FLAGS, namespace, "retired")
    assert flag_rows(stack, namespace, "retired") == 0
    assert await ctx.kube.get_configmap(namespace, SOURCE_CONFIGMAP) is None  # the namespace's last flag

    await svc.run(listed, tenants=set())  # the sweep's turn comes

    assert flag_rows(stack, namespace, "retired") == 0
    assert await ctx.kube.get_configmap(namespace, configmap_name("retired")) is None
    assert await ctx.kube.get_configmap(namespace, SOURCE_CONFIGMAP) is None


async def test_a_reconcile_reports_nothing_over_a_deletion_the_watch_has_not_shown_yet(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """The user deletes a Tenant while a reconcile of it runs, and the watch has not shown the
    deletion when the reconcile reports: the sweep's reconcile of the snapshot it LISTed before,
    or a handler's of the body Kopf gave it. Here both fail (another session holds the tenant's
    lock, as a replica handing its slices over does). Their report must not land: the deletion's
    handler owns the status, and a Tenant being deleted must not show Failed (nor Active)."""
    svc, listed = await provisioned(ctx, cluster, namespace, "parting")
    marked = delete_marked(cluster, TENANTS, namespace, "parting")  # its watch event is not handled yet
    with tenant_lock_held(stack, listed):
        assert await svc.run_listed(listed) is None  # the sweep's turn
        assert (await svc.run(listed)).phase == "Deleting"  # Kopf's update handler, on the older body
    now = cluster.get(TENANTS, namespace, "parting")
    assert now["metadata"]["resourceVersion"] == marked["metadata"]["resourceVersion"], now.get("status")
    assert now["status"]["phase"] == "Active"  # as the deletion found it: its handler reports next
    watch_event(ctx, svc, "MODIFIED", marked)
    await svc.delete(marked)
    release(cluster, TENANTS, namespace, "parting")
    assert role_count(stack, "tenant_parting") == 0


async def test_a_report_lands_on_a_tenant_changed_since_but_not_deleted(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """The same, but the user only labelled the Tenant meanwhile: the report is made at the version
    read again, not lost."""
    svc, listed = await provisioned(ctx, cluster, namespace, "labelled")
    cluster.patch(TENANTS, namespace, "labelled", {"metadata": {"labels": {"team": "blue"}}})
    with tenant_lock_held(stack, listed), pytest.raises(kopf.TemporaryError):  # Kopf retries it
        await svc.run(listed)
    now = cluster.get(TENANTS, namespace, "labelled")
    ready = next(c for c in now["status"]["conditions"] if c["type"] == "Ready")
    assert (now["status"]["phase"], ready["reason"]) == ("Failed", "Conflict")
    assert now["metadata"]["labels"] == {"team": "blue"}
    assert (await svc.run(now)).ready  # the retry, once the lock is free
    await svc.delete(delete_marked(cluster, TENANTS, namespace, "labelled"))
    release(cluster, TENANTS, namespace, "labelled")


async def test_the_sweep_leaves_a_tenant_to_the_handler_reconcile_in_flight(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """The sweep leaves a Tenant to its handler's reconcile in flight: otherwise, during a burst
    longer than the sweep interval, every Tenant still queued would be reconciled twice."""
    svc = TenantService(ctx)
    listed = taken_on(cluster, TENANTS, namespace, tenant("queued", deletionPolicy="Delete"))
    watch_event(ctx, svc, "ADDED", listed)
    queued = metrics.PENDING.count("Tenant") + 1
    async with ctx.lock("Tenant", namespace, "queued"):  # whatever holds it, the handler waits
        handler = asyncio.create_task(svc.run(listed))  # Kopf's create handler
        deadline = asyncio.get_running_loop().time() + 30
        while metrics.PENDING.count("Tenant") < queued:  # queue_depth shows it waiting
            assert asyncio.get_running_loop().time() < deadline, "the handler's reconcile never queued"
            await asyncio.sleep(0.01)
        # The sweep's turn: it returns at once, without waiting for the lock this test holds.
        assert await asyncio.wait_for(svc.run_listed(listed, unless_in_flight=True), timeout=30) is None
    assert (await handler).ready
    # Nothing in flight: the sweep reconciles (here: finds it in sync).
    out = await svc.run_listed(cluster.get(TENANTS, namespace, "queued"), unless_in_flight=True)
    assert out is not None and out.ready
    await svc.delete(delete_marked(cluster, TENANTS, namespace, "queued"))
    release(cluster, TENANTS, namespace, "queued")
    assert role_count(stack, "tenant_queued") == 0


async def test_a_tenant_deleted_while_its_finalizer_was_added_leaves_nothing_behind(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """kubernetes/kubernetes#77988: the user's DELETE, begun before Kopf's finalizer patch,
    deletes the object after it; Kopf then runs the create handler on the patched body."""
    svc = TenantService(ctx)
    taken = taken_on(cluster, TENANTS, namespace, tenant("blink", deletionPolicy="Delete"))
    vanish(cluster, TENANTS, namespace, "blink")

    await svc.run(taken)  # Kopf's create handler
    # Its progress could not be stored on the gone object, and the event its finalizer patch made
    # comes next: Kopf runs the handler again, on a body of the same uid.
    await svc.run(taken)

    assert role_count(stack, "tenant_blink") == 0
    assert sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_blink'") == 0
    assert sql_value(stack.admin_dsn(), "SELECT array_agg(state) FROM tenancy.tenants WHERE namespace = %s",
                     [namespace]) == ["dropped"]
    assert await ctx.kube.get_secret(namespace, "blink-db") is None


async def test_a_tenant_created_again_under_its_name_gets_nothing_of_the_one_before(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """The same race, and the user creates the Tenant again under its name before the gone one's
    reconcile reports. That report is about the gone Tenant: written on the new one, it would show
    it Ready, and the new one's create handler would take it for in sync and never provision it."""
    svc = TenantService(ctx)
    taken = taken_on(cluster, TENANTS, namespace, tenant("again", deletionPolicy="Delete"))
    vanish(cluster, TENANTS, namespace, "again")
    again = cluster.create(TENANTS, namespace, tenant("again", deletionPolicy="Delete"))

    await svc.run(taken)  # the gone Tenant's create handler

    now = cluster.get(TENANTS, namespace, "again")
    assert now["metadata"]["uid"] == again["metadata"]["uid"]
    status = now.get("status") or {}
    assert not status.get("observedGeneration") and not status.get("conditions"), status  # the CRD's default
    # What the gone one's reconcile provisioned went with it; the new one is still to provision.
    assert sql_value(stack.admin_dsn(), "SELECT array_agg(state) FROM tenancy.tenants WHERE namespace = %s",
                     [namespace]) == ["dropped"]
    assert role_count(stack, "tenant_again") == 0


async def test_a_tenant_whose_deleted_event_comes_during_that_reconcile_leaves_nothing_behind(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    """The same race, with the watch's DELETED event handled while the create handler's reconcile
    runs: the event says the Tenant is gone, not that its deletion was applied."""
    svc = TenantService(ctx)
    taken = taken_on(cluster, TENANTS, namespace, tenant("flash", deletionPolicy="Delete"))
    vanish(cluster, TENANTS, namespace, "flash")
    reconcile = svc.reconciler.reconcile

    async def reconcile_then_watch_event(body: Any) -> Any:
        out = await reconcile(body)
        watch_event(ctx, svc, "DELETED", taken)  # the event is handled here, in this order
        return out

    svc.reconciler.reconcile = reconcile_then_watch_event  # type: ignore[method-assign]
    await svc.run(taken)  # Kopf's create handler

    assert role_count(stack, "tenant_flash") == 0
    assert sql_value(stack.admin_dsn(), "SELECT array_agg(state) FROM tenancy.tenants WHERE namespace = %s",
                     [namespace]) == ["dropped"]
    assert await ctx.kube.get_secret(namespace, "flash-db") is None


async def test_a_flag_deleted_while_its_finalizer_was_added_leaves_nothing_behind(
    stack: LocalStack, cluster: Cluster, ctx: OperatorContext, namespace: str
) -> None:
    svc = FeatureFlagService(ctx)
    taken = taken_on(cluster, FLAGS, namespace, flag("fleeting"))
    vanish(cluster, FLAGS, namespace, "fleeting")

    await svc.run(taken, tenants=set())  # Kopf's create handler

    assert flag_rows(stack, namespace, "fleeting") == 0
    assert await ctx.kube.get_configmap(namespace, configmap_name("fleeting")) is None
    assert await ctx.kube.get_configmap(namespace, SOURCE_CONFIGMAP) is None
