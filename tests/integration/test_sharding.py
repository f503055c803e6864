"""Sharded replicas: two operator processes share one fleet through Leases and the API server's
sharded watch (control plane of the module's own, ShardedListAndWatch on).

What a user checks: every Tenant and Quota converges; each Tenant was provisioned by exactly one
replica, the one whose slice Lease covers its uid (the Provisioned Event names the replica that
posted it); `kubectl get leases` shows the split; a killed replica's slices go to the other within
the lease time and its tenants are served again; a replica that joins takes its share; slices move
only from or to the replica that joins or dies, never between the others; a tenant
whose PostgreSQL lock another session holds is left alone until it is released; a replica stopped
with a reconcile in progress logs one line counting the work left, not Kopf's warnings, and the
next holder does the work; a replica
configured with another slice count holds nothing until the replicas of the count in force are gone,
and leaves cleanly when stopped while it waits.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client

from tenancy_devenv.stack import LocalStack
from tenancy_operator.api.tenant import tenant_identifier
from tenancy_operator.db.tenants import TENANT_LOCK_CLASS
from tenancy_operator.shards import Slices

from .harness import Cluster, OperatorProcess, connect, eventually, own_stack, sql_value, tenant
from .netfault import SilentLink

pytestmark = pytest.mark.any_major  # run on one PostgreSQL major only (pyproject.toml, Makefile)

SLICE = "tenancy.dev/slice"

SLICES = 4
LEASE_SECONDS = 6
GROUP_NAME = "tenancy-operator"
FENCED = "slice leases could not be renewed for most of a lease: stopping work on them"


class Fleet:
    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.cluster = Cluster(stack.kubeconfig)
        self.coordination = client.CoordinationV1Api(self.cluster.api)
        self.replicas: dict[str, OperatorProcess] = {}

    def start(self, identity: str, slices: int = SLICES, kubeconfig: Path | None = None,
              wait: bool = True) -> OperatorProcess:
        workdir = self.stack.workdir / identity
        workdir.mkdir(exist_ok=True)
        operator = OperatorProcess(self.stack, workdir, sweep_interval=5.0, env={
            "TENANCY_SHARDING": "true", "TENANCY_SHARD_SLICES": str(slices),
            "TENANCY_SHARD_LEASE_SECONDS": str(LEASE_SECONDS), "TENANCY_SHARD_NAMESPACE": "default",
            "POD_NAME": identity, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {}),
        })
        operator.start(wait)
        self.replicas[identity] = operator
        return operator

    def live(self) -> list[str]:
        return [k for k, o in self.replicas.items() if o.proc is not None and o.proc.poll() is None]

    def holders(self, slices: int = SLICES) -> dict[int, str]:
        """Slice -> the replica its Lease names (kubectl get leases -l tenancy.dev/shard-group=...)."""
        leases = self.coordination.list_namespaced_lease(
            "default", label_selector=f"tenancy.dev/shard-group={GROUP_NAME},tenancy.dev/shard-lease=slice")
        out = {}
        for lease in leases.items:
            if lease.spec.holder_identity:
                index = int(lease.metadata.name.rsplit("-", 1)[1])
                if index < slices:
                    out[index] = lease.spec.holder_identity
        return out

    def members(self) -> set[str]:
        """The replicas with a member Lease (kubectl get leases -l tenancy.dev/shard-lease=member)."""
        leases = self.coordination.list_namespaced_lease(
            "default", label_selector=f"tenancy.dev/shard-group={GROUP_NAME},tenancy.dev/shard-lease=member")
        return {lease.spec.holder_identity for lease in leases.items}

    def split(self, *identities: str) -> dict[int, str]:
        """Wait until every slice is held and the given replicas hold them in equal shares."""
        def check() -> dict[int, str]:
            holders = self.holders()
            assert sorted(holders) == list(range(SLICES)), holders
            shares = Counter(holders.values())
            assert set(shares) == set(identities), holders
            assert max(shares.values()) - min(shares.values()) <= 1, holders
            for identity in identities:
                assert self.replicas[identity].metric("shard_slices_held") == shares[identity]
            return holders
        return eventually(check, timeout=60, interval=0.5, what=f"slices split between {identities}")

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.cluster.core.create_namespace({"metadata": {"name": name}})
        return name

    def provisioned_by(self, namespace: str, name: str, uid: str | None = None) -> set[str]:
        """The replicas that posted the Tenant's Provisioned Event (with ``uid``: that Tenant's, not
        an earlier one's of the same name)."""
        selector = f"involvedObject.name={name}" + (f",involvedObject.uid={uid}" if uid else "")
        events = self.cluster.core.list_namespaced_event(namespace, field_selector=selector)
        return {e.reporting_instance for e in events.items if e.reason == "Provisioned"}

    def assert_provisioned_by(self, namespace: str, name: str, replica: str, uid: str | None = None) -> None:
        """The Tenant's Provisioned Event names ``replica``, and only it. Events are posted in the
        background, so the Event may come a moment after the Tenant shows Ready."""
        def check() -> bool:
            got = self.provisioned_by(namespace, name, uid)
            assert got == {replica}, (namespace, name, got)
            return True
        eventually(check, timeout=30, interval=0.5, what=f"{namespace}/{name} provisioned by {replica}")


