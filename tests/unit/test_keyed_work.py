"""KeyedWork: one run per key at a time, merged reruns, retries with backoff, exact queue_depth."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tenancy_operator.keyed_work import Key, KeyedWork
from tenancy_operator.observability import metrics

KIND = "KeyedWorkTest"


async def test_what_comes_during_a_run_folds_into_one_more_run_and_keys_run_side_by_side() -> None:
    runs: list[tuple[Key, list[str]]] = []
    running: set[Key] = set()
    release = asyncio.Event()
    overlap: list[Key] = []

    async def work(key: Key, items: Sequence[str]) -> None:
        if key in running:
            overlap.append(key)
        running.add(key)
        runs.append((key, list(items)))
        await release.wait()
        running.discard(key)

    queue: KeyedWork[str] = KeyedWork(KIND, work)
    queue.submit(("ns", "a"), "first")
    queue.submit(("ns", "b"), "other")
    await asyncio.sleep(0)  # both runs start
    for item in ("second", "third", "third"):
        queue.submit(("ns", "a"), item)
    assert queue.busy(("ns", "a")) and len(queue) == 2
    release.set()
    await queue.join()
    assert runs == [(("ns", "a"), ["first"]), (("ns", "b"), ["other"]), (("ns", "a"), ["second", "third", "third"])]
    assert overlap == []
    assert len(queue) == 0 and not queue.busy(("ns", "a"))


async def test_a_failing_run_is_retried_and_its_objects_count_in_queue_depth_until_it_ends() -> None:
    attempts: list[list[str]] = []
    seen_depth: list[int] = []

    async def work(key: Key, items: Sequence[str]) -> None:
        attempts.append(list(items))
        seen_depth.append(metrics.PENDING.count(KIND))
        if len(attempts) < 3:
            raise RuntimeError("database down")

    queue: KeyedWork[str] = KeyedWork(KIND, work, pending=lambda item: item, first_delay=0.01, max_delay=0.02)
    queue.submit(("ns", "a"), "ns/q1")
    queue.submit(("ns", "a"), "ns/q1")  # the same object twice: counted once, until both are done
    await queue.join()
    assert attempts == [["ns/q1"], ["ns/q1"], ["ns/q1"], ["ns/q1"]]  # two retries, then the rerun
    assert seen_depth == [1, 1, 1, 1]
    assert metrics.PENDING.count(KIND) == 0


async def test_after_the_last_attempt_it_gives_up_and_queue_depth_returns_to_zero() -> None:
    attempts = 0

    async def work(key: Key, items: Sequence[str]) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("still down")

    queue: KeyedWork[str] = KeyedWork(KIND, work, pending=lambda item: item, attempts=3, first_delay=0.01,
                                      max_delay=0.02)
    queue.submit(("ns", "a"), "ns/q1")
    await queue.join()
    assert attempts == 3
    assert metrics.PENDING.count(KIND) == 0
    queue.submit(("ns", "a"), "ns/q1")  # the key takes work again
    await queue.join()
    assert attempts == 6


async def test_cancel_ends_every_run_and_leaves_nothing_pending() -> None:
    started = asyncio.Event()

    async def work(key: Key, items: Sequence[str]) -> None:
        started.set()
        await asyncio.Event().wait()

    queue: KeyedWork[str] = KeyedWork(KIND, work, pending=lambda item: item)
    queue.submit(("ns", "a"), "ns/q1")
    queue.submit(("ns", "a"), "ns/q2")  # waits for the run
    await started.wait()
    assert metrics.PENDING.count(KIND) == 2
    queue.cancel()
    await queue.join()
    assert len(queue) == 0 and metrics.PENDING.count(KIND) == 0


def test_a_handlers_work_is_outstanding_until_its_block_ends_and_after_it_raises() -> None:
    """queue_depth for Kopf-driven kinds: a reconcile that ends is done; one that raises is tried
    again by Kopf, so the object stays counted until then (or until its DELETED event)."""
    kind = "OutstandingTest"
    with metrics.PENDING.outstanding(kind, "ns/a"):
        assert metrics.PENDING.count(kind) == 1
    assert metrics.PENDING.count(kind) == 0
    try:
        with metrics.PENDING.outstanding(kind, "ns/a"):
            raise RuntimeError("database down")
    except RuntimeError:
        pass
    assert metrics.PENDING.count(kind) == 1
    with metrics.PENDING.outstanding(kind, "ns/a"):  # Kopf's retry, which succeeds
        pass
    assert metrics.PENDING.count(kind) == 0


async def test_work_submitted_after_cancel_is_not_started() -> None:
    """An event handled while the operator stops must not start work against clients that are
    closing: it would fail, retry with backoff, and hold up the end of the run."""
    ran: list[Key] = []

    async def work(key: Key, items: Sequence[str]) -> None:
        ran.append(key)

    queue: KeyedWork[str] = KeyedWork(KIND, work, pending=lambda item: item)
    queue.cancel()
    queue.submit(("ns", "late"), "ns/q3")
    await queue.join()
    assert ran == [] and len(queue) == 0 and metrics.PENDING.count(KIND) == 0


async def test_work_cancelled_by_the_end_of_a_run_is_not_counted_after_it() -> None:
    """A reconcile cancelled when its Kopf run ends stays counted (an error would be retried);
    the run's end clears the count: the next run lists what it covers and counts it again."""
    started = asyncio.Event()

    async def reconcile() -> None:
        with metrics.PENDING.outstanding("PendingTest", "ns/cut"):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(reconcile())
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert metrics.PENDING.count("PendingTest") == 1
    metrics.PENDING.reset()
    assert metrics.PENDING.count("PendingTest") == 0
    assert metrics.QUEUE_DEPTH.labels(kind="PendingTest")._value.get() == 0
