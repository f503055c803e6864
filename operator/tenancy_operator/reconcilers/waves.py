"""Schema rollout waves: from the SchemaRollout's spec, its record (status), the template's versions
and the Tenants' state, the record to keep. Pure: no clock, no I/O (reconcilers/schemarollout.py
observes and applies).

The rules (docs/schema-rollouts.md):
1. First sight: every version the template holds now is the base: nothing to roll out.
2. A version newer than the base starts a rollout: the canary (named Tenants, then `count` more in
   the rollout's order) is admitted, or the first wave when there is no canary.
3. A new value of the rollback annotation rolls back: no one admitted, every Tenant past the base
   runs its down migrations (RolledBack). A new value of the resume annotation restarts a halted
   rollout (its wave is judged again), or a rolled-back one from its first wave.
4. `paused` admits no one further; the admitted go on migrating.
5. A wave ends when each admitted Tenant is Ready at the target version or has failed. Failures
   of all the admitted Tenants beyond the budget halt the rollout; so does the gate above `max`.
   Without a gate value the next wave waits. After `pause`, the next wave is admitted; after the
   last, the target becomes the base for every Tenant (Completed).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tenancy_operator.api.names import RESUME_ROLLOUT_ANNOTATION
from tenancy_operator.api.schemarollout import (
    BUCKETS,
    MAX_LISTED,
    FailedTenant,
    SchemaRolloutSpec,
    SchemaRolloutStatus,
)
from tenancy_operator.observability.prometheus import GateReading
from tenancy_operator.observability.text import clean_message

FAILURE_REASONS = frozenset({"MigrationFailed", "MigrationTimeout", "MigrationChecksumMismatch", "InvalidTemplate",
                             "SnapshotFailed"})
"""A Tenant's Ready reasons that mean its migration failed (not merely in progress)."""


@dataclass(frozen=True)
class TenantState:
    """One Tenant of the template, as its object says."""

    name: str
    bucket: int
    version: str | None
    """status.schemaVersion: the newest migration applied."""
    ready: bool
    reason: str | None = None
    message: str = ""
    pinned: bool = False


@dataclass
class Decision:
    status: SchemaRolloutStatus
    events: list[tuple[str, str, str]] = field(default_factory=list)
    check_in: float | None = None
    """Seconds until another look is due (the Tenants' progress, a template change); None: halted,
    waits for a person."""


def order(tenants: Sequence[TenantState]) -> list[TenantState]:
    """The rollout order of the Tenants that can be admitted (pinned ones never are)."""
    return sorted((t for t in tenants if not t.pinned), key=lambda t: (t.bucket, t.name))


def wave_count(spec: SchemaRolloutSpec) -> int:
    return (1 if spec.canary is not None else 0) + len(spec.waves)


def canary_names(spec: SchemaRolloutSpec, candidates: Sequence[TenantState]) -> list[str]:
    if spec.canary is None:
        return []
    existing = {t.name for t in candidates}
    named = [n for n in spec.canary.tenants or [] if n in existing]
    extra = [t.name for t in candidates if t.name not in named][: spec.canary.count or 0]
    return sorted({*named, *extra})


def admit_below(spec: SchemaRolloutSpec, wave: int, candidates: Sequence[TenantState], canary: Sequence[str]) -> int:
    """The bucket cut that admits, with the canary, the Tenants of waves up to ``wave`` (1-based,
    the canary counted)."""
    index = wave - (1 if spec.canary is not None else 0)  # waves of spec.waves admitted so far
    if index <= 0:
        return 0
    total, admitted = len(candidates), len(canary)
    for w in spec.waves[:index]:
        if w.count is not None:
            admitted += w.count
        else:
            admitted = max(admitted, math.ceil((w.percentage or 0) * total / 100))
    rest = [t for t in candidates if t.name not in set(canary)]
    take = min(len(rest), admitted - len(canary))
    if take <= 0:
        return 0
    return BUCKETS if take >= len(rest) else rest[take - 1].bucket + 1


def _counts(st: SchemaRolloutStatus, tenants: Sequence[TenantState], admitted: set[str]) -> list[TenantState]:
    """Fill the counts of status; returns the admitted Tenants whose migration failed."""
    target = st.target_version
    failed = [t for t in tenants if t.name in admitted and t.version != target and not t.ready
              and t.reason in FAILURE_REASONS]
    st.tenants, st.pinned = len(tenants), sum(1 for t in tenants if t.pinned)
    st.migrated = sum(1 for t in tenants if t.version == target and t.ready)
    st.failed = len(failed)
    st.pending = len(tenants) - st.migrated - st.failed
    st.failed_tenants = _listed(failed)
    return failed


