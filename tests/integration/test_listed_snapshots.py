"""The sweeps and fleet migrations reconcile LISTed snapshots; by the time a snapshot's turn comes
its object may be deleted or edited. These tests play that interleaving exactly, with the
operator's services in this process on the session's real API server and PostgreSQL.

The objects exist only as the bodies the services are handed (the snapshot a sweep listed), so
the session's operator process never acts on them: no timing decides the outcome.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client, config

from tenancy_operator.config import Settings
from tenancy_operator.db.targets import DatabaseTargets
from tenancy_operator.devenv.stack import LocalStack
from tenancy_operator.handlers.featureflag import FeatureFlagService
from tenancy_operator.handlers.tenant import TenantService
from tenancy_operator.k8s.client import Kube
from tenancy_operator.observability import metrics
from tenancy_operator.observability.events import EventRecorder
from tenancy_operator.reconcilers.featureflag import configmap_name
from tenancy_operator.runtime_context import OperatorContext
from tenancy_operator.sweep import FINALIZER

from .harness import GROUP, VERSION, sql_value


@pytest.fixture
async def ctx(stack: LocalStack) -> AsyncIterator[OperatorContext]:
    settings = Settings(database_targets=json.dumps({t: stack.operator_dsn(t) for t in stack.targets}))
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(stack.kubeconfig), client_configuration=configuration)
    kube = Kube(client.ApiClient(configuration))
    targets = DatabaseTargets(settings.targets, min_size=0, max_size=4, connect_timeout=5)
    context = OperatorContext(settings=settings, targets=targets, kube=kube, events=EventRecorder(kube.api))
    await targets.open()
    try:
        yield context
    finally:
        await context.events.drain()
        await targets.close()
        await kube.close()


def body(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                     "resourceVersion": "1", "finalizers": [FINALIZER]},
        "spec": spec,
        "status": {"observedGeneration": 0},
    }


def deleting(obj: dict[str, Any]) -> dict[str, Any]:
    gone = copy.deepcopy(obj)
    gone["metadata"]["deletionTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return gone


async def provisioned(ctx: OperatorContext, namespace: str, name: str, *,
                      watched: bool = True) -> tuple[TenantService, dict[str, Any]]:
    """A Tenant provisioned by Kopf's create handler, and the snapshot a sweep listed of it."""
    svc = TenantService(ctx)
    listed = body("Tenant", namespace, name, {"deletionPolicy": "Delete"})
    if watched:
        svc.tenant_changed("ADDED", listed)
    assert (await svc.run(listed)).ready
    return svc, listed


def role_count(stack: LocalStack, role: str) -> int:
    return int(sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_roles WHERE rolname = %s", [role]))


async def test_a_tenant_deleted_after_the_sweep_listed_it_is_not_provisioned_again(
    stack: LocalStack, ctx: OperatorContext, namespace: str
) -> None:
    svc, listed = await provisioned(ctx, namespace, "lapsed")
    assert role_count(stack, "tenant_lapsed") == 1
    # The sweep lists it here; then the user deletes it, and the deletion runs to its end.
    svc.tenant_changed("MODIFIED", deleting(listed))
    await svc.delete(deleting(listed))
    svc.tenant_changed("DELETED", deleting(listed))
    assert role_count(stack, "tenant_lapsed") == 0

    assert await svc.run_listed(listed) is None  # the sweep's turn comes

    assert role_count(stack, "tenant_lapsed") == 0
    assert sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_lapsed'") == 0
    assert sql_value(stack.admin_dsn(), "SELECT array_agg(state) FROM tenancy.tenants WHERE namespace = %s",
                     [namespace]) == ["dropped"]
    assert await ctx.kube.get_secret(namespace, "lapsed-db") is None


async def test_a_tenant_finalized_before_the_watch_shows_it_gone_is_not_provisioned_again(
    stack: LocalStack, ctx: OperatorContext, namespace: str
) -> None:
    """No watch event at all (the stream was down): the finalizer's run alone is remembered."""
    svc, listed = await provisioned(ctx, namespace, "unseen", watched=False)
    await svc.delete(deleting(listed))
    assert await svc.run_listed(listed) is None
    assert role_count(stack, "tenant_unseen") == 0


async def test_an_older_listed_generation_does_not_undo_an_edit(
    stack: LocalStack, ctx: OperatorContext, namespace: str
) -> None:
    svc, listed = await provisioned(ctx, namespace, "edited")
    suspended = copy.deepcopy(listed)
    suspended["metadata"]["generation"] = 2
    suspended["spec"]["state"] = "Suspended"
    svc.tenant_changed("MODIFIED", suspended)
    assert (await svc.run(suspended)).phase == "Suspended"  # Kopf's update handler

    assert await svc.run_listed(listed) is None  # the sweep's snapshot from before the edit

    assert sql_value(stack.admin_dsn(), "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'tenant_edited'") is False
    await svc.delete(deleting(suspended))


async def test_a_flag_deleted_after_the_sweep_listed_it_is_not_written_again(
    stack: LocalStack, ctx: OperatorContext, namespace: str
) -> None:
    svc = FeatureFlagService(ctx)
    listed = body("FeatureFlag", namespace, "retired", {
        "variants": {"on": {"value": True}, "off": {"value": False}}, "defaultVariant": "on",
    })
    rows = "SELECT count(*) FROM tenancy.feature_flags WHERE namespace = %s AND flag_key = 'retired'"
    await svc.run(listed, tenants=set())
    assert sql_value(stack.admin_dsn(), rows, [namespace]) > 0
    await svc.delete(deleting(listed))
    assert sql_value(stack.admin_dsn(), rows, [namespace]) == 0

    await svc.run(listed, tenants=set())  # the sweep's turn comes

    assert sql_value(stack.admin_dsn(), rows, [namespace]) == 0
    assert await ctx.kube.get_configmap(namespace, configmap_name("retired")) is None


async def test_the_sweep_leaves_a_tenant_to_the_handler_reconcile_in_flight(
    stack: LocalStack, ctx: OperatorContext, namespace: str
) -> None:
    """During a burst longer than the sweep interval, Tenants still queued were reconciled twice."""
    svc = TenantService(ctx)
    listed = body("Tenant", namespace, "queued", {"deletionPolicy": "Delete"})
    svc.tenant_changed("ADDED", listed)
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
    out = await svc.run_listed(listed, unless_in_flight=True)
    assert out is not None and out.ready
    await svc.delete(deleting(listed))
    assert role_count(stack, "tenant_queued") == 0