def quota(name: str, tenant_name: str) -> dict[str, Any]:
    return {"apiVersion": "tenancy.dev/v1alpha1", "kind": "Quota", "metadata": {"name": name},
            "spec": {"tenantRef": {"name": tenant_name}, "limits": {"connections": 7}}}


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    with own_stack(request, "shards") as stack:
        fleet = Fleet(stack)
        try:
            fleet.start("replica-a")
            fleet.start("replica-b")
            yield fleet
        finally:
            for operator in fleet.replicas.values():
                with contextlib.suppress(Exception):
                    operator.stop()


def owner_of(holders: dict[int, str], uid: str) -> str:
    return holders[Slices(SLICES).slice_of(uid)]


def test_two_replicas_share_the_fleet_each_tenant_served_by_its_slices_holder(fleet: Fleet) -> None:
    holders = fleet.split("replica-a", "replica-b")
    cluster = fleet.cluster
    # All in one namespace, and one namespace each: both spread over the replicas.
    shared = fleet.namespace("shared")
    placed = [(shared, f"one-{i}") for i in range(12)] + [(fleet.namespace("own"), f"solo-{i}") for i in range(4)]
    uids = {}
    for namespace, name in placed:
        uids[(namespace, name)] = cluster.create("tenants", namespace, tenant(name))["metadata"]["uid"]
        cluster.create("quotas", namespace, quota(f"{name}-limits", name))
    for namespace, name in placed:
        cluster.wait_condition("tenants", namespace, name, timeout=120)
        cluster.wait_condition("quotas", namespace, f"{name}-limits", timeout=120)
    owners = Counter()
    for key, uid in uids.items():
        expected = owner_of(holders, uid)
        fleet.assert_provisioned_by(*key, expected)
        owners[expected] += 1
    assert set(owners) == {"replica-a", "replica-b"}, owners  # 16 uids over 4 slices: both have work
    # A Quota is evaluated by its Tenant's replica, whichever replica's slice the Quota's own uid is in.
    crossed = [key for key in uids
               if owner_of(holders, cluster.get("quotas", key[0], f"{key[1]}-limits")["metadata"]["uid"])
               != owner_of(holders, uids[key])]
    assert crossed, "no Quota in another replica's slice than its Tenant: the test proves nothing"
    for namespace, name in crossed:
        status = cluster.get("quotas", namespace, f"{name}-limits")["status"]
        assert status["hard"]["connections"] == "7", status


def slice_labels(cluster: Cluster) -> dict[tuple[str, str], tuple[str | None, str]]:
    """Each Quota's tenancy.dev/slice label, and the label of its Tenant's slice (kubectl get
    quotas -L tenancy.dev/slice, beside the Tenants' uids)."""
    out = {}
    quotas = cluster.custom.list_cluster_custom_object("tenancy.dev", "v1alpha1", "quotas")["items"]
    for q in quotas:
        namespace, ref = q["metadata"]["namespace"], q["spec"]["tenantRef"]["name"]
        uid = cluster.get("tenants", namespace, ref)["metadata"]["uid"]
        want = f"{SLICES}-{Slices(SLICES).slice_of(uid)}"
        out[(namespace, q["metadata"]["name"])] = ((q["metadata"].get("labels") or {}).get(SLICE), want)
    return out


