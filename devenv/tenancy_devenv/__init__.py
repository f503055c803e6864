"""A local, real Kubernetes control plane, PostgreSQL clusters and S3 object store for development
and tests."""

from tenancy_devenv.binaries import ensure_binaries, postgres_bindir, repo_root
from tenancy_devenv.certs import Certs, write_certs
from tenancy_devenv.controlplane import ControlPlane, KubectlError
from tenancy_devenv.objectstore import ObjectStore
from tenancy_devenv.postgres import PostgresCluster
from tenancy_devenv.process import DevEnvError

__all__ = [
    "Certs",
    "ControlPlane",
    "DevEnvError",
    "KubectlError",
    "ObjectStore",
    "PostgresCluster",
    "ensure_binaries",
    "postgres_bindir",
    "repo_root",
    "write_certs",
]
