"""Stepped FeatureFlag rollouts against the real API server, both PostgreSQL targets, the operator
process and a real Prometheus that scrapes a small exporter the test drives: a rollout that
advances to the end, one that a breached gate rolls back (the namespace's other flags untouched),
a hand edit that pauses the steps, pause and resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tenancy_devenv.stack import LocalStack

from .harness import GROUP, VERSION, Cluster, OperatorProcess, eventually
from .prom import SERIES
from .test_featureflag import changes, featureflag, patch, stored

PLURAL = "featureflags"


def gated(flag: str, steps: list[int], interval: str, **extra: Any) -> dict[str, Any]:
    return {"variant": "on", "steps": steps, "stepInterval": interval,
            "gate": {"query": f'max({SERIES}{{flag="{flag}"}})', "max": 0.05}, **extra}


def rollout_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return (cluster.get(PLURAL, namespace, name).get("status") or {}).get("rollout") or {}


def served(stack: LocalStack, namespace: str, key: str) -> set[int | None]:
    """The rollout percentage the rows of each database target hold."""
    found = [stored(stack, namespace, key, t)[0] for t in ("default", "second")]
    return {f.rollout.percentage if f is not None and f.rollout is not None else None for f in found}


def flagd_percentage(cluster: Cluster, namespace: str, name: str) -> int:
    """The share of users flagd gives `on`, from the flag's ConfigMap."""
    cm = cluster.core.read_namespaced_config_map(f"{name}-flagd", namespace)
    flag = json.loads(cm.data["flagd.json"])["flags"][name]
    return dict(_fractions(flag.get("targeting"))).get("on", 0)


def _fractions(node: Any) -> list[tuple[str, int]]:
    if isinstance(node, dict):
        if "fractional" in node:
            return [(str(v), int(w)) for v, w in (x for x in node["fractional"] if isinstance(x, list))]
        for child in node.values():
            found = _fractions(child)
            if found:
                return found
    if isinstance(node, list):
        for child in node:
            found = _fractions(child)
            if found:
                return found
    return []


def resume(cluster: Cluster, namespace: str, name: str, value: str) -> None:
    """What `kubectl annotate featureflag NAME tenancy.dev/resume-rollout=VALUE --overwrite` does."""
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"annotations": {"tenancy.dev/resume-rollout": value}}},
        _content_type="application/merge-patch+json")


def wait_rollout(cluster: Cluster, namespace: str, name: str, field: str, value: str) -> dict[str, Any]:
    """status.rollout once its `field` is `value`."""
    def check() -> dict[str, Any]:
        state = rollout_status(cluster, namespace, name)
        assert state.get(field) == value, state
        return state
    return eventually(check, timeout=60, what=f"{name}: status.rollout.{field} = {value}")


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in cluster.events(namespace, name)]


def test_a_rollout_advances_through_its_steps_while_the_gate_holds(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, gate: Callable[[str, float], None]
) -> None:
    gate("advancing", 0.01)
    cluster.create(PLURAL, namespace, featureflag("advancing", rollout=gated("advancing", [10, 50, 100], "2s")))
    seen: list[int] = []

    def completed() -> bool:
        state = rollout_status(cluster, namespace, "advancing")
        if state.get("percentage") is not None and (not seen or seen[-1] != state["percentage"]):
            seen.append(state["percentage"])
        assert state.get("phase") == "Completed", state
        return True

    eventually(completed, timeout=90, what="the rollout completed")
    state = rollout_status(cluster, namespace, "advancing")
    assert state["percentage"] == 100 and state["step"] == 3 and state["reason"] == "AllStepsServed"
    assert state["gateValue"] == 0.01
    assert seen == sorted(seen) and seen[-1] == 100, seen  # only ever up
    # What users get: every target's rows and flagd's document say 100 %.
    assert served(stack, namespace, "advancing") == {100}
    assert flagd_percentage(cluster, namespace, "advancing") == 100
    # The audit trail names the operator for each step it took, with why.
    steps = [c for c in changes(stack, namespace, "advancing") if c["operation"] == "rollout"]
    assert [c["change"][0]["new"] for c in steps] == [50, 100]
    assert all(c["changed_by"].startswith("tenancy-operator (rollout: step") for c in steps)
    eventually(lambda: {"RolloutStarted", "RolloutStepped", "RolloutCompleted"} <= set(reasons(cluster, namespace,
                                                                                                   "advancing")),
               timeout=30, what="the rollout's Events")
    assert operator.metric("feature_flag_rollout_transitions_total", transition="RolloutCompleted") >= 1


