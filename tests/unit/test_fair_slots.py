"""FairSlots: a namespace cannot take every slot, and a freed slot goes to the namespace holding the fewest."""

from __future__ import annotations

import asyncio
import contextlib

from tenancy_operator.runtime_context import FairSlots


async def _holder(slots: FairSlots, key: str, entered: list[str], release: asyncio.Event) -> None:
    async with slots.hold(key):
        entered.append(key)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_key_keeps_a_slot_free_for_the_others() -> None:
    slots = FairSlots(4)
    assert slots.per_key == 3
    entered: list[str] = []
    release = asyncio.Event()
    tasks = [asyncio.create_task(_holder(slots, "hostile", entered, release)) for _ in range(6)]
    await _settle()
    assert entered == ["hostile"] * 3  # the fourth slot stays free although hostile waits

    calm = asyncio.create_task(_holder(slots, "calm", entered, release))
    await _settle()
    assert entered[-1] == "calm" and slots.total == 4
    release.set()
    await asyncio.gather(*tasks, calm)
    assert slots.total == 0 and not slots.held


async def test_a_freed_slot_goes_to_the_key_holding_fewest() -> None:
    slots = FairSlots(2)
    assert slots.per_key == 1
    first_release, rest = asyncio.Event(), asyncio.Event()
    entered: list[str] = []
    a1 = asyncio.create_task(_holder(slots, "a", entered, first_release))
    b1 = asyncio.create_task(_holder(slots, "b", entered, rest))
    await _settle()
    a2 = asyncio.create_task(_holder(slots, "a", entered, rest))  # waits first
    c1 = asyncio.create_task(_holder(slots, "c", entered, rest))
    await _settle()
    assert entered == ["a", "b"]
    first_release.set()  # a's slot frees: a and c both hold 0 now; a's waiter is older
    await _settle()
    assert entered == ["a", "b", "a"]
    rest.set()
    await asyncio.gather(a1, b1, a2, c1)
    assert entered[-1] == "c" and slots.total == 0


async def test_a_waiter_cancelled_leaves_nothing_held() -> None:
    slots = FairSlots(1)
    release = asyncio.Event()
    entered: list[str] = []
    holder = asyncio.create_task(_holder(slots, "a", entered, release))
    await _settle()
    waiter = asyncio.create_task(_holder(slots, "b", entered, release))
    await _settle()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert slots.total == 0 and not slots.held
    async with slots.hold("c"):
        assert slots.total == 1
