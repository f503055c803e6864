"""Scale benchmark: N Tenants (a Quota each, 10 FeatureFlags) against 1, 2, 4... sharded replicas.

    bench/scale --tenants 10000 --replicas 1,2,4
    bench/scale --tenants 1000 --replicas 1,2 --no-floor

The floor (bench/floor.py: the same writes without an operator) runs once, on the first stack.
Each replica count then gets a fresh stack (control plane and PostgreSQL of its own) and:

- converge: R replicas with TENANCY_SHARDING=true split the slices (Leases; one replica runs
  unsharded, as the chart's default deployment does), everything is applied
  at once, time until every object is Ready; each replica's peak RSS and CPU seconds; the DDL
  statements counted by pg_stat_statements beyond the floor's (``duplicate_ddl``). With R > 1 one
  replica is SIGKILLed once half the Tenants are Ready: ``handover_seconds`` runs from the kill to
  the first Tenant of its slices (not Ready then) that becomes Ready, provisioned by another
  replica (the one its Provisioned Event names).
- restart: every replica stopped and started again with the fleet converged; time until all are
  idle with every object resumed, the DDL statements and API writes meanwhile.

Prints one line per replica count and writes a JSON record to bench/results/:

    scale tenants=N replicas=R seconds=S floor_ratio=X max_replica_rss_mb=M max_replica_cpu_s=C
          handover_seconds=H duplicate_ddl=D restart_seconds=T restart_ddl=E restart_writes=W
          converged_rss_mb=A restart_rss_mb=B empty_rss_mb=E half_cpu_s=P half_rss_mb=Q

(``max_replica_rss_mb`` is the largest replica's peak; the last two its RSS once converged and once
idle after the restart: what it holds for its tenants; ``empty_rss_mb`` its RSS before any object existed;
``half_cpu_s`` and ``half_rss_mb`` the largest replica's CPU seconds and peak RSS until half the
Tenants were Ready, before the kill.) With a one-replica run in the same invocation, one line per
other count then compares its largest replica with that one (``limit`` is 1.2/R):

    share replicas=R limit=L cpu=C peak_rss=M half_cpu=P half_peak_rss=Q

``--restart-trees A,B,A,B`` then restarts the converged fleet once more per tree given, the
replicas importing the operator from that checkout's ``operator/`` (e.g. a ``git worktree`` of an
older commit): restarts of two commits, interleaved on one fleet in one hour, compare on a machine
whose speed varies from hour to hour, where restarts of separate runs do not. One line each, and
``restarts`` in the record (``cpu_s``: the replicas' CPU seconds from their start to idle):

    restart tree=PATH commit=C seconds=T cpu_s=U ddl=E writes=W rss_mb=B

``--malloc-stats`` adds, per replica, what its allocators hold when empty, converged and restarted
(bench/operator_whatif.py), one line each and in the record:

    malloc at=LABEL replica=NAME pymalloc_arenas=A pymalloc_used_mb=U pymalloc_free_mb=F
           glibc_in_use_mb=G glibc_free_mb=H cpu_s=C gc_s=G gc_full_s=F gc_collections=K

(``cpu_s`` and ``gc_s``: the replica's CPU seconds and the garbage collector's part of them since it
started, ``gc_full_s`` the part in full collections; ``--gc-defaults`` runs the replicas with
CPython's collector settings, for comparison.)

``--profile`` records the first replica with py-spy (bench/profile.py) from the start of the
creation until half the Tenants are Ready, the window of the shares: ``half_way.profile`` in the
record (busy share, CPU by library and by owner, hottest functions), the flame graph beside it;
and again through the restart, from the replica's start (once it answers its health check) until
idle: ``restart.profile``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from bench import profile as prof
from bench.common import (
    ROOT,
    ApiServerMetrics,
    Operator,
    PgMeter,
    Sampler,
    Stack,
    delta,
    format_requests,
    git_describe,
    log,
    machine,
    operator_python,
    resumed,
    template_cm,
    text_sum,
    writes,
)
from bench.converge import FLAGS, IDLE_CPU_FRACTION, IDLE_WINDOW, Bench, all_ready_at, objects_for
from bench.kube import Kube, Watcher, apply_all
from tenancy_devenv.stack import OPERATOR_PYTHON_FLAGS
from tenancy_operator.shards import Slices

GROUP_NAME = "tenancy-operator"


class Replicas:
    """R operator processes sharing the fleet, each as users run it: TENANCY_SHARDING=true, or one
    replica unsharded (a sharded replica holding every slice labels each Quota for the others)."""

    def __init__(self, stack: Stack, workdir: Path, count: int, slices: int, lease_seconds: int,
                 trace_memory: bool = False, malloc_stats: bool = False, gc_defaults: bool = False) -> None:
        self.stack, self.slices, self.lease_seconds = stack, slices, lease_seconds
        self.operators: dict[str, Operator] = {}
        for i in range(count):
            identity = f"replica-{i}"
            wd = workdir / identity
            wd.mkdir(parents=True, exist_ok=True)
            sharding = {
                "TENANCY_SHARDING": "true", "TENANCY_SHARD_SLICES": str(slices),
                "TENANCY_SHARD_LEASE_SECONDS": str(lease_seconds), "TENANCY_SHARD_NAMESPACE": "default",
            } if count > 1 else {}
            self.operators[identity] = Operator(stack.kubeconfig, stack.operator_dsn, wd, {
                **sharding, "POD_NAME": identity,
                **({"BENCH_TRACEMALLOC": str(wd / "memory.txt")} if trace_memory else {}),
                **({"BENCH_MALLOC_STATS": str(wd / "malloc.json")} if malloc_stats else {}),
                **({"BENCH_GC_DEFAULTS": "1"} if gc_defaults else {}),
            })
        self.malloc: dict[str, dict[str, dict[str, float]]] = {}
        """With --malloc-stats: label -> replica -> the allocators' figures (bench/operator_whatif)."""

    def live(self) -> dict[str, Operator]:
        return {k: o for k, o in self.operators.items() if o.alive()}

    async def start(self) -> None:
        for operator in self.operators.values():
            await asyncio.to_thread(operator.start, 120.0)
        await self.wait_split()

    async def wait_split(self, within: float = 120.0) -> None:
        """Until the live replicas hold every slice between them, each its share."""
        if len(self.operators) == 1:
            return  # unsharded
        deadline = time.monotonic() + within
        while True:
            held = {k: o.metric("shard_slices_held") for k, o in self.live().items()}
            if sum(held.values()) == self.slices and min(held.values()) >= self.slices // len(held):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"slices not split within {within:.0f}s: {held}")
            await asyncio.sleep(0.5)  # polling the replicas' metrics

    async def stop(self) -> None:
        for operator in self.operators.values():
            await asyncio.to_thread(operator.stop)

    async def idle(self, within: float) -> float:
        """Until every live replica has been idle (CPU below IDLE_CPU_FRACTION) for IDLE_WINDOW
        seconds; returns when that window began. Raises TimeoutError after ``within`` seconds."""
        t0 = time.monotonic()
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in self.live()}
        while True:
            quiet = True
            for k, o in self.live().items():
                s = o.sample()
                samples[k].append((s.t, s.cpu_seconds))
                window = [x for x in samples[k] if x[0] >= s.t - IDLE_WINDOW]
                busy = window[-1][1] - window[0][1] > IDLE_CPU_FRACTION * (window[-1][0] - window[0][0])
                quiet = quiet and s.t - t0 >= IDLE_WINDOW and window[0][0] <= s.t - IDLE_WINDOW + 0.3 and not busy
            if quiet and await self.drained():
                return min(v[-1][0] for v in samples.values()) - IDLE_WINDOW
            if time.monotonic() - t0 > within:
                raise TimeoutError(f"replicas not idle within {within:.0f}s")
            await asyncio.sleep(0.25)  # sampling interval

    async def drained(self, resumed_at_least: int = 0) -> bool:
        """No live replica has work outstanding (queue_depth 0 for every kind): a replica's CPU can
        be quiet while the quota service still has a Quota to apply. And the live replicas together
        counted at least ``resumed_at_least`` Tenants and FeatureFlags (bench.common.resumed)."""
        texts = [await asyncio.to_thread(o.metrics_text) for o in self.live().values()]
        return not any(text_sum(t, "queue_depth") for t in texts) and sum(map(resumed, texts)) >= resumed_at_least

    def rss_mb(self) -> dict[str, float]:
        """Each live replica's RSS now (what it holds, not its peak)."""
        return {k: o.sample().rss_mb for k, o in self.live().items()}

    async def trace(self, label: str) -> None:
        """With --trace-memory, each live replica writes its live allocations to
        <workdir>/memory-<label>.txt; with --malloc-stats, its allocators' figures are kept under
        ``label`` in self.malloc (and <workdir>/malloc-<label>.json)."""
        for identity, operator in self.live().items():
            for variable, name in (("BENCH_TRACEMALLOC", "memory.txt"), ("BENCH_MALLOC_STATS", "malloc.json")):
                out = operator.workdir / name
                if operator.env().get(variable) != str(out):
                    continue
                request = out.with_name(f"{name}.request")
                request.touch()
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    if not request.exists():
                        break
                    await asyncio.sleep(0.5)  # polling for the dump to be written
                target = out.with_name(f"{out.stem}-{label}{out.suffix}")
                out.replace(target)
                if variable == "BENCH_MALLOC_STATS":
                    self.malloc.setdefault(label, {})[identity] = json.loads(target.read_text())
                log(f"scale: {name} ({label}): {target}")


