"""Sharded replicas: each live replica holds its share of the fleet's slices through Leases.

Every replica renews a member Lease (``<group>-member-<identity>``); the live members share the
slices evenly, each keeping what it holds where it can (shards.assign), so a replica that dies
costs the others no slice of their own and one that joins takes its share without moving anything
between the rest. A slice is held through its own Lease
(``<group>-slice-<i>``, holderIdentity = the replica): taken only when free, released by its holder
or expired, and renewed while held. Expiry is judged as client-go's leader election does, by how
long this replica has seen the Lease unchanged, never by comparing clocks.

``serve`` runs the operator's work (Kopf, in runtime.py) over the held slices and stops it whenever
they must change: a member joined or left, a held Lease was lost, or renewals failed for longer
than a lease (the replica fences itself: another may take its slices then). Slices are released
only after the work stopped, and taken before it starts, so two replicas never work on one slice
at once while their Leases are honoured; the per-tenant lock in PostgreSQL covers the rest. While
the work runs, the Leases are renewed from a thread with an event loop and API client of its own
(LeaseKeeper), so a burst of work on the operator's loop does not delay them.

With one slice this is active/standby: the replica holding it works on the whole fleet, as an
unsharded replica does, and the others wait to take it over. That needs no shard selector, so it
runs on any API server, with the same fence and hand-over.

Each member Lease carries the replica's slice count (annotation ``tenancy.dev/shard-slices``).
Only the count of the oldest live member is in force (shards.sharing): a replica configured with
another count holds nothing until those replicas are gone, so a change of the count rolls through
without two replicas owning the same object.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any, TypeVar

from tenancy_operator.k8s.client import ApiError, Kube
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.shards import SPACE, Member, Ownership, Slices, assign, describe, selector, sharing

log = get_logger(__name__)
GROUP_LABEL = "tenancy.dev/shard-group"
ROLE_LABEL = "tenancy.dev/shard-lease"
SLICES_ANNOTATION = "tenancy.dev/shard-slices"
T = TypeVar("T")
MANAGED = {"app.kubernetes.io/managed-by": "tenancy-operator"}
EXPIRY_MARGIN_SECONDS = 0.1
"""How long after a Lease's expiry is due the replica looks at it (expiry is strictly later)."""
STEP_MIN_SECONDS = 0.05
"""The least time a step of the renewal loop gets, past the fence included (it then fences)."""
LOOK_SECONDS = 1.0
"""How often a working replica reads the peers' Leases between its renewals: a Lease counts as
renewed when a change to it is seen, so a replica that died is noticed at most this long after its
Lease ran out (two small LISTs a second, from the renewal thread)."""


def next_wake(now: float, renewal: float, expiry: float | None) -> float:
    """Seconds until the renewal loop's next step: the next renewal, the next look at the peers'
    Leases, or just after the first Lease seen live would expire, whichever comes first."""
    wake = min(renewal, now + LOOK_SECONDS)
    if expiry is not None:
        wake = min(wake, expiry + EXPIRY_MARGIN_SECONDS)
    return max(0.0, wake - now)


