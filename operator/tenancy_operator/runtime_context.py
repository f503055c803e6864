"""What every handler and the sweep share: settings, database pools, the Kubernetes client, locks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tenancy_operator.archive_store import LocalStore, S3Store, Store, store_for_location
from tenancy_operator.config import Settings
from tenancy_operator.db.control import migrate_control_schema
from tenancy_operator.db.targets import DatabaseTargets
from tenancy_operator.k8s.client import Kube
from tenancy_operator.observability.events import EventRecorder
from tenancy_operator.shards import Ownership
from tenancy_operator.status_writer import StatusWriter
from tenancy_operator.watch_cache import WatchCache

TENANT_METADATA = ("name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp",
                   "deletionTimestamp")
TENANT_STATUS = ("observedGeneration", "conditions", "effectiveLimits", "database", "phase")


def slim_tenant(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the Tenant cache keeps of a Tenant: the fields its readers use (the Tenant service's
    superseded snapshots, a quota evaluation: quota_policy.evaluate, serving_database, Events).
    It holds every Tenant the replica owns, so its size per Tenant counts."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in TENANT_METADATA if k in meta},
        "spec": body.get("spec") or {},
        **({"status": {k: status[k] for k in TENANT_STATUS if k in status}} if "status" in body else {}),
    }


@runtime_checkable
class TenantWatcher(Protocol):
    """A service that follows Tenant watch events (Kopf's initial listing has type None)."""

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Background(Protocol):
    """A service with work of its own beside its handlers (a periodic pass, scheduled re-checks):
    the runtime runs ``run_forever`` as a background task while the replica leads."""

    async def run_forever(self) -> None: ...


class FairSlots:
    """At most ``capacity`` holders at once, shared fairly between keys (namespaces): one key holds
    at most ``per_key`` (all but a quarter, at least one slot is kept for the others), and a freed
    slot goes to the waiting key that holds the fewest, its oldest waiter first. So a namespace whose
    work hangs (a migration that sleeps until its deadline) cannot hold every slot, and a namespace
    that just arrived is served before one that already holds many."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.per_key = capacity - max(1, capacity // 4) if capacity > 1 else 1
        self.held: Counter[str] = Counter()
        self.total = 0
        self._waiters: defaultdict[str, deque[tuple[int, asyncio.Future[None]]]] = defaultdict(deque)
        self._seq = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key].append((next(self._seq), fut))
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(key)  # granted just as it was cancelled
            else:
                fut.cancel()
            raise
        try:
            yield
        finally:
            self._release(key)

    def _release(self, key: str) -> None:
        self.held[key] -= 1
        if self.held[key] <= 0:
            del self.held[key]
        self.total -= 1
        self._grant()

    def _grant(self) -> None:
        while self.total < self.capacity:
            best: tuple[int, int, str] | None = None
            for key, queue in list(self._waiters.items()):
                while queue and queue[0][1].done():
                    queue.popleft()  # cancelled while waiting
                if not queue:
                    del self._waiters[key]
                    continue
                if self.held[key] < self.per_key and (best is None or (self.held[key], queue[0][0]) < best[:2]):
                    best = (self.held[key], queue[0][0], key)
            if best is None:
                return
            _, _, key = best
            _, fut = self._waiters[key].popleft()
            self.held[key] += 1
            self.total += 1
            fut.set_result(None)


class KeyedLocks:
    """One lock per key (an object), so that a handler, the sweep and a fleet migration never act
    on the same object at once. An entry lives while someone holds or waits for its lock, and no
    longer: nobody removes a lock by hand (removing one that has waiters would let a newcomer run
    beside them)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str, str]) -> AsyncIterator[None]:
        lock, users = self._entries.get(key, (asyncio.Lock(), 0))
        self._entries[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._entries[key]
            if users <= 1:
                del self._entries[key]
            else:
                self._entries[key] = (lock, users - 1)

    def held(self, key: tuple[str, str, str]) -> bool:
        """Held or waited for."""
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class Tombstones:
    """UIDs of objects whose deletion this process has seen through (finalizer run or DELETED).

    The sweeps and fleet migrations act on LISTed snapshots, and by the time an object's lock is
    theirs the object may be finalized and gone: reconciling the snapshot then would bring back a
    deleted tenant's role and schema, or a deleted flag's rows. A snapshot is seconds to minutes
    old, so the newest ``limit`` deletions are enough to remember. One set serves every kind
    (uids are unique across kinds).
    """

    def __init__(self, limit: int = 20_000) -> None:
        self._uids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, uid: str | None) -> None:
        if not uid:
            return
        self._uids[uid] = None
        self._uids.move_to_end(uid)
        while len(self._uids) > self._limit:
            self._uids.popitem(last=False)

    def __contains__(self, uid: object) -> bool:
        return uid in self._uids

    def __len__(self) -> int:
        return len(self._uids)


