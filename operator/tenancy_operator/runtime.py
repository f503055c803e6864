"""Kopf embedded in our own asyncio program, with our settings and our shutdown order."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import kopf

from tenancy_operator.api.names import FINALIZER
from tenancy_operator.config import Settings
from tenancy_operator.db.targets import DatabaseTargets
from tenancy_operator.handlers import featureflag as featureflag_handlers
from tenancy_operator.handlers import quota as quota_handlers
from tenancy_operator.handlers import schemarollout as schemarollout_handlers
from tenancy_operator.handlers import tenant as tenant_handlers
from tenancy_operator.handlers import tenantarchive as tenantarchive_handlers
from tenancy_operator.handlers.common import MemoryDiffBaseStorage, PurgingProgressStorage
from tenancy_operator.k8s import safejson
from tenancy_operator.k8s.client import Kube
from tenancy_operator.k8s.http import REQUEST_SECONDS, login
from tenancy_operator.observability import metrics
from tenancy_operator.observability.events import EventRecorder
from tenancy_operator.observability.health import waiting_health
from tenancy_operator.observability.kopf_logs import brief_kopf_bodies, run_end_summary
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.observability.memory import trim_when_quiet, tune_gc
from tenancy_operator.observability.metrics_server import start_metrics_server
from tenancy_operator.peering import PeeringGate, PeeringLost
from tenancy_operator.runtime_context import Background, OperatorContext, TenantWatcher
from tenancy_operator.sharding import ShardCoordinator
from tenancy_operator.shards import Ownership, Slices
from tenancy_operator.sweep import Sweeper

log = get_logger(__name__)
# Each kind's handler module has ``register(registry)`` and ``SERVICE`` (its service class); a service
# that is a runtime_context.Background (a periodic pass, re-checks) gets a background task.
HANDLER_MODULES = (tenant_handlers, quota_handlers, featureflag_handlers, schemarollout_handlers,
                   tenantarchive_handlers)
PREFIX = "tenancy.dev"
# Kopf ignores changes to every annotation under the prefix of its own storage, so its storage
# gets a sub-prefix: user-facing annotations such as tenancy.dev/rotate-credentials stay visible.
STORAGE_PREFIX = "kopf.tenancy.dev"
# Kinds each replica watches only its slices of (server-side shardSelector). Quotas are watched
# by a label instead (tenancy.dev/slice, set to their Tenant's slice): a Quota is evaluated by the
# replica owning its Tenant, whatever the Quota's own uid.
# SchemaRollouts too: every Tenant reconcile reads the rollout pacing its template from their
# events, while only the rollout's owner reconciles it (handlers/common.owned).
SHARDED_PLURALS = ("tenants", "featureflags", "tenantarchives")
LIST_CHUNK_SIZE = 100
"""Objects per page of Kopf's initial LIST of a kind (with a shard selector too)."""
STOPPING_EXIT_SECONDS = 0.2
"""How long Kopf's workers may go on with their queues once a sharded run is told to stop."""
STOPPING_BACKOFFS = (1.0,)
"""Kopf's waits between attempts of a request made once a run is told to stop: one retry."""
KOPF_STOP_SECONDS = 30.0
"""How long Kopf may take to end its run once our cleanup has run. It takes a few seconds (its
leftover tasks get 5); after an API server that stayed out of reach through all of Kopf's retries,
its watch streams can ignore their cancellation and the run never ends: the process exits then
(exit_when_stuck), to be restarted, rather than live on with nothing working."""
KOPF_PAUSE_WAITER = "pause-waiter for "
"""How Kopf names the task each watch stream keeps waiting for a pause of the operator."""


def cancel_pause_waiters() -> int:
    """At the end of a run, once Kopf's watchers have all ended: cancel the pause-waiting tasks
    their streams left. A watcher cancelled while it hands an event on leaves its stream's
    generator open, and with it that task, until the generator is collected; Kopf then waits 5 s
    for such leftover tasks before it cancels them itself, at the end of every such run (a
    sharded replica's hand-over among them). Nothing waits for a pause any more. Returns how many."""
    waiters = [t for t in asyncio.all_tasks() if t.get_name().startswith(KOPF_PAUSE_WAITER) and not t.done()]
    for task in waiters:
        task.cancel()
    return len(waiters)


