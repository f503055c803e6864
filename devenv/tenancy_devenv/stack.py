"""The whole local stack: control plane, one PostgreSQL cluster per database target, an S3 object
store for archives and (for the dev stack) the operator, with ports, passwords and keys kept in
``state.json`` so that ``up`` after a crash or ``down`` restarts only what is missing, with the
same settings."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenancy_devenv.binaries import ensure_binaries, postgres_bindir, repo_root
from tenancy_devenv.controlplane import ControlPlane
from tenancy_devenv.objectstore import REGION, ObjectStore
from tenancy_devenv.postgres import PostgresCluster
from tenancy_devenv.process import DevEnvError, Service, free_ports, wait_for
from tenancy_devenv.seaweedfs import SeaweedStore
from tenancy_operator.config import TARGET_NAME

DEFAULT_TARGET = "default"
DEV_TARGETS = (DEFAULT_TARGET, "us")
"""`make dev`'s database targets: two PostgreSQL clusters, labelled as in TARGET_LABELS."""
TARGET_LABELS = {DEFAULT_TARGET: {"residency": "eu"}, "us": {"residency": "us"}}
"""Placement labels of the dev operator's targets (TENANCY_DATABASE_TARGET_LABELS), so that a
Tenant's spec.placement.requiredLabels can be tried out."""
OPERATOR_PYTHON_FLAGS = ("-OO",)
"""The operator's interpreter flags, the same as in the image's ENTRYPOINT (Dockerfile): no
docstrings and no asserts in memory, about 18 MB less per process. Tests, benchmarks and the dev
stack run the operator with them, so they run what the image runs."""
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class LocalStack:
    """``detached`` processes outlive this Python process (``dev up``); otherwise they are killed
    with it (tests, ``dev run``). ``with_operator`` also starts the operator and applies examples/.
    ``pg_bindir`` picks the PostgreSQL (binaries.postgres_bindir); default: the one recorded by an
    earlier ``up``, else the newest of Debian's. ``encrypted_store_for``: a target whose archives
    go to a store of its own, SeaweedFS with server-side encryption (the test session's second
    target; s3proxy, the main store, ignores encryption). ``sharded_watch``: False starts the
    API server with the feature gate ShardedListAndWatch off (one that ignores shardSelector)."""

    def __init__(
        self,
        workdir: Path,
        postgres_targets: Sequence[str] = (DEFAULT_TARGET,),
        detached: bool = False,
        *,
        with_operator: bool = True,
        bin_dir: Path | None = None,
        pg_bindir: Path | None = None,
        operator_timeout: float = 60.0,
        encrypted_store_for: str | None = None,
        sharded_watch: bool = True,
    ) -> None:
        self.workdir = workdir.resolve()
        self.state_file = self.workdir / "state.json"
        self.env_file = self.workdir / "env"
        self.detached = detached
        self.with_operator = with_operator
        self.operator_timeout = operator_timeout
        self._explicit_bin_dir = bin_dir
        state = self._load_state()
        # Targets recorded by an earlier `up` are kept so that `down` stops them too.
        self.targets = list(dict.fromkeys([*postgres_targets, *state.get("postgres", {})]))
        for target in self.targets:
            if not TARGET_NAME.fullmatch(target):  # what the operator will accept in TENANCY_DATABASE_TARGETS
                raise DevEnvError(f"invalid database target name {target!r}")
        self.bin_dir = bin_dir or Path(state.get("bin_dir", ""))

        ports = free_ports(6 + len(self.targets))  # in one call, so all distinct
        self.control_plane = ControlPlane(
            self.workdir,
            self.bin_dir,
            detached=detached,
            etcd_port=state.get("etcd_port", ports[0]),
            etcd_peer_port=state.get("etcd_peer_port", ports[1]),
            apiserver_port=state.get("apiserver_port", ports[2]),
            sharded_watch=sharded_watch,
        )
        self.metrics_port: int = state.get("metrics_port", ports[3])
        self.health_port: int = state.get("health_port", ports[4])
        if pg_bindir is None and state.get("pg_bindir"):
            pg_bindir = Path(state["pg_bindir"])
        self.pg_bindir = pg_bindir or postgres_bindir()
        saved_store = state.get("objectstore", {})
        self.objectstore = ObjectStore(
            self.workdir,
            port=saved_store.get("port", ports[5]),
            detached=detached,
            access_key=saved_store.get("access_key"),
            secret_key=saved_store.get("secret_key"),
        )
        self.encrypted_store_for = encrypted_store_for or state.get("encrypted_store_for")
        self.encrypted_store: SeaweedStore | None = None
        if self.encrypted_store_for is not None:
            saved_sse = state.get("objectstore-sse", {})
            self.encrypted_store = SeaweedStore(
                self.workdir, port=saved_sse.get("port"), detached=detached, access_key=saved_sse.get("access_key"),
                secret_key=saved_sse.get("secret_key"), other_ports=saved_sse.get("other_ports"))
        self.postgres: dict[str, PostgresCluster] = {}
        for target, spare_port in zip(self.targets, ports[6:], strict=True):
            saved = state.get("postgres", {}).get(target, {})
            self.postgres[target] = PostgresCluster(
                self.workdir,
                self.pg_bindir,
                port=saved.get("port", spare_port),
                name="postgres" if target == DEFAULT_TARGET else f"postgres-{target}",
                detached=detached,
                superuser_password=saved.get("superuser_password"),
                operator_password=saved.get("operator_password"),
            )
        self.operator = Service("operator", self.workdir, ["-m tenancy_operator run"])

    # What tests and the CLI use.

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, input=input, check=check)

    def admin_dsn(self, target: str = DEFAULT_TARGET) -> str:
        return self.postgres[target].admin_dsn

    def operator_dsn(self, target: str = DEFAULT_TARGET) -> str:
        return self.postgres[target].operator_dsn

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def archive_store_config(self) -> dict[str, str]:
        """The operator's TENANCY_ARCHIVE_STORE for the stack's object store, keys read from files."""
        return _store_config(self.objectstore)

    def archive_stores_config(self) -> dict[str, dict[str, str]]:
        """The operator's TENANCY_ARCHIVE_STORES: the encrypted store's target, if any, archives there
        with SSE-S3 (AES256)."""
        if self.encrypted_store is None or self.encrypted_store_for is None:
            return {}
        return {self.encrypted_store_for: {**_store_config(self.encrypted_store), "serverSideEncryption": "AES256"}}

    def services(self) -> list[Service]:
        """Every process of the stack, in stop order."""
        return [
            self.operator,
            self.objectstore.service,
            *([self.encrypted_store.service] if self.encrypted_store else []),
            *(pg.service for pg in self.postgres.values()),
            *reversed(self.control_plane.services),
        ]

    def status(self) -> dict[str, int | None]:
        """Process name -> pid, or None if not running."""
        return {s.name: s.pid() for s in reversed(self.services())}

    def up(self) -> None:
        """Start whatever is not running; safe to repeat."""
        if self._explicit_bin_dir is None:
            self.bin_dir = ensure_binaries()
            self.control_plane.bin_dir = self.bin_dir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        self.control_plane.start()
        for pg in self.postgres.values():
            pg.start()
        self.objectstore.start()
        if self.encrypted_store is not None:
            self.encrypted_store.start()
        crd_dir = repo_root() / "crds"
        if crd_dir.is_dir():
            self.control_plane.install_crds(crd_dir)
        self._write_env_file()
        if self.with_operator:
            self._start_operator()
            self._apply_examples()

    def down(self, *, purge: bool = False) -> None:
        """Stop every recorded process (their pid files go too); ``purge`` also deletes the workdir."""
        errors: list[DevEnvError] = []
        for step in (
            self.operator.stop,
            self.objectstore.stop,
            *([self.encrypted_store.stop] if self.encrypted_store else []),
            *(pg.stop for pg in self.postgres.values()),
            self.control_plane.stop,
        ):
            try:
                step()
            except DevEnvError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        if purge and self.workdir.is_dir():
            shutil.rmtree(self.workdir)

    # Internals.

    def _start_operator(self) -> None:
        """Start the operator unless it runs; fail with its log tail if it exits or never listens."""
        if self.operator.pid() is None:
            targets = {t: pg.operator_dsn for t, pg in self.postgres.items()}
            env = {
                # Dev defaults a developer's own environment may override.
                "TENANCY_BIND_ADDRESS": "127.0.0.1",
                "TENANCY_LOG_FORMAT": "console",
                "TENANCY_ARCHIVE_DIR": str(self.workdir / "archive"),
                "TENANCY_ARCHIVE_STORE": json.dumps(self.archive_store_config()),
                "TENANCY_ARCHIVE_STORES": json.dumps(self.archive_stores_config()),
                "TENANCY_PG_BIN_DIR": str(self.pg_bindir),  # pg_dump of the server's major
                "TENANCY_DATABASE_TARGET_LABELS": json.dumps(
                    {t: labels for t, labels in TARGET_LABELS.items() if t in self.postgres}),
                **os.environ,
                "KUBECONFIG": str(self.kubeconfig),
                "TENANCY_DATABASE_TARGETS": json.dumps(targets),
                "TENANCY_METRICS_PORT": str(self.metrics_port),
                "TENANCY_HEALTH_PORT": str(self.health_port),
            }
            self.operator.start([sys.executable, *OPERATOR_PYTHON_FLAGS, "-m", "tenancy_operator", "run"],
                                detached=self.detached, env=env)
        try:
            wait_for(
                f"the operator to listen on its health port {self.health_port}",
                lambda: _listening(self.health_port),
                self.operator_timeout,
                alive=self.operator.check_alive,
            )
        except DevEnvError as e:
            if self.operator.pid() is not None:
                raise DevEnvError(f"{e}; last lines of {self.operator.log_file}:\n{self.operator.log_tail()}") from None
            raise

    def _apply_examples(self) -> None:
        examples = repo_root() / "examples"
        if examples.is_dir() and any(p.suffix in MANIFEST_SUFFIXES for p in examples.rglob("*")):
            self.kubectl("apply", "-R", "-f", str(examples))

    def _write_env_file(self) -> None:
        lines = [
            f"export KUBECONFIG={shlex.quote(str(self.kubeconfig))}",
            f"export TENANCY_DATABASE_URL={shlex.quote(self.admin_dsn(self._main_target()))}",
            f"export TENANCY_S3_ENDPOINT={shlex.quote(self.objectstore.endpoint)}",
        ]
        if self.with_operator:
            lines.append(f"export TENANCY_METRICS_URL={shlex.quote(self.metrics_url)}")
        # The project's commands (tenancy-operator, kubectl-tenancy, tenancy-dev) live beside this
        # interpreter in the project's venv.
        commands = Path(sys.executable).parent
        lines.append(f"export PATH={shlex.quote(str(commands))}:{shlex.quote(str(self.bin_dir))}:"
                     f'{shlex.quote(str(self.pg_bindir))}:"$PATH"')
        self.env_file.write_text("\n".join(lines) + "\n")

    def _main_target(self) -> str:
        return DEFAULT_TARGET if DEFAULT_TARGET in self.postgres else self.targets[0]

    def _load_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        return state

    def _save_state(self) -> None:
        state: dict[str, Any] = {
            "bin_dir": str(self.bin_dir),
            "pg_bindir": str(self.pg_bindir),
            "etcd_port": self.control_plane.etcd_port,
            "etcd_peer_port": self.control_plane.etcd_peer_port,
            "apiserver_port": self.control_plane.apiserver_port,
            "metrics_port": self.metrics_port,
            "health_port": self.health_port,
            "postgres": {
                target: {
                    "port": pg.port,
                    "superuser_password": pg.superuser_password,
                    "operator_password": pg.operator_password,
                    "admin_dsn": pg.admin_dsn,
                    "operator_dsn": pg.operator_dsn,
                }
                for target, pg in self.postgres.items()
            },
            "objectstore": {
                "port": self.objectstore.port,
                "access_key": self.objectstore.access_key,
                "secret_key": self.objectstore.secret_key,
                "endpoint": self.objectstore.endpoint,
            },
        }
        if self.encrypted_store is not None:
            state["encrypted_store_for"] = self.encrypted_store_for
            state["objectstore-sse"] = {
                "port": self.encrypted_store.port,
                "access_key": self.encrypted_store.access_key,
                "secret_key": self.encrypted_store.secret_key,
                "other_ports": self.encrypted_store.other_ports,
            }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        self.state_file.chmod(0o600)  # it holds passwords and keys


def _store_config(store: ObjectStore) -> dict[str, str]:
    return {
        "url": f"s3://{store.bucket}/archives",
        "endpoint": store.endpoint,
        "region": REGION,
        "credentialsDir": str(store.credentials_dir),
    }


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
