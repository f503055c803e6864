"""Prometheus metrics, named by Prometheus' conventions: counters end in ``_total``, durations are
``_seconds``, ratios ``_ratio``. Label values are bounded sets (kinds, phases, reasons, targets),
except the per-tenant ``namespace``/``tenant`` labels that docs/operations.md lists with their reason.
No label is called ``job`` or ``instance``: those are Prometheus' target labels."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from operator import itemgetter
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

from tenancy_operator import __version__

RECONCILE_TOTAL = Counter("reconcile_total", "Reconcile attempts by result.", ["kind", "result"])
RECONCILE_FAILURES = Counter(
    "reconcile_failures_total", "Failed reconcile attempts by bounded reason.", ["kind", "reason"]
)
RECONCILE_DURATION = Histogram(
    "reconcile_duration_seconds",
    "Duration of one reconcile.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge(
    "queue_depth", "Objects with a reconcile waiting (including retry backoff) or running.", ["kind"]
)
PEERING_LEADING = Gauge(
    "peering_leading", "Peered replicas: 1 while this replica works (no live peer outranks it and its own "
    "keep-alive record is alive), 0 while it stands by.")
SHARD_SLICES_HELD = Gauge(
    "shard_slices_held", "Slices of the fleet this replica holds (sharded replicas); 0 while it waits for its share."
)
SHARD_SLICE_HELD = Gauge(
    "shard_slice_held", "1 for each slice this replica holds (its Lease names this replica).", ["slice"]
)
SHARD_SLICE_COUNT_CONFLICT = Gauge(
    "shard_slice_count_conflict",
    "1 while this replica holds nothing because older replicas cut the fleet into another number of slices.",
)
WATCH_CACHE_OBJECTS = Gauge(
    "watch_cache_objects",
    "Objects of a kind this replica keeps from its watch (sharded: its slices' Tenants; the Quotas of its slices "
    "and those not labelled yet).",
    ["kind"],
)
SHARD_HANDOVERS = Counter(
    "shard_handovers_total",
    "Changes of the slices this replica holds, by direction: taken, released, or fenced (work on them stopped "
    "because their Leases could not be renewed).",
    ["direction"],
)
TENANTS = Gauge("tenants", "Tenants by phase, as last reconciled.", ["phase"])
DB_POOL_CONNECTIONS = Gauge(
    "db_pool_connections", "Database pool connections by state.", ["target", "state"]
)
DB_POOL_MAX = Gauge("db_pool_max_connections", "Database pool maximum size.", ["target"])
DRIFT_REPAIRS = Counter(
    "drift_repairs_total", "Out-of-band changes repaired, by kind and object.", ["kind", "object"]
)
# job_kind: the kind of lifecycle job (provision, migrate, ...). Not `job`, which Prometheus sets
# on every series to the scrape job: the two would overwrite each other.
LIFECYCLE_JOB_KINDS = ("provision", "migrate", "suspend", "resume", "rotate", "archive", "restore", "purge", "delete")
LIFECYCLE_JOBS = Counter("lifecycle_jobs_total", "Lifecycle job attempts by result.", ["job_kind", "result"])
LIFECYCLE_JOB_FAILURES = Counter("lifecycle_job_failures_total", "Failed lifecycle job attempts.", ["job_kind"])
LIFECYCLE_JOB_DURATION = Histogram(
    "lifecycle_job_duration_seconds",
    "Duration of one lifecycle job attempt.",
    ["job_kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
LIFECYCLE_JOBS_RUNNING = Gauge("lifecycle_jobs_running", "Lifecycle jobs running now.", ["job_kind"])
FLAG_CHANGES = ("create", "update", "delete")
FEATURE_FLAG_CHANGES = Counter(
    "feature_flag_changes_total",
    "Feature flag changes written, by change (create, update, delete). Which flag: the audit trail "
    "(tenancy-operator flags history) and the FlagCreated/FlagChanged/FlagDeleted Events.",
    ["change"],
)
ROLLOUT_TRANSITIONS = ("RolloutStarted", "RolloutStepped", "RolloutPaused", "RolloutResumed",
                       "RolloutRolledBack", "RolloutCompleted")
FLAG_ROLLOUT_TRANSITIONS = Counter(
    "feature_flag_rollout_transitions_total",
    "Stepped flag rollouts' transitions, by transition (the Event reason: RolloutStarted, RolloutStepped, "
    "RolloutPaused, RolloutResumed, RolloutRolledBack, RolloutCompleted). Which flag: the Events and "
    "status.rollout.",
    ["transition"],
)
SCHEMA_ROLLOUT_TENANTS = Gauge(
    "schema_rollout_tenants",
    "Tenants of each SchemaRollout's template by state: migrated (Ready at the target version), failed, "
    "pending (migrating, or waiting for their wave), pinned.",
    ["namespace", "rollout", "state"],
)
STALLED_OBJECTS = Gauge(
    "stalled_objects",
    "Objects whose last reconcile left them Stalled=True (the operator stopped retrying), by kind and reason.",
    ["kind", "reason"],
)
BUILD_INFO = Info("tenancy_operator_build", "Build information.")

# Bounded reasons for reconcile_failures_total.
REASONS = (
    "DatabaseUnavailable",
    "DatabaseBusy",
    "UnknownDatabase",
    "Conflict",
    "InvalidSpec",
    "MigrationFailed",
    "KubernetesAPI",
    "ArchiveFailed",
    "Internal",
)


class StalledObjects:
    """Which objects are Stalled now, so stalled_objects counts each once and returns to 0.

    A stalled object stops producing reconcile failures (nothing retries it), so the failure
    counters fall silent exactly when it needs a person: this gauge stays up instead."""

    def __init__(self) -> None:
        self._reasons: dict[tuple[str, str], str] = {}

    def update(self, kind: str, key: str, reason: str | None) -> None:
        """The object ``key`` (namespace/name) is Stalled for ``reason``; None: it is not (or is gone)."""
        before = self._reasons.get((kind, key))
        if before == reason:
            return
        if reason is None:
            del self._reasons[(kind, key)]
        else:
            self._reasons[(kind, key)] = reason
        for changed in {before, reason} - {None}:
            assert changed is not None
            count = sum(1 for (k, _), r in self._reasons.items() if k == kind and r == changed)
            STALLED_OBJECTS.labels(kind=kind, reason=changed).set(count)

    def forget(self, kind: str, key: str) -> None:
        self.update(kind, key, None)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self._reasons if k == kind)


STALLED = StalledObjects()


class PendingObjects:
    """Tracks which objects have work outstanding, so queue_depth is exact and returns to 0."""

    def __init__(self) -> None:
        self._pending: dict[str, set[str]] = {}

    def add(self, kind: str, key: str) -> None:
        self._pending.setdefault(kind, set()).add(key)
        QUEUE_DEPTH.labels(kind=kind).set(len(self._pending[kind]))

    def discard(self, kind: str, key: str) -> None:
        self._pending.setdefault(kind, set()).discard(key)
        QUEUE_DEPTH.labels(kind=kind).set(len(self._pending[kind]))

    @contextmanager
    def outstanding(self, kind: str, key: str) -> Iterator[None]:
        """The object has work outstanding from here on. A block that ends is done with it; one
        that raises leaves it outstanding (Kopf tries it again; its DELETED event discards it)."""
        self.add(kind, key)
        yield
        self.discard(kind, key)

    def count(self, kind: str) -> int:
        return len(self._pending.get(kind, ()))

    def reset(self) -> None:
        """A Kopf run has ended: its work ended with it (a reconcile cancelled by the end of a run
        stays counted otherwise, and a sharded replica may never see that object again). The
        next run lists every object it covers and counts what it has to do."""
        for kind, keys in self._pending.items():
            keys.clear()
            QUEUE_DEPTH.labels(kind=kind).set(0)


PENDING = PendingObjects()


@contextmanager
def observe_reconcile(kind: str) -> Iterator[None]:
    with RECONCILE_DURATION.labels(kind=kind).time():
        yield


def record_result(kind: str, ok: bool, reason: str | None = None) -> None:
    RECONCILE_TOTAL.labels(kind=kind, result="success" if ok else "failure").inc()
    if not ok:
        RECONCILE_FAILURES.labels(kind=kind, reason=reason if reason in REASONS else "Internal").inc()


def initialise() -> None:
    """The build's version, and the series that exist from the start at 0."""
    BUILD_INFO.info({"version": __version__})
    for kind in ("Tenant", "Quota", "FeatureFlag"):
        QUEUE_DEPTH.labels(kind=kind).set(0)
        for reason in REASONS:
            RECONCILE_FAILURES.labels(kind=kind, reason=reason)
    for job_kind in LIFECYCLE_JOB_KINDS:
        # Series exist at 0, so rate() and alerts see the first failure.
        LIFECYCLE_JOB_FAILURES.labels(job_kind=job_kind)
        LIFECYCLE_JOBS_RUNNING.labels(job_kind=job_kind).set(0)
    for change in FLAG_CHANGES:
        FEATURE_FLAG_CHANGES.labels(change=change)
    for transition in ROLLOUT_TRANSITIONS:
        FLAG_ROLLOUT_TRANSITIONS.labels(transition=transition)


