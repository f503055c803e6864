"""Measuring tenants for their Quotas: registry, role and usage per target in one query per
measure, and (in the periodic pass) each tenant's load and the noisy-neighbour verdicts.

The quota service (reconcilers/quota.py) evaluates what this measures; this module only reads the
databases (catalogs and statistics, never a tenant-owned object) and keeps what the next
measurement compares with: load histories, the last load verdicts, each target's statistics
capabilities and the parsed NoisyNeighbor policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg
import psycopg_pool
from pydantic import ValidationError

from tenancy_operator.api.durations import parse_duration
from tenancy_operator.api.quota import NoisyNeighborPolicy, QuotaSpec
from tenancy_operator.api.tenant import tenant_identifier
from tenancy_operator.db import load as dbload
from tenancy_operator.db import quota as dbq
from tenancy_operator.db.quota import RoleQuotaState
from tenancy_operator.db.targets import Conn
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, database_retry
from tenancy_operator.reconcilers.noisy import Histories, Policy, assess
from tenancy_operator.reconcilers.quota_limits import quota_version
from tenancy_operator.reconcilers.quota_metrics import LOAD_COUNTERS
from tenancy_operator.reconcilers.quota_types import Key, LoadView, Probe, Subject
from tenancy_operator.runtime_context import OperatorContext

log = get_logger(__name__)

CAPABILITIES_EVERY = 10
"""Every how many load measurements a target's statistics capabilities (db/load.py) are read again."""
PROBE_GATHER_SECONDS = 0.25
"""Evaluations starting within this window share one probe query (see QuotaProbes.probe_one).
During a burst of new tenants each probe is expensive (planning and catalog scans on caches the
DDL burst keeps invalidating) and the largest statement cost the floor does not have, so a wider
window means far fewer of them; a quarter second more before a Quota's status is cheap."""


