"""Placement: required labels against a target's labels, and the operator's setting of them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tenancy_operator.api.tenant import TenantSpec, placement_violations
from tenancy_operator.config import Settings


def test_violations_name_what_is_missing_or_different() -> None:
    assert placement_violations({"residency": "eu"}, {"residency": "eu", "disk": "ssd"}) == []
    assert placement_violations({"residency": "eu", "disk": "ssd"}, {"residency": "us"}) == [
        "disk=ssd", "residency=eu"]
    assert placement_violations({}, {}) == []


def test_target_labels_setting() -> None:
    settings = Settings(database_target_labels='{"eu-1": {"residency": "eu"}}')
    assert settings.target_labels == {"eu-1": {"residency": "eu"}}
    assert Settings().target_labels == {}
    for bad in ('{"eu-1": "eu"}', "[1]", "{nope", '{"eu-1": {"residency": 1}}'):
        with pytest.raises(ValueError, match="TENANCY_DATABASE_TARGET_LABELS"):
            Settings(database_target_labels=bad)


def test_placement_keys_and_values_are_bounded() -> None:
    assert TenantSpec.model_validate({"placement": {"requiredLabels": {"residency": "eu"}}}).placement
    for bad in ({"Bad Key": "eu"}, {"residency": "e u"}, {f"k{i}": "v" for i in range(17)}):
        with pytest.raises(ValidationError):
            TenantSpec.model_validate({"placement": {"requiredLabels": bad}})