def test_a_breached_gate_rolls_the_flag_back_and_stops_it(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, gate: Callable[[str, float], None]
) -> None:
    gate("breaching", 0.0)
    # A bystander in the same namespace: a plain percentage rollout, and its namespace source entry.
    cluster.create(PLURAL, namespace, featureflag("bystander", rollout={"variant": "on", "percentage": 30}))
    cluster.create(PLURAL, namespace, featureflag("breaching", rollout=gated("breaching", [20, 40, 100], "1h")))
    cluster.wait_condition(PLURAL, namespace, "breaching")
    assert rollout_status(cluster, namespace, "breaching")["percentage"] == 20
    eventually(lambda: served(stack, namespace, "breaching") == {20}, timeout=30, what="20 % written")

    gate("breaching", 0.5)
    state = wait_rollout(cluster, namespace, "breaching", "phase", "RolledBack")
    assert (state["percentage"], state["reason"], state["gateValue"]) == (0, "GateBreached", 0.5)
    assert "value 0.5 > max 0.05" in state["message"] and "nextStepAt" not in state
    eventually(lambda: served(stack, namespace, "breaching") == {0}, timeout=30, what="0 % written")
    assert flagd_percentage(cluster, namespace, "breaching") == 0
    rollback = [c for c in changes(stack, namespace, "breaching") if c["operation"] == "rollout"]
    assert len(rollback) == 1 and "gate breached (0.5 > 0.05)" in rollback[0]["changed_by"]
    eventually(lambda: "RolloutRolledBack" in reasons(cluster, namespace, "breaching"), timeout=30,
               what="a RolloutRolledBack Event")
    warning = [e for e in cluster.events(namespace, "breaching") if e["reason"] == "RolloutRolledBack"]
    assert warning[0]["type"] == "Warning"
    # The rest of the namespace keeps serving what it declared.
    assert served(stack, namespace, "bystander") == {30}
    source = json.loads(cluster.core.read_namespaced_config_map("tenancy-flagd-source", namespace)
                        .data["flagd.json"])["flags"]
    assert dict(_fractions(source["bystander"].get("targeting"))).get("on") == 30
    assert dict(_fractions(source["breaching"].get("targeting"))).get("on", 0) == 0

    # Healthy again, it stays rolled back: a person resumes it.
    gate("breaching", 0.0)
    assert rollout_status(cluster, namespace, "breaching")["phase"] == "RolledBack"
    resume(cluster, namespace, "breaching", "after-the-fix")
    state = wait_rollout(cluster, namespace, "breaching", "phase", "Progressing")
    assert (state["percentage"], state["resumedBy"]) == (20, "after-the-fix")
    eventually(lambda: served(stack, namespace, "breaching") == {20}, timeout=30, what="20 % written again")


def test_a_hand_edit_wins_and_pause_holds_the_step(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, gate: Callable[[str, float], None]
) -> None:
    cluster.create(PLURAL, namespace, featureflag("handheld", rollout=gated("handheld-absent", [5, 25, 100], "1s")))
    # A gate with no series: no proof of health, so the first step is held and the status says why.
    state = wait_rollout(cluster, namespace, "handheld", "reason", "GateWaiting")
    assert state["percentage"] == 5 and "returned 0 series" in state["message"]

    patch(cluster, namespace, "handheld", {"rollout": {"percentage": 70}}, manager="oncall")
    assert wait_rollout(cluster, namespace, "handheld", "reason", "HandEdited")["percentage"] == 70
    eventually(lambda: served(stack, namespace, "handheld") == {70}, timeout=30, what="70 % written")
    edit = changes(stack, namespace, "handheld")[-1]
    assert (edit["operation"], edit["changed_by"]) == ("update", "oncall")  # the person's change, audited as theirs

    # Paused, then resumed at once: the two may be decided apart (a handler and a recheck), and the
    # status settles on the resume recorded and the rollout held, never a mix of the two decisions.
    patch(cluster, namespace, "handheld", {"rollout": {"paused": True}}, manager="oncall")
    resume(cluster, namespace, "handheld", "1")

    def held() -> dict[str, Any]:
        state = rollout_status(cluster, namespace, "handheld")
        assert (state.get("phase"), state.get("reason"), state.get("percentage"), state.get("baseline"),
                state.get("resumedBy")) == ("Paused", "PausedBySpec", 70, 70, "1"), state
        return state
    eventually(held, timeout=60, what="handheld: held by spec.rollout.paused, the resume recorded")
