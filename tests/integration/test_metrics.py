"""What SREs watch, scraped from the running operator: failures with bounded reasons, queue depth
that rises while PostgreSQL is down and returns to 0, latency, pools, build info, JSON logs, and no
secret anywhere an SRE or a tool can read."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tenancy_devenv.stack import LocalStack
from tenancy_operator import __version__
from tenancy_operator.observability.metrics import REASONS

from .harness import Cluster, OperatorProcess, eventually, tenant

PLURAL = "tenants"


def samples(operator: OperatorProcess, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(operator.scrape())
        for s in family.samples
        if s.name == name
    ]


def test_a_failure_increments_the_counter_with_its_bounded_reason(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    def failures() -> float:
        return operator.metric("reconcile_failures_total", kind="Tenant", reason="UnknownDatabase")

    before, attempts_before = failures(), operator.metric("reconcile_total", kind="Tenant", result="failure")
    cluster.create(PLURAL, namespace, tenant("lost", database="nowhere"))
    cluster.wait_condition(PLURAL, namespace, "lost", status="False", reason="UnknownDatabase")
    eventually(lambda: failures() >= before + 1, what="reconcile_failures_total{reason=UnknownDatabase} +1")
    assert operator.metric("reconcile_total", kind="Tenant", result="failure") >= attempts_before + 1
    # Every reason is one of a fixed set, pre-initialised so that rate() sees the first failure.
    series = samples(operator, "reconcile_failures_total")
    assert {labels["reason"] for labels, _ in series} <= set(REASONS)
    assert {(labels["kind"], labels["reason"]) for labels, _ in series} >= {
        (kind, reason) for kind in ("Tenant", "Quota", "FeatureFlag") for reason in REASONS
    }
    # A terminal failure is not work waiting: it leaves the queue.
    eventually(lambda: operator.metric("queue_depth", kind="Tenant") == 0, what="queue_depth{Tenant} back to 0")


def test_queue_depth_rises_while_postgres_is_down_and_returns_to_zero(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    def depth() -> float:
        return operator.metric("queue_depth", kind="Tenant")

    def unavailable() -> float:
        return operator.metric("reconcile_failures_total", kind="Tenant", reason="DatabaseUnavailable")

    eventually(lambda: depth() == 0, timeout=90, what="nothing pending before we start")
    before = unavailable()
    postgres = stack.postgres["second"]
    postgres.stop()
    try:
        cluster.create(PLURAL, namespace, tenant("patient", database="second"))
        cluster.create(PLURAL, namespace, tenant("patient-too", database="second"))
        eventually(lambda: depth() >= 2, timeout=60, what="queue_depth counts both waiting tenants")
        eventually(lambda: unavailable() >= before + 2, timeout=60, what="DatabaseUnavailable failures counted")
        cond = cluster.wait_condition(PLURAL, namespace, "patient", status="False", reason="DatabaseUnavailable")
        assert cond["status"]["phase"] == "Provisioning"
        # Liveness: unhealthy while a database pool does not answer.
        eventually(lambda: not operator.healthy(), timeout=30, what="/healthz fails while a pool is down")
        assert depth() >= 2, "retries waiting for their backoff still count"
    finally:
        postgres.start()
    for name in ("patient", "patient-too"):
        cluster.wait_condition(PLURAL, namespace, name, timeout=120)
    eventually(lambda: depth() == 0, timeout=60, what="queue_depth{Tenant} back to 0")
    # Kopf retries a failed probe activity after 60 s, holding /healthz meanwhile: hence the deadline.
    eventually(operator.healthy, timeout=120, what="/healthz passes again")


def test_latency_pool_build_info_and_tenant_phases(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    count_before = operator.metric("reconcile_duration_seconds_count", kind="Tenant")
    success_before = operator.metric("reconcile_total", kind="Tenant", result="success")
    cluster.create(PLURAL, namespace, tenant("measured"))
    cluster.wait_condition(PLURAL, namespace, "measured")
    eventually(lambda: operator.metric("reconcile_duration_seconds_count", kind="Tenant") > count_before,
               what="reconcile_duration_seconds has a new sample")
    assert operator.metric("reconcile_total", kind="Tenant", result="success") > success_before
    buckets = [labels["le"] for labels, _ in samples(operator, "reconcile_duration_seconds_bucket")
               if labels["kind"] == "Tenant"]
    assert "+Inf" in buckets and len(buckets) > 5
    assert operator.metric("reconcile_duration_seconds_sum", kind="Tenant") > 0

    (info,) = samples(operator, "tenancy_operator_build_info")
    assert info == ({"version": __version__}, 1.0)

    for target in ("default", "second"):
        assert operator.metric("db_pool_max_connections", target=target) == 10
        states = {labels["state"] for labels, _ in samples(operator, "db_pool_connections")
                  if labels["target"] == target}
        assert states >= {"used", "idle", "waiting"}
    eventually(lambda: operator.metric("tenants", phase="Active") >= 1, what="the sweep counts Active tenants")
    phases = {labels["phase"] for labels, _ in samples(operator, "tenants")}
    assert phases <= {"Provisioning", "Active", "Suspended", "Deleting", "Failed"}


def test_drift_repair_is_counted_and_reported_once(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("drifty"))
    cluster.wait_condition(PLURAL, namespace, "drifty")
    before = operator.metric("drift_repairs_total", kind="Tenant", object="secret")
    stack.kubectl("delete", "secret", "drifty-db", "-n", namespace)
    eventually(lambda: cluster.secret_data(namespace, "drifty-db"), timeout=60, what="Secret re-created")
    eventually(lambda: operator.metric("drift_repairs_total", kind="Tenant", object="secret") >= before + 1,
               what="drift_repairs_total{object=secret} +1")
    cluster.wait_event(namespace, "drifty", "DriftRepaired")
    # Events are for transitions: however many sweeps ran meanwhile, one Provisioned, one repair.
    reasons = [e["reason"] for e in cluster.events(namespace, "drifty")]
    assert reasons.count("Provisioned") == 1
    assert reasons.count("DriftRepaired") == 1


def test_one_json_log_line_per_reconcile(cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    cluster.create(PLURAL, namespace, tenant("logged"))
    cluster.wait_condition(PLURAL, namespace, "logged")
    cluster.create(PLURAL, namespace, tenant("misplaced", database="nowhere"))
    cluster.wait_condition(PLURAL, namespace, "misplaced", status="False", reason="UnknownDatabase")

    def lines(name: str) -> list[dict[str, Any]]:
        found = []
        for raw in operator.log_text().splitlines():
            record = json.loads(raw)  # every line is JSON
            if record.get("event") == "reconciled" and record.get("namespace") == namespace \
                    and record.get("name") == name:
                found.append(record)
        return found

    (ok,) = eventually(lambda: lines("logged"), what="a reconcile line for the tenant")[:1]
    assert ok["kind"] == "Tenant"
    assert ok["tenant"] == "tenant_logged"
    assert ok["result"] == "ready"
    assert ok["level"] == "info"
    assert isinstance(ok["duration_seconds"], float)
    assert ok["timestamp"].endswith("Z")
    (bad,) = eventually(lambda: lines("misplaced"), what="a reconcile line for the failing tenant")[:1]
    assert bad["result"] == "failure"
    assert bad["reason"] == "UnknownDatabase"
    assert bad["level"] in {"warning", "error"}
    assert "nowhere" in bad["message"]
    # That line says how the reconcile went; Kopf's own lines on a successful handling ("Handler
    # 'reconcile' succeeded.", "Creation is processed: 1 succeeded; 0 failed.", the latter again for
    # every object at each start) are not logged at INFO. Both Tenants were handled before this.
    kopf_info = [record["event"] for record in map(json.loads, operator.log_text().splitlines())
                 if record.get("logger", "").startswith("kopf") and record.get("level") == "info"
                 and record.get("namespace") == namespace]
    assert kopf_info == []


def test_no_secret_in_logs_events_status_or_metrics(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    passwords: set[str] = set()
    for name in ("keeper-a", "keeper-b"):
        cluster.create(PLURAL, namespace, tenant(name, tier="starter"))
    for name in ("keeper-a", "keeper-b"):
        cluster.wait_condition(PLURAL, namespace, name)
        passwords.add(cluster.secret_data(namespace, f"{name}-db")["password"])
    old = cluster.secret_data(namespace, "keeper-a-db")["password"]
    stack.kubectl("annotate", "tenant", "keeper-a", "-n", namespace, "tenancy.dev/rotate-credentials=now")
    rotated = eventually(
        lambda: (p := cluster.secret_data(namespace, "keeper-a-db")["password"]) != old and p,
        what="keeper-a's password rotated",
    )
    passwords.add(rotated)
    cluster.wait_event(namespace, "keeper-a", "CredentialsRotated")
    # The operator's own logins too.
    for pg in stack.postgres.values():
        passwords |= {pg.operator_password, pg.superuser_password}
    assert all(len(p) >= 16 for p in passwords)

    places: dict[str, str] = {
        "operator log": operator.log_text(),
        "metrics": operator.scrape(),
        "events": json.dumps([
            {"reason": e.reason, "message": e.message, "note": getattr(e, "note", None)}
            for e in cluster.core.list_event_for_all_namespaces().items
        ]),
    }
    for plural in ("tenants", "quotas", "featureflags"):
        objs = cluster.custom.list_cluster_custom_object("tenancy.dev", "v1alpha1", plural)["items"]
        places[plural] = json.dumps(objs)  # status, annotations (Kopf's stored spec), everything
    for where, text in places.items():
        for password in passwords:
            assert password not in text, f"a generated password appears in the {where}"
