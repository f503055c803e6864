"""The API models parse what the API server stores, apply the documented defaults, and the pure
helpers (tenant identifiers, durations, quantities) behave."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tenancy_operator.api import (
    FEATURE_FLAG,
    QUOTA,
    RESOURCES,
    SCHEMA_ROLLOUT,
    TENANT,
    TENANT_ARCHIVE,
    Condition,
    FeatureFlag,
    FeatureFlagSpec,
    FeatureFlagStatus,
    JobRef,
    Quota,
    QuotaSpec,
    QuotaStatus,
    Tenant,
    TenantSpec,
    TenantStatus,
    find_condition,
    format_quantity,
    parse_duration,
    parse_quantity,
    tenant_identifier,
    validate_tenant_name,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def example(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
                return dict(doc)
    raise LookupError(f"no example {kind}/{name}")


# --- Resource names ------------------------------------------------------------------------------


def test_resource_infos() -> None:
    assert [r.kind for r in RESOURCES] == ["Tenant", "Quota", "FeatureFlag", "SchemaRollout", "TenantArchive"]
    assert TENANT.api_version == "tenancy.dev/v1alpha1"
    assert (TENANT.plural, TENANT.singular, TENANT.short_names) == ("tenants", "tenant", ("tn",))
    assert (QUOTA.plural, QUOTA.short_names) == ("quotas", ("tq",))
    assert (FEATURE_FLAG.plural, FEATURE_FLAG.short_names, FEATURE_FLAG.crd_name) == (
        "featureflags",
        ("ff",),
        "featureflags.tenancy.dev",
    )
    assert (SCHEMA_ROLLOUT.plural, SCHEMA_ROLLOUT.short_names) == ("schemarollouts", ("sro",))
    assert (TENANT_ARCHIVE.plural, TENANT_ARCHIVE.short_names) == ("tenantarchives", ("tarc",))
    assert all(r.categories == ("tenancy",) for r in RESOURCES)


# --- Tenant -------------------------------------------------------------------------------------


def test_tenant_defaults() -> None:
    spec = TenantSpec()
    assert spec.tier == "free"
    assert spec.state == "Active"
    assert spec.database == "default"
    assert spec.deletion_policy == "Retain"
    assert spec.archive_retention == "30d"
    assert spec.display_name is None
    assert spec.restore_from is None
    assert spec.schema_template is None


def test_tenant_example_parses() -> None:
    tenant = Tenant.model_validate(example("Tenant", "acme-corp"))
    assert tenant.metadata.name == "acme-corp"
    assert tenant.spec.tier == "professional"
    assert tenant.spec.deletion_policy == "Archive"
    assert parse_duration(tenant.spec.archive_retention) == timedelta(days=90)
    assert tenant.status is None


def test_tenant_accepts_python_names_and_dumps_camel_case() -> None:
    spec = TenantSpec(display_name="Acme", schema_template="acme-sql", restore_from="latest")
    assert spec.to_api() == {
        "displayName": "Acme",
        "tier": "free",
        "state": "Active",
        "database": "default",
        "schemaTemplate": "acme-sql",
        "deletionPolicy": "Retain",
        "archiveRetention": "30d",
        "restoreFrom": "latest",
        "credentials": {"gracePeriod": "5m", "readOnlyLogin": False},
        "moveGracePeriod": "7d",
    }


def test_tenant_status_schema_alias() -> None:
    status = TenantStatus.model_validate(
        {
            "observedGeneration": 3,
            "phase": "Active",
            "schema": "tenant_acme_corp",
            "schemaVersion": "0003",
            "effectiveLimits": {"connections": "20"},
            "currentJob": {"id": "j1", "kind": "Migrate", "state": "Running", "attempt": 2},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Provisioned",
                    "lastTransitionTime": "2026-11-22T10:00:00Z",
                }
            ],
            "somethingNewer": "ignored",
        }
    )
    assert status.schema_name == "tenant_acme_corp"
    assert status.current_job == JobRef(id="j1", kind="Migrate", state="Running", attempt=2)
    ready = find_condition(status.conditions, "Ready")
    assert ready is not None
    assert ready.status == "True"
    assert find_condition(status.conditions, "Stalled") is None
    dumped = status.to_api()
    assert dumped["schema"] == "tenant_acme_corp"
    assert dumped["conditions"][0]["lastTransitionTime"] == "2026-11-22T10:00:00Z"
    assert "schemaName" not in dumped
    assert "somethingNewer" not in dumped


def test_tenant_status_limits_recent_jobs() -> None:
    jobs = [{"id": str(i), "kind": "Migrate", "state": "Succeeded"} for i in range(11)]
    with pytest.raises(ValidationError, match="at most 10"):
        TenantStatus.model_validate({"recentJobs": jobs})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tier", "gold"),
        ("database", "Has-Upper"),
        ("database", "x" * 64),
        ("restoreFrom", "not/allowed"),
        ("archiveRetention", "30 days"),
        ("schemaTemplate", "Bad_Name"),
        ("displayName", "x" * 257),
    ],
)
def test_tenant_spec_rejects(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        TenantSpec.model_validate({field: value})


def test_condition_reason_pattern() -> None:
    base = {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-22T10:00:00Z"}
    assert Condition.model_validate({**base, "reason": "Provisioned"}).message == ""
    for bad in ("has space", "1Starts", "Ends,"):
        with pytest.raises(ValidationError):
            Condition.model_validate({**base, "reason": bad})
    with pytest.raises(ValidationError):
        Condition.model_validate({**base, "reason": "X", "status": "Maybe"})


@pytest.mark.parametrize(
    ("name", "identifier"),
    [("acme-corp", "tenant_acme_corp"), ("globex", "tenant_globex"), ("a", "tenant_a"), ("a1-b2", "tenant_a1_b2")],
)
def test_tenant_identifier_examples(name: str, identifier: str) -> None:
    assert tenant_identifier(name) == identifier


@pytest.mark.parametrize("name", ["", "Acme", "acme_corp", "acme.corp", "-acme", "acme-", "1acme", "a" * 57, "acmé"])
def test_tenant_identifier_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="tenant name"):
        tenant_identifier(name)


def test_tenant_identifier_longest_name_fits() -> None:
    assert len(tenant_identifier("a" * 56).encode()) == 63


valid_tenant_names = st.from_regex(r"\A[a-z]([a-z0-9-]{0,54}[a-z0-9])?\Z")


@given(valid_tenant_names)
def test_tenant_identifier_is_a_short_plain_identifier(name: str) -> None:
    assert validate_tenant_name(name) == name
    identifier = tenant_identifier(name)
    assert len(identifier.encode()) <= 63
    assert re.fullmatch(r"[a-z_][a-z0-9_]*", identifier)
    assert identifier == tenant_identifier(name)


@given(valid_tenant_names, valid_tenant_names)
def test_tenant_identifier_is_injective(a: str, b: str) -> None:
    assert (tenant_identifier(a) == tenant_identifier(b)) == (a == b)


# --- Quota --------------------------------------------------------------------------------------


def test_quota_example_parses() -> None:
    quota = Quota.model_validate(example("Quota", "acme-corp"))
    assert quota.spec.tenant_ref.name == "acme-corp"
    assert quota.spec.limits.connections == 20
    assert parse_quantity(quota.spec.limits.storage or "") == 10 * 2**30
    assert quota.spec.enforcement.storage == "BlockWrites"
    [override] = quota.spec.overrides
    assert (override.limit, override.value) == ("connections", 50)
    assert override.expires_at == datetime(2030, 1, 1, tzinfo=UTC)


def test_quota_defaults() -> None:
    spec = QuotaSpec.model_validate({"tenantRef": {"name": "acme"}})
    assert spec.enforcement.storage == "Warn"
    assert spec.limits.as_strings() == {}
    assert spec.overrides == []


@pytest.mark.parametrize(
    "limits",
    [
        {"connections": 0},
        {"connections": -1},
        {"burst": 0},
        {"requestsPerSecond": -5},
        {"concurrentJobs": 0},
        {"storage": "0Gi"},
        {"storage": "-1Gi"},
        {"storage": "10GB"},
        {"statementTimeout": "0s"},
        {"statementTimeout": "30"},
    ],
)
def test_quota_rejects_non_positive_or_malformed_limits(limits: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        QuotaSpec.model_validate({"tenantRef": {"name": "acme"}, "limits": limits})


def override(limit: str, value: int | str, expires: str = "2030-01-01T00:00:00Z") -> dict[str, Any]:
    return {"limit": limit, "value": value, "expiresAt": expires}


@pytest.mark.parametrize(
    "bad",
    [
        {"limit": "connections", "value": 5},  # no expiresAt
        override("cpu", 5),
        override("connections", 0),
        override("connections", "5"),
        override("storage", "0"),
        override("storage", -1),
        override("statementTimeout", 30),
        override("connections", 5, "2030-01-01T00:00:00"),  # no time zone
    ],
)
def test_quota_rejects_bad_overrides(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        QuotaSpec.model_validate({"tenantRef": {"name": "acme"}, "overrides": [bad]})


def test_quota_override_value_forms() -> None:
    spec = QuotaSpec.model_validate(
        {
            "tenantRef": {"name": "acme"},
            "overrides": [
                override("storage", "20Gi"),
                override("storage", 1024, "2029-01-01T00:00:00Z"),
                override("statementTimeout", "1m30s"),
                override("burst", 7),
            ],
        }
    )
    assert [o.value for o in spec.overrides] == ["20Gi", 1024, "1m30s", 7]


def test_quota_active_overrides_earliest_expiry_wins() -> None:
    spec = QuotaSpec.model_validate(
        {
            "tenantRef": {"name": "acme"},
            "limits": {"connections": 20, "storage": "10Gi"},
            "overrides": [
                override("connections", 50, "2026-12-31T00:00:00Z"),
                override("connections", 100, "2026-11-23T00:00:00Z"),
                override("storage", "20Gi", "2026-11-01T00:00:00Z"),  # expired
            ],
        }
    )
    active = spec.active_overrides(NOW)
    assert {limit: o.value for limit, o in active.items()} == {"connections": 100}
    assert spec.effective_limits(NOW) == {"storage": "10Gi", "connections": "100"}
    later = NOW + timedelta(days=2)
    assert spec.effective_limits(later) == {"storage": "10Gi", "connections": "50"}
    assert spec.effective_limits(later + timedelta(days=60)) == {"storage": "10Gi", "connections": "20"}


def test_quota_status_round_trip() -> None:
    raw = {
        "observedGeneration": 2,
        "hard": {"storage": "10Gi", "connections": "20"},
        "used": {"storage": "1Gi", "connections": "3"},
        "usageRatio": {"storage": 0.1, "connections": 0.15},
        "activeOverrides": [override("connections", 50) | {"reason": "migration"}],
        "lastMeasuredAt": "2026-11-22T12:00:00Z",
        "conditions": [],
    }
    assert QuotaStatus.model_validate(raw).to_api() == raw


# --- FeatureFlag --------------------------------------------------------------------------------


def test_featureflag_defaults() -> None:
    spec = FeatureFlagSpec()
    assert spec.enabled is True
    assert spec.variant_values() == {"on": True, "off": False}
    assert spec.default_variant == "off"
    assert spec.rollout is None
    assert spec.tenants == []
    assert spec.users == []
    assert spec.effective_key("new-dashboard") == "new-dashboard"
    assert FeatureFlagSpec(key="dash").effective_key("new-dashboard") == "dash"
    assert spec.rollout_variant() == "on"


def test_featureflag_example_parses() -> None:
    flag = FeatureFlag.model_validate(example("FeatureFlag", "new-dashboard"))
    assert flag.spec.rollout is not None
    assert (flag.spec.rollout.variant, flag.spec.rollout.percentage) == ("on", 25)
    assert [(t.tenant, t.variant) for t in flag.spec.tenants] == [("acme-corp", "on")]


def flag(**spec: Any) -> FeatureFlagSpec:
    return FeatureFlagSpec.model_validate(spec)


def test_featureflag_variant_values_are_any_json() -> None:
    spec = flag(
        variants={"blue": {"value": {"color": "#00f", "sizes": [1, 2]}}, "red": {"value": "red"}},
        defaultVariant="red",
        rollout={"weights": [{"variant": "blue", "weight": 1}, {"variant": "red", "weight": 3}]},
    )
    assert spec.variant_values() == {"blue": {"color": "#00f", "sizes": [1, 2]}, "red": "red"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"rollout": {"variant": "on", "percentage": 101}}, "less than or equal to 100"),
        ({"rollout": {"variant": "on", "percentage": -1}}, "greater than or equal to 0"),
        ({"rollout": {}}, "exactly one of percentage"),
        ({"rollout": {"percentage": 5}}, "goes with percentage or steps"),
        ({"rollout": {"variant": "on", "steps": [5, 1]}}, "increasing percentages"),
        ({"rollout": {"variant": "on", "percentage": 5, "stepInterval": "1m"}}, "belong to a stepped rollout"),
        (
            {"rollout": {"variant": "on", "percentage": 5, "weights": [{"variant": "on", "weight": 1}]}},
            "exactly one",
        ),
        ({"rollout": {"weights": [{"variant": "on", "weight": 0}]}}, "greater than zero"),
        ({"variants": {"a": {"value": 1}}}, "defaultVariant 'off'"),
        ({"variants": {}, "defaultVariant": "x"}, "at least 1"),
        ({"rollout": {"variant": "blue", "percentage": 5}}, "rollout.variant 'blue'"),
        ({"rollout": {"weights": [{"variant": "blue", "weight": 1}]}}, "rollout.weights"),
        ({"tenants": [{"tenant": "acme", "variant": "blue"}]}, "tenants"),
        ({"tenants": [{"tenant": "acme"}]}, "variant, a percentage or both"),
        (
            {"variants": {"x": {"value": 1}}, "defaultVariant": "x", "tenants": [{"tenant": "acme", "percentage": 5}]},
            "tenants",
        ),
        ({"users": [{"tenant": "acme", "user": "u1", "variant": "blue"}]}, "users"),
        ({"key": "-bad"}, "pattern"),
        ({"variants": {"bad key": {"value": 1}}}, "pattern"),
        ({"tenants": [{"tenant": "Acme", "variant": "on"}]}, "pattern"),
    ],
)
def test_featureflag_rejects(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        flag(**spec)


def test_featureflag_percentage_only_tenant_override_serves_rollout_variant() -> None:
    spec = flag(
        variants={"v1": {"value": 1}, "v2": {"value": 2}},
        defaultVariant="v1",
        rollout={"variant": "v2", "percentage": 10},
        tenants=[{"tenant": "acme", "percentage": 50}],
    )
    assert spec.rollout_variant() == "v2"


def test_featureflag_status_round_trip() -> None:
    raw = {
        "observedGeneration": 1,
        "conditions": [],
        "variantShares": {"on": 0.25, "off": 0.75},
        "tenantOverrides": 1,
        "userOverrides": 0,
        "lastWrittenAt": "2026-11-22T12:00:00Z",
        "unknownTenants": ["initech"],
    }
    assert FeatureFlagStatus.model_validate(raw).to_api() == raw
    with pytest.raises(ValidationError):
        FeatureFlagStatus.model_validate({"variantShares": {"on": 1.5}})


# --- Durations and quantities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5s", timedelta(seconds=1.5)),
        ("0s", timedelta(0)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("2m3s4ms", timedelta(minutes=2, seconds=3, milliseconds=4)),
        ("0.001ms", timedelta(microseconds=1)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "1w", "-1s", "1.s", "1h 30m", "h", "1.5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("500", 500),
        ("1k", 1000),
        ("1Ki", 1024),
        ("10Gi", 10 * 2**30),
        ("1.5Gi", 1610612736),
        ("2M", 2_000_000),
        ("3Mi", 3 * 2**20),
        ("1T", 10**12),
        ("1Ti", 2**40),
        ("1P", 10**15),
        ("2Pi", 2 * 2**50),
        ("1.5G", 1_500_000_000),
        ("0.5", 1),  # fractions round up, as Kubernetes does
        (42, 42),
    ],
)
def test_parse_quantity(text: str | int, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "Gi", "-1Gi", "1GB", "1gi", "1e3", "100m", "1.Gi", " 1Gi", -1])
def test_parse_quantity_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(text)


@given(st.integers(min_value=0, max_value=2**62))
def test_format_quantity_round_trips(value: int) -> None:
    assert parse_quantity(format_quantity(value)) == value


def test_format_quantity_picks_the_largest_exact_suffix() -> None:
    assert format_quantity(10 * 2**30) == "10Gi"
    assert format_quantity(1536 * 2**20) == "1536Mi"
    assert format_quantity(1000) == "1000"
    assert format_quantity(0) == "0"


# --- Bounds: the models refuse what the CRDs refuse (issue #15, bounded input) ---------------------


def nest(depth: int, leaf: Any = True) -> Any:
    """A value with `depth` lists and objects around `leaf`, alternating."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    "retention", ["3651d", "999999999d", "1000000000d", "9" * 30 + "d", "3000d9999h9999h", "1s" * 17]
)
def test_tenant_refuses_archive_retention_out_of_bounds(retention: str) -> None:
    # Before the bound, 1000000000d raised OverflowError (not a ValidationError) out of model_validate,
    # and the sweep, which parses every Tenant, failed for everyone.
    with pytest.raises(ValidationError, match=r"archive_retention|archiveRetention"):
        TenantSpec.model_validate({"archiveRetention": retention})


