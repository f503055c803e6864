"""The benchmarks' side of the Kubernetes API: applying many objects at once and watching them.

The watcher records, per object, when the API server showed each stage (created, operator
finalizer, first status, Ready for the current generation), so latencies are measured from what a
user sees, and the stages give a wall-clock breakdown of where each object waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from bench.common import GROUP, VERSION, is_ready, log

FINALIZER = "tenancy.dev/finalizer"
T = TypeVar("T")


@dataclass
class Track:
    sent: float = 0.0  # create request sent
    created: float = 0.0  # create answered
    finalizer: float = 0.0  # first seen with the operator's finalizer
    first_status: float = 0.0  # first seen with a status the operator wrote
    ready: float = 0.0  # first seen Ready for its current generation
    modified: int = 0  # MODIFIED events seen
    generation: int = 0
    uid: str = ""
    marks: dict[str, float] = field(default_factory=dict)  # extra, per scenario (e.g. schemaVersion reached)


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.requests: dict[str, int] = {}  # our own API requests, by "VERB resource"

    @classmethod
    async def connect(cls, kubeconfig: Path, pool: int = 64) -> Kube:
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        cfg.connection_pool_maxsize = pool
        return cls(client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self.api.close()

    def count(self, verb: str, resource: str) -> None:
        key = f"{verb} {resource}"
        self.requests[key] = self.requests.get(key, 0) + 1

    async def ensure_namespace(self, name: str) -> None:
        try:
            await self.create("", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise

    async def delete_namespace(self, name: str, within: float = 600.0) -> None:
        with contextlib.suppress(ApiException):
            await self.core.delete_namespace(name)
        deadline = time.monotonic() + within
        while True:
            try:
                await self.core.read_namespace(name)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"namespace {name} not gone within {within}s")
            await asyncio.sleep(1)  # polling with a deadline

    async def create(self, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        return await retrying(self._create, namespace, obj)

    async def _create(self, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        kind = obj["kind"]
        if kind == "ConfigMap":
            self.count("POST", "configmaps")
            r = await self.core.create_namespaced_config_map(namespace, obj)
            return self.api.sanitize_for_serialization(r)  # type: ignore[no-any-return]
        if kind == "Namespace":
            self.count("POST", "namespaces")
            r = await self.core.create_namespace(obj)
            return self.api.sanitize_for_serialization(r)  # type: ignore[no-any-return]
        if kind == "Secret":
            self.count("POST", "secrets")
            r = await self.core.create_namespaced_secret(namespace, obj)
            return self.api.sanitize_for_serialization(r)  # type: ignore[no-any-return]
        plural = plural_of(kind)
        self.count("POST", plural)
        return await self.custom.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, namespace, plural, obj)

    async def patch_status(self, namespace: str, plural: str, name: str, status: dict[str, Any]) -> None:
        self.count("PATCH", f"{plural}/status")
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status},
            _content_type="application/merge-patch+json")

    async def patch(self, namespace: str, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.count("PATCH", plural)
        return await self.custom.patch_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, namespace, plural, name, patch, _content_type="application/merge-patch+json")

    async def replace_configmap(self, namespace: str, obj: dict[str, Any]) -> None:
        self.count("PUT", "configmaps")
        await self.core.replace_namespaced_config_map(obj["metadata"]["name"], namespace, obj)

    async def delete(self, namespace: str, plural: str, name: str) -> None:
        self.count("DELETE", plural)
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def list(self, namespace: str, plural: str) -> list[dict[str, Any]]:
        r = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        return list(r.get("items", []))


async def retrying(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Call, retrying what an API server answers while it is busy or (re)initialising (429, 5xx)."""
    for attempt in range(10):
        try:
            return await fn(*args)
        except ApiException as exc:
            if exc.status not in (429, 500, 503, 504) or attempt == 9:
                raise
        await asyncio.sleep(0.5 * (attempt + 1))  # the server asked us to come back later
    raise AssertionError("unreachable")


def plural_of(kind: str) -> str:
    return {"Tenant": "tenants", "Quota": "quotas", "FeatureFlag": "featureflags"}[kind]


