"""Quota enforcement: effective limits per tenant, measured usage, role attributes, status.

One code path for everything: a *subject* is one tenant key (namespace, tenant name) with its
Tenant, the Quotas naming it and what the database says about it. ``evaluate`` (pure) turns a
subject into a plan; ``QuotaService.apply`` carries the plan out (role attributes, registry,
status, Events, metrics). The periodic pass measures every tenant of a target with one query
per measure and evaluates all subjects; Kopf handlers evaluate one subject at once (edits take
effect immediately); a scheduled wake-up evaluates the subjects whose override ends now.

Level-based: role attributes and the registry are compared with the computed limits and changed
only where they differ. Our own status is read only to avoid repeating Events across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import psycopg_pool
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tenancy_operator.api.common import format_quantity, parse_duration
from tenancy_operator.api.names import OPERATOR
from tenancy_operator.api.quota import (
    CONDITION_EXCEEDED,
    CONDITION_NEAR_LIMIT,
    CONDITION_NOISY_NEIGHBOR,
    CONNECTION_LIMIT_MAX,
    LIMIT_NAMES,
    NEAR_LIMIT_RATIO,
    ActiveOverride,
    LoadStatus,
    NoisyNeighborPolicy,
    QuotaOverride,
    QuotaSpec,
    limit_amount,
)
from tenancy_operator.api.tenant import tenant_identifier
from tenancy_operator.conditions import Cond, merge
from tenancy_operator.db import jobs as dbjobs
from tenancy_operator.db import load as dbload
from tenancy_operator.db import quota as dbq
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.quota import RoleQuotaState
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.client import ApiError, older_version
from tenancy_operator.observability import metrics
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.lifecycle import is_transient
from tenancy_operator.reconcilers.noisy import Histories, Policy, Verdict, assess, contain
from tenancy_operator.runtime_context import OperatorContext

log = get_logger(__name__)

KIND = "Quota"
QUOTAS, TENANTS = "quotas", "tenants"
LOCK_KIND = "QuotaTenant"
CAPABILITIES_EVERY = 10
"""Every how many passes a target's statistics capabilities (db/load.py) are read again."""
Key = tuple[str, str]
"""(namespace, tenant name): quotas are per tenant, so is every lock and memory entry."""

OK, NEAR, EXCEEDED = 0, 1, 2
LEVEL_NAMES = {NEAR: "near", EXCEEDED: "exceeded"}
STALE_MEASUREMENTS = 30
"""lastMeasuredAt is refreshed with any other status change, and at least every 30 intervals, so an
idle tenant's Quota is not rewritten every interval just to move a timestamp."""
TRANSIENT_REASONS = ("TenantNotReady", "DatabaseUnavailable")
"""Ready=False reasons that resolve by themselves (a tenant being provisioned): no Warning Event."""
EXPIRY_GRACE = timedelta(milliseconds=50)
"""Wake a little after an override's expiry so the evaluation sees it expired."""
RETRY_FAILED_PASS_SECONDS = 5.0
RELIST_EVERY = 10
"""Every how many periodic passes Tenants and Quotas are LISTed instead of read from the watch cache."""
PASS_SLICE = 32
"""Tenants a periodic pass evaluates per turn of the event loop."""
AGGREGATES_DELAY_SECONDS = 1.0
"""The tenants-per-state gauges are recounted at most this often."""
UNSEEN_TENANT_GRACE_SECONDS = 10.0
PROBE_GATHER_SECONDS = 0.25
"""Evaluations starting within this window share one probe query (see QuotaService._probe_one).
During a burst of new tenants each probe is expensive (planning and catalog scans on caches the
DDL burst keeps invalidating) and the largest statement cost the floor does not have, so a wider
window means far fewer of them; a quarter second more before a Quota's status is cheap."""
"""How long a new Quota waits for its Tenant to show in the watch before reading it with a GET."""
FIRST_PROVISIONING_GRACE = timedelta(minutes=10)
"""A tenant in its first provisioning is evaluated when its Tenant reports Ready (or Stalled), not
before: its Quota's first status is then the final one instead of a TenantNotReady that Ready
replaces seconds later. Past this age the periodic pass evaluates it anyway."""


# --- Pure logic -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleSettings:
    """The role attributes the operator owns for quotas."""

    connection_limit: int
    """-1: unlimited."""
    statement_timeout_ms: int | None
    read_only: bool


@dataclass(frozen=True)
class Probe:
    """What the database says about one subject (or why it could not be asked)."""

    state: RoleQuotaState | None = None
    storage: int = 0
    connections: int = 0
    reported: Mapping[str, Decimal] = field(default_factory=dict)
    problem: tuple[str, str] | None = None
    """(reason, message) when the tenant's limits cannot be enforced now."""
    target: str | None = None
    ident: str | None = None
    load: LoadView | None = None
    """The tenant's load on its target (periodic passes; a handler's evaluation reuses the last)."""


@dataclass(frozen=True)
class LoadView:
    """What the last pass found about a tenant's load."""

    verdict: Verdict | None
    """None until two samples cover some time."""
    source: str
    detail: str | None
    window: str
    active: int = 0
    waiting: int = 0
    wait_events: tuple[str, ...] = ()


@dataclass
class Subject:
    """One tenant key and what the API server says about it."""

    namespace: str
    name: str
    tenant: dict[str, Any] | None
    quotas: list[dict[str, Any]]
    """Quotas naming the tenant, the one in force first (see ``sort_quotas``)."""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@dataclass
class Memory:
    """What the last evaluation of a subject found, for transition Events (in memory only)."""

    uid: str
    tier: str
    levels: dict[str, int]
    active: set[tuple[str, str]]
    """(limit, expiresAt) of the overrides in force."""
    noisy: bool | None = None
    """The NoisyNeighbor verdict in force (None: never judged)."""
    contained: tuple[str, ...] = ()
    """Role attributes lowered by containment."""


