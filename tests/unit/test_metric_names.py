"""The operator's metrics follow Prometheus' conventions and are all documented; the stalled-object
gauge counts each object once; Events name the pod that posted them."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from tenancy_operator.observability import metrics
from tenancy_operator.observability.events import reporting_instance

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
OURS = {name: m for name, m in vars(metrics).items() if isinstance(m, MetricWrapperBase)}
PER_TENANT = {name: m for name, m in vars(metrics).items() if isinstance(m, metrics.TenantSeries)}


def exposed_names() -> set[str]:
    """The name each of the operator's metrics is scraped under (a counter's with _total, an info's with _info)."""
    names = set()
    for m in [*OURS.values(), *PER_TENANT.values()]:
        for family in m.describe():
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
    return names


def test_no_label_is_a_prometheus_target_label() -> None:
    """`job` and `instance` are what Prometheus gives every series of a target: a metric's own would
    overwrite them, or be renamed exported_job."""
    for name, m in OURS.items():
        assert not {"job", "instance"} & set(m._labelnames), name
    for name, s in PER_TENANT.items():
        assert not {"job", "instance"} & set(s.labelnames), name


def test_names_carry_their_unit_and_type() -> None:
    for name, m in [*OURS.items(), *PER_TENANT.items()]:
        for family in m.describe():
            if family.type == "histogram":
                assert family.name.endswith("_seconds"), f"{name}: a histogram of durations is in seconds"
            if family.type == "gauge":
                assert not family.name.endswith("_total"), f"{name}: _total is for counters"
    assert "reconcile_failures_total" in exposed_names() and "queue_depth" in exposed_names()


def test_feature_flag_changes_are_not_labelled_per_flag() -> None:
    assert metrics.FEATURE_FLAG_CHANGES._labelnames == ("change",)


def test_every_metric_is_in_the_operations_table() -> None:
    section = OPERATIONS.read_text().split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {n for row in rows for n in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert exposed_names() <= documented, sorted(exposed_names() - documented)
    assert documented <= exposed_names(), sorted(documented - exposed_names())
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 and cells[1] in {"counter", "gauge", "histogram"} and cells[3], row


def test_stalled_objects_counts_each_object_once_and_returns_to_zero() -> None:
    def value(kind: str, reason: str) -> float | None:
        return REGISTRY.get_sample_value("stalled_objects", {"kind": kind, "reason": reason})

    stalled = metrics.StalledObjects()
    stalled.update("Tenant", "a/one", "UnknownDatabase")
    stalled.update("Tenant", "a/one", "UnknownDatabase")  # reconciled again, still stalled
    stalled.update("Tenant", "b/two", "UnknownDatabase")
    stalled.update("FeatureFlag", "a/one", "Conflict")
    assert value("Tenant", "UnknownDatabase") == 2
    assert value("FeatureFlag", "Conflict") == 1
    stalled.update("Tenant", "a/one", "MigrationFailed")  # another reason now
    assert (value("Tenant", "UnknownDatabase"), value("Tenant", "MigrationFailed")) == (1, 1)
    stalled.update("Tenant", "a/one", None)  # fixed: Ready
    stalled.forget("Tenant", "b/two")  # deleted
    stalled.forget("Tenant", "never/seen")
    assert (value("Tenant", "UnknownDatabase"), value("Tenant", "MigrationFailed")) == (0, 0)
    assert stalled.count("Tenant") == 0 and stalled.count("FeatureFlag") == 1
    stalled.forget("FeatureFlag", "a/one")
    assert value("FeatureFlag", "Conflict") == 0


def test_events_report_the_pod_or_else_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "tenancy-operator-7f9c6-xk2lp")
    assert reporting_instance() == "tenancy-operator-7f9c6-xk2lp"
    monkeypatch.delenv("POD_NAME")
    assert reporting_instance() == socket.gethostname()[:128]
