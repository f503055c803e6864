"""The Helm chart's static parts: CRDs in step with crds/, values covered by the schema, the
Grafana dashboard; and sharded replicas rendered offline (`helm template`, no cluster). Rendering
the rest, and installing, are in tests/integration/test_helm.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_alert_rules import exported_metric_names, promql_metric_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tenancy-operator"
KUBE_VERSION = "1.36.3"  # as tests/integration/test_helm.py: the test kube-apiserver's
RELEASE, NAMESPACE = "acme", "tenancy-system"
FULLNAME = f"{RELEASE}-tenancy-operator"
SHARDING = ["--set", "sharding.enabled=true"]
SHARD_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "list", "watch", "create", "update", "delete"]}]


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
    for needle in ("argocd/argocd-cm.yaml", "grafanaDashboard", "peering", "values.schema.json", "existingSecret",
                   "sharding.enabled", "ShardedListAndWatch", "exit code 3", "tenancy.dev/shard-group"):
        assert needle in readme


# --- sharded replicas, rendered offline ------------------------------------------------------------


def helm_binary() -> str:
    """The helm `make binaries` builds (hack/build-control-plane.sh, at its pinned HELM_VERSION, in
    the machine's cache), else one on PATH."""
    script = (ROOT / "hack" / "build-control-plane.sh").read_text()
    version = re.search(r"^HELM_VERSION=(\S+)$", script, re.MULTILINE)
    assert version is not None, "hack/build-control-plane.sh no longer sets HELM_VERSION"
    cache = os.environ.get("TENANCY_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tenancy-operator")
    built = sorted(Path(cache).glob(f"k8s-*-helm-{version[1]}/bin/helm"))
    exe = str(built[-1]) if built else shutil.which("helm")
    assert exe is not None, "helm is missing: run `make binaries` (hack/build-control-plane.sh)"
    return exe


class Helm:
    """Offline helm: its caches in a temporary home, no kubeconfig."""

    def __init__(self, home: Path) -> None:
        self.exe = helm_binary()
        self.env = {"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data"), "HOME": str(home), "PATH": "/usr/bin:/bin"}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exe, *args], capture_output=True, text=True, env=self.env, timeout=120)

    def template(self, *args: str) -> list[dict[str, Any]]:
        out = self("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def refused(self, *args: str) -> str:
        out = self("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args)
        assert out.returncode != 0, f"rendered with {args}"
        return out.stderr


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm-home"))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container_env(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}


def shard_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Role", "RoleBinding") and d["metadata"]["name"] == f"{FULLNAME}-shards"]


def test_default_render_has_no_sharding(helm: Helm) -> None:
    docs = helm.template()
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    env = container_env(docs)
    assert not {name for name in env if name.startswith("TENANCY_SHARD")}
    assert "POD_NAMESPACE" not in env
    assert not shard_roles(docs)
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]  # cluster scope: nothing namespaced
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_kube_max_connections_reaches_the_operator(helm: Helm) -> None:
    assert container_env(helm.template())["TENANCY_KUBE_MAX_CONNECTIONS"]["value"] == "32"
    env = container_env(helm.template("--set", "kubeMaxConnections=8"))
    assert env["TENANCY_KUBE_MAX_CONNECTIONS"]["value"] == "8"
    assert "kubeMaxConnections" in helm.refused("--set", "kubeMaxConnections=1")


def test_sharding_renders_replicas_rolling_one_at_a_time(helm: Helm) -> None:
    docs = helm.template(*SHARDING)
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    # A leaving replica hands its slices over on SIGTERM; no surge pod to move them twice.
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 15
    assert not [d for d in docs if d["kind"] in ("ClusterKopfPeering", "KopfPeering")]
    dep = one(helm.template(*SHARDING, "--set", "sharding.replicas=5"), "Deployment")
    assert dep["spec"]["replicas"] == 5


def test_sharding_env_and_downward_api(helm: Helm) -> None:
    env = container_env(helm.template(*SHARDING))
    values = {name: e.get("value") for name, e in env.items()}
    assert values["TENANCY_SHARDING"] == "true"
    assert values["TENANCY_SHARD_SLICES"] == "16"
    assert values["TENANCY_SHARD_LEASE_SECONDS"] == "15"
    assert values["TENANCY_SHARD_GROUP"] == FULLNAME  # one group per release
    assert "TENANCY_SHARD_NAMESPACE" not in values  # the Leases live in the pod's namespace
    assert "TENANCY_PEERING_NAME" not in values
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    env = container_env(helm.template(*SHARDING, "--set", "sharding.slices=64", "--set", "sharding.leaseSeconds=20"))
    assert env["TENANCY_SHARD_SLICES"]["value"] == "64"
    assert env["TENANCY_SHARD_LEASE_SECONDS"]["value"] == "20"
    # The release's full name is the group, whatever the release is called.
    env = container_env(helm.template(*SHARDING, "--set", "fullnameOverride=tenancy"))
    assert env["TENANCY_SHARD_GROUP"]["value"] == "tenancy"


@pytest.mark.parametrize("scope", [[], ["--set", "rbac.scope=namespaced", "--set", f"namespaces={{a,{NAMESPACE}}}"]],
                         ids=["cluster", "namespaced"])
def test_sharding_grants_leases_in_the_release_namespace(helm: Helm, scope: list[str]) -> None:
    docs = helm.template(*SHARDING, *scope)
    role, binding = sorted(shard_roles(docs), key=lambda d: d["kind"])
    assert role["kind"] == "Role" and binding["kind"] == "RoleBinding"
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == SHARD_RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{FULLNAME}-shards"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # Leases nowhere else: not in the ClusterRole, not in the watched namespaces' Roles.
    others = [d for d in docs if d["kind"] in ("Role", "ClusterRole") and d is not role]
    assert others
    assert not [r for d in others for r in d["rules"] if "coordination.k8s.io" in r["apiGroups"]]
    # Names never collide, even with the release namespace among the watched ones.
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    assert not shard_roles(helm.template(*SHARDING, *scope, "--set", "rbac.create=false"))


def test_sharding_pdb_takes_one_replica_at_a_time(helm: Helm) -> None:
    pdb = one(helm.template(*SHARDING), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(helm.template(*SHARDING), "Deployment")["spec"]["selector"][
        "matchLabels"]
    # Peering keeps its budget (one of two replicas stays); podDisruptionBudget.enabled=false still wins.
    assert one(helm.template("--set", "peering.enabled=true"), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    docs = helm.template(*SHARDING, "--set", "podDisruptionBudget.enabled=false")
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "peering.enabled=true"], "sharding.enabled and peering.enabled exclude each other"),
    (["--set", "sharding.slices=2"],
     "sharding.slices (2) must be at least sharding.replicas (3), or 1 for active/standby"),
    (["--set", "sharding.replicas=17"], "sharding.slices (16) must be at least sharding.replicas (17)"),
    (["--set", "terminationGracePeriodSeconds=15"], "must exceed sharding.leaseSeconds (15)"),
    (["--set", "sharding.leaseSeconds=2"], "sharding/leaseSeconds"),
    (["--set", "sharding.slices=2000"], "sharding/slices"),
    (["--set", "sharding.replicas=0"], "sharding/replicas"),
    (["--set", "sharding.replica=2"], "replica"),
], ids=["peering", "fewer-slices", "more-replicas", "grace", "lease", "slices-max", "no-replicas", "typo"])
def test_sharding_refusals(helm: Helm, args: list[str], message: str) -> None:
    assert message in helm.refused(*SHARDING, *args)


