"""The rollouts' re-check loop (handlers/common.py Rechecks): a namespace with many rollouts takes
at most its own share of the looks, so another namespace's rollout is looked at on time."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from tenancy_operator.handlers.common import Rechecks


def test_a_flooding_namespace_does_not_delay_another() -> None:
    async def scenario() -> tuple[int, list[tuple[str, str]]]:
        running: Counter[str] = Counter()
        most = 0
        done: list[tuple[str, str]] = []
        calm_seen, flood_started = asyncio.Event(), asyncio.Event()

        async def check(key: tuple[str, str]) -> None:
            nonlocal most
            running[key[0]] += 1
            most = max(most, running["flood"])
            await asyncio.sleep(0.05)
            running[key[0]] -= 1
            done.append(key)
            if len(done) >= 4:
                flood_started.set()
            if key[0] == "calm":
                calm_seen.set()

        rechecks = Rechecks(check, retry_seconds=1.0, limit=4, per_namespace=2)
        loop_task = asyncio.create_task(rechecks.run_forever())
        for i in range(200):
            rechecks.schedule(("flood", f"r{i}"), 0)
        await asyncio.wait_for(flood_started.wait(), timeout=30)  # the flood is under way
        rechecks.schedule(("calm", "one"), 0)
        await asyncio.wait_for(calm_seen.wait(), timeout=30)
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        return most, done

    most, done = asyncio.run(scenario())
    assert most <= 2  # the flooding namespace never held more than its share
    flood_done_before_calm = done.index(("calm", "one"))
    assert flood_done_before_calm < 100  # looked at while most of the flood still waits, not after it
