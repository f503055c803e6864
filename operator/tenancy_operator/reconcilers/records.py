"""The latest record of a rollout (its position, kept in the object's status) as this process
decided it, and when to trust the object's status instead.

A LISTed or queued snapshot of an object may be older than the status this process wrote: acting
on it would step twice or undo a rollback, so the process's own record wins. But with
active/standby replicas another replica may have moved the rollout on since this one last decided:
its status, written after the body this process decided on, wins then.

"After" is measured against this process's own last status write too (``written``): a body read
before that write and decided on after it (a recheck's GET that waited for the object's lock
while a handler decided and wrote) holds an older status, not another replica's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

R = TypeVar("R")


def _revision(body: Mapping[str, Any]) -> int:
    rv = str(body["metadata"].get("resourceVersion") or "")
    return int(rv) if rv.isdigit() else 0


class LatestRecords(Generic[R]):
    def __init__(self, from_status: Callable[[Mapping[str, Any]], R | None]) -> None:
        self._from_status = from_status
        self._records: dict[str, tuple[int, R]] = {}
        """uid -> (newest resourceVersion that holds or precedes the record: the body decided on,
        then the object as this process wrote the record into its status; the record decided)."""

    def get(self, body: Mapping[str, Any]) -> R | None:
        uid = str(body["metadata"].get("uid") or "")
        stored = self._from_status(body)
        mine = self._records.get(uid)
        if mine is None:
            return stored
        known, record = mine
        if stored is not None and stored != record and _revision(body) > known:
            return stored  # written after our decision, and not by us: another replica's
        return record

    def put(self, body: Mapping[str, Any], record: R) -> None:
        uid = str(body["metadata"].get("uid") or "")
        known = self._records.get(uid)
        self._records[uid] = (max(_revision(body), known[0] if known else 0), record)

    def written(self, written: Mapping[str, Any]) -> None:
        """The object as this process's status write left it: its status holds the record (or,
        when the write carried none, the record stands as it is)."""
        uid = str(written["metadata"].get("uid") or "")
        known = self._records.get(uid)
        if known is not None:
            self._records[uid] = (max(known[0], _revision(written)), known[1])

    def forget(self, uid: str | None) -> None:
        self._records.pop(str(uid or ""), None)
