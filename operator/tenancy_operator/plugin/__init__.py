"""`kubectl tenancy`: the kubectl plugin (executable `kubectl-tenancy`) for operating tenants.

It talks to the Kubernetes API only (through tenancy_operator.k8s.kubectl): status, Events, the
credentials Secrets and the published flagd ConfigMaps. No database login. See
docs/kubectl-plugin.md.
"""
