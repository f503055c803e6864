"""The test harness itself: the control plane is real and complete, the databases are set up the
way the operator expects, and nothing outlives the stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tenancy_devenv.postgres import PostgresCluster
from tenancy_devenv.process import wait_for
from tenancy_devenv.stack import LocalStack

TARGETS = ("default", "second")  # as started by conftest.py


def _gone(stack: LocalStack, kind: str, name: str, namespace: str | None = None) -> bool:
    args = ["get", kind, name, "-o", "name"] + (["-n", namespace] if namespace else [])
    result = stack.kubectl(*args, check=False)
    if result.returncode != 0 and "NotFound" not in result.stderr:
        raise AssertionError(result.stderr)
    return result.returncode != 0


def test_server_is_kubernetes_1_36_3(stack: LocalStack) -> None:
    """The version hack/controlplane/kubernetes/go.mod requires, stamped into the binaries (Helm
    checks the chart's kubeVersion against it)."""
    version = json.loads(stack.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert (version["serverVersion"]["major"], version["serverVersion"]["minor"]) == ("1", "36")


def test_configmap_round_trip(stack: LocalStack, namespace: str) -> None:
    stack.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=colour=blue")
    got = stack.kubectl("get", "configmap", "settings", "-n", namespace, "-o", "jsonpath={.data.colour}")
    assert got.stdout == "blue"


def test_namespace_deletion_finishes(stack: LocalStack, namespace: str) -> None:
    """Needs the controller-manager's namespace controller; without it the namespace stays Terminating."""
    stack.kubectl("create", "configmap", "leftover", "-n", namespace)
    stack.kubectl("delete", "namespace", namespace, "--wait=false")
    wait_for(f"namespace {namespace} to go", lambda: _gone(stack, "namespace", namespace), 60)


def test_owner_reference_garbage_collection(stack: LocalStack, namespace: str) -> None:
    stack.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = stack.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    stack.kubectl("create", "-f", "-", input=json.dumps(dependent))
    stack.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(
        "the garbage collector to delete the dependent",
        lambda: _gone(stack, "configmap", "dependent", namespace),
        60,
    )


def test_default_service_account_is_created(stack: LocalStack, namespace: str) -> None:
    wait_for(
        "ServiceAccount default",
        lambda: stack.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
        30,
    )


@pytest.mark.parametrize("target", TARGETS)
def test_operator_login_is_limited_but_can_create_roles_and_schemas(stack: LocalStack, target: str) -> None:
    with psycopg.connect(stack.operator_dsn(target), autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert row.fetchone() == (False, True, False)
        conn.execute("CREATE ROLE harness_tenant NOLOGIN")
        try:
            conn.execute("GRANT harness_tenant TO current_user")
            conn.execute("CREATE SCHEMA harness_tenant AUTHORIZATION harness_tenant")
            conn.execute("DROP SCHEMA harness_tenant")
        finally:
            conn.execute("DROP ROLE harness_tenant")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE DATABASE harness_nope")


def test_targets_are_separate_clusters_with_superuser_admin(stack: LocalStack) -> None:
    ports = set()
    for target in TARGETS:
        with psycopg.connect(stack.admin_dsn(target)) as conn:
            row = conn.execute("SELECT rolsuper, inet_server_port() FROM pg_roles WHERE rolname = current_user")
            is_superuser, port = row.fetchone() or (None, None)
            assert is_superuser is True
            ports.add(port)
    assert len(ports) == len(TARGETS)


@pytest.fixture
def short_workdir() -> Iterator[Path]:
    """Traversable by the postgres user, unlike pytest's 0700 tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="tenancy-it-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_restarts_only_what_died_and_down_leaves_nothing(stack: LocalStack, short_workdir: Path) -> None:
    first = LocalStack(short_workdir, ["default"], with_operator=False, bin_dir=stack.bin_dir)
    try:
        first.up()
        before = {name: pid for name, pid in first.status().items() if name != "operator"}
        dsn = first.admin_dsn()
        assert all(before.values()), before
        postgres_pid = before["postgres"]
        assert postgres_pid is not None
        os.kill(postgres_pid, signal.SIGKILL)
        wait_for("postgres to die", lambda: first.status()["postgres"] is None, 10)

        # A new object, as a second `dev up` would build: same settings from state.json.
        second = LocalStack(short_workdir, ["default"], with_operator=False, bin_dir=stack.bin_dir)
        second.up()
        after = {name: pid for name, pid in second.status().items() if name != "operator"}
        assert after["postgres"] not in (None, postgres_pid)
        assert {k: v for k, v in after.items() if k != "postgres"} == {
            k: v for k, v in before.items() if k != "postgres"
        }
        assert second.admin_dsn() == dsn
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # `source .dev/env` gives what the README's commands need.
        found = subprocess.run(
            ["bash", "-c", f"source {second.env_file} && command -v kubectl psql tenancy-operator kubectl-tenancy"
                           " && kubectl tenancy --help >/dev/null && echo ok"],
            capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
        ).stdout.splitlines()
        assert found[-1] == "ok" and len(found) == 5, found
    finally:
        LocalStack(short_workdir, with_operator=False).down()

    pids = [pid for pid in before.values() if pid]
    assert not [p for p in pids if _running(p)]
    assert not list(short_workdir.glob("*.pid"))
    assert not any(LocalStack(short_workdir, with_operator=False).status().values())


def test_children_die_with_their_parent(short_workdir: Path) -> None:
    """Non-detached children get PR_SET_PDEATHSIG, even after switching to the postgres user."""
    script = (
        "import sys; from pathlib import Path\n"
        "from tenancy_devenv import PostgresCluster, postgres_bindir\n"
        "pg = PostgresCluster(Path(sys.argv[1]), postgres_bindir(), name='orphan')\n"
        "pg.start(); print(pg.pid(), flush=True); sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(short_workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert _running(child_pid)
    finally:
        parent.kill()
        parent.wait()
    cluster = PostgresCluster(short_workdir, Path("/nonexistent"), name="orphan")
    wait_for("the orphaned postgres to be killed", lambda: cluster.pid() is None, 10)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
