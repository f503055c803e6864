"""Quota decisions, pure: a subject (one tenant key with its Tenant, its Quotas and what the
database says) becomes a plan (``evaluate``): the Quota's and the Tenant's status and conditions,
the Events, and the noisy-neighbour verdict's consequences, from the limits and usage that
quota_limits.py computes. Nothing here reads or writes anything; ``QuotaService``
(reconcilers/quota.py) observes and applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.quota import (
    CONDITION_EXCEEDED,
    CONDITION_NEAR_LIMIT,
    CONDITION_NOISY_NEIGHBOR,
    NEAR_LIMIT_RATIO,
    ActiveOverride,
    LoadStatus,
    NoisyContainment,
    NoisyNeighborPolicy,
    QuotaOverride,
    QuotaSpec,
    QuotaStatus,
    limit_amount,
)
from tenancy_operator.conditions import Cond, merge, status_patch
from tenancy_operator.reconcilers import quota_limits as limits
from tenancy_operator.reconcilers.noisy import contain
from tenancy_operator.reconcilers.quota_limits import iso, parse_time
from tenancy_operator.reconcilers.quota_types import LoadView, Memory, Plan, Probe, Subject

STALE_MEASUREMENTS = 30
"""lastMeasuredAt is refreshed with any other status change, and at least every 30 intervals, so an
idle tenant's Quota is not rewritten every interval just to move a timestamp."""
TRANSIENT_REASONS = ("TenantNotReady", "DatabaseUnavailable", "DatabaseBusy")
"""Ready=False reasons that resolve by themselves (a tenant being provisioned): no Warning Event."""


# --- Status ---------------------------------------------------------------------------------------------