def test_sharding_edge_values_render(helm: Helm) -> None:
    helm.template(*SHARDING, "--set", "sharding.replicas=16")  # slices == replicas
    helm.template(*SHARDING, "--set", "sharding.slices=1")  # active/standby: one works, two stand by
    helm.template(*SHARDING, "--set", "sharding.leaseSeconds=29")  # grace 30 > 29
    helm.template(*SHARDING, "--set", "terminationGracePeriodSeconds=null")  # unset: Kubernetes' 30 s


@pytest.mark.parametrize("args", [SHARDING, [*SHARDING, "--set", "rbac.scope=namespaced", "--set", "namespaces={a,b}"],
                                  [*SHARDING, "--set", "serviceMonitor.enabled=true", "--set",
                                   "prometheusRule.enabled=true", "--set", "grafanaDashboard.enabled=true"]],
                         ids=["sharding", "sharding-namespaced", "sharding-monitoring"])
def test_helm_lint_sharding(helm: Helm, args: list[str]) -> None:
    out = helm("lint", "--strict", str(CHART), *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_documented_shard_metrics_are_exported() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    readme = (CHART / "README.md").read_text()
    for name in ("shard_slices_held", "shard_slice_held", "shard_handovers_total"):
        assert name in exported_metric_names()
        assert name in notes and name in readme
