"""`kubectl tenancy`, the kubectl plugin, run as users run it: a process (the console script's
module) with KUBECONFIG pointing at the session's real API server, against the real operator and
PostgreSQL. Its output and its effects (the Tenant, the Secret, a psql session) are checked
through the API and the database; no secret value ever appears in its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tenancy_devenv.stack import LocalStack
from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.flags.evaluation import evaluate
from tenancy_operator.flags.model import FlagDefinition

from .harness import GROUP, VERSION, Cluster, OperatorProcess, as_owner, connect, eventually, free_port, tenant

TENANTS = "tenants"
PLUGIN = [sys.executable, "-m", "tenancy_operator.plugin"]


def plugin(stack: LocalStack, *args: str, check: bool = True, env: dict[str, str] | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """One run of the plugin; psql from the stack's PostgreSQL on PATH."""
    environ = {**os.environ, "KUBECONFIG": str(stack.kubeconfig),
               "PATH": f"{stack.pg_bindir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    environ.pop("PGPASSWORD", None)
    proc = subprocess.run([*PLUGIN, *args], env=environ, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check:
        assert proc.returncode == 0, f"kubectl tenancy {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return proc


def quota(name: str, tenant_name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Quota", "metadata": {"name": name},
            "spec": {"tenantRef": {"name": tenant_name}, **spec}}


def feature_flag(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {"name": name}, "spec": spec}


def test_status_and_describe_show_the_fleet_and_one_tenant(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster.create(TENANTS, namespace, tenant("kp-alpha"))
    cluster.create(TENANTS, namespace, tenant("kp-beta", tier="starter"))
    cluster.create(TENANTS, namespace, tenant("kp-broken", database="nowhere"))
    cluster.create("quotas", namespace, quota("kp-beta-limits", "kp-beta", limits={"connections": 5, "storage": "1Gi"}))
    cluster.create("featureflags", namespace, feature_flag(
        "dash", tenants=[{"tenant": "kp-alpha", "variant": "on"}], users=[{"tenant": "kp-alpha", "user": "u1",
                                                                        "variant": "off"}]))
    cluster.wait_condition(TENANTS, namespace, "kp-alpha")
    cluster.wait_condition(TENANTS, namespace, "kp-beta")
    cluster.wait_condition(TENANTS, namespace, "kp-broken", status="False", reason="UnknownDatabase")
    cluster.wait_condition("featureflags", namespace, "dash")
    eventually(lambda: (cluster.get("quotas", namespace, "kp-beta-limits").get("status") or {}).get("usageRatio"),
               timeout=60, what="the Quota's usage measured")

    out = plugin(stack, "status", "-n", namespace).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "Active" in lines["kp-alpha"] and "Active" in lines["kp-beta"]
    assert "Failed" in lines["kp-broken"] and "False (UnknownDatabase)" in lines["kp-broken"]
    assert "% " in lines["kp-beta"], "kp-beta's quota pressure is shown"
    assert "3 tenant(s): 2 Active, 1 Failed" in out and "1 not ready (UnknownDatabase 1)" in out

    report = json.loads(plugin(stack, "status", "-n", namespace, "-o", "json").stdout)
    rows = {r["name"]: r for r in report["tenants"]}
    assert {n: r["phase"] for n, r in rows.items()} == {
        "kp-alpha": "Active", "kp-beta": "Active", "kp-broken": "Failed"}
    version = cluster.get(TENANTS, namespace, "kp-alpha")["status"]["schemaVersion"]
    assert rows["kp-alpha"]["version"] == version and report["summary"]["versions"] == {version: 2}
    assert report["summary"]["failures"] == {"UnknownDatabase": 1}
    assert rows["kp-beta"]["quota_ratio"] is not None and rows["kp-alpha"]["quota_ratio"] is None

    everywhere = plugin(stack, "status", "-A").stdout
    assert any(line.startswith(namespace) and " kp-alpha " in line for line in everywhere.splitlines())

    # kubectl's kubeconfig handling: two files merged from KUBECONFIG, --context picks one whose
    # namespace is the default.
    extra = tmp_path / "extra-kubeconfig"
    extra.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "contexts": [
        {"name": "plugin-test", "context": {"cluster": "tenancy-dev", "user": "admin", "namespace": namespace}}]}))
    merged = f"{stack.kubeconfig}{os.pathsep}{extra}"
    by_context = plugin(stack, "status", "--context", "plugin-test", env={"KUBECONFIG": merged}).stdout
    assert "kp-alpha" in by_context and "kp-broken" in by_context
    by_flag = plugin(stack, "--kubeconfig", str(stack.kubeconfig), "status", "-n", namespace,
                     env={"KUBECONFIG": str(tmp_path / "missing")}).stdout
    assert "kp-alpha" in by_flag
    nowhere = plugin(stack, "status", env={"KUBECONFIG": str(tmp_path / "missing")}, check=False)
    assert nowhere.returncode == 1 and "no kubeconfig found" in nowhere.stderr

    # As kubectl runs it: `kubectl tenancy` finds the executable kubectl-tenancy on the PATH.
    shim = tmp_path / "bin" / "kubectl-tenancy"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tenancy_operator.plugin "$@"\n')
    shim.chmod(0o755)
    path = os.pathsep.join([str(shim.parent), str(stack.bin_dir), os.environ.get("PATH", "")])
    via_kubectl = subprocess.run(["kubectl", "tenancy", "status", "-n", namespace], capture_output=True, text=True,
                                 env={**os.environ, "PATH": path, "KUBECONFIG": str(stack.kubeconfig)},
                                 timeout=120, check=False)
    assert via_kubectl.returncode == 0, via_kubectl.stderr
    assert "3 tenant(s): 2 Active, 1 Failed" in via_kubectl.stdout

    described = plugin(stack, "describe", "kp-alpha", "-n", namespace).stdout
    assert "Phase:          Active" in described
    ready = next(line for line in described.splitlines() if line.strip().startswith("Ready "))
    assert "True" in ready and "Provisioned" in ready
    jobs = described.split("Jobs (newest first):")[1].split("Quota:")[0]
    assert "provision" in jobs and "succeeded" in jobs
    flags = described.split("Feature flags targeting it:")[1]
    assert "dash" in flags and "all its users get on" in flags and "u1=off" in flags
    secret = cluster.secret_data(namespace, "kp-alpha-db")
    assert "Secret:         kp-alpha-db\n" in described and f"Login:          {secret['user']}" in described
    assert secret["password"] not in described

    beta = json.loads(plugin(stack, "describe", "kp-beta", "-n", namespace, "-o", "json").stdout)
    assert [q["metadata"]["name"] for q in beta["quotas"]] == ["kp-beta-limits"]
    assert beta["quotas"][0]["status"]["hard"]["connections"] == "5"
    assert any(e["reason"] == "Provisioned" for e in beta["events"])

    missing = plugin(stack, "describe", "nobody", "-n", namespace, check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_suspend_then_resume_round_trips(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(TENANTS, namespace, tenant("kp-sleepy"))
    cluster.wait_condition(TENANTS, namespace, "kp-sleepy")

    out = plugin(stack, "suspend", "kp-sleepy", "-n", namespace, "--wait", "--timeout", "120").stdout
    assert "spec.state set to Suspended" in out and "is Suspended" in out
    body = cluster.get(TENANTS, namespace, "kp-sleepy")
    assert body["spec"]["state"] == "Suspended" and body["status"]["phase"] == "Suspended"
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]

    # The operator's job ledger names who asked: the plugin's field manager.
    jobs = body["status"]["recentJobs"]
    assert any(j["kind"] == "suspend" and j.get("requestedBy") == "kubectl-tenancy" for j in jobs), jobs

    again = plugin(stack, "suspend", "kp-sleepy", "-n", namespace).stdout
    assert "Suspended already" in again

    out = plugin(stack, "resume", "kp-sleepy", "-n", namespace, "--wait", "--timeout", "120",
                 "--field-manager", "alice").stdout
    assert "is Active" in out
    body = cluster.get(TENANTS, namespace, "kp-sleepy")
    assert body["spec"]["state"] == "Active" and body["status"]["phase"] == "Active"
    resumed = next(j for j in body["status"]["recentJobs"] if j["kind"] == "resume")
    assert resumed.get("requestedBy") == "alice"
    described = plugin(stack, "describe", "kp-sleepy", "-n", namespace).stdout
    assert any(line.split()[:2] == ["resume", "succeeded"] and "alice" in line for line in described.splitlines())


def test_rotate_puts_a_new_password_in_the_secret(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(TENANTS, namespace, tenant("kp-spin"))
    cluster.wait_condition(TENANTS, namespace, "kp-spin")
    before = cluster.secret_data(namespace, "kp-spin-db")

    proc = plugin(stack, "rotate", "kp-spin", "-n", namespace, "--wait", "--timeout", "120")
    after = cluster.secret_data(namespace, "kp-spin-db")
    assert after["password"] != before["password"] and after["user"] != before["user"]
    assert f"names login {after['user']} now" in proc.stdout
    assert f"{before['user']} keeps working until" in proc.stdout
    annotation = cluster.get(TENANTS, namespace, "kp-spin")["metadata"]["annotations"]["tenancy.dev/rotate-credentials"]
    assert annotation in proc.stdout
    for text in (proc.stdout, proc.stderr):
        assert before["password"] not in text and after["password"] not in text


def test_psql_logs_in_as_the_tenant_with_its_secret(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(TENANTS, namespace, tenant("kp-talk", credentials={"readOnlyLogin": True}))
    cluster.wait_condition(TENANTS, namespace, "kp-talk")
    secret = cluster.secret_data(namespace, "kp-talk-db")

    proc = plugin(stack, "psql", "kp-talk", "-n", namespace, "--", "-X", "-At", "-c",
                  "select current_user, current_schema")
    assert proc.stdout.strip() == f"{secret['user']}|tenant_kp_talk"
    assert secret["password"] not in proc.stdout + proc.stderr

    readonly = cluster.secret_data(namespace, "kp-talk-db-readonly")
    proc = plugin(stack, "psql", "kp-talk", "-n", namespace, "--read-only", "--", "-X", "-At", "-c",
                  "select current_user")
    assert proc.stdout.strip() == readonly["user"] != secret["user"]

    # --host/--port override the Secret's (what one does after kubectl port-forward).
    host, port = secret["host"], secret["port"]
    proc = plugin(stack, "psql", "kp-talk", "-n", namespace, "--host", host, "--port", port, "--", "-X", "-At",
                  "-c", "select inet_server_port()")
    assert proc.stdout.strip() == port

    # Nothing listening there: psql's connection failure, with the hint about port-forwarding.
    unreachable = plugin(stack, "psql", "kp-talk", "-n", namespace, "--port", str(free_port()), "--", "-X", "-c",
                         "select 1", check=False)
    assert unreachable.returncode == 2 and "kubectl port-forward" in unreachable.stderr

    # psql's exit status is the plugin's.
    failed = plugin(stack, "psql", "kp-talk", "-n", namespace, "--", "-X", "-c", "select * from nope", check=False)
    assert failed.returncode != 0 and "nope" in failed.stderr


def test_retry_gives_a_stalled_job_one_more_attempt(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    template = {"metadata": {"name": "retry-schema"}, "data": {"0001_init.sql": "CREATE TABLE accounts (id int);"}}
    cluster.core.create_namespaced_config_map(namespace, template)
    cluster.create(TENANTS, namespace, tenant("kp-stuck", schemaTemplate="retry-schema"))
    cluster.wait_condition(TENANTS, namespace, "kp-stuck")
    with as_owner(stack.admin_dsn(), "tenant_kp_stuck") as owner:  # in the way of the next migration
        owner.execute("CREATE TABLE invoices (legacy text)")
    template["data"]["0002_invoices.sql"] = "CREATE TABLE invoices (id int PRIMARY KEY);"
    cluster.core.replace_namespaced_config_map("retry-schema", namespace, template)
    cluster.wait_condition(TENANTS, namespace, "kp-stuck", type_="Stalled", status="True", timeout=120)

    described = plugin(stack, "describe", "kp-stuck", "-n", namespace).stdout
    assert "Needs attention: migrate failed" in described

    with connect(stack.admin_dsn()) as conn:  # the admin fixes the cause
        conn.execute("DROP TABLE tenant_kp_stuck.invoices")
    out = plugin(stack, "retry", "kp-stuck", "-n", namespace, "--wait", "--timeout", "120").stdout
    assert "stalled on: MigrationFailed" in out and "is Ready (Active)" in out
    assert cluster.get(TENANTS, namespace, "kp-stuck")["status"]["schemaVersion"] == "0002_invoices"


def test_flags_eval_answers_as_the_published_definition(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    for name in ("acme", "globex"):
        cluster.create(TENANTS, namespace, tenant(name))
    spec = {
        "variants": {"on": {"value": True}, "off": {"value": False}, "beta": {"value": {"layout": "grid"}}},
        "defaultVariant": "off",
        "rollout": {"variant": "on", "percentage": 50},
        "tenants": [{"tenant": "acme", "variant": "beta", "percentage": 40}],
        "users": [{"tenant": "globex", "user": "vip", "variant": "beta"}],
    }
    cluster.create("featureflags", namespace, feature_flag("layout", **spec))
    flag = cluster.wait_condition("featureflags", namespace, "layout")
    declared = FlagDefinition.from_spec(FeatureFlagSpec.model_validate(flag["spec"]), "layout")

    cases = [("globex", "vip"), ("acme", "u-1"), ("acme", "u-2"), ("acme", "u-3"), ("globex", "u-1"),
             ("globex", "u-7"), ("acme", None)]
    reasons = set()
    for tenant_name, user in cases:
        args = ["flags", "eval", "layout", "--tenant", tenant_name, "-n", namespace, "-o", "json"]
        got = json.loads(plugin(stack, *args, *(["--user", user] if user else [])).stdout)
        want = evaluate(declared, tenant_name, user)
        assert (got["variant"], got["value"], got["reason"]) == (want.variant, want.value, str(want.reason)), \
            (tenant_name, user)
        assert got["configMap"] == "layout-flagd" and got["publishedGeneration"] == flag["metadata"]["generation"]
        reasons.add(got["reason"])
    assert {"USER_OVERRIDE", "TENANT_OVERRIDE", "ROLLOUT", "DEFAULT"} <= reasons

    table = plugin(stack, "flags", "eval", "layout", "--tenant", "globex", "--user", "vip", "-n", namespace).stdout
    assert "USER_OVERRIDE" in table and '{"layout": "grid"}' in table


def test_archives_lists_what_deletion_did_with_the_data(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(TENANTS, namespace, tenant("kp-old", deletionPolicy="Archive"))
    cluster.wait_condition(TENANTS, namespace, "kp-old")
    cluster.delete(TENANTS, namespace, "kp-old")
    eventually(lambda: cluster.gone(TENANTS, namespace, "kp-old"), timeout=120, what="tenant deleted")
    cluster.wait_event(namespace, "kp-old", "Archived")

    def listed() -> dict[str, Any]:
        found = json.loads(plugin(stack, "archives", "-n", namespace, "-o", "json").stdout)
        assert [a["tenant"] for a in found["archives"]] == ["kp-old"], found
        return found  # type: ignore[no-any-return]

    found = eventually(listed, what="the archive listed")
    (kept,) = found["archives"]
    assert kept["phase"] == "Available" and kept["sizeBytes"] > 0 and kept["location"].startswith("s3://")
    archived = [r for r in found["events"] if r["reason"] == "Archived"]
    assert len(archived) == 1 and archived[0]["tenant"] == "kp-old" and archived[0]["archive"] == kept["name"]
    assert any(r["reason"] == "Dropped" for r in found["events"])
    table = plugin(stack, "archives", "kp-old", "-n", namespace).stdout
    assert kept["name"] in table and "Available" in table and "Recent Events" in table


def test_rollouts_lists_both_kinds_and_asks_for_resume_and_rollback(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "kp-schema"},
                                                          "data": {"0001_init.sql": "CREATE TABLE t (id int);"}})
    cluster.create("schemarollouts", namespace, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SchemaRollout",
                                                 "metadata": {"name": "kp-waves"}, "spec": {"template": "kp-schema"}})
    cluster.create("featureflags", namespace, feature_flag(
        "kp-steps", rollout={"variant": "on", "steps": [5, 50], "stepInterval": "1h"}))
    cluster.create("featureflags", namespace, feature_flag("kp-plain", rollout={"variant": "on", "percentage": 5}))

    def listed() -> dict[str, dict[str, Any]]:
        rows = json.loads(plugin(stack, "rollouts", "-n", namespace, "-o", "json").stdout)
        by_name = {r["name"]: r for r in rows}
        assert by_name.get("kp-waves", {}).get("phase") == "Idle", rows
        assert by_name.get("kp-steps", {}).get("phase") == "Progressing", rows
        return by_name

    rows = eventually(listed, timeout=60, what="both rollouts listed with their phases")
    assert set(rows) == {"kp-waves", "kp-steps"}  # a flag without steps is no rollout
    assert rows["kp-steps"]["position"] == "step 1/2" and rows["kp-steps"]["progress"].startswith("5% served")
    table = plugin(stack, "rollouts", "-n", namespace).stdout
    assert "SchemaRollout" in table and "kp-steps" in table and "wave" in table

    plugin(stack, "rollout", "resume", "featureflag", "kp-steps", "-n", namespace, "--value", "r1")
    eventually(lambda: (cluster.get("featureflags", namespace, "kp-steps").get("status") or {})
               .get("rollout", {}).get("resumedBy") == "r1", timeout=60, what="the operator acted on the resume")
    plugin(stack, "rollout", "rollback", "schemarollout", "kp-waves", "-n", namespace, "--value", "b1")
    eventually(lambda: (cluster.get("schemarollouts", namespace, "kp-waves").get("status") or {})
               .get("rolledBackBy") == "b1", timeout=60, what="the operator acted on the rollback")
    refused = plugin(stack, "rollout", "rollback", "featureflag", "kp-steps", "-n", namespace, check=False)
    assert refused.returncode == 2 and "only a SchemaRollout rolls back" in refused.stderr
