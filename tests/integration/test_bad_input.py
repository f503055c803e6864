"""Bad input through the real API server: rejected with a message, or reconciled to a clear state.

Generated Tenants are applied as a user would; each must either be refused at apply time with a
message, or end with a Ready condition (True, or False with a reason and a message) for its
current generation. The operator must stay alive, must not hot-loop, and must store hostile
text verbatim.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, eventually, sql_value, tenant

PLURAL = "tenants"
HOSTILE = st.sampled_from(
    [
        "'; DROP SCHEMA tenancy CASCADE; --",
        "Robert'); DROP TABLE tenants;--",
        "$$; SELECT pg_sleep(10); $$",
        "\\x00\\\\",
        "%s %(x)s {0}",
        "🙂 ünïcödé ✓",
        "a" * 256,
        "line\nbreak",
        '" OR 1=1 --',
        "",
    ]
)
_counter = itertools.count()


def _text() -> st.SearchStrategy[str]:
    return st.one_of(
        HOSTILE, st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
    )


TENANT_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "displayName": _text(),
        "tier": st.one_of(st.sampled_from(["free", "starter", "professional", "enterprise"]), _text()),
        "state": st.one_of(st.sampled_from(["Active", "Suspended"]), _text()),
        "database": st.one_of(st.sampled_from(["default", "second", "nowhere"]), _text()),
        "deletionPolicy": st.one_of(st.sampled_from(["Retain", "Delete", "Archive"]), _text()),
        "archiveRetention": st.one_of(st.sampled_from(["30d", "1h", "0s", "-1d", "forever"]), _text()),
        "schemaTemplate": st.one_of(st.sampled_from(["missing-template", "Bad_Name"]), _text()),
        "restoreFrom": st.one_of(st.sampled_from(["latest", "no-such-archive"]), _text()),
        "unknownField": _text(),
    },
)


QUANTITY = st.one_of(st.sampled_from(["10Gi", "1", "0", "-5Gi", "1.5Gi", "lots", "999999999999Ti"]), _text())
COUNT = st.one_of(st.integers(min_value=-5, max_value=10**6), _text())
QUOTA_SPECS = st.fixed_dictionaries(
    {
        "tenantRef": st.fixed_dictionaries(
            {"name": st.one_of(st.sampled_from(["gen-0", "gen-1", "no-such-tenant", "Bad Name"]), _text())}
        )
    },
    optional={
        "limits": st.fixed_dictionaries(
            {},
            optional={
                "storage": QUANTITY,
                "connections": COUNT,
                "requestsPerSecond": COUNT,
                "burst": COUNT,
                "concurrentJobs": COUNT,
                "statementTimeout": st.one_of(st.sampled_from(["30s", "0s", "5m", "soon"]), _text()),
            },
        ),
        "enforcement": st.fixed_dictionaries({"storage": st.one_of(st.sampled_from(["Warn", "BlockWrites"]), _text())}),
        "overrides": st.lists(
            st.fixed_dictionaries(
                {"limit": st.sampled_from(["storage", "connections", "bogus"]), "value": COUNT},
                optional={
                    "expiresAt": st.sampled_from(["2030-01-01T00:00:00Z", "2000-01-01T00:00:00Z", "tomorrow"]),
                    "reason": _text(),
                },
            ),
            max_size=3,
        ),
    },
)
VARIANT_NAMES = st.sampled_from(["on", "off", "blue", "green", "missing"])
FLAG_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "description": _text(),
        "enabled": st.one_of(st.booleans(), _text()),
        "variants": st.dictionaries(
            VARIANT_NAMES,
            st.fixed_dictionaries(
                {"value": st.one_of(st.booleans(), st.integers(), _text(), st.lists(st.integers(), max_size=3))}
            ),
            max_size=4,
        ),
        "defaultVariant": VARIANT_NAMES,
        "rollout": st.fixed_dictionaries(
            {}, optional={"variant": VARIANT_NAMES, "percentage": st.integers(min_value=-10, max_value=150)}
        ),
        "tenants": st.lists(
            st.fixed_dictionaries(
                {"tenant": st.sampled_from(["gen-0", "ghost", "gen-1"])},
                optional={"variant": VARIANT_NAMES, "percentage": st.integers(min_value=-1, max_value=101)},
            ),
            max_size=3,
        ),
        "users": st.lists(
            st.fixed_dictionaries(
                {"tenant": st.sampled_from(["gen-0", "ghost"]), "user": _text(), "variant": VARIANT_NAMES}
            ),
            max_size=3,
        ),
    },
)


def settle(cluster: Cluster, namespace: str, name: str, plural: str = PLURAL) -> dict[str, Any]:
    """The object's Ready condition for its current generation, once there is one."""

    def check() -> dict[str, Any]:
        obj = cluster.get(plural, namespace, name)
        status = obj.get("status") or {}
        assert status.get("observedGeneration") == obj["metadata"]["generation"]
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)
        assert ready is not None
        assert ready["status"] in ("True", "False"), ready
        return ready

    return eventually(check, timeout=60, what=f"{name} settles")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=TENANT_SPECS)
