"""A session over a tenant's own login, for reads that evaluate tenant-owned objects (a column
type's output function, a table's row security, a record table the tenant can rewrite): the
tenant's rights, never the operator's; read-only; ended at a deadline both by the server
(statement_timeout) and by the client (asyncio.timeout), so a hostile schema cannot hold it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg.rows import TupleRow


@asynccontextmanager
async def read_only(tenant_dsn: str, *, connect_timeout: float, deadline: float,
                    application_name: str) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
    async with await psycopg.AsyncConnection.connect(
        tenant_dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
        application_name=application_name,
        options=f"-c statement_timeout={int(deadline * 1000)} -c default_transaction_read_only=on",
    ) as conn:
        async with asyncio.timeout(deadline):
            yield conn
