"""Thin async helpers over the Kubernetes API for what Kopf does not do for us."""
