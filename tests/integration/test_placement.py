"""Placement: a Tenant's spec.placement.requiredLabels against the labels of its database target
(the session operator runs with default = residency eu, disk ssd; second = residency us)."""

from __future__ import annotations

import json

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, eventually, sql_value, tenant

PLURAL = "tenants"


def test_a_tenant_is_placed_only_on_a_target_with_its_required_labels(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("resident", placement={"requiredLabels": {"residency": "eu"}}))
    cluster.create(PLURAL, namespace, tenant("emigrant", database="second",
                                             placement={"requiredLabels": {"residency": "eu", "disk": "ssd"}}))
    cluster.wait_condition(PLURAL, namespace, "resident")
    found = cluster.wait_condition(PLURAL, namespace, "emigrant", status="False", reason="PlacementViolation")
    message = next(c for c in found["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "'second'" in message and "disk=ssd, residency=eu" in message
    assert cluster.condition(PLURAL, namespace, "emigrant", "Stalled")["status"] == "True"
    # Nothing of it on the target it may not use: no role, no schema, no registry row, no Secret.
    admin = stack.admin_dsn("second")
    assert sql_value(admin, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tenant_emigrant%'") == 0
    assert sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_emigrant'") == 0
    assert sql_value(admin, "SELECT count(*) FROM tenancy.tenants WHERE namespace = %s AND name = 'emigrant'",
                     [namespace]) == 0
    assert stack.kubectl("get", "secret", "emigrant-db", "-n", namespace, check=False).returncode != 0

    # Requirements the target meets: placed.
    cluster.patch(PLURAL, namespace, "emigrant",
                  {"spec": {"placement": {"requiredLabels": {"residency": "us", "disk": None}}}})
    cluster.wait_condition(PLURAL, namespace, "emigrant")
    assert eventually(lambda: sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_emigrant'")
                      == 1)


def test_placement_labels_are_checked_at_apply(stack: LocalStack, namespace: str) -> None:
    bad = tenant("misfiled", placement={"requiredLabels": {"Not A Key": "eu"}})
    result = stack.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0 and "every key must match" in result.stderr, result.stderr
    too_many = tenant("misfiled", placement={"requiredLabels": {f"k{i}": "v" for i in range(17)}})
    result = stack.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(too_many), check=False)
    assert result.returncode != 0 and "must have at most 16 items" in result.stderr, result.stderr
