"""One async connection pool per configured database target."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)


class UnknownTarget(LookupError):
    """A Tenant names a database target the operator is not configured with."""


class DatabaseUnavailable(Exception):
    """The target cannot be reached now; the caller retries later."""


Conn = psycopg.AsyncConnection[dict[str, object]]
Pool = AsyncConnectionPool[Conn]

POOL_WAIT_ROUNDS = 6
"""How many of the pool's timeouts (``db_connect_timeout_seconds`` each) a slot's holder waits for
a pool that is still opening connections without error (``DatabaseTargets._getconn``)."""


class DatabaseTargets:
    def __init__(
        self, dsns: Mapping[str, str], *, min_size: int, max_size: int, connect_timeout: float,
        lock_timeout: str = "10s", statement_timeout: str = "120s",
    ) -> None:
        self.dsns = dict(dsns)
        self.max_size = max_size
        self.pools: dict[str, AsyncConnectionPool[Conn]] = {
            name: AsyncConnectionPool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                open=False,
                timeout=connect_timeout,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "connect_timeout": max(1, int(connect_timeout)),
                    "application_name": "tenancy-operator",
                    # No statement of the operator waits on a tenant's lock, or runs, for longer:
                    # a tenant holding ACCESS EXCLUSIVE on its table delays its own work only.
                    "options": f"-c lock_timeout={lock_timeout} -c statement_timeout={statement_timeout}",
                },
                connection_class=psycopg.AsyncConnection,
                name=f"tenancy-{name}",
                reconnect_timeout=0,  # keep trying forever: a target may come back at any time
            )
            for name, dsn in dsns.items()
        }

        # Reconciles take a slot before a connection, so waiting for capacity never times out and
        # never looks like an unreachable database; only a real outage raises PoolTimeout.
        self._slots = {name: asyncio.Semaphore(max_size) for name in dsns}

    @contextlib.asynccontextmanager
    async def connection(self, target: str) -> AsyncIterator[Conn]:
        """A pooled connection to ``target``, waiting (without a deadline) for a free slot first."""
        pool = self.pool(target)
        async with self._slots[target]:
            conn = await self._getconn(pool)
            try:
                yield conn
            finally:
                await pool.putconn(conn)

    async def _getconn(self, pool: Pool) -> Conn:
        """A connection once the slot is ours. The pool opens its connections one at a time, and on
        an event loop busy with a burst (a restart resuming every object) each takes long: the
        slot's holder may wait past the pool's timeout for a pool that is still growing. That is
        no outage, so it waits again while the pool makes progress (it started or finished a
        connection attempt, and none failed), up to POOL_WAIT_ROUNDS timeouts in all. A failed
        attempt, or a pool doing nothing (backing off after failures), is an outage: its
        PoolTimeout is raised at once."""
        for round_ in range(1, POOL_WAIT_ROUNDS + 1):
            before = _attempts(pool)
            try:
                return await pool.getconn()
            except PoolTimeout:
                (started, failed, succeeded), (started_0, failed_0, succeeded_0) = _attempts(pool), before
                if round_ == POOL_WAIT_ROUNDS or failed > failed_0 or (started, succeeded) == (started_0, succeeded_0):
                    raise
                log.info("database pool still opening connections; waiting on", pool=pool.name, round=round_)
        raise AssertionError("unreachable")

    async def open(self) -> None:
        for name, pool in self.pools.items():
            await pool.open(wait=False)
            metrics.DB_POOL_MAX.labels(target=name).set(pool.max_size)

    async def warm(self) -> None:
        """Open every pool's connections up to its max_size now, before a run lists its objects.
        The pool opens connections one at a time, only when asked; asked in the burst that
        follows (a restart resumes every object), each connect waits for turns of a loop busy with
        that burst and can pass its connect timeout, which fails the reconcile waiting for it.
        Opened now they stay (the pool closes idle ones above min_size after ten minutes). A
        target that does not answer within the pool's timeout is left as it is: its first use
        tells."""
        async def fill(name: str, pool: Pool) -> None:
            got: list[Conn] = []

            async def one() -> None:
                got.append(await pool.getconn())

            results = await asyncio.gather(*(one() for _ in range(pool.max_size)), return_exceptions=True)
            for conn in got:
                await pool.putconn(conn)
            if len(got) < pool.max_size:
                errors = {type(r).__name__ for r in results if isinstance(r, BaseException)}
                log.warning("database pool not filled before the start", target=name, connections=len(got),
                            errors=sorted(errors))

        await asyncio.gather(*(fill(name, pool) for name, pool in self.pools.items()))

    async def close(self) -> None:
        await asyncio.gather(*(pool.close(timeout=5) for pool in self.pools.values()))

    def pool(self, target: str) -> AsyncConnectionPool[Conn]:
        try:
            return self.pools[target]
        except KeyError:
            raise UnknownTarget(target) from None

    def conninfo(self, target: str) -> dict[str, Any]:
        """Host, port, dbname... of a target's DSN (for tenant Secrets and tenant logins)."""
        return psycopg.conninfo.conninfo_to_dict(self.dsns[target])

    def update_pool_metrics(self) -> None:
        for name, pool in self.pools.items():
            stats = pool.get_stats()
            size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
            metrics.DB_POOL_CONNECTIONS.labels(target=name, state="used").set(size - available)
            metrics.DB_POOL_CONNECTIONS.labels(target=name, state="idle").set(available)
            metrics.DB_POOL_CONNECTIONS.labels(target=name, state="waiting").set(
                stats.get("requests_waiting", 0)
            )

    async def ping(self, target: str, wait_seconds: float = 3.0) -> None:
        """The target accepts a new connection and answers. Not through the pool: under a burst
        every pooled connection can be busy with work, and a liveness probe queued behind it
        would fail and have the pod restarted in the middle of the burst."""
        async with await psycopg.AsyncConnection.connect(
            self.dsns[target], autocommit=True, connect_timeout=max(1, int(wait_seconds)),
            application_name="tenancy-operator-probe",
        ) as conn:
            await conn.execute("SELECT 1")


def _attempts(pool: Pool) -> tuple[int, int, int]:
    """The pool's connection attempts so far: started, failed, and the milliseconds spent on the
    successful ones (which grow with every success)."""
    stats = pool.get_stats()
    return stats.get("connections_num", 0), stats.get("connections_errors", 0), stats.get("connections_ms", 0)
