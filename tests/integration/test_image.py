"""The operator image, built from the Dockerfile without a Docker engine (hack/build-image.sh:
buildah on a base made by mmdebstrap from Debian's packages) and run the way the chart runs it
(hack/run-image.sh: the image's entrypoint and USER, read-only root filesystem, a fresh /tmp, no
capabilities, no_new_privs; the Deployment's environment and volumes as rendered with the chart's
defaults; the chart's ServiceAccount token) against a real API server and PostgreSQL.

The build is cached under ~/.cache/tenancy-operator/image keyed by the content of its inputs, so
only the first run on a machine (or a changed operator/, pyproject.toml, README.md, Dockerfile)
pays for it. The image's pg_dump is Debian bookworm's, PostgreSQL 15: the module runs in the
PostgreSQL 15 run of `make test` (the Makefile leaves it out of the others; run alone on another
major, it says why it skips).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenancy_devenv.process import die_with_parent, http_ok
from tenancy_devenv.stack import LocalStack

from .conftest import PG_MAJOR
from .harness import Cluster, as_owner, connect, eventually, free_port, own_stack, sql_value, tenant
from .test_helm import Helm
from .test_rbac import OPERATOR_NS, service_account_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
PLURAL = "tenants"
IMAGE_PG_MAJOR = 15  # bookworm's postgresql-client; pg_dump refuses newer servers
UID = GID = 10001

pytestmark = [
    pytest.mark.skipif(
        PG_MAJOR not in (None, IMAGE_PG_MAJOR),
        reason=f"the image's pg_dump is PostgreSQL {IMAGE_PG_MAJOR}'s: it is tested in the "
        f"TENANCY_TEST_PG_MAJOR={IMAGE_PG_MAJOR} run of make test",
    ),
    # The first test's setup builds the image on a machine without it (about 3 min here).
    pytest.mark.timeout(1800),
]


def shown(request: pytest.FixtureRequest) -> contextlib.AbstractContextManager[Any]:
    """Let a long step's progress through pytest's capture (the first build takes minutes)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    return capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Path:
    """The unpacked image of this tree: rootfs/, config.json, name."""
    with shown(request):
        if not (shutil.which("buildah") and shutil.which("mmdebstrap")):
            subprocess.run([str(ROOT / "hack" / "install-system-deps.sh")], check=True)
        out = subprocess.run(
            [str(ROOT / "hack" / "build-image.sh")], stdout=subprocess.PIPE, text=True, check=True, timeout=1800
        )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def image_stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    """A stack of its own: the session's operator, if started, would reconcile our Tenants too."""
    with own_stack(request, "image") as stack:
        stack.kubectl("create", "namespace", OPERATOR_NS)
        yield stack