def _listed(failed: Sequence[TenantState]) -> list[FailedTenant]:
    return [FailedTenant(name=t.name, reason=t.reason or "", message=clean_message(t.message, 512))
            for t in sorted(failed, key=lambda t: t.name)[:MAX_LISTED]]


def decide(
    spec: SchemaRolloutSpec, previous: SchemaRolloutStatus | None, *, namespace: str, versions: Sequence[str],
    tenants: Sequence[TenantState], resume_token: str | None, now: datetime.datetime, gate: GateReading | None,
    check_seconds: float, rollback_token: str | None = None,
) -> Decision:
    st = previous.model_copy(deep=True) if previous is not None else SchemaRolloutStatus()
    out = Decision(st, check_in=check_seconds)  # a template change is seen at the next look
    newest = max(versions) if versions else None
    candidates = order(tenants)

    def admitted() -> set[str]:
        if st.phase in (None, "Idle", "Completed"):
            return set()
        return {t.name for t in candidates if t.name in st.canary or t.bucket < st.admit_below}

    def wave_label() -> str:
        return f"wave {st.wave} of {st.waves}"

    if newest is None:
        st.phase, st.reason, st.message = "Idle", "TemplateEmpty", "the template holds no migration"
        _counts(st, tenants, set())
        return out
    if st.base_version is None:  # 1
        st.base_version = st.target_version = newest
        st.phase, st.reason, st.message = "Idle", "UpToDate", f"{newest} is the base: nothing newer to roll out"
        _counts(st, tenants, set())
        return out

    restart = st.phase == "RolledBack" and bool(resume_token) and resume_token != st.resumed_by
    if restart:
        st.resumed_by = resume_token
    again = st.phase == "RolledBack" and newest != st.target_version  # a newer fix: a rollout of its own
    if newest > st.base_version and (st.phase in (None, "Idle", "Completed") or restart or again):  # 2
        st.target_version, st.wave, st.waves = newest, 1, wave_count(spec)
        st.canary = canary_names(spec, candidates)
        st.admit_below = admit_below(spec, 1, candidates, st.canary)
        st.wave_started_at, st.wave_ended_at, st.gate_value = now, None, None
        st.rolled_back_by = rollback_token or st.rolled_back_by  # a rollback asked before stays done
        st.phase, st.reason = "Progressing", "WaveMigrating"
        st.message = f"{wave_label()} admitted: {newest} reaches {len(admitted())} tenant(s)"
        out.events.append(("Normal", "WaveStarted", f"{st.base_version} -> {newest}: {st.message}"))
    elif st.phase in ("Progressing", "Paused", "Halted"):
        st.target_version = max(newest, st.target_version or newest)
    if st.phase in (None, "Idle", "Completed"):
        st.phase = st.phase or "Idle"
        # Nothing in progress to resume or roll back: the requests are taken as done, not kept for later.
        st.resumed_by, st.rolled_back_by = resume_token or st.resumed_by, rollback_token or st.rolled_back_by
        _counts(st, tenants, set())
        return out

    if rollback_token and rollback_token != st.rolled_back_by and st.phase != "RolledBack":  # 3
        st.rolled_back_by, st.phase, st.canary, st.admit_below = rollback_token, "RolledBack", [], 0
        st.wave_ended_at = None
        out.events.append(("Warning", "RolloutRolledBack", f"rollback to {st.base_version} requested at "
                                                           f"{wave_label()}: the Tenants past it run their down "
                                                           "migrations"))
    elif rollback_token and rollback_token != st.rolled_back_by:
        st.rolled_back_by = rollback_token
    if st.phase == "RolledBack":
        _counts(st, tenants, set())
        ahead = [t for t in tenants if t.version is not None and t.version > (st.base_version or "")]
        failed = [t for t in ahead if not t.ready and t.reason in FAILURE_REASONS]
        st.failed, st.failed_tenants = len(failed), _listed(failed)
        st.reason = "RollingBack" if ahead else "RolledBack"
        st.message = (f"rolling back to {st.base_version}: {len(ahead)} tenant(s) past it"
                      + (f", {len(failed)} failed ({', '.join(t.name for t in failed[:10])})" if failed else "")
                      if ahead else f"every tenant back at {st.base_version} or before; annotate "
                                    f"{RESUME_ROLLOUT_ANNOTATION}=<new value> to roll {st.target_version} out again")
        out.check_in = check_seconds if ahead else None
        return out
    if resume_token and resume_token != st.resumed_by:  # 3
        st.resumed_by = resume_token
        if st.phase == "Halted":
            st.phase, st.wave_ended_at = "Progressing", None
            out.events.append(("Normal", "RolloutResumed", f"resumed by {RESUME_ROLLOUT_ANNOTATION} at {wave_label()}"))
    if st.phase == "Halted":
        _counts(st, tenants, admitted())
        out.check_in = None  # until a person resumes it
        return out

    if spec.paused:  # 4
        if st.phase != "Paused":
            out.events.append(("Normal", "RolloutPaused", f"paused at {wave_label()}: no further tenant admitted"))
        st.phase, st.reason = "Paused", "PausedBySpec"
        st.message = f"paused at {wave_label()} (spec.paused): the admitted tenants go on migrating"
        _counts(st, tenants, admitted())
        return out
    if st.phase == "Paused":
        st.phase, st.wave_ended_at = "Progressing", None
        out.events.append(("Normal", "RolloutResumed", f"spec.paused lifted at {wave_label()}"))

    members = admitted()  # 5
    failed = _counts(st, tenants, members)
    if len(failed) > spec.budget(len(members)):
        names = ", ".join(t.name for t in failed[:10]) + (" ..." if len(failed) > 10 else "")
        st.phase, st.reason = "Halted", "BudgetSpent"
        st.message = (f"halted at {wave_label()}: {len(failed)} of {len(members)} admitted tenant(s) failed their "
                      f"migration ({names}), over the budget of {spec.budget(len(members))}; the others stay at "
                      f"{st.base_version}. Fix, retry them, then annotate {RESUME_ROLLOUT_ANNOTATION}=<new value>")
        out.events.append(("Warning", "RolloutHalted", st.message))
        out.check_in = None
        return out
    migrating = [t for t in candidates if t.name in members and t.version != st.target_version
                 and t not in failed]
    if migrating:
        st.reason = "WaveMigrating"
        st.message = f"{wave_label()}: {len(migrating)} admitted tenant(s) still migrating to {st.target_version}"
        return out
    if st.wave_ended_at is None:
        st.wave_ended_at = now
        out.events.append(("Normal", "WaveCompleted", f"{wave_label()}: {len(members)} tenant(s) at "
                                                      f"{st.target_version}, {len(failed)} failed"))
    if spec.gate is not None:
        if gate is None or gate.value is None:
            st.reason = "GateWaiting"
            st.message = f"{wave_label()} done; the next waits for a gate value: {gate.problem if gate else 'not read'}"
            return out
        st.gate_value = gate.value
        if gate.value > spec.gate.max:
            st.phase, st.reason = "Halted", "GateBreached"
            st.message = (f"halted after {wave_label()}: gate value {gate.value:g} > max {spec.gate.max:g}; the "
                          f"others stay at {st.base_version}; annotate {RESUME_ROLLOUT_ANNOTATION}=<new value> "
                          "to go on")
            out.events.append(("Warning", "RolloutHalted", st.message))
            out.check_in = None
            return out
    due = st.wave_ended_at + spec.pause_for()
    if now < due:
        st.reason = "Pausing"
        st.message = f"{wave_label()} done; the next is due at {due.isoformat()}"
        out.check_in = min(check_seconds, (due - now).total_seconds())
        return out
    if (st.wave or 0) >= (st.waves or 0):
        done = st.target_version
        st.base_version, st.canary, st.admit_below = done, [], 0
        st.phase, st.reason, st.message = "Completed", "AllWavesDone", f"every tenant may have {done}"
        _counts(st, tenants, {t.name for t in candidates})
        out.events.append(("Normal", "RolloutCompleted", f"{done} admitted for every tenant of the template"))
        return out
    st.wave = (st.wave or 0) + 1
    st.admit_below = max(st.admit_below, admit_below(spec, st.wave, candidates, st.canary))
    st.wave_started_at, st.wave_ended_at = now, None
    st.reason = "WaveMigrating"
    st.message = f"{wave_label()} admitted: {st.target_version} reaches {len(admitted())} tenant(s)"
    _counts(st, tenants, admitted())
    out.events.append(("Normal", "WaveStarted", st.message))
    return out
