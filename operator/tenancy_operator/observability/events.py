"""Kubernetes Events for user-relevant transitions, with reasons a person can grep.

Posted with our own client rather than ``kopf.event()``, which only works inside Kopf's handler
context: the drift sweep reports repairs too. Posting never blocks or fails a reconcile. Every
message goes through ``clean_message`` (bounded, no control characters): many carry text a tenant
or namespace user wrote.

Repeats are aggregated like client-go's event recorder: the same event (object, type, reason,
message) again within ``AGGREGATE_SECONDS`` of its last occurrence updates the Event already
posted (``count``, ``lastTimestamp``, ``series``) instead of creating another, so a failure that
repeats shows as one line with a count in ``kubectl get events``. ``reportingController`` is the
operator, ``reportingInstance`` the pod (``POD_NAME``, from the Downward API; else the host name).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tenancy_operator.k8s.client import Kube
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.observability.text import clean_message

log = get_logger(__name__)
COMPONENT = "tenancy-operator"
AGGREGATE_SECONDS = 600.0
"""A repeat within this time of the last occurrence counts on the same Event (client-go: 10 minutes)."""
MAX_REMEMBERED = 4096
"""Events remembered for aggregation (client-go's cache size); the least recently seen go first."""
_INSTANCE_LIMIT = 128
"""The API server's limit on reportingInstance."""


def reporting_instance() -> str:
    return (os.environ.get("POD_NAME") or socket.gethostname() or COMPONENT)[:_INSTANCE_LIMIT]


def _timestamp(when: datetime.datetime) -> str:
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _micro_time(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Seen:
    """One posted Event and how often it occurred."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    name: str | None = None
    count: int = 0
    last: float = 0.0
    """time.monotonic() of the last occurrence."""


class EventRecorder:
    def __init__(self, kube: Kube | None, instance: str | None = None) -> None:
        self.kube = kube
        self.instance = instance or reporting_instance()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: OrderedDict[tuple[str, ...], _Seen] = OrderedDict()

    def normal(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        self.post(body, "Normal", reason, message)

    def warning(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        self.post(body, "Warning", reason, message)

    def post(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        if self.kube is None:
            return
        task = asyncio.get_running_loop().create_task(self._post(body, type_, reason, clean_message(message)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _entry(self, key: tuple[str, ...]) -> _Seen:
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = _Seen()
            while len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(key)
        return seen

    async def _post(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        assert self.kube is not None
        meta = body["metadata"]
        namespace = meta["namespace"]
        key = (str(body.get("kind")), namespace, meta["name"], str(meta.get("uid")), type_, reason, message)
        seen = self._entry(key)
        try:
            async with seen.lock:  # one occurrence at a time: the second must find the first's Event
                now = datetime.datetime.now(datetime.UTC)
                if seen.name is not None and time.monotonic() - seen.last < AGGREGATE_SECONDS:
                    count = seen.count + 1
                    patch = {"count": count, "lastTimestamp": _timestamp(now),
                             "series": {"count": count, "lastObservedTime": _micro_time(now)}}
                    if await self.kube.patch_event(namespace, seen.name, patch):
                        seen.count, seen.last = count, time.monotonic()
                        return
                event = self._event(body, type_, reason, message, now)
                seen.name = await self.kube.create_event(namespace, event)
                seen.count, seen.last = 1, time.monotonic()
        except Exception as exc:  # an Event is a courtesy: never let it break a reconcile
            log.warning("posting event failed", reason=reason, error=type(exc).__name__,
                        status=getattr(exc, "status", None))  # the API's answer, e.g. 403 without RBAC

    def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str,
               now: datetime.datetime) -> dict[str, Any]:
        meta = body["metadata"]
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": _timestamp(now),
            "lastTimestamp": _timestamp(now),
            "count": 1,
        }

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
