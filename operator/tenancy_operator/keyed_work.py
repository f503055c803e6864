"""Background work keyed by an object, for work that Kopf's own per-object queue does not carry.

Kopf runs one object's handlers one at a time and retries them. A Quota's evaluation is keyed by
something else, the *tenant* (namespace, name): its Tenant's events and each of its Quotas' events
trigger it, and a Kopf event handler must not wait for it. ``KeyedWork`` gives such work what
Kopf gives handlers:

- one run per key at a time; what arrives while a key runs is folded into one more run after it
  (its items merged), so a burst of events costs one or two runs, not one each;
- one backoff policy for failed runs (tenacity, exponential with jitter, a bounded number of
  attempts; a caller with a periodic pass lets that pass catch up after the last);
- ``queue_depth``: each item may name an object (``pending``), counted from its submission until
  the run that carries it ends, whatever the outcome;
- counted cleanup: a key's entry lives while it has a run, and no longer.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)

Key = tuple[str, str]
"""(namespace, name)"""
Item = TypeVar("Item")

ATTEMPTS = 8
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0


class KeyedWork(Generic[Item]):
    """Runs ``work(key, items)`` in the background, one run per key at a time (see the module)."""

    def __init__(
        self, kind: str, work: Callable[[Key, Sequence[Item]], Awaitable[None]], *,
        pending: Callable[[Item], str | None] = lambda _: None, attempts: int = ATTEMPTS,
        first_delay: float = FIRST_DELAY_SECONDS, max_delay: float = MAX_DELAY_SECONDS,
    ) -> None:
        self.kind = kind
        self._work = work
        self._pending_of = pending
        self._attempts = attempts
        self._wait = wait_exponential_jitter(multiplier=first_delay, max=max_delay, jitter=first_delay)
        self._runs: dict[Key, asyncio.Task[None]] = {}
        self._next: dict[Key, list[Item]] = {}
        """Items that came while their key ran: its next run's."""
        self._pending: Counter[str] = Counter()
        """Objects named by items not yet done (an object's events can be in two runs' items)."""
        self._closed = False

    def submit(self, key: Key, item: Item) -> None:
        """Run the work for ``key`` with ``item``: now if the key is idle, else after its run.
        Nothing, once cancelled: the clients the work would use are closed or closing."""
        if self._closed:
            return
        name = self._pending_of(item)
        if name is not None:
            self._pending[name] += 1
            metrics.PENDING.add(self.kind, name)
        if key in self._runs:
            self._next.setdefault(key, []).append(item)
            return
        task = asyncio.get_running_loop().create_task(self._run(key, [item]), name=f"{self.kind}-{key[0]}-{key[1]}")
        self._runs[key] = task

    def busy(self, key: Key) -> bool:
        """A run for ``key`` is going on or waiting for its next attempt."""
        return key in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    async def join(self) -> None:
        """Wait until no key has a run (runs started meanwhile included)."""
        while self._runs:
            await asyncio.gather(*list(self._runs.values()), return_exceptions=True)

    def cancel(self) -> None:
        """Cancel every run, and start none after (shutdown: no run outlives the clients it uses;
        one started by a late event would fail against closed clients and, retried with backoff,
        hold up the end of the run, which Kopf gives such tasks 5 s to finish)."""
        self._closed = True
        for task in list(self._runs.values()):
            task.cancel()

    async def _run(self, key: Key, items: list[Item]) -> None:
        try:
            while items:
                try:
                    await self._with_retries(key, items)
                finally:
                    self._done(items)
                items = self._next.pop(key, [])
        finally:
            self._runs.pop(key, None)
            self._done(self._next.pop(key, []))  # cancelled: nothing carries them any more

    async def _with_retries(self, key: Key, items: Sequence[Item]) -> None:
        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.warning("background work failed", kind=self.kind, namespace=key[0], name=key[1],
                        error=type(exc).__name__, attempt=state.attempt_number,
                        status=getattr(exc, "status", None))

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception), stop=stop_after_attempt(self._attempts),
                wait=self._wait, before_sleep=failed, reraise=True,
            ):
                with attempt:
                    await self._work(key, items)
        except Exception as exc:  # the last attempt failed: a caller with a periodic pass catches up
            log.warning("background work gave up", kind=self.kind, namespace=key[0], name=key[1],
                        error=type(exc).__name__, attempts=self._attempts)

    def _done(self, items: Sequence[Item]) -> None:
        for item in items:
            name = self._pending_of(item)
            if name is None:
                continue
            self._pending[name] -= 1
            if self._pending[name] <= 0:
                del self._pending[name]
                metrics.PENDING.discard(self.kind, name)