def test_each_replica_watches_only_the_quotas_of_its_slices(fleet: Fleet) -> None:
    """A Quota carries its Tenant's slice label, and each replica keeps only the Quotas of the slices
    it holds (the API server sends it no other). A Quota made before its Tenant is served as well, and
    a label a user changes is set back by the replica its wrong value sends the Quota to."""
    holders = fleet.split("replica-a", "replica-b")
    cluster = fleet.cluster
    namespace = fleet.namespace("labels")
    cluster.create("quotas", namespace, quota("early-limits", "early"))  # before its Tenant
    early = cluster.create("tenants", namespace, tenant("early"))["metadata"]["uid"]
    # Tenants of this test's own in both replicas' slices, so each replica has Quotas to keep.
    held = {owner_of(holders, early)}
    for i in range(20):
        if held == {"replica-a", "replica-b"}:
            break
        held.add(owner_of(holders, cluster.create("tenants", namespace, tenant(f"spread-{i}"))["metadata"]["uid"]))
        cluster.create("quotas", namespace, quota(f"spread-{i}-limits", f"spread-{i}"))
    assert held == {"replica-a", "replica-b"}, "no tenant of 20 hashed into both replicas' slices"
    cluster.wait_condition("quotas", namespace, "early-limits", timeout=120)

    def labelled() -> dict[tuple[str, str], tuple[str | None, str]]:
        labels = slice_labels(cluster)
        assert labels and all(have == want for have, want in labels.values()), labels
        return labels

    labels = eventually(labelled, timeout=60, interval=0.5, what="every Quota labelled with its Tenant's slice")
    assert cluster.get("quotas", namespace, "early-limits")["status"]["hard"]["connections"] == "7"

    def cached() -> bool:
        for replica in ("replica-a", "replica-b"):
            mine = sum(1 for _, want in labels.values() if holders[int(want.split("-")[1])] == replica)
            assert fleet.replicas[replica].metric("watch_cache_objects", kind="Quota") == mine, replica
        return True

    eventually(cached, timeout=30, interval=0.5, what="each replica holding only its slices' Quotas")
    assert {holders[int(want.split("-")[1])] for _, want in labels.values()} == {"replica-a", "replica-b"}

    # A user sends the Quota to the other replica's slice: that replica sets its label back.
    owner_slice = int(labels[(namespace, "early-limits")][1].split("-")[1])
    other = next(i for i, holder in holders.items() if holder != holders[owner_slice])
    cluster.patch("quotas", namespace, "early-limits", {"metadata": {"labels": {SLICE: f"{SLICES}-{other}"}}})
    eventually(lambda: slice_labels(cluster)[(namespace, "early-limits")] == labels[(namespace, "early-limits")],
               timeout=60, interval=0.5, what="the label set back to the Tenant's slice")
    eventually(cached, timeout=30, interval=0.5, what="each replica holding only its slices' Quotas again")
    assert cluster.get("quotas", namespace, "early-limits")["status"]["hard"]["connections"] == "7"
    assert cluster.get("tenants", namespace, "early")["status"]["effectiveLimits"]["connections"] == "7"

    # Its Tenant deleted, the Quota loses the label (every replica sees it again) and says so.
    cluster.delete("tenants", namespace, "early")
    eventually(lambda: cluster.gone("tenants", namespace, "early"), timeout=120, interval=0.5, what="Tenant gone")
    cluster.wait_condition("quotas", namespace, "early-limits", status="False", reason="TenantNotFound", timeout=60)
    eventually(lambda: SLICE not in (cluster.get("quotas", namespace, "early-limits")["metadata"].get("labels") or {}),
               timeout=30, interval=0.5, what="the orphaned Quota without a slice label")


