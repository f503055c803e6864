"""A Tenant whose archiveRetention is out of range must not stop the drift sweep for everyone.

The CRD refuses such a value now (test_crd_validation.py); one stored before the bound keeps it.
Before, `1000000000d` raised OverflowError (not even a validation error) where the sweep parses
every Tenant, so every sweep pass failed: drift of any other tenant was never repaired.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tenancy_devenv.stack import LocalStack

from .harness import GROUP, Cluster, OperatorProcess, crd_schema_replaced, dba_execute, eventually, sql_value, tenant

PLURAL = "tenants"
CRD = f"{PLURAL}.{GROUP}"
RETENTION_PATH = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/archiveRetention"
FINALIZER = "tenancy.dev/finalizer"


@pytest.fixture
def unbounded_retention(stack: LocalStack) -> Iterator[None]:
    """The Tenant CRD with archiveRetention checked by its pattern only, as it was; the real one
    put back after."""
    def pattern_only(node: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in node.items() if k not in ("x-kubernetes-validations", "maxLength")}

    with crd_schema_replaced(stack, CRD, RETENTION_PATH, pattern_only):
        yield


def test_out_of_range_retention_does_not_stop_the_sweep_for_others(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, unbounded_retention: None
) -> None:
    cluster.create(PLURAL, namespace, tenant("bystander"))
    cluster.wait_condition(PLURAL, namespace, "bystander")

    def store_legacy() -> bool:
        manifest = json.dumps(tenant("legacy", archiveRetention="1000000000d"))
        created = stack.kubectl("create", "-n", namespace, "-f", "-", input=manifest, check=False)
        assert created.returncode == 0, created.stderr
        return True

    eventually(store_legacy, timeout=30, what="the Tenant stored under the CRD without the bound")
    # The sweep looks only at Tenants the operator has taken on (finalizer set).
    eventually(lambda: FINALIZER in (cluster.get(PLURAL, namespace, "legacy")["metadata"].get("finalizers") or []),
               timeout=30, what="the operator took on the legacy Tenant")

    # Drift only the sweep finds: the tenant role's search_path changed in the catalog.
    dba_execute(stack.admin_dsn(), "ALTER ROLE tenant_bystander SET search_path = public")
    repaired = "SELECT 'search_path=tenant_bystander' = ANY(rolconfig) FROM pg_roles WHERE rolname = 'tenant_bystander'"
    eventually(lambda: sql_value(stack.admin_dsn(), repaired) is True, timeout=60, what="bystander's drift repaired")
    # The Tenant sweep's own failure line (not another service's, e.g. the flag sweep's on a passing 429).
    assert '"event": "sweep failed"' not in operator.log_text()
