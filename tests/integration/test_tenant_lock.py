"""The per-tenant advisory lock (the second line behind the slice Leases) against a real PostgreSQL:
a reconcile that is cancelled leaves no lock behind in a pooled session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import DatabaseTargets

IDENT = "t_lock_cancelled"
LOCK_ARGS = [sqlt.TENANT_LOCK_CLASS, IDENT]


def lock_granted(admin: psycopg.Connection[tuple[object, ...]], granted: bool) -> int:
    """Sessions holding (granted) or waiting for (not granted) the tenant's lock."""
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::bigint::oid"
        " AND objid = hashtext(%s)::bigint::oid AND granted = %s",
        [sqlt.TENANT_LOCK_CLASS, IDENT, granted],
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def poll(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Blocks the event loop while it polls: nothing else may run meanwhile (see the test)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f}s: {what}")
        time.sleep(0.02)


async def test_a_reconcile_cancelled_as_the_tenant_lock_is_granted_leaves_no_lock(stack: LocalStack) -> None:
    """A reconcile waits for the tenant's lock (another replica holds it during a hand-over), the
    lock is granted, and the reconcile is cancelled (its run ends) before it reads the grant. Its
    pooled session must not keep the lock: the next reconcile of that tenant, by any replica, would
    wait for it until lock_timeout, every time."""
    target = stack.targets[0]
    targets = DatabaseTargets({target: stack.operator_dsn(target)}, min_size=1, max_size=1, connect_timeout=5)
    await targets.open()
    other = psycopg.connect(stack.operator_dsn(target), autocommit=True)  # the other replica's session
    admin = psycopg.connect(stack.admin_dsn(target), autocommit=True)
    entered = asyncio.Event()

    async def reconcile() -> None:
        async with targets.connection(target) as conn, sqlt.tenant_lock(conn, IDENT):
            entered.set()
            await asyncio.Event().wait()

    try:
        other.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", LOCK_ARGS)
        task = asyncio.create_task(reconcile())
        deadline = time.monotonic() + 20
        while lock_granted(admin, False) != 1:  # the reconcile waits for the lock
            assert time.monotonic() < deadline, "the reconcile never waited for the tenant lock"
            await asyncio.sleep(0.02)
        # From here the event loop is held on purpose: the server grants the lock to the waiting
        # session, and the reconcile is cancelled before it has read that grant.
        other.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", LOCK_ARGS)
        poll(lambda: lock_granted(admin, True) == 1, "the lock granted to the waiting reconcile")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not entered.is_set()

        deadline = time.monotonic() + 20
        while True:  # the server releases a closed session's locks as its backend exits
            row = other.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", LOCK_ARGS).fetchone()
            if row is not None and row[0]:
                other.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", LOCK_ARGS)
                break
            assert time.monotonic() < deadline, "the cancelled reconcile's session still holds the tenant lock"
            await asyncio.sleep(0.1)
        async with targets.connection(target) as conn, sqlt.tenant_lock(conn, IDENT):
            pass  # the pool serves the next reconcile, which gets the lock at once
    finally:
        other.close()
        admin.close()
        await targets.close()
