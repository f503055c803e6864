"""What the operator reads of the tenants' Secrets in bulk: their metadata, never their data.

The sweep (every five minutes) and the resume check at a start only need to know which tenant
Secrets exist and their rotation annotation. Asked as PartialObjectMetadata, the API server sends
no credentials, so none are decoded and held in the operator's memory for it.
"""

from __future__ import annotations

import pytest
from kubernetes.client import V1ObjectMeta, V1Secret

from tenancy_devenv.stack import LocalStack
from tenancy_operator.k8s import client as k8s_client

from .harness import Cluster, gateway

LABEL = "tenancy.dev/secret-read-test"


async def test_bulk_secret_reads_carry_metadata_and_no_credentials(
    stack: LocalStack, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read in pages (here of 2, and every Secret comes once): at 10,000 tenants one answer would
    hold every Secret's metadata, managedFields included, decoded at once at each sweep."""
    cluster = Cluster(stack.kubeconfig)
    for name in ("creds", "creds-2", "creds-3", "creds-4", "creds-5"):
        cluster.core.create_namespaced_secret(namespace, V1Secret(
            metadata=V1ObjectMeta(name=name, labels={LABEL: "yes"}, annotations={"tenancy.dev/note": "kept"}),
            string_data={"password": "s3cr3t-value"}))
    cluster.core.create_namespaced_secret(namespace, V1Secret(
        metadata=V1ObjectMeta(name="other"), string_data={"password": "unrelated"}))
    monkeypatch.setattr(k8s_client, "LIST_PAGE", 2)
    kube = await gateway(stack)
    try:
        everywhere = await kube.list_secret_metadata(f"{LABEL}=yes")
    finally:
        await kube.close()
    mine = [s for s in everywhere if s["metadata"]["namespace"] == namespace]
    assert sorted(s["metadata"]["name"] for s in mine) == ["creds", "creds-2", "creds-3", "creds-4", "creds-5"]
    assert all(s["metadata"]["annotations"]["tenancy.dev/note"] == "kept" for s in mine)
    assert all("data" not in s and "stringData" not in s for s in mine)
    assert "s3cr3t-value" not in repr(everywhere)
