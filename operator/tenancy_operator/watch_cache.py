"""A cache of one kind's objects fed by its watch events, like an informer's store.

A service that needs other objects than the one an event is about (a Tenant's Quotas, a Quota's
Tenant) reads them here instead of sending a LIST or GET for each event: in a mass creation that
would be O(N^2) API traffic and JSON parsing. What it adds to a plain dict:

- the newer-version guard: an object is never replaced by an older version of itself (the answer
  to our own status patch is stored at once, and its watch event, or an older one still in
  flight, must not take the cache back: an evaluation from a stale status would write it again);
- ``slim``: what the cache keeps of each object (the fields its readers use, not managedFields),
  as a ``compact`` copy;
- one optional index (``index(body)`` names the group an object belongs to, e.g. the tenant a
  Quota names), kept with every store and removal;
- ``listed``: whether a watch event or a LIST has filled it yet (before that, readers LIST).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from tenancy_operator.k8s.client import older_version

Key = tuple[str, str]
"""(namespace, name)"""

SHARED_STRING_LENGTH = 64


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
                 index: Callable[[Mapping[str, Any]], Hashable | None] | None = None) -> None:
        self._slim = slim
        self._index_of = index
        self._objects: dict[Key, dict[str, Any]] = {}
        self._groups: dict[Hashable, dict[Key, dict[str, Any]]] = {}
        self._group_of: dict[Key, Hashable] = {}
        self.listed = False
        """A watch event (Kopf's initial listing included) or a LIST has filled the cache."""

    def observe(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A watch event (type None: Kopf's initial listing)."""
        self.listed = True
        if type_ == "DELETED":
            self.remove(_key(body))
        else:
            self.store(body)

    def store(self, body: Mapping[str, Any]) -> None:
        """Keep ``body`` unless the cache holds a newer version of the object already."""
        key = _key(body)
        cached = self._objects.get(key)
        if cached is not None and older_version(body["metadata"], cached["metadata"]):
            return
        stored = self._objects[key] = compact(self._slim(body))
        self._reindex(key, stored)

    def remove(self, key: Key) -> None:
        self._objects.pop(key, None)
        self._reindex(key, None)

    def replace_all(self, items: Iterable[Mapping[str, Any]]) -> None:
        """A LIST's answer: what it does not hold is gone (a deletion the watch may have missed)."""
        items = list(items)
        listed = {_key(o) for o in items}
        for key in [k for k in self._objects if k not in listed]:
            self.remove(key)
        for body in items:
            self.store(body)
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


def _key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (meta["namespace"], meta["name"])
