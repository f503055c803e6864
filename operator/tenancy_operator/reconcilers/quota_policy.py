"""Quota decisions, pure: a subject (one tenant key with its Tenant, its Quotas and what the
database says) becomes a plan (``evaluate``): effective limits, role attributes, usage levels,
status, Events, the registry document and the noisy-neighbour verdict's consequences. Nothing here
reads or writes anything; ``QuotaService`` (reconcilers/quota.py) observes and applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.common import format_quantity
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
    QuotaStatus,
    limit_amount,
)
from tenancy_operator.conditions import Cond, merge, status_patch
from tenancy_operator.db.quota import RoleQuotaState
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.noisy import Verdict, contain

Key = tuple[str, str]
"""(namespace, tenant name): quotas are per tenant, so is every lock and memory entry."""

OK, NEAR, EXCEEDED = 0, 1, 2
LEVEL_NAMES = {NEAR: "near", EXCEEDED: "exceeded"}
STALE_MEASUREMENTS = 30
"""lastMeasuredAt is refreshed with any other status change, and at least every 30 intervals, so an
idle tenant's Quota is not rewritten every interval just to move a timestamp."""
TRANSIENT_REASONS = ("TenantNotReady", "DatabaseUnavailable", "DatabaseBusy")
"""Ready=False reasons that resolve by themselves (a tenant being provisioned): no Warning Event."""
EXPIRY_GRACE = timedelta(milliseconds=50)
"""Wake a little after an override's expiry so the evaluation sees it expired."""

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
    record = QuotaStatus(conditions=[], observed_generation=generation, hard=dict(hard or {}), active_overrides=[])
    desired = _status_doc(status, record, [Cond("Ready", "False", reason, message)],
                          drop=[CONDITION_NEAR_LIMIT, CONDITION_EXCEEDED])
    if not keep_usage:
        desired.update({"used": {}, "usageRatio": {}})
    changed = _ready(status.get("conditions")).get("reason") != reason
    return status_patch(status, desired), changed


def _status_doc(current: Mapping[str, Any], record: QuotaStatus, conds: list[Cond], *,
                drop: Sequence[str] = ()) -> dict[str, Any]:
    """The desired status from its typed record and conditions. No field of a Quota's status is
    removed by a null (an item of activeOverrides is kept as written, the API server drops nulls
    there), so unset fields are left out; lastMeasuredAt and load are decided by the caller."""
    generation = record.observed_generation or 0
    return {
        "conditions": merge(current.get("conditions"), conds, generation, drop=list(drop)),
        **record.model_dump(mode="json", exclude={"conditions", "last_measured_at", "load"}, exclude_none=True),
    }


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
        patch = status_patch(tenant_status, {"effectiveLimits": hard})
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
        record = QuotaStatus(
            conditions=[], observed_generation=generation, hard=hard, used=used, usage_ratio=ratios,
            active_overrides=[ActiveOverride(limit=o.limit, value=o.value, expires_at=o.expires_at, reason=o.reason)
                              for _, o in sorted(active.items())],
        )
        desired = _status_doc(quota_status, record, conds)
        last = parse_time(quota_status.get("lastMeasuredAt"))
        stale = last is None or now - last >= stale_after
        load_doc = _load_status(quota_status.get("load"), view, contained, stale=stale)
        if load_doc is not None:
            desired["load"] = load_doc
        patch = status_patch(quota_status, desired)
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


def quota_version(quota: Mapping[str, Any]) -> tuple[str, int]:
    """What a Quota's evaluation depends on: (uid, generation); status and metadata edits do not count."""
    return (str(quota["metadata"].get("uid") or ""), int(quota["metadata"].get("generation") or 0))
