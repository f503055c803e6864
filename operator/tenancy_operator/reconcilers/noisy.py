"""Noisy neighbours: each tenant's share of its target's load, the verdict, and containment. Pure.

The quota service reads every tenant's cumulative counters once per pass and target
(db/load.py), keeps a short history per tenant (``History``), and asks ``assess`` for the
verdicts of a whole target: a tenant is noisy when its load over its window exceeds its declared
multiple of the average tenant's load on the same target over that window, and calm again under
``CLEAR_FRACTION`` of it (hysteresis: a tenant at the threshold does not flap). ``contain`` gives
the role attributes a declared containment sets while noisy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

CLEAR_FRACTION = 0.8
"""A noisy tenant is calm again under this fraction of its threshold (and of minLoad)."""
MAX_SAMPLES = 512
"""Samples kept per tenant at most: a window longer than MAX_SAMPLES intervals is cut to what is
kept. Each pass also trims every history to the longest window of its target (``History.trim``)."""

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters of one tenant at one pass (monotonic: resets are folded in)."""

    at: float
    """Monotonic clock, seconds."""
    load: float
    """Execution seconds (pg_stat_statements) or busy session seconds (sampled)."""
    calls: int = 0
    rows: int = 0
    shared_blocks: int = 0
    temp_blocks: int = 0
    storage: int = 0
    """Schema bytes now (not cumulative)."""


@dataclass(frozen=True, slots=True)
class Delta:
    """What happened between two samples."""

    seconds: float
    load: float
    calls: int
    rows: int
    shared_blocks: int
    temp_blocks: int
    storage_growth: int

    @classmethod
    def between(cls, base: Sample, last: Sample) -> Delta:
        """From ``base`` to the later ``last``."""
        return cls(last.at - base.at, last.load - base.load, last.calls - base.calls, last.rows - base.rows,
                   last.shared_blocks - base.shared_blocks, last.temp_blocks - base.temp_blocks,
                   last.storage - base.storage)


@dataclass
class History:
    """The samples of one tenant, from one source (a change of source starts over)."""

    source: str
    samples: list[Sample] = field(default_factory=list)
    """Oldest first, MAX_SAMPLES at most. A list: a deque takes 760 bytes however few samples it
    holds, and every tenant has a history of a few samples once trimmed."""
    _raw: tuple[float, int, int, int, int] | None = None
    _offset: tuple[float, int, int, int, int] = (0.0, 0, 0, 0, 0)

    def add_counters(self, at: float, exec_seconds: float, calls: int, rows: int, shared_blocks: int,
                     temp_blocks: int, storage: int) -> None:
        """Record cumulative pg_stat_statements counters. A counter that went down was reset (or its
        entries evicted): the last values are added to every later one, so the history stays
        monotonic and the reset costs at most one interval of unseen load."""
        raw = (exec_seconds, calls, rows, shared_blocks, temp_blocks)
        if self._raw is not None and any(new < old for new, old in zip(raw, self._raw, strict=True)):
            self._offset = tuple(o + r for o, r in zip(self._offset, self._raw, strict=True))  # type: ignore[assignment]
        self._raw = raw
        load, c, r, sb, tb = (o + v for o, v in zip(self._offset, raw, strict=True))
        self._append(Sample(at, float(load), int(c), int(r), int(sb), int(tb), storage))

    def add_sessions(self, at: float, active: int, storage: int) -> None:
        """Record a sample of active sessions: the load grows by active x seconds since the last one."""
        last = self.samples[-1] if self.samples else None
        load = last.load + active * (at - last.at) if last is not None else 0.0
        self._append(Sample(at, load, storage=storage))

    def _append(self, sample: Sample) -> None:
        self.samples.append(sample)
        if len(self.samples) > MAX_SAMPLES:
            del self.samples[0]

    def trim(self, window: float) -> None:
        """Forget the samples no ``over(w)`` with ``w <= window`` will read again: those older than
        the newest sample at least ``window`` old. Without it every tenant kept MAX_SAMPLES
        samples (about 150 MB per 1,000 tenants) whatever its window."""
        if not self.samples:
            return
        newest = self.samples[-1].at
        drop = 0
        while drop + 1 < len(self.samples) and newest - self.samples[drop + 1].at >= window:
            drop += 1
        del self.samples[:drop]

    def over(self, window: float) -> Delta | None:
        """Counters over the last ``window`` seconds: from the newest sample at least that old (or
        the oldest kept) to the newest. None before two samples."""
        if len(self.samples) < 2:
            return None
        last = self.samples[-1]
        base = self.samples[0]
        for s in reversed(self.samples):
            if last.at - s.at >= window:
                base = s
                break
        return Delta.between(base, last)


