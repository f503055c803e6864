"""Active/standby for our own background loops (drift sweep, quota and flag loops).

Kopf peering pauses Kopf's handlers in a standby replica, but not tasks we start ourselves: without
this gate a standby would still sweep, repair drift and enforce quotas next to the active replica.
The gate reads the same peering object(s) and applies Kopf's rule (pause while a live peer has a
higher or equal priority), so the loops run exactly where Kopf's handlers run.

It also watches this replica's own record there. Kopf's keep-alive ends for good once its writes
have failed through all of Kopf's retries (about a minute of an API server that cannot be
reached); the record then expires, a standby resumes, and Kopf never pauses this replica for it.
So the gate pauses the loops while the record may have expired unseen, and ends the run
(PeeringLost) when it reads the record expired (or removed by a peer) after it had seen it alive,
or when the record's expiry passes while the peering object cannot be read (as a leader whose lease
went unrenewed stops): the replica exits and, restarted, rejoins as a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from tenancy_operator.k8s.client import Kube
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)
KOPF_GROUP, KOPF_VERSION = "kopf.dev", "v1"


class PeeringLost(Exception):
    """This replica's peering record has expired (Kopf's keep-alive stopped): a peer may work now."""


def _peer_deadline(info: Any) -> datetime.datetime | None:
    """When a peer's record expires by Kopf's rule (lastseen + lifetime); None if unreadable."""
    if not isinstance(info, Mapping):
        return None
    try:
        lastseen = datetime.datetime.fromisoformat(str(info["lastseen"]))
        lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
    except (KeyError, ValueError):
        return None
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=datetime.UTC)
    return lastseen + lifetime


def own_deadline(statuses: Iterable[Mapping[str, Any]], identity: str) -> datetime.datetime | None:
    """When this replica's own record expires: the earliest over the peering objects (one per
    watched namespace), None when one of them has no record of it."""
    deadlines = [_peer_deadline((status or {}).get(identity)) for status in statuses]
    if not deadlines or any(d is None for d in deadlines):
        return None
    return min(d for d in deadlines if d is not None)


def leads(
    statuses: Iterable[Mapping[str, Any]], identity: str, priority: int, now: datetime.datetime | None = None
) -> bool:
    """Kopf's rule over every peering object's status ({identity: {priority, lifetime, lastseen}}):
    we lead unless another live peer has a priority >= ours."""
    now = now or datetime.datetime.now(datetime.UTC)
    for status in statuses:
        for peer, info in (status or {}).items():
            if peer == identity:
                continue
            deadline = _peer_deadline(info)
            if deadline is not None and deadline > now and int(info.get("priority", 0)) >= priority:
                return False
    return True


class PeeringGate:
    """Polls the peering object(s) Kopf uses: a ClusterKopfPeering when watching all namespaces,
    else a KopfPeering in each watched namespace."""

    def __init__(
        self, kube: Kube, name: str, namespaces: list[str], identity: str, priority: int, interval: float = 5.0,
        lost: asyncio.Event | None = None,
    ) -> None:
        self.kube, self.name, self.namespaces = kube, name, namespaces
        self.identity, self.priority, self.interval = identity, priority, interval
        self.leading = False
        self.lost = lost or asyncio.Event()
        """Set when this replica's record, once seen alive, has expired: the run must end."""
        self.expires: datetime.datetime | None = None
        """This replica's record's expiry as last read alive."""

    async def _statuses(self) -> list[Mapping[str, Any]]:
        # No peering object (None): Kopf does not pause either.
        objs: list[Mapping[str, Any] | None] = []
        if not self.namespaces:
            objs.append(await self.kube.get_cluster_object(KOPF_GROUP, KOPF_VERSION, "clusterkopfpeerings", self.name))
        for ns in self.namespaces:
            objs.append(await self.kube.get_object("kopfpeerings", ns, self.name,
                                                   group=KOPF_GROUP, version=KOPF_VERSION))
        return [o.get("status") or {} for o in objs if o is not None]

    async def check(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            # A read that gets no answer must not outlast the fence either.
            statuses = await asyncio.wait_for(self._statuses(), self._next_check())
        except Exception as exc:  # keep the last known state through API hiccups, up to the fence
            log.warning("peering check failed", error=type(exc).__name__)
            now = datetime.datetime.now(datetime.UTC)
            fence = self._fence()
            if self.expires is not None and now >= self.expires:
                # As a leader whose lease went unrenewed: the peers count this replica gone now.
                return self._lose("the peering record of this replica has expired unrenewed while the "
                                  "API server could not be read")
            if self.leading and fence is not None and now >= fence:
                log.warning("background loops paused: the peering record of this replica may have expired "
                            "unseen, and a standby may work now", identity=self.identity)
                self._set(False)
            return self.leading
        own = own_deadline(statuses, self.identity)
        alive = own is not None and own > now
        if alive:
            self.expires = own
        elif self.expires is not None:  # seen alive before: Kopf's keep-alive has stopped renewing it
            return self._lose("the peering record of this replica has expired")
        # Not before Kopf's first keep-alive is on record: the peers do not count this replica yet.
        leading = alive and leads(statuses, self.identity, self.priority, now)
        if leading != self.leading:
            log.info("background loops " + ("resumed: this replica leads" if leading else "paused: a peer leads"),
                     identity=self.identity, priority=self.priority)
        self._set(leading)
        return leading

    def _lose(self, why: str) -> bool:
        """End the run (``lost``): a peer may work now, and Kopf would not pause this replica."""
        log.error(f"{why}: a peer may work now, and Kopf would not pause this replica; stopping it, "
                  "to rejoin as a peer when restarted", identity=self.identity, priority=self.priority)
        self._set(False)
        self.lost.set()
        return False

    def _fence(self) -> datetime.datetime | None:
        """While the peering object cannot be read: when the loops pause, a check interval before
        this replica's record expires (and a standby may resume)."""
        return None if self.expires is None else self.expires - datetime.timedelta(seconds=self.interval)

    def _next_check(self) -> float:
        """Seconds to the next check (and the most a read may take): the interval, or less to
        pause in time at the fence."""
        fence = self._fence()
        if not self.leading or fence is None:
            return self.interval
        until = (fence - datetime.datetime.now(datetime.UTC)).total_seconds()
        return self.interval if until <= 0 else min(self.interval, max(0.1, until))

    def _set(self, leading: bool) -> None:
        self.leading = leading
        metrics.PEERING_LEADING.set(int(leading))

    async def run_while_leading(self, loops: Mapping[str, Callable[[], Coroutine[Any, Any, None]]]) -> None:
        """Run ``loops`` (name -> coroutine function) while we lead; cancel them when a peer leads.
        Returns once the record is lost: the run is ending."""
        tasks: list[asyncio.Task[None]] = []
        try:
            while not self.lost.is_set():
                if await self.check():
                    if not tasks:
                        tasks = [asyncio.create_task(run(), name=name) for name, run in loops.items()]
                elif tasks:
                    await _cancel(tasks)
                    tasks = []
                await asyncio.sleep(self._next_check())
        finally:
            self._set(False)
            await _cancel(tasks)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