TENANT_REGISTRY = CollectorRegistry(auto_describe=True)
"""The per-tenant families: collected like any other (``collect``, ``get_sample_value``), served by
``metrics_server.exposition`` after prometheus_client's REGISTRY."""
TENANT_FAMILIES: list[TenantSeries] = []


class TenantSeries:
    """One family of per-tenant series (labels namespace, tenant and, with ``resource``, the
    resource), kept as plain floats by label values and exported when Prometheus scrapes.

    A prometheus_client child per series holds its own lock, value object and label dict, about
    600 bytes; a tenant has up to 15 of these series, so a fleet's share of a replica's memory was
    mostly them. Here a series is one dict entry. ``key`` is the tenant's (namespace, name), with
    the resource appended for families that have one. With ``age``, a value is a Unix time and the
    series shows the seconds since then at each scrape."""

    def __init__(self, name: str, documentation: str, *, counter: bool = False, resource: bool = False,
                 age: bool = False, registry: CollectorRegistry = TENANT_REGISTRY) -> None:
        self.name, self.documentation, self.counter, self.age = name, documentation, counter, age
        self.labelnames = ("namespace", "tenant", *(("resource",) if resource else ()))
        self.values: dict[tuple[str, ...], float] = {}
        registry.register(self)
        if registry is TENANT_REGISTRY:
            TENANT_FAMILIES.append(self)
        # A sample's line in the text format, labels sorted by name, and a key's values in that order.
        order = sorted(range(len(self.labelnames)), key=lambda i: self.labelnames[i])
        labels = ",".join(f'{self.labelnames[i]}="%s"' for i in order)
        self._line = f"{self._family().name}{'_total' if counter else ''}{{{labels}}} %s\n"
        self._in_order = itemgetter(*order)
        self._header = generate_latest(_Single(self._family())).decode()

    def set(self, key: tuple[str, ...], value: float) -> None:
        self.values[key] = float(value)

    def inc(self, key: tuple[str, ...], amount: float = 0.0) -> None:
        """A counter's series goes up by ``amount`` (0: it exists from now on, at 0)."""
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        self.values[key] = self.values.get(key, 0.0) + amount

    def remove(self, key: tuple[str, ...]) -> None:
        self.values.pop(key, None)

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        return kind(self.name, self.documentation, labels=self.labelnames)

    def _samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        # Scrapes run in the HTTP server's thread: iterate a copy (one C-level call, atomic under
        # the GIL) while the event loop goes on changing the values.
        values = self.values.copy()
        if not self.age:
            return iter(values.items())
        now = time.time()
        return ((key, max(0.0, now - at)) for key, at in values.items())

    def describe(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = self._family()
        for key, value in self._samples():
            family.add_metric(key, value)
        yield family

    def exposition(self) -> str:
        """The family in the text format, as ``generate_latest`` renders ``collect``'s."""
        line, in_order = self._line, self._in_order
        return self._header + "".join(line % (*map(_escape, in_order(key)), float_text(value))
                                      for key, value in self._samples())


float_text = cast(Callable[[float], str], _untyped_float_to_go_string)
"""A sample's value as the text format writes it (prometheus_client's, untyped)."""


def _escape(value: str) -> str:
    """A label value as the text format writes it (prometheus_client's escaping)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value


class _Single:
    """One family as a registry (``generate_latest`` renders whatever ``collect``s)."""

    def __init__(self, family: CounterMetricFamily | GaugeMetricFamily) -> None:
        self.family = family

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield self.family


# Quotas. Per-tenant series (namespace, tenant) can be switched off (TENANCY_QUOTA_PER_TENANT_METRICS)
# for very large fleets; the aggregate by resource stays.
TENANT_QUOTA_USED = TenantSeries(
    "tenant_quota_used", "Measured usage of a tenant's limit (bytes for storage).", resource=True,
)
TENANT_QUOTA_LIMIT = TenantSeries(
    "tenant_quota_limit", "Effective limit of a tenant (bytes for storage, seconds for statementTimeout).",
    resource=True,
)
TENANT_QUOTA_TENANTS = Gauge(
    "tenant_quota_tenants", "Tenants at 90% or more of a limit (near) or at the limit (exceeded).",
    ["resource", "state"],
)
QUOTA_MEASURE_DURATION = Histogram(
    "quota_measure_duration_seconds", "Duration of measuring every tenant of one database target.", ["target"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUOTA_PASS_DURATION = Histogram(
    "quota_pass_duration_seconds", "Duration of one quota pass over all tenants (measure, enforce, report).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

# The isolation audit (db/audit.py): privileges a tenant role holds beyond its own schema. kind is
# db.audit.Kind (membership, attribute, schema, relation, routine, database, parameter, ownership).
ISOLATION_VIOLATIONS = Counter(
    "isolation_violations_total",
    "Privileges found held by a tenant role beyond its own schema, each counted when first found.",
    ["kind"],
)
ISOLATION_VIOLATIONS_HELD = Gauge(
    "isolation_violations_held",
    "Privileges a tenant role still holds beyond its own schema after the last audit (not revocable by the operator).",
    ["kind"],
)

# Tenant load (reconcilers/noisy.py): per tenant, counted from PostgreSQL's statistics at each quota
# pass. Per-tenant series follow TENANCY_QUOTA_PER_TENANT_METRICS like the quota gauges; the
# aggregates (noisy neighbours, detail per target) always exist.
TENANT_RESOURCE_USAGE = TenantSeries(
    "tenant_resource_usage_seconds_total",
    "Database time of a tenant: execution seconds of its finished statements (pg_stat_statements), "
    "or busy session seconds sampled from pg_stat_activity where pg_stat_statements is not available.",
    counter=True,
)
TENANT_RESOURCE_CALLS = TenantSeries("tenant_resource_calls_total", "Statements a tenant executed.", counter=True)
TENANT_RESOURCE_ROWS = TenantSeries(
    "tenant_resource_rows_total", "Rows a tenant's statements returned or changed.", counter=True
)
TENANT_RESOURCE_SHARED_BLOCKS = TenantSeries(
    "tenant_resource_shared_blocks_total",
    "Shared blocks (of the server's block_size, 8 KiB by default) a tenant's statements hit, read, dirtied or wrote.",
    counter=True,
)
TENANT_RESOURCE_TEMP_BLOCKS = TenantSeries(
    "tenant_resource_temp_blocks_total",
    "Temporary blocks (of the server's block_size) a tenant's statements read or wrote.",
    counter=True,
)
TENANT_SESSIONS_ACTIVE = TenantSeries("tenant_sessions_active", "Active sessions of a tenant at the last pass.")
TENANT_SESSIONS_WAITING = TenantSeries(
    "tenant_sessions_waiting", "Active sessions of a tenant waiting on a wait event at the last pass."
)
TENANT_LOAD_SHARE = TenantSeries(
    "tenant_load_share_ratio", "Fraction of its database target's load that is the tenant's, over its window."
)
TENANT_NOISY_NEIGHBOR = TenantSeries(
    "tenant_noisy_neighbor", "1 while the tenant is a noisy neighbour (its Quota's NoisyNeighbor condition)."
)
TENANT_NOISY_NEIGHBORS = Gauge("tenant_noisy_neighbors", "Tenants that are noisy neighbours now.")
TENANT_LOAD_STATEMENTS = Gauge(
    "tenant_load_statements_available",
    "1 when tenant load on a target comes from pg_stat_statements, 0 when it is sampled from sessions.",
    ["target"],
)


CREDENTIAL_AGE = TenantSeries("tenant_credentials_age_seconds",
                              "Seconds since the tenant's application login was last rotated.", age=True)
CREDENTIAL_ROTATIONS = Counter("tenant_credential_rotations_total", "Rotations of tenants' application logins.")


def credentials_rotated(namespace: str, tenant: str, at: datetime | None) -> None:
    if at is None:
        CREDENTIAL_AGE.remove((namespace, tenant))
    else:
        CREDENTIAL_AGE.set((namespace, tenant), at.timestamp())


def credentials_forgotten(namespace: str, tenant: str) -> None:
    CREDENTIAL_AGE.remove((namespace, tenant))
