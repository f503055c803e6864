"""The alert rules (helm/tenancy-operator/files/alerts.yaml): valid for Prometheus, unit-tested with
``promtool test rules`` (alert_rules_test.yaml), each with a runbook section, on metrics that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from tenancy_operator.observability.metrics import TENANT_REGISTRY  # and the operator's metrics in REGISTRY

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "tenancy-operator" / "files" / "alerts.yaml"
RULE_TESTS = Path(__file__).parent / "alert_rules_test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/tenancy-dev/tenancy-operator/blob/main/docs/runbook.md"
ALERTS = {
    "TenancyOperatorDown",
    "TenancyReconcileFailures",
    "TenancyQueueDepthHigh",
    "TenancyQuotaNearLimit",
    "TenancyLifecycleJobFailed",
    "TenancyDatabasePoolSaturated",
    "TenancyIsolationViolation",
    "TenancyNoisyNeighbor",
    "TenancyTenantStalled",
}
PROMQL_FUNCTIONS_AND_KEYWORDS = {
    "absent", "sum", "by", "rate", "increase", "ignoring", "on", "or", "unless", "offset", "and", "without",
    "topk", "histogram_quantile", "count", "max", "min", "avg", "le",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe is not None, "promtool is missing: run hack/install-system-deps.sh (Debian package prometheus)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_accepts_the_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = promtool("test", "rules", RULE_TESTS.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == ALERTS


def test_each_alert_has_severity_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^## (.+)$", runbook, re.MULTILINE)}
    assert {r["alert"] for r in rules()} == ALERTS
    for rule in rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}"
        assert name in headings, f"docs/runbook.md has no '## {name}' section"
        section = runbook.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("Meaning", "Diagnose", "Fix", "Verify"):
            assert f"### {part}" in section, f"runbook section {name} lacks '### {part}'"


def exported_metric_names() -> set[str]:
    """Sample names the operator's registry exposes (counters get _total, histograms _bucket...),
    and Prometheus' own ``up``."""
    names: set[str] = {"up"}
    for family in [*REGISTRY.collect(), *TENANT_REGISTRY.collect()]:
        names |= {family.name, f"{family.name}_total", f"{family.name}_info", f"{family.name}_bucket",
                  f"{family.name}_sum", f"{family.name}_count"}
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (good enough for our expressions: no functions with
    string arguments besides label matchers)."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"(?<![0-9.])\b[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return words - PROMQL_FUNCTIONS_AND_KEYWORDS


def test_rules_use_metrics_the_operator_exports() -> None:
    used = set().union(*(promql_metric_names(r["expr"]) for r in rules()))
    assert "reconcile_failures_total" in used
    unknown = used - exported_metric_names()
    assert not unknown, f"alerts use metrics the operator does not export: {sorted(unknown)}"
