"""A real etcd + kube-apiserver + kube-controller-manager on loopback, started the way envtest
starts them, so CRD validation, watches, finalizers, RBAC and garbage collection behave truthfully.

Admission: the ServiceAccount admission plugin stays enabled (envtest disables it) because the
controller-manager runs and creates each namespace's ``default`` ServiceAccount, as a real cluster
does. Note the same race as in a real cluster: a Pod created within milliseconds of its namespace
may be refused until that ServiceAccount exists.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from tenancy_devenv.certs import Certs, write_certs
from tenancy_devenv.process import Service, free_ports, stop_all, wait_for

# Enough for namespace deletion, ownerReference garbage collection, default ServiceAccounts and
# tokens, the kube-root-ca.crt ConfigMap, aggregated ClusterRoles (admin/edit/view) and the
# Deployment -> ReplicaSet -> Pod and Job -> Pod chains (Pods never run: there is no kubelet).
CONTROLLERS = (
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
)


class KubectlError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager under ``workdir``.

    Ports may be given so that a restarted stack keeps its addresses; otherwise free ones are
    picked now, so they are known before ``start``.
    """

    def __init__(
        self,
        workdir: Path,
        bin_dir: Path,
        *,
        detached: bool = False,
        etcd_port: int | None = None,
        etcd_peer_port: int | None = None,
        apiserver_port: int | None = None,
        timeout: float = 120.0,
        sharded_watch: bool = True,
    ) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.detached = detached
        self.timeout = timeout
        self.sharded_watch = sharded_watch
        picked = free_ports(3)
        self.etcd_port = etcd_port or picked[0]
        self.etcd_peer_port = etcd_peer_port or picked[1]
        self.apiserver_port = apiserver_port or picked[2]
        self.certs = Certs(workdir / "pki")
        self.kubeconfig = workdir / "kubeconfig"
        self._cm_kubeconfig = workdir / "pki" / "controller-manager.kubeconfig"
        # Markers name this workdir, not bin_dir, so a stack can be stopped without knowing it.
        self.etcd = Service("etcd", workdir, ["etcd", f"--data-dir={workdir / 'etcd'}"])
        self.apiserver = Service(
            "kube-apiserver", workdir, ["kube-apiserver", f"--tls-cert-file={self.certs.serving_cert}"]
        )
        self.controller_manager = Service(
            "kube-controller-manager", workdir, ["kube-controller-manager", f"--kubeconfig={self._cm_kubeconfig}"]
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def services(self) -> list[Service]:
        """In start order."""
        return [self.etcd, self.apiserver, self.controller_manager]

    def pids(self) -> dict[str, int | None]:
        return {s.name: s.pid() for s in self.services}

    def start(self) -> None:
        """Start whichever component is not running, then wait until each is ready."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        write_certs(self.certs.directory)
        self._write_kubeconfig(self.kubeconfig)
        self._write_kubeconfig(self._cm_kubeconfig)

        self._ensure(self.etcd, self._etcd_flags, "etcd /health", f"http://127.0.0.1:{self.etcd_port}/health")
        self._ensure(self.apiserver, self._apiserver_flags, "kube-apiserver /readyz", f"{self.url}/readyz")
        # The default ServiceAccount appears once the controllers run: a readiness signal that
        # needs no controller-manager serving port.
        self._ensure(
            self.controller_manager,
            self._controller_manager_flags,
            "kube-controller-manager to create ServiceAccount default/default",
            f"{self.url}/api/v1/namespaces/default/serviceaccounts/default",
        )

    def _ensure(self, service: Service, flags: Callable[[], list[str]], what: str, ready_url: str) -> None:
        """Start ``service`` (its binary has the service's name) with ``flags()`` unless it runs, then
        wait until a GET of ``ready_url`` answers 200."""
        if service.pid() is None:
            service.start([str(self.bin_dir / service.name), *flags()], detached=self.detached)
        wait_for(what, lambda: self._get(ready_url)[0] == 200, self.timeout, alive=service.check_alive)

    def stop(self) -> None:
        """Stop every component (reverse start order); idempotent."""
        stop_all(list(reversed(self.services)))

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as admin against this control plane (never the user's own KUBECONFIG)."""
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kube-cache'}",
            *args,
        ]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, check=False, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def install_crds(self, crd_dir: Path) -> list[str]:
        """Server-side apply the manifests in ``crd_dir``; wait until each CRD is Established."""
        if not any(p.suffix in (".yaml", ".yml", ".json") for p in crd_dir.glob("*")):
            return []
        applied = self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=tenancy-devenv",
            "-o",
            "name",
            "-f",
            str(crd_dir),
        ).stdout.split()
        crds = [name for name in applied if name.startswith("customresourcedefinition")]
        if crds:
            # Polled rather than `kubectl wait`, which fails at once on a CRD whose status has no
            # conditions yet (right after the apply).
            established = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'

            def ready() -> bool:
                return all(self.kubectl("get", crd, "-o", established, check=False).stdout.strip() == "True"
                           for crd in crds)

            wait_for("the CRDs to be Established", ready, self.timeout, interval=0.2)
        return crds

    def _etcd_flags(self) -> list[str]:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [
            "--name=tenancy-dev",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=tenancy-dev={peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_flags(self) -> list[str]:
        c = self.certs
        return [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--tls-cert-file={c.serving_cert}",
            f"--tls-private-key-file={c.serving_key}",
            f"--client-ca-file={c.ca_cert}",
            f"--secure-port={self.apiserver_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={c.sa_pub}",
            f"--service-account-signing-key-file={c.sa_key}",
            # Server-side sharded list and watch (KEP-5866, alpha in 1.36): sharded operator
            # replicas pass shardSelector; without the gate the server ignores it (a test stack
            # may turn it off to be such a server).
            f"--feature-gates=ShardedListAndWatch={str(self.sharded_watch).lower()}",
        ]

    def _controller_manager_flags(self) -> list[str]:
        c = self.certs
        return [
            f"--kubeconfig={self._cm_kubeconfig}",
            "--leader-elect=false",
            f"--root-ca-file={c.ca_cert}",
            f"--service-account-private-key-file={c.sa_key}",
            "--use-service-account-credentials=false",
            f"--controllers={','.join(CONTROLLERS)}",
            "--secure-port=0",
        ]

    def _write_kubeconfig(self, path: Path) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "tenancy-dev",
                    "cluster": {"server": self.url, "certificate-authority-data": b64(self.certs.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(self.certs.admin_cert),
                        "client-key-data": b64(self.certs.admin_key),
                    },
                }
            ],
            "contexts": [{"name": "tenancy-dev", "context": {"cluster": "tenancy-dev", "user": "admin"}}],
            "current-context": "tenancy-dev",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def _get(self, url: str) -> tuple[int, str]:
        """GET as admin; (0, reason) when nothing answers yet."""
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(self.certs.ca_cert))
            context.load_cert_chain(self.certs.admin_cert, self.certs.admin_key)
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:  # noqa: S310 - our own URL
                return int(response.status), response.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)
