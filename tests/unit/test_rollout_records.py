"""A rollout's record: this process's own decision wins over an older snapshot's status, and
another replica's later status wins over this process's decision (reconcilers/records.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tenancy_operator.reconcilers.records import LatestRecords


def body(rv: int, step: int | None) -> dict[str, Any]:
    return {"metadata": {"uid": "u1", "resourceVersion": str(rv)}, "status": {"step": step} if step else {}}


def stored(b: Mapping[str, Any]) -> int | None:
    return (b.get("status") or {}).get("step")


def test_own_decision_wins_over_a_lagging_snapshot() -> None:
    records: LatestRecords[int] = LatestRecords(stored)
    assert records.get(body(10, 1)) == 1  # nothing decided here yet: the status
    records.put(body(10, 1), 2)  # decided step 2 on the body at revision 10
    assert records.get(body(9, 1)) == 2  # an older snapshot
    assert records.get(body(10, 1)) == 2  # the same body, queued again
    assert records.get(body(11, 2)) == 2  # our own status write came back


def test_a_body_read_before_our_own_write_is_older_than_our_record() -> None:
    """A recheck GETs the flag at revision 11 (a person's annotation), then waits for the lock while a
    handler decides on revision 10 and writes its status (revision 12). What the recheck read is
    not another replica's word: it precedes our write."""
    records: LatestRecords[int] = LatestRecords(stored)
    records.put(body(10, 1), 2)
    records.written(body(12, 2))
    assert records.get(body(11, 1)) == 2
    records.put(body(11, 1), 3)  # decided on that older read: our write at 12 still precedes it
    assert records.get(body(12, 2)) == 3
    assert records.get(body(13, 5)) == 5  # written after our write, by someone else


def test_a_later_status_written_elsewhere_wins() -> None:
    records: LatestRecords[int] = LatestRecords(stored)
    records.put(body(10, 1), 2)
    assert records.get(body(20, 4)) == 4  # another replica moved it on while this one stood by
    records.forget("u1")
    assert records.get(body(5, 1)) == 1


def test_a_long_request_value_is_kept_as_status_stores_it() -> None:
    from tenancy_operator.api.names import REQUEST_TOKEN_MAX, RESUME_ROLLOUT_ANNOTATION, request_token

    long = "x" * 5000
    meta = {"annotations": {RESUME_ROLLOUT_ANNOTATION: long}}
    assert request_token(meta, RESUME_ROLLOUT_ANNOTATION) == long[:REQUEST_TOKEN_MAX]
    assert request_token({}, RESUME_ROLLOUT_ANNOTATION) is None
    assert request_token({"annotations": {RESUME_ROLLOUT_ANNOTATION: ""}}, RESUME_ROLLOUT_ANNOTATION) is None