def test_generated_tenants_are_rejected_or_reconciled(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, bad_input_ns: str, spec: dict[str, Any]
) -> None:
    name = f"gen-{next(_counter)}"
    rejected: ApiException | None = None
    try:
        cluster.create(PLURAL, bad_input_ns, tenant(name, **spec))
    except ApiException as exc:
        rejected = exc
    if rejected is not None:  # refused at apply, with a message that names the problem
        assert rejected.status in (400, 422), rejected
        assert "Tenant" in rejected.body, rejected.body
        assert "Invalid" in rejected.body or "Unsupported" in rejected.body, rejected.body
        return
    ready = settle(cluster, bad_input_ns, name)
    if ready["status"] == "False":
        assert ready["reason"] and ready["message"], ready
    else:
        stored = sql_value(
            stack.admin_dsn(spec.get("database", "default")),
            "SELECT display_name FROM tenancy.tenants WHERE namespace = %s AND name = %s",
            [bad_input_ns, name],
        )
        assert stored == spec.get("displayName"), "free text must be stored verbatim"
    assert operator.proc is not None and operator.proc.poll() is None, "the operator crashed"


def apply_or_reject(cluster: Cluster, plural: str, namespace: str, body: dict[str, Any]) -> bool:
    """True when the API server accepted the object; a refusal must name what is wrong."""
    refused: ApiException | None = None
    try:
        cluster.create(plural, namespace, body)
    except ApiException as exc:
        refused = exc
    if refused is None:
        return True
    assert refused.status in (400, 422), refused
    assert "Invalid" in refused.body or "Unsupported" in refused.body or "Required" in refused.body, refused.body
    return False


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=QUOTA_SPECS)
def test_generated_quotas_are_rejected_or_reconciled(
    cluster: Cluster, operator: OperatorProcess, bad_input_ns: str, spec: dict[str, Any]
) -> None:
    name = f"genq-{next(_counter)}"
    body = {"apiVersion": "tenancy.dev/v1alpha1", "kind": "Quota", "metadata": {"name": name}, "spec": spec}
    if apply_or_reject(cluster, "quotas", bad_input_ns, body):
        ready = settle(cluster, bad_input_ns, name, "quotas")
        if ready["status"] == "False":
            assert ready["reason"] and ready["message"], ready
    assert operator.proc is not None and operator.proc.poll() is None, "the operator crashed"


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=FLAG_SPECS)
def test_generated_flags_are_rejected_or_reconciled(
    cluster: Cluster, operator: OperatorProcess, bad_input_ns: str, spec: dict[str, Any]
) -> None:
    name = f"genf-{next(_counter)}"
    body = {"apiVersion": "tenancy.dev/v1alpha1", "kind": "FeatureFlag", "metadata": {"name": name}, "spec": spec}
    if apply_or_reject(cluster, "featureflags", bad_input_ns, body):
        ready = settle(cluster, bad_input_ns, name, "featureflags")
        if ready["status"] == "False":
            assert ready["reason"] and ready["message"], ready
    assert operator.proc is not None and operator.proc.poll() is None, "the operator crashed"


@pytest.fixture(scope="module")
def bad_input_ns(stack: LocalStack) -> Any:
    name = f"badinput-{int(time.time())}"
    stack.kubectl("create", "namespace", name)
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false")


def test_no_hot_loop_after_bad_input_settles(cluster: Cluster, operator: OperatorProcess, bad_input_ns: str) -> None:
    """Runs after the generated objects: failing objects are retried with backoff, not in a loop."""
    items = cluster.custom.list_namespaced_custom_object("tenancy.dev", "v1alpha1", bad_input_ns, PLURAL)["items"]
    assert items, "the property test left objects to watch"
    before = operator.metric("reconcile_total", kind="Tenant")
    window = 3 * operator.sweep_interval
    time.sleep(window)  # a measurement window, not synchronisation: we count what happens in it
    after = operator.metric("reconcile_total", kind="Tenant")
    not_ready = sum(
        1
        for i in items
        if not any(
            c["type"] == "Ready" and c["status"] == "True" for c in (i.get("status") or {}).get("conditions") or []
        )
    )
    # At most one pass per sweep per failing object (plus the first backoff retries), never a spin.
    bound = (not_ready + 1) * (window / operator.sweep_interval + 3)
    assert after - before <= bound, f"{after - before} reconciles in {window}s for {not_ready} failing objects"


def test_edits_during_reconcile_converge_to_the_last_one(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("churny", displayName="v0"))
    for i in range(1, 16):
        cluster.patch(PLURAL, namespace, "churny", {"spec": {"displayName": f"v{i}"}})
    obj = cluster.wait_condition(PLURAL, namespace, "churny")
    assert obj["metadata"]["generation"] == obj["status"]["observedGeneration"]
    eventually(
        lambda: (
            sql_value(
                stack.admin_dsn(),
                "SELECT display_name FROM tenancy.tenants WHERE namespace = %s AND name = 'churny'",
                [namespace],
            )
            == "v15"
        ),
        what="last edit wins",
    )


def test_deleted_while_provisioning_leaves_nothing_behind(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("blink", deletionPolicy="Delete"))
    cluster.delete(PLURAL, namespace, "blink")
    eventually(lambda: cluster.gone(PLURAL, namespace, "blink"), what="deleted")
    admin = stack.admin_dsn()

    def left_behind() -> str:
        # One snapshot of all three: a Tenant deleted while its finalizer was being added is gone
        # from the API at once, while the reconcile that provisions it may still run (its clean-up
        # applies the deletion policy when it ends), so each part is checked in the same read.
        return sql_value(
            admin,
            "SELECT ARRAY[(SELECT count(*) FROM pg_roles WHERE rolname = 'tenant_blink'),"
            " (SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_blink')]::text || ' '"
            " || coalesce((SELECT string_agg(state, ',') FROM tenancy.tenants WHERE namespace = %s AND name = 'blink'),"
            " '')",
            [namespace],
        )

    eventually(lambda: left_behind() in ("{0,0} ", "{0,0} dropped"), what="no role, schema or live registry row")
