"""The quota service's Prometheus series: per-tenant gauges from each enforced plan (limits, usage,
load share, noisy-neighbour verdict; switched off with ``quota_per_tenant_metrics``), removed with
the tenant, and the per-state tenant counts, recounted at most once a second."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable

from tenancy_operator.api.quota import LIMIT_NAMES
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.quota_policy import (
    EXCEEDED,
    LEVEL_NAMES,
    LOAD_SERIES,
    NEAR,
    Key,
    Memory,
    Plan,
    metric_amount,
)

AGGREGATES_DELAY_SECONDS = 1.0
"""The tenants-per-state gauges are recounted at most this often."""


class QuotaSeries:
    """``per_tenant()``: the per-tenant series are on; ``has_load(key)``: the measurements hold
    per-tenant load series of the tenant (removed with it); ``memories()``: every tenant's last
    evaluation, for the per-state counts."""

    def __init__(self, *, per_tenant: Callable[[], bool], has_load: Callable[[Key], bool],
                 memories: Callable[[], Iterable[Memory]]) -> None:
        self._per_tenant = per_tenant
        self._has_load = has_load
        self._memories = memories
        self.held: dict[Key, set[str]] = {}
        """The per-tenant series each tenant has now."""
        self._aggregates_due = False

    def update_series(self, key: Key, plan: Plan | None) -> None:
        """Per-tenant gauges from an enforced plan; None removes them (the tenant is gone). A plan
        that could not measure (database down) leaves the last values."""
        if not self._per_tenant() or (plan is not None and not plan.enforce):
            return
        labels = {"namespace": key[0], "tenant": key[1]}
        wanted: set[str] = set()
        if plan is not None:
            for name, value in plan.hard.items():
                metrics.TENANT_QUOTA_LIMIT.labels(**labels, resource=name).set(metric_amount(name, value))
                wanted.add(f"limit:{name}")
            for name, amount in plan.amounts_used.items():
                metrics.TENANT_QUOTA_USED.labels(**labels, resource=name).set(float(amount))
                wanted.add(f"used:{name}")
        if plan is not None and plan.load_share is not None:
            metrics.TENANT_LOAD_SHARE.labels(**labels).set(plan.load_share)
            wanted.add("share")
        elif "share" in self.held.get(key, set()) and plan is not None:
            wanted.add("share")
        if plan is not None and plan.noisy is not None:
            metrics.TENANT_NOISY_NEIGHBOR.labels(**labels).set(1 if plan.noisy else 0)
            wanted.add("noisy")
        held = self.held.get(key, set()) | ({"load"} if self._has_load(key) else set())
        if plan is not None and "load" in held:
            wanted.add("load")
        for series in held - wanted:
            if series in ("share", "noisy", "load"):
                gauges = {"share": (metrics.TENANT_LOAD_SHARE,), "noisy": (metrics.TENANT_NOISY_NEIGHBOR,)}.get(
                    series, LOAD_SERIES)
                for g in gauges:
                    with contextlib.suppress(KeyError):
                        g.remove(key[0], key[1])
                continue
            kind, name = series.split(":", 1)
            gauge = metrics.TENANT_QUOTA_LIMIT if kind == "limit" else metrics.TENANT_QUOTA_USED
            with contextlib.suppress(KeyError):
                gauge.remove(key[0], key[1], name)
        if wanted:
            self.held[key] = wanted
        else:
            self.held.pop(key, None)

    def update_aggregates(self) -> None:
        """Recount the per-state gauges soon, at most once a second: a count over every tenant
        after each evaluation would make a mass creation quadratic."""
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
        counts: Counter[tuple[str, int]] = Counter()
        memories = list(self._memories())
        for mem in memories:
            for name, lv in mem.levels.items():
                if lv >= NEAR:
                    counts[(name, NEAR)] += 1
                if lv == EXCEEDED:
                    counts[(name, EXCEEDED)] += 1
        metrics.TENANT_NOISY_NEIGHBORS.set(sum(1 for mem in memories if mem.noisy))
        for name in LIMIT_NAMES:
            for lv, state in LEVEL_NAMES.items():
                metrics.TENANT_QUOTA_TENANTS.labels(resource=name, state=state).set(counts.get((name, lv), 0))
