"""The per-object locks: one holder at a time per key, and no entry once nobody holds or waits."""

from __future__ import annotations

import asyncio

from tenancy_operator.runtime_context import KeyedLocks

KEY = ("Tenant", "ns", "a")


async def test_one_holder_per_key_and_no_entry_left_behind() -> None:
    locks = KeyedLocks()
    inside: list[str] = []
    order: list[str] = []
    release = asyncio.Event()

    async def worker(name: str) -> None:
        async with locks.hold(KEY):
            inside.append(name)
            assert len(inside) == 1, inside
            order.append(name)
            if name == "first":
                await release.wait()
            inside.remove(name)

    first = asyncio.create_task(worker("first"))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(worker(f"w{i}")) for i in range(3)]
    await asyncio.sleep(0)
    assert locks.held(KEY) and len(locks) == 1
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == ["first", "w0", "w1", "w2"]
    assert not locks.held(KEY) and len(locks) == 0


async def test_other_keys_do_not_wait() -> None:
    locks = KeyedLocks()
    async with locks.hold(KEY):
        async with asyncio.timeout(1):
            async with locks.hold(("Tenant", "ns", "b")):
                pass
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_no_entry() -> None:
    locks = KeyedLocks()
    async with locks.hold(KEY):
        waiter = asyncio.create_task(locks.hold(KEY).__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    assert len(locks) == 0