def exit_when_stuck() -> None:
    """Kopf's run did not end KOPF_STOP_SECONDS after its cleanup: end the process. Everything of
    ours is closed by then (the cleanup closed the pools); only Kopf's stuck tasks remain."""
    log.error("Kopf did not finish stopping after its cleanup (a watch stream ignored its cancellation): "
              "exiting, to be restarted", seconds=KOPF_STOP_SECONDS)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def exact_namespace(name: str) -> bool:
    """A namespace name, not one of Kopf's glob patterns or negations."""
    return not any(c in name for c in "*?[]!")


def build_registry() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    for module in HANDLER_MODULES:
        module.register(registry)

    kopf.on.login(registry=registry)(login)  # the gateway's: one identity for Kopf and our requests

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        cfg: Settings = memo.settings
        # Our own storage keys: changing them later would re-run handlers on every object.
        settings.persistence.finalizer = FINALIZER
        progress = settings.persistence.progress_storage = PurgingProgressStorage(prefix=STORAGE_PREFIX)
        # Kopf's last-handled state in memory, not in an annotation per object: one PATCH and one
        # watch event fewer per change (handlers/common.py); objects with the annotation from
        # earlier versions keep it, ignored.
        memo.diffbase = settings.persistence.diffbase_storage = MemoryDiffBaseStorage(
            ignored_prefix=STORAGE_PREFIX, progress=progress)
        settings.posting.loggers = False  # Events are for transitions, not log lines
        safejson.install_in_kopf()  # one object nested too deep for Python's json must not end a watch
        # After its own patch Kopf waits until the watch shows exactly that resourceVersion. When
        # another write lands right after (our status, quota limits), the batched worker never sees
        # it and sleeps the whole timeout (5 s by default) per object. Our handlers are level-based
        # and idempotent, so acting on a slightly stale body costs at most a harmless re-run.
        settings.persistence.consistency_timeout = cfg.consistency_timeout_seconds
        # A worker keeps its slot for idle_timeout after its object's last event (Kopf: 5 s), so a
        # restart takes at least N x idle_timeout / worker_limit however cheap each resume is. A
        # worker that exits too early is simply re-created by the object's next event.
        settings.queueing.idle_timeout = 0.5
        settings.queueing.worker_limit = cfg.worker_limit
        settings.watching.server_timeout = 300
        # The initial LIST of each kind in pages: parsing the whole fleet at once made a burst of
        # short-lived objects that the allocators kept after a restart (docs/scaling.md).
        settings.watching.chunk_size = LIST_CHUNK_SIZE
        settings.watching.client_timeout = 330
        settings.watching.inactivity_timeout = 70
        settings.networking.request_timeout = REQUEST_SECONDS
        settings.execution.max_workers = 4
        ownership: Ownership = memo.ownership
        shard = ownership.selector()
        if shard is not None:
            for plural in SHARDED_PLURALS:
                settings.watching.shard_selectors[PREFIX, plural] = shard
        quotas = ownership.quota_selector()
        if quotas is not None:  # a Quota goes by its Tenant's slice, which the uid of the Quota does not give
            settings.watching.label_selectors[PREFIX, "quotas"] = quotas
        # Given exact namespaces, Kopf watches just those and discovers our CRDs once at start
        # (discovery, which every authenticated client may read): it neither lists namespaces nor
        # watches CRDs cluster-wide, so the chart's namespaced mode needs no cluster-scoped grant.
        if cfg.namespace_list and all(exact_namespace(n) for n in cfg.namespace_list):
            settings.scanning.disabled = True

        kube = await Kube.connect(cfg.namespace_list, max_connections=cfg.kube_max_connections)
        # Each run its own pools, closed when it ends: a reconcile cancelled by the end of a run
        # (a sharded replica's share changed) must not leave its session, with the tenant lock it
        # may hold, to the next run.
        targets = DatabaseTargets(
            cfg.targets, min_size=cfg.pool_min_size, max_size=cfg.pool_max_size,
            connect_timeout=cfg.db_connect_timeout_seconds,
            lock_timeout=cfg.db_lock_timeout, statement_timeout=cfg.db_statement_timeout,
        )
        await targets.open()
        await targets.warm()  # before Kopf lists anything: startup handlers run first
        ctx = OperatorContext(
            settings=cfg,
            targets=targets,
            kube=kube,
            events=EventRecorder(kube),
            ownership=ownership,
        )
        for target in cfg.targets:
            try:
                await ctx.ensure_control_schema(target)
            except Exception as exc:  # a target that is down now is migrated on first use
                log.warning("control schema not migrated yet", target=target, error=type(exc).__name__)
        memo.ctx = ctx
        memo.services = {module.KIND: module.SERVICE(ctx) for module in HANDLER_MODULES}
        memo.services["Tenant"].limits = memo.services["Quota"].cluster.expected_limits
        # Resolved once: a Protocol isinstance check per service on each Tenant event is not free.
        memo.tenant_watchers = [s for s in memo.services.values() if isinstance(s, TenantWatcher)]
        loops = {"sweep": Sweeper(ctx, memo.services["Tenant"]).run_forever}
        for kind, service in memo.services.items():
            if isinstance(service, Background):
                loops[f"{kind}-loop"] = service.run_forever
        if cfg.peering_name:  # a standby's loops pause as Kopf pauses its handlers
            gate = PeeringGate(kube, cfg.peering_name, cfg.namespace_list, memo.peer_identity, memo.peer_priority,
                               lost=memo.peering_lost)
            memo.background = [asyncio.create_task(gate.run_while_leading(loops), name="peering-gate")]
        else:
            memo.background = [asyncio.create_task(run(), name=name) for name, run in loops.items()]
        if memo.take_signals is not None:
            memo.take_signals()
        log.info("operator started", targets=sorted(cfg.targets), namespaces=cfg.namespace_list or "all")

    @kopf.on.cleanup(registry=registry)
    async def shutdown(memo: kopf.Memo, **_: Any) -> None:
        # All at once: a loop still running while another is awaited could start work for it.
        background = getattr(memo, "background", [])
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        ctx: OperatorContext | None = getattr(memo, "ctx", None)
        if ctx is not None:
            await ctx.events.drain()
            await ctx.targets.close()
            await ctx.kube.close()
        # Kopf runs the cleanup after its watchers and workers have all ended.
        metrics.PENDING.reset()
        log.debug("leftover pause-waiters cancelled", tasks=cancel_pause_waiters())
        log.info("operator stopped; database pools closed")
        memo.stuck = asyncio.get_running_loop().call_later(KOPF_STOP_SECONDS, exit_when_stuck)

    # PERMANENT: a failing probe answers 500 at once instead of holding Kopf's 60 s retry.
    @kopf.on.probe(id="database", registry=registry, errors=kopf.ErrorsMode.PERMANENT)
    async def database_probe(memo: kopf.Memo, **_: Any) -> dict[str, str]:
        """Liveness: every pool answers. A failing probe makes /healthz answer 500."""
        ctx: OperatorContext = memo.ctx
        ctx.targets.update_pool_metrics()
        result = {}
        for target in ctx.targets.pools:
            await ctx.targets.ping(target)
            result[target] = "ok"
        return result

    @kopf.on.probe(id="kubernetes", registry=registry, errors=kopf.ErrorsMode.PERMANENT)
    async def kubernetes_probe(memo: kopf.Memo, **_: Any) -> dict[str, float]:
        """Liveness: the API answers, and the sweep (one list per interval) keeps completing.
        Kopf restarts silent watch streams itself (inactivity_timeout); a wedged operator loop
        shows here as a sweep that stopped completing."""
        ctx: OperatorContext = memo.ctx
        await ctx.kube.version()
        age = time.monotonic() - ctx.last_sweep_ok
        limit = 3 * ctx.settings.sweep_interval_seconds + 60
        if age > limit:
            raise RuntimeError(f"the last sweep completed {age:.0f}s ago (limit {limit:.0f}s)")
        return {"last_sweep_age_seconds": round(age, 1)}

    return registry