def image_config(image: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((image / "config.json").read_text())
    return config


def chart_deployment(stack: LocalStack, *values: str) -> dict[str, Any]:
    args = [a for v in values for a in ("--set", v)]
    docs = Helm(stack).template("tenancy", OPERATOR_NS, "--show-only", "templates/deployment.yaml", *args)
    (deployment,) = docs
    return deployment


def test_the_chart_defaults_run_the_built_image(image: Path, image_stack: LocalStack) -> None:
    """values.yaml's image.repository and tag (empty: the chart's appVersion) name what
    hack/build-image.sh built; the pod runs it as its USER, with its entrypoint."""
    deployment = chart_deployment(image_stack)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == (image / "name").read_text().strip()
    assert "command" not in container and "args" not in container
    config = image_config(image)
    assert config["Entrypoint"] == ["python", "-OO", "-m", "tenancy_operator", "run"]
    # -OO reads .opt-2.pyc files, which the read-only root could not take at run time: the build
    # wrote them, for the operator, its dependencies and the standard library.
    for package, module in (("tenancy_operator", "runtime"), ("kopf", "__init__"), ("asyncio", "base_events")):
        assert list((image / "rootfs").glob(f"usr/**/{package}/__pycache__/{module}.cpython-311.opt-2.pyc")), package
    assert config["User"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = dict(e.split("=", 1) for e in config["Env"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["TENANCY_ARCHIVE_DIR"] in mounts and env["HOME"] in mounts  # writable: volumes, not the root


class ImageOperator:
    """hack/run-image.sh with the Deployment's environment and volumes; host network, so the ports
    are free ones and the API server is reached through a kubeconfig with the chart's
    ServiceAccount token (the pod's in-cluster config points at the Service IP)."""

    def __init__(self, stack: LocalStack, image: Path, workdir: Path) -> None:
        self.workdir = workdir
        self.health_port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / "operator.log"
        fs_group = UID  # the chart's podSecurityContext.fsGroup owns the volumes
        # The chart's Secret volume: one file per target, mode 0440, group fsGroup.
        self.databases = workdir / "databases"
        self.databases.mkdir()
        (self.databases / "default").write_text(stack.operator_dsn("default"))
        kubeconfig = workdir / "kubeconfig"
        shutil.copy(service_account_kubeconfig(stack, "image"), kubeconfig)
        for path, mode in ((self.databases, 0o750), (self.databases / "default", 0o440), (kubeconfig, 0o440)):
            os.chown(path, 0, fs_group)
            path.chmod(mode)
        self.archive = workdir / "archive"  # the chart's PVC
        self.archive.mkdir()
        os.chown(self.archive, UID, fs_group)
        self.archive.chmod(0o750)

        container = chart_deployment(stack)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert {e["name"] for e in container["env"] if "value" not in e} == {"POD_ID", "POD_NAME"}  # Downward API
        env |= {
            "POD_ID": "tenancy-operator-image",
            "POD_NAME": "tenancy-operator-image",
            "TENANCY_METRICS_PORT": str(self.metrics_port),
            "TENANCY_HEALTH_PORT": str(self.health_port),
            "KUBECONFIG": "/etc/tenancy/kubeconfig",
        }
        volumes = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert set(volumes) == {"databases", "archive", "tmp"}  # tmp: run-image.sh's own tmpfs
        self.argv = [
            str(ROOT / "hack" / "run-image.sh"),
            "-v", f"{self.databases}:{volumes['databases']}:ro",
            "-v", f"{self.archive}:{volumes['archive']}",
            "-v", f"{kubeconfig}:/etc/tenancy/kubeconfig:ro",
            *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
            str(image),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        eventually(self.healthy, timeout=90, what="the image's /healthz answers 200")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the image exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def init_pid(self) -> int:
        """The pid namespace's init (run-image.sh), child of unshare: what gets SIGTERM."""
        assert self.proc is not None
        (child,) = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(child)

    def entrypoint_pid(self) -> int:
        init = self.init_pid()
        (child,) = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        return int(child)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.init_pid(), signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_the_image_reconciles_as_the_chart_runs_it(image: Path, image_stack: LocalStack) -> None:
    stack, cluster = image_stack, Cluster(image_stack.kubeconfig)
    workdir = Path(tempfile.mkdtemp(prefix="image-run-", dir=stack.workdir))
    workdir.chmod(0o755)
    op = ImageOperator(stack, image, workdir)
    op.start()
    try:
        # What the pod's container would be: the image's user, no capabilities, no way to gain any,
        # a read-only root.
        pid = op.entrypoint_pid()
        st = status_fields(pid)
        assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(GID)] * 4
        assert st["CapEff"] == st["CapPrm"] == st["CapAmb"] == "0000000000000000"
        assert st["NoNewPrivs"] == "1"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:-1]
        assert argv == [b"-OO", b"-m", b"tenancy_operator", b"run"]
        root_mount = next(
            line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/"
        )
        assert "ro" in root_mount[5].split(","), root_mount

        admin = stack.admin_dsn()
        server_major = sql_value(admin, "SELECT current_setting('server_version_num')::int / 10000")
        assert server_major <= IMAGE_PG_MAJOR, f"the image's pg_dump cannot archive PostgreSQL {server_major}"
        namespace = "image"
        stack.kubectl("create", "namespace", namespace)
        cluster.create(PLURAL, namespace, tenant("vault", deletionPolicy="Archive"))
        cluster.wait_condition(PLURAL, namespace, "vault", timeout=90)
        assert sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_vault'") == 1
        assert cluster.secret_data(namespace, "vault-db")["uri"]

        # pg_dump in the image writes to the archive volume, nothing else being writable but /tmp.
        with as_owner(admin, "tenant_vault") as owner:
            owner.execute("CREATE TABLE gold (id int PRIMARY KEY)")
            owner.execute("INSERT INTO gold SELECT generate_series(1, 100)")
        cluster.delete(PLURAL, namespace, "vault")
        eventually(lambda: cluster.gone(PLURAL, namespace, "vault"), timeout=90, what="Tenant archived and gone")
        with connect(admin) as conn:
            row = conn.execute(
                "SELECT path, sha256 FROM tenancy.tenant_archives WHERE namespace = %s AND name = 'vault'", [namespace]
            ).fetchone()
        assert row is not None
        path, sha = row
        assert path.startswith("/var/lib/tenancy/archive/")
        dump = op.archive / Path(path).relative_to("/var/lib/tenancy/archive")
        assert hashlib.sha256(dump.read_bytes()).hexdigest() == sha
        assert dump.stat().st_uid == UID

        # And pg_restore brings it back.
        cluster.create(PLURAL, namespace, tenant("vault", restoreFrom="latest"))
        cluster.wait_condition(PLURAL, namespace, "vault", timeout=90)
        assert sql_value(admin, "SELECT count(*) FROM tenant_vault.gold") == 100
    finally:
        code = op.stop()
        log = op.log_text()
    assert code == 0, f"the image did not shut down cleanly on SIGTERM (exit {code}):\n{log[-4000:]}"
    assert "Read-only file system" not in log and "Permission denied" not in log, log[-4000:]
