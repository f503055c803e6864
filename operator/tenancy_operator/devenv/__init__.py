"""A local, real Kubernetes control plane and PostgreSQL clusters for development and tests."""

from tenancy_operator.devenv.binaries import ensure_binaries, postgres_bindir, repo_root
from tenancy_operator.devenv.certs import Certs, write_certs
from tenancy_operator.devenv.controlplane import ControlPlane, KubectlError
from tenancy_operator.devenv.postgres import PostgresCluster
from tenancy_operator.devenv.process import DevEnvError

__all__ = [
    "Certs",
    "ControlPlane",
    "DevEnvError",
    "KubectlError",
    "PostgresCluster",
    "ensure_binaries",
    "postgres_bindir",
    "repo_root",
    "write_certs",
]
