"""Kubernetes Events for user-relevant transitions, with reasons a person can grep.

Posted with our own client rather than ``kopf.event()``, which only works inside Kopf's handler
context: the drift sweep reports repairs too. Posting never blocks or fails a reconcile. Every
message goes through ``clean_message`` (bounded, no control characters): many carry text a tenant
or namespace user wrote.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client

from tenancy_operator.k8s.client import raw
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.observability.text import clean_message

log = get_logger(__name__)
COMPONENT = "tenancy-operator"


class EventRecorder:
    def __init__(self, api: client.ApiClient | None) -> None:
        self.core: Any = client.CoreV1Api(api) if api is not None else None
        self._tasks: set[asyncio.Task[None]] = set()

    def normal(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        self.post(body, "Normal", reason, message)

    def warning(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        self.post(body, "Warning", reason, message)

    def post(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        if self.core is None:
            return
        task = asyncio.get_running_loop().create_task(self._post(body, type_, reason, clean_message(message)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        assert self.core is not None
        meta = body["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = {
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
            "reportingInstance": COMPONENT,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            await raw(self.core.create_namespaced_event, meta["namespace"], event)
        except Exception as exc:  # an Event is a courtesy: never let it break a reconcile
            log.warning("posting event failed", reason=reason, error=type(exc).__name__)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
