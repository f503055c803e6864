"""Which of a sweep's LISTed Tenants its reconcile must still take: one the watch has shown Ready
since, at the same generation, was done by its own handler meanwhile."""

from __future__ import annotations

from typing import Any

from tenancy_operator.runtime_context import slim_tenant
from tenancy_operator.sweep import left_to_handler, ready_since_listed


def tenant(*, uid: str = "u1", generation: int = 1, ready: bool, observed: int | None = 1) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Active" if ready else "Provisioning", "conditions": [
        {"type": "Ready", "status": "True" if ready else "False", "reason": "Provisioned" if ready else "Provisioning"},
    ]}
    if observed is not None:
        status["observedGeneration"] = observed
    return {"apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "namespace": "ns", "uid": uid, "generation": generation,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"database": "default"}, "status": status}


LISTED = tenant(ready=False, observed=None)


def test_a_tenant_made_ready_since_the_list_is_left_to_its_handler() -> None:
    # As the Tenant cache holds it (slim_tenant): observedGeneration must survive the slimming.
    assert ready_since_listed(LISTED, slim_tenant(tenant(ready=True)))


def test_still_not_ready_is_reconciled() -> None:
    assert not ready_since_listed(LISTED, slim_tenant(tenant(ready=False)))
    assert not ready_since_listed(LISTED, None)


def test_ready_for_an_older_generation_or_another_object_is_not_enough() -> None:
    edited = tenant(generation=2, ready=False, observed=None)
    assert not ready_since_listed(edited, slim_tenant(tenant(generation=2, ready=True, observed=1)))
    assert not ready_since_listed(LISTED, slim_tenant(tenant(uid="u2", ready=True)))


def test_listed_before_its_secret_existed_and_ready_since_is_left_to_its_handler() -> None:
    """In a mass creation the sweep lists most Tenants before their reconcile made the Secret: one
    the watch has shown Ready since was done, Secret included, and is not reconciled again."""
    assert left_to_handler(LISTED, slim_tenant(tenant(ready=True)))
    assert not left_to_handler(LISTED, slim_tenant(tenant(ready=False)))


def test_listed_ready_without_its_secret_is_drift_and_reconciled() -> None:
    ready = tenant(ready=True)
    assert not left_to_handler(ready, slim_tenant(ready))
