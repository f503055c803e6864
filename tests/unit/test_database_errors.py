"""database_retry: a database error's Retry names what happened."""

from __future__ import annotations

import psycopg
import psycopg_pool

from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, database_retry


def test_a_lock_wait_or_a_statement_past_its_timeout_is_busy_anything_else_unavailable() -> None:
    where = "database 'default'"
    for exc in (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
                psycopg.errors.QueryCanceled("canceling statement due to statement timeout")):
        assert isinstance(exc, DATABASE_ERRORS)
        retry = database_retry(exc, where)
        assert retry.reason == "DatabaseBusy"
        assert retry.message.startswith("database 'default' busy: ")
    for exc in (psycopg_pool.PoolTimeout("couldn't get a connection"),
                psycopg.OperationalError("connection refused")):
        retry = database_retry(exc, where)
        assert (retry.reason, retry.message) == ("DatabaseUnavailable", f"database 'default' unavailable: "
                                                                        f"{type(exc).__name__}")
    assert {"DatabaseBusy", "DatabaseUnavailable"} <= set(metrics.REASONS)  # bounded metric labels
