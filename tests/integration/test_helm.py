"""The Helm chart against the real API server: lint, server-side dry run of what it renders, the
restricted Pod Security Standard, and a real `helm install` / `helm uninstall`.

There is no kubelet in the test control plane: pods are never started, so we check the release and
its objects, and RBAC separately (test_rbac.py runs the operator with the chart's ServiceAccount).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, crd_schema_replaced, tenant

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tenancy-operator"
KUBE_VERSION = "1.36.3"  # the test kube-apiserver's (test_stack.py), for offline `helm template`
ALL_FEATURES = [
    "--set", "peering.enabled=true",
    "--set", "serviceMonitor.enabled=true",
    "--set", "prometheusRule.enabled=true",
    "--set", "grafanaDashboard.enabled=true",
]
NAMESPACED = ["--set", "rbac.scope=namespaced", "--set", "namespaces={a,b}"]
MONITORING = {"ServiceMonitor", "PrometheusRule"}  # prometheus-operator CRDs are not in the test cluster
TENANCY_CRDS = ("tenants.tenancy.dev", "quotas.tenancy.dev", "featureflags.tenancy.dev", "schemarollouts.tenancy.dev",
                "tenantarchives.tenancy.dev")
# The session's CRDs are the harness's (applied from crds/ at start, as on a cluster where they are
# managed apart from the release): installs of the chart leave them alone, except the CRD upgrade test.
NO_CRDS = ["--set", "crds.install=false"]
# What the operator needs in each namespace it serves: the namespaced scope's Roles, the ClusterRole's
# first rules (test_rbac.py runs the operator with each).
NAMESPACE_RULES = [
    {"apiGroups": ["tenancy.dev"], "resources": ["tenants", "featureflags", "schemarollouts"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["tenancy.dev"], "resources": ["tenantarchives"],
     "verbs": ["get", "list", "watch", "patch", "create", "delete"]},
    {"apiGroups": ["tenancy.dev"], "resources": ["quotas"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["tenancy.dev"], "resources": ["tenants/status", "quotas/status", "featureflags/status",
                                                 "schemarollouts/status", "tenantarchives/status"],
     "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "update", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update", "delete"]},
]


class Helm:
    """The helm binary built with the control plane, with its caches in the session's workdir."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        home = stack.workdir / "helm-home"
        self.env = {
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(stack.kubeconfig),
            "HOME": str(home),  # client-go's discovery cache goes to $HOME/.kube
            "PATH": "/usr/bin:/bin",
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [str(self.stack.bin_dir / "helm"), *args], capture_output=True, text=True, env=self.env, timeout=120
        )
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def template(self, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
        out = self(
            "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def helm(stack: LocalStack) -> Helm:
    return Helm(stack)


@pytest.fixture
def release() -> str:
    return f"r{uuid.uuid4().hex[:8]}"


def server_dry_run(stack: LocalStack, docs: list[dict[str, Any]]) -> str:
    manifest = yaml.safe_dump_all(docs)
    return stack.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest).stdout


def test_helm_lint(helm: Helm, tmp_path: Path) -> None:
    for args in ([], ALL_FEATURES, ["--set", "namespaces={a,b}", *ALL_FEATURES], NAMESPACED,
                 [*NAMESPACED, *ALL_FEATURES]):
        out = helm("lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in out.stdout
    # The namespaced scope needs the namespaces it is granted in.
    for args in (["--set", "rbac.scope=namespaced"], ["--set", "rbac.scope=namespaced", "--set", "namespaces=null"],
                 ["--set", "rbac.scope=namespace", "--set", "namespaces={a}"]):
        refused = helm("lint", str(CHART), *args, check=False)
        assert refused.returncode != 0, args
        assert "namespaces" in refused.stdout + refused.stderr or "scope" in refused.stdout + refused.stderr
    # values.schema.json is strict: a misspelt key fails instead of being silently ignored.
    bad = helm("lint", str(CHART), "--set", "databse.existingSecret=x", check=False)
    assert bad.returncode != 0
    assert "databse" in bad.stdout + bad.stderr
    assert helm("lint", str(CHART), "--set", "database.existingSecret=", check=False).returncode != 0


def test_chart_claims_only_tested_kubernetes_versions(helm: Helm, release: str) -> None:
    """Chart.yaml's kubeVersion starts at the minor the tests run on (the test control plane is
    1.36): an older cluster is refused at install time instead of running untested."""
    helm("template", release, str(CHART), "--kube-version", "1.36.0")
    refused = helm("template", release, str(CHART), "--kube-version", "1.35.4", check=False)
    assert refused.returncode != 0
    assert "kubeVersion" in refused.stderr, refused.stderr


def test_default_render(helm: Helm, release: str) -> None:
    docs = helm.template(release, "tenancy-system")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {
        "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service",
        "PodDisruptionBudget", "PersistentVolumeClaim", "CustomResourceDefinition",
    }
    # The CRDs are templates (helm upgrade upgrades them), the generated ones, kept on uninstall.
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert sorted(crds) == sorted(TENANCY_CRDS)
    for path in (ROOT / "crds").glob("*.yaml"):
        generated = yaml.safe_load(path.read_text())
        rendered = crds[generated["metadata"]["name"]]
        assert rendered["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep", "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        }
        assert rendered["spec"] == generated["spec"]
        assert rendered["metadata"]["labels"] == generated["metadata"]["labels"]
    assert "CustomResourceDefinition" not in {d["kind"] for d in helm.template(release, "tenancy-system", *NO_CRDS)}
    dep = kinds["Deployment"]["spec"]
    assert dep["replicas"] == 1
    assert dep["strategy"] == {"type": "Recreate"}
    pod = dep["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container and "args" not in container  # the image's entrypoint
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TENANCY_DATABASE_TARGETS_DIR"] == "/etc/tenancy/databases"
    assert env["TENANCY_ARCHIVE_DIR"] == "/var/lib/tenancy/archive"
    assert "TENANCY_NAMESPACES" not in env and "TENANCY_PEERING_NAME" not in env
    # The Events' reportingInstance: the pod's name, from the Downward API.
    (pod_name,) = [e for e in container["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert not any("postgresql://" in json.dumps(e) for e in container["env"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["databases"]["secret"]["secretName"] == "tenancy-operator-databases"
    assert volumes["archive"]["persistentVolumeClaim"]["claimName"] == f"{release}-tenancy-operator-archive"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {
        "databases": "/etc/tenancy/databases", "archive": "/var/lib/tenancy/archive", "tmp": "/tmp",  # noqa: S108
    }
    assert kinds["PersistentVolumeClaim"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    # Exactly what the operator uses (test_rbac.py: removing any one verb breaks it).
    assert kinds["ClusterRole"]["rules"] == [
        *NAMESPACE_RULES,
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["list", "watch"]},
    ]
    # An existing claim replaces the chart's PVC.
    docs = helm.template(release, "tenancy-system", "--set", "archive.existingClaim=backups")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    (dep_doc,) = [d for d in docs if d["kind"] == "Deployment"]
    vols = {v["name"]: v for v in dep_doc["spec"]["template"]["spec"]["volumes"]}
    assert vols["archive"]["persistentVolumeClaim"]["claimName"] == "backups"
    # An object store: no claim, the volume is scratch space, the keys a mounted Secret.
    docs = helm.template(release, "tenancy-system", "--set", "archive.store.url=s3://acme-archives/prod",
                         "--set", "archive.store.credentialsSecret=archive-keys",
                         "--set", "archive.store.endpoint=http://minio.storage:9000")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    (dep_doc,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep_doc["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in vols["archive"] and vols["archive-store"]["secret"]["secretName"] == "archive-keys"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert json.loads(env["TENANCY_ARCHIVE_STORE"]) == {
        "url": "s3://acme-archives/prod", "endpoint": "http://minio.storage:9000", "region": "us-east-1",
        "credentialsDir": "/etc/tenancy/archive-store", "serverSideEncryption": "", "kmsKeyId": ""}
    assert {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}["archive-store"] == \
        "/etc/tenancy/archive-store"


def test_peering_render(helm: Helm, release: str) -> None:
    docs = helm.template(release, "tenancy-system", *ALL_FEATURES)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TENANCY_PEERING_NAME"]["value"] == f"{release}-tenancy-operator"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (peering,) = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    assert peering["metadata"]["name"] == f"{release}-tenancy-operator"
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"]} in role["rules"]
    # A namespace list: one KopfPeering per watched namespace; Kopf observes neither namespaces nor
    # CRDs then (it serves exactly the listed namespaces).
    docs = helm.template(release, "tenancy-system", "--set", "namespaces={a,b}", *ALL_FEATURES)
    assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "KopfPeering") == ["a", "b"]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert role["rules"] == [*NAMESPACE_RULES, {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"],
                                                "verbs": ["get", "list", "watch", "patch"]}]


def test_namespaced_render(helm: Helm, release: str) -> None:
    """rbac.scope=namespaced: a Role and RoleBinding in each watched namespace, nothing cluster-wide,
    and the operator told the same namespaces."""
    for extra, peering in (([], False), (ALL_FEATURES, True)):
        docs = helm.template(release, "tenancy-system", *NAMESPACED, *extra)
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
        roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
        bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
        assert sorted(roles) == sorted(bindings) == ["a", "b"]
        expected = NAMESPACE_RULES + ([{"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"],
                                        "verbs": ["get", "list", "watch", "patch"]}] if peering else [])
        for ns in ("a", "b"):
            assert roles[ns]["rules"] == expected
            assert bindings[ns]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                               "name": roles[ns]["metadata"]["name"]}
            assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": f"{release}-tenancy-operator",
                                                 "namespace": "tenancy-system"}]
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["TENANCY_NAMESPACES"] == "a,b"
        peerings = sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "KopfPeering")
        assert peerings == (["a", "b"] if peering else [])
    # Without RBAC objects (rbac.create=false) nothing is rendered for either scope.
    docs = helm.template(release, "tenancy-system", *NAMESPACED, "--set", "rbac.create=false")
    assert not {d["kind"] for d in docs} & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def test_rendered_prometheus_rule_is_valid_for_prometheus(helm: Helm, release: str, tmp_path: Path) -> None:
    docs = helm.template(
        release, "monitoring", *ALL_FEATURES,
        "--set", "prometheusRule.runbookBaseUrl=https://wiki.example/tenancy/runbook",
        "--set", "prometheusRule.job=tenancy",
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run hack/install-system-deps.sh"
    out = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) == 9
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == (
            f"https://wiki.example/tenancy/runbook#{alert['alert'].lower()}"
        )
        assert 'job="tenancy-operator"' not in alert["expr"]
    for name in ("TenancyOperatorDown", "TenancyLifecycleJobFailed", "TenancyTenantStalled"):
        assert 'job="tenancy"' in next(a["expr"] for a in alerts if a["alert"] == name), name
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0]["replacement"] == "tenancy"
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert json.loads(dashboard["data"]["tenancy-operator.json"])["title"] == "Tenancy operator"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize(
    "values",
    [[], ["--set", "namespaces={NS}", *ALL_FEATURES], ALL_FEATURES,
     ["--set", "rbac.scope=namespaced", "--set", "namespaces={NS}", *ALL_FEATURES]],
    ids=["defaults", "listed-all-features", "clusterwide-all-features", "namespaced-scope-all-features"],
)
def test_rendered_manifests_pass_server_side_dry_run(
    stack: LocalStack, helm: Helm, release: str, namespace: str, values: list[str]
) -> None:
    args = [v.replace("NS", namespace) for v in values]
    # Helm creates the CRDs of crds/ (Kopf's) before it renders templates: so do we. The tenancy CRDs
    # (templates) exist already; the dry run checks the rendered ones are accepted as updates.
    stack.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf.dev_peerings.yaml"))
    stack.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev",
                  "crd/kopfpeerings.kopf.dev", "--timeout=30s")
    docs = helm.template(release, namespace, *args)
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == len(TENANCY_CRDS)
    assert "(server dry run)" in stack.kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(crds)
    ).stdout
    out = server_dry_run(stack, [d for d in docs if d["kind"] not in {*MONITORING, "CustomResourceDefinition"}])
    assert "(server dry run)" in out
    assert f"deployment.apps/{release}-tenancy-operator created (server dry run)" in out
    assert stack.kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_pod_meets_the_restricted_pod_security_standard(
    stack: LocalStack, helm: Helm, release: str, namespace: str
) -> None:
    stack.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    docs = helm.template(release, namespace)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    stack.kubectl("apply", "-f", "-", input=yaml.safe_dump(sa))  # the ServiceAccount admission wants it
    template = dep["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "operator-pod", "namespace": namespace, **template["metadata"]},
           "spec": template["spec"]}
    out = server_dry_run(stack, [pod])
    assert "pod/operator-pod created (server dry run)" in out
    # The check is real: the same pod running as root with a writable root filesystem is refused.
    pod["spec"] = json.loads(json.dumps(pod["spec"]))
    pod["spec"].pop("securityContext")
    pod["spec"]["containers"][0].pop("securityContext")
    refused = stack.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod), check=False)
    assert refused.returncode != 0
    assert "violates PodSecurity" in refused.stderr