async def holders(kube: Kube) -> dict[int, str]:
    leases = await client.CoordinationV1Api(kube.api).list_namespaced_lease(
        "default", label_selector=f"tenancy.dev/shard-group={GROUP_NAME},tenancy.dev/shard-lease=slice")
    return {int(lease.metadata.name.rsplit("-", 1)[1]): lease.spec.holder_identity
            for lease in leases.items if lease.spec.holder_identity}


async def provisioned_by(kube: Kube, namespace: str) -> dict[str, str]:
    """Tenant uid -> the replica that posted its Provisioned Event (reportingInstance)."""
    events = await client.CoreV1Api(kube.api).list_namespaced_event(namespace, field_selector="reason=Provisioned")
    return {e.involved_object.uid: e.reporting_instance for e in events.items if e.reporting_instance}


class Scale:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n: int = args.tenants
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "tenancy-bench-runs"
        self.workdir = base / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.result: dict[str, Any] = {"tenants": self.n, "runs": []}
        self.floor: dict[str, Any] | None = None
        self.trees = [Path(t).resolve() for t in args.restart_trees.split(",") if t.strip()]
        for tree in self.trees:  # compiled once now, not within a measured start
            compile_tree = [*OPERATOR_PYTHON_FLAGS, "-m", "compileall", "-q", str(tree / "operator")]
            subprocess.run([operator_python(), *compile_tree], check=True)

    async def run_floor(self, stack: Stack) -> None:
        bench = Bench(argparse.Namespace(tenants=self.n, apply_concurrency=self.args.apply_concurrency,
                                         workdir=str(self.workdir / "floor"), kopf_idle_timeout=None), stack)
        bench.kube = await Kube.connect(stack.kubeconfig)
        try:
            self.floor = await bench.floor()
        finally:
            await bench.kube.close()

    async def one(self, stack: Stack, replicas: int) -> dict[str, Any]:
        kube = await Kube.connect(stack.kubeconfig)
        api, pg = ApiServerMetrics(stack.kubeconfig), PgMeter(stack.admin_dsn)
        fleet = Replicas(stack, self.workdir / f"r{replicas}", replicas, self.args.slices, self.args.lease_seconds,
                         self.args.trace_memory, self.args.malloc_stats, self.args.gc_defaults)
        ns = f"scale-{replicas}"
        _, objs = objects_for("t", self.n)
        try:
            await kube.ensure_namespace(ns)
            await kube.create(ns, template_cm())
            await fleet.start()
            start_rss = fleet.rss_mb()
            await fleet.trace("empty")
            w = await Watcher(kube, ns).start()
            samplers = {k: Sampler(o.pid).start() for k, o in fleet.operators.items()}
            cpu0 = {k: o.sample().cpu_seconds for k, o in fleet.operators.items()}
            pg.reset()
            log(f"scale: {replicas} replica(s), applying {self.n} tenants + quotas + {FLAGS} flags")
            first = next(iter(fleet.operators.values()))
            spy = prof.start(first.pid, self.workdir / f"profile-half-r{replicas}") if self.args.profile else None
            started = time.monotonic()
            half_way: dict[str, Any] = {}

            def at_half() -> None:
                half_way.update(cpu_s={k: o.sample().cpu_seconds - cpu0[k] for k, o in fleet.live().items()},
                                peak_rss_mb={k: s.peak_rss_mb for k, s in samplers.items()})
                if spy is not None:
                    prof.interrupt(spy)  # the recording ends here; read after the converge

            kill = asyncio.get_running_loop().create_task(self.at_half(kube, fleet, w, at_half))
            await apply_all(kube, ns, objs, w, concurrency=self.args.apply_concurrency)
            await w.wait_for(lambda: w.count("tenants") >= self.n and w.count("quotas") >= self.n
                             and w.count("featureflags") >= FLAGS, max(900.0, self.n * 0.5), "all Ready",
                             lambda: f"tenants {w.count('tenants')}/{self.n}")
            seconds = all_ready_at(w) - started
            killed = await kill
            if spy is not None:
                half_way["profile"] = await asyncio.to_thread(prof.stop, spy)
            # Work a replica finishes after Ready (a Quota's limits reach the role, the Tenant's
            # effectiveLimits) counts too: the DDL is read once the replicas are idle.
            await fleet.idle(max(300.0, self.n * 0.1))
            cpu = {k: o.sample().cpu_seconds - cpu0[k] if o.alive() else math.nan for k, o in fleet.operators.items()}
            for s in samplers.values():
                await s.stop()
            rss = {k: s.peak_rss_mb for k, s in samplers.items()}
            sql = pg.read()
            ddl = sql.total("operator", "DDL") + sql.total("tenant", "DDL")
            floor_ddl = (self.floor or {}).get("sql", {}).get("ddl")
            if sql.evicted or (self.floor or {}).get("sql", {}).get("evicted"):
                # A count that lost entries says nothing about duplicates.
                log(f"scale: pg_stat_statements evicted entries (run {sql.evicted}, floor "
                    f"{(self.floor or {}).get('sql', {}).get('evicted')}): duplicate_ddl unknown")
                floor_ddl = None
            handover = math.nan
            if killed is not None:
                at, victim, slices = killed
                cut = Slices(self.args.slices)
                # Served by another replica: its Provisioned Event names it (a Ready the victim's
                # last request brought after the kill does not count).
                by = await provisioned_by(kube, ns)
                after = [t.ready for (p, _), t in w.tracks.items()
                         if p == "tenants" and t.ready > at and cut.slice_of(t.uid) in slices
                         and by.get(t.uid) not in (None, victim)]
                handover = min(after) - at if after else math.nan
            await w.stop()
            converged_rss = fleet.rss_mb()
            await fleet.trace("converged")
            restart = await self.restart(fleet, api, pg, profile=self.args.profile)
            restarts = [await self.restart_from(tree, fleet, api, pg) for tree in self.trees]
            data = {
                "replicas": replicas, "seconds": seconds,
                "floor_ratio": (self.floor["seconds"] / seconds) if self.floor else math.nan,
                "replica_peak_rss_mb": rss, "replica_cpu_seconds": cpu, "replica_converged_rss_mb": converged_rss,
                "replica_start_rss_mb": start_rss,
                "max_replica_rss_mb": max(rss.values()), "max_replica_cpu_s": max(v for v in cpu.values()
                                                                                  if not math.isnan(v)),
                "half_way": half_way,
                "killed": killed[1] if killed else None, "handover_seconds": handover,
                "ddl": ddl, "floor_ddl": floor_ddl, "ddl_shapes": dict(sql.ddl_texts.most_common(40)),
                "ddl_repeats": dict(sql.ddl_repeats.most_common(20)), "statements_evicted": sql.evicted,
                "duplicate_ddl": ddl - floor_ddl if floor_ddl is not None else math.nan,
                "restart": restart,
                **({"restarts": restarts} if restarts else {}),
                **({"malloc": fleet.malloc} if fleet.malloc else {}),
            }
            self.result["runs"].append(data)
            print(line(self.n, data), flush=True)
            for text in malloc_lines(fleet.malloc):
                print(text, flush=True)
            return data
        finally:
            await fleet.stop()
            await kube.close()

    async def at_half(self, kube: Kube, fleet: Replicas, w: Watcher,
                      measure: Callable[[], None]) -> tuple[float, str, set[int]] | None:
        """Once half the Tenants are Ready: ``measure`` (each replica's CPU and peak RSS so far, the
        share each carried while all replicas were there), then, with several replicas, SIGKILL
        the last one; (when, who, its slices) of the kill."""
        await w.wait_for(lambda: w.count("tenants") >= self.n // 2, max(900.0, self.n * 0.5), "half Ready",
                         lambda: f"tenants {w.count('tenants')}/{self.n}")
        measure()
        if len(fleet.operators) == 1:
            return None
        victim = list(fleet.operators)[-1]
        slices = {i for i, h in (await holders(kube)).items() if h == victim}
        operator = fleet.operators[victim]
        assert operator.proc is not None
        operator.proc.send_signal(signal.SIGKILL)
        at = time.monotonic()
        operator.proc.wait()
        log(f"scale: {victim} killed at {w.count('tenants')}/{self.n} Ready (it held slices {sorted(slices)})")
        return at, victim, slices

    async def restart_from(self, tree: Path, fleet: Replicas, api: ApiServerMetrics, pg: PgMeter) -> dict[str, Any]:
        """``restart`` with every replica importing the operator from ``tree``."""
        for o in fleet.operators.values():
            o.extra_env["PYTHONPATH"] = str(tree / "operator")
        try:
            data = {"tree": str(tree), "commit": git_describe(tree), **await self.restart(fleet, api, pg)}
        finally:
            for o in fleet.operators.values():
                o.extra_env.pop("PYTHONPATH", None)
        print(f"restart tree={data['tree']} commit={data['commit']} seconds={data.get('seconds', math.nan):.1f} "
              f"cpu_s={data.get('cpu_seconds', math.nan):.1f} ddl={data.get('ddl')} writes={data.get('writes')} "
              f"rss_mb={max((data.get('replica_rss_mb') or {'-': math.nan}).values()):.0f}", flush=True)
        return data

    async def restart(self, fleet: Replicas, api: ApiServerMetrics, pg: PgMeter,
                      profile: bool = False) -> dict[str, Any]:
        """Stop every replica, start them all again; until all are idle with every object resumed.
        ``profile``: py-spy on the first replica from its start until idle (``profile`` in the record)."""
        await fleet.stop()
        pg.reset()
        a0 = api.snapshot()
        t0 = time.monotonic()
        await fleet.start()
        first = next(iter(fleet.operators.values()))
        spy = prof.start(first.pid, self.workdir / f"profile-restart-r{len(fleet.operators)}") if profile else None
        deadline = t0 + max(600.0, self.n * 0.2)
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fleet.operators}
        while True:
            quiet = True
            for k, o in fleet.operators.items():
                s = o.sample()
                samples[k].append((s.t, s.cpu_seconds))
                window = [x for x in samples[k] if x[0] >= s.t - IDLE_WINDOW]
                busy = window[-1][1] - window[0][1] > IDLE_CPU_FRACTION * (window[-1][0] - window[0][0])
                quiet = quiet and s.t - t0 >= IDLE_WINDOW and window[0][0] <= s.t - IDLE_WINDOW + 0.3 and not busy
            if quiet and await fleet.drained(resumed_at_least=self.n + FLAGS):
                idle = min(samples[k][-1][0] for k in samples) - IDLE_WINDOW
                break
            if time.monotonic() > deadline:
                if spy is not None:
                    prof.stop(spy)
                return {"error": f"not idle with every object resumed within {deadline - t0:.0f}s"}
            await asyncio.sleep(0.25)  # sampling interval
        cpu = sum(v[-1][1] for v in samples.values())  # sampled before drained(): serving metrics takes CPU
        recorded = {"profile": await asyncio.to_thread(prof.stop, spy)} if spy is not None else {}
        sql = pg.read()
        rss = fleet.rss_mb()
        written = writes(delta(api.snapshot(), a0))
        await fleet.trace("restarted")
        return {"seconds": idle - t0, "cpu_seconds": cpu, "replica_rss_mb": rss,
                "ddl": sql.total("operator", "DDL") + sql.total("tenant", "DDL"),
                "writes": sum(written.values()), "write_requests": format_requests(written), **recorded}


