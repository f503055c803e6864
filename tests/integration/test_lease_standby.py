"""Replicas on an API server that ignores shardSelector: a control plane of the module's own with
the feature gate ShardedListAndWatch off, as on Kubernetes before 1.36.

What a user checks: replicas configured to split the fleet into several slices refuse to start
there (exit code 3, the reason and the way out in the log) and touch nothing; with one slice
(TENANCY_SHARD_SLICES=1) they run active/standby: the replica holding the slice's Lease works on
every Tenant and Quota, the other waits, and when the working one is killed the other takes the
Lease once it expires and serves the old Tenants and new ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from .harness import eventually, own_stack, tenant
from .test_sharding import LEASE_SECONDS, SLICE, Fleet, quota

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    with own_stack(request, "standby", sharded_watch=False) as stack:
        fleet = Fleet(stack)
        try:
            yield fleet
        finally:
            for operator in fleet.replicas.values():
                with contextlib.suppress(Exception):
                    operator.stop()


def test_sharded_replicas_refuse_a_server_that_ignores_the_selector(fleet: Fleet) -> None:
    namespace = fleet.namespace("refused")
    fleet.cluster.create("tenants", namespace, tenant("untouched"))
    replica = fleet.start("sharded", slices=4, wait=False)
    assert replica.proc is not None
    assert replica.proc.wait(timeout=60) == 3
    log = replica.log_text()
    assert "refusing to run sharded" in log and "ignores shardSelector" in log, replica.log_tail()
    assert "TENANCY_SHARD_SLICES=1" in log  # the way out
    assert fleet.members() == set() and fleet.holders() == {}
    body = fleet.cluster.get("tenants", namespace, "untouched")
    assert not body["metadata"].get("finalizers")
    assert not (body.get("status") or {}).get("conditions")


def test_one_slice_runs_active_standby_and_the_standby_takes_over(fleet: Fleet) -> None:
    for identity in ("replica-a", "replica-b"):
        fleet.start(identity, slices=1)

    def one_works() -> str:
        holders = fleet.holders(1)
        assert list(holders) == [0], holders
        assert fleet.members() == {"replica-a", "replica-b"}
        for identity, replica in fleet.replicas.items():
            if identity in ("replica-a", "replica-b"):
                assert replica.metric("shard_slices_held") == (identity == holders[0]), identity
        return holders[0]

    active = eventually(one_works, timeout=60, interval=0.5, what="one replica holds the slice")
    standby = ({"replica-a", "replica-b"} - {active}).pop()
    cluster = fleet.cluster
    namespace = fleet.namespace("standby")
    cluster.create("tenants", namespace, tenant("before"))
    cluster.create("quotas", namespace, quota("before-limits", "before"))
    cluster.wait_condition("tenants", namespace, "before", timeout=90)
    fleet.assert_provisioned_by(namespace, "before", active)
    cluster.wait_condition("quotas", namespace, "before-limits", timeout=90)
    # Every Quota is the one holder's: no slice label is written.
    assert SLICE not in (cluster.get("quotas", namespace, "before-limits")["metadata"].get("labels") or {})

    fleet.replicas[active].kill()
    eventually(lambda: fleet.holders(1) == {0: standby}, timeout=LEASE_SECONDS * 4, interval=0.5,
               what=f"{standby} takes the slice")
    cluster.create("tenants", namespace, tenant("after"))
    cluster.wait_condition("tenants", namespace, "after", timeout=90)
    fleet.assert_provisioned_by(namespace, "after", standby)
    # The old Tenant's Quota is the new holder's now: a change of it is enforced by it.
    cluster.patch("quotas", namespace, "before-limits", {"spec": {"limits": {"connections": 3}}})

    def enforced() -> bool:
        body = cluster.get("quotas", namespace, "before-limits")
        assert (body.get("status") or {}).get("observedGeneration") == body["metadata"]["generation"], body
        return True

    eventually(enforced, timeout=60, interval=0.5, what="the new holder evaluates the changed Quota")
    cluster.wait_condition("tenants", namespace, "before", timeout=30)
