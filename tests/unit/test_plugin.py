"""`kubectl tenancy`'s pure parts: tables, the fleet summary, quota pressure, describe, the psql
environment and argument handling. The commands themselves run against the real stack in
tests/integration/test_plugin.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tenancy_operator.k8s.kubectl import kubeconfig_paths
from tenancy_operator.plugin import render
from tenancy_operator.plugin.cli import parse
from tenancy_operator.plugin.psql import psql_environment

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def ts(ago: timedelta) -> str:
    return (NOW - ago).isoformat().replace("+00:00", "Z")


def tenant(name: str, phase: str | None, ready: str | None = "True", reason: str = "Provisioned", *,
           namespace: str = "ns", version: str | None = "0001_init", generation: int = 1, observed: int = 1,
           job: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"observedGeneration": observed}
    if phase:
        status["phase"] = phase
    if ready:
        status["conditions"] = [{"type": "Ready", "status": ready, "reason": reason, "message": "m",
                                 "lastTransitionTime": ts(timedelta(minutes=5))}]
    if version:
        status["schemaVersion"] = version
    if job:
        status["currentJob"] = job
    return {"metadata": {"name": name, "namespace": namespace, "generation": generation}, "spec": {},
            "status": status}


def quota(name: str, tenant_name: str, ratios: dict[str, float], namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"tenantRef": {"name": tenant_name}},
            "status": {"usageRatio": ratios, "used": dict.fromkeys(ratios, "1"),
                       "hard": dict.fromkeys(ratios, "2")}}


def test_age_is_kubectl_short() -> None:
    assert render.age(ts(timedelta(seconds=42)), NOW) == "42s"
    assert render.age(ts(timedelta(minutes=12)), NOW) == "12m"
    assert render.age(ts(timedelta(hours=5)), NOW) == "5h"
    assert render.age(ts(timedelta(days=3)), NOW) == "3d"
    assert render.age(None, NOW) == "-" and render.age("garbage", NOW) == "-"


def test_table_aligns_columns() -> None:
    out = render.table(["A", "LONGER"], [["xxxxx", "y"], ["z", None]])
    assert out.splitlines() == ["A       LONGER", "xxxxx   y", "z"]


def test_quota_pressure_is_the_fullest_limit_of_any_quota_of_the_tenant() -> None:
    pressure = render.quota_pressure([
        quota("q1", "acme", {"storage": 0.5, "connections": 0.95}),
        quota("q2", "acme", {"storage": 0.2}),
        quota("q3", "acme", {"storage": 0.99}, namespace="other"),
        {"metadata": {"name": "fresh", "namespace": "ns"}, "spec": {"tenantRef": {"name": "globex"}}},
    ])
    assert pressure[("ns", "acme")].short() == "95% connections"
    assert pressure[("other", "acme")].limit == "storage"
    assert ("ns", "globex") not in pressure  # not measured yet


def test_fleet_rows_and_summary() -> None:
    tenants = [
        tenant("b-ok", "Active"),
        tenant("a-sleep", "Suspended", reason="Suspended"),
        tenant("c-bad", "Failed", "False", "MigrationFailed", version="0001_init",
               job={"kind": "migrate", "state": "failed", "attempt": 3}),
        tenant("d-new", None, None, version=None, observed=0),
        tenant("e-edit", "Active", version="0002_more", generation=2),
    ]
    rows = render.fleet_rows(tenants, [quota("q", "b-ok", {"storage": 0.91})])
    assert [r.name for r in rows] == ["a-sleep", "b-ok", "c-bad", "d-new", "e-edit"]
    by = {r.name: r for r in rows}
    assert by["d-new"].phase == "Provisioning" and by["d-new"].ready == "Unknown"
    assert by["c-bad"].job == "migrate failed (attempt 3)" and by["b-ok"].quota == "91% storage"
    assert by["e-edit"].reconciling and not by["b-ok"].reconciling

    summary = render.fleet_summary(rows)
    assert summary["phases"] == {"Provisioning": 1, "Active": 2, "Suspended": 1, "Failed": 1}
    assert summary["failures"] == {"MigrationFailed": 1} and summary["notReady"] == 2
    assert summary["versions"] == {"0001_init": 3, "0002_more": 1}
    assert summary["nearQuota"] == 1 and summary["reconciling"] == 2  # d-new: not reported yet
    text = render.summary_text(summary)
    assert text.startswith("5 tenant(s): 1 Provisioning, 2 Active, 1 Suspended, 1 Failed; 2 not ready "
                           "(MigrationFailed 1)")
    assert "versions: 0001_init (3), 0002_more (1)" in text and "1 at >= 90% of a quota limit" in text

    table = render.fleet_table(rows, all_namespaces=True).splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "PHASE", "READY", "TIER", "VERSION", "QUOTA", "JOB"]
    assert "False (MigrationFailed)" in table[3] and table[5].split()[3:5] == ["True", "*"]
    assert render.summary_text(render.fleet_summary([])) == "No tenants."


def test_flag_targets_name_the_tenant_overrides() -> None:
    flags = [
        {"metadata": {"name": "a"}, "spec": {"tenants": [{"tenant": "acme", "variant": "on"}]}},
        {"metadata": {"name": "b"}, "spec": {"tenants": [{"tenant": "acme", "percentage": 30}],
                                             "users": [{"tenant": "acme", "user": "u1", "variant": "off"},
                                                       {"tenant": "globex", "user": "u2", "variant": "on"}]}},
        {"metadata": {"name": "c"}, "spec": {"tenants": [{"tenant": "globex", "variant": "on"}]}},
    ]
    targets = render.flag_targets(flags, "acme")
    assert [t["name"] for t in targets] == ["a", "b"]
    assert targets[0]["override"] == "all its users get on"
    assert targets[1]["override"] == "30% of its users get the rollout variant; 1 user override(s): u1=off"


def test_archive_rows_come_from_tenant_events() -> None:
    events = [
        {"reason": "Archived", "message": "archive ns-old-20261203T1100 written and verified (10 bytes, sha256 ab); "
         "kept for 30d", "lastTimestamp": ts(timedelta(minutes=3)),
         "involvedObject": {"kind": "Tenant", "name": "old", "namespace": "ns", "uid": "u"}},
        {"reason": "Dropped", "message": "schema and role tenant_old dropped",
         "lastTimestamp": ts(timedelta(minutes=2)),
         "involvedObject": {"kind": "Tenant", "name": "old", "namespace": "ns"}},
        {"reason": "Provisioned", "message": "x", "involvedObject": {"kind": "Tenant", "name": "old"}},
        {"reason": "Archived", "message": "archive x y", "involvedObject": {"kind": "ConfigMap", "name": "z"}},
    ]
    rows = render.archive_rows(events)
    assert [(r["reason"], r["archive"]) for r in rows] == [("Archived", "ns-old-20261203T1100"), ("Dropped", None)]
    assert "ns-old-20261203T1100" in render.archives_table(rows, NOW, all_namespaces=False)


def test_describe_shows_every_section_and_names_secrets_only() -> None:
    body = tenant("acme", "Active", job={"kind": "migrate", "state": "failed", "attempt": 2, "message": "boom"})
    body["spec"] = {"credentials": {"readOnlyLogin": True}, "deletionPolicy": "Archive"}
    body["status"].update({"secretName": "acme-db", "schema": "tenant_acme", "credentials": {"user": "tenant_acme_a"},
                           "recentJobs": [{"kind": "provision", "state": "succeeded", "attempt": 1,
                                           "startedAt": ts(timedelta(hours=3)), "requestedBy": "argocd"}],
                           "effectiveLimits": {"connections": "5"}})
    text = render.describe_text(
        body, quotas=[quota("q", "acme", {"connections": 0.4})],
        flags=[{"metadata": {"name": "dash"}, "spec": {"tenants": [{"tenant": "acme", "variant": "on"}]}}],
        events=[{"type": "Normal", "reason": "Provisioned", "message": "ready",
                 "lastTimestamp": ts(timedelta(hours=3))},
                {"type": "Warning", "reason": "MigrationFailed", "message": "boom", "count": 3,
                 "lastTimestamp": ts(timedelta(minutes=1))}],
        secrets_present={"acme-db": True, "acme-db-readonly": False}, now=NOW)
    for expected in ("Schema:         tenant_acme (version 0001_init)", "Deletion:       Archive (archives kept 30d)",
                     "Needs attention: migrate failed (attempt 2): boom", "provision", "connections", "40%",
                     "Effective limits: connections=5", "dash", "all its users get on", "Provisioned",
                     "acme-db-readonly (missing)", "Login:          tenant_acme_a"):
        assert expected in text, expected
    provision = next(line for line in text.splitlines() if line.strip().startswith("provision"))
    assert provision.split()[5] == "argocd"  # BY: who asked for the job
    events = text.split("Events:")[1].splitlines()
    assert events[-1].split()[:4] == ["Warning", "MigrationFailed", "1m", "(x3)"]


def test_describe_shows_where_the_tenant_serves_and_its_last_move() -> None:
    body = tenant("acme", "Active")
    body["spec"] = {"database": "us"}
    body["status"].update({"database": "default"})
    text = render.describe_text(body, quotas=[], flags=[], events=[], secrets_present={}, now=NOW)
    assert "Database:       default (spec asks for us: see Ready)" in text
    assert "Last move:      -" in text
    body["status"].update({"database": "us", "lastMove": {
        "source": "default", "destination": "us", "finishedAt": ts(timedelta(minutes=5)),
        "writeDowntimeSeconds": 4.62, "tables": 3, "rows": 1200, "archive": "acme-20261203t1100z-ab12cd"}})
    text = render.describe_text(body, quotas=[], flags=[], events=[], secrets_present={}, now=NOW)
    assert "Database:       us\n" in text
    assert ("Last move:      default -> us, 5m ago, writes stopped 4.6 s, 3 table(s) / 1200 row(s) verified,"
            " from archive acme-20261203t1100z-ab12cd") in text


def test_psql_environment_carries_the_password_only_in_pgpassword() -> None:
    data = {"host": "db.internal", "port": "5432", "user": "tenant_acme_a", "dbname": "app", "sslmode": "require",
            "password": "s3cret"}
    env = psql_environment(data, host=None, port=None, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "PGHOST": "db.internal", "PGPORT": "5432", "PGUSER": "tenant_acme_a",
                   "PGDATABASE": "app", "PGSSLMODE": "require", "PGPASSWORD": "s3cret", "PGAPPNAME": "kubectl-tenancy"}
    forwarded = psql_environment(data, host="127.0.0.1", port="15432", base={})
    assert (forwarded["PGHOST"], forwarded["PGPORT"]) == ("127.0.0.1", "15432")


def test_arguments_after_double_dash_go_to_psql_only() -> None:
    args = parse(["psql", "acme", "-n", "ns", "--", "-c", "select 1", "-n"])
    assert (args.tenant, args.namespace, args.psql_args) == ("acme", "ns", ["-c", "select 1", "-n"])
    args = parse(["-n", "ns", "--context", "c", "status", "-A"])
    assert (args.namespace, args.context, args.all_namespaces) == ("ns", "c", True)
    with pytest.raises(SystemExit):
        parse(["status", "--", "-c", "x"])


def test_kubeconfig_paths_like_kubectl(tmp_path: Any) -> None:
    assert kubeconfig_paths("~/k") == (str(tmp_path.home() / "k"),)
    assert kubeconfig_paths(None, {"KUBECONFIG": "/a:/b::"}) == ("/a", "/b")
    assert kubeconfig_paths(None, {})[0].endswith("/.kube/config")