class QuotaProbes:
    """Measures tenants for the quota service. ``noisy(key)``: the tenant is contained as a noisy
    neighbour now (the next verdict's hysteresis starts from it)."""

    def __init__(self, ctx: OperatorContext, *, noisy: Callable[[Key], bool]) -> None:
        self.ctx = ctx
        self._noisy = noisy
        self.histories: Histories[Key] = Histories()
        """Load samples per tenant (reconcilers/noisy.py), from the periodic passes."""
        self.load_views: dict[Key, LoadView] = {}
        """The last pass's load of each tenant: a handler's evaluation keeps its verdict."""
        self.load_series: set[Key] = set()
        """Tenants with per-tenant load series in the metrics (removed with the tenant)."""
        self._capabilities: dict[str, tuple[int, dbload.LoadCapabilities]] = {}
        self._rounds: Counter[str] = Counter()
        """Load measurements per target (one per periodic pass)."""
        self._policies: dict[tuple[str, int], tuple[NoisyNeighborPolicy, Policy]] = {}
        self._batches: dict[str, list[tuple[Subject, asyncio.Future[Probe]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    def forget(self, key: Key) -> None:
        self.histories.forget(key)
        self.load_views.pop(key, None)
        self.load_series.discard(key)

    def cancel(self) -> None:
        """Shutdown: no probe outlives the pools it uses."""
        for task in list(self._tasks):
            task.cancel()

    async def probe_target(self, target: str, subjects: Sequence[Subject], *, load: bool = False) -> dict[Key, Probe]:
        """Measure every subject of one target with one query per measure; with ``load`` (the
        periodic pass), also every tenant's load (db/load.py) and the target's verdicts."""
        idents: dict[Key, str] = {}
        probes: dict[Key, Probe] = {}
        for s in subjects:
            try:
                idents[s.key] = tenant_identifier(s.name)
            except ValueError as exc:
                probes[s.key] = Probe(problem=("TenantNotReady", str(exc)))
        if not idents:
            return probes
        if target not in self.ctx.targets.pools:
            known = ", ".join(sorted(self.ctx.targets.pools)) or "none"
            problem = ("UnknownDatabase", f"database target {target!r} is not configured (known: {known})")
            return {**probes, **{k: Probe(problem=problem) for k in idents}}
        names = sorted(set(idents.values()))
        try:
            await self.ctx.ensure_control_schema(target)
            async with self.ctx.targets.connection(target) as conn:
                # Registry, roles and (only where a row and a role exist) usage: one statement. The
                # usage upsert and the platform's rows: one more, and only for subjects we enforce,
                # so a tenant still being provisioned costs a single statement.
                states, measured = await dbq.observe(conn, self.control, names)
                owned: dict[Key, RoleQuotaState] = {}
                for key, ident in idents.items():
                    state = states[ident]
                    if (state.tenant_id and (state.row_namespace, state.row_name) == key and state.role_exists
                            and ident in measured):
                        owned[key] = state
                reported = await dbq.record_usage(conn, self.control, {
                    str(st.tenant_id): {"storage": measured[idents[k]].storage,
                                        "connections": measured[idents[k]].connections}
                    for k, st in owned.items()
                })
                views: dict[Key, LoadView] = {}
                if load and owned:
                    try:
                        views = await self._measure_load(conn, target, subjects, {k: idents[k] for k in owned},
                                                         measured)
                    except psycopg.Error as exc:  # load is extra detail: limits are enforced without it
                        if isinstance(exc, psycopg.OperationalError):
                            raise
                        log.warning("tenant load measurement failed", target=target, error=type(exc).__name__)
        except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
            if not isinstance(exc, DATABASE_ERRORS):
                log.warning("quota measurement failed", target=target, error=type(exc).__name__)
            retry = database_retry(exc, f"database {target!r}")
            problem = (retry.reason, retry.message)
            return {**probes, **{k: Probe(problem=problem, target=target) for k in idents}}
        for key, ident in idents.items():
            state = states[ident]
            if key in owned:
                probes[key] = Probe(
                    state=state, storage=measured[ident].storage, connections=measured[ident].connections,
                    reported=reported.get(str(state.tenant_id), {}), target=target, ident=ident,
                    load=views.get(key) if load else self.load_views.get(key),
                )
            elif state.tenant_id and (state.row_namespace, state.row_name) != key:
                probes[key] = Probe(problem=(
                    "TenantNotReady",
                    f"schema {ident} belongs to tenant {state.row_namespace}/{state.row_name}; limits not applied",
                ), target=target, ident=ident)
            else:
                problem = ("TenantNotReady", f"tenant has no provisioned schema and role {ident} yet")
                probes[key] = Probe(problem=problem, target=target, ident=ident)
        return probes

    def policy(self, subject: Subject) -> tuple[NoisyNeighborPolicy, Policy]:
        """The NoisyNeighbor policy of the Quota in force (defaults without one), parsed once per
        Quota generation."""
        quota = subject.quotas[0] if subject.quotas else None
        version = quota_version(quota) if quota is not None else ("", 0)
        cached = self._policies.get(version)
        if cached is None:
            spec = NoisyNeighborPolicy()
            if quota is not None:
                with contextlib.suppress(ValidationError):
                    spec = QuotaSpec.model_validate(quota.get("spec") or {}).noisy_neighbor
            cached = (spec, Policy(multiple=spec.multiple, window=parse_duration(spec.window).total_seconds(),
                                   min_load=parse_duration(spec.min_load).total_seconds()))
            if len(self._policies) > 4 * max(len(self.histories.by_key), 256):
                self._policies.clear()
            self._policies[version] = cached
        return cached

    async def _capabilities_of(self, conn: Conn, target: str) -> dbload.LoadCapabilities:
        cached = self._capabilities.get(target)
        rounds = self._rounds[target]
        if cached is None or rounds - cached[0] >= CAPABILITIES_EVERY:
            caps = await dbload.capabilities(conn)
            if cached is None or cached[1] != caps:
                log.info("tenant load statistics", target=target, pg_stat_statements=caps.statements,
                         pg_read_all_stats=caps.read_all_stats)
            self._capabilities[target] = (rounds, caps)
            metrics.TENANT_LOAD_STATEMENTS.labels(target=target).set(1 if caps.statements else 0)
            return caps
        return cached[1]

    async def _measure_load(
        self, conn: Conn, target: str, subjects: Sequence[Subject], idents: Mapping[Key, str],
        measured: Mapping[str, dbq.Measured],
    ) -> dict[Key, LoadView]:
        """Read the load of every tenant of the target (one statement), add it to their histories
        and judge them against each other."""
        self._rounds[target] += 1
        caps = await self._capabilities_of(conn, target)
        try:
            loads = await dbload.read(conn, caps, sorted(set(idents.values())))
        except dbload.STATEMENTS_UNAVAILABLE as exc:
            if not caps.statements:
                raise
            log.warning("pg_stat_statements unreadable; sampling sessions", target=target, error=type(exc).__name__)
            caps = replace(caps, statements=False)
            self._capabilities[target] = (self._rounds[target], caps)
            metrics.TENANT_LOAD_STATEMENTS.labels(target=target).set(0)
            loads = await dbload.read(conn, caps, sorted(set(idents.values())))
        at = time.monotonic()
        source = "pg_stat_statements" if caps.statements else "pg_stat_activity"
        per_tenant = self.ctx.settings.quota_per_tenant_metrics
        by_key = {s.key: s for s in subjects}
        policies: dict[Key, Policy] = {}
        windows: dict[Key, str] = {}
        for key, ident in idents.items():
            role = loads.get(ident, dbload.RoleLoad())
            history = self.histories.get(key, source)
            before = history.samples[-1] if history.samples else None
            storage = measured[ident].storage if ident in measured else 0
            if caps.statements:
                history.add_counters(at, role.exec_seconds, role.calls, role.rows, role.shared_blocks,
                                     role.temp_blocks, storage)
            else:
                history.add_sessions(at, role.active, storage)
            spec, policies[key] = self.policy(by_key[key])
            windows[key] = spec.window
            if per_tenant:
                self._count_load(key, before, history.samples[-1], role)
        noisy_now = [k for k in idents if self._noisy(k)]
        verdicts = assess({k: self.histories.by_key[k] for k in idents}, policies, noisy_now)
        self.histories.trim(policies)
        views: dict[Key, LoadView] = {}
        for key, ident in idents.items():
            role = loads.get(ident, dbload.RoleLoad())
            views[key] = LoadView(verdicts.get(key), source, caps.detail(), windows[key], role.active, role.waiting,
                                  role.wait_events)
        self.load_views.update(views)
        return views

    def _count_load(self, key: Key, before: Any, after: Any, role: dbload.RoleLoad) -> None:
        if before is not None:
            for counter, amount in (
                (metrics.TENANT_RESOURCE_USAGE, after.load - before.load),
                (metrics.TENANT_RESOURCE_CALLS, after.calls - before.calls),
                (metrics.TENANT_RESOURCE_ROWS, after.rows - before.rows),
                (metrics.TENANT_RESOURCE_SHARED_BLOCKS, after.shared_blocks - before.shared_blocks),
                (metrics.TENANT_RESOURCE_TEMP_BLOCKS, after.temp_blocks - before.temp_blocks),
            ):
                counter.inc(key, max(float(amount), 0.0))
        else:
            for counter in LOAD_COUNTERS:
                counter.inc(key)  # the series exist from the first pass, at 0
        metrics.TENANT_SESSIONS_ACTIVE.set(key, role.active)
        metrics.TENANT_SESSIONS_WAITING.set(key, role.waiting)
        self.load_series.add(key)

    async def probe_one(self, target: str, subject: Subject) -> Probe:
        """Measure one tenant together with the others whose evaluations start meanwhile: a burst
        of new tenants becomes one probe query per few dozen tenants instead of one each (its
        planning and catalog scans cost about the same for 1 tenant as for 30)."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(target)
        if batch is None:
            batch = self._batches[target] = []
            loop.call_later(PROBE_GATHER_SECONDS, self._probe_batch, target)
        future: asyncio.Future[Probe] = loop.create_future()
        batch.append((subject, future))
        return await future

    def _probe_batch(self, target: str) -> None:
        batch = self._batches.pop(target, [])

        async def run() -> None:
            try:
                probes = await self.probe_target(target, [s for s, _ in batch])
            except Exception as exc:  # every waiter's evaluation fails with it (and is retried)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for s, future in batch:
                if not future.done():
                    future.set_result(probes[s.key])

        task = asyncio.get_running_loop().create_task(run(), name=f"quota-probe-{target}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
