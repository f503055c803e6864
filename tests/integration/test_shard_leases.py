"""A sharded replica's Leases against the real API server: renewed while the operator is busy.

While Kopf works, the operator's event loop can be held for seconds at a time (a restart or a
hand-over resumes thousands of objects at once). A replica whose Leases go unrenewed for a lease
time is counted dead by its peers, which take its slices while it still works on them. What a user
sees: `kubectl get lease` shows the replica's member Lease renewed all along.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from kubernetes import client

from tenancy_devenv.stack import LocalStack
from tenancy_operator.k8s.client import Kube
from tenancy_operator.sharding import ShardCoordinator
from tenancy_operator.shards import Ownership, Slices

from .harness import Cluster, gateway

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

LEASE_SECONDS = 3
HOLD_SECONDS = 3 * LEASE_SECONDS
"""How long the work holds the event loop: three lease times."""


async def test_leases_are_renewed_while_the_work_holds_the_event_loop(stack: LocalStack) -> None:
    coordination = client.CoordinationV1Api(Cluster(stack.kubeconfig).api)

    async def connect() -> Kube:
        return await gateway(stack)

    kube = await connect()
    coordinator = ShardCoordinator(kube, "default", "keeper-test", "replica-busy", Slices(2), LEASE_SECONDS,
                                   connect=connect)
    renewals: set[str] = set()

    async def work(ownership: Ownership, stop: asyncio.Event) -> None:
        assert ownership.held == frozenset({0, 1})
        # CPU-bound work of many objects, holding the loop: renewals must not wait for it.
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:
            lease = coordination.read_namespaced_lease(coordinator.member_name, "default")
            renewals.add(str(lease.spec.renew_time))
            time.sleep(0.2)
        coordinator.terminating.set()

    try:
        await asyncio.wait_for(coordinator.serve(work), timeout=120)
    finally:
        await kube.close()
    # A renewal every lease/3: about 9 in three lease times; without them the Lease stays as the
    # work found it (one value), and the peers would count this replica dead after one lease time.
    assert len(renewals) >= HOLD_SECONDS // LEASE_SECONDS + 1, sorted(renewals)
    leases = coordination.list_namespaced_lease("default", label_selector="tenancy.dev/shard-group=keeper-test")
    assert not [lease.metadata.name for lease in leases.items if lease.spec.holder_identity], \
        "a replica that left holds nothing"


async def test_a_leaving_replica_releases_slices_renewed_behind_its_back(stack: LocalStack) -> None:
    """The renewal thread stops when the work ends. A renewal it sent just then can be written
    without its answer being read, so the replica's copy of the Lease is older than the Lease. It
    must still release its slices when it leaves, or its peers wait a lease time to take them."""
    coordination = client.CoordinationV1Api(Cluster(stack.kubeconfig).api)

    async def connect() -> Kube:
        return await gateway(stack)

    kube = await connect()
    # Long Leases: the renewal thread renews once at the start and not again while this runs.
    coordinator = ShardCoordinator(kube, "default", "release-test", "replica-leaving", Slices(2), 60,
                                   connect=connect)

    async def work(ownership: Ownership, stop: asyncio.Event) -> None:
        taken = {i: coordinator.held[i]["metadata"]["resourceVersion"] for i in ownership.held}
        deadline = time.monotonic() + 30
        while any(coordinator.held[i]["metadata"]["resourceVersion"] == rv for i, rv in taken.items()):
            assert time.monotonic() < deadline, "the renewal thread renewed the slices"
            await asyncio.sleep(0.05)
        for index in ownership.held:  # a renewal whose answer was never read
            lease = coordination.read_namespaced_lease(coordinator.slice_name(index), "default")
            lease.spec.renew_time = datetime.now(UTC)
            coordination.replace_namespaced_lease(coordinator.slice_name(index), "default", lease)
        coordinator.terminating.set()

    try:
        await asyncio.wait_for(coordinator.serve(work), timeout=120)
    finally:
        await kube.close()
    leases = coordination.list_namespaced_lease("default", label_selector="tenancy.dev/shard-group=release-test")
    assert len(leases.items) == 2
    assert not [lease.metadata.name for lease in leases.items if lease.spec.holder_identity], \
        "a replica that left holds nothing"
