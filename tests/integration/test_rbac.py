"""RBAC proof: the operator runs with a token of the chart's ServiceAccount (TokenRequest), not as
admin, and every kind reconciles, is updated and deleted without a single 403. With the chart's
peering values: active/standby, and what a peered replica does when the API server is out of its
reach or a peer counts it gone.

This module starts its own control plane and PostgreSQL (about 7 s) so that only the restricted
operator works there: the session operator watches every namespace of the session's stack.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tenancy_devenv.stack import LocalStack

from .harness import GROUP, VERSION, Cluster, OperatorProcess, eventually, own_stack, tenant
from .netfault import SilentLink
from .test_helm import CHART, Helm
from .test_sharding import logged_at, through

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NS = "tenancy-system"
# A refusal, or Kopf's warning that it lacks the rights to observe namespaces or CRDs.
FORBIDDEN = re.compile(r"(?i)forbidden|not enough permissions|(?<![\w.:+-])403(?![\w.])")


@pytest.fixture(scope="module")
def rbac_stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    with own_stack(request, "rbac") as stack:
        stack.kubectl("create", "namespace", OPERATOR_NS)
        yield stack


@pytest.fixture(scope="module")
def rbac_cluster(rbac_stack: LocalStack) -> Cluster:
    return Cluster(rbac_stack.kubeconfig)


def service_account_kubeconfig(stack: LocalStack, release: str, *values: str) -> Path:
    """Apply the chart's ServiceAccount and roles with their bindings (and peering objects, if
    enabled) as rendered, and write a kubeconfig that authenticates with a TokenRequest token of
    that ServiceAccount."""
    helm = Helm(stack)
    shown = ["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"]
    if "peering.enabled=true" in values:
        stack.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf.dev_peerings.yaml"))
        stack.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev",
                      "crd/kopfpeerings.kopf.dev", "--timeout=30s")
        shown += ["--show-only", "templates/peering.yaml"]
    args = [a for v in values for a in ("--set", v)]
    docs = helm.template(release, OPERATOR_NS, *shown, *args)
    stack.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    sa = f"{release}-tenancy-operator"
    token = stack.kubectl("create", "token", sa, "-n", OPERATOR_NS, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(stack.kubeconfig.read_text())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": admin["clusters"][0]["name"], "user": sa}}],
        "current-context": sa,
    }
    path = stack.workdir / f"{release}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    # The token really is the ServiceAccount, not admin.
    who = json.loads(stack.kubectl("auth", "whoami", "-o", "json", f"--kubeconfig={path}").stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{OPERATOR_NS}:{sa}"
    return path


def start_operator(stack: LocalStack, kubeconfig: Path, name: str, **env: str) -> OperatorProcess:
    workdir = stack.workdir / name
    workdir.mkdir()
    proc = OperatorProcess(stack, workdir, sweep_interval=2.0, env={
        "KUBECONFIG": str(kubeconfig), "TENANCY_QUOTA_INTERVAL_SECONDS": "2", **env,
    })
    proc.start()
    return proc


def assert_never_forbidden(*procs: OperatorProcess) -> None:
    for proc in procs:
        hits = [line for line in proc.log_text().splitlines() if FORBIDDEN.search(line)]
        assert not hits, "the operator was refused by the API server:\n" + "\n".join(hits[:20])
        if proc.proc is not None and proc.proc.poll() is None:
            assert proc.metric("reconcile_failures_total", reason="KubernetesAPI") == 0


def ready(cluster: Cluster, plural: str, namespace: str, name: str) -> None:
    cluster.wait_condition(plural, namespace, name, timeout=90)


def test_examples_reconcile_with_the_chart_service_account(rbac_stack: LocalStack, rbac_cluster: Cluster) -> None:
    """Cluster-wide (the chart's default): apply examples/, rotate, delete every kind."""
    kubeconfig = service_account_kubeconfig(rbac_stack, "clusterwide")
    proc = start_operator(rbac_stack, kubeconfig, "clusterwide")
    try:
        rbac_stack.kubectl("apply", "-f", str(ROOT / "examples"))
        # As docs/operations.md tells users to wait for them.
        rbac_stack.kubectl("wait", "--for=condition=Ready", "tenants,quotas,featureflags,schemarollouts", "--all",
                           "-n", "acme", "--timeout=120s")
        for plural, name in (("tenants", "acme-corp"), ("tenants", "globex"), ("quotas", "acme-corp"),
                             ("featureflags", "new-dashboard"), ("schemarollouts", "shop-schema")):
            ready(rbac_cluster, plural, "acme", name)
        flagd = rbac_cluster.core.read_namespaced_config_map("new-dashboard-flagd", "acme").data["flagd.json"]

        # A flag change replaces its flagd ConfigMap.
        rbac_cluster.patch("featureflags", "acme", "new-dashboard", {"spec": {"rollout": {"percentage": 60}}})
        ready(rbac_cluster, "featureflags", "acme", "new-dashboard")
        eventually(lambda: rbac_cluster.core.read_namespaced_config_map("new-dashboard-flagd", "acme")
                   .data["flagd.json"] != flagd, timeout=60, what="flagd ConfigMap replaced")

        # Rotation replaces the Secret; a template ConfigMap is read; Events are posted.
        old = rbac_cluster.secret_data("acme", "globex-db")["password"]
        rbac_stack.kubectl("annotate", "tenant", "globex", "-n", "acme", "tenancy.dev/rotate-credentials=1")
        eventually(lambda: rbac_cluster.secret_data("acme", "globex-db")["password"] != old,
                   timeout=60, what="globex password rotated")
        rbac_cluster.wait_event("acme", "globex", "CredentialsRotated")

        # Deletion: finalizers patched away, Secrets and ConfigMaps deleted, an archive written.
        rbac_cluster.delete("featureflags", "acme", "new-dashboard")
        rbac_cluster.delete("quotas", "acme", "acme-corp")
        rbac_cluster.delete("tenants", "acme", "globex")
        rbac_cluster.delete("tenants", "acme", "acme-corp")
        for plural, name in (("featureflags", "new-dashboard"), ("quotas", "acme-corp"), ("tenants", "globex"),
                             ("tenants", "acme-corp")):
            eventually(lambda p=plural, n=name: rbac_cluster.gone(p, "acme", n), timeout=120,
                       what=f"{plural}/{name} gone")
        secrets = rbac_cluster.core.list_namespaced_secret("acme").items
        assert not [s for s in secrets if s.metadata.name.endswith("-db")]
        assert_never_forbidden(proc)
    finally:
        proc.stop()


def test_cluster_scope_with_a_namespace_list(rbac_stack: LocalStack, rbac_cluster: Cluster) -> None:
    """A ClusterRole and a namespace list: the operator serves that namespace without listing
    namespaces or CRDs (the ClusterRole has neither rule)."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    rbac_stack.kubectl("create", "namespace", ns)
    kubeconfig = service_account_kubeconfig(rbac_stack, "listed", f"namespaces={{{ns}}}")
    proc = start_operator(rbac_stack, kubeconfig, "listed", TENANCY_NAMESPACES=ns)
    try:
        rbac_cluster.create("tenants", ns, tenant("beta", tier="starter"))
        ready(rbac_cluster, "tenants", ns, "beta")
        rbac_cluster.create("quotas", ns, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Quota", "metadata": {"name": "beta"},
            "spec": {"tenantRef": {"name": "beta"}, "limits": {"connections": 5}},
        })
        ready(rbac_cluster, "quotas", ns, "beta")
        rbac_cluster.create("featureflags", ns, flag("dark-mode"))
        ready(rbac_cluster, "featureflags", ns, "dark-mode")
        for plural, name in (("featureflags", "dark-mode"), ("quotas", "beta"), ("tenants", "beta")):
            rbac_cluster.delete(plural, ns, name)
            eventually(lambda p=plural, n=name: rbac_cluster.gone(p, ns, n), timeout=60, what=f"{plural}/{name} gone")
        assert_never_forbidden(proc)
    finally:
        proc.stop()


def test_namespaced_scope_reaches_nothing_outside_its_namespaces(
    rbac_stack: LocalStack, rbac_cluster: Cluster
) -> None:
    """rbac.scope=namespaced: a Role per watched namespace and nothing cluster-wide. The operator
    provisions, rotates and deletes there without a single 403, with peering on (through the
    namespace's KopfPeering), and its token, in an attacker's hands, reads no Secret elsewhere."""
    ns, outside = f"t-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    for name in (ns, outside):
        rbac_stack.kubectl("create", "namespace", name)
    rbac_stack.kubectl("create", "secret", "generic", "payroll-db", "-n", outside, "--from-literal=password=s3cret")
    rbac_cluster.create("tenants", outside, tenant("stranger"))
    kubeconfig = service_account_kubeconfig(
        rbac_stack, "scoped", "rbac.scope=namespaced", f"namespaces={{{ns}}}", "peering.enabled=true"
    )

    # The attacker holding the token: no Secret, ConfigMap or Event outside the list.
    def as_operator(*args: str) -> subprocess.CompletedProcess[str]:
        return rbac_stack.kubectl(*args, f"--kubeconfig={kubeconfig}", check=False)

    refused = as_operator("get", "secret", "payroll-db", "-n", outside, "-o", "json")
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr and "s3cret" not in refused.stdout + refused.stderr
    refused = as_operator("get", "secrets", "--all-namespaces")
    assert refused.returncode != 0 and "Forbidden" in refused.stderr

    def can(*args: str) -> bool:
        return as_operator("auth", "can-i", *args).stdout.strip() == "yes"

    assert can("get", "secrets", "-n", ns)  # the check tells the two apart
    for denied in (("get", "secrets", "-n", outside), ("list", "secrets", "-n", "kube-system"),
                   ("create", "configmaps", "-n", outside), ("create", "events", "-n", outside),
                   ("patch", "tenants.tenancy.dev", "-n", outside), ("list", "namespaces"),
                   ("list", "customresourcedefinitions")):
        assert not can(*denied), f"the namespaced ServiceAccount may {' '.join(denied)}"

    proc = start_operator(rbac_stack, kubeconfig, "scoped", TENANCY_NAMESPACES=ns,
                          TENANCY_PEERING_NAME="scoped-tenancy-operator", TENANCY_PEERING_PRIORITY="100")
    try:
        eventually(lambda: "Resuming operations after the pause" in proc.log_text()
                   and "background loops resumed" in proc.log_text(), timeout=30, what="the operator works")
        rbac_cluster.create("tenants", ns, tenant("gamma", tier="starter"))
        ready(rbac_cluster, "tenants", ns, "gamma")
        rbac_cluster.create("quotas", ns, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Quota", "metadata": {"name": "gamma"},
            "spec": {"tenantRef": {"name": "gamma"}, "limits": {"connections": 5}},
        })
        ready(rbac_cluster, "quotas", ns, "gamma")
        rbac_cluster.create("featureflags", ns, flag("compact-view"))
        ready(rbac_cluster, "featureflags", ns, "compact-view")
        assert rbac_cluster.core.read_namespaced_config_map("compact-view-flagd", ns).data["flagd.json"]

        old = rbac_cluster.secret_data(ns, "gamma-db")["password"]
        rbac_stack.kubectl("annotate", "tenant", "gamma", "-n", ns, "tenancy.dev/rotate-credentials=1")
        eventually(lambda: rbac_cluster.secret_data(ns, "gamma-db")["password"] != old,
                   timeout=60, what="gamma password rotated")
        rbac_cluster.wait_event(ns, "gamma", "CredentialsRotated")

        # The sweep lists Tenants and Secrets in the watched namespace only, and counts its one Tenant.
        eventually(lambda: proc.metric("tenants", phase="Active") == 1, timeout=60, what="a sweep completed")
        stranger = rbac_cluster.get("tenants", outside, "stranger")
        assert not stranger["metadata"].get("finalizers")
        assert stranger["status"] == {"observedGeneration": 0, "phase": "Provisioning"}  # the CRD's default

        for plural, name in (("featureflags", "compact-view"), ("quotas", "gamma"), ("tenants", "gamma")):
            rbac_cluster.delete(plural, ns, name)
            eventually(lambda p=plural, n=name: rbac_cluster.gone(p, ns, n), timeout=60, what=f"{plural}/{name} gone")
        assert rbac_cluster.core.list_namespaced_secret(ns, label_selector="tenancy.dev/tenant").items == []
        assert_never_forbidden(proc)
    finally:
        proc.stop()


def flag(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {"name": name},
        "spec": {"variants": {"on": {"value": True}, "off": {"value": False}}, "defaultVariant": "off"},
    }


def test_active_standby_with_peering(rbac_stack: LocalStack, rbac_cluster: Cluster) -> None:
    """Two replicas with the peering values: only the higher priority one works; when it stops,
    the standby takes over, all with the chart's ServiceAccount."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    rbac_stack.kubectl("create", "namespace", ns)
    kubeconfig = service_account_kubeconfig(rbac_stack, "peered", "peering.enabled=true")
    peering = {"TENANCY_PEERING_NAME": "peered-tenancy-operator"}
    active = start_operator(rbac_stack, kubeconfig, "active", TENANCY_PEERING_PRIORITY="200", **peering)
    standby = start_operator(rbac_stack, kubeconfig, "standby", TENANCY_PEERING_PRIORITY="100", **peering)
    try:
        # With a peering name Kopf starts paused and resumes only where no peer outranks it.
        eventually(lambda: "Resuming operations after the pause" in active.log_text()
                   and "background loops resumed" in active.log_text(), timeout=30, what="the active one works")
        rbac_cluster.create("tenants", ns, tenant("first"))
        ready(rbac_cluster, "tenants", ns, "first")
        assert '"name": "first"' in active.log_text()
        standby_log = standby.log_text()
        assert '"name": "first"' not in standby_log
        assert "Resuming operations" not in standby_log
        assert "background loops resumed" not in standby_log

        assert_never_forbidden(active)
        assert active.stop() == 0  # a graceful stop removes it from the peering object at once
        eventually(lambda: "Resuming operations after the pause" in standby.log_text(), timeout=60,
                   what="the standby takes over")
        rbac_cluster.create("tenants", ns, tenant("second"))
        ready(rbac_cluster, "tenants", ns, "second")
        assert '"name": "second"' in standby.log_text()
        eventually(lambda: "background loops resumed" in standby.log_text(), timeout=30,
                   what="the standby's sweep runs")
        assert_never_forbidden(active, standby)
    finally:
        active.stop()
        standby.stop()


RESUMED = "Resuming operations after the pause. Conflicting operators with the same priority are gone."
PAUSED_UNSEEN = ("background loops paused: the peering record of this replica may have expired unseen, "
                 "and a standby may work now")
UNRENEWED = "the peering record of this replica has expired unrenewed while the API server could not be read"


def peered_pair(stack: LocalStack, release: str, active_kubeconfig: Callable[[Path], Path] | None = None
                ) -> tuple[OperatorProcess, OperatorProcess, str]:
    """An active (priority 200) and a standby (100) replica of one peering; ``active_kubeconfig``:
    how the active one reaches the API server. Returns them once the active one works."""
    kubeconfig = service_account_kubeconfig(stack, release, "peering.enabled=true")
    peering = {"TENANCY_PEERING_NAME": f"{release}-tenancy-operator"}
    active = start_operator(stack, active_kubeconfig(kubeconfig) if active_kubeconfig else kubeconfig,
                            f"{release}-active", TENANCY_PEERING_PRIORITY="200", **peering)
    standby = start_operator(stack, kubeconfig, f"{release}-standby", TENANCY_PEERING_PRIORITY="100", **peering)
    eventually(lambda: active.metric("peering_leading") == 1 and standby.metric("peering_leading") == 0,
               timeout=30, what="the active one works, the standby waits")
    return active, standby, f"{release}-tenancy-operator"


def test_a_peered_replica_whose_record_a_peer_removed_stops_rather_than_work_beside_it(
        rbac_stack: LocalStack, rbac_cluster: Cluster) -> None:
    """A peer removes the record of a replica it counts dead (Kopf's cleanup of dead peers), as
    after an outage that outlived the record; then it resumes. Kopf would not pause the replica
    for that. The replica stops instead (exit code 4, so that Kubernetes restarts it and it
    rejoins as a peer), and the standby serves the fleet."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    rbac_stack.kubectl("create", "namespace", ns)
    active, standby, name = peered_pair(rbac_stack, "forgotten")
    try:
        def active_record() -> tuple[str, dict[str, Any]]:
            status = json.loads(rbac_stack.kubectl("get", "clusterkopfpeering", name, "-o", "json").stdout)["status"]
            [(identity, record)] = [(k, v) for k, v in status.items() if v.get("priority") == 200]
            # Right after a keep-alive, so that the next one (50 to 55 s later) does not put it back first.
            assert datetime.now(UTC) - datetime.fromisoformat(record["lastseen"]) < timedelta(seconds=30)
            return identity, record

        identity, _ = eventually(active_record, timeout=60, what="a fresh record of the active replica")
        rbac_stack.kubectl("patch", "clusterkopfpeering", name, "--type=merge",
                           "-p", json.dumps({"status": {identity: None}}))
        assert active.proc is not None
        assert active.proc.wait(timeout=30) == 4, active.log_tail()
        assert "the peering record of this replica has expired" in active.log_text()
        eventually(lambda: RESUMED in standby.log_text(), timeout=60, what="the standby takes over")
        rbac_cluster.create("tenants", ns, tenant("after-forgotten"))
        ready(rbac_cluster, "tenants", ns, "after-forgotten")
        assert '"name": "after-forgotten"' in standby.log_text()
        assert '"name": "after-forgotten"' not in active.log_text()
    finally:
        active.stop()
        standby.stop()


def test_a_peered_replica_the_api_server_refuses_pauses_before_the_standby_resumes_and_then_exits(
        rbac_stack: LocalStack, rbac_cluster: Cluster) -> None:
    """While the API server refuses one replica (every request fails at once, as while it
    restarts), that replica cannot renew its peering record: it pauses its background loops before
    the record expires and the standby resumes. Once the record's expiry has passed unrenewed, the
    process exits with code 4 (as a leader whose lease went unrenewed), so that it is restarted and
    rejoins as a peer; it does not wait for Kopf to fail through all its retries."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    rbac_stack.kubectl("create", "namespace", ns)
    server = urlsplit(yaml.safe_load(rbac_stack.kubeconfig.read_text())["clusters"][0]["cluster"]["server"])
    assert server.hostname and server.port
    link = SilentLink(server.hostname, server.port)
    active, standby, _ = peered_pair(
        rbac_stack, "refused", lambda kubeconfig: through(link, kubeconfig, rbac_stack.workdir / "refused-link"))
    try:
        link.down()
        resumed = eventually(lambda: logged_at(standby, RESUMED), timeout=90, interval=0.5,
                             what="the standby resumes once the active one's record expired")
        paused = logged_at(active, PAUSED_UNSEEN)
        assert paused is not None and paused < resumed, (paused, resumed)
        assert active.proc is not None
        assert active.proc.wait(timeout=120) == 4, active.log_tail()
        assert UNRENEWED in active.log_text()
        assert not re.search(r"keep-alive for \S+ has failed", active.log_text())
        rbac_cluster.create("tenants", ns, tenant("after-refused"))
        ready(rbac_cluster, "tenants", ns, "after-refused")
        assert '"name": "after-refused"' in standby.log_text()
    finally:
        link.heal()
        active.stop()
        standby.stop()
        link.close()