def test_a_tenant_created_again_in_the_other_replicas_slice_keeps_its_quota(fleet: Fleet) -> None:
    """A Tenant deleted and created again under its name, its new uid in the other replica's slices,
    while its Quota stays: the Quota follows it to that replica (its slice label) and the new Tenant
    gets the Quota's limits, not its tier's."""
    holders = fleet.split("replica-a", "replica-b")
    cluster = fleet.cluster
    namespace = fleet.namespace("again")
    uid = cluster.create("tenants", namespace, tenant("phoenix", deletionPolicy="Delete"))["metadata"]["uid"]
    cluster.create("quotas", namespace, quota("phoenix-limits", "phoenix"))
    cluster.wait_condition("quotas", namespace, "phoenix-limits", timeout=120)
    first = owner_of(holders, uid)
    for _ in range(10):
        cluster.delete("tenants", namespace, "phoenix")
        eventually(lambda: cluster.gone("tenants", namespace, "phoenix"), timeout=120, interval=0.5,
                   what="Tenant gone")
        uid = cluster.create("tenants", namespace, tenant("phoenix", deletionPolicy="Delete"))["metadata"]["uid"]
        if owner_of(holders, uid) != first:
            break
    else:
        pytest.fail("10 creations of the Tenant all hashed into the same replica's slices")
    want = f"{SLICES}-{Slices(SLICES).slice_of(uid)}"
    eventually(lambda: (cluster.get("quotas", namespace, "phoenix-limits")["metadata"].get("labels") or {})
               .get(SLICE) == want, timeout=60, interval=0.5, what="the Quota labelled with the new Tenant's slice")
    cluster.wait_condition("tenants", namespace, "phoenix", timeout=120)
    fleet.assert_provisioned_by(namespace, "phoenix", owner_of(holders, uid), uid)
    eventually(lambda: (cluster.get("tenants", namespace, "phoenix")["status"].get("effectiveLimits") or {})
               .get("connections") == "7", timeout=60, interval=0.5, what="the Quota's limits on the new Tenant")
    cluster.wait_condition("quotas", namespace, "phoenix-limits", timeout=60)
    assert cluster.get("quotas", namespace, "phoenix-limits")["status"]["hard"]["connections"] == "7"


def test_a_killed_replicas_slices_go_to_the_other_and_its_tenants_are_served(fleet: Fleet) -> None:
    """The survivor serves the dead replica's Tenants, and labels their Quotas while it holds every
    slice: when replicas join or restart, no Quota needs a write."""
    holders = fleet.split("replica-a", "replica-b")
    fleet.replicas["replica-b"].kill()
    eventually(lambda: set(fleet.holders().values()) == {"replica-a"} and len(fleet.holders()) == SLICES,
               timeout=LEASE_SECONDS * 4, interval=0.5, what="replica-a holds every slice")
    cluster = fleet.cluster
    namespace = fleet.namespace("after-kill")
    # A new Tenant in a slice replica-b held: served by replica-a now.
    uids: dict[str, str] = {}
    for i in range(20):
        uids[f"late-{i}"] = cluster.create("tenants", namespace, tenant(f"late-{i}"))["metadata"]["uid"]
        cluster.create("quotas", namespace, quota(f"late-{i}-limits", f"late-{i}"))
        if owner_of(holders, uids[f"late-{i}"]) == "replica-b":
            break
    else:
        pytest.fail("no tenant of 20 hashed into replica-b's slices")
    name = f"late-{i}"
    cluster.wait_condition("tenants", namespace, name, timeout=90)
    fleet.assert_provisioned_by(namespace, name, "replica-a")
    cluster.wait_condition("quotas", namespace, f"{name}-limits", timeout=90)

    def labelled() -> bool:
        for late, uid in uids.items():
            labels = cluster.get("quotas", namespace, f"{late}-limits")["metadata"].get("labels") or {}
            assert labels.get(SLICE) == f"{SLICES}-{Slices(SLICES).slice_of(uid)}", (late, labels)
        return True

    eventually(labelled, timeout=60, interval=0.5, what="the survivor labelling the Quotas with their Tenants' slices")


