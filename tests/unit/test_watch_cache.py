"""WatchCache: the newer-version guard, slimming, the index, and a LIST replacing what it holds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from tenancy_operator.k8s.client import Page
from tenancy_operator.watch_cache import SHARED_STRING_LENGTH, WatchCache, compact


def obj(name: str, rv: int, group: str | None = None, uid: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": str(rv),
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"group": group}, **extra}


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(body)
    out["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return out


def group_of(body: Mapping[str, Any]) -> tuple[str, str] | None:
    group = body["spec"].get("group")
    return (body["metadata"]["namespace"], group) if group else None


def names(bodies: list[dict[str, Any]]) -> list[str]:
    return sorted(b["metadata"]["name"] for b in bodies)


def test_an_older_version_never_replaces_a_newer_one_but_a_new_object_of_the_same_name_does() -> None:
    cache = WatchCache(slim)
    assert not cache.listed
    cache.observe("ADDED", obj("a", 10, status={"phase": "new"}))
    assert cache.listed
    cache.observe("MODIFIED", obj("a", 9, status={"phase": "old"}))  # a late event of an older write
    assert cache.get(("ns", "a"))["status"] == {"phase": "new"}  # type: ignore[index]
    assert "managedFields" not in cache.get(("ns", "a"))["metadata"]  # type: ignore[index]
    cache.observe("ADDED", obj("a", 5, uid="u2", status={"phase": "re-created"}))  # another uid: not older
    assert cache.get(("ns", "a"))["status"] == {"phase": "re-created"}  # type: ignore[index]


def test_the_index_follows_edits_and_deletions() -> None:
    cache = WatchCache(slim, index=group_of)
    cache.observe(None, obj("q1", 1, "t1"))
    cache.observe(None, obj("q2", 2, "t1"))
    cache.observe(None, obj("q3", 3))  # names no group
    assert names(cache.group(("ns", "t1"))) == ["q1", "q2"]
    cache.observe("MODIFIED", obj("q2", 4, "t2"))  # moved to another group
    assert names(cache.group(("ns", "t1"))) == ["q1"]
    assert names(cache.group(("ns", "t2"))) == ["q2"]
    cache.observe("DELETED", obj("q1", 5, "t1"))
    assert cache.group(("ns", "t1")) == [] and ("ns", "q1") not in cache
    assert len(cache) == 2


def test_a_version_older_than_its_removal_does_not_bring_the_object_back() -> None:
    """The answer to our own status patch can arrive after the DELETED event that followed the
    patch (the object deleted, or its label changed out of this replica's watch): the object stays
    out. A newer version of it, or another object of the same name, comes back in."""
    cache = WatchCache(slim, index=group_of)
    cache.observe("ADDED", obj("q", 10, "t1"))
    cache.observe("DELETED", obj("q", 12, "t1"))  # a label set by another replica at 12
    cache.store(obj("q", 11, "t1", status={"written": True}))  # our status patch at 11, answered late
    assert ("ns", "q") not in cache and cache.group(("ns", "t1")) == []
    cache.store(obj("q", 12, "t1"))
    assert ("ns", "q") not in cache
    cache.observe("ADDED", obj("q", 14, "t1"))  # its label set back: the watch brings it again
    assert cache.get(("ns", "q"))["metadata"]["resourceVersion"] == "14"  # type: ignore[index]
    cache.observe("DELETED", obj("q", 15, "t1"))
    cache.observe("ADDED", obj("q", 3, "t1", uid="u2"))  # created again: another uid, not older
    assert ("ns", "q") in cache


def test_a_version_the_watch_would_not_bring_removes_the_object() -> None:
    """``admit`` is what the watch selects: the answer to a write that took the object out of it
    (a label another replica's watch selects) removes it, and a late answer of an older write
    does not bring it back."""
    def admit(body: Mapping[str, Any]) -> bool:
        return (body["metadata"].get("labels") or {}).get("slice") != "theirs"

    cache = WatchCache(slim, admit=admit)
    cache.observe("ADDED", obj("q", 10))
    cache.store({**obj("q", 12), "metadata": {**obj("q", 12)["metadata"], "labels": {"slice": "theirs"}}})
    assert ("ns", "q") not in cache
    cache.store(obj("q", 11))
    assert ("ns", "q") not in cache
    cache.store({**obj("q", 13), "metadata": {**obj("q", 13)["metadata"], "labels": {"slice": "mine"}}})
    assert ("ns", "q") in cache


async def test_a_list_later_than_a_removal_says_whether_the_object_is_there() -> None:
    cache = WatchCache(slim)
    cache.observe("ADDED", obj("q", 5))
    cache.observe("DELETED", obj("q", 8))
    await cache.relist(pages([obj("q", 7)], version="7"))  # a listing older than the removal
    assert ("ns", "q") not in cache
    await cache.relist(pages([], version="9"))  # one later than it: the removal is forgotten
    cache.store(obj("q", 6))  # nothing says it is stale any more (the next LIST would drop it)
    assert ("ns", "q") in cache


async def pages(*chunks: list[dict[str, Any]], version: str = "10") -> AsyncIterator[Page]:
    for items in chunks:
        yield Page(items, version)


async def test_a_list_drops_what_it_does_not_hold_and_fills_the_cache() -> None:
    cache = WatchCache(slim, index=group_of)
    cache.store(obj("gone", 1, "t1"))
    cache.store(obj("kept", 2, "t1"))
    await cache.relist(pages([obj("kept", 3, "t1")], [obj("new", 4, "t1")]))
    assert cache.listed
    assert names(cache.values()) == ["kept", "new"]
    assert names(cache.group(("ns", "t1"))) == ["kept", "new"]
    assert cache.get(("ns", "kept"))["metadata"]["resourceVersion"] == "3"  # type: ignore[index]


async def test_a_list_keeps_what_the_watch_showed_after_it_and_leaves_out_what_it_is_told_to() -> None:
    cache = WatchCache(slim)
    cache.observe("ADDED", obj("created-meanwhile", 12, uid="u2"))  # its event came while pages were read
    cache.observe("ADDED", obj("deleted-unseen", 8, uid="u3"))
    await cache.relist(pages([obj("mine", 5)], [obj("theirs", 6, uid="u4")], version="10"),
                       keep=lambda body: body["metadata"]["name"] != "theirs")
    assert names(cache.values()) == ["created-meanwhile", "mine"]


def test_cached_objects_are_copies_that_share_repeated_keys_and_short_strings() -> None:
    """Two objects parsed from separate watch events hold one copy of each key and short value."""
    long_text = "x" * (SHARED_STRING_LENGTH + 1)
    text = json.dumps({"metadata": {"namespace": "ns", "name": "a", "resourceVersion": "1"},
                       "status": {"conditions": [{"type": "Ready", "status": "True", "message": long_text}]}})
    first, second = json.loads(text), json.loads(text)
    assert first["status"]["conditions"][0]["type"] is not second["status"]["conditions"][0]["type"]
    cache = WatchCache(lambda body: dict(body))
    cache.store(first)
    kept = cache.get(("ns", "a"))
    assert kept == first and kept is not first
    other = compact(second)
    kept_condition, other_condition = kept["status"]["conditions"][0], other["status"]["conditions"][0]  # type: ignore[index]
    assert next(k for k in kept_condition if k == "status") is next(k for k in other_condition if k == "status")
    assert kept_condition["status"] is other_condition["status"]  # "True"
    assert kept_condition["message"] == other_condition["message"] == long_text
    first["status"]["conditions"][0]["status"] = "False"  # the cached copy is not the parsed event
    assert kept_condition["status"] == "True"