def line(n: int, d: dict[str, Any]) -> str:
    r, h = d["restart"], d["half_way"]
    return (f"scale tenants={n} replicas={d['replicas']} seconds={d['seconds']:.1f} floor_ratio={d['floor_ratio']:.3f} "
            f"max_replica_rss_mb={d['max_replica_rss_mb']:.0f} max_replica_cpu_s={d['max_replica_cpu_s']:.1f} "
            f"handover_seconds={d['handover_seconds']:.1f} duplicate_ddl={d['duplicate_ddl']} "
            f"restart_seconds={r.get('seconds', math.nan):.1f} restart_ddl={r.get('ddl')} "
            f"restart_writes={r.get('writes')} "
            f"converged_rss_mb={max(d['replica_converged_rss_mb'].values()):.0f} "
            f"restart_rss_mb={max((r.get('replica_rss_mb') or {'-': math.nan}).values()):.0f} "
            f"empty_rss_mb={max(d['replica_start_rss_mb'].values()):.0f} "
            f"half_cpu_s={max(h['cpu_s'].values()):.1f} half_rss_mb={max(h['peak_rss_mb'].values()):.0f}")


def share_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Each run's largest replica beside the one-replica run of the same invocation: over the whole
    converge (the survivors of the kill do the dead replica's part too) and up to half Ready (all
    replicas there, before the kill)."""
    one = next((r for r in runs if r["replicas"] == 1), None)
    if one is None:
        return []
    lines = []
    for r in runs:
        if r["replicas"] == 1:
            continue
        h, h1 = r["half_way"], one["half_way"]
        lines.append(
            f"share replicas={r['replicas']} limit={1.2 / r['replicas']:.2f} "
            f"cpu={r['max_replica_cpu_s'] / one['max_replica_cpu_s']:.2f} "
            f"peak_rss={r['max_replica_rss_mb'] / one['max_replica_rss_mb']:.2f} "
            f"half_cpu={max(h['cpu_s'].values()) / max(h1['cpu_s'].values()):.2f} "
            f"half_peak_rss={max(h['peak_rss_mb'].values()) / max(h1['peak_rss_mb'].values()):.2f}")
    return lines


def malloc_lines(malloc: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per moment and replica (MB): CPython's arenas and the bytes in used and in free
    blocks (free pools included); glibc's heap in use and free; the process's CPU seconds and the
    cyclic garbage collector's share of them, since the process started."""
    lines = []
    for label, replicas in malloc.items():
        for replica, f in sorted(replicas.items()):
            mb = {k: v / 2**20 for k, v in f.items() if isinstance(v, (int, float))}  # not the census
            free = mb.get("pymalloc_available_blocks_bytes", 0) + mb.get("pymalloc_unused_pools_bytes", 0)
            lines.append(f"malloc at={label} replica={replica} pymalloc_arenas={f.get('pymalloc_arenas')} "
                         f"pymalloc_used_mb={mb.get('pymalloc_allocated_blocks_bytes', 0):.1f} "
                         f"pymalloc_free_mb={free:.1f} glibc_in_use_mb={mb.get('glibc_in_use_bytes', 0):.1f} "
                         f"glibc_free_mb={mb.get('glibc_free_bytes', 0):.1f} cpu_s={f.get('cpu_seconds', 0):.1f} "
                         f"gc_s={f.get('gc_seconds', 0):.1f} gc_full_s={f.get('gc_gen2_seconds', 0):.1f} "
                         f"gc_collections={f.get('gc_collections', 0):.0f} "
                         f"gc_full_collections={f.get('gc_gen2_collections', 0):.0f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", "-n", type=int, default=10000)
    p.add_argument("--replicas", default="1,2,4", help="comma-separated replica counts, one run each")
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--lease-seconds", type=int, default=15)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--apply-concurrency", type=int, default=16)
    p.add_argument("--workdir", default="")
    p.add_argument("--trace-memory", action="store_true",
                   help="tracemalloc in each replica; live allocations written after converge and restart "
                        "(slows the operator: its times mean nothing then)")
    p.add_argument("--malloc-stats", action="store_true",
                   help="each replica's allocator figures (CPython arenas, glibc heap) when empty, converged "
                        "and restarted, in the record and printed")
    p.add_argument("--restart-trees", default="",
                   help="comma-separated checkouts: after the restart, one more restart per tree, the replicas "
                        "importing the operator from it")
    p.add_argument("--profile", action="store_true",
                   help="py-spy on the first replica from the start of the creation until half Ready, "
                        "and through the restart")
    p.add_argument("--gc-defaults", action="store_true",
                   help="what-if: replicas keep CPython's garbage collector settings (no tune_gc)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    bench = Scale(args)
    bench.result.update({"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                         "command": "bench/scale " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))})
    try:
        for i, replicas in enumerate(counts):
            stack = Stack.own(tenants=args.tenants)
            try:
                if i == 0 and not args.no_floor:
                    asyncio.run(bench.run_floor(stack))
                    bench.result["floor"] = {k: (bench.floor or {}).get(k) for k in ("seconds", "throughput_per_s")}
                    bench.result["floor"]["ddl"] = (bench.floor or {}).get("sql", {}).get("ddl")
                    bench.result["floor"]["ddl_shapes"] = (bench.floor or {}).get("sql", {}).get("ddl_shapes")
                    bench.result["floor"]["ddl_repeats"] = (bench.floor or {}).get("sql", {}).get("ddl_repeats")
                    bench.result["floor"]["statements_evicted"] = (bench.floor or {}).get("sql", {}).get("evicted")
                asyncio.run(bench.one(stack, replicas))
            finally:
                stack.close()
        for text in share_lines(bench.result["runs"]):
            print(text, flush=True)
    finally:
        out = ROOT / "bench/results" / f"scale-{args.tenants}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(bench.result, indent=2, default=str) + "\n")
        log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