def _active_from_status(status: Mapping[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for o in status.get("activeOverrides") or []:
        expires = parse_time(o.get("expiresAt"))
        if o.get("limit") and expires is not None:
            out.add((str(o["limit"]), iso(expires)))
    return out


def _levels_from_status(status: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): limits.level(float(v)) for k, v in (status.get("usageRatio") or {}).items()}


def _ready(conditions: Sequence[Mapping[str, Any]] | None) -> Mapping[str, Any]:
    return next((c for c in conditions or [] if c.get("type") == "Ready"), {})


def _not_in_force(plan: Plan, quota: dict[str, Any], reason: str, message: str, *,
                  hard: Mapping[str, str] | None = None, keep_usage: bool = False, warn: bool = True) -> None:
    """A Quota that does not apply now: its status says why, with a Warning Event (unless not
    ``warn``) when the Ready reason changes."""
    status = quota.get("status") or {}
    generation = int(quota["metadata"].get("generation") or 0)
    record = QuotaStatus(conditions=[], observed_generation=generation, hard=dict(hard or {}), active_overrides=[])
    desired = _status_doc(status, record, [Cond("Ready", "False", reason, message)],
                          drop=[CONDITION_NEAR_LIMIT, CONDITION_EXCEEDED])
    if not keep_usage:
        desired.update({"used": {}, "usageRatio": {}})
    patch = status_patch(status, desired)
    if patch:
        plan.quota_patches.append((quota, patch))
    if warn and _ready(status.get("conditions")).get("reason") != reason:
        plan.events.append((quota, "Warning", reason, message))


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
        _not_in_force(plan, loser, "Conflict", message)

    tenant = subject.tenant
    if tenant is None or tenant["metadata"].get("deletionTimestamp"):
        if winner is not None:
            reason = "TenantNotFound" if tenant is None else "TenantDeleting"
            message = (f"Tenant {subject.name} not found in namespace {subject.namespace}"
                       if tenant is None else f"Tenant {subject.name} is being deleted")
            _not_in_force(plan, winner, reason, message)
        return plan

    tier = str((tenant.get("spec") or {}).get("tier") or "free")
    spec, invalid = _quota_spec(winner)
    hard = limits.effective_limits(tier_limits.get(tier, {}), spec, now)
    plan.hard = hard
    plan.next_expiry = limits.next_expiry(spec, now)
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
        _expired_overrides(plan, event_target, spec, prev_active - active_keys, hard, now)

    if invalid is not None and winner is not None:
        _not_in_force(plan, winner, "InvalidSpec", invalid)
        winner = None  # the tenant falls back to its tier defaults; the Quota says why
    if probe is None or probe.problem is not None or probe.state is None:
        reason, message = probe.problem if probe and probe.problem else ("TenantNotReady", "not measured yet")
        if winner is not None:
            _not_in_force(plan, winner, reason, message, hard=hard, keep_usage=True,
                          warn=reason not in TRANSIENT_REASONS)
        plan.memory = Memory(uid, tier, prev_levels, active_keys)
        return plan

    state = probe.state
    plan.enforce, plan.target, plan.ident, plan.tenant_id = True, probe.target, probe.ident, state.tenant_id
    amounts = limits.used_amounts(probe.storage, probe.connections, probe.reported)
    plan.amounts_used = amounts
    used = {name: limits.format_used(name, amount) for name, amount in amounts.items()}
    ratios = limits.usage_ratios(hard, amounts)
    levels = {name: limits.level(r) for name, r in ratios.items()}
    plan.levels = levels
    texts = {name: _describe(name, used[name], hard[name], r) for name, r in ratios.items()}
    enforcement = spec.enforcement.storage if spec is not None and winner is not None else "Warn"
    blocked = enforcement == "BlockWrites" and levels.get("storage") == limits.EXCEEDED
    role = limits.desired_role(hard, blocked)
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
        role, contained = _contain(role, policy.containment)
    plan.role = role
    plan.role_changes = limits.role_changes(state, role)
    plan.noisy = noisy
    plan.load_share = verdict.share if verdict is not None else None
    where = f"database target {probe.target!r}"
    _noisy_events(plan, event_target, noisy, prev_noisy, _load_text(where, view, policy))
    _containment_events(plan, event_target, role, contained, prev_contained)
    plan.terminate = "readOnly" in plan.role_changes
    doc = limits.registry_document(hard, enforcement=enforcement, blocked=blocked, active=active,
                                   quota=winner["metadata"]["name"] if winner is not None else None)
    if doc != state.published:
        plan.publish = doc

    for name, new in levels.items():
        old = prev_levels.get(name, limits.OK)
        text = texts[name]
        if new > old:
            if new == limits.EXCEEDED:
                plan.events.append((event_target, "Warning", "QuotaExceeded", f"limit reached: {text}"))
            else:
                plan.events.append((event_target, "Warning", "QuotaNearLimit",
                                    f"at {NEAR_LIMIT_RATIO:.0%} or more of the limit: {text}"))
        elif new < old:
            below = "under its limit" if new == limits.NEAR else "under the near-limit threshold"
            plan.events.append((event_target, "Normal", "QuotaBackUnderLimit", f"back {below}: {text}"))
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
        _tenant_noisy_condition(plan, tenant, noisy_cond)

    if winner is not None:
        generation = int(winner["metadata"].get("generation") or 0)
        record = QuotaStatus(
            conditions=[], observed_generation=generation, hard=hard, used=used, usage_ratio=ratios,
            active_overrides=[ActiveOverride(limit=o.limit, value=o.value, expires_at=o.expires_at, reason=o.reason)
                              for _, o in sorted(active.items())],
        )
        desired = _status_doc(quota_status, record, _quota_conditions(probe.ident, blocked, levels, texts, noisy_cond))
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


# --- The steps of an evaluation -------------------------------------------------------------------------


def _quota_spec(quota: Mapping[str, Any] | None) -> tuple[QuotaSpec | None, str | None]:
    """The Quota's spec, or why it is invalid (the API server's validation cannot catch everything)."""
    if quota is None:
        return None, None
    try:
        return QuotaSpec.model_validate(quota.get("spec") or {}), None
    except ValidationError as exc:
        return None, "; ".join(e["msg"] for e in exc.errors())[:512]


def _expired_overrides(plan: Plan, target: dict[str, Any], spec: QuotaSpec, gone: set[tuple[str, str]],
                       hard: Mapping[str, str], now: datetime) -> None:
    """An Event for each override in force at the last evaluation that has expired since (not one
    removed by hand)."""
    by_key: dict[tuple[str, str], QuotaOverride] = {(o.limit, iso(o.expires_at)): o for o in spec.overrides}
    for limit, expires in sorted(gone):
        override = by_key.get((limit, expires))
        if override is None or override.expires_at > now:
            continue  # removed by hand, not expired
        plan.expired.append(limit)
        plan.events.append((target, "Normal", "OverrideExpired",
                            f"override of {limit} to {override.value} expired at {expires}"
                            f"{f' ({override.reason})' if override.reason else ''}; "
                            f"{limit} is {hard.get(limit, 'unlimited')} again"))


def _contain(role: limits.RoleSettings, c: NoisyContainment) -> tuple[limits.RoleSettings, list[str]]:
    """The role attributes while noisy, and which of them containment lowered."""
    conn_limit, timeout, contained = contain(
        role.connection_limit, role.statement_timeout_ms,
        connections=(c.connections.factor, c.connections.floor) if c.connections else None,
        statement_timeout=((c.statement_timeout.factor, limit_amount("statementTimeout", c.statement_timeout.floor))
                           if c.statement_timeout else None),
    )
    return replace(role, connection_limit=conn_limit, statement_timeout_ms=timeout), contained


def _load_text(where: str, view: LoadView | None, policy: NoisyNeighborPolicy) -> str:
    if view is None or view.verdict is None:
        return f"load on {where} not measured over a window yet"
    verdict = view.verdict
    return (f"{verdict.share:.0%} of the load on {where} over {view.window} "
            f"({verdict.ratio:g}x the average of {verdict.tenants} tenants, threshold {policy.multiple:g}x)")


def _noisy_events(plan: Plan, target: dict[str, Any], noisy: bool | None, prev_noisy: bool | None,
                  load_text: str) -> None:
    """An Event when the noisy-neighbour verdict turns."""
    if noisy and not prev_noisy:
        plan.events.append((target, "Warning", "NoisyNeighbor", f"noisy neighbour: {load_text}"))
    elif prev_noisy and noisy is False:
        plan.events.append((target, "Normal", "NoisyNeighborCalm", f"no longer a noisy neighbour: {load_text}"))


def _containment_events(plan: Plan, target: dict[str, Any], role: limits.RoleSettings, contained: Sequence[str],
                        prev_contained: Sequence[str]) -> None:
    """Events and ledger entries for the role attributes containment lowered or restored now."""
    lowered = sorted(set(contained) - set(prev_contained))
    restored = sorted(set(prev_contained) - set(contained))
    if lowered:
        what = _contained_text(lowered, role)
        plan.events.append((target, "Warning", "NoisyNeighborContained", f"contained while noisy: {what}"))
        plan.ledger.append(("contain", f"lowered {what}"))
    if restored:
        what = _contained_text(restored, role)
        plan.events.append((target, "Normal", "NoisyNeighborReleased", f"containment undone: {what}"))
        plan.ledger.append(("release", f"restored {what}"))


def _tenant_noisy_condition(plan: Plan, tenant: Mapping[str, Any], cond: Cond) -> None:
    """With no valid Quota to carry it, the NoisyNeighbor condition goes on the Tenant, written
    when its status changes (the patch replaces the conditions list, hence tenant_version)."""
    status = tenant.get("status") or {}
    current = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION_NOISY_NEIGHBOR), None)
    if current is None or current.get("status") != cond.status:
        generation = int(tenant["metadata"].get("generation") or 0)
        plan.tenant_patch = {**(plan.tenant_patch or {}),
                             "conditions": merge(status.get("conditions"), [cond], generation)}
        plan.tenant_version = tenant["metadata"].get("resourceVersion")


