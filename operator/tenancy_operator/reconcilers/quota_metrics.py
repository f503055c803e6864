"""The quota service's Prometheus series: per-tenant gauges from each enforced plan (limits, usage,
load share, noisy-neighbour verdict; switched off with ``quota_per_tenant_metrics``), removed with
the tenant, and the per-state tenant counts, kept with each tenant's memory and published at most
once a second."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping

from tenancy_operator.api.quota import LIMIT_NAMES
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.quota_limits import EXCEEDED, LEVEL_NAMES, NEAR, metric_amount
from tenancy_operator.reconcilers.quota_types import Key, Memory, Plan

AGGREGATES_DELAY_SECONDS = 1.0
"""The tenants-per-state gauges are recounted at most this often."""


QUOTA_SERIES = (metrics.TENANT_QUOTA_LIMIT, metrics.TENANT_QUOTA_USED, metrics.TENANT_LOAD_SHARE,
                metrics.TENANT_NOISY_NEIGHBOR)
LOAD_COUNTERS = (metrics.TENANT_RESOURCE_USAGE, metrics.TENANT_RESOURCE_CALLS, metrics.TENANT_RESOURCE_ROWS,
                 metrics.TENANT_RESOURCE_SHARED_BLOCKS, metrics.TENANT_RESOURCE_TEMP_BLOCKS)
LOAD_SERIES = (*LOAD_COUNTERS, metrics.TENANT_SESSIONS_ACTIVE, metrics.TENANT_SESSIONS_WAITING)
"""Per-tenant load series, removed with the tenant."""


def _states(mem: Memory) -> list[tuple[str, int]]:
    """The (limit, level) counts one tenant's memory adds to: near includes exceeded."""
    states = [(name, NEAR) for name, lv in mem.levels.items() if lv >= NEAR]
    states += [(name, EXCEEDED) for name, lv in mem.levels.items() if lv == EXCEEDED]
    return states


class Memories(MutableMapping[Key, Memory]):
    """Every tenant's last evaluation, with the per-state tenant counts kept as entries change:
    counting them over all tenants after each evaluation would grow with the fleet."""

    def __init__(self) -> None:
        self._data: dict[Key, Memory] = {}
        self.states: Counter[tuple[str, int]] = Counter()
        """Tenants per (limit, level) for NEAR and EXCEEDED."""
        self.noisy = 0
        """Tenants whose NoisyNeighbor verdict in force is noisy."""

    def _count(self, mem: Memory, sign: int) -> None:
        for state in _states(mem):
            self.states[state] += sign
        if mem.noisy:
            self.noisy += sign

    def __getitem__(self, key: Key) -> Memory:
        return self._data[key]

    def __setitem__(self, key: Key, mem: Memory) -> None:
        old = self._data.get(key)
        if old is not None:
            self._count(old, -1)
        self._data[key] = mem
        self._count(mem, 1)

    def __delitem__(self, key: Key) -> None:
        self._count(self._data.pop(key), -1)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class QuotaSeries:
    """``per_tenant()``: the per-tenant series are on; ``memories``: every tenant's last
    evaluation, with the per-state counts."""

    def __init__(self, *, per_tenant: Callable[[], bool], memories: Memories) -> None:
        self._per_tenant = per_tenant
        self._memories = memories
        self._aggregates_due = False

    def update_series(self, key: Key, plan: Plan | None) -> None:
        """Per-tenant series from an enforced plan; None removes them, the load series too (the
        tenant is gone). A plan that could not measure (database down) leaves the last values, and
        one without a load share the last share."""
        if not self._per_tenant() or (plan is not None and not plan.enforce):
            return
        if plan is None:
            for family in (*QUOTA_SERIES, *LOAD_SERIES):
                family.remove(key)
            for name in LIMIT_NAMES:
                metrics.TENANT_QUOTA_LIMIT.remove((*key, name))
                metrics.TENANT_QUOTA_USED.remove((*key, name))
            return
        for name in LIMIT_NAMES:
            if name in plan.hard:
                metrics.TENANT_QUOTA_LIMIT.set((*key, name), metric_amount(name, plan.hard[name]))
            else:
                metrics.TENANT_QUOTA_LIMIT.remove((*key, name))
            if name in plan.amounts_used:
                metrics.TENANT_QUOTA_USED.set((*key, name), float(plan.amounts_used[name]))
            else:
                metrics.TENANT_QUOTA_USED.remove((*key, name))
        if plan.load_share is not None:
            metrics.TENANT_LOAD_SHARE.set(key, plan.load_share)
        if plan.noisy is not None:
            metrics.TENANT_NOISY_NEIGHBOR.set(key, 1 if plan.noisy else 0)
        else:
            metrics.TENANT_NOISY_NEIGHBOR.remove(key)

    @staticmethod
    def tenants() -> set[Key]:
        """Tenants with per-tenant quota series."""
        return {(k[0], k[1]) for family in QUOTA_SERIES for k in family.values}

    def update_aggregates(self) -> None:
        """Publish the per-state gauges soon, at most once a second: a mass creation evaluates
        many tenants a second."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._recount()
            return
        if not self._aggregates_due:
            self._aggregates_due = True
            loop.call_later(AGGREGATES_DELAY_SECONDS, self._recount)

    def _recount(self) -> None:
        self._aggregates_due = False
        counts = self._memories.states
        metrics.TENANT_NOISY_NEIGHBORS.set(self._memories.noisy)
        for name in LIMIT_NAMES:
            for lv, state in LEVEL_NAMES.items():
                metrics.TENANT_QUOTA_TENANTS.labels(resource=name, state=state).set(counts.get((name, lv), 0))
