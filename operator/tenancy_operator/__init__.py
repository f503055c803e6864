"""tenancy-operator: declarative SaaS tenants on PostgreSQL, driven from Kubernetes."""

__version__ = "0.1.0"
GROUP = "tenancy.dev"
VERSION = "v1alpha1"
