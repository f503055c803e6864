"""Lifecycle jobs around the risky steps of a tenant's reconcile.

Each step (provision, migrate, suspend, ...) runs as a job recorded in the ledger. Transient
database errors are retried inside the job with exponential backoff and jitter; a job that still
fails counts one failed attempt, and the handler retries it later. After ``max_attempts`` failed
attempts the step is *stalled*: it does not run again until an admin changes the
``tenancy.dev/retry`` annotation, which buys exactly one more attempt, noted in the job record.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import psycopg
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tenancy_operator.api.names import RETRY_ANNOTATION
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db.targets import Conn
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.errors import Retry

T = TypeVar("T")
Requested = tuple[str | None, datetime.datetime | None]
"""Who asked for a job (a field manager, or the operator itself) and when."""

# Worth another try within the same attempt: the next try usually succeeds.
TRANSIENT = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
)


def is_transient(exc: BaseException) -> bool:
    """Worth another try at once. Besides the TRANSIENT classes: two sessions altering the same
    role at once (a rotation and the quota service's connection limit) make PostgreSQL answer
    XX000 "tuple concurrently updated"; the next try succeeds (seen in the 30-minute soak)."""
    if isinstance(exc, TRANSIENT):
        return True
    return (isinstance(exc, psycopg.errors.InternalError_)
            and "tuple concurrently updated" in (exc.diag.message_primary or ""))


class JobFailed(Exception):
    """A job attempt failed; ``stalled`` when no further attempt will run on its own."""

    def __init__(self, kind: str, error: str, attempt: int, stalled: bool) -> None:
        super().__init__(f"{kind} job failed (attempt {attempt}): {error}")
        self.kind = kind
        self.error = error
        self.attempt = attempt
        self.stalled = stalled


def describe(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return f"{type(exc).__name__}: {exc.diag.message_primary}"
    return str(exc) or type(exc).__name__


Connector = Callable[[], AbstractAsyncContextManager[Conn]]


def using(conn: Conn) -> Connector:
    """A connector that hands out a connection already held (no second pool checkout)."""
    return lambda: contextlib.nullcontext(conn)


class JobGate:
    """Runs steps as jobs. Ledger writes go through ``connect``: a held connection while the
    reconcile holds one anyway, or short pool checkouts around long steps that need none."""

    def __init__(
        self, connect: Connector, control: str, tenant_id: str, *, generation: int | None,
        retry_token: str | None, max_attempts: int, backoff_max: float = 5.0, no_history: bool = False,
        retry_requested: Requested = (None, None),
    ) -> None:
        self.connect = connect
        self.control = control
        self.tenant_id = tenant_id
        self.generation = generation
        self.retry_token = retry_token or None
        self.max_attempts = max_attempts
        self.backoff_max = backoff_max
        self.no_history = no_history
        """The tenant's registry row is new: no earlier attempt to look up in the ledger."""
        self.retry_requested = retry_requested
        """Who set the retry annotation (and when): the one who asked for a stalled job's retry."""

    async def run(self, kind: str, step: Callable[[], Awaitable[T]], *, detail: str | None = None,
                  requested: Requested = (None, None)) -> T:
        """Run ``step`` as a job of ``kind``; ``requested``: who asked for it and when (the audit
        trail; an admin's retry of a stalled job is recorded as theirs)."""
        streak: list[ledger.Job] = []
        if not self.no_history:
            async with self.connect() as conn:
                streak = await ledger.failed_streak(conn, self.control, self.tenant_id, kind)
        note = token = None
        if len(streak) >= self.max_attempts:
            used = {j.retry_token for j in streak if j.retry_token}
            if self.retry_token is None or self.retry_token in used:
                raise JobFailed(kind, streak[0].error or "failed", len(streak), stalled=True)
            token = self.retry_token
            note = f"retried by admin override ({RETRY_ANNOTATION}={token})"
            requested = self.retry_requested
        attempt = len(streak) + 1
        async with self.connect() as conn:
            job_id = await ledger.start(conn, self.control, self.tenant_id, kind, attempt=attempt,
                                        generation=self.generation, detail=detail, retry_token=token, note=note,
                                        requested_by=requested[0], requested_at=requested[1])
        metrics.LIFECYCLE_JOBS_RUNNING.labels(job_kind=kind).inc()
        started = time.monotonic()
        try:
            async for try_ in AsyncRetrying(
                retry=retry_if_exception(is_transient), stop=stop_after_attempt(4),
                wait=wait_exponential_jitter(multiplier=0.2, max=self.backoff_max), reraise=True,
            ):
                with try_:
                    result = await step()
        except Retry:
            raise  # infrastructure trouble, not this job's failure; the row is abandoned on the next pass
        except Exception as exc:
            if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
                raise  # no server answer (connection refused or lost): same, not a job failure
            return await self._failed(job_id, kind, attempt, exc, token, started)
        finally:
            metrics.LIFECYCLE_JOBS_RUNNING.labels(job_kind=kind).dec()
        async with self.connect() as conn:
            await ledger.finish(conn, self.control, job_id, ok=True)
        metrics.LIFECYCLE_JOBS.labels(job_kind=kind, result="succeeded").inc()
        metrics.LIFECYCLE_JOB_DURATION.labels(job_kind=kind).observe(time.monotonic() - started)
        return result

    async def _failed(self, job_id: str, kind: str, attempt: int, exc: BaseException, token: str | None,
                      started: float) -> T:
        error = describe(exc)
        async with self.connect() as conn:
            await ledger.finish(conn, self.control, job_id, ok=False, error=error)
        metrics.LIFECYCLE_JOBS.labels(job_kind=kind, result="failed").inc()
        metrics.LIFECYCLE_JOB_FAILURES.labels(job_kind=kind).inc()
        metrics.LIFECYCLE_JOB_DURATION.labels(job_kind=kind).observe(time.monotonic() - started)
        stalled = attempt >= self.max_attempts
        raise JobFailed(kind, error, attempt, stalled=stalled) from exc
