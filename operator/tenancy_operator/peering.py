"""Active/standby for our own background loops (drift sweep, quota and flag loops).

Kopf peering pauses Kopf's handlers in a standby replica, but not tasks we start ourselves: without
this gate a standby would still sweep, repair drift and enforce quotas next to the active replica.
The gate reads the same peering object(s) and applies Kopf's rule (pause while a live peer has a
higher or equal priority), so the loops run exactly where Kopf's handlers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from tenancy_operator.k8s.client import Kube
from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)
KOPF_GROUP, KOPF_VERSION = "kopf.dev", "v1"


def leads(
    statuses: Iterable[Mapping[str, Any]], identity: str, priority: int, now: datetime.datetime | None = None
) -> bool:
    """Kopf's rule over every peering object's status ({identity: {priority, lifetime, lastseen}}):
    we lead unless another live peer has a priority >= ours."""
    now = now or datetime.datetime.now(datetime.UTC)
    for status in statuses:
        for peer, info in (status or {}).items():
            if peer == identity or not isinstance(info, Mapping):
                continue
            try:
                lastseen = datetime.datetime.fromisoformat(str(info["lastseen"]))
                lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
            except (KeyError, ValueError):
                continue
            if lastseen.tzinfo is None:
                lastseen = lastseen.replace(tzinfo=datetime.UTC)
            if lastseen + lifetime > now and int(info.get("priority", 0)) >= priority:
                return False
    return True


class PeeringGate:
    """Polls the peering object(s) Kopf uses: a ClusterKopfPeering when watching all namespaces,
    else a KopfPeering in each watched namespace."""

    def __init__(
        self, kube: Kube, name: str, namespaces: list[str], identity: str, priority: int, interval: float = 5.0
    ) -> None:
        self.kube, self.name, self.namespaces = kube, name, namespaces
        self.identity, self.priority, self.interval = identity, priority, interval
        self.leading = False

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
        try:
            leading = leads(await self._statuses(), self.identity, self.priority)
        except Exception as exc:  # keep the last known state through API hiccups
            log.warning("peering check failed", error=type(exc).__name__)
            return self.leading
        if leading != self.leading:
            log.info("background loops " + ("resumed: this replica leads" if leading else "paused: a peer leads"),
                     identity=self.identity, priority=self.priority)
        self.leading = leading
        return leading

    async def run_while_leading(self, loops: Mapping[str, Callable[[], Coroutine[Any, Any, None]]]) -> None:
        """Run ``loops`` (name -> coroutine function) while we lead; cancel them when a peer leads."""
        tasks: list[asyncio.Task[None]] = []
        try:
            while True:
                if await self.check():
                    if not tasks:
                        tasks = [asyncio.create_task(run(), name=name) for name, run in loops.items()]
                elif tasks:
                    await _cancel(tasks)
                    tasks = []
                await asyncio.sleep(self.interval)
        finally:
            await _cancel(tasks)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
