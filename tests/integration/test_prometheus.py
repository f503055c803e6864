"""A real Prometheus (Debian's package) scrapes the running operator: the failure counter is
queryable through its HTTP API, the chart's alert rules load and evaluate, and every query of the
Grafana dashboard is valid PromQL that Prometheus accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenancy_devenv.stack import LocalStack

from .harness import GROUP, VERSION, Cluster, OperatorProcess, eventually, tenant
from .prom import Prometheus

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tenancy-operator"
JOB = "tenancy-operator"


@pytest.fixture(scope="module")
def prometheus(stack: LocalStack, operator: OperatorProcess) -> Iterator[Prometheus]:
    prom = Prometheus(stack.workdir / "prometheus", {JOB: operator.metrics_port}, port=operator.prometheus_port,
                      rule_files=[CHART / "files" / "alerts.yaml"])
    try:
        yield prom
    finally:
        prom.stop()
    assert prom.proc.poll() is not None  # no Prometheus left behind


def value(result: list[dict[str, Any]]) -> float:
    return sum(float(r["value"][1]) for r in result)


def test_the_failure_counter_is_queryable_in_prometheus(
    prometheus: Prometheus, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    eventually(lambda: value(prometheus.query(f'up{{job="{JOB}"}}')) == 1, timeout=60, what="target up")
    promql = f'reconcile_failures_total{{job="{JOB}", kind="Tenant", reason="UnknownDatabase"}}'
    eventually(lambda: prometheus.query(promql), timeout=30, what="the pre-initialised series is scraped")
    before = operator.metric("reconcile_failures_total", kind="Tenant", reason="UnknownDatabase")
    cluster.create("tenants", namespace, tenant("unscraped", database="nowhere"))
    cluster.wait_condition("tenants", namespace, "unscraped", status="False", reason="UnknownDatabase")
    eventually(lambda: value(prometheus.query(promql)) >= before + 1, timeout=60,
               what="Prometheus sees the failure")
    # The dashboard's first panel shows it.
    rate = f'sum by (kind, reason) (increase(reconcile_failures_total{{job="{JOB}"}}[5m])) > 0'
    eventually(lambda: any(r["metric"].get("reason") == "UnknownDatabase" for r in prometheus.query(rate)),
               timeout=30, what="increase() over the failure")
    # Build info and queue depth arrive too.
    assert prometheus.query(f'tenancy_operator_build_info{{job="{JOB}"}}')
    assert {r["metric"]["kind"] for r in prometheus.query(f'queue_depth{{job="{JOB}"}}')} >= {
        "Tenant", "Quota", "FeatureFlag"}


def stalled_in_cluster(cluster: Cluster, reason: str) -> set[str]:
    """Tenants whose status says Stalled=True for ``reason``, as the API server has them."""
    items = cluster.custom.list_cluster_custom_object(GROUP, VERSION, "tenants")["items"]
    return {
        f"{t['metadata']['namespace']}/{t['metadata']['name']}"
        for t in items
        if any(c["type"] == "Stalled" and c["status"] == "True" and c["reason"] == reason
               for c in (t.get("status") or {}).get("conditions") or [])
    }


def test_a_stalled_tenant_is_counted_and_its_alert_is_pending(
    prometheus: Prometheus, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A stalled Tenant is retried no more, so it stops adding to reconcile_failures_total:
    stalled_objects keeps it visible (TenancyTenantStalled) until it is fixed or deleted."""
    reason, name = "UnknownDatabase", f"{namespace}/stuck"

    def gauge_matches_cluster() -> set[str]:
        stalled = stalled_in_cluster(cluster, reason)
        assert operator.metric("stalled_objects", kind="Tenant", reason=reason) == len(stalled), stalled
        return stalled

    cluster.create("tenants", namespace, tenant("stuck", database="nowhere"))
    cluster.wait_condition("tenants", namespace, "stuck", type_="Stalled", status="True", reason=reason)
    assert name in eventually(gauge_matches_cluster, timeout=30, what="stalled_objects counts the Tenant")
    series = f'stalled_objects{{job="{JOB}", kind="Tenant", reason="{reason}"}}'
    eventually(lambda: value(prometheus.query(series)) >= 1, timeout=60, what="Prometheus scrapes it")
    alert = f'ALERTS{{alertname="TenancyTenantStalled", kind="Tenant", reason="{reason}"}}'
    eventually(lambda: {r["metric"]["alertstate"] for r in prometheus.query(alert)} == {"pending"}, timeout=60,
               what="TenancyTenantStalled pending (it fires after 10 minutes)")

    cluster.delete("tenants", namespace, "stuck")
    eventually(lambda: name not in gauge_matches_cluster(), timeout=60, what="the deleted Tenant no longer counts")


def test_alert_rules_load_and_evaluate(prometheus: Prometheus) -> None:
    def groups() -> list[dict[str, Any]]:
        body = prometheus.api("rules", type="alert")
        assert body["status"] == "success"
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        assert len(rules) == 9
        assert all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("20") for r in rules), rules
        return rules

    rules = eventually(groups, timeout=60, what="every rule evaluated without error")
    by_name = {r["name"]: r for r in rules}
    assert by_name["TenancyOperatorDown"]["state"] == "inactive"  # the operator is scraped and up
    for rule in rules:
        assert rule["annotations"]["runbook_url"].endswith(f"#{rule['name'].lower()}")


def test_every_dashboard_query_is_valid(prometheus: Prometheus) -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 10
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "1m").replace("$job", JOB)
        body = prometheus.api("query", query=promql)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
    failures = dashboard["panels"][1]["targets"][0]["expr"].replace("$__rate_interval", "5m").replace("$job", JOB)
    assert "reconcile_failures_total" in failures
