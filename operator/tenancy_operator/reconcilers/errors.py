"""What the reconcilers share: their transient error and the head of their outcomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
import psycopg_pool


class Retry(Exception):
    """Transient infrastructure trouble (database or API unreachable): the handler retries with
    backoff. Not a failed job attempt. ``reason`` is a bounded metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


DATABASE_ERRORS = (psycopg_pool.PoolTimeout, psycopg.OperationalError)
"""What a step's database access raises when the database cannot serve it now: unreachable, or
holding the step up (a lock wait or a statement past the operator's own deadlines)."""


def database_retry(exc: BaseException, where: str) -> Retry:
    """The Retry for one of DATABASE_ERRORS, its reason naming what happened. ``where`` names
    the database (e.g. "database 'default'"). A lock another session held past ``lock_timeout``
    or a statement cancelled at ``statement_timeout`` is ``DatabaseBusy``: the server answers,
    and an SRE looks at what holds it up, not at whether it is up (``DatabaseUnavailable``)."""
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return Retry("DatabaseBusy", f"{where} busy: a lock another session holds was not granted in time")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return Retry("DatabaseBusy", f"{where} busy: a statement was cancelled at its timeout")
    return Retry("DatabaseUnavailable", f"{where} unavailable: {type(exc).__name__}")


def combined(retries: Sequence[Retry]) -> Retry:
    """One Retry for the troubles of several targets: DatabaseBusy only if every one is busy."""
    reasons = {r.reason for r in retries}
    return Retry("DatabaseBusy" if reasons == {"DatabaseBusy"} else "DatabaseUnavailable",
                 "; ".join(r.message for r in retries))


@dataclass
class Verdict:
    """The head of a kind's reconcile outcome: what its Ready condition says, whether the operator
    stopped trying (Stalled: a person must act), and the Events to post."""

    ready: bool
    reason: str
    message: str
    stalled: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
