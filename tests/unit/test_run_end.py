"""The end of a Kopf run: the tasks Kopf's watch streams leave waiting for a pause are cancelled,
so that Kopf does not wait 5 s for them before the next run (a sharded replica's hand-over)."""

from __future__ import annotations

import asyncio

from tenancy_operator.runtime import KOPF_PAUSE_WAITER, cancel_pause_waiters


async def test_only_the_streams_pause_waiters_are_cancelled() -> None:
    forever = asyncio.Event()
    waiter = asyncio.create_task(forever.wait(), name=f"{KOPF_PAUSE_WAITER}tenants.v1alpha1.tenancy.dev")
    other = asyncio.create_task(forever.wait(), name="malloc-trim")
    await asyncio.sleep(0)
    assert cancel_pause_waiters() == 1
    await asyncio.wait([waiter], timeout=5)
    assert waiter.cancelled() and not other.done()
    other.cancel()
