"""The generated CRDs, installed in a real API server, accept the examples and what the operator
writes to status, and reject bad objects with a message that says what is wrong."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenancy_devenv.process import wait_for
from tenancy_devenv.stack import LocalStack
from tenancy_operator.api import (
    RESOURCES,
    Condition,
    FeatureFlag,
    FeatureFlagStatus,
    JobRef,
    Quota,
    QuotaStatus,
    SchemaRollout,
    Tenant,
    TenantStatus,
)

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
API_VERSION = "tenancy.dev/v1alpha1"
LATER = "2030-01-01T00:00:00Z"


def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def apply(stack: LocalStack, namespace: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """kubectl apply (client-side, like most users) of one object; JSON, so no YAML `on`/`off` surprises."""
    return stack.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)


def get(stack: LocalStack, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = stack.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
    result: dict[str, Any] = json.loads(out)
    return result


def assert_accepted(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def assert_rejected(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, f"accepted, expected a rejection: {result.stdout}"
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"


# --- Installation ---------------------------------------------------------------------------------


def test_crds_established_and_named(stack: LocalStack) -> None:
    for info in RESOURCES:
        crd = json.loads(stack.kubectl("get", "crd", info.crd_name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert crd["status"]["acceptedNames"]["shortNames"] == list(info.short_names)
    # The category and short names resolve through discovery (kubectl caches it, so poll).
    wait_for(
        "kubectl get tenancy -A",
        lambda: stack.kubectl("get", "tenancy", "-A", check=False).returncode == 0,
        30,
    )
    assert_accepted(stack.kubectl("get", "tn,tq,ff", "-A", check=False))


# --- Accepted objects -----------------------------------------------------------------------------


def example_objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] not in ("Namespace", "ConfigMap")]
    return docs


def test_examples_accepted_and_parse_back(stack: LocalStack, namespace: str) -> None:
    objects = example_objects()
    assert {d["kind"] for d in objects} == {"Tenant", "Quota", "FeatureFlag", "SchemaRollout"}
    for manifest in objects:
        manifest["metadata"]["namespace"] = namespace
        assert_accepted(apply(stack, namespace, manifest))

    globex = Tenant.model_validate(get(stack, namespace, "tenant", "globex"))
    raw_globex = get(stack, namespace, "tenant", "globex")["spec"]
    # Schema defaults are stored, so the object says what is in force.
    assert raw_globex["database"] == "default"
    assert raw_globex["deletionPolicy"] == "Retain"
    assert globex.spec.tier == "starter"

    quota = Quota.model_validate(get(stack, namespace, "quota", "acme-corp"))
    assert quota.spec.limits.storage == "10Gi"
    assert quota.spec.overrides[0].value == 50

    flag = FeatureFlag.model_validate(get(stack, namespace, "featureflag", "new-dashboard"))
    assert flag.spec.enabled is True
    assert flag.spec.variant_values() == {"on": True, "off": False}
    assert flag.spec.rollout is not None
    assert flag.spec.rollout.percentage == 25

    stepped = FeatureFlag.model_validate(get(stack, namespace, "featureflag", "new-checkout"))
    assert stepped.spec.rollout is not None and stepped.spec.rollout.steps == [1, 5, 25, 50, 100]
    assert stepped.spec.rollout.gate is not None and stepped.spec.rollout.gate.max == 0.02

    waves = SchemaRollout.model_validate(get(stack, namespace, "schemarollout", "shop-schema"))
    assert waves.spec.template == "shop-schema" and [w.percentage for w in waves.spec.waves] == [50, 100]
    assert waves.spec.budget(10) == 0


def test_variant_values_keep_any_json(stack: LocalStack, namespace: str) -> None:
    variants = {
        "blue": {"value": {"color": "#00f", "sizes": [1, 2.5], "nested": {"deep": [True, "x"]}}},
        "red": {"value": "red", "description": "the old one"},
        "three": {"value": 3},
    }
    spec = {
        "variants": variants,
        "defaultVariant": "red",
        "rollout": {"weights": [{"variant": "blue", "weight": 1}, {"variant": "three", "weight": 3}]},
        "tenants": [{"tenant": "acme", "percentage": 10, "variant": "blue"}],
        "users": [{"tenant": "acme", "user": "u-1", "variant": "three"}],
    }
    assert_accepted(apply(stack, namespace, obj("FeatureFlag", "colours", spec)))
    stored = get(stack, namespace, "featureflag", "colours")["spec"]["variants"]
    assert stored == variants


def condition(type_: str, status: str, reason: str) -> Condition:
    return Condition.model_validate(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "lastTransitionTime": "2026-11-22T10:00:00Z",
            "observedGeneration": 1,
            "message": "ok",
        }
    )


def stored_status(stack: LocalStack, namespace: str, kind: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """The status the API server would store for this write (server-side dry run: an operator
    reconciling the same object cannot interfere)."""
    result = stack.kubectl(
        "patch", kind, name, "-n", namespace, "--subresource=status", "--type=json", "--dry-run=server",
        "-o", "json", "-p", json.dumps([{"op": "add", "path": "/status", "value": status}]),
    )  # fmt: skip
    return dict(json.loads(result.stdout)["status"])


def test_status_written_by_the_models_is_stored_unchanged(stack: LocalStack, namespace: str) -> None:
    """Nothing the operator writes is pruned or rejected: models and schema agree."""
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {})))
    assert_accepted(apply(stack, namespace, obj("Quota", "acme", {"tenantRef": {"name": "acme"}})))
    assert_accepted(apply(stack, namespace, obj("FeatureFlag", "dash", {})))
    job = JobRef(id="j-1", kind="Provision", state="Succeeded", attempt=1)
    statuses = {
        ("tenant", "acme"): TenantStatus(
            observed_generation=1,
            phase="Active",
            conditions=[condition("Ready", "True", "Provisioned")],
            tenant_id="0b5e",
            schema_name="tenant_acme",
            role="tenant_acme",
            secret_name="acme-db",
            database="default",
            schema_version="0003",
            effective_limits={"connections": "20", "storage": "10Gi"},
            current_job=JobRef(id="j-2", kind="Migrate", state="Running", attempt=2),
            recent_jobs=[job],
        ).to_api(),
        ("quota", "acme"): QuotaStatus.model_validate(
            {
                "observedGeneration": 1,
                "conditions": [
                    condition("Ready", "True", "Measured").to_api(),
                    condition("NearLimit", "False", "BelowThreshold").to_api(),
                ],
                "hard": {"storage": "10Gi", "connections": "20"},
                "used": {"storage": "1Gi", "connections": "3"},
                "usageRatio": {"storage": 0.1, "connections": 0.15},
                "activeOverrides": [{"limit": "connections", "value": 50, "expiresAt": LATER, "reason": "x"}],
                "lastMeasuredAt": "2026-11-22T12:00:00Z",
            }
        ).to_api(),
        ("featureflag", "dash"): FeatureFlagStatus(
            observed_generation=1,
            conditions=[condition("Ready", "True", "Published")],
            variant_shares={"on": 0.25, "off": 0.75},
            tenant_overrides=1,
            user_overrides=0,
            unknown_tenants=["initech"],
        ).to_api(),
    }
    for (kind, name), status in statuses.items():
        assert stored_status(stack, namespace, kind, name, status) == status


def test_new_objects_read_as_in_progress_until_the_operator_reports(stack: LocalStack, namespace: str) -> None:
    """The API server itself gives a new object the CRD's default status, observedGeneration 0:
    kstatus (Flux, `kubectl wait`) and the Argo CD health check read that as in progress, so the
    operator needs no first "Reconciling" write. The create call's answer is the stored object,
    before any operator could have written to it."""
    manifests = {
        "Tenant": obj("Tenant", "fresh", {}),
        "Quota": obj("Quota", "fresh", {"tenantRef": {"name": "fresh"}}),
        "FeatureFlag": obj("FeatureFlag", "fresh", {}),
        "SchemaRollout": obj("SchemaRollout", "fresh", {"template": "fresh-schema"}),
        "TenantArchive": obj("TenantArchive", "fresh", {}),
    }
    for info in RESOURCES:
        created = json.loads(stack.kubectl("create", "-n", namespace, "-o", "json", "-f", "-",
                                           input=json.dumps(manifests[info.kind])).stdout)
        assert created["status"] == info.initial_status, info.kind
        assert created["status"]["observedGeneration"] < created["metadata"]["generation"]
    assert get(stack, namespace, "tenant", "fresh")["status"].get("phase") in ("Provisioning", "Active")


def test_printer_columns_show_the_status(stack: LocalStack, namespace: str) -> None:
    """Whatever status the object has (an operator may be writing it), the table shows it."""
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {"tier": "starter"})))

    def table_matches() -> bool:
        st = get(stack, namespace, "tenant", "acme").get("status") or {}
        ready = next((c["status"] for c in st.get("conditions") or [] if c["type"] == "Ready"), None)
        row = stack.kubectl("get", "tenant", "acme", "-n", namespace, "--no-headers").stdout.split()
        again = get(stack, namespace, "tenant", "acme").get("status") or {}
        if again != st:
            return False  # changed under us; look again
        # Empty cells print as nothing, so the split row holds only the values that are set.
        expected = [v for v in ("acme", ready, st.get("phase"), "starter", st.get("schema"), st.get("schemaVersion"))
                    if v is not None]
        return row[: len(expected)] == expected

    deadline = time.monotonic() + 30
    while not table_matches():
        assert time.monotonic() < deadline, "printer columns never matched the object's status"
        time.sleep(0.2)  # polling interval


def test_status_is_validated_too(stack: LocalStack, namespace: str) -> None:
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {})))
    bad = {"conditions": [{"type": "Ready", "status": "Yes", "reason": "x y", "lastTransitionTime": "now"}]}
    result = stack.kubectl(
        "patch", "tenant", "acme", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": bad}), check=False,
    )  # fmt: skip
    assert_rejected(result, "status.conditions[0].status", "status.conditions[0].reason")


# --- Rejected objects -----------------------------------------------------------------------------


def override(limit: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"limit": limit, "value": value, "expiresAt": LATER, **extra}


QUOTA_REF = {"tenantRef": {"name": "acme"}}

REJECTED = {
    "tenant name with uppercase": (
        obj("Tenant", "Acme", {}),
        ["Tenant name must start with a lowercase letter"],
    ),
    "tenant name too long": (
        obj("Tenant", "a" * 57, {}),
        ["Tenant name must be at most 56 characters", "tenant_<name>", "63 bytes"],
    ),
    "tenant name with a dot": (obj("Tenant", "acme.corp", {}), ["(no dots)"]),
    "tenant name starting with a digit": (obj("Tenant", "1acme", {}), ["must start with a lowercase letter"]),
    "unknown tier": (obj("Tenant", "acme", {"tier": "gold"}), ['spec.tier: Unsupported value: "gold"']),
    "bad archiveRetention": (
        obj("Tenant", "acme", {"archiveRetention": "30 days"}),
        ["spec.archiveRetention", "should match"],
    ),
    "negative connections": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"connections": -1}}),
        ["spec.limits.connections", "should be greater than or equal to 1"],
    ),
    "zero connections": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"connections": 0}}),
        ["spec.limits.connections", "should be greater than or equal to 1"],
    ),
    "negative storage": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"storage": "-5Gi"}}),
        ['spec.limits.storage: Invalid value: "-5Gi"'],
    ),
    "zero storage": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"storage": "0Gi"}}),
        ["spec.limits.storage", "must be greater than zero"],
    ),
    "zero statementTimeout": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"statementTimeout": "0s"}}),
        ["spec.limits.statementTimeout", "must be greater than zero"],
    ),
    "override without expiresAt": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [{"limit": "connections", "value": 5}]}),
        ["spec.overrides[0].expiresAt: Required value"],
    ),
    "override of an unknown limit": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("cpu", 5)]}),
        ['spec.overrides[0].limit: Unsupported value: "cpu"', '"connections"'],
    ),
    "override with zero connections": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("connections", 0)]}),
        ["spec.overrides[0].value", "an override value for connections must be an integer from 1 to"],
    ),
    "override with a negative burst": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("burst", -3)]}),
        ["an override value for burst must be an integer from 1 to"],
    ),
    "override with zero storage": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("storage", "0Gi")]}),
        ["a storage override value must be a quantity greater than zero"],
    ),
    "override with a numeric statementTimeout": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("statementTimeout", 30)]}),
        ["a statementTimeout override value must be a duration greater than zero"],
    ),
    "two overrides with the same limit and expiry": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("burst", 5), override("burst", 6)]}),
        ["spec.overrides[1]: Duplicate value"],
    ),
    "rollout percentage 101": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "percentage": 101}}),
        ["spec.rollout.percentage", "should be less than or equal to 100"],
    ),
    "rollout with percentage and weights": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "percentage": 5,
                                             "weights": [{"variant": "on", "weight": 1}]}}),
        ["rollout needs exactly one of percentage or steps (with variant), or weights"],
    ),
    "rollout percentage without variant": (
        obj("FeatureFlag", "f", {"rollout": {"percentage": 5}}),
        ["rollout.variant goes with percentage or steps"],
    ),
    "schema rollout without a template": (
        obj("SchemaRollout", "r", {}),
        ["spec.template: Required value"],
    ),
    "schema rollout wave with count and percentage": (
        obj("SchemaRollout", "r", {"template": "t", "waves": [{"count": 1, "percentage": 5}]}),
        ["a wave is a count or a percentage, not both"],
    ),
    "schema rollout percentages going down": (
        obj("SchemaRollout", "r", {"template": "t", "waves": [{"percentage": 50}, {"percentage": 10}]}),
        ["wave percentages are cumulative"],
    ),
    "schema rollout canary without tenants or count": (
        obj("SchemaRollout", "r", {"template": "t", "canary": {}}),
        ["a canary needs tenants, a count or both"],
    ),
    "rollout steps not increasing": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "steps": [5, 25, 10]}}),
        ["rollout.steps must be increasing percentages"],
    ),
    "rollout steps repeated": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "steps": [5, 5, 10]}}),
        ["spec.rollout.steps[1]: Duplicate value"],
    ),
    "rollout step above 100": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "steps": [5, 101]}}),
        ["spec.rollout.steps[1]", "should be less than or equal to 100"],
    ),
    "rollout gate without steps": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "percentage": 5,
                                             "gate": {"query": "up", "max": 1}}}),
        ["stepInterval, gate, onBreach and paused belong to a stepped rollout"],
    ),
    "rollout onBreach unknown": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "on", "steps": [5], "onBreach": "Panic"}}),
        ["spec.rollout.onBreach", "Unsupported value"],
    ),
    "defaultVariant not in variants": (
        obj("FeatureFlag", "f", {"variants": {"a": {"value": 1}, "b": {"value": 2}}, "defaultVariant": "c"}),
        ['spec.defaultVariant', 'defaultVariant "c" is not one of variants'],
    ),
    "rollout variant not in variants": (
        obj("FeatureFlag", "f", {"rollout": {"variant": "blue", "percentage": 5}}),
        ['rollout.variant "blue" is not one of variants'],
    ),
    "rollout weight naming an unknown variant": (
        obj("FeatureFlag", "f", {"rollout": {"weights": [{"variant": "blue", "weight": 1}]}}),
        ["every rollout.weights[].variant must be one of variants"],
    ),
    "tenant override naming an unknown variant": (
        obj("FeatureFlag", "f", {"tenants": [{"tenant": "acme", "variant": "blue"}]}),
        ["spec.tenants", "every tenants[].variant must be one of variants"],
    ),
    "user override naming an unknown variant": (
        obj("FeatureFlag", "f", {"users": [{"tenant": "acme", "user": "u1", "variant": "blue"}]}),
        ["spec.users", "every users[].variant must be one of variants"],
    ),
    "duplicate tenant override": (
        obj("FeatureFlag", "f", {"tenants": [{"tenant": "acme", "variant": "on"},
                                             {"tenant": "acme", "variant": "off"}]}),
        ['spec.tenants[1]: Duplicate value: {"tenant":"acme"}'],
    ),
    "duplicate user override": (
        obj("FeatureFlag", "f", {"users": [{"tenant": "acme", "user": "u1", "variant": "on"},
                                           {"tenant": "acme", "user": "u1", "variant": "off"}]}),
        ["spec.users[1]: Duplicate value"],
    ),
    "empty tenant override": (
        obj("FeatureFlag", "f", {"tenants": [{"tenant": "acme"}]}),
        ["a tenant override needs a variant, a percentage or both"],
    ),
    "no variants": (
        obj("FeatureFlag", "f", {"variants": {}}),
        ["spec.variants", "should have at least 1 properties"],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("manifest", "fragments"), list(REJECTED.values()), ids=list(REJECTED))
def test_rejected_with_a_clear_message(
    stack: LocalStack, namespace: str, manifest: dict[str, Any], fragments: list[str]
) -> None:
    assert_rejected(apply(stack, namespace, manifest), *fragments)


# --- Immutable fields -----------------------------------------------------------------------------


def test_tenant_database_may_change_it_is_a_move(stack: LocalStack, namespace: str) -> None:
    """A change of spec.database is a move (test_moves.py), no longer refused at apply; its name is
    still checked."""
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {"tier": "free"})))
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {"database": "analytics"})))
    assert get(stack, namespace, "tenant", "acme")["spec"]["database"] == "analytics"
    assert_rejected(apply(stack, namespace, obj("Tenant", "acme", {"database": "Not A Name"})), "spec.database")


def test_tenant_restore_from_is_immutable_once_set(stack: LocalStack, namespace: str) -> None:
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {})))
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {"restoreFrom": "latest"})))
    for spec in ({"restoreFrom": "arch-2026-11-01"}, {}):
        assert_rejected(apply(stack, namespace, obj("Tenant", "acme", spec)), "restoreFrom is immutable once set")


def test_featureflag_key_is_immutable(stack: LocalStack, namespace: str) -> None:
    assert_accepted(apply(stack, namespace, obj("FeatureFlag", "with-key", {"key": "dash"})))
    assert_accepted(apply(stack, namespace, obj("FeatureFlag", "without-key", {})))
    for name, spec in (("with-key", {"key": "dash2"}), ("with-key", {}), ("without-key", {"key": "dash"})):
        assert_rejected(
            apply(stack, namespace, obj("FeatureFlag", name, spec)),
            "spec.key",
            "key is immutable: it cannot be added, removed or changed",
        )
    # Other fields stay editable: this is the kill switch.
    assert_accepted(apply(stack, namespace, obj("FeatureFlag", "with-key", {"key": "dash", "enabled": False})))


def test_quota_tenant_ref_is_immutable(stack: LocalStack, namespace: str) -> None:
    assert_accepted(apply(stack, namespace, obj("Quota", "q", QUOTA_REF)))
    assert_rejected(
        apply(stack, namespace, obj("Quota", "q", {"tenantRef": {"name": "globex"}})),
        "spec.tenantRef",
        "tenantRef is immutable",
    )


# --- Bounds: every free-form field has one (issue #15, bounded input) -------------------------------
# Each of these was accepted before the bounds: a namespace user could store a retention that
# overflows the archive sweep, a timeout PostgreSQL cannot hold, or a flag value nested deeper than
# the operator (and any Python client) can decode.


def nest(depth: int, leaf: Any = True) -> Any:
    """A value with `depth` lists and objects around `leaf`, alternating."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def flag_value(value: Any) -> dict[str, Any]:
    return {"variants": {"on": {"value": value}, "off": {"value": False}}}