@pytest.mark.parametrize("retention", ["3650d", "3649d23h59m59s999ms", "87600h", "0s"])
def test_tenant_accepts_archive_retention_up_to_ten_years(retention: str) -> None:
    assert TenantSpec.model_validate({"archiveRetention": retention}).archive_retention == retention


def test_longest_retention_fits_a_timestamp() -> None:
    longest = parse_duration("3650d")
    assert datetime(9000, 1, 1, tzinfo=UTC) + longest < datetime.max.replace(tzinfo=UTC)


def test_parse_duration_too_long_for_a_timedelta_is_a_value_error() -> None:
    for text in ("1000000000d", "9" * 40 + "ms"):
        with pytest.raises(ValueError, match="too long"):
            parse_duration(text)


@pytest.mark.parametrize(
    "limits",
    [
        {"statementTimeout": "2147483648ms"},
        {"statementTimeout": "30d"},
        {"storage": "1025Pi"},
        {"storage": "9" * 60},
        {"connections": 2**31},
        {"requestsPerSecond": 2**40},
        {"burst": 2**31},
        {"concurrentJobs": 2**31},
    ],
)
def test_quota_refuses_limits_out_of_bounds(limits: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        QuotaSpec.model_validate({"tenantRef": {"name": "acme"}, "limits": limits})


@pytest.mark.parametrize(
    "bad",
    [
        override("connections", 2**31),
        override("storage", "2048Pi"),
        override("storage", 2**61),
        override("storage", "1" * 65),
        override("statementTimeout", "30d"),
        override("statementTimeout", "1s" * 33),
    ],
)
def test_quota_refuses_override_values_out_of_bounds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        QuotaSpec.model_validate({"tenantRef": {"name": "acme"}, "overrides": [bad]})


def test_quota_accepts_values_at_the_bounds() -> None:
    spec = QuotaSpec.model_validate({
        "tenantRef": {"name": "acme"},
        "limits": {"statementTimeout": "2147483647ms", "storage": "1024Pi", "connections": 2**31 - 1},
        "overrides": [override("storage", 2**60), override("statementTimeout", "24d20h31m23s647ms"),
                      override("burst", 2**31 - 1)],
    })  # fmt: skip
    assert parse_quantity(spec.limits.storage or "") == 2**60


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (nest(9), "nest deeper than 8"),
        (nest(5000), "nest deeper than 8"),
        ({"a": ["x" * 8193]}, "longer than 8192"),
        ({"ids": list(range(1001))}, "more than 1000 entries"),
        ({f"k{i}": i for i in range(1001)}, "more than 1000 entries"),
    ],
)
def test_featureflag_refuses_variant_values_out_of_bounds(value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        flag(variants={"on": {"value": value}, "off": {"value": False}})


def test_featureflag_accepts_variant_values_at_the_bounds() -> None:
    deepest = nest(8, "x" * 8192)
    wide = {"ids": list(range(1000)), "map": {f"k{i}": i for i in range(1000)}, "empty": nest(7, [])}
    spec = flag(variants={"on": {"value": deepest}, "off": {"value": wide}})
    assert spec.variant_values() == {"on": deepest, "off": wide}


def test_featureflag_value_schema_matches_the_model() -> None:
    """The CRD's value schema is the bound spelled out level by level; the model checks the same."""
    from tenancy_operator.api.featureflag import VALUE_MAX_DEPTH, value_depth_schema

    node, levels = value_depth_schema(), 0
    while "items" in node:
        assert node["items"] == node["additionalProperties"]
        assert node["maxItems"] == node["maxProperties"] == 1000
        node, levels = node["items"], levels + 1
    assert levels == VALUE_MAX_DEPTH
    assert node == {"x-kubernetes-preserve-unknown-fields": True, "maxLength": 8192, "maxItems": 0, "maxProperties": 0}


def test_status_fields_are_bounded() -> None:
    with pytest.raises(ValidationError):
        TenantStatus.model_validate({"schemaVersion": "v" * 254})
    with pytest.raises(ValidationError):
        TenantStatus.model_validate({"effectiveLimits": {"storage": "1" * 65}})
    with pytest.raises(ValidationError):
        QuotaStatus.model_validate({"activeOverrides": [
            {"limit": "burst", "value": 5, "expiresAt": "2030-01-01T00:00:00Z", "reason": "r" * 513}]})
    with pytest.raises(ValidationError):
        FeatureFlagStatus.model_validate({"unknownTenants": [f"t{i}" for i in range(1001)]})
