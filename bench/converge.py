"""Converge benchmark: N Tenants with a Quota each and 10 FeatureFlags, against the real operator.

    bench/converge --tenants 1000                       # all scenarios, own temporary stack
    bench/converge --tenants 200 --stack dev            # against the stack of `make dev-up`
    bench/converge --tenants 1000 --scenario converge,restart --profile

Scenarios (each after the previous, on the same converged tenants):

- converge: the floor first (bench/floor.py: the same writes without an operator, same
  concurrency; ``--no-floor`` skips it), then the operator: everything applied at once, time until
  every object is Ready, per-tenant apply-to-Ready latency, the operator's peak RSS and CPU seconds,
  API requests by verb (kube-apiserver's own counts), SQL statements (pg_stat_statements) and
  transactions (pg_stat_database).
- restart: stop the operator, start it again; time until idle; DDL and API writes during the resync.
- idle: the operator's CPU and RSS over 60 s with N converged tenants.
- fleet: add a migration to the template ConfigMap all tenants use; time until all report it.
- flags: FeatureFlag edits; time from each edit to the rows changed in PostgreSQL (p50/p95).

Prints the figures, writes a JSON record to bench/results/, replaces the section of
docs/benchmarks.md for its stack and N, and ends with one machine-readable line:

    converge tenants=N seconds=S floor_ratio=R p95_seconds=P rss_mb=M
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench import profile as prof
from bench.common import (
    IGNORED_RESOURCES,
    ROOT,
    ApiServerMetrics,
    Operator,
    PgMeter,
    Sampler,
    SqlCounts,
    Stack,
    delta,
    flag_obj,
    loadavg,
    log,
    machine,
    percentile,
    quota_obj,
    resumed,
    template_cm,
    tenant_name,
    tenant_obj,
    text_sum,
    writes,
)
from bench.floor import Floor, cleanup
from bench.kube import Kube, Watcher, apply_all

SCENARIOS = ("converge", "restart", "idle", "fleet", "flags")
FLAGS = 10
STATS_FLUSH_SECONDS = 11.0  # PostgreSQL publishes an idle connection's transaction counts within 10 s
IDLE_WINDOW = 3.0  # seconds of (almost) no operator CPU that count as idle
IDLE_CPU_FRACTION = 0.03


def objects_for(prefix: str, n: int) -> tuple[list[str], list[dict[str, Any]]]:
    names = [tenant_name(prefix, i) for i in range(n)]
    objs: list[dict[str, Any]] = []
    for name in names:
        t = tenant_obj(name)
        t["spec"]["deletionPolicy"] = "Delete"  # so that cleaning up a dev stack leaves nothing behind
        objs += [t, quota_obj(name)]
    objs += [flag_obj(i, names) for i in range(FLAGS)]
    return names, objs


def latencies(w: Watcher, names: list[str]) -> list[float]:
    out = []
    for n in names:
        t = w.tracks.get(("tenants", n))
        if t and t.ready and t.sent:
            out.append(t.ready - t.sent)
    return out


def all_ready_at(w: Watcher) -> float:
    return max((t.ready for t in w.tracks.values()), default=math.nan)


def lat_summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": max(values, default=math.nan)}


def stage_summary(w: Watcher, names: list[str]) -> dict[str, dict[str, float]]:
    """Where each tenant waited, from what the API server showed (median and p95 per stage)."""
    stages: dict[str, list[float]] = {"create call": [], "created -> finalizer": [], "finalizer -> first status": [],
                                      "first status -> Ready": []}
    for n in names:
        t = w.tracks.get(("tenants", n))
        if not t or not t.ready:
            continue
        stages["create call"].append(t.created - t.sent)
        if t.finalizer:
            stages["created -> finalizer"].append(t.finalizer - t.created)
            if t.first_status:
                stages["finalizer -> first status"].append(t.first_status - t.finalizer)
        if t.first_status:
            stages["first status -> Ready"].append(t.ready - t.first_status)
    return {k: {"p50": percentile(v, 50), "p95": percentile(v, 95)} for k, v in stages.items() if v}


def sql_dict(c: SqlCounts, n: int) -> dict[str, Any]:
    return {
        "by_role_kind": {f"{r}:{k}": v for (r, k), v in sorted(c.by_role_kind.items())},
        "operator_statements": c.total("operator"), "tenant_statements": c.total("tenant"),
        "ddl": c.total("operator", "DDL") + c.total("tenant", "DDL"),
        "per_tenant_operator": round(c.total("operator") / n, 2) if n else None,
        "per_tenant_tenant_login": round(c.total("tenant") / n, 2) if n else None,
        "xacts": c.xacts, "xacts_per_tenant": round(c.xacts / n, 2) if n else None,
        "ddl_shapes": dict(c.ddl_texts.most_common(40)),
        "top_statements": dict(c.top.most_common(30)),
        "top_statements_ms": dict(c.top_ms.most_common(20)),
        "ddl_repeats": dict(c.ddl_repeats.most_common(20)),
        "evicted": c.evicted,
    }


def api_dict(d: Counter[tuple[str, str]], n: int) -> dict[str, Any]:
    kept = {k: c for k, c in d.items() if k[1] not in IGNORED_RESOURCES}
    by_verb: Counter[str] = Counter()
    for (verb, _), c in kept.items():
        by_verb[verb] += c
    w = writes(d)
    return {"by_verb": dict(by_verb.most_common()),
            "by_verb_resource": {f"{v} {r}": c for (v, r), c in sorted(kept.items(), key=lambda kv: -kv[1])},
            "writes": sum(w.values()), "writes_per_tenant": round(sum(w.values()) / n, 2) if n else None}


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.n: int = args.tenants
        self.run_id = uuid.uuid4().hex[:6]
        self.ns = f"bench-{self.run_id}"
        self.floor_ns = f"bench-floor-{self.run_id}"
        self.result: dict[str, Any] = {"tenants": self.n, "stack": stack.kind, "scenarios": {}}
        self.api = ApiServerMetrics(stack.kubeconfig)
        self.pg = PgMeter(stack.admin_dsn)
        # Logs and profiles outlive the stack (whose own directory is removed unless --keep).
        self.workdir = (Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "tenancy-bench-runs"
                        / f"{time.strftime('%Y%m%d-%H%M%S')}-n{self.n}-{self.run_id}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        whatif = {"BENCH_KOPF_IDLE_TIMEOUT": str(args.kopf_idle_timeout)} if args.kopf_idle_timeout is not None else {}
        self.operator = Operator(stack.kubeconfig, stack.operator_dsn, self.workdir, whatif)
        if whatif:
            self.result["what_if"] = (f"Kopf settings.queueing.idle_timeout = {args.kopf_idle_timeout} s"
                                      " (not the operator's setting)")
        self.kube: Kube
        self.names: list[str] = []
        self.converged = False

    # --- helpers -------------------------------------------------------------------------------------

    def meters_reset(self) -> Counter[tuple[str, str]]:
        self.pg.reset()
        return self.api.snapshot()

    def record(self, scenario: str, data: dict[str, Any]) -> None:
        data["load_before_after"] = data.get("load_before_after", "") or loadavg()
        self.result["scenarios"][scenario] = data
        log(f"{scenario}: {json.dumps(data, default=str)[:1500]}")

    async def settle_stats(self) -> None:
        await asyncio.sleep(STATS_FLUSH_SECONDS)  # measurement, not synchronisation: see STATS_FLUSH_SECONDS

    # --- floor ---------------------------------------------------------------------------------------

    async def floor(self) -> dict[str, Any]:
        log(f"floor: {self.n} tenants, no operator (namespace {self.floor_ns})")
        names, objs = objects_for("f", self.n)
        await self.kube.ensure_namespace(self.floor_ns)
        cm = template_cm()
        await self.kube.create(self.floor_ns, cm)
        floor = Floor(self.kube, self.stack.operator_dsn, self.floor_ns)
        await floor.setup(cm["data"])
        w = await Watcher(self.kube, self.floor_ns).start()
        load0 = loadavg()
        a0 = self.meters_reset()
        self.kube.requests.clear()
        started = time.monotonic()
        runner = asyncio.get_running_loop().create_task(floor.run(self.n + FLAGS))
        await apply_all(self.kube, self.floor_ns, objs, w, concurrency=self.args.apply_concurrency,
                        on_created=floor.on_created)
        try:
            await w.wait_for(lambda: self._all_ready(w, len(names)), self.timeout(), "floor Ready",
                         lambda: self._progress(w) + (f" errors={floor.stats.errors[:3]}"
                                                      if floor.stats.errors else ""))
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        seconds = all_ready_at(w) - started
        await w.stop()
        sql = self.pg.read()
        api_d = delta(self.api.snapshot(), a0)
        lat = latencies(w, names)
        data = {"seconds": seconds, "throughput_per_s": self.n / seconds, "latency": lat_summary(lat),
                "api": api_dict(api_d, self.n), "sql": sql_dict(sql, self.n), "errors": floor.stats.errors[:5],
                "load_before_after": f"{load0} -> {loadavg()}"}
        await floor.close()
        log(f"floor: {self.n} tenants Ready in {seconds:.1f}s; cleaning up")
        await self.kube.delete_namespace(self.floor_ns)
        await cleanup(self.stack.admin_dsn, self.floor_ns)
        return data

    # --- converge ------------------------------------------------------------------------------------

    def timeout(self) -> float:
        return max(600.0, self.n * 3.0)

    def _all_ready(self, w: Watcher, n: int) -> bool:
        return w.count("tenants") >= n and w.count("quotas") >= n and w.count("featureflags") >= FLAGS

    def _progress(self, w: Watcher) -> str:
        return (f"tenants {w.count('tenants')}/{self.n}, quotas {w.count('quotas')}/{self.n}, "
                f"flags {w.count('featureflags')}/{FLAGS}, operator load {loadavg()}")

    async def start_operator(self) -> None:
        await asyncio.to_thread(self.operator.start)

    async def converge(self) -> None:
        floor = await self.floor() if not self.args.no_floor else None
        self.names, objs = objects_for("t", self.n)
        await self.kube.ensure_namespace(self.ns)
        await self.kube.create(self.ns, template_cm())
        await self.start_operator()
        await self.wait_idle(time.monotonic(), min_tenants=0)  # start-up work (control schema, initial passes)
        w = await Watcher(self.kube, self.ns).start()
        self.watcher = w
        load0 = loadavg()
        a0 = self.meters_reset()
        cpu0 = self.operator.sample()
        sampler = Sampler(self.operator.pid).start()
        spy = prof.start(self.operator.pid, self.workdir / f"profile-{self.n}") if self.args.profile else None
        log(f"converge: applying {self.n} tenants + {self.n} quotas + {FLAGS} flags (namespace {self.ns})")
        started = time.monotonic()
        apply_seconds = await apply_all(self.kube, self.ns, objs, w, concurrency=self.args.apply_concurrency)
        log(f"converge: applied in {apply_seconds:.1f}s; waiting for Ready")
        progress: list[tuple[float, int, int]] = []

        pool_samples: list[dict[str, float]] = []

        async def track_progress() -> None:
            tick = 0
            while True:
                if tick % 5 == 0:
                    progress.append((round(time.monotonic() - started, 1), w.count("tenants"), w.count("quotas")))
                pool_samples.append(await asyncio.to_thread(self.pool_sample))
                tick += 1
                await asyncio.sleep(2)  # a pool sample every 2 s, a progress point every 10 s

        tracker = asyncio.get_running_loop().create_task(track_progress())
        cap = self.args.converge_timeout or self.timeout()
        try:
            await w.wait_for(lambda: self._all_ready(w, self.n), cap, "all Ready", lambda: self._progress(w))
            self.converged = True
        except TimeoutError:
            log(f"converge: NOT converged within {cap:.0f}s ({self._progress(w)}); recording what was reached")
        tracker.cancel()
        progress.append((round(time.monotonic() - started, 1), w.count("tenants"), w.count("quotas")))
        seconds = all_ready_at(w) - started if self.converged else math.inf
        elapsed = time.monotonic() - started
        cpu1 = self.operator.sample()
        profile = prof.stop(spy) if spy else None
        await sampler.stop()
        tenants_ready = (max(t.ready for (p, _), t in w.tracks.items() if p == "tenants") - started
                         if self.converged else math.inf)
        api_d = delta(self.api.snapshot(), a0)
        sql_now = self.pg.read()  # statements: exact at once
        await self.settle_stats()
        sql_now.xacts = self.pg.read().xacts
        lat = latencies(w, self.names)
        metrics = self.operator_metrics()
        ready_n = w.count("tenants", names=set(self.names))
        pool = {k: {"mean": round(sum(x.get(k, 0) for x in pool_samples) / max(1, len(pool_samples)), 2),
                    "max": max((x.get(k, 0) for x in pool_samples), default=0)}
                for k in ("pool_used", "pool_waiting", "migrations_running")}
        data: dict[str, Any] = {
            "converged": self.converged, "elapsed_seconds": elapsed, "tenants_ready": ready_n,
            "quotas_ready": w.count("quotas"), "progress_t_tenants_quotas": progress,
            "seconds": seconds, "tenants_ready_seconds": tenants_ready, "apply_seconds": apply_seconds,
            "throughput_per_s": self.n / seconds if self.converged else ready_n / elapsed,
            "latency": lat_summary(lat) if self.converged else {"p50": math.inf, "p95": math.inf, "p99": math.inf,
                                                                "max": math.inf, "of_ready_only": lat_summary(lat)},
            "stages": stage_summary(w, self.names),
            "modified_events_per_tenant": sum(t.modified for (p, _), t in w.tracks.items() if p == "tenants") / self.n,
            "cpu_seconds": cpu1.cpu_seconds - cpu0.cpu_seconds, "peak_rss_mb": cpu1.hwm_mb,
            "rss_mb_after": cpu1.rss_mb, "api": api_dict(api_d, self.n), "sql": sql_dict(sql_now, self.n),
            "operator_metrics": metrics, "load_before_after": f"{load0} -> {loadavg()}",
            "pool_and_migration_slots": pool,
            "log_lines": dict(self.operator.log_counts()),
        }
        if floor is not None:
            data["floor"] = floor
            # Not converged: at most the floor's time over the time waited.
            data["floor_ratio"] = floor["seconds"] / (seconds if self.converged else elapsed)
        if profile is not None:
            data["profile"] = profile
        self.record("converge", data)

    def pool_sample(self) -> dict[str, float]:
        """Pool use and running migrations (the liveness probe refreshes the pool gauges)."""
        self.operator.healthy()
        try:
            return {"pool_used": self.operator.metric("db_pool_connections", state="used"),
                    "pool_waiting": self.operator.metric("db_pool_connections", state="waiting"),
                    "migrations_running": self.operator.metric("lifecycle_jobs_running", job_kind="migrate")}
        except OSError:
            return {}

    def operator_metrics(self) -> dict[str, float]:
        try:
            s = self.operator.scrape()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for (name, labels), v in s.items():
            if name in ("reconcile_total", "lifecycle_jobs_total", "reconcile_failures_total"):
                key = name + "{" + ",".join(f"{k}={val}" for k, val in labels) + "}"
                out[key] = v
        return out

    async def wait_idle(self, since: float, *, min_tenants: int, within: float | None = None) -> float:
        """Monotonic time when the operator went quiet: all resumed and < 3 % CPU for IDLE_WINDOW s."""
        timeout = within or self.timeout()
        deadline = time.monotonic() + timeout
        samples: list[tuple[float, float]] = []
        while True:
            s = self.operator.sample()
            samples.append((s.t, s.cpu_seconds))
            resumed = self.operator.metric("reconcile_total", kind="Tenant") if min_tenants else 0
            window = [x for x in samples if x[0] >= s.t - IDLE_WINDOW]
            if (resumed >= min_tenants and s.t - since >= IDLE_WINDOW and window[0][0] <= s.t - IDLE_WINDOW + 0.3
                    and (window[-1][1] - window[0][1]) <= IDLE_CPU_FRACTION * (window[-1][0] - window[0][0])):
                return window[0][0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not idle within {timeout:.0f}s (resumed {resumed}/{min_tenants})")
            await asyncio.sleep(0.25)  # sampling interval

    # --- restart -------------------------------------------------------------------------------------

    async def restart(self) -> None:
        """Resync after a restart: done when the operator is idle with every object of the run
        counted as reconciled (bench.common.resumed: one found in sync counts too)."""
        log("restart: stopping the operator")
        await asyncio.to_thread(self.operator.stop)
        load0 = loadavg()
        a0 = self.meters_reset()
        t0 = time.monotonic()
        await self.start_operator()
        healthy = time.monotonic() - t0
        spy = prof.start(self.operator.pid, self.workdir / f"profile-restart-{self.n}") if self.args.profile else None
        # Tenants and FeatureFlags have resume handlers, each counted; Quotas are checked by the
        # quota service's start-up pass over all tenants (its duration metric counts it). The
        # counts are read once the operator is quiet: serving its metrics takes it CPU.
        total = self.n + FLAGS
        deadline = time.monotonic() + self.timeout()
        since = t0
        while True:
            idle = await self.wait_idle(since, min_tenants=0, within=max(1.0, deadline - time.monotonic()))
            text = await asyncio.to_thread(self.operator.metrics_text)
            if resumed(text) >= total and text_sum(text, "quota_pass_duration_seconds_count") >= 1:
                break
            since = time.monotonic()
        cpu_idle = self.operator.sample().cpu_seconds
        profile = prof.stop(spy) if spy else None
        log(f"restart: idle {idle - t0:.1f}s after start with all {total} Tenants and FeatureFlags resumed "
            "and the Quotas' start-up pass done")
        api_d = delta(self.api.snapshot(), a0)
        sql = self.pg.read()
        await self.settle_stats()
        sql.xacts = self.pg.read().xacts
        w = writes(api_d)
        status_writes = sum(c for (v, r), c in w.items() if r.endswith("/status"))
        data = {"seconds_to_idle": idle - t0, "seconds_to_healthy": healthy,
                "objects_resumed": total, "cpu_seconds_to_idle": cpu_idle,
                "ddl": sql_dict(sql, self.n)["ddl"], "api_writes": sum(w.values()), "status_writes": status_writes,
                "api": api_dict(api_d, self.n), "sql": sql_dict(sql, self.n),
                "rss_mb": self.operator.sample().rss_mb, "load_before_after": f"{load0} -> {loadavg()}"}
        if profile is not None:
            data["profile"] = profile
        self.record("restart", data)

    # --- idle ----------------------------------------------------------------------------------------

    async def idle(self) -> None:
        seconds = float(self.args.idle_seconds)
        log(f"idle: measuring the operator for {seconds:.0f}s")
        load0 = loadavg()
        a0 = self.meters_reset()
        s0 = self.operator.sample()
        sampler = Sampler(self.operator.pid, 1.0).start()
        await asyncio.sleep(seconds)  # the measurement window itself
        await sampler.stop()
        s1 = self.operator.sample()
        api_d = delta(self.api.snapshot(), a0)
        sql = self.pg.read()
        cpu = s1.cpu_seconds - s0.cpu_seconds
        data = {"seconds": s1.t - s0.t, "cpu_seconds": cpu, "cpu_percent": 100 * cpu / (s1.t - s0.t),
                "rss_mb": s1.rss_mb, "rss_mb_max": sampler.peak_rss_mb, "peak_rss_mb_since_start": s1.hwm_mb,
                "api": api_dict(api_d, self.n), "sql": sql_dict(sql, self.n),
                "load_before_after": f"{load0} -> {loadavg()}"}
        self.record("idle", data)

    # --- fleet migration ------------------------------------------------------------------------------

    async def fleet(self) -> None:
        w = self.watcher
        target = "0002_bench"
        reached: dict[str, float] = {}

        def hook(plural: str, obj: dict[str, Any], now: float) -> None:
            if plural == "tenants" and (obj.get("status") or {}).get("schemaVersion") == target:
                reached.setdefault(obj["metadata"]["name"], now)

        w.hooks.append(hook)
        load0 = loadavg()
        a0 = self.meters_reset()
        cpu0 = self.operator.sample().cpu_seconds
        cm = template_cm(versions=2)
        log(f"fleet: adding migration {target} to the template of {self.n} tenants")
        t0 = time.monotonic()
        await self.kube.replace_configmap(self.ns, cm)
        await w.wait_for(lambda: len(reached) >= self.n, self.timeout(), "all tenants at " + target,
                     lambda: f"{len(reached)}/{self.n} at {target}")
        seconds = max(reached.values()) - t0
        api_d = delta(self.api.snapshot(), a0)
        sql = self.pg.read()
        with psycopg.connect(self.stack.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM tenancy.tenant_migrations m JOIN tenancy.tenants t"
                               " ON t.id = m.tenant_id WHERE t.namespace = %s AND m.version = %s",
                               [self.ns, target]).fetchone()
        in_pg = int(row[0]) if row else 0
        lat = sorted(v - t0 for v in reached.values())
        data = {"seconds": seconds, "tenants_migrated_in_postgres": in_pg, "latency": lat_summary(lat),
                "cpu_seconds": self.operator.sample().cpu_seconds - cpu0,
                "api": api_dict(api_d, self.n), "sql": sql_dict(sql, self.n),
                "load_before_after": f"{load0} -> {loadavg()}"}
        w.hooks.remove(hook)
        self.record("fleet", data)

    # --- flag propagation -----------------------------------------------------------------------------

    async def flags(self) -> None:
        edits = int(self.args.flag_edits)
        # Each scenario starts from a quiet operator: the fleet migration before leaves Kopf
        # digesting a thousand status events for some seconds, which is not what this measures.
        t_wait = time.monotonic()
        try:
            settled: float | None = await self.wait_idle(t_wait, min_tenants=0, within=60) - t_wait
        except TimeoutError:
            settled = None
        log(f"flags: {edits} FeatureFlag edits, time to the rows in PostgreSQL "
            f"(operator quiet after {settled if settled is None else round(settled, 1)}s)")
        load0 = loadavg()
        lats: list[float] = []
        failures = 0
        async with await psycopg.AsyncConnection.connect(self.stack.admin_dsn, autocommit=True) as conn:
            for i in range(edits):
                name = f"bench-flag-{i % FLAGS}"
                pct = 26 + i  # a new value each edit
                t0 = time.monotonic()
                obj = await self.kube.patch(self.ns, "featureflags", name, {"spec": {"rollout": {"percentage": pct}}})
                gen = int(obj["metadata"]["generation"])
                deadline = t0 + 30
                while True:
                    cur = await conn.execute(
                        "SELECT generation, rollout_percentage FROM tenancy.feature_flags"
                        " WHERE namespace = %s AND flag_key = %s AND level = 'global'", [self.ns, name])
                    row = await cur.fetchone()
                    if row and int(row[0]) >= gen and int(row[1]) == pct:
                        lats.append(time.monotonic() - t0)
                        break
                    if time.monotonic() > deadline:
                        failures += 1
                        break
                    await asyncio.sleep(0.005)  # polling the table: the measurement's resolution
        data = {"edits": edits, "latency": lat_summary(lats), "not_propagated_within_30s": failures,
                "waited_for_quiet_seconds": settled,
                "values": [round(x, 3) for x in lats],
                "load_before_after": f"{load0} -> {loadavg()}"}
        self.record("flags", data)

    # --- run ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.kube = await Kube.connect(self.stack.kubeconfig)
        try:
            scenarios = self.args.scenarios
            if "converge" in scenarios:
                await self.converge()
            else:
                raise SystemExit("every scenario needs the converge scenario first (same invocation)")
            for name in ("restart", "idle", "fleet", "flags"):
                if name in scenarios and not self.converged:
                    self.result["scenarios"][name] = {"error": "skipped: the converge scenario did not finish"}
                elif name in scenarios:
                    try:
                        await getattr(self, name)()
                    except Exception as exc:
                        log(f"{name} failed: {type(exc).__name__}: {exc}")
                        self.result["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.result["operator_log"] = str(self.operator.log_path)
        finally:
            if self.stack.kind == "dev" and not self.args.keep:
                await self.cleanup_dev()
            await asyncio.to_thread(self.operator.stop)
            await self.kube.close()

    async def cleanup_dev(self) -> None:
        """The dev stack outlives the run: delete what it created (the operator drops schemas and roles)."""
        log(f"cleaning up namespace {self.ns} (the operator deletes {self.n} tenants)")
        with contextlib.suppress(Exception):
            if not self.operator.alive():
                await self.start_operator()
            await self.kube.delete_namespace(self.ns, within=max(600.0, self.n * 1.0))


def summary_line(r: dict[str, Any]) -> str:
    c = r["scenarios"].get("converge", {})
    ratio = c.get("floor_ratio", math.nan)
    return (f"converge tenants={r['tenants']} seconds={c.get('seconds', math.nan):.2f} floor_ratio={ratio:.3f} "
            f"p95_seconds={c.get('latency', {}).get('p95', math.nan):.2f} rss_mb={c.get('peak_rss_mb', math.nan):.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/converge", description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", "-n", type=int, default=1000)
    p.add_argument("--scenario", default=",".join(SCENARIOS),
                   help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--stack", choices=("own", "dev"), default="own",
                   help="own: a fresh temporary stack (default); dev: the stack `make dev-up` started")
    p.add_argument("--no-floor", action="store_true", help="skip the floor run (no floor_ratio)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the operator during the converge and, from healthy to resumed, the restart")
    p.add_argument("--apply-concurrency", type=int, default=16, help="create requests in flight while applying")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--converge-timeout", type=float, default=0.0,
                   help="seconds to wait for all Ready (default: max(600, 3 s per tenant)); what was reached is "
                        "recorded and the later scenarios are skipped")
    p.add_argument("--flag-edits", type=int, default=40)
    p.add_argument("--kopf-idle-timeout", type=float, default=None,
                   help="what-if: the operator with Kopf's queueing.idle_timeout changed (bench/operator_whatif.py)")
    p.add_argument("--label", default="", help="names the run in its record and docs heading, e.g. before / after")
    p.add_argument("--docs", default=str(ROOT / "docs/benchmarks.md"), help="markdown file to update ('' for none)")
    p.add_argument("--workdir", default="", help="where logs and profiles go (default: in the stack's workdir)")
    p.add_argument("--keep", action="store_true", help="keep the stack's workdir (own) / the tenants (dev)")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    command = "bench/converge " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    signal.signal(signal.SIGTERM, _interrupt)  # results written, stack stopped: as on Ctrl-C
    log(f"starting the {args.stack} stack")
    stack = Stack.own() if args.stack == "own" else Stack.dev()
    bench = Bench(args, stack)
    try:
        bench.result.update({
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "label": args.label,
            "machine": machine(), "versions": stack.versions(), "notes": stack.notes,
            "operator_env": {k: v for k, v in os.environ.items() if k.startswith("TENANCY_")},
            "git": _git(),
        })
        asyncio.run(bench.run())
    finally:
        bench.result["workdir"] = str(bench.workdir)
        results = ROOT / "bench/results"
        results.mkdir(exist_ok=True)
        out = results / f"converge-{args.stack}-{args.tenants}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(bench.result, indent=2, default=str) + "\n")
        log(f"results: {out}")
        stack.close(keep=args.keep)
        if args.keep:
            log(f"stack workdir kept: {stack.workdir}")
    if args.docs:
        from bench.report import update_docs

        update_docs(Path(args.docs), bench.result)
    print(json.dumps(bench.result["scenarios"], indent=1, default=str)[:200000],
          file=sys.stderr)
    print(summary_line(bench.result), flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _git() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())