async def run_operator(cfg: Settings) -> None:
    tune_gc()
    brief_kopf_bodies()
    start_metrics_server(cfg.metrics_port, cfg.bind_address)
    trimmer = asyncio.create_task(trim_when_quiet(), name="malloc-trim")
    try:
        await _run(cfg)
    finally:
        trimmer.cancel()


async def _run(cfg: Settings) -> None:
    if not cfg.sharding:
        await _run_kopf(cfg, Ownership(), None)
        return
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{secrets.token_hex(4)}"
    namespace = cfg.shard_namespace or os.environ.get("POD_NAMESPACE") or "default"
    kube = await Kube.connect(cfg.namespace_list, max_connections=4)  # the slices' Leases only
    try:
        coordinator = ShardCoordinator(kube, namespace, cfg.shard_group, identity, Slices(cfg.shard_slices),
                                       cfg.shard_lease_seconds,
                                       connect=lambda: Kube.connect(cfg.namespace_list, max_connections=4))

        async def work(ownership: Ownership, stop: asyncio.Event) -> None:
            await _run_kopf(cfg, ownership, stop, coordinator.take_signals)
            # What the run held (Kopf's per-object memory, our services and caches) is garbage in
            # cycles now, which the spaced-out full collections (observability/memory.tune_gc)
            # would keep while the next run lists its share: collected before that run starts.
            found = gc.collect()
            log.debug("run ended: its objects collected", objects=found)

        await coordinator.serve(
            work,
            lambda: waiting_health(cfg.bind_address, cfg.health_port, coordinator.state, coordinator.renewing),
        )
    finally:
        await kube.close()