def slice_count_of(lease: dict[str, Any]) -> int | None:
    raw = ((lease.get("metadata") or {}).get("annotations") or {}).get(SLICES_ANNOTATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


async def every(*aws: Awaitable[T]) -> list[T]:
    """Await them all at once; if any failed, raise its error once all have ended."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]


def slice_index(group: str, name: str) -> int | None:
    """The slice a Lease named ``<group>-slice-<i>`` stands for."""
    prefix = f"{group}-slice-"
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


class ShardingUnsupported(RuntimeError):
    """The API server ignores shardSelector: every replica would see, and work on, everything."""


def lease_safe(identity: str) -> str:
    """An identity as part of a Lease name (DNS subdomain characters, bounded length)."""
    name = re.sub(r"[^a-z0-9.-]+", "-", identity.lower()).strip("-.")
    return name[:200] or "replica"


def micro_time(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Observed:
    """Per Lease, the resourceVersion last seen and when (monotonic) it was first seen: a Lease
    unchanged for its duration is expired, whatever its renewTime says."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}
        self._due: dict[str, float] = {}
        """Lease name -> when it is expired unless it changes first."""

    def expired(self, lease: dict[str, Any], now: float) -> bool:
        meta, spec = lease["metadata"], lease.get("spec") or {}
        version = str(meta.get("resourceVersion"))
        seen = self._seen.get(meta["name"])
        if seen is None or seen[0] != version:
            self._seen[meta["name"]] = seen = (version, now)
        duration = float(spec.get("leaseDurationSeconds") or 15)
        self._due[meta["name"]] = seen[1] + duration
        return now - seen[1] > duration

    def next_expiry(self, now: float) -> float | None:
        """When the first Lease judged live so far expires if it is not renewed before: a replica
        that died is noticed then, not at the first renewal of ours after it."""
        return min((due for due in self._due.values() if due >= now), default=None)


Work = Callable[[Ownership, asyncio.Event], Awaitable[None]]
"""The operator's work over the held slices, until the event is set."""


class LeaseKeeper:
    """Runs one coroutine in a thread of its own, on its own event loop, until stopped.

    While Kopf works, the operator's event loop can be busy for many seconds at a time (a restart
    or a hand-over resumes thousands of objects at once). Renewals queued behind that work would
    come later than a lease time: the peers would count this replica dead and take its slices
    while it still works on them. On a loop of their own they are due to nothing but the GIL,
    which the busy thread hands over every few milliseconds."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._run = run
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._thread = threading.Thread(target=self._main, name="shard-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run()

        try:
            asyncio.run(main())
        finally:
            self._ready.set()

    async def stop(self) -> None:
        """Cancel the coroutine and wait for the thread to end (from the operator's loop)."""
        await asyncio.to_thread(self._ready.wait)
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(self._thread.join)


class ShardCoordinator:
    def __init__(self, kube: Kube, namespace: str, group: str, identity: str, slices: Slices,
                 lease_seconds: int = 15, *, connect: Callable[[], Awaitable[Kube]]) -> None:
        self.kube, self.namespace, self.group, self.identity = kube, namespace, group, identity
        self._connect = connect
        """Makes the API client of the renewal thread (LeaseKeeper) while Kopf works."""
        self.slices, self.lease_seconds = slices, lease_seconds
        self.renew_seconds = max(1.0, lease_seconds / 3)
        self.settle_seconds = min(2.0, self.renew_seconds)
        self._members: frozenset[str] = frozenset()
        self._settled = False
        self.terminating = asyncio.Event()
        """Set by SIGTERM or SIGINT (take_signals): the replica leaves."""
        self._stop: asyncio.Event | None = None
        self.held: dict[int, dict[str, Any]] = {}
        """Slice -> its Lease as last written by us."""
        self.desired: frozenset[int] = frozenset()
        self._observed = Observed()
        self._member: dict[str, Any] | None = None
        self._last_renewed = time.monotonic()
        self._count_in_force: int | None = slices.count

    # --- names and bodies ----------------------------------------------------------------------

    @property
    def member_name(self) -> str:
        return f"{self.group}-member-{lease_safe(self.identity)}"[:253]

    def slice_name(self, index: int) -> str:
        return f"{self.group}-slice-{index}"

    def _lease(self, name: str, role: str, transitions: int = 0) -> dict[str, Any]:
        now = micro_time()
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": self.namespace,
                         "labels": {**MANAGED, GROUP_LABEL: self.group, ROLE_LABEL: role},
                         "annotations": {SLICES_ANNOTATION: str(self.slices.count)}},
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                     "acquireTime": now, "renewTime": now, "leaseTransitions": transitions},
        }

    # --- the server ----------------------------------------------------------------------------

    async def check_server(self) -> None:
        """Refuse to run sharded on a server that would ignore the selector. One slice selects
        nothing: its holder works on everything."""
        if self.slices.count == 1:
            return
        if not await self.kube.shard_selector_applied(self.namespace, selector(0, SPACE)):
            raise ShardingUnsupported(
                "the API server ignores shardSelector (Kubernetes older than 1.36, or its feature gate "
                "ShardedListAndWatch is off): sharded replicas would each reconcile every object. "
                "Enable the gate, or set TENANCY_SHARD_SLICES=1 (one replica works, the others "
                "stand by), or run one replica.")

    def ownership(self, held: frozenset[int]) -> Ownership:
        """What the work over ``held`` may reconcile. The one slice of active/standby is
        everything, as unsharded: no selector (which a server without the feature would
        ignore anyway) and no Quota labels (every Quota is the holder's)."""
        return Ownership(self.slices, held) if self.slices.count > 1 else Ownership()

    # --- membership ----------------------------------------------------------------------------

    async def _renew_member(self, kube: Kube) -> None:
        if self._member is None:
            existing = await kube.get_lease(self.namespace, self.member_name)
            if existing is not None and slice_count_of(existing) != self.slices.count:
                # Left by this identity under another slice count: a Lease of our own, created now,
                # so that the replicas still cutting the space the old way keep precedence.
                await kube.delete_lease(self.namespace, self.member_name, existing["metadata"]["uid"])
                existing = None
            if existing is None:
                self._member = await kube.create_lease(self.namespace, self._lease(self.member_name, "member"))
                return
            self._member = existing
        body = dict(self._member)
        body["spec"] = {**(body.get("spec") or {}), "holderIdentity": self.identity,
                        "leaseDurationSeconds": self.lease_seconds, "renewTime": micro_time()}
        try:
            self._member = await kube.replace_lease(self.namespace, self.member_name, body)
        except ApiError as exc:
            if exc.status in (404, 409):
                self._member = None  # read again next time
            raise

    async def live_members(self, kube: Kube) -> list[Member]:
        leases = await kube.list_leases(
            self.namespace, f"{GROUP_LABEL}={self.group},{ROLE_LABEL}=member")
        now = time.monotonic()
        since = ((self._member or {}).get("metadata") or {}).get("creationTimestamp") or ""
        live = [Member(self.identity, self.slices.count, str(since))]
        for lease in leases:
            holder = (lease.get("spec") or {}).get("holderIdentity")
            if holder and holder != self.identity and not self._observed.expired(lease, now):
                live.append(Member(str(holder), slice_count_of(lease), str(lease["metadata"].get("creationTimestamp"))))
        return live

    async def holders(self, kube: Kube) -> dict[int, str]:
        """Slice -> the replica holding it: ours as we hold them, the others' from their Leases
        (while not expired)."""
        leases = await kube.list_leases(
            self.namespace, f"{GROUP_LABEL}={self.group},{ROLE_LABEL}=slice")
        now = time.monotonic()
        out: dict[int, str] = {}
        for lease in leases:
            holder = (lease.get("spec") or {}).get("holderIdentity")
            index = slice_index(self.group, lease["metadata"]["name"])
            if holder and holder != self.identity and index is not None and not self._observed.expired(lease, now):
                out[index] = str(holder)
        out.update(dict.fromkeys(self.held, self.identity))
        return out

    def _share(self, members: list[Member], holders: dict[int, str]) -> frozenset[int]:
        """This replica's slices: none while another slice count is in force (logged, metric)."""
        count, peers = sharing(members)
        if count != self._count_in_force:
            if count == self.slices.count:
                log.info("replicas agree on the slice count again", slices=count)
            else:
                log.error("another slice count is in force: holding no slices until every replica using it "
                          "has left", slices=self.slices.count, in_force=count,
                          replicas=sorted(m.identity for m in members if m.slice_count == count))
            self._count_in_force = count
        metrics.SHARD_SLICE_COUNT_CONFLICT.set(0 if count == self.slices.count else 1)
        if count != self.slices.count:
            return frozenset()
        return assign(peers, self.slices.count, holders).get(self.identity, frozenset())

    # --- slices --------------------------------------------------------------------------------

    async def _take(self, index: int) -> bool:
        """Take one slice if it is free, expired, or already ours; False if another holds it."""
        name = self.slice_name(index)
        lease = await self.kube.get_lease(self.namespace, name)
        try:
            if lease is None:
                self.held[index] = await self.kube.create_lease(self.namespace, self._lease(name, "slice"))
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity and not self._observed.expired(lease, time.monotonic()):
                return False
            body = self._lease(name, "slice", int(spec.get("leaseTransitions") or 0) + (holder != self.identity))
            body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
            self.held[index] = await self.kube.replace_lease(self.namespace, name, body)
        except ApiError as exc:
            if exc.status == 409:  # another replica wrote it first
                return False
            raise
        if holder and holder != self.identity:
            log.info("slice taken over", slice=index, previous=holder)
        return True

    async def _renew_slices(self, kube: Kube) -> set[int]:
        """Renew every held slice, all at once; returns the ones lost (someone else wrote their Lease)."""

        async def renew(index: int, lease: dict[str, Any]) -> int | None:
            body = dict(lease)
            body["spec"] = {**(lease.get("spec") or {}), "renewTime": micro_time()}
            try:
                self.held[index] = await kube.replace_lease(self.namespace, self.slice_name(index), body)
            except ApiError as exc:
                if exc.status not in (404, 409):
                    raise
                self.held.pop(index, None)
                return index
            return None

        results = await every(*(renew(i, lease) for i, lease in list(self.held.items())))
        return {r for r in results if r is not None}

    async def _release(self, indices: set[int]) -> None:
        for index in sorted(indices):
            lease = self.held.pop(index, None)
            if lease is None:
                continue
            with contextlib.suppress(ApiError):  # the API server: the Lease then expires by itself
                await self._release_one(index, lease)
        if indices:
            metrics.SHARD_HANDOVERS.labels(direction="released").inc(len(indices))
            log.info("slices released", slices=describe(self.slices, indices))

    async def _release_one(self, index: int, lease: dict[str, Any]) -> None:
        name = self.slice_name(index)
        for _ in range(2):
            body = dict(lease)
            body["spec"] = {k: v for k, v in (lease.get("spec") or {}).items()
                            if k not in ("holderIdentity", "renewTime", "acquireTime")}
            try:
                await self.kube.replace_lease(self.namespace, name, body)
                return
            except ApiError as exc:
                if exc.status != 409:
                    raise
            # Our copy is older than the Lease. A renewal cancelled once sent (the end of the work
            # stops the renewal thread) can have written it without our reading the answer: while
            # it is still ours, release it as it is now; taken meanwhile, it is not ours to release.
            current = await self.kube.get_lease(self.namespace, name)
            if current is None or (current.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease = current

    def _publish(self) -> None:
        metrics.SHARD_SLICES_HELD.set(len(self.held))
        for index in range(self.slices.count):
            if index in self.held:
                metrics.SHARD_SLICE_HELD.labels(slice=str(index)).set(1)
            else:
                with contextlib.suppress(KeyError):
                    metrics.SHARD_SLICE_HELD.remove(str(index))

    # --- the loop ------------------------------------------------------------------------------

    async def _tick(self, kube: Kube, *, renew: bool = True) -> tuple[frozenset[int], set[int]]:
        """Renew (unless only looking); returns the desired slices and the held ones just lost. The
        requests of a step go out together: under a loaded API server one after the other could
        take longer than a lease."""
        lost: set[int] = set()
        if renew:
            member: Awaitable[set[int] | None] = self._renew_member(kube)
            lost = (await every(member, self._renew_slices(kube)))[1] or set()
            self._last_renewed = time.monotonic()
        members, holders = await asyncio.gather(self.live_members(kube), self.holders(kube))
        self._members = frozenset(m.identity for m in members)
        return self._share(members, holders), lost

    async def _acquire(self) -> None:
        """Until this replica holds exactly its share (and the share stays the same meanwhile).

        A replica just started first waits until it sees the same members twice ``settle_seconds``
        apart: replicas started together (a new Deployment, a restart of all) then split the fleet
        once, instead of the first taking everything and giving most of it back a moment later.
        While a slice of its share is still held by a replica that died, it looks again every
        second rather than every renewal, to take it as soon as its Lease has expired."""
        seen = None
        while not self.terminating.is_set():
            wait = self.renew_seconds
            try:
                desired, _ = await self._tick(self.kube)
                if not self._settled and self._members != seen:
                    seen = self._members
                    await self._pause(self.settle_seconds)
                    continue
                self._settled = True
                if desired != self.desired:
                    log.info("share of the fleet", slices=describe(self.slices, desired))
                self.desired = desired
                await self._release(set(self.held) - desired)
                gained = [i for i in sorted(desired - set(self.held)) if await self._take(i)]
                if gained:
                    metrics.SHARD_HANDOVERS.labels(direction="taken").inc(len(gained))
                self._publish()
                if desired and set(self.held) == desired:
                    return
                if desired - set(self.held):
                    wait = min(wait, 1.0)
            except Exception as exc:  # the API server, or the way to it: tried again after the pause
                log.warning("slice leases not renewed", error=getattr(exc, "status", None) or type(exc).__name__)
            await self._pause(wait)

    async def _watch(self, running: frozenset[int], stop: Callable[[], None], stopped: Callable[[], bool],
                     kube: Kube) -> None:
        """While the work runs, and until it has ended (cancelled then): renew every renew_seconds
        from the start of one renewal to the next, look at the peers' Leases in between, and stop
        the work when its slices must change. Renewals go on while Kopf shuts down, since its
        handlers may still be at work. ``stop`` and ``stopped`` set and read the work's stop flag
        (which may live on another loop)."""
        renewal = time.monotonic()
        while True:
            renew = time.monotonic() >= renewal
            if renew:
                renewal = time.monotonic() + self.renew_seconds
            try:
                # A step that gets no answer (the API server, or the way to it, gone silent) must
                # not outlast the fence: after it, the others may take the slices.
                desired, lost = await asyncio.wait_for(self._tick(kube, renew=renew), self._step_budget())
            except Exception as exc:  # the API server, or the way to it: not renewed (or looked) this time
                error = getattr(exc, "status", None) or type(exc).__name__
                (log.warning if renew else log.debug)(
                    "slice leases not renewed" if renew else "peer leases not read", error=error)
                if self.held and time.monotonic() >= self._fence_at():
                    log.error("slice leases could not be renewed for most of a lease: stopping work on them",
                              slices=describe(self.slices, running))
                    metrics.SHARD_HANDOVERS.labels(direction="fenced").inc(len(self.held))
                    self.held.clear()  # another replica may take them once they expire
                    self._publish()
                    stop()
            else:
                if lost:
                    log.error("slices lost to another replica", slices=describe(self.slices, lost))
                if not stopped() and (lost or desired != running):
                    log.info("share of the fleet changes", held=describe(self.slices, running),
                             wanted=describe(self.slices, desired))
                    stop()
            now = time.monotonic()
            await asyncio.sleep(next_wake(now, renewal, self._observed.next_expiry(now)))

    def _fence_at(self) -> float:
        """When, without a renewal, this replica stops its work: two thirds of a lease after the
        last renewal, a third of a lease before the others may count its Leases expired."""
        return self._last_renewed + self.lease_seconds * 2 / 3

    def _step_budget(self) -> float:
        """How long one step of the renewal loop may wait for the API server: a renewal period,
        and never past the fence while slices are held."""
        budget = self.renew_seconds
        if self.held:
            budget = min(budget, self._fence_at() - time.monotonic())
        return max(budget, STEP_MIN_SECONDS)

    def renewing(self) -> bool:
        """Whether the Leases were renewed within a lease time (liveness while no work runs)."""
        return time.monotonic() - self._last_renewed <= self.lease_seconds

    def state(self) -> dict[str, Any]:
        return {"identity": self.identity, "slices": self.slices.count, "held": describe(self.slices, self.held),
                "wanted": describe(self.slices, self.desired), "countInForce": self._count_in_force}

    def take_signals(self) -> None:
        """Make SIGTERM and SIGINT end the work and this replica's membership, whenever they come.

        Kopf installs handlers of its own at the start of each run, and they outlive the run: a
        signal between two runs (while the share changes) would go to a finished run and be lost,
        and the replica would keep its Leases until killed. So this is called at the start, by
        each run once Kopf has started (runtime.py), and after each run."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self._terminate)

    def _terminate(self) -> None:
        log.info("signal received: leaving", slices=describe(self.slices, self.held))
        self.terminating.set()
        if self._stop is not None:
            self._stop.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless a signal comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.terminating.wait(), seconds)

    async def serve(self, work: Work,
                    between: Callable[[], AbstractAsyncContextManager[None]] | None = None) -> None:
        """Hold this replica's share and run ``work`` over it, again after every change, until a
        signal or cancellation; then release everything so the others take over at once.
        ``between`` wraps each wait for the share (the health endpoint while no work runs)."""
        await self.check_server()
        log.info("sharded replica", identity=self.identity, slices=self.slices.count, lease=self.member_name)
        self.take_signals()
        try:
            while True:
                async with (between or nullcontext)():
                    await self._acquire()
                if self.terminating.is_set():
                    return
                running = frozenset(self.held)
                stop = self._stop = asyncio.Event()
                keeper = self._keeper(running, stop)
                log.info("working on slices", slices=describe(self.slices, running))
                try:
                    await work(self.ownership(running), stop)
                finally:
                    self._stop = None
                    self.take_signals()
                    await keeper()
                if self.terminating.is_set() or not stop.is_set():
                    return  # a signal (ours, or Kopf's before the run took them over): leave
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._leave())

    def _keeper(self, running: frozenset[int], stop: asyncio.Event) -> Callable[[], Awaitable[None]]:
        """Start renewing while the work runs, in a LeaseKeeper thread with a client of its own
        (``connect``). Returns what ends it (after the work)."""
        loop, connect = asyncio.get_running_loop(), self._connect

        def stop_soon() -> None:
            with contextlib.suppress(RuntimeError):  # the operator's loop has ended
                loop.call_soon_threadsafe(stop.set)

        async def renew() -> None:
            kube = await connect()
            try:
                await self._watch(running, stop_soon, stop.is_set, kube)
            except Exception:  # renewals ended: the work must not go on without them
                log.exception("slice lease renewals failed: stopping work on the slices")
                stop_soon()
            finally:
                await kube.close()

        keeper = LeaseKeeper(renew)
        keeper.start()
        return keeper.stop

    async def _leave(self) -> None:
        await self._release(set(self.held))
        self._publish()
        if self._member is not None:
            await self.kube.delete_lease(self.namespace, self.member_name, self._member["metadata"]["uid"])