def held_by(holders: dict[int, str]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for index, holder in holders.items():
        out.setdefault(holder, set()).add(index)
    return out


def test_a_joining_replica_takes_its_share(fleet: Fleet) -> None:
    fleet.start("replica-c")
    holders = fleet.split("replica-a", "replica-c")
    # Another joins: it takes its share from the others, and nothing moves between them (a replica
    # whose slices changed would restart its work on all of them).
    fleet.start("replica-d")
    after = held_by(fleet.split("replica-a", "replica-c", "replica-d"))
    for identity, before in held_by(holders).items():
        assert after[identity] <= before, (identity, before, after)
    holders = fleet.holders()
    namespace = fleet.namespace("after-join")
    names = [f"joined-{i}" for i in range(8)]
    uids = {n: fleet.cluster.create("tenants", namespace, tenant(n))["metadata"]["uid"] for n in names}
    for name in names:
        fleet.cluster.wait_condition("tenants", namespace, name, timeout=90)
        fleet.assert_provisioned_by(namespace, name, owner_of(holders, uids[name]))


def test_when_a_replica_dies_the_others_keep_their_slices_and_take_its_own(fleet: Fleet) -> None:
    before = held_by(fleet.split("replica-a", "replica-c", "replica-d"))
    fleet.replicas["replica-d"].kill()
    after = held_by(fleet.split("replica-a", "replica-c"))
    for identity in ("replica-a", "replica-c"):
        assert before[identity] <= after[identity], (identity, before, after)
    assert after["replica-a"] | after["replica-c"] == set(range(SLICES))


def test_a_tenant_whose_lock_another_session_holds_waits_for_it(fleet: Fleet) -> None:
    """The second line behind the Leases: while another session (a replica still finishing its work
    on a slice that changed hands) holds a tenant's advisory lock, the new holder's reconcile does
    not touch the tenant; it retries (reason Conflict) and goes on once the lock is released."""
    holders = fleet.split(*fleet.live())
    namespace = fleet.namespace("locked")
    uid = fleet.cluster.create("tenants", namespace, tenant("latched"))["metadata"]["uid"]
    fleet.cluster.wait_condition("tenants", namespace, "latched", timeout=90)
    owner = fleet.replicas[owner_of(holders, uid)]
    conflicts = owner.metric("reconcile_failures_total", kind="Tenant", reason="Conflict")
    state = "SELECT state FROM tenancy.tenants WHERE namespace = %s AND name = 'latched'"
    with connect(fleet.stack.admin_dsn()) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [TENANT_LOCK_CLASS, tenant_identifier("latched")])
        fleet.cluster.patch("tenants", namespace, "latched", {"spec": {"state": "Suspended"}})
        eventually(lambda: owner.metric("reconcile_failures_total", kind="Tenant", reason="Conflict") > conflicts,
                   timeout=60, what="the reconcile waited for the lock and gave up with Conflict")
        assert sql_value(fleet.stack.admin_dsn(), state, [namespace]) == "active"  # nothing done meanwhile
        other.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [TENANT_LOCK_CLASS, tenant_identifier("latched")])
    obj = fleet.cluster.wait_condition("tenants", namespace, "latched", reason="Suspended", timeout=90)
    assert obj["status"]["phase"] == "Suspended"
    assert sql_value(fleet.stack.admin_dsn(), state, [namespace]) == "suspended"


RUN_END = "the run ended with work in progress; each object is handled again by the next run that holds it"


def test_a_replica_stopped_with_a_reconcile_in_progress_says_so_in_one_line(fleet: Fleet) -> None:
    """A replica stopped (SIGTERM: a rolling update) or handing slices over ends its Kopf run with
    reconciles in progress, up to hundreds of them in a mass creation. Kopf would log a warning for
    each (and one more naming them all); the replica logs one line that counts them, and the next
    holder does the work."""
    live = fleet.live()
    holders = fleet.split(*live)
    namespace = fleet.namespace("cut-short")
    uid = fleet.cluster.create("tenants", namespace, tenant("halted"))["metadata"]["uid"]
    fleet.cluster.wait_condition("tenants", namespace, "halted", timeout=90)
    identity = owner_of(holders, uid)
    owner = fleet.replicas[identity]
    lock = [TENANT_LOCK_CLASS, tenant_identifier("halted")]
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' AND pid <> pg_backend_pid()"
    with connect(fleet.stack.admin_dsn()) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", lock)
        fleet.cluster.patch("tenants", namespace, "halted", {"spec": {"state": "Suspended"}})
        eventually(lambda: sql_value(fleet.stack.admin_dsn(), waiting) >= 1, timeout=30, interval=0.2,
                   what="the owner's reconcile waiting for the tenant's lock")
        logged_before = len(owner.log_text().splitlines())
        assert owner.stop() == 0
        records = []
        for line in owner.log_text().splitlines()[logged_before:]:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        # Kopf's own lines (a warning per cancelled handler, one naming every object with queued
        # events) would make a routine stop look like trouble.
        assert not [r for r in records if r.get("level") == "warning" and str(r.get("logger")).startswith("kopf")]
        (ended,) = [r for r in records if r.get("event") == RUN_END]
        assert ended["level"] == "info"
        assert ended["cancelled"].get("Tenant", 0) >= 1, ended
        other.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", lock)
    obj = fleet.cluster.wait_condition("tenants", namespace, "halted", reason="Suspended", timeout=90)
    assert obj["status"]["phase"] == "Suspended"
    fleet.start(identity)
    fleet.split(*live)


def through(link: SilentLink, kubeconfig: Path, out: Path) -> Path:
    """A copy of ``kubeconfig`` whose API server is reached through ``link``."""
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{link.port}"
    out.write_text(yaml.safe_dump(config))
    return out