@dataclass(frozen=True)
class Policy:
    multiple: float = 3.0
    window: float = 300.0
    min_load: float = 1.0


@dataclass(frozen=True)
class Verdict:
    """One tenant's load against its target's, over its window."""

    noisy: bool
    share: float
    """Fraction of the target's load."""
    ratio: float
    """Load over the average tenant's load."""
    delta: Delta
    tenants: int
    """Tenants the average is taken over."""


def decide(was_noisy: bool, ratio: float, load: float, policy: Policy) -> bool:
    """Noisy when ``ratio`` exceeds the multiple and ``load`` is at least minLoad; a noisy tenant
    stays noisy until under CLEAR_FRACTION of both."""
    if was_noisy:
        return ratio > policy.multiple * CLEAR_FRACTION and load >= policy.min_load * CLEAR_FRACTION
    return ratio > policy.multiple and load >= policy.min_load


def assess(histories: Mapping[K, History], policies: Mapping[K, Policy], noisy_now: Iterable[K]) -> dict[K, Verdict]:
    """Verdicts of every tenant of one target with a policy and two samples. The average is over
    every tenant measured on the target (quiet ones included) over the same window."""
    was = set(noisy_now)
    # Per window: every tenant's delta and their total load, computed once per window and not
    # once per tenant (that would be quadratic in the tenants of the target).
    by_window: dict[float, tuple[dict[K, Delta], float]] = {}
    out: dict[K, Verdict] = {}
    for key, policy in policies.items():
        history = histories.get(key)
        if history is None:
            continue
        window = by_window.get(policy.window)
        if window is None:
            found = {k: d for k, h in histories.items() if (d := h.over(policy.window)) is not None}
            window = by_window[policy.window] = (found, sum(max(d.load, 0.0) for d in found.values()))
        deltas, total = window
        mine = deltas.get(key)
        if mine is None:
            continue
        load = max(mine.load, 0.0)
        average = total / len(deltas) if deltas else 0.0
        share = load / total if total > 0 else 0.0
        ratio = load / average if average > 0 else 0.0
        out[key] = Verdict(decide(key in was, ratio, load, policy), round(share, 4), round(ratio, 2), mine,
                           len(deltas))
    return out


def contain(connection_limit: int, statement_timeout_ms: int | None, *,
            connections: tuple[float, int] | None, statement_timeout: tuple[float, int] | None,
            ) -> tuple[int, int | None, list[str]]:
    """The role attributes while noisy: each declared (factor, floor) lowers its attribute to
    ``ceil(value x factor)``, never under the floor and never above the value in force (-1 and
    None: unlimited, which becomes the floor). Returns (connection limit, statement timeout ms,
    attributes actually lowered)."""
    lowered: list[str] = []
    if connections is not None:
        factor, floor = connections
        target = floor if connection_limit < 0 else max(floor, math.ceil(connection_limit * factor))
        if connection_limit < 0 or target < connection_limit:
            connection_limit = target
            lowered.append("connections")
    if statement_timeout is not None:
        factor, floor = statement_timeout
        target = floor if statement_timeout_ms is None else max(floor, math.ceil(statement_timeout_ms * factor))
        if statement_timeout_ms is None or target < statement_timeout_ms:
            statement_timeout_ms = target
            lowered.append("statementTimeout")
    return connection_limit, statement_timeout_ms, lowered


class Histories(Generic[K]):
    """Every tenant's history, by key; forgotten with the tenant."""

    def __init__(self) -> None:
        self.by_key: dict[K, History] = {}

    def get(self, key: K, source: str) -> History:
        history = self.by_key.get(key)
        if history is None or history.source != source:
            history = self.by_key[key] = History(source)
        return history

    def trim(self, policies: Mapping[K, Policy]) -> None:
        """After a target's pass: its tenants (the keys of ``policies``) keep the samples the
        longest of their windows reads, since the target's average is taken over each window."""
        longest = max((p.window for p in policies.values()), default=0.0)
        for key in policies:
            history = self.by_key.get(key)
            if history is not None:
                history.trim(longest)

    def forget(self, key: K) -> None:
        self.by_key.pop(key, None)
