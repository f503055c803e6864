"""Server-side sharded list and watch (KEP-5866): what sharded operator replicas will rely on.

The test kube-apiserver (Kubernetes 1.36) runs with the alpha feature gate ShardedListAndWatch on
(devenv/controlplane.py). A LIST or WATCH with ``shardSelector=shardRange(object.metadata.uid,
'<start>', '<end>')`` returns only the objects whose 64-bit FNV-1a hash of the field lies in
[start, end). Bounds are single-quoted, 0x-prefixed, exactly 16 hex digits (or '0x10000000000000000',
2^64, as the exclusive end of the whole space): the short form '0x0' used in the API's own doc
comment is refused (with a 500). With the gate off, or on an older server, the parameter is
silently ignored and every replica would see every object: every test here but the hash's and the
union's fails then (checked by starting the server with the gate off). Custom resources' lists do
not echo the selector in metadata.shardInfo in 1.36.3; built-in kinds' lists do.

Requests go through plain HTTPS with the stack's admin certificate, so the query parameter reaches
the server exactly as written (the Python clients have no shardSelector argument yet).
"""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator.shards import fnv1a_64  # the hash the server applies (k8s.io/apimachinery/pkg/sharding)

from .harness import GROUP, VERSION, Cluster, tenant

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

HALF = 0x8000000000000000
SHARD_LOW = "shardRange(object.metadata.uid, '0x0000000000000000', '0x8000000000000000')"
SHARD_HIGH = "shardRange(object.metadata.uid, '0x8000000000000000', '0x10000000000000000')"
TENANTS = 20


def in_low_shard(uid: str) -> bool:
    return fnv1a_64(uid) < HALF


class Api:
    """GET requests as the admin user, with the query string we write."""

    def __init__(self, stack: LocalStack) -> None:
        certs = stack.control_plane.certs
        self.base = stack.control_plane.url
        self.context = ssl.create_default_context(cafile=str(certs.ca_cert))
        self.context.load_cert_chain(certs.admin_cert, certs.admin_key)

    def url(self, path: str, **query: str) -> str:
        return f"{self.base}{path}?{urllib.parse.urlencode(query)}" if query else f"{self.base}{path}"

    def get(self, path: str, **query: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url(path, **query), context=self.context, timeout=30) as response:  # noqa: S310 - our own URL
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url(path), context=self.context, timeout=30) as response:  # noqa: S310 - our own URL
            return str(response.read().decode())

    @contextlib.contextmanager
    def watch(self, path: str, **query: str) -> Iterator[Iterator[dict[str, Any]]]:
        """A watch, open when the block starts; its events, one per line, until the server ends it
        (``timeoutSeconds``) or the block does."""
        url = self.url(path, watch="true", **query)
        with urllib.request.urlopen(url, context=self.context, timeout=60) as response:  # noqa: S310 - our own URL
            yield (json.loads(line) for line in response if line.strip())


@pytest.fixture(scope="module")
def api(stack: LocalStack) -> Api:
    return Api(stack)


