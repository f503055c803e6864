"""Events as `kubectl get events` shows them, from the operator process on the real API server: a
warning that repeats is one Event with a count (as client-go's recorder aggregates), and every
Event names the operator and the pod that posted it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .harness import GROUP, VERSION, Cluster, OperatorProcess, eventually

PLURAL = "featureflags"
POD = "tenancy-operator-6d8f7c9b5-q2x7z"


@pytest.fixture(scope="module")
def pod_named(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session's operator, restarted with POD_NAME as the chart's Downward API sets it."""
    operator.stop()
    operator.extra_env["POD_NAME"] = POD
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
        operator.extra_env.pop("POD_NAME", None)
        operator.start()


def featureflag(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {"name": name}, "spec": spec}


def set_enabled(cluster: Cluster, namespace: str, name: str, enabled: bool) -> None:
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                  {"spec": {"enabled": enabled}})
    cluster.wait_condition(PLURAL, namespace, name)  # this generation is reconciled


def events(cluster: Cluster, namespace: str, name: str, reason: str) -> list[Any]:
    found = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in found if e.reason == reason]


def test_a_repeated_warning_is_one_event_with_a_count(
    pod_named: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, featureflag("checkout", rollout={"variant": "on", "percentage": 20}))
    cluster.wait_condition(PLURAL, namespace, "checkout")
    # Throw the kill switch, release it, throw it again: the same Warning twice.
    set_enabled(cluster, namespace, "checkout", False)
    eventually(lambda: len(events(cluster, namespace, "checkout", "KillSwitchThrown")) == 1, timeout=30,
               what="the first KillSwitchThrown")
    set_enabled(cluster, namespace, "checkout", True)
    eventually(lambda: events(cluster, namespace, "checkout", "KillSwitchReleased"), timeout=30,
               what="KillSwitchReleased")
    set_enabled(cluster, namespace, "checkout", False)

    def counted_twice() -> Any:
        found = events(cluster, namespace, "checkout", "KillSwitchThrown")
        assert len(found) == 1, f"{len(found)} KillSwitchThrown Events, not one with a count"
        assert found[0].count == 2, found[0].count
        return found[0]

    event = eventually(counted_twice, timeout=30, what="the second KillSwitchThrown counted on the first Event")
    assert event.type == "Warning"
    assert event.series is not None and event.series.count == 2
    assert event.series.last_observed_time >= event.first_timestamp
    assert event.last_timestamp >= event.first_timestamp
    assert event.reporting_component == "tenancy-operator"
    assert event.reporting_instance == POD
    assert event.involved_object.kind == "FeatureFlag" and event.involved_object.name == "checkout"
    # Another event of the same object stays its own Event.
    (released,) = events(cluster, namespace, "checkout", "KillSwitchReleased")
    assert released.count == 1 and released.reporting_instance == POD