def _quota_conditions(ident: str | None, blocked: bool, levels: Mapping[str, int], texts: Mapping[str, str],
                      noisy: Cond) -> list[Cond]:
    """The conditions of the Quota in force, enforced on role ``ident``."""
    near = sorted(n for n, lv in levels.items() if lv >= limits.NEAR)
    over = sorted(n for n, lv in levels.items() if lv == limits.EXCEEDED)
    ready_message = f"limits in force on role {ident}"
    if blocked:
        ready_message += "; writes blocked: storage over its limit"
    return [
        Cond("Ready", "True", "Enforced", ready_message),
        Cond(CONDITION_NEAR_LIMIT, "True", "ThresholdReached", "; ".join(texts[n] for n in near))
        if near else Cond(CONDITION_NEAR_LIMIT, "False", "BelowThreshold", f"every limit under {NEAR_LIMIT_RATIO:.0%}"),
        Cond(CONDITION_EXCEEDED, "True", "LimitReached",
             "; ".join(texts[n] for n in over) + ("; writes blocked" if blocked else ""))
        if over else Cond(CONDITION_EXCEEDED, "False", "WithinLimits", "every limit under its value"),
        noisy,
    ]


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


def _contained_text(attributes: Sequence[str], role: limits.RoleSettings) -> str:
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
