"""The operator's own LISTs against the real API server, a page at a time.

A LIST of thousands of objects is read in pages (``limit`` and ``continue``), so a reader that
keeps a little of each object never holds the whole fleet's bodies at once. What must hold: every
object comes exactly once, all pages are of one resourceVersion, and a cache relisted from them
holds what the API server holds. A count (a LIST of one object) says how many there are. A
LIST can select Tenants on their phase (the catch-up at the start of a run reads only those not
settled), and a sharded replica's on their uid's slice.
"""

from __future__ import annotations

import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator import GROUP, VERSION
from tenancy_operator.k8s import client as k8s_client
from tenancy_operator.shards import Ownership, Slices
from tenancy_operator.sweep import UNSETTLED
from tenancy_operator.watch_cache import WatchCache

from .harness import Cluster, OperatorProcess, eventually, gateway, tenant

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

QUOTAS = 5


async def test_a_list_comes_in_pages_of_one_version_and_holds_every_object(
    stack: LocalStack, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster(stack.kubeconfig)
    for i in range(QUOTAS):
        cluster.create("quotas", namespace, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Quota",
                                             "metadata": {"name": f"q-{i}"}, "spec": {"tenantRef": {"name": "nobody"}}})
    monkeypatch.setattr(k8s_client, "LIST_PAGE", 2)  # 5 objects: pages of 2, 2 and 1
    kube = await gateway(stack)
    try:
        pages = [page async for page in kube.list_pages("quotas", namespace)]
        listed = await kube.list_objects("quotas", namespace)
        everywhere = [b async for page in kube.list_pages("quotas") for b in page.items]  # every namespace
        cache = WatchCache(dict)
        await cache.relist(kube.list_pages("quotas", namespace))
        counted = await kube.count("quotas")  # every namespace: the API server counts past the one listed
    finally:
        await kube.close()
    here = await gateway(stack, namespaces=[namespace])
    try:
        counted_here = await here.count("quotas")
    finally:
        await here.close()
    assert counted_here == QUOTAS
    assert counted == len(everywhere)
    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert len({p.resource_version for p in pages}) == 1 and pages[0].resource_version.isdigit()
    expected = [f"q-{i}" for i in range(QUOTAS)]
    assert sorted(b["metadata"]["name"] for p in pages for b in p.items) == expected
    assert sorted(b["metadata"]["name"] for b in listed) == expected
    assert sorted(b["metadata"]["name"] for b in cache.values()) == expected
    assert sorted(b["metadata"]["name"] for b in everywhere if b["metadata"]["namespace"] == namespace) == expected


async def test_a_list_of_the_tenants_not_settled_leaves_out_the_active_and_suspended(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    # Tenant names are one schema per database target, whatever the namespace: names of this test only.
    cluster.create("tenants", namespace, tenant("pl-active"))
    cluster.create("tenants", namespace, tenant("pl-paused", state="Suspended"))
    cluster.create("tenants", namespace, tenant("pl-failed", database="nowhere"))  # no such target: Failed
    cluster.wait_condition("tenants", namespace, "pl-active")
    cluster.wait_condition("tenants", namespace, "pl-failed", type_="Stalled")
    eventually(lambda: (cluster.get("tenants", namespace, "pl-paused").get("status") or {}).get("phase") == "Suspended",
               what="the suspended Tenant's phase")
    kube = await gateway(stack)
    try:
        listed = [b async for page in kube.list_pages("tenants", namespace, field_selector=UNSETTLED)
                  for b in page.items]
    finally:
        await kube.close()
    assert [(b["metadata"]["name"], b["status"]["phase"]) for b in listed] == [("pl-failed", "Failed")]


async def test_a_replica_lists_its_slices_whole_and_only_the_names_and_uids_of_the_others(
    stack: LocalStack, cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep, the catch-up and the quota pass of a sharded replica: the API server sends its
    own Tenants whole and the other replicas' as names and uids, never their specs or statuses."""
    uids = {}
    for i in range(20):  # not reconciled (no operator here): the LISTs are what is under test
        created = cluster.create("tenants", namespace, tenant(f"sl-{i:02d}"))
        uids[created["metadata"]["name"]] = created["metadata"]["uid"]
    mine = Ownership(Slices(4), held={0, 2})
    monkeypatch.setattr(k8s_client, "LIST_PAGE", 5)
    kube = await gateway(stack, namespaces=[namespace])
    try:
        own = await kube.list_objects("tenants", shard_selector=mine.selector())
        others = await kube.list_uids("tenants", mine.others_selector() or "")
    finally:
        await kube.close()
    expected_own = {name for name, uid in uids.items() if mine.owns_uid(uid)}
    assert expected_own and expected_own != set(uids), "20 random uids, all in 2 of 4 slices"
    assert {b["metadata"]["name"] for b in own} == expected_own
    assert all("spec" in b for b in own)
    assert {(m["metadata"]["name"], m["metadata"]["uid"]) for m in others} == \
        {(name, uid) for name, uid in uids.items() if name not in expected_own}
    assert all(set(m) == {"metadata"} and set(m["metadata"]) == {"namespace", "name", "uid"} for m in others)
