"""A cache of one kind's objects fed by its watch events, like an informer's store.

A service that needs other objects than the one an event is about (a Tenant's Quotas, a Quota's
Tenant) reads them here instead of sending a LIST or GET for each event: in a mass creation that
would be O(N^2) API traffic and JSON parsing. What it adds to a plain dict:

- the newer-version guard: an object is never replaced by an older version of itself (the answer
  to our own status patch is stored at once, and its watch event, or an older one still in
  flight, must not take the cache back: an evaluation from a stale status would write it again),
  nor brought back by a version older than its removal (our patch's answer arriving after the
  DELETED event of a deletion, or of its leaving a selector's watch, that came after the patch);
- ``admit``: which objects the watch brings (e.g. those a label selector selects): a stored
  answer to our own write that the watch would not bring removes the object instead;
- ``slim``: what the cache keeps of each object (the fields its readers use, not managedFields),
  as a ``compact`` copy;
- one optional index (``index(body)`` names the group an object belongs to, e.g. the tenant a
  Quota names), kept with every store and removal;
- ``listed``: whether a watch event or a LIST has filled it yet (before that, readers LIST).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable, Hashable, Mapping
from typing import Any

from tenancy_operator.k8s.client import Page, older_version

Key = tuple[str, str]
"""(namespace, name)"""

SHARED_STRING_LENGTH = 64
REMOVALS_KEPT = 10_000
"""Removals remembered between LISTs: a stale answer comes within seconds of its removal."""


def compact(value: Any) -> Any:
    """A deep copy of JSON data that shares what repeats between objects: every key and every
    string up to SHARED_STRING_LENGTH characters is interned.

    Each watch event is parsed on its own, so every cached object had its own copy of each key
    ("type", "status", "lastTransitionTime", ...) and of values such as "True" or a reason: about
    half of a cached Tenant's size. The copy also lets the parsed event go as a whole."""
    if isinstance(value, dict):
        return {sys.intern(k) if type(k) is str else k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    if type(value) is str and len(value) <= SHARED_STRING_LENGTH:
        return sys.intern(value)
    return value


class WatchCache:
    def __init__(self, slim: Callable[[Mapping[str, Any]], dict[str, Any]],
                 index: Callable[[Mapping[str, Any]], Hashable | None] | None = None,
                 admit: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        self._slim = slim
        self._index_of = index
        self._admit = admit
        self._objects: dict[Key, dict[str, Any]] = {}
        self._removed: OrderedDict[Key, tuple[str, str]] = OrderedDict()
        """The uid and resourceVersion of each object at its removal, until a LIST newer than it
        (or more than REMOVALS_KEPT removals later): a version of it up to that one is stale."""
        self._groups: dict[Hashable, dict[Key, dict[str, Any]]] = {}
        self._group_of: dict[Key, Hashable] = {}
        self.listed = False
        """A watch event (Kopf's initial listing included) or a LIST has filled the cache."""

    def observe(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A watch event (type None: Kopf's initial listing)."""
        self.listed = True
        if type_ == "DELETED":
            self.remove(_key(body), body)
        else:
            self.store(body)

    def store(self, body: Mapping[str, Any]) -> None:
        """Keep ``body`` unless the cache holds a newer version of the object already, or removed
        a newer one; a version the watch would not bring removes the object."""
        key = _key(body)
        meta = body["metadata"]
        cached = self._objects.get(key)
        if cached is not None and older_version(meta, cached["metadata"]):
            return
        removed = self._removed.get(key)
        if cached is None and removed is not None and removed[0] == meta.get("uid") and not _newer(body, removed[1]):
            return
        if self._admit is not None and not self._admit(body):
            self.remove(key, body)
            return
        self._removed.pop(key, None)
        stored = self._objects[key] = compact(self._slim(body))
        self._reindex(key, stored)

    def remove(self, key: Key, body: Mapping[str, Any] | None = None) -> None:
        """Forget the object; ``body``: as it was removed (a DELETED event's), so that no older
        version of it is stored again."""
        self._objects.pop(key, None)
        self._reindex(key, None)
        if body is not None:
            meta = body["metadata"]
            self._removed[key] = (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))
            self._removed.move_to_end(key)
            while len(self._removed) > REMOVALS_KEPT:
                self._removed.popitem(last=False)

    async def relist(self, pages: AsyncIterable[Page], keep: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        """A paged LIST's answer (Kube.list_pages), stored a page at a time, so only one page of
        whole objects is held at once; objects ``keep`` refuses are left out. What the listing
        does not hold is gone (a deletion the watch may have missed), unless the cache holds a
        version newer than the listing: created while the pages were read, its event came first."""
        listed: set[Key] = set()
        version = ""
        async for page in pages:
            version = page.resource_version
            for body in page.items:
                if keep is None or keep(body):
                    listed.add(_key(body))
                    self.store(body)
        for key in [k for k in self._objects if k not in listed and not _newer(self._objects[k], version)]:
            self.remove(key)
        for key in [k for k, (_, removed) in self._removed.items() if not _later(removed, version)]:
            del self._removed[key]  # the listing is later: it holds the object or not, as it is now
        self.listed = True

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._objects.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def values(self) -> list[dict[str, Any]]:
        return list(self._objects.values())

    def group(self, value: Hashable) -> list[dict[str, Any]]:
        """The objects whose ``index`` is ``value``."""
        return list(self._groups.get(value, {}).values())

    def _reindex(self, key: Key, body: dict[str, Any] | None) -> None:
        if self._index_of is None:
            return
        old = self._group_of.pop(key, None)
        if old is not None:
            members = self._groups.get(old, {})
            members.pop(key, None)
            if not members:
                self._groups.pop(old, None)
        value = self._index_of(body) if body is not None else None
        if body is not None and value is not None:
            self._group_of[key] = value
            self._groups.setdefault(value, {})[key] = body


def _newer(body: Mapping[str, Any], version: str) -> bool:
    """The object's version is later than a listing's or a removal's."""
    return _later(str(body["metadata"].get("resourceVersion") or ""), version)


def _later(version: str, than: str) -> bool:
    """Both are etcd revisions (integers that grow; see older_version) and ``version`` is later."""
    return version.isdigit() and than.isdigit() and int(version) > int(than)


def _key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (meta["namespace"], meta["name"])