async def apply_all(
    kube: Kube, namespace: str, objects: Iterable[dict[str, Any]], watcher: Watcher | None, *,
    concurrency: int = 16, on_created: Callable[[dict[str, Any]], None] | None = None,
) -> float:
    """Create ``objects`` in order with ``concurrency`` requests in flight; returns seconds taken."""
    sem = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(obj: dict[str, Any]) -> None:
        async with sem:
            key = (plural_of(obj["kind"]), obj["metadata"]["name"])
            track = watcher.track(key) if watcher else Track()
            track.sent = time.monotonic()
            created = await kube.create(namespace, obj)
            track.created = time.monotonic()
            track.uid = created["metadata"]["uid"]
            track.generation = int(created["metadata"].get("generation") or 1)
            if on_created is not None:
                on_created(created)

    await asyncio.gather(*(one(o) for o in objects))
    return time.monotonic() - started


class Watcher:
    """Watches tenants, quotas and featureflags of one namespace and timestamps each stage."""

    def __init__(
        self, kube: Kube, namespace: str, plurals: tuple[str, ...] = ("tenants", "quotas", "featureflags")
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.plurals = plurals
        self.tracks: dict[tuple[str, str], Track] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        # Ready names per plural, kept per event: counting by a scan of every object after each
        # event would be quadratic, and the benchmark's own CPU shares the machine with what it
        # measures.
        self._ready: dict[str, set[str]] = {p: set() for p in plurals}
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.hooks: list[Callable[[str, dict[str, Any], float], None]] = []

    def track(self, key: tuple[str, str]) -> Track:
        return self.tracks.setdefault(key, Track())

    async def start(self) -> Watcher:
        for plural in self.plurals:
            rv = await self._list(plural)
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch(plural, rv)))
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _list(self, plural: str) -> str:
        r = await retrying(self.kube.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, plural)
        now = time.monotonic()
        for obj in r.get("items", []):
            self._see(plural, "ADDED", obj, now)
        return str(r["metadata"]["resourceVersion"])

    async def _watch(self, plural: str, rv: str) -> None:
        while True:
            w = watch.Watch()
            try:
                async with w.stream(self.kube.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                    plural, resource_version=rv, timeout_seconds=300,
                                    allow_watch_bookmarks=True) as stream:
                    async for ev in stream:
                        obj = ev["object"]
                        if ev["type"] == "ERROR":
                            raise ApiException(status=obj.get("code", 0), reason=obj.get("message"))
                        rv = obj["metadata"]["resourceVersion"]
                        if ev["type"] != "BOOKMARK":
                            self._see(plural, ev["type"], obj, time.monotonic())
            except ApiException as exc:
                if exc.status == 410:
                    rv = await self._list(plural)
                    continue
                log(f"watch {plural} error {exc.status}; restarting")
                await asyncio.sleep(1)
            except (TimeoutError, OSError) as exc:
                log(f"watch {plural} {type(exc).__name__}; restarting")
                await asyncio.sleep(0.5)

    def _see(self, plural: str, type_: str, obj: dict[str, Any], now: float) -> None:
        key = (plural, obj["metadata"]["name"])
        ready = self._ready.setdefault(plural, set())
        if type_ == "DELETED":
            self.objects.pop(key, None)
            ready.discard(key[1])
            self._changed.set()
            return
        self.objects[key] = obj
        (ready.add if is_ready(obj) else ready.discard)(key[1])
        t = self.track(key)
        if type_ == "MODIFIED":
            t.modified += 1
        if not t.finalizer and FINALIZER in (obj["metadata"].get("finalizers") or []):
            t.finalizer = now
        if not t.first_status and (obj.get("status") or {}).get("observedGeneration"):  # not the CRD default
            t.first_status = now
        if is_ready(obj) and not t.ready:
            t.ready = now
        for hook in self.hooks:
            hook(plural, obj, now)
        self._changed.set()

    def count(self, plural: str, pred: Callable[[dict[str, Any]], bool] = is_ready,
              names: set[str] | None = None) -> int:
        if pred is is_ready:
            ready = self._ready.get(plural, set())
            return len(ready) if names is None else len(ready & names)
        return sum(1 for (p, n), o in list(self.objects.items())
                   if p == plural and (names is None or n in names) and pred(o))

    async def wait_for(self, done: Callable[[], bool], within: float, what: str,
                   progress: Callable[[], str] | None = None) -> float:
        """Wait until ``done()``; returns the monotonic time it became true. Logs progress every 10 s."""
        deadline = time.monotonic() + within
        last_log = time.monotonic()
        while not done():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"not within {within:.0f}s: {what}" + (f" ({progress()})" if progress else ""))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
            if progress and time.monotonic() - last_log > 10:
                log(f"  waiting for {what}: {progress()}")
                last_log = time.monotonic()
        return time.monotonic()