OUT_OF_BOUNDS = {
    "archiveRetention longer than ten years": (
        obj("Tenant", "acme", {"archiveRetention": "3651d"}),
        ["spec.archiveRetention", "must be at most 3650d"],
    ),
    "archiveRetention of 999999999 days": (
        obj("Tenant", "acme", {"archiveRetention": "999999999d"}),
        ["spec.archiveRetention", "must be at most 3650d"],
    ),
    "archiveRetention past what Python's timedelta holds": (
        obj("Tenant", "acme", {"archiveRetention": "1000000000d"}),
        ["spec.archiveRetention", "must be at most 3650d"],
    ),
    "archiveRetention in many small parts": (
        obj("Tenant", "acme", {"archiveRetention": "3000d" + "9999h" * 2}),
        ["spec.archiveRetention", "must be at most 3650d"],
    ),
    "archiveRetention string too long": (
        obj("Tenant", "acme", {"archiveRetention": "1s" * 17}),
        ["spec.archiveRetention", "Too long"],
    ),
    "statementTimeout beyond PostgreSQL's int4 milliseconds": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"statementTimeout": "2147483648ms"}}),
        ["spec.limits.statementTimeout", "must be at most 2147483647ms"],
    ),
    "statementTimeout of 30 days": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"statementTimeout": "30d"}}),
        ["spec.limits.statementTimeout", "must be at most 2147483647ms"],
    ),
    "storage beyond 1024Pi": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"storage": "1025Pi"}}),
        ["spec.limits.storage", "must be at most 1024Pi"],
    ),
    "storage with sixty digits": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"storage": "9" * 60}}),
        ["spec.limits.storage", "must be at most 1024Pi"],
    ),
    "connections beyond int4": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"connections": 2**31}}),
        ["spec.limits.connections", "should be less than or equal to 2147483647"],
    ),
    "requestsPerSecond beyond int4": (
        obj("Quota", "q", {**QUOTA_REF, "limits": {"requestsPerSecond": 2**40}}),
        ["spec.limits.requestsPerSecond", "should be less than or equal to 2147483647"],
    ),
    "override with connections beyond int4": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("connections", 2**31)]}),
        ["spec.overrides[0].value", "must be an integer from 1 to 2147483647"],
    ),
    "override with storage beyond 1024Pi": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("storage", "2048Pi")]}),
        ["spec.overrides[0].value", "at most 1024Pi"],
    ),
    "override with an integer storage beyond 1024Pi": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("storage", 2**61)]}),
        ["spec.overrides[0].value", "at most 1024Pi"],
    ),
    "override with statementTimeout of 30 days": (
        obj("Quota", "q", {**QUOTA_REF, "overrides": [override("statementTimeout", "30d")]}),
        ["spec.overrides[0].value", "at most 2147483647ms"],
    ),
    "flag value nested 9 deep": (
        obj("FeatureFlag", "f", flag_value(nest(9))),
        ["spec.variants.on.value", "must have at most 0 items"],
    ),
    "flag value with a string of 8193 characters": (
        obj("FeatureFlag", "f", flag_value({"a": ["x" * 8193]})),
        ["spec.variants.on.value.a[0]", "Too long"],
    ),
    "flag value with a list of 1001 items": (
        obj("FeatureFlag", "f", flag_value({"ids": list(range(1001))})),
        ["spec.variants.on.value.ids", "Too many"],
    ),
    "flag value with an object of 1001 keys": (
        obj("FeatureFlag", "f", flag_value({f"k{i}": i for i in range(1001)})),
        ["spec.variants.on.value", "must have at most 1000 items"],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("manifest", "fragments"), list(OUT_OF_BOUNDS.values()), ids=list(OUT_OF_BOUNDS))
