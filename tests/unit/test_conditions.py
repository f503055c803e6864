"""The Ready/Reconciling/Stalled conditions every kind reports."""

from __future__ import annotations

from tenancy_operator.conditions import merge, readiness


def types(conds: list[dict[str, str]]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in conds}


def test_ready_drops_reconciling_and_stalled() -> None:
    old = merge(None, readiness(False, True, "MigrationFailed", "boom")[0], 1)
    conds, drop = readiness(True, False, "Provisioned", "tenant is Active")
    assert types(merge(old, conds, 2, drop=drop)) == {"Ready": "True"}


def test_stalled_is_not_reconciling() -> None:
    old = merge(None, readiness(False, False, "DatabaseUnavailable", "down")[0], 1)
    assert types(old) == {"Ready": "False", "Reconciling": "True"}
    conds, drop = readiness(False, True, "MigrationFailed", "boom")
    assert types(merge(old, conds, 1, drop=drop)) == {"Ready": "False", "Stalled": "True"}


def test_retrying_is_not_stalled() -> None:
    old = merge(None, readiness(False, True, "MigrationFailed", "boom")[0], 1)
    conds, drop = readiness(False, False, "DatabaseUnavailable", "down")
    merged = merge(old, conds, 1, drop=drop)
    assert types(merged) == {"Ready": "False", "Reconciling": "True"}
    assert next(c for c in merged if c["type"] == "Reconciling")["reason"] == "Retrying"


def test_status_patch_writes_only_what_differs_and_nulls_dropped_map_entries() -> None:
    from tenancy_operator.conditions import status_patch

    current = {"observedGeneration": 3, "variantShares": {"on": 0.25, "off": 0.75},
               "credentials": {"user": "a", "retiringUser": "b"}, "effectiveLimits": {"storage": "1Gi"}}
    desired = {"observedGeneration": 4, "variantShares": {"off": 1},
               "credentials": {"user": "a", "retiringUser": None}}
    assert status_patch(current, desired) == {
        "observedGeneration": 4,
        "variantShares": {"off": 1, "on": None},  # a merge patch keeps map entries it does not null
        "credentials": {"retiringUser": None},
    }  # effectiveLimits is not this writer's: left alone
    assert not status_patch(current, {"credentials": {"user": "a", "retiringUser": "b"}})
    assert not status_patch({"credentials": {"user": "a"}}, {"credentials": {"user": "a", "retiringUser": None}})