def logged_at(operator: OperatorProcess, event: str) -> datetime | None:
    """When the replica first logged ``event`` (its JSON log's timestamp)."""
    for line in operator.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    return None


def test_a_replica_cut_off_from_the_api_server_stops_its_work_before_the_others_take_its_slices(
        fleet: Fleet) -> None:
    """A replica whose requests get no answer at all (its network gone, not refused) fences itself
    within the lease time: its renewals cannot wait past two thirds of a lease, so it stops working
    on its slices before the others may count its Leases expired and take them. Once its network
    is back it takes its share again."""
    others = fleet.live()
    server = urlsplit(yaml.safe_load(fleet.stack.kubeconfig.read_text())["clusters"][0]["cluster"]["server"])
    assert server.hostname and server.port
    link = SilentLink(server.hostname, server.port)
    try:
        cut_off = fleet.start("replica-cut", kubeconfig=through(link, fleet.stack.kubeconfig,
                                                                fleet.stack.workdir / "kubeconfig-cut"))
        mine = held_by(fleet.split(*others, "replica-cut"))["replica-cut"]
        link.cut()
        fenced = eventually(lambda: logged_at(cut_off, FENCED), timeout=LEASE_SECONDS * 3, interval=0.2,
                            what="replica-cut stops its work on its slices")
        # Its metrics are served locally, not through the link.
        eventually(lambda: cut_off.metric("shard_slices_held") == 0, timeout=5, what="replica-cut holds no slice")
        assert cut_off.metric("shard_handovers_total", direction="fenced") == len(mine)
        eventually(lambda: set(held_by(fleet.holders()).get("replica-cut", ())) == set(), timeout=LEASE_SECONDS * 4,
                   interval=0.5, what="the others take replica-cut's slices")
        for index in mine:
            lease = fleet.coordination.read_namespaced_lease(f"{GROUP_NAME}-slice-{index}", "default")
            assert lease.spec.holder_identity in others
            assert lease.spec.acquire_time > fenced, (index, lease.spec.acquire_time, fenced)
        link.heal()
        fleet.split(*others, "replica-cut")
    finally:
        link.heal()
        if "replica-cut" in fleet.replicas:
            fleet.replicas["replica-cut"].stop()
        link.close()
    fleet.split(*others)


def test_a_replica_with_another_slice_count_holds_nothing_until_the_others_are_gone(fleet: Fleet) -> None:
    """A change of TENANCY_SHARD_SLICES rolling through: the newcomer cuts the space differently, so
    while replicas of the old count live it holds no slice (else two replicas would own the same
    tenants); once they have left it takes every slice of its own count and serves the fleet."""
    before = fleet.split(*fleet.live())
    other = SLICES * 2
    newcomer = fleet.start("replica-e", slices=other)
    eventually(lambda: newcomer.metric("shard_slice_count_conflict") == 1, timeout=60,
               what="replica-e reports the conflicting slice count")
    assert newcomer.metric("shard_slices_held") == 0
    assert newcomer.healthy()  # waiting is what it should do: the kubelet must not restart it
    assert fleet.holders() == before  # the replicas of the count in force keep their shares
    # Asked to stop while it waits (no Kopf run is there to take the signal), it leaves at once:
    # exit code 0 and its member Lease gone, not killed with its Lease left to expire.
    assert newcomer.stop(timeout=20) == 0
    assert "replica-e" not in fleet.members()
    newcomer = fleet.start("replica-e", slices=other)
    eventually(lambda: newcomer.metric("shard_slice_count_conflict") == 1, timeout=60,
               what="replica-e, started again, reports the conflicting slice count")
    for identity in [i for i in fleet.live() if i != "replica-e"]:
        fleet.replicas[identity].stop()
    eventually(lambda: set(fleet.holders(other).values()) == {"replica-e"} and len(fleet.holders(other)) == other,
               timeout=LEASE_SECONDS * 4, interval=0.5, what="replica-e holds every slice of its count")
    assert newcomer.metric("shard_slice_count_conflict") == 0
    namespace = fleet.namespace("recut")
    fleet.cluster.create("tenants", namespace, tenant("recut"))
    fleet.cluster.wait_condition("tenants", namespace, "recut", timeout=90)
    fleet.assert_provisioned_by(namespace, "recut", "replica-e")