def tenants_path(namespace: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/tenants"


def names(listing: dict[str, Any]) -> set[str]:
    return {item["metadata"]["name"] for item in listing["items"]}


def test_fnv1a_64_matches_the_reference_vectors() -> None:
    """The published FNV-1a 64 test vectors, so the shard predictions below mean something."""
    assert fnv1a_64("") == 0xCBF29CE484222325
    assert fnv1a_64("a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64("foobar") == 0x85944171F73967E8


def test_the_gate_is_on(api: Api) -> None:
    """kube-apiserver's own account of its feature gates (1 = enabled)."""
    metrics = api.text("/metrics").splitlines()
    assert 'kubernetes_feature_enabled{name="ShardedListAndWatch",stage="ALPHA"} 1' in metrics


def test_gate_is_on_and_filters_tenants(api: Api, cluster: Cluster, namespace: str) -> None:
    uids = {}
    for i in range(TENANTS):
        created = cluster.create("tenants", namespace, tenant(f"shard-{i:02d}"))
        uids[created["metadata"]["name"]] = created["metadata"]["uid"]
    path = tenants_path(namespace)

    status, everything = api.get(path)
    assert status == 200, everything
    status, low = api.get(path, shardSelector=SHARD_LOW)
    assert status == 200, low
    status, high = api.get(path, shardSelector=SHARD_HIGH)
    assert status == 200, high

    assert names(everything) == set(uids)
    # With the gate off both lists would be the whole collection.
    assert names(low) and names(high), "20 random uids all in one half: the selector was ignored"
    assert names(low).isdisjoint(names(high))
    assert names(low) | names(high) == set(uids)
    # Each tenant is in the half its uid's FNV-1a hash says: a replica can compute ownership itself.
    assert names(low) == {name for name, uid in uids.items() if in_low_shard(uid)}

    # No metadata.shardInfo on a custom resource's list in 1.36.3 (see the next test).
    assert "shardInfo" not in low["metadata"], low["metadata"]
    assert "shardInfo" not in high["metadata"], high["metadata"]


def test_shard_info_is_echoed_for_built_in_lists_only(api: Api, stack: LocalStack, namespace: str) -> None:
    """metadata.shardInfo (the applied selector, echoed so a client can tell it was honoured) is
    set only on typed lists: the apiserver sets it through metav1.ShardedListInterface, which
    ListMeta implements and unstructured.UnstructuredList (custom resources) does not. So a sharded
    Tenant watcher cannot read shardInfo to check the gate; it can check that every item it gets
    hashes into its range, or ask /metrics (test_the_gate_is_on)."""
    for i in range(4):
        stack.kubectl("create", "configmap", f"shard-{i}", "-n", namespace)
    status, configmaps = api.get(f"/api/v1/namespaces/{namespace}/configmaps", shardSelector=SHARD_LOW)
    assert status == 200, configmaps
    assert configmaps["metadata"].get("shardInfo") == {"selector": SHARD_LOW}, configmaps["metadata"]
    assert all(in_low_shard(cm["metadata"]["uid"]) for cm in configmaps["items"])
    status, everything = api.get(f"/api/v1/namespaces/{namespace}/configmaps")
    assert status == 200, everything
    assert "shardInfo" not in everything["metadata"]

    status, tenants = api.get(tenants_path(namespace), shardSelector=SHARD_LOW)
    assert status == 200, tenants
    assert "shardInfo" not in tenants["metadata"], tenants["metadata"]


def test_a_selector_of_two_ranges_is_their_union(api: Api, cluster: Cluster, namespace: str) -> None:
    for i in range(6):
        cluster.create("tenants", namespace, tenant(f"union-{i}"))
    path = tenants_path(namespace)
    status, both = api.get(path, shardSelector=f"{SHARD_LOW} || {SHARD_HIGH}")
    assert status == 200, both
    assert names(both) == names(api.get(path)[1])


@pytest.mark.parametrize(
    ("selector", "fragment"),
    [
        # The API's doc comment writes '0x0'; the parser wants all 16 digits.
        ("shardRange(object.metadata.uid, '0x0', '0x8000000000000000')", "16-digit hex value"),
        ("shardRange(metadata.uid, '0x0000000000000000', '0x8000000000000000')", "unsupported field path"),
        ("shardRange(object.metadata.uid, '0x8000000000000000', '0x0000000000000000')", "must be less than"),
        (f"{SHARD_LOW} && {SHARD_HIGH}", "only shardRange() and || are allowed"),
    ],
)
def test_a_malformed_selector_is_refused(api: Api, namespace: str, selector: str, fragment: str) -> None:
    """Refused rather than ignored, so a replica with a typo does not silently watch everything.
    In 1.36.3 the refusal is a 500 without a reason (the registry returns the parser's plain
    error), not a 400 BadRequest: a client that retries server errors (Kopf does) retries it
    forever instead of failing fast."""
    status, body = api.get(tenants_path(namespace), shardSelector=selector)
    assert (status, body["code"], body["status"]) == (500, 500, "Failure"), json.dumps(body)
    assert "invalid shard selector" in body["message"], body["message"]
    assert fragment in body["message"], body["message"]


def test_watch_delivers_only_its_shard(api: Api, cluster: Cluster, namespace: str) -> None:
    path = tenants_path(namespace)
    status, start = api.get(path)
    assert status == 200, start
    watch = api.watch(
        path, shardSelector=SHARD_LOW, resourceVersion=start["metadata"]["resourceVersion"], timeoutSeconds="60"
    )
    with watch as events:
        # Create until both halves have some; the last low-half tenant's ADDED event ends the wait:
        # events come in resourceVersion order, so every earlier one has been delivered by then.
        created: dict[str, str] = {}
        while len(created) < 8 or len({in_low_shard(uid) for uid in created.values()}) < 2:
            obj = cluster.create("tenants", namespace, tenant(f"watch-{uuid.uuid4().hex[:8]}"))
            created[obj["metadata"]["name"]] = obj["metadata"]["uid"]
        low = {name for name, uid in created.items() if in_low_shard(uid)}
        last_low = next(name for name in reversed(created) if name in low)

        seen: list[tuple[str, str]] = []
        for event in events:
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if seen[-1] == ("ADDED", last_low):
                break
        else:
            pytest.fail(f"the watch ended before {last_low} was added; saw {seen}")
    # The session's operator may be running and writing to them too (MODIFIED): all in range.
    assert {name for _, name in seen} <= low, seen
    assert {name for kind, name in seen if kind == "ADDED"} == low, seen
