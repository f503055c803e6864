"""One FeatureFlag nested thousands deep must not stop the operator from reconciling the others.

The CRD refuses such a value now (test_crd_validation.py), but an object stored before the bound
keeps its value: the API server does not re-validate stored objects, and validation ratcheting
lets an update that leaves the value alone through. So this test stores one the way it got there,
under a CRD without the bound, puts the real CRD back, and checks that the other flags are still
reconciled, through the watch and through the initial LIST after a restart.

Without safejson (k8s/safejson.py), Python's json raises RecursionError on the object: Kopf's
watch of FeatureFlags would end for good (and at every restart, in the initial LIST), and the
operator's own flag sweep would fail at every pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tenancy_devenv.stack import LocalStack

from .harness import GROUP, VERSION, Cluster, OperatorProcess, crd_schema_replaced, eventually

PLURAL = "featureflags"
CRD = f"{PLURAL}.{GROUP}"
VALUE_PATH = (
    "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/variants"
    "/additionalProperties/properties/value"
)
DEPTH = 3000
"""Far past Python's ~1000, well inside the API server's 10000."""


def featureflag(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {"name": name}, "spec": spec}


def deep_flag_manifest(name: str) -> str:
    """Written as text: json.dumps cannot write it either."""
    return (
        f'{{"apiVersion": "{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {{"name": "{name}"}}, '
        '"spec": {"variants": {"on": {"value": ' + "[" * DEPTH + "true" + "]" * DEPTH + '}, '
        '"off": {"value": false}}}}'
    )


@pytest.fixture
def unbounded_crd(stack: LocalStack) -> Iterator[None]:
    """The FeatureFlag CRD with variant values unbounded, as it was; the real one put back after."""
    with crd_schema_replaced(stack, CRD, VALUE_PATH, lambda _: {"x-kubernetes-preserve-unknown-fields": True}):
        yield


def ready(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.wait_condition(PLURAL, namespace, name, "Ready", "True", timeout=60)


def deep_flag_condition(stack: LocalStack, namespace: str, name: str) -> dict[str, Any]:
    """Read with kubectl: the Python client in this process could not decode the object."""
    out = stack.kubectl("get", "featureflag", name, "-n", namespace, "-o", "jsonpath={.status.conditions}").stdout
    conditions: list[dict[str, Any]] = json.loads(out or "[]")
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_a_flag_nested_thousands_deep_does_not_stop_the_others(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, unbounded_crd: None
) -> None:
    cluster.create(PLURAL, namespace, featureflag("before"))
    ready(cluster, namespace, "before")

    # Stored while the CRD had no bound (the CRD change takes a moment to reach the API server).
    def store_deep() -> bool:
        created = stack.kubectl("create", "-n", namespace, "-f", "-", input=deep_flag_manifest("deep"), check=False)
        assert created.returncode == 0, created.stderr
        return True

    eventually(store_deep, timeout=30, what="the deep flag stored under the unbounded CRD")

    # Through the watch: a new flag and an edit of an existing one are still reconciled.
    cluster.create(PLURAL, namespace, featureflag("after"))
    ready(cluster, namespace, "after")
    cluster.patch(PLURAL, namespace, "before", {"spec": {"enabled": False}})
    ready(cluster, namespace, "before")

    # The deep flag itself is reported, not published.
    def reported() -> dict[str, Any]:
        condition = deep_flag_condition(stack, namespace, "deep")
        assert (condition.get("status"), condition.get("reason")) == ("False", "InvalidSpec"), condition
        return condition

    eventually(reported, timeout=60, what="the deep flag reported InvalidSpec")

    # Through the initial LIST of a restarted operator, and its flag sweep.
    operator.stop()
    operator.start()
    cluster.create(PLURAL, namespace, featureflag("after-restart"))
    ready(cluster, namespace, "after-restart")
    cluster.patch(PLURAL, namespace, "after", {"spec": {"enabled": False}})
    ready(cluster, namespace, "after")
    assert "featureflag sweep failed" not in operator.log_text()
    assert "RecursionError" not in operator.log_text()