@pytest.fixture
def installed(stack: LocalStack, helm: Helm, release: str, namespace: str) -> Iterator[str]:
    helm("install", release, str(CHART), "--namespace", namespace, "--set", "peering.enabled=true", *NO_CRDS)
    try:
        yield release
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", check=False)


def test_helm_install_and_uninstall(stack: LocalStack, helm: Helm, installed: str, namespace: str) -> None:
    release = installed
    status = json.loads(helm("status", release, "--namespace", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    full = f"{release}-tenancy-operator"
    for obj in (f"deployment/{full}", f"serviceaccount/{full}", f"service/{full}-metrics",
                f"poddisruptionbudget/{full}", f"persistentvolumeclaim/{full}-archive"):
        stack.kubectl("get", obj, "-n", namespace)
    for obj in (f"clusterrole/{full}", f"clusterrolebinding/{full}", f"clusterkopfpeering/{full}",
                "crd/tenants.tenancy.dev", "crd/clusterkopfpeerings.kopf.dev"):
        stack.kubectl("get", obj)
    dep = json.loads(stack.kubectl("get", f"deployment/{full}", "-n", namespace, "-o", "json").stdout)
    assert dep["spec"]["replicas"] == 2
    # What the ServiceAccount may do, as the API server's authorizer answers.
    sa = f"system:serviceaccount:{namespace}:{full}"
    def can(*args: str) -> bool:
        out = stack.kubectl("auth", "can-i", *args, f"--as={sa}", check=False)
        return out.stdout.strip() == "yes"
    assert can("patch", "tenants.tenancy.dev", "-A")
    assert can("create", "secrets", "-n", "anywhere")
    assert can("patch", f"clusterkopfpeerings.kopf.dev/{full}")
    assert not can("delete", "tenants.tenancy.dev", "-A")
    assert not can("create", "pods", "-n", namespace)
    assert not can("get", "nodes")
    assert not can("update", "customresourcedefinitions")

    helm("uninstall", release, "--namespace", namespace, "--wait")
    assert stack.kubectl("get", f"clusterrole/{full}", check=False).returncode != 0
    # Archives outlive the release.
    stack.kubectl("get", f"persistentvolumeclaim/{full}-archive", "-n", namespace)


def test_helm_install_namespaced_scope(stack: LocalStack, helm: Helm, release: str, namespace: str) -> None:
    """A real install with rbac.scope=namespaced, watching the release's own namespace: the API
    server's authorizer grants the ServiceAccount Secrets there and nowhere else."""
    helm("install", release, str(CHART), "--namespace", namespace, "--set", "rbac.scope=namespaced",
         "--set", f"namespaces={{{namespace}}}", *NO_CRDS)
    try:
        full = f"{release}-tenancy-operator"
        stack.kubectl("get", f"role/{full}", f"rolebinding/{full}", "-n", namespace)
        assert stack.kubectl("get", f"clusterrole/{full}", check=False).returncode != 0
        sa = f"system:serviceaccount:{namespace}:{full}"

        def can(*args: str) -> bool:
            return stack.kubectl("auth", "can-i", *args, f"--as={sa}", check=False).stdout.strip() == "yes"

        assert can("create", "secrets", "-n", namespace)
        assert can("patch", "tenants.tenancy.dev", "-n", namespace)
        assert not can("get", "secrets", "-n", "default")
        assert not can("list", "secrets", "-A")
        assert not can("create", "configmaps", "-n", "kube-system")
        assert not can("list", "namespaces")
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", check=False)
    assert stack.kubectl("get", f"role/{release}-tenancy-operator", "-n", namespace, check=False).returncode != 0


def previous_chart(workdir: Path) -> Path:
    """The chart as it was before the CRDs became templates (they were in crds/, which Helm installs
    once and never upgrades): from the git history, the parent of the commit that moved them."""
    moved_out = "helm/tenancy-operator/crds/tenancy.dev_tenants.yaml"
    git = ["git", "-C", str(ROOT)]
    log = subprocess.run([*git, "log", "-1", "--no-renames", "--diff-filter=D", "--format=%H", "--", moved_out],
                         capture_output=True, text=True, timeout=60)
    commit = log.stdout.strip()
    assert log.returncode == 0 and commit, f"this test needs the repository's git history (a full clone): {log.stderr}"
    archive = subprocess.run([*git, "archive", "--format=tar", f"{commit}^", "helm/tenancy-operator"],
                             capture_output=True, timeout=60)
    assert archive.returncode == 0, archive.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(workdir, filter="data")
    chart = workdir / "helm" / "tenancy-operator"
    assert (chart / moved_out.removeprefix("helm/tenancy-operator/")).exists()
    assert not (chart / "templates" / "crds.yaml").exists()
    return chart


@pytest.fixture
def session_crds_given_back(stack: LocalStack) -> Iterator[None]:
    """After a test that let a release take the tenancy CRDs: back as the session installed them
    (current schema, no Helm ownership), for the tests after it."""
    yield
    for crd in TENANCY_CRDS:
        stack.kubectl("annotate", f"crd/{crd}", "meta.helm.sh/release-name-", "meta.helm.sh/release-namespace-",
                      "helm.sh/resource-policy-", "argocd.argoproj.io/sync-options-")
        stack.kubectl("label", f"crd/{crd}", "app.kubernetes.io/managed-by-")
    stack.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=tenancy-devenv",
                  "-f", str(ROOT / "crds"))


def test_helm_upgrade_from_the_previous_chart_upgrades_the_crds_and_uninstall_keeps_them(
    stack: LocalStack, helm: Helm, cluster: Cluster, release: str, namespace: str, tmp_path: Path,
    session_crds_given_back: None,
) -> None:
    """docs/operations.md, "Upgrade" and "Uninstall": a release of the chart that had the CRDs in crds/
    is upgraded (once with --take-ownership) to the current chart, which upgrades the CRDs; uninstall
    keeps the CRDs and the Tenants."""
    old_chart = previous_chart(tmp_path)
    tenants = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/credentials/properties"

    def without_read_only_login(props: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in props.items() if k != "readOnlyLogin"}

    def crd_has_read_only_login() -> bool:
        crd = json.loads(stack.kubectl("get", "crd", "tenants.tenancy.dev", "-o", "json").stdout)
        props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        return "readOnlyLogin" in props["credentials"]["properties"]

    # The cluster as the previous chart left it, with a Tenants CRD one field older than the current
    # one (the previous chart's own CRDs are in the cluster already, so Helm skips its crds/).
    with crd_schema_replaced(stack, "tenants.tenancy.dev", tenants, without_read_only_login):
        helm("install", release, str(old_chart), "--namespace", namespace)
        assert not crd_has_read_only_login()
        cluster.create("tenants", namespace, tenant("kept", displayName="Kept", credentials={"readOnlyLogin": True}))
        # An unknown field is pruned by the older schema.
        assert "readOnlyLogin" not in (cluster.get("tenants", namespace, "kept")["spec"].get("credentials") or {})

        # CRDs created from crds/ carry no Helm ownership: the chart that templates them must take it once.
        refused = helm("upgrade", release, str(CHART), "--namespace", namespace, check=False)
        assert refused.returncode != 0
        assert "invalid ownership metadata" in refused.stderr, refused.stderr
        helm("upgrade", release, str(CHART), "--namespace", namespace, "--take-ownership")
        assert crd_has_read_only_login()
        for crd in TENANCY_CRDS:
            meta = json.loads(stack.kubectl("get", "crd", crd, "-o", "json").stdout)["metadata"]
            assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
            assert meta["annotations"]["meta.helm.sh/release-name"] == release
        cluster.patch("tenants", namespace, "kept", {"spec": {"credentials": {"readOnlyLogin": True}}})
        assert cluster.get("tenants", namespace, "kept")["spec"]["credentials"]["readOnlyLogin"] is True
        # A later upgrade needs nothing more.
        helm("upgrade", release, str(CHART), "--namespace", namespace, "--set", "logging.level=DEBUG")

        helm("uninstall", release, "--namespace", namespace, "--wait")
        assert stack.kubectl("get", f"deployment/{release}-tenancy-operator", "-n", namespace,
                             check=False).returncode != 0
        for crd in TENANCY_CRDS:
            stack.kubectl("get", "crd", crd)
        assert crd_has_read_only_login()
        assert cluster.get("tenants", namespace, "kept")["spec"]["credentials"]["readOnlyLogin"] is True
        # The same release name in the same namespace takes the kept CRDs back.
        helm("install", release, str(CHART), "--namespace", namespace)
        helm("uninstall", release, "--namespace", namespace, "--wait")
        stack.kubectl("get", "crd", "tenants.tenancy.dev")


def test_the_documented_kind_install_renders_and_passes_dry_run(
    stack: LocalStack, helm: Helm, namespace: str
) -> None:
    """docs/operations.md's `helm install` line for kind, rendered and dry-run as written."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    kind_section = doc.split("## Running on a real cluster with kind", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in kind_section.splitlines() if ln.startswith("helm install tenancy-operator helm/")]
    args = line.split()[2:]  # release, chart path, flags
    assert args[:2] == ["tenancy-operator", "helm/tenancy-operator"]
    flags = [a.replace("tenancy-system", namespace) for a in args[2:]]
    docs = helm.template("tenancy-operator", namespace, *[f for f in flags if f not in ("-n", namespace)])
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "tenancy-operator:dev"
    assert container["imagePullPolicy"] == "Never"
    assert "(server dry run)" in server_dry_run(stack, docs)
    # The Secret name the docs create is the chart's default.
    assert "create secret generic tenancy-operator-databases" in kind_section
