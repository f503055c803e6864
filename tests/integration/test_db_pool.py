"""The operator's connection pools against a real PostgreSQL: waiting for a growing pool is no outage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import psycopg_pool
import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator.db.targets import DatabaseTargets

HOLDERS = 3
"""Reconciles asking for a connection at once: each takes a slot, and the pool opens one connection
at a time for them. On the busy loop that takes longer than one pool timeout, as the test needs,
and stays well within POOL_WAIT_ROUNDS of them on a loaded machine (six did not, once, on a CI run
with each connect taking about 2 s)."""
BUSY_TURN_SECONDS = 0.15
"""How long each turn of the event loop is held by other work, as in a restart that resumes every
object at once."""


@contextlib.asynccontextmanager
async def busy_event_loop() -> AsyncIterator[None]:
    """Other work holding the event loop for BUSY_TURN_SECONDS at every turn."""
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            time.sleep(BUSY_TURN_SECONDS)  # CPU-bound work of other objects, not a wait for anything
            await asyncio.sleep(0)

    task = asyncio.create_task(hog())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_a_pool_still_opening_connections_on_a_busy_loop_is_waited_for(stack: LocalStack) -> None:
    target = stack.targets[0]
    # The pool's wait (connect_timeout) is shorter than opening HOLDERS connections one by one
    # takes on the busy loop, but longer than opening any single one.
    targets = DatabaseTargets({target: stack.operator_dsn(target)}, min_size=0, max_size=HOLDERS,
                              connect_timeout=2)
    await targets.open()
    all_in = asyncio.Event()
    inside = 0

    async def reconcile() -> int:
        nonlocal inside
        async with targets.connection(target) as conn:
            inside += 1
            if inside == HOLDERS:
                all_in.set()
            await all_in.wait()  # every holder keeps its connection until all have one
            cur = await conn.execute("SELECT pg_backend_pid() AS pid")
            row = await cur.fetchone()
            assert row is not None
            return int(str(row["pid"]))

    try:
        async with busy_event_loop():
            pids = await asyncio.wait_for(asyncio.gather(*(reconcile() for _ in range(HOLDERS))), timeout=120)
        assert len(set(pids)) == HOLDERS  # each on a connection of its own, none failed for want of one
    finally:
        await targets.close()


async def test_a_database_that_refuses_connections_fails_at_the_first_timeout() -> None:
    """An outage is told at the pool's first timeout, not after every round of waiting."""
    targets = DatabaseTargets({"gone": "host=127.0.0.1 port=1 dbname=postgres user=nobody"}, min_size=0,
                              max_size=2, connect_timeout=1)
    await targets.open()
    try:
        with pytest.raises(psycopg_pool.PoolTimeout):
            async with targets.connection("gone"):
                pass
        assert targets.pool("gone").get_stats().get("requests_errors") == 1  # one wait, not several
    finally:
        await targets.close()


async def test_warming_opens_every_connection_before_the_burst(stack: LocalStack) -> None:
    """A run warms its pools before Kopf lists anything: the burst that follows (a restart resuming
    every object) finds max_size connections open and waits for none to be made on a busy loop."""
    target = stack.targets[0]
    targets = DatabaseTargets({target: stack.operator_dsn(target)}, min_size=1, max_size=HOLDERS, connect_timeout=5)
    await targets.open()
    try:
        await targets.warm()
        stats = targets.pool(target).get_stats()
        assert stats["pool_size"] == HOLDERS and stats["pool_available"] == HOLDERS, stats
    finally:
        await targets.close()


async def test_warming_a_database_that_refuses_connections_does_not_fail_the_start() -> None:
    targets = DatabaseTargets({"gone": "host=127.0.0.1 port=1 dbname=postgres user=nobody"}, min_size=1,
                              max_size=2, connect_timeout=1)
    await targets.open()
    try:
        await targets.warm()  # logged, not raised: the target's first use reports it
        assert targets.pool("gone").get_stats().get("pool_available", 0) == 0
    finally:
        await targets.close()
