"""The Helm chart's static parts: CRDs in step with crds/, values covered by the schema, the
Grafana dashboard. Rendering and installing are in tests/integration/test_helm.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_alert_rules import exported_metric_names, promql_metric_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tenancy-operator"


def test_chart_crds_are_the_generated_ones() -> None:
    """The chart renders the tenancy CRDs from files/crds/ (templates/crds.yaml, so that `helm
    upgrade` upgrades them): a copy of crds/, which `tenancy-operator crds` generates. `make crds`
    copies them: cp crds/*.yaml helm/tenancy-operator/files/crds/."""
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert generated
    for name in generated:
        assert (CHART / "files" / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"helm/tenancy-operator/files/crds/{name} differs from crds/{name}: run `make crds` "
            "(cp crds/*.yaml helm/tenancy-operator/files/crds/)"
        )
    ours = {p.name for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert ours == set(generated), "the chart has a CRD that crds/ no longer has"
    # Helm would install a tenancy CRD left in crds/ before the templates and never upgrade it.
    assert not list((CHART / "crds").glob("tenancy.dev_*")), "tenancy CRDs belong in files/crds/, not crds/"
    # Kopf's peering CRDs stay in crds/: Kopf's, not ours, and possibly installed by another operator.
    peering = list(yaml.safe_load_all((CHART / "crds" / "kopf.dev_peerings.yaml").read_text()))
    assert {d["spec"]["names"]["kind"] for d in peering} == {"ClusterKopfPeering", "KopfPeering"}


def _schema_covers(values: Any, schema: dict[str, Any], path: str) -> None:
    if not isinstance(values, dict) or schema.get("type") != "object" or "properties" not in schema:
        return
    for key, value in values.items():
        assert key in schema["properties"], f"values.yaml {path}{key} is not in values.schema.json"
        _schema_covers(value, schema["properties"][key], f"{path}{key}.")


def test_every_value_is_in_the_schema_and_the_schema_is_strict() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False  # a typo in a values file fails `helm install`
    _schema_covers(values, schema, "")
    assert schema["properties"]["database"]["required"] == ["existingSecret"]


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "files" / "dashboard.json").read_text())  # type: ignore[no-any-return]


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_dashboard_shows_failures_and_queue_depth_first() -> None:
    d = dashboard()
    assert d["title"] == "Tenancy operator"
    assert d["uid"] == "tenancy-operator"
    graphs = [p for p in d["panels"] if p["type"] != "row"]
    assert "reconcile_failures_total" in panel_exprs(graphs[0])[0]
    assert "queue_depth" in panel_exprs(graphs[1])[0]
    titles = " ".join(p["title"] for p in graphs)
    for wanted in ("Reconcile duration", "Tenants by phase", "Top quota usage", "Database pool"):
        assert wanted in titles
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("panel", [p for p in dashboard()["panels"] if p.get("targets")], ids=lambda p: p["title"])
def test_dashboard_queries_use_exported_metrics_and_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["datasource"]["uid"] == "${datasource}"
    for expr in panel_exprs(panel):
        names = promql_metric_names(expr.replace("$__rate_interval", "5m"))
        assert names, expr
        unknown = names - exported_metric_names()
        assert not unknown, f"{panel['title']}: unknown metrics {unknown}"
    gp = panel["gridPos"]
    assert gp["x"] + gp["w"] <= 24


def test_argocd_health_and_dashboard_are_documented_in_the_chart_readme() -> None:
    readme = (CHART / "README.md").read_text()
    for needle in ("argocd/argocd-cm.yaml", "grafanaDashboard", "peering", "values.schema.json", "existingSecret"):
        assert needle in readme