@dataclass
class Plan:
    """What one evaluation decided; ``QuotaService.apply`` does it."""

    enforce: bool = False
    target: str | None = None
    ident: str | None = None
    tenant_id: str | None = None
    role: RoleSettings | None = None
    role_changes: list[str] = field(default_factory=list)
    terminate: bool = False
    publish: dict[str, Any] | None = None
    quota_patches: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    tenant_patch: dict[str, Any] | None = None
    events: list[tuple[dict[str, Any], str, str, str]] = field(default_factory=list)
    hard: dict[str, str] = field(default_factory=dict)
    amounts_used: dict[str, Decimal] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    next_expiry: datetime | None = None
    memory: Memory | None = None
    expired: list[str] = field(default_factory=list)
    """Limits whose override ended at this evaluation (for logs)."""
    ledger: list[tuple[str, str]] = field(default_factory=list)
    """(kind, detail) of containment jobs to record in the lifecycle ledger with the role change."""
    tenant_version: str | None = None
    """resourceVersion the Tenant status patch is conditional on (it replaces the conditions list)."""
    noisy: bool | None = None
    load_share: float | None = None


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def sort_quotas(quotas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Quota in force first: the oldest (creationTimestamp, then name); later ones conflict."""
    return sorted(quotas, key=lambda q: (q["metadata"].get("creationTimestamp") or "", q["metadata"]["name"]))


def effective_limits(defaults: Mapping[str, str], spec: QuotaSpec | None, now: datetime) -> dict[str, str]:
    """Tier defaults, then the Quota's limits, then its unexpired overrides."""
    hard = dict(defaults)
    if spec is not None:
        hard.update(spec.effective_limits(now))
    return {name: hard[name] for name in LIMIT_NAMES if name in hard}


def next_expiry(spec: QuotaSpec | None, now: datetime) -> datetime | None:
    """When the next override ends: the limits change then, so the operator wakes then."""
    if spec is None:
        return None
    upcoming = [o.expires_at for o in spec.overrides if o.expires_at > now]
    return min(upcoming) if upcoming else None


def used_amounts(storage: int, connections: int, reported: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Usage by limit name: measured storage and connections, platform-reported for the rest."""
    used = {name: Decimal(value) for name, value in reported.items() if name in LIMIT_NAMES}
    used.pop("statementTimeout", None)  # a timeout has no usage
    used["storage"] = Decimal(storage)
    used["connections"] = Decimal(connections)
    return {name: used[name] for name in LIMIT_NAMES if name in used}


def format_used(limit: str, amount: Decimal) -> str:
    if limit == "storage":
        return format_quantity(int(amount))
    if amount == amount.to_integral_value():
        return str(int(amount))
    return format(amount.normalize(), "f")


def usage_ratios(hard: Mapping[str, str], used: Mapping[str, Decimal]) -> dict[str, float]:
    """used / hard for every limit that has both (1.0 = at the limit)."""
    ratios: dict[str, float] = {}
    for name, amount in used.items():
        if name in hard and name != "statementTimeout":
            ratios[name] = round(float(amount) / limit_amount(name, hard[name]), 4)
    return ratios


def level(ratio: float) -> int:
    if ratio >= 1.0:
        return EXCEEDED
    if ratio >= NEAR_LIMIT_RATIO:
        return NEAR
    return OK


def desired_role(hard: Mapping[str, str], read_only: bool) -> RoleSettings:
    connections = hard.get("connections")
    timeout = hard.get("statementTimeout")
    return RoleSettings(
        connection_limit=min(int(connections), CONNECTION_LIMIT_MAX) if connections else -1,
        statement_timeout_ms=limit_amount("statementTimeout", timeout) if timeout else None,
        read_only=read_only,
    )


def role_changes(state: RoleQuotaState, want: RoleSettings) -> list[str]:
    """Which owned attributes differ from the catalog (a hand-made '30s' differs from 30000: it is
    rewritten once in the operator's form)."""
    changes = []
    if state.connection_limit != want.connection_limit:
        changes.append("connections")
    current_timeout = state.statement_timeout
    wanted_timeout = None if want.statement_timeout_ms is None else str(want.statement_timeout_ms)
    if current_timeout != wanted_timeout:
        changes.append("statementTimeout")
    if state.read_only != want.read_only:
        changes.append("readOnly")
    return changes


def registry_document(
    hard: Mapping[str, str], *, enforcement: str, blocked: bool, active: Mapping[str, QuotaOverride],
    quota: str | None,
) -> dict[str, Any]:
    """tenants.quotas: what the platform's rate limiter and job runner read. Counts as numbers,
    storage and statementTimeout both as written and in bytes / milliseconds."""
    doc: dict[str, Any] = {}
    for name, value in hard.items():
        if name == "storage":
            doc["storage"] = value
            doc["storageBytes"] = limit_amount(name, value)
        elif name == "statementTimeout":
            doc["statementTimeout"] = value
            doc["statementTimeoutMs"] = limit_amount(name, value)
        else:
            doc[name] = int(value)
    doc["storageEnforcement"] = enforcement
    doc["writesBlocked"] = blocked
    doc["overrides"] = [
        {"limit": o.limit, "value": str(o.value), "expiresAt": iso(o.expires_at)}
        for _, o in sorted(active.items())
    ]
    doc["quota"] = quota
    return doc


def merge_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``desired`` for the keys of
    ``desired``; empty when nothing differs. Map entries missing from a desired map are removed
    (``None``); lists are replaced whole."""
    current = current or {}
    patch: dict[str, Any] = {}
    for k, want in desired.items():
        have = current.get(k)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_patch(have, want)
            for gone in set(have) - set(want):
                sub[gone] = None
            if sub:
                patch[k] = sub
        elif have != want:
            patch[k] = want
    return patch


def _active_from_status(status: Mapping[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for o in status.get("activeOverrides") or []:
        expires = parse_time(o.get("expiresAt"))
        if o.get("limit") and expires is not None:
            out.add((str(o["limit"]), iso(expires)))
    return out


def _levels_from_status(status: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): level(float(v)) for k, v in (status.get("usageRatio") or {}).items()}


def _ready(conditions: Sequence[Mapping[str, Any]] | None) -> Mapping[str, Any]:
    return next((c for c in conditions or [] if c.get("type") == "Ready"), {})


def _not_in_force(quota: dict[str, Any], reason: str, message: str, *, hard: Mapping[str, str] | None = None,
                  keep_usage: bool = False) -> tuple[dict[str, Any], bool]:
    """Status of a Quota that does not apply now; (patch, Ready reason changed)."""
    status = quota.get("status") or {}
    generation = int(quota["metadata"].get("generation") or 0)
    desired: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge(status.get("conditions"), [Cond("Ready", "False", reason, message)], generation,
                            drop=[CONDITION_NEAR_LIMIT, CONDITION_EXCEEDED]),
        "hard": dict(hard or {}),
        "activeOverrides": [],
    }
    if not keep_usage:
        desired.update({"used": {}, "usageRatio": {}})
    changed = _ready(status.get("conditions")).get("reason") != reason
    return merge_patch(status, desired), changed


def _describe(limit: str, used: str, hard: str, ratio: float) -> str:
    return f"{limit} {used} of {hard} ({ratio:.0%})"


def evaluate(
    subject: Subject, probe: Probe | None, *, tier_limits: Mapping[str, Mapping[str, str]], now: datetime,
    memory: Memory | None, stale_after: timedelta,
) -> Plan:
    """Decide everything for one subject. Pure: no I/O, so the whole policy is unit-tested."""
    plan = Plan()
    winner, losers = (subject.quotas[0], subject.quotas[1:]) if subject.quotas else (None, [])
    for loser in losers:
        message = (f"tenant {subject.name} already has Quota {winner['metadata']['name']} "  # type: ignore[index]
                   "(the older one applies); delete one of them")
        patch, changed = _not_in_force(loser, "Conflict", message)
        if patch:
            plan.quota_patches.append((loser, patch))
        if changed:
            plan.events.append((loser, "Warning", "Conflict", message))

    tenant = subject.tenant
    if tenant is None or tenant["metadata"].get("deletionTimestamp"):
        if winner is not None:
            reason = "TenantNotFound" if tenant is None else "TenantDeleting"
            message = (f"Tenant {subject.name} not found in namespace {subject.namespace}"
                       if tenant is None else f"Tenant {subject.name} is being deleted")
            patch, changed = _not_in_force(winner, reason, message)
            if patch:
                plan.quota_patches.append((winner, patch))
            if changed:
                plan.events.append((winner, "Warning", reason, message))
        return plan

    tier = str((tenant.get("spec") or {}).get("tier") or "free")
    spec: QuotaSpec | None = None
    invalid: str | None = None
    if winner is not None:
        try:
            spec = QuotaSpec.model_validate(winner.get("spec") or {})
        except ValidationError as exc:
            invalid = "; ".join(e["msg"] for e in exc.errors())[:512]
    hard = effective_limits(tier_limits.get(tier, {}), spec, now)
    plan.hard = hard
    plan.next_expiry = next_expiry(spec, now)
    active: dict[str, QuotaOverride] = (
        {str(name): o for name, o in spec.active_overrides(now).items()} if spec is not None else {}
    )
    active_keys: set[tuple[str, str]] = {(name, iso(o.expires_at)) for name, o in active.items()}

    tenant_status = tenant.get("status") or {}
    if tenant_status.get("conditions"):  # before the Tenant's first status, that status carries them
        patch = merge_patch(tenant_status, {"effectiveLimits": hard})
        if patch:
            plan.tenant_patch = patch

    uid = str(tenant["metadata"].get("uid") or "")
    quota_status = (winner.get("status") or {}) if winner is not None else {}
    if memory is not None and memory.uid == uid:
        prev_levels, prev_active = memory.levels, memory.active
    else:
        prev_levels, prev_active = _levels_from_status(quota_status), _active_from_status(quota_status)
    event_target = winner if winner is not None else tenant

    if spec is not None:
        by_key: dict[tuple[str, str], QuotaOverride] = {(o.limit, iso(o.expires_at)): o for o in spec.overrides}
        for limit, expires in sorted(prev_active - active_keys):
            override = by_key.get((limit, expires))
            if override is None or override.expires_at > now:
                continue  # removed by hand, not expired
            plan.expired.append(limit)
            plan.events.append((event_target, "Normal", "OverrideExpired",
                                f"override of {limit} to {override.value} expired at {expires}"
                                f"{f' ({override.reason})' if override.reason else ''}; "
                                f"{limit} is {hard.get(limit, 'unlimited')} again"))

    if invalid is not None and winner is not None:
        patch, changed = _not_in_force(winner, "InvalidSpec", invalid)
        if patch:
            plan.quota_patches.append((winner, patch))
        if changed:
            plan.events.append((winner, "Warning", "InvalidSpec", invalid))
        winner = None  # the tenant falls back to its tier defaults; the Quota says why
    if probe is None or probe.problem is not None or probe.state is None:
        reason, message = probe.problem if probe and probe.problem else ("TenantNotReady", "not measured yet")
        if winner is not None:
            patch, changed = _not_in_force(winner, reason, message, hard=hard, keep_usage=True)
            if patch:
                plan.quota_patches.append((winner, patch))
            if changed and reason not in TRANSIENT_REASONS:
                plan.events.append((winner, "Warning", reason, message))
        plan.memory = Memory(uid, tier, prev_levels, active_keys)
        return plan

    state = probe.state
    plan.enforce, plan.target, plan.ident, plan.tenant_id = True, probe.target, probe.ident, state.tenant_id
    amounts = used_amounts(probe.storage, probe.connections, probe.reported)
    plan.amounts_used = amounts
    used = {name: format_used(name, amount) for name, amount in amounts.items()}
    ratios = usage_ratios(hard, amounts)
    levels = {name: level(r) for name, r in ratios.items()}
    plan.levels = levels
    enforcement = spec.enforcement.storage if spec is not None and winner is not None else "Warn"
    blocked = enforcement == "BlockWrites" and levels.get("storage") == EXCEEDED
    plan.role = desired_role(hard, blocked)
    policy = spec.noisy_neighbor if spec is not None and winner is not None else NoisyNeighborPolicy()
    prev_noisy: bool | None
    if memory is not None and memory.uid == uid and memory.noisy is not None:
        prev_noisy, prev_contained = memory.noisy, memory.contained
    else:
        prev_noisy = _noisy_from(quota_status if winner is not None else tenant_status)
        prev_contained = tuple((quota_status.get("load") or {}).get("contained") or ())
    view = probe.load
    verdict = view.verdict if view is not None else None
    noisy: bool | None = verdict.noisy if verdict is not None else prev_noisy
    contained: list[str] = []
    if noisy and policy.containment is not None:
        c = policy.containment
        conn_limit, timeout, contained = contain(
            plan.role.connection_limit, plan.role.statement_timeout_ms,
            connections=(c.connections.factor, c.connections.floor) if c.connections else None,
            statement_timeout=((c.statement_timeout.factor, limit_amount("statementTimeout", c.statement_timeout.floor))
                               if c.statement_timeout else None),
        )
        plan.role = replace(plan.role, connection_limit=conn_limit, statement_timeout_ms=timeout)
    plan.role_changes = role_changes(state, plan.role)
    plan.noisy = noisy
    plan.load_share = verdict.share if verdict is not None else None
    where = f"database target {probe.target!r}"
    if verdict is not None and view is not None:
        load_text = (f"{verdict.share:.0%} of the load on {where} over {view.window} "
                     f"({verdict.ratio:g}x the average of {verdict.tenants} tenants, threshold {policy.multiple:g}x)")
    else:
        load_text = f"load on {where} not measured over a window yet"
    if noisy and not prev_noisy:
        plan.events.append((event_target, "Warning", "NoisyNeighbor", f"noisy neighbour: {load_text}"))
    elif prev_noisy and noisy is False:
        plan.events.append((event_target, "Normal", "NoisyNeighborCalm", f"no longer a noisy neighbour: {load_text}"))
    lowered = sorted(set(contained) - set(prev_contained))
    restored = sorted(set(prev_contained) - set(contained))
    if lowered:
        what = _contained_text(lowered, plan.role)
        plan.events.append((event_target, "Warning", "NoisyNeighborContained", f"contained while noisy: {what}"))
        plan.ledger.append(("contain", f"lowered {what}"))
    if restored:
        what = _contained_text(restored, plan.role)
        plan.events.append((event_target, "Normal", "NoisyNeighborReleased", f"containment undone: {what}"))
        plan.ledger.append(("release", f"restored {what}"))
    plan.terminate = "readOnly" in plan.role_changes
    doc = registry_document(hard, enforcement=enforcement, blocked=blocked, active=active,
                            quota=winner["metadata"]["name"] if winner is not None else None)
    if doc != state.published:
        plan.publish = doc

    for name, new in levels.items():
        old = prev_levels.get(name, OK)
        text = _describe(name, used[name], hard[name], ratios[name])
        if new > old:
            if new == EXCEEDED:
                plan.events.append((event_target, "Warning", "QuotaExceeded", f"limit reached: {text}"))
            else:
                plan.events.append((event_target, "Warning", "QuotaNearLimit",
                                    f"at {NEAR_LIMIT_RATIO:.0%} or more of the limit: {text}"))
        elif new < old:
            where = "under its limit" if new == NEAR else "under the near-limit threshold"
            plan.events.append((event_target, "Normal", "QuotaBackUnderLimit", f"back {where}: {text}"))
    if "readOnly" in plan.role_changes:
        if blocked:
            plan.events.append((event_target, "Warning", "WritesBlocked",
                                f"storage over its limit ({used['storage']} of {hard['storage']}): new sessions "
                                "of the tenant are read-only, open sessions were ended"))
        else:
            plan.events.append((event_target, "Normal", "WritesAllowed",
                                "writes allowed again; sessions opened while read-only were ended"))
    plan.memory = Memory(uid, tier, levels, active_keys, noisy, tuple(contained))
    window = view.window if view is not None else policy.window
    noisy_cond = _noisy_condition(
        noisy, verdict is not None or noisy is not None,
        f"{{}} {policy.multiple:g}x the average tenant's load on {where} over {window}",
    )

    if winner is None and noisy is not None and tenant_status.get("conditions"):
        current = next((c for c in tenant_status.get("conditions") or [] if c.get("type") == CONDITION_NOISY_NEIGHBOR),
                       None)
        if current is None or current.get("status") != noisy_cond.status:
            generation = int(tenant["metadata"].get("generation") or 0)
            plan.tenant_patch = {**(plan.tenant_patch or {}),
                                 "conditions": merge(tenant_status.get("conditions"), [noisy_cond], generation)}
            plan.tenant_version = tenant["metadata"].get("resourceVersion")

    if winner is not None:
        generation = int(winner["metadata"].get("generation") or 0)
        near = sorted(n for n, lv in levels.items() if lv >= NEAR)
        over = sorted(n for n, lv in levels.items() if lv == EXCEEDED)
        ready_message = f"limits in force on role {probe.ident}"
        if blocked:
            ready_message += "; writes blocked: storage over its limit"
        conds = [
            Cond("Ready", "True", "Enforced", ready_message),
            Cond(CONDITION_NEAR_LIMIT, "True", "ThresholdReached",
                 "; ".join(_describe(n, used[n], hard[n], ratios[n]) for n in near))
            if near else Cond(CONDITION_NEAR_LIMIT, "False", "BelowThreshold",
                              f"every limit under {NEAR_LIMIT_RATIO:.0%}"),
            Cond(CONDITION_EXCEEDED, "True", "LimitReached",
                 "; ".join(_describe(n, used[n], hard[n], ratios[n]) for n in over)
                 + ("; writes blocked" if blocked else ""))
            if over else Cond(CONDITION_EXCEEDED, "False", "WithinLimits", "every limit under its value"),
            noisy_cond,
        ]
        desired = {
            "observedGeneration": generation,
            "conditions": merge(quota_status.get("conditions"), conds, generation),
            "hard": hard,
            "used": used,
            "usageRatio": ratios,
            "activeOverrides": [
                ActiveOverride(limit=o.limit, value=o.value, expires_at=o.expires_at, reason=o.reason).to_api()
                for _, o in sorted(active.items())
            ],
        }
        last = parse_time(quota_status.get("lastMeasuredAt"))
        stale = last is None or now - last >= stale_after
        load_doc = _load_status(quota_status.get("load"), view, contained, stale=stale)
        if load_doc is not None:
            desired["load"] = load_doc
        patch = merge_patch(quota_status, desired)
        if patch or stale:
            patch["lastMeasuredAt"] = iso(now.replace(microsecond=0))
        if patch:
            plan.quota_patches.append((winner, patch))
    return plan


def _noisy_from(status: Mapping[str, Any]) -> bool | None:
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION_NOISY_NEIGHBOR), None)
    if cond is None or cond.get("status") not in ("True", "False"):
        return None
    return bool(cond.get("status") == "True")


def _noisy_condition(noisy: bool | None, measured: bool, template: str) -> Cond:
    """The NoisyNeighbor condition; its message holds no measured numbers (those are in
    status.load and the Events), so it is not rewritten at every pass."""
    if noisy:
        return Cond(CONDITION_NOISY_NEIGHBOR, "True", "LoadAboveThreshold", template.format("above"))
    if noisy is None or not measured:
        return Cond(CONDITION_NOISY_NEIGHBOR, "Unknown", "NotMeasured", "load not measured over a window yet")
    return Cond(CONDITION_NOISY_NEIGHBOR, "False", "LoadWithinThreshold", template.format("within"))


def _contained_text(attributes: Sequence[str], role: RoleSettings) -> str:
    parts = []
    for a in attributes:
        if a == "connections":
            parts.append(f"connection limit now {role.connection_limit}")
        else:
            parts.append(f"statement_timeout now {role.statement_timeout_ms}ms"
                         if role.statement_timeout_ms is not None else "statement_timeout now unset")
    return ", ".join(parts)


LOAD_KEYS = ("source", "detail", "window", "share", "contained")
"""status.load is rewritten when one of these changes (or with lastMeasuredAt): a busy tenant's
counters change at every pass, and a status write per tenant per pass would not scale."""


def _load_status(current: Mapping[str, Any] | None, view: LoadView | None, contained: Sequence[str], *,
                 stale: bool) -> dict[str, Any] | None:
    """The desired status.load, or None to leave it as it is."""
    if view is None or view.verdict is None:
        if current and list(current.get("contained") or []) != list(contained):
            return {**current, "contained": list(contained)}
        return None
    v = view.verdict
    doc = LoadStatus(
        source=view.source, detail=view.detail, window=view.window,
        share=round(min(max(v.share, 0.0), 1.0), 2), ratio_to_average=v.ratio,
        execution_seconds=round(max(v.delta.load, 0.0), 3), calls=max(v.delta.calls, 0), rows=max(v.delta.rows, 0),
        shared_blocks=max(v.delta.shared_blocks, 0), temp_blocks=max(v.delta.temp_blocks, 0),
        active_sessions=view.active, waiting_sessions=view.waiting, wait_events=list(view.wait_events),
        storage_growth_bytes=v.delta.storage_growth, contained=list(contained),
    ).to_api()
    if current and not stale and all(current.get(k) == doc.get(k) for k in LOAD_KEYS):
        return None
    return doc


LOAD_COUNTERS = (metrics.TENANT_RESOURCE_USAGE, metrics.TENANT_RESOURCE_CALLS, metrics.TENANT_RESOURCE_ROWS,
                 metrics.TENANT_RESOURCE_SHARED_BLOCKS, metrics.TENANT_RESOURCE_TEMP_BLOCKS)
LOAD_SERIES = (*LOAD_COUNTERS, metrics.TENANT_SESSIONS_ACTIVE, metrics.TENANT_SESSIONS_WAITING)
"""Per-tenant load series, removed with the tenant."""


def metric_amount(limit: str, value: str) -> float:
    """A limit for Prometheus: bytes, seconds (statementTimeout), counts."""
    amount = limit_amount(limit, value)
    return amount / 1000 if limit == "statementTimeout" else float(amount)


# --- The service --------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the cache keeps of an object: not its managedFields, never read here and often its
    largest part; the cache holds every Tenant and Quota, so this is most of the memory that grows
    with the fleet."""
    out = dict(body)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


def _tenant_ref(quota: Mapping[str, Any]) -> str | None:
    ref = ((quota.get("spec") or {}).get("tenantRef") or {}).get("name")
    return str(ref) if ref else None


def _tenant_state(tenant: Mapping[str, Any]) -> tuple[str, str]:
    """What a Tenant's limits depend on: (uid, tier)."""
    return (str(tenant["metadata"].get("uid") or ""), str((tenant.get("spec") or {}).get("tier") or "free"))


def _quota_version(quota: Mapping[str, Any]) -> tuple[str, int]:
    """What a Quota's evaluation depends on: (uid, generation); status and metadata edits do not count."""
    return (str(quota["metadata"].get("uid") or ""), int(quota["metadata"].get("generation") or 0))


def _first_provisioning(tenant: Mapping[str, Any], now: datetime) -> bool:
    """The Tenant's own status says its first provisioning is under way: no status yet, or
    Reconciling without ever having been provisioned (no tenantId) and neither Ready nor Stalled;
    and it was created less than FIRST_PROVISIONING_GRACE ago (past that, its Quota is evaluated
    anyway and says TenantNotReady)."""
    meta = tenant["metadata"]
    created = parse_time(meta.get("creationTimestamp"))
    if meta.get("deletionTimestamp") or created is None or now - created > FIRST_PROVISIONING_GRACE:
        return False
    status = tenant.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if not conds:
        return True
    return (not status.get("tenantId") and conds.get("Reconciling") == "True"
            and conds.get("Ready") != "True" and conds.get("Stalled") != "True")


def _is_ready(body: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


class QuotaService:
    """The quota loop and the per-tenant reconcile the handlers call."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.memory: dict[Key, Memory] = {}
        self.expiries: dict[Key, datetime] = {}
        self.epochs: defaultdict[Key, int] = defaultdict(int)
        self.applied: dict[Key, tuple[str, str]] = {}
        """Tenants this process enforced, with (uid, tier): a Tenant event for anything else
        (new, re-created, tier changed) triggers an immediate evaluation."""
        self.enforced_quotas: dict[Key, set[tuple[str, int]]] = {}
        """(uid, generation) of the Quotas naming a tenant at its last enforced evaluation: a Quota
        handler for a version already enforced has nothing to change (the pass re-measures)."""
        self.series: dict[Key, set[str]] = {}
        self.initial_pass_done = False
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[Key] = set()
        self._rerun: dict[Key, set[str]] = {}
        self._deferred: set[Key] = set()
        """Tenants whose new Quota waits for the end of their first provisioning (see reconcile_tenant)."""
        # What the watch streams last showed, like an informer cache: a Tenant event must not cost
        # a LIST of every Quota (O(N^2) API traffic and JSON parsing in a mass creation).
        self._quotas: dict[str, dict[str, dict[str, Any]]] = {}
        self._tenants: dict[Key, dict[str, Any]] = {}
        # The cached Quotas by the tenant they name: one tenant's evaluation must not scan every
        # Quota of its namespace (that would make a mass creation quadratic).
        self._quotas_by_tenant: dict[Key, dict[str, dict[str, Any]]] = {}
        self._quota_refs: dict[Key, str] = {}
        self._seen_listing = {QUOTAS: False, TENANTS: False}
        self._aggregates_due = False
        self._probe_batches: dict[str, list[tuple[Subject, asyncio.Future[Probe]]]] = {}
        self._passes = 0
        self.histories: Histories[Key] = Histories()
        """Load samples per tenant (reconcilers/noisy.py), from the periodic passes."""
        self.load_views: dict[Key, LoadView] = {}
        """The last pass's load of each tenant: a handler's evaluation keeps its verdict."""
        self._capabilities: dict[str, tuple[int, dbload.LoadCapabilities]] = {}
        self._policies: dict[tuple[str, int], tuple[NoisyNeighborPolicy, Policy]] = {}

    def observe(self, plural: str, type_: str | None, body: Mapping[str, Any]) -> None:
        """Keep the cache of Quotas and Tenants from their watch events (Kopf's initial listing too)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        self._seen_listing[plural] = True
        if type_ == "DELETED":
            if plural == QUOTAS:
                self._quotas.get(namespace, {}).pop(name, None)
                self._index_quota(namespace, name, None)
            else:
                self._tenants.pop((namespace, name), None)
            return
        self._store(plural, body)

    def _cached(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        if plural == QUOTAS:
            return self._quotas.get(namespace, {}).get(name)
        return self._tenants.get((namespace, name))

    def _store(self, plural: str, body: Mapping[str, Any]) -> None:
        """Cache ``body`` unless the cache already holds a newer version of the object: the answer
        to our own status patch is cached at once, and its watch event, or an older one still in
        flight, must not take the cache back (an evaluation from a stale status would write the
        same status again)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        cached = self._cached(plural, namespace, name)
        if cached is not None and older_version(meta, cached["metadata"]):
            return
        if plural == QUOTAS:
            stored = self._quotas.setdefault(namespace, {})[name] = _slim(body)
            self._index_quota(namespace, name, stored)
        else:
            self._tenants[(namespace, name)] = _slim(body)

    def _index_quota(self, namespace: str, name: str, body: dict[str, Any] | None) -> None:
        old = self._quota_refs.pop((namespace, name), None)
        if old is not None:
            by_name = self._quotas_by_tenant.get((namespace, old), {})
            by_name.pop(name, None)
            if not by_name:
                self._quotas_by_tenant.pop((namespace, old), None)
        ref = _tenant_ref(body) if body is not None else None
        if body is not None and ref is not None:
            self._quota_refs[(namespace, name)] = ref
            self._quotas_by_tenant.setdefault((namespace, ref), {})[name] = body

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.ctx.settings.quota_interval_seconds * STALE_MEASUREMENTS)

    # --- scheduling ----------------------------------------------------------------------------

    def poke(self) -> None:
        """Make the loop recompute when to wake (a new, earlier override expiry)."""
        if self._wake is not None:
            self._wake.set()

    async def run_forever(self) -> None:
        try:
            await self._loop()
        finally:  # shutdown: background evaluations must not outlive the clients they use
            for task in list(self._tasks):
                task.cancel()

    async def _loop(self) -> None:
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_pass = loop.time()
        interval = self.ctx.settings.quota_interval_seconds
        while True:
            if loop.time() >= next_pass:
                wait = interval
                try:
                    await self.pass_once()
                except asyncio.CancelledError:
                    raise
                except ApiError as exc:  # e.g. 429 while the API server starts
                    log.warning("quota pass failed", error="KubernetesAPI", status=exc.status)
                    wait = min(interval, RETRY_FAILED_PASS_SECONDS)
                except Exception:
                    log.exception("quota pass failed")
                    wait = min(interval, RETRY_FAILED_PASS_SECONDS)
                self.initial_pass_done = True
                next_pass = loop.time() + wait
            await self.expire_due()
            delay = next_pass - loop.time()
            upcoming = min(self.expiries.values(), default=None)
            if upcoming is not None:
                delay = min(delay, (upcoming + EXPIRY_GRACE - _now()).total_seconds())
            self._wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def expire_due(self) -> None:
        """Evaluate now every tenant whose override has just ended (not at the next pass)."""
        now = _now()
        due = [key for key, at in self.expiries.items() if at + EXPIRY_GRACE <= now]
        for key in due:
            try:
                await self.reconcile_tenant(*key, trigger="override-expiry")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # try again shortly, without spinning
                log.warning("override expiry evaluation failed", namespace=key[0], tenant=key[1],
                            error=type(exc).__name__)
                self.expiries[key] = now + timedelta(seconds=5)

    # --- reading the cluster --------------------------------------------------------------------

    def _watched(self, namespace: str) -> bool:
        namespaces = self.ctx.settings.namespace_list
        return not namespaces or namespace in namespaces

    async def _get_tenant(self, namespace: str, name: str) -> dict[str, Any] | None:
        cached = self._tenants.get((namespace, name))
        if cached is not None:
            return cached
        return await self.ctx.kube.get_object(TENANTS, namespace, name)

    async def _tenant_quotas(self, namespace: str, tenant: str) -> list[dict[str, Any]]:
        """The Quotas naming ``tenant``: from the watch cache, from a LIST before it filled."""
        if self._seen_listing[QUOTAS]:
            return list(self._quotas_by_tenant.get((namespace, tenant), {}).values())
        return [q for q in await self.ctx.kube.list_objects(QUOTAS, namespace) if _tenant_ref(q) == tenant]

    # --- reading the databases ---------------------------------------------------------------------

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
            if not isinstance(exc, psycopg_pool.PoolTimeout | psycopg.OperationalError):
                log.warning("quota measurement failed", target=target, error=type(exc).__name__)
            problem = ("DatabaseUnavailable", f"database {target!r} unavailable: {type(exc).__name__}")
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

    def _policy(self, subject: Subject) -> tuple[NoisyNeighborPolicy, Policy]:
        """The NoisyNeighbor policy of the Quota in force (defaults without one), parsed once per
        Quota generation."""
        quota = subject.quotas[0] if subject.quotas else None
        version = _quota_version(quota) if quota is not None else ("", 0)
        cached = self._policies.get(version)
        if cached is None:
            spec = NoisyNeighborPolicy()
            if quota is not None:
                with contextlib.suppress(ValidationError):
                    spec = QuotaSpec.model_validate(quota.get("spec") or {}).noisy_neighbor
            cached = (spec, Policy(multiple=spec.multiple, window=parse_duration(spec.window).total_seconds(),
                                   min_load=parse_duration(spec.min_load).total_seconds()))
            if len(self._policies) > 4 * max(len(self._tenants), 256):
                self._policies.clear()
            self._policies[version] = cached
        return cached

    async def _capabilities_of(self, conn: Conn, target: str) -> dbload.LoadCapabilities:
        cached = self._capabilities.get(target)
        if cached is None or self._passes - cached[0] >= CAPABILITIES_EVERY:
            caps = await dbload.capabilities(conn)
            if cached is None or cached[1] != caps:
                log.info("tenant load statistics", target=target, pg_stat_statements=caps.statements,
                         pg_read_all_stats=caps.read_all_stats)
            self._capabilities[target] = (self._passes, caps)
            metrics.TENANT_LOAD_STATEMENTS.labels(target=target).set(1 if caps.statements else 0)
            return caps
        return cached[1]

    async def _measure_load(
        self, conn: Conn, target: str, subjects: Sequence[Subject], idents: Mapping[Key, str],
        measured: Mapping[str, dbq.Measured],
    ) -> dict[Key, LoadView]:
        """Read the load of every tenant of the target (one statement), add it to their histories
        and judge them against each other."""
        caps = await self._capabilities_of(conn, target)
        try:
            loads = await dbload.read(conn, caps, sorted(set(idents.values())))
        except dbload.STATEMENTS_UNAVAILABLE as exc:
            if not caps.statements:
                raise
            log.warning("pg_stat_statements unreadable; sampling sessions", target=target, error=type(exc).__name__)
            caps = replace(caps, statements=False)
            self._capabilities[target] = (self._passes, caps)
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
            spec, policies[key] = self._policy(by_key[key])
            windows[key] = spec.window
            if per_tenant:
                self._count_load(key, before, history.samples[-1], role)
        noisy_now = [k for k in idents if (m := self.memory.get(k)) is not None and m.noisy]
        verdicts = assess({k: self.histories.by_key[k] for k in idents}, policies, noisy_now)
        views: dict[Key, LoadView] = {}
        for key, ident in idents.items():
            role = loads.get(ident, dbload.RoleLoad())
            views[key] = LoadView(verdicts.get(key), source, caps.detail(), windows[key], role.active, role.waiting,
                                  role.wait_events)
        self.load_views.update(views)
        return views

    def _count_load(self, key: Key, before: Any, after: Any, role: dbload.RoleLoad) -> None:
        labels = {"namespace": key[0], "tenant": key[1]}
        if before is not None:
            for counter, amount in (
                (metrics.TENANT_RESOURCE_USAGE, after.load - before.load),
                (metrics.TENANT_RESOURCE_CALLS, after.calls - before.calls),
                (metrics.TENANT_RESOURCE_ROWS, after.rows - before.rows),
                (metrics.TENANT_RESOURCE_SHARED_BLOCKS, after.shared_blocks - before.shared_blocks),
                (metrics.TENANT_RESOURCE_TEMP_BLOCKS, after.temp_blocks - before.temp_blocks),
            ):
                counter.labels(**labels).inc(max(float(amount), 0.0))
        else:
            for counter in LOAD_COUNTERS:
                counter.labels(**labels)  # the series exist from the first pass, at 0
        metrics.TENANT_SESSIONS_ACTIVE.labels(**labels).set(role.active)
        metrics.TENANT_SESSIONS_WAITING.labels(**labels).set(role.waiting)
        self.series.setdefault(key, set()).add("load")

    # --- evaluating and applying --------------------------------------------------------------------

    async def _probe_one(self, target: str, subject: Subject) -> Probe:
        """Measure one tenant together with the others whose evaluations start meanwhile: a burst
        of new tenants becomes one probe query per few dozen tenants instead of one each (its
        planning and catalog scans cost about the same for 1 tenant as for 30)."""
        loop = asyncio.get_running_loop()
        batch = self._probe_batches.get(target)
        if batch is None:
            batch = self._probe_batches[target] = []
            loop.call_later(PROBE_GATHER_SECONDS, self._probe_batch, target)
        future: asyncio.Future[Probe] = loop.create_future()
        batch.append((subject, future))
        return await future

    def _probe_batch(self, target: str) -> None:
        batch = self._probe_batches.pop(target, [])

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

    async def reconcile_tenant(
        self, namespace: str, name: str, *, trigger: str, wanted: Callable[[], bool] | None = None,
        defer_first_provisioning: bool = False,
    ) -> Plan | None:
        """Evaluate one tenant now, from fresh reads. Raises Retry for transient failures (after
        reporting them in status). None is returned when no evaluation was needed: ``wanted``, asked
        once the tenant's lock is held, found another evaluation did it meanwhile, or, with
        ``defer_first_provisioning``, the Tenant is being provisioned for the first time (its Ready
        or Stalled status triggers the evaluation, which writes the Quota's status once)."""
        key = (namespace, name)
        async with self.ctx.lock(LOCK_KIND, namespace, name):
            if wanted is not None and not wanted():
                log.debug("quota evaluation not needed", namespace=namespace, tenant=name, trigger=trigger)
                return None
            if defer_first_provisioning and key not in self._tenants and self._seen_listing[TENANTS]:
                # A new Quota whose Tenant the watch has not shown yet: in a bulk creation, the
                # Tenant created just before it. The Tenant's own events evaluate it (at its first
                # Ready); only if it stays unseen is it read (a GET for each would be one per tenant).
                self._deferred.add(key)
                asyncio.get_running_loop().call_later(UNSEEN_TENANT_GRACE_SECONDS, self._still_unseen, key)
                return None
            try:
                tenant = await self._get_tenant(namespace, name)
                # The watch cache may have seen more than a GET that just returned (a Stalled status).
                latest = self._tenants.get(key) or tenant
                if (defer_first_provisioning and latest is not None and key not in self.applied
                        and _first_provisioning(latest, _now())):
                    self._deferred.add(key)
                    log.debug("quota evaluation deferred until the tenant is provisioned",
                              namespace=namespace, tenant=name, trigger=trigger)
                    return None
                quotas = sort_quotas(await self._tenant_quotas(namespace, name))
            except ApiError as exc:
                raise Retry("KubernetesAPI", f"reading Tenant/Quotas failed: {exc.status}") from exc
            subject = Subject(namespace, name, tenant, quotas)
            probe = None
            if tenant is not None and not tenant["metadata"].get("deletionTimestamp"):
                target = str((tenant.get("spec") or {}).get("database") or "default")
                probe = await self._probe_one(target, subject)
            plan = await self.apply(subject, probe, trigger=trigger)
            self.epochs[key] += 1
        if probe is not None and probe.problem and probe.problem[0] == "DatabaseUnavailable":
            raise Retry(*probe.problem)
        return plan

    async def apply(self, subject: Subject, probe: Probe | None, *, trigger: str) -> Plan:
        """Evaluate one subject and carry the plan out. Call with the subject's lock held."""
        key = subject.key
        self._deferred.discard(key)
        memory = self.memory.get(key)
        plan = evaluate(subject, probe, tier_limits=self.ctx.settings.tier_limits, now=_now(), memory=memory,
                        stale_after=self.stale_after)
        if plan.enforce and (plan.role_changes or plan.publish is not None or plan.ledger):
            await self._write_database(plan)
        for body, patch in plan.quota_patches:
            await self._patch_status(QUOTAS, body, patch)
        if plan.tenant_patch and subject.tenant is not None:
            await self._patch_status(TENANTS, subject.tenant, plan.tenant_patch, resource_version=plan.tenant_version)
        for body, type_, reason, message in plan.events:
            self.ctx.events.post(body, type_, reason, message)
        if plan.memory is not None:
            self.memory[key] = plan.memory
        else:
            self.memory.pop(key, None)
        if plan.next_expiry is not None:
            if self.expiries.get(key) != plan.next_expiry:
                self.expiries[key] = plan.next_expiry
                self.poke()
        else:
            self.expiries.pop(key, None)
        if plan.enforce and subject.tenant is not None and (subject.tenant.get("status") or {}).get("conditions"):
            self.applied[key] = _tenant_state(subject.tenant)
            self.enforced_quotas[key] = {_quota_version(q) for q in subject.quotas}
        else:
            # Not enforced, or enforced before the Tenant's first status (which effectiveLimits
            # waits for): its next Ready event evaluates it again.
            self.enforced_quotas.pop(key, None)
            if subject.tenant is None or plan.enforce:
                self.applied.pop(key, None)
        self._update_series(key, plan if subject.tenant is not None else None)
        if plan.role_changes or plan.publish is not None or plan.expired:
            log.info("quota applied", namespace=key[0], tenant=key[1], trigger=trigger,
                     role_changes=plan.role_changes or None, published=plan.publish is not None,
                     sessions_ended=plan.terminate or None, overrides_expired=plan.expired or None)
        return plan

    async def _write_database(self, plan: Plan) -> None:
        assert plan.target
        assert plan.ident
        assert plan.role is not None
        role, want = plan.ident, plan.role
        try:
            # Every step is idempotent: a try that met a concurrent change of the same role
            # (a rotation, a deletion) is simply made again.
            async for attempt in AsyncRetrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(4),
                                               wait=wait_exponential_jitter(multiplier=0.1, max=1.0), reraise=True):
                with attempt:
                    # Pipeline mode: the statements go in one round trip (an error skips the rest,
                    # and the whole attempt is made again).
                    async with self.ctx.targets.connection(plan.target) as conn:
                        # The owner's attributes are the record; its login roles get the same.
                        roles = [role, *await sqlt.existing_logins(conn, role)] if plan.role_changes else [role]
                    async with self.ctx.targets.connection(plan.target) as conn, conn.pipeline():
                        for r in roles:
                            if "connections" in plan.role_changes:
                                await dbq.set_connection_limit(conn, r, want.connection_limit)
                            if "statementTimeout" in plan.role_changes:
                                await dbq.set_statement_timeout(conn, r, want.statement_timeout_ms)
                            if "readOnly" in plan.role_changes:
                                await dbq.set_read_only(conn, r, want.read_only)
                                # Sessions keep the default they logged in with: end them so the change holds.
                                await sqlt.terminate_sessions(conn, r)
                        if plan.publish is not None and plan.tenant_id:
                            await dbq.publish(conn, self.control, plan.tenant_id, plan.publish)
                        for kind, detail in plan.ledger:
                            if plan.tenant_id:
                                await dbjobs.record(conn, self.control, plan.tenant_id, kind, detail=detail,
                                                    requested_by=OPERATOR)
        except psycopg.errors.UndefinedObject:
            log.info("role vanished while applying limits", role=role)  # dropped meanwhile: nothing to limit
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise Retry("DatabaseUnavailable", f"database {plan.target!r} unavailable: {type(exc).__name__}") from exc

    async def _patch_status(self, plural: str, body: Mapping[str, Any], patch: dict[str, Any],
                            resource_version: str | None = None) -> None:
        """Merge-patch the status; with ``resource_version``, only if the object is still that version
        (a patch replacing a list, such as the Tenant's conditions, must not undo a newer write)."""
        meta = body["metadata"]
        try:
            written = await self.ctx.kube.patch_status_if(plural, meta["namespace"], meta["name"], patch,
                                                          resource_version)
        except ApiError as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            if exc.status == 409 and resource_version:
                return  # changed meanwhile: the next evaluation decides again from the newer object
            raise Retry("KubernetesAPI", f"writing {plural} status failed: {exc.status}") from exc
        # The next evaluation compares with what we just wrote, even before its watch event arrives.
        if self._cached(plural, meta["namespace"], meta["name"]) is not None:
            self._store(plural, written)

    # --- metrics -----------------------------------------------------------------------------------

    def _update_series(self, key: Key, plan: Plan | None) -> None:
        """Per-tenant gauges from an enforced plan; None removes them (the tenant is gone). A plan
        that could not measure (database down) leaves the last values."""
        if not self.ctx.settings.quota_per_tenant_metrics or (plan is not None and not plan.enforce):
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
        elif "share" in self.series.get(key, set()) and plan is not None:
            wanted.add("share")
        if plan is not None and plan.noisy is not None:
            metrics.TENANT_NOISY_NEIGHBOR.labels(**labels).set(1 if plan.noisy else 0)
            wanted.add("noisy")
        if plan is not None and "load" in self.series.get(key, set()):
            wanted.add("load")
        for series in self.series.get(key, set()) - wanted:
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
            self.series[key] = wanted
        else:
            self.series.pop(key, None)

    def _update_aggregates(self) -> None:
        """Recount the per-state gauges soon, at most once a second: a count over every tenant
        after each evaluation would make a mass creation quadratic."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._recount_aggregates()
            return
        if not self._aggregates_due:
            self._aggregates_due = True
            loop.call_later(AGGREGATES_DELAY_SECONDS, self._recount_aggregates)

    def _recount_aggregates(self) -> None:
        self._aggregates_due = False
        counts: Counter[tuple[str, int]] = Counter()
        for mem in self.memory.values():
            for name, lv in mem.levels.items():
                if lv >= NEAR:
                    counts[(name, NEAR)] += 1
                if lv == EXCEEDED:
                    counts[(name, EXCEEDED)] += 1
        metrics.TENANT_NOISY_NEIGHBORS.set(sum(1 for mem in self.memory.values() if mem.noisy))
        for name in LIMIT_NAMES:
            for lv, state in LEVEL_NAMES.items():
                metrics.TENANT_QUOTA_TENANTS.labels(resource=name, state=state).set(counts.get((name, lv), 0))

    def forget(self, key: Key) -> None:
        """Drop what this process remembers about a tenant key (its Tenant and Quotas are gone)."""
        self.memory.pop(key, None)
        self.expiries.pop(key, None)
        self.applied.pop(key, None)
        self.enforced_quotas.pop(key, None)
        self._deferred.discard(key)
        self.epochs.pop(key, None)
        self.histories.forget(key)
        self.load_views.pop(key, None)
        self._update_series(key, None)

    # --- the periodic pass --------------------------------------------------------------------------

    async def _every(self, plural: str, relist: bool) -> list[dict[str, Any]]:
        """Every Tenant or Quota, from the watch cache; from a LIST (which then refreshes the
        cache) when ``relist`` or before any watch event came: parsing every object of a large
        fleet at every pass would hold the event loop for long; the periodic LIST still drops what
        a watch re-list may have missed (a deletion while the stream was down)."""
        if self._seen_listing[plural] and not relist:
            if plural == QUOTAS:
                return [q for by_name in self._quotas.values() for q in by_name.values()]
            return list(self._tenants.values())
        items = await self.ctx.kube.list_objects(plural)
        listed = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in items}
        if plural == QUOTAS:
            for namespace, by_name in self._quotas.items():
                for name in [n for n in by_name if (namespace, n) not in listed]:
                    del by_name[name]
                    self._index_quota(namespace, name, None)
        else:
            for key in [k for k in self._tenants if k not in listed]:
                del self._tenants[key]
        for obj in items:
            self._store(plural, obj)
        return items

    async def pass_once(self) -> int:
        """Measure and evaluate every tenant; returns how many subjects were evaluated."""
        started = time.monotonic()
        epochs = dict(self.epochs)
        relist = self._passes % RELIST_EVERY == 0
        self._passes += 1
        tenants = [t for t in await self._every(TENANTS, relist) if self._watched(t["metadata"]["namespace"])]
        quotas = [q for q in await self._every(QUOTAS, relist) if self._watched(q["metadata"]["namespace"])]
        subjects: dict[Key, Subject] = {}
        for t in tenants:
            key = (t["metadata"]["namespace"], t["metadata"]["name"])
            subjects[key] = Subject(key[0], key[1], t, [])
        for q in quotas:
            ref = _tenant_ref(q)
            if ref is None:
                continue
            key = (q["metadata"]["namespace"], ref)
            subjects.setdefault(key, Subject(key[0], key[1], None, [])).quotas.append(q)
        if not relist:
            # A Quota whose Tenant the cache has not seen may name a Tenant that Kopf has not
            # delivered yet (thousands created at once): only a LIST may conclude TenantNotFound.
            # Its own events judge it meanwhile (a Quota event reads a missing Tenant with a GET).
            subjects = {k: s for k, s in subjects.items() if s.tenant is not None or k in self.memory}
        for s in subjects.values():
            s.quotas = sort_quotas(s.quotas)

        # Tenants in their first provisioning wait for their Ready (or Stalled) event, like a new
        # Quota's handler does: measuring them now would only write a status replaced seconds later.
        now = _now()
        waiting = {k for k, s in subjects.items()
                   if s.tenant is not None and k not in self.applied and _first_provisioning(s.tenant, now)}
        self._deferred |= waiting
        by_target: dict[str, list[Subject]] = defaultdict(list)
        for k, s in subjects.items():
            if k not in waiting and s.tenant is not None and not s.tenant["metadata"].get("deletionTimestamp"):
                by_target[str((s.tenant.get("spec") or {}).get("database") or "default")].append(s)
        probes: dict[Key, Probe] = {}
        for target, items in by_target.items():
            with metrics.QUOTA_MEASURE_DURATION.labels(target=target).time():
                probes.update(await self.probe_target(target, items, load=True))

        sem = asyncio.Semaphore(self.ctx.settings.reconcile_concurrency)

        async def one(s: Subject) -> None:
            async with sem, self.ctx.lock(LOCK_KIND, s.namespace, s.name):
                if self.epochs.get(s.key, 0) != epochs.get(s.key, 0):
                    return  # a handler evaluated it from fresher reads meanwhile
                try:
                    await self.apply(s, probes.get(s.key), trigger="interval")
                except Exception as exc:  # one tenant's failure never stops the pass
                    log.warning("quota evaluation failed", namespace=s.namespace, tenant=s.name,
                                error=type(exc).__name__, detail=str(exc)[:200])

        # In slices: an evaluation that changes nothing never waits, so one gather over every
        # subject would run them all in a single turn of the event loop, and a FeatureFlag edit
        # arriving meanwhile would wait for the whole fleet. Between slices the loop serves
        # everything else.
        due = [s for k, s in subjects.items() if k not in waiting]
        for start in range(0, len(due), PASS_SLICE):
            await asyncio.gather(*(one(s) for s in due[start:start + PASS_SLICE]))
            await asyncio.sleep(0)
        for key in (set(self.memory) | set(self.series) | set(self.expiries)) - set(subjects):
            self.forget(key)  # neither a Tenant nor a Quota names it any more
        self._update_aggregates()
        metrics.QUOTA_PASS_DURATION.observe(time.monotonic() - started)
        return len(subjects)

    # --- handler entry points -------------------------------------------------------------------------

    async def handle_quota(self, body: Mapping[str, Any], retry: int = 0, *, created: bool = False) -> None:
        """A new or changed Quota: evaluate its tenant now (edits take effect at once).
        A new Quota of a Tenant still being provisioned for the first time waits for the Tenant's
        Ready (or Stalled) status instead of reporting TenantNotReady for a few seconds: one status
        write instead of two. The periodic pass reports TenantNotReady if provisioning takes longer."""
        ref = _tenant_ref(body)
        if ref is None:
            return
        namespace = body["metadata"]["namespace"]
        pending = f"{namespace}/{body['metadata']['name']}"
        key, version = (namespace, ref), _quota_version(body)

        def wanted() -> bool:
            return not self._quota_enforced(key, version)

        metrics.PENDING.add(KIND, pending)
        try:
            with metrics.observe_reconcile(KIND):
                await self.reconcile_tenant(namespace, ref, trigger="quota-changed", wanted=wanted,
                                            defer_first_provisioning=created)
        except Retry as exc:
            metrics.record_result(KIND, False, exc.reason)
            raise
        except Exception:
            metrics.record_result(KIND, False, "Internal")
            raise
        metrics.record_result(KIND, True)
        metrics.PENDING.discard(KIND, pending)
        self._update_aggregates()

    def _quota_enforced(self, key: Key, version: tuple[str, int]) -> bool:
        """This version of a Quota is enforced on the tenant as the cache shows it (a tenant-changed
        evaluation that saw the new Quota, a rerun, or our own status write's event): measuring
        again cannot change anything."""
        tenant = self._tenants.get(key)
        return (
            version in self.enforced_quotas.get(key, ())
            and tenant is not None
            and not tenant["metadata"].get("deletionTimestamp")
            and self.applied.get(key) == _tenant_state(tenant)
        )

    def quota_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Quota watch event: evaluate its tenant in the background unless this version of the
        Quota is enforced already.

        This replaces Kopf's create/update/resume handlers, which stored a last-handled annotation
        on every Quota after each evaluation: one PATCH and one more watch event per Quota, for a
        decision the generation makes as well (the evaluation reads the newest Quota from the
        cache, so events handled out of order cannot apply an older spec)."""
        if not self.initial_pass_done:
            return  # the start-up pass evaluates every tenant in bulk
        ref = _tenant_ref(body)
        if ref is None:
            return
        key = (body["metadata"]["namespace"], ref)
        if self._quota_enforced(key, _quota_version(body)):
            return
        task = asyncio.get_running_loop().create_task(
            self._handle_quota_with_retries(dict(body), created=type_ == "ADDED"),
            name=f"quota-changed-{key[0]}-{body['metadata']['name']}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_quota_with_retries(self, body: dict[str, Any], *, created: bool) -> None:
        for attempt in range(8):
            try:
                await self.handle_quota(body, attempt, created=created)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reported in status and metrics; the periodic pass catches up
                log.warning("quota evaluation failed", namespace=body["metadata"]["namespace"],
                            quota=body["metadata"]["name"], trigger="quota-changed", error=type(exc).__name__,
                            attempt=attempt + 1)
                await asyncio.sleep(min(30.0, 2.0 ** attempt) * random.uniform(0.8, 1.2))  # noqa: S311

    async def quota_deleted(self, body: Mapping[str, Any]) -> None:
        """A deleted Quota returns its tenant to tier defaults (or lets a conflicting one apply)."""
        metrics.PENDING.discard(KIND, f"{body['metadata']['namespace']}/{body['metadata']['name']}")
        ref = _tenant_ref(body)
        if ref is not None:
            self.spawn(body["metadata"]["namespace"], ref, "quota-deleted")

    def expected_limits(self, tenant: Mapping[str, Any]) -> dict[str, str] | None:
        """The effective limits this Tenant's next evaluation will publish, from the watch cache:
        the Tenant's own first status carries them, so the evaluation right after it has nothing
        to write there (one status PATCH and one watch event fewer per new tenant). None before
        any Quota was seen."""
        if not self._seen_listing[QUOTAS]:
            return None
        meta = tenant["metadata"]
        quotas = sort_quotas(list(self._quotas_by_tenant.get((meta["namespace"], meta["name"]), {}).values()))
        spec: QuotaSpec | None = None
        if quotas:
            with contextlib.suppress(ValidationError):
                spec = QuotaSpec.model_validate(quotas[0].get("spec") or {})
        tier = str((tenant.get("spec") or {}).get("tier") or "free")
        return effective_limits(self.ctx.settings.tier_limits.get(tier, {}), spec, _now())

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Tenant watch event (TenantWatcher): keep the cache, evaluate if needed."""
        self.observe(TENANTS, type_, body)
        self.tenant_event(type_, body)

    def tenant_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A Tenant changed: evaluate it now if this process has not enforced it as it is now
        (new, re-created or tier changed), or if it is gone (its Quota reports TenantNotFound)."""
        if not self.initial_pass_done:
            return  # the first pass covers every tenant at start-up
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if not self._watched(key[0]):
            return
        if type_ == "DELETED":
            self.applied.pop(key, None)
            self.spawn(key[0], key[1], "tenant-deleted")
            return
        if self._tenant_changed(key, body):
            self.spawn(key[0], key[1], "tenant-changed")
        elif key in self._deferred and not _first_provisioning(body, _now()):
            self._deferred.discard(key)  # not Ready, but no longer provisioning (e.g. Stalled)
            self.spawn(key[0], key[1], "tenant-settled")

    def _still_unseen(self, key: Key) -> None:
        if key not in self._tenants and key in self._deferred:
            self._deferred.discard(key)
            self.spawn(key[0], key[1], "tenant-unseen")  # reads it: TenantNotFound, or evaluated

    def _tenant_changed(self, key: Key, body: Mapping[str, Any] | None) -> bool:
        """A Ready Tenant this process has not enforced as it is now (new, re-created, new tier)."""
        return body is not None and _is_ready(body) and self.applied.get(key) != _tenant_state(body)

    def spawn(self, namespace: str, name: str, trigger: str) -> None:
        """Evaluate a tenant in the background, so a Kopf event handler never waits on it. Events
        arriving while one evaluation runs fold into one more evaluation after it. A
        ``tenant-changed`` evaluation is skipped when, by the time it holds the tenant's lock, the
        cached Tenant is enforced as it is (another evaluation did it: a Quota handler, or the
        one before a rerun, whose own Tenant status write caused the event)."""
        key = (namespace, name)
        if key in self._inflight:
            self._rerun.setdefault(key, set()).add(trigger)
            return
        self._inflight.add(key)

        async def run() -> None:
            triggers = {trigger}
            try:
                while True:
                    only_changed = triggers == {"tenant-changed"}
                    await self._evaluate_with_retries(
                        namespace, name, ",".join(sorted(triggers)),
                        wanted=(lambda: self._tenant_changed(key, self._tenants.get(key))) if only_changed else None,
                    )
                    triggers = self._rerun.pop(key, set())
                    if not triggers:
                        return
            finally:
                self._inflight.discard(key)

        task = asyncio.get_running_loop().create_task(run(), name=f"quota-{namespace}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _evaluate_with_retries(
        self, namespace: str, name: str, trigger: str, wanted: Callable[[], bool] | None = None
    ) -> None:
        for attempt in range(6):
            try:
                await self.reconcile_tenant(namespace, name, trigger=trigger, wanted=wanted)
                if "tenant-deleted" in trigger.split(",") and not await self._tenant_quotas(namespace, name):
                    self.forget((namespace, name))
                self._update_aggregates()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the periodic pass catches up if this keeps failing
                log.warning("quota evaluation failed", namespace=namespace, tenant=name, trigger=trigger,
                            error=type(exc).__name__, attempt=attempt + 1)
                await asyncio.sleep(min(30.0, 2.0 ** attempt) * random.uniform(0.8, 1.2))  # noqa: S311
