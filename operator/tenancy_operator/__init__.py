"""tenancy-operator: declarative SaaS tenants on PostgreSQL, driven from Kubernetes."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml's `version` is the one version source; the chart's appVersion follows it
    # (tests/unit/test_version.py).
    __version__ = version("tenancy-operator")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
GROUP = "tenancy.dev"
VERSION = "v1alpha1"
