"""Metrics, structured logs and Kubernetes Events: everything SREs watch, in one place."""
