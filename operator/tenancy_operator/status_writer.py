"""The one way the operator writes an object's status.

Every kind writes status the same way: a JSON merge patch of what differs from the status the
object holds (``conditions.status_patch``: a map's dropped entries as null, lists whole), no
request at all when nothing differs. Options cover what some writers need:

- ``if_version``: only if the object is still that resourceVersion. A patch that replaces a list
  (a Tenant's conditions, written by another kind than the Tenant's own reconcile) must not undo
  a newer write; a 409 then means "changed meanwhile", and the writer decides again from the
  newer object.
- the watch caches registered with ``keep_fresh`` store the object as written, so the next
  evaluation compares with it even before its watch event arrives (watch_cache.py keeps a newer
  version from being taken back by an older event).
- ``whole``: the keys that are one decision, sent together when any of them differs
  (``conditions.status_patch``), and ``written``: told the object as written, so the writer's
  own record of that decision knows which snapshots are older than it (reconcilers/records.py).

The first report on an object our finalizer holds (its body shows none yet) is made at the
body's resourceVersion, and after a 409 only if the object read again is still the same uid. The
API server can delete an object while Kopf adds our finalizer (kubernetes/kubernetes#77988), and
the user can create another under its name before the gone one's reconcile reports: written on
the new one, that report would show it Ready (its own create handler would then find it in sync
and never provision it). A status patch cannot carry a uid precondition: the API server keeps the
stored metadata on the status subresource. Once the first report has landed, the finalizer holds
the object until its deletion handler, which waits for the object's lock.

A status write to an object that is gone (404, or another uid now), or changed since
``if_version`` (409), returns False; any other error of the API server is raised (``ApiError``)
for the caller's retry.

``report`` is a reconcile's report on an object whose deletion handler writes its status once
the deletion has begun: the user can delete the object while the reconcile runs, and the watch
may show that after the report is due. So the report is made at the newest version of the object
this process knows, which a deletion begun since refuses (409); read again, the object says
whether it is gone, being deleted (the report is left out), or only changed (made again at the
version read). So a Tenant deleted during a database outage shows its deletion's ``Deleting``,
not its last reconcile's ``Failed``.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from typing import Any

from tenancy_operator.api.names import FINALIZER
from tenancy_operator.conditions import status_patch
from tenancy_operator.k8s.client import ApiError, Kube, older_version
from tenancy_operator.watch_cache import WatchCache

REPORT_ATTEMPTS = 5
"""How many versions of the object a ``report`` is tried at before its 409 goes to the caller's retry."""


class Report(enum.Enum):
    """What became of a ``StatusWriter.report``."""

    WRITTEN = "written"  # or nothing differed
    GONE = "gone"  # deleted, or another object of its name now
    DELETING = "deleting"  # its deletion has begun: left to the deletion's handler


class StatusWriter:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._caches: defaultdict[str, list[WatchCache]] = defaultdict(list)

    def keep_fresh(self, plural: str, cache: WatchCache) -> None:
        """Store every status written to a ``plural`` object that ``cache`` holds."""
        self._caches[plural].append(cache)

    async def write(self, plural: str, body: Mapping[str, Any], desired: Mapping[str, Any], *,
                    if_version: str | None = None, whole: Collection[str] = (),
                    written: Callable[[Mapping[str, Any]], None] | None = None) -> bool:
        """Make the status hold ``desired`` (its keys; others are left as they are)."""
        return await self.patch(plural, body, status_patch(body.get("status"), desired, whole),
                                if_version=if_version, written=written)

    async def report(self, plural: str, body: Mapping[str, Any], desired: Mapping[str, Any], *,
                     whole: Collection[str] = ()) -> Report:
        """``write``, unless the object's deletion has begun (see the module's docstring)."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        patch = status_patch(body.get("status"), desired, whole)
        if not patch:
            return Report.WRITTEN
        known: Mapping[str, Any] = meta
        for cache in self._caches.get(plural, ()):
            seen = cache.get(key)
            if seen is not None and older_version(known, seen["metadata"]):
                known = seen["metadata"]  # our own last write, or an event newer than ``body``
        for _ in range(REPORT_ATTEMPTS):
            if known.get("deletionTimestamp"):
                return Report.DELETING
            try:
                await self._send(plural, key, patch, str(known.get("resourceVersion") or ""))
                return Report.WRITTEN
            except ApiError as exc:
                if exc.status == 404:
                    return Report.GONE
                if exc.status != 409:
                    raise
            current = await self._read_again(plural, key, meta.get("uid"))
            if current is None:
                return Report.GONE
            known = current
        raise ApiError(status=409, reason=f"{plural} {key[0]}/{key[1]} changed at each of {REPORT_ATTEMPTS} "
                                          "attempts to report")

    async def patch(self, plural: str, body: Mapping[str, Any], patch: dict[str, Any], *,
                    if_version: str | None = None,
                    written: Callable[[Mapping[str, Any]], None] | None = None) -> bool:
        """Send ``patch``, a difference already computed (``status_patch``); nothing when empty."""
        if not patch:
            return True
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        # Nothing reported yet: no status, or the CRD's default one (observedGeneration 0).
        reported = (body.get("status") or {}).get("observedGeneration")
        first = not if_version and not reported and FINALIZER in (meta.get("finalizers") or ())
        version = meta.get("resourceVersion") if first else if_version
        while True:
            try:
                await self._send(plural, key, patch, version, written)
                return True
            except ApiError as exc:
                if exc.status == 404 or (exc.status == 409 and if_version):
                    return False
                if not (first and exc.status == 409):
                    raise  # for the caller's retry (a 409 at a version read again too: never taken for gone)
            current = await self._read_again(plural, key, meta.get("uid"))
            if current is None:
                return False  # gone, and maybe created again: not the object this report is about
            first, version = False, current["resourceVersion"]  # changed, still this object

    async def _read_again(self, plural: str, key: tuple[str, str], uid: str | None) -> Mapping[str, Any] | None:
        """The object's metadata as the API server holds it now; None when it is gone, or another
        object of its name."""
        current = await self.kube.get_object(plural, key[0], key[1])
        return current["metadata"] if current is not None and current["metadata"].get("uid") == uid else None

    async def _send(self, plural: str, key: tuple[str, str], patch: dict[str, Any], version: str | None,
                    written: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        """One PATCH (at ``version`` if given); the object as written goes to the kept-fresh caches."""
        caches = [c for c in self._caches.get(plural, ()) if key in c]
        result = await self.kube.patch_status(plural, key[0], key[1], patch, resource_version=version,
                                              decode=bool(caches) or written is not None)
        if result is not None:
            for cache in caches:
                cache.store(result)
            if written is not None:
                written(result)