def test_out_of_bounds_refused_at_create(
    stack: LocalStack, namespace: str, manifest: dict[str, Any], fragments: list[str]
) -> None:
    assert_rejected(apply(stack, namespace, manifest), *fragments)
    kind = manifest["kind"].lower()
    gone = stack.kubectl("get", kind, manifest["metadata"]["name"], "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, "the object must not have been stored"


def test_flag_value_nested_thousands_deep_refused_at_create(stack: LocalStack, namespace: str) -> None:
    """The API server takes JSON nested up to 10000 deep; Python's json (Kopf's watch, every Python
    client) gives up at about 1000. Written as text: json.dumps cannot write it either."""
    depth = 5000
    manifest = (
        f'{{"apiVersion": "{API_VERSION}", "kind": "FeatureFlag", "metadata": {{"name": "deep"}}, '
        '"spec": {"variants": {"on": {"value": ' + "[" * depth + "true" + "]" * depth + '}, '
        '"off": {"value": false}}}}'
    )
    result = stack.kubectl("create", "-n", namespace, "-f", "-", input=manifest, check=False)
    assert_rejected(result, "spec.variants.on.value", "must have at most 0 items")
    gone = stack.kubectl("get", "featureflag", "deep", "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, "the object must not have been stored"


def test_values_at_the_bounds_are_accepted(stack: LocalStack, namespace: str) -> None:
    assert_accepted(apply(stack, namespace, obj("Tenant", "acme", {"archiveRetention": "3650d"})))
    assert_accepted(apply(stack, namespace, obj("Tenant", "globex", {"archiveRetention": "3649d23h59m59s999ms"})))
    limits = {"statementTimeout": "2147483647ms", "storage": "1024Pi", "connections": 2**31 - 1}
    overrides = [override("storage", 2**60), override("statementTimeout", "24d20h31m23s647ms"),
                 override("burst", 2**31 - 1)]
    assert_accepted(apply(stack, namespace, obj("Quota", "q", {**QUOTA_REF, "limits": limits, "overrides": overrides})))
    deepest = nest(8, "x" * 8192)
    wide = {"ids": list(range(1000)), "map": {f"k{i}": i for i in range(1000)}, "empty": nest(7, [])}
    spec = {"variants": {"on": {"value": deepest}, "off": {"value": wide}}}
    assert_accepted(apply(stack, namespace, obj("FeatureFlag", "f", spec)))
    stored = get(stack, namespace, "featureflag", "f")["spec"]["variants"]
    assert stored["on"]["value"] == deepest
    assert stored["off"]["value"] == wide