@dataclass
class OperatorContext:
    settings: Settings
    targets: DatabaseTargets
    kube: Kube
    events: EventRecorder
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    # Objects whose deletion this process has seen through, of every kind (see Tombstones).
    gone: Tombstones = field(default_factory=Tombstones)
    # Which objects this replica reconciles (sharded replicas: the slices it holds; else all).
    ownership: Ownership = field(default_factory=Ownership)
    control_ready: set[str] = field(default_factory=set)
    # When the sweep last completed (monotonic); the liveness probe fails if it stops completing.
    last_sweep_ok: float = field(default_factory=time.monotonic)
    # Tenant migrations running at once, process-wide (each holds a tenant login, not a pool
    # slot), shared fairly between namespaces.
    migration_slots: FairSlots = field(init=False)
    # Tenant reconciles and deletions at once, process-wide (Kopf's workers are many more), shared
    # fairly between namespaces.
    reconcile_slots: FairSlots = field(init=False)
    # The one way status is written, every kind's (status_writer.py).
    status: StatusWriter = field(init=False)
    # The Tenants the replica watches, fed by the Tenant watch (handlers/tenant.py) and kept fresh
    # by our own status writes: the one view of them every kind reads (the Tenant service's
    # superseded snapshots, quota evaluations). (FeatureFlags need every Tenant name of a
    # namespace, which a sharded replica's watch does not bring: they keep their own listing.)
    tenants: WatchCache = field(init=False)

    def __post_init__(self) -> None:
        self.status = StatusWriter(self.kube)
        self.tenants = WatchCache(slim_tenant)
        self.status.keep_fresh("tenants", self.tenants)
        self.migration_slots = FairSlots(self.settings.migration_concurrency)
        self.reconcile_slots = FairSlots(self.settings.reconcile_concurrency)

    async def ensure_control_schema(self, target: str) -> None:
        """Migrate a target's control schema once per process, lazily: a target that was down
        at start-up is migrated the first time it is used."""
        if target in self.control_ready:
            return
        async with self.locks.hold(("control", target, "")):
            if target in self.control_ready:
                return
            async with self.targets.pool(target).connection() as conn:
                await migrate_control_schema(conn, self.settings.control_schema)
            self.control_ready.add(target)

    def archive_store(self, target: str) -> Store:
        """Where new archives of ``target``'s tenants go."""
        config = self.settings.store_for(target)
        return S3Store(config) if config is not None else LocalStore(self.settings.archive_dir)

    def store_at(self, location: str, target: str | None) -> Store:
        """The store holding an archive of ``target`` at ``location`` (StoreError if none is
        configured for it)."""
        preferred = self.settings.store_for(target) if target else None
        return store_for_location(location, list(self.settings.stores.values()), preferred)

    def lock(self, kind: str, namespace: str, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The object's lock, for ``async with``."""
        return self.locks.hold((kind, namespace, name))