async def _run_kopf(cfg: Settings, ownership: Ownership, stop: asyncio.Event | None,
                    take_signals: Callable[[], None] | None = None) -> None:
    """One run of Kopf over what ``ownership`` covers, until ``stop`` is set or a signal comes
    (peered: or its peering record has expired, PeeringLost).
    Sharded, a new run starts for every change of the slices held: Kopf lists its slices afresh,
    and nothing of the objects that went elsewhere stays in its memory or ours. ``take_signals``
    is called once Kopf has started (it installs signal handlers of its own for each run)."""
    namespaces = cfg.namespace_list
    memo = kopf.Memo(settings=cfg, ownership=ownership, take_signals=take_signals)
    peering: dict[str, Any] = {}
    if cfg.peering_name:  # active/standby: the replica with the highest priority works, the others wait
        memo.peer_priority = (
            cfg.peering_priority if cfg.peering_priority is not None else secrets.randbelow(1 << 30) + 1
        )
        memo.peer_identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{secrets.token_hex(4)}"
        peering = {"peering_name": cfg.peering_name, "priority": memo.peer_priority, "identity": memo.peer_identity}
        # Set by the peering gate when this replica's record has expired: the run ends. (Peering
        # excludes sharding, which alone passes a stop of its own.)
        stop = memo.peering_lost = asyncio.Event()
    settings = kopf.OperatorSettings()
    hurry = asyncio.create_task(_hurry_when_stopped(stop, settings), name="hurry-when-stopped") if stop else None
    with run_end_summary():  # one line for the work the run's end leaves, not a warning per object
        try:
            await kopf.operator(
                registry=build_registry(),
                settings=settings,
                memo=memo,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=f"http://{cfg.bind_address}:{cfg.health_port}/healthz",
                standalone=not cfg.peering_name,
                stop_flag=stop,
                **peering,
            )
        finally:
            if hurry is not None:
                hurry.cancel()
            stuck: asyncio.TimerHandle | None = getattr(memo, "stuck", None)
            if stuck is not None:
                stuck.cancel()
    if cfg.peering_name and memo.peering_lost.is_set():
        raise PeeringLost("the peering record of this replica has expired (Kopf's keep-alive stopped "
                          "renewing it: the API server was out of reach); a peer may work now")


async def _hurry_when_stopped(stop: asyncio.Event, settings: kopf.OperatorSettings) -> None:
    """A sharded run stops to hand slices over (or to leave): the next holder of a slice waits for
    this run's end. Kopf gives its workers ``exit_timeout`` (2 s) to finish their queues first, so
    that much shorter then: a reconcile cut off is done again by the next run or holder, as after
    a crash (every step is idempotent, and the run's pools close with its sessions and locks).
    A peered run stops when its record is lost, often because the API server is out of reach:
    Kopf's removal of that record would go through all of Kopf's retries (about a minute) before
    the process exits, so requests made from then on get STOPPING_BACKOFFS. Each run has settings
    of its own, so the next run retries as usual."""
    await stop.wait()
    settings.queueing.exit_timeout = STOPPING_EXIT_SECONDS
    settings.networking.error_backoffs = STOPPING_BACKOFFS
