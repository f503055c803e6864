"""Test-side helpers: run the real operator as a process, poll with deadlines, read the cluster.

Nothing here fakes a component: the operator is `python -OO -m tenancy_operator run`, the API server
and PostgreSQL are the session's real processes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from minio.error import S3Error
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql as psql

from tenancy_devenv.binaries import ensure_binaries, postgres_bindirs
from tenancy_devenv.process import die_with_parent, http_ok
from tenancy_devenv.stack import OPERATOR_PYTHON_FLAGS, LocalStack
from tenancy_operator.k8s.client import Kube
from tenancy_operator.k8s.kubectl import PluginKube

GROUP, VERSION = "tenancy.dev", "v1alpha1"
T = TypeVar("T")


def eventually(check: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.25, what: str = "") -> T:
    """Poll ``check`` until it returns a truthy value without raising AssertionError; fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, ApiException, psycopg.OperationalError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or check}; last error: {last!r}")
        time.sleep(interval)  # polling interval, not synchronisation: the condition decides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """The operator under test, as users run it: a process configured by environment variables."""

    def __init__(
        self, stack: LocalStack, workdir: Path, *, sweep_interval: float = 3.0, env: dict[str, str] | None = None
    ) -> None:
        self.stack = stack
        self.workdir = workdir
        self.sweep_interval = sweep_interval
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.prometheus_port = free_port()
        """Where the operator looks for Prometheus (flag rollout gates); tests start one there."""
        self.log_path = workdir / "operator.log"
        self.targets = {t: stack.operator_dsn(t) for t in stack.targets}

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.stack.kubeconfig),
            "TENANCY_DATABASE_TARGETS": json.dumps(self.targets),
            "TENANCY_METRICS_PORT": str(self.metrics_port),
            "TENANCY_HEALTH_PORT": str(self.health_port),
            "TENANCY_BIND_ADDRESS": "127.0.0.1",
            "TENANCY_PROMETHEUS_URL": f"http://127.0.0.1:{self.prometheus_port}",
            "TENANCY_PROMETHEUS_TIMEOUT_SECONDS": "5",
            "TENANCY_ROLLOUT_CHECK_SECONDS": "1",
            "TENANCY_SWEEP_INTERVAL_SECONDS": str(self.sweep_interval),
            "TENANCY_ARCHIVE_DIR": str(self.workdir / "archive"),
            "TENANCY_ARCHIVE_STORE": json.dumps(self.stack.archive_store_config()),
            "TENANCY_ARCHIVE_CATALOG_CHECK_SECONDS": "2",
            # The second target's archives in a store of their own, SeaweedFS with server-side
            # encryption (test_archives.py).
            "TENANCY_ARCHIVE_STORES": json.dumps(self.stack.archive_stores_config()),
            # Placement: test_placement.py requires these of the session's two targets.
            "TENANCY_DATABASE_TARGET_LABELS": json.dumps({"default": {"residency": "eu", "disk": "ssd"},
                                                          "second": {"residency": "us"}}),
            # Every major's tools here, newest first, as an image carrying several clients: the
            # operator must pick each server's own (a newer pg_restore fails on 15: archives tests).
            "TENANCY_PG_BIN_DIR": os.pathsep.join(str(d) for _, d in sorted(postgres_bindirs().items(), reverse=True)),
            "TENANCY_LOG_LEVEL": os.environ.get("TENANCY_TEST_LOG_LEVEL", "INFO"),
            **self.extra_env,
        }

    def start(self, wait: bool = True) -> None:
        """Start the process; ``wait``: until its /healthz answers (raises if it exits first)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *OPERATOR_PYTHON_FLAGS, "-m", "tenancy_operator", "run"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        log.close()
        if wait:
            eventually(self.healthy, timeout=60, what="operator /healthz answers 200")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


class Cluster:
    """The Kubernetes API through the official client, for tests to read what users read."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def create(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)  # type: ignore[no-any-return]

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)  # type: ignore[no-any-return]

    def patch(self, plural: str, namespace: str, name: str, patch: dict[str, Any], *,
              field_manager: str | None = None) -> dict[str, Any]:
        """A merge patch; ``field_manager``: the name the API server records for it (kubectl's
        --field-manager), as each tool or person would send its own."""
        extra = {"field_manager": field_manager} if field_manager else {}
        return self.custom.patch_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, namespace, plural, name, patch, _content_type="application/merge-patch+json", **extra
        )

    def delete(self, plural: str, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def gone(self, plural: str, namespace: str, name: str) -> bool:
        try:
            self.get(plural, namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def condition(self, plural: str, namespace: str, name: str, type_: str) -> dict[str, Any]:
        status = self.get(plural, namespace, name).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})

    def wait_condition(
        self,
        plural: str,
        namespace: str,
        name: str,
        type_: str = "Ready",
        status: str = "True",
        reason: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        def check() -> dict[str, Any]:
            obj = self.get(plural, namespace, name)
            st = obj.get("status") or {}
            assert st.get("observedGeneration") == obj["metadata"]["generation"], "status not caught up yet"
            cond = next((c for c in st.get("conditions") or [] if c["type"] == type_), None)
            assert cond is not None, f"no {type_} condition yet: {st}"
            assert cond["status"] == status, f"{type_}={cond['status']} ({cond.get('reason')}: {cond.get('message')})"
            assert reason is None or cond["reason"] == reason, f"reason {cond['reason']}: {cond.get('message')}"
            return obj

        return eventually(check, timeout=timeout, what=f"{plural}/{name} {type_}={status} {reason or ''}")

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        secret = self.core.read_namespaced_secret(name, namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        evs = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        return [{"type": e.type, "reason": e.reason, "message": e.message} for e in evs.items]

    def has_event(self, namespace: str, name: str, reason: str, type_: str | None = None) -> bool:
        return any(
            e["reason"] == reason and (type_ is None or e["type"] == type_) for e in self.events(namespace, name)
        )

    def wait_event(self, namespace: str, name: str, reason: str, type_: str | None = None,
                   timeout: float = 60.0) -> None:
        """Events are posted in the background, after the change they report: poll for one."""
        eventually(lambda: self.has_event(namespace, name, reason, type_), timeout=timeout,
                   what=f"{reason} Event on {namespace}/{name}")


async def gateway(stack: LocalStack, namespaces: tuple[str, ...] | list[str] = ()) -> Kube:
    """The operator's Kubernetes gateway on the stack's API server, with the stack's kubeconfig."""
    kubeconfig = await PluginKube.from_kubeconfig(str(stack.kubeconfig))
    return Kube(kubeconfig.http, namespaces)


def tenant(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Tenant", "metadata": {"name": name}, "spec": spec}


def stored_bytes(stack: LocalStack, location: str, *, missing_ok: bool = False) -> bytes | None:
    """An archive object's bytes as the store holds them (s3://bucket/key in the stack's object
    store, or a path); ``missing_ok``: None if it is not there."""
    if not location.startswith("s3://"):
        path = Path(location)
        return None if missing_ok and not path.exists() else path.read_bytes()
    bucket, key = location[5:].split("/", 1)
    try:
        response = stack.objectstore.client().get_object(bucket, key)
    except S3Error as exc:
        if missing_ok and exc.code == "NoSuchKey":
            return None
        raise
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5, **kwargs)


def sql_value(dsn: str, query: str, params: list[Any] | None = None) -> Any:
    with connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None


def dba_execute(admin_dsn: str, statement: str) -> None:
    """Run a DBA's statement on a role or grant (drift a test injects). PostgreSQL refuses it with
    "tuple concurrently updated" when the operator alters the same catalog row at that moment (a
    quota pass setting the tenant role's statement_timeout, say); a DBA would run it again, and so
    does this."""
    def run() -> bool:
        try:
            with connect(admin_dsn) as conn:
                conn.execute(statement)  # type: ignore[arg-type]
        except psycopg.errors.InternalError_ as exc:
            if "tuple concurrently updated" not in (exc.diag.message_primary or ""):
                raise
            raise AssertionError(str(exc)) from exc
        return True

    eventually(run, timeout=30, what=f"{statement!r} ran")


def as_owner(admin_dsn: str, owner: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A session acting as a tenant's owner role (what a migration does): for tests that need
    objects in a tenant's schema; the application's login has data privileges only."""
    conn = connect(admin_dsn)
    conn.execute(psql.SQL("SET ROLE {}").format(psql.Identifier(owner)))
    return conn


@contextlib.contextmanager
def crd_schema_replaced(
    stack: LocalStack, crd: str, path: str, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[None]:
    """The schema node of ``crd`` at the JSON-pointer ``path`` replaced by ``change(node)`` for the
    block (an older CRD, to store objects it allowed); the real one put back after."""
    node: Any = json.loads(stack.kubectl("get", "crd", crd, "-o", "json").stdout)
    for part in path.strip("/").split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    original = node

    def replace(value: dict[str, Any]) -> None:
        patch = json.dumps([{"op": "replace", "path": path, "value": value}])
        stack.kubectl("patch", "crd", crd, "--type=json", "-p", patch)

    replace(change(original))
    try:
        yield
    finally:
        replace(original)


@contextlib.contextmanager
def own_stack(request: Any, label: str, *, sharded_watch: bool = True) -> Iterator[LocalStack]:
    """A control plane and PostgreSQL of a module's own (for an operator of its own, or none),
    stopped after; its work directory kept when a test of the module failed, or always with
    TENANCY_KEEP_WORKDIR=1. ``sharded_watch=False``: an API server that ignores shardSelector."""
    # Not under pytest's 0700 basetemp: the postgres user must be able to traverse the path.
    workdir = Path(tempfile.mkdtemp(prefix=f"tenancy-{label}-"))
    workdir.chmod(0o755)
    stack = LocalStack(workdir, ["default"], detached=False, with_operator=False, bin_dir=ensure_binaries(),
                       sharded_watch=sharded_watch)
    failed_before = request.session.testsfailed
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        if request.session.testsfailed > failed_before or os.environ.get("TENANCY_KEEP_WORKDIR") == "1":
            print(f"\n{label} stack workdir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
