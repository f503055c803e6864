"""Stepped flag rollouts: from the declared steps, the rollout's record and what the gate reads
now, the share of users to serve and the record to keep. Pure: no clock, no I/O.

The record (status.rollout) is the one input besides the spec: which step is served since when,
and whether a breach or a hand edit stopped the rollout cannot be read back from anywhere else.
The reconciler keeps the latest record in memory too, so a LISTed snapshot with an older status
never steps twice or undoes a rollback (reconcilers/featureflag.py).

The rules, in order (docs/featureflags.md, "Stepped rollouts"):
1. No record yet: the first step is served at once.
2. A new value of the resume annotation restarts a stopped rollout (rolled back, completed or
   edited by hand) from the share served now; below the first step, the first step is served.
3. `percentage` differing from the record's baseline is a hand edit: it is served and the steps
   pause until resumed.
4. `paused: true`, or the kill switch (`enabled: false`), holds the step; lifting it restarts the
   step's interval.
5. Otherwise the gate is read: above `max` it rolls the flag back (to 0 or to the step before)
   and stops; without a value the step is held. A step served for `stepInterval` with the gate
   healthy is followed by the next; the last one's end completes the rollout.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from tenancy_operator.api.featureflag import Rollout, RolloutPhase, RolloutStatus
from tenancy_operator.api.names import RESUME_ROLLOUT_ANNOTATION
from tenancy_operator.observability.prometheus import GateReading

PROGRESSING: RolloutPhase = "Progressing"
PAUSED: RolloutPhase = "Paused"
COMPLETED: RolloutPhase = "Completed"
ROLLED_BACK: RolloutPhase = "RolledBack"
HAND_EDITED = "HandEdited"


@dataclass(frozen=True)
class Decision:
    status: RolloutStatus
    change: str | None = None
    """The served share changed by the operator's own rollout (a step or a rollback), said for the
    audit trail; None when it did not (or a person changed it by hand)."""
    events: list[tuple[str, str, str]] = field(default_factory=list)
    check_in: float | None = None
    """Seconds until the rollout wants another look; None: it waits for a person or a spec change."""


def _position(steps: list[int], served: int) -> int:
    """How many steps are reached when `served` % is served."""
    return sum(1 for s in steps if s <= served)


def wants_gate(rollout: Rollout, previous: RolloutStatus | None, resume_token: str | None, enabled: bool) -> bool:
    """Whether `decide` will look at the gate: the rollout is (or becomes) Progressing with a gate."""
    if rollout.gate is None or rollout.paused or not enabled or previous is None or previous.phase is None:
        return False
    if resume_token and resume_token != previous.resumed_by:
        return False  # resumed now: the gate is read from the next check on
    if rollout.percentage != previous.baseline:
        return False
    return previous.phase == PROGRESSING


def decide(
    rollout: Rollout, previous: RolloutStatus | None, *, resume_token: str | None, enabled: bool,
    now: datetime.datetime, gate: GateReading | None, check_seconds: float,
) -> Decision:
    """The rollout's next record (see the module's rules). ``rollout.steps`` must be set."""
    assert rollout.steps is not None
    steps, n, hand = rollout.steps, len(rollout.steps), rollout.percentage
    interval = rollout.interval()
    events: list[tuple[str, str, str]] = []

    def progressing(state: RolloutStatus, change: str | None = None) -> Decision:
        assert state.step_started_at is not None
        due = state.step_started_at + interval
        state.next_step_at = due if _position(steps, state.percentage or 0) < n else None
        wait = max(0.0, (due - now).total_seconds())
        return Decision(state, change, events, min(check_seconds, wait) if wait > 0 else check_seconds)

    if previous is None or previous.phase is None:  # 1. start
        state = RolloutStatus(
            percentage=steps[0], phase=PROGRESSING, step=1, steps=n, step_started_at=now, baseline=hand,
            resumed_by=resume_token, reason="StepServed", message=f"step 1 of {n}: {steps[0]}% served",
        )
        events.append(("Normal", "RolloutStarted", f"stepped rollout started: step 1 of {n}, {steps[0]}% of users"))
        return progressing(state, f"rollout started: step 1 of {n}, {steps[0]}%")

    state = previous.model_copy(deep=True)
    state.steps, state.gate_value = n, previous.gate_value
    served = state.percentage if state.percentage is not None else 0

    if resume_token and resume_token != previous.resumed_by:  # 2. resume
        state.resumed_by, state.baseline, state.phase = resume_token, hand, PROGRESSING
        state.step_started_at, change = now, None
        if _position(steps, served) == 0:
            served, change = steps[0], f"rollout resumed: step 1 of {n}, {steps[0]}%"
        state.percentage, state.step = served, _position(steps, served)
        state.reason, state.message = "Resumed", f"resumed by {RESUME_ROLLOUT_ANNOTATION} at {served}%"
        events.append(("Normal", "RolloutResumed", f"stepped rollout resumed at {served}% of users"))
        return progressing(state, change)

    if hand != previous.baseline:  # 3. a hand edit
        if hand is None:  # the override removed: the steps go on from what is served
            state.baseline, state.phase, state.step_started_at = None, PROGRESSING, now
            state.reason, state.message = "Resumed", "percentage removed: the steps go on"
            events.append(("Normal", "RolloutResumed", f"percentage removed: stepped rollout goes on at {served}%"))
            return progressing(state)
        if previous.phase != PAUSED or previous.reason != HAND_EDITED or previous.percentage != hand:
            events.append(("Normal", "RolloutPaused", f"percentage set by hand to {hand}%: steps paused; annotate "
                                                      f"{RESUME_ROLLOUT_ANNOTATION}=<new value> to go on from there"))
        state.percentage, state.step = hand, _position(steps, hand)
        state.phase, state.reason, state.next_step_at = PAUSED, HAND_EDITED, None
        state.message = (f"spec.rollout.percentage set by hand ({hand}%): steps paused; annotate "
                         f"{RESUME_ROLLOUT_ANNOTATION}=<new value> to go on from there")
        return Decision(state, None, events, None)

    if previous.phase == COMPLETED and served < steps[-1]:  # steps added after the end: go on
        state.phase, state.step_started_at = PROGRESSING, now
    elif previous.phase in (COMPLETED, ROLLED_BACK):
        state.next_step_at = None
        return Decision(state, None, events, None)

    if rollout.paused or not enabled:  # 4. held
        reason = "PausedBySpec" if rollout.paused else "FlagDisabled"
        why = "spec.rollout.paused is true" if rollout.paused else "the flag is disabled (kill switch)"
        if previous.reason != reason:
            events.append(("Normal", "RolloutPaused", f"stepped rollout held at {served}%: {why}"))
        state.phase, state.reason, state.next_step_at = PAUSED, reason, None
        state.message = f"held at {served}%: {why}"
        return Decision(state, None, events, None)
    if previous.phase == PAUSED:  # the hold lifted: the step's interval starts again
        state.phase, state.step_started_at = PROGRESSING, now
        events.append(("Normal", "RolloutResumed", f"stepped rollout goes on at {served}%"))

    waiting: str | None = None  # 5. gate, then time
    if rollout.gate is not None:
        if gate is None or gate.value is None:
            waiting = gate.problem if gate is not None and gate.problem else "not read yet"
        else:
            state.gate_value = gate.value
            if gate.value > rollout.gate.max:
                back = 0 if rollout.on_breach != "LastHealthyStep" else max((s for s in steps if s < served), default=0)
                state.percentage, state.step = back, _position(steps, back)
                state.phase, state.reason, state.next_step_at = ROLLED_BACK, "GateBreached", None
                state.message = (f"gate breached at {served}%: value {gate.value:g} > max {rollout.gate.max:g}; "
                                 f"rolled back to {back}%; annotate {RESUME_ROLLOUT_ANNOTATION}=<new value> to resume")
                events.append(("Warning", "RolloutRolledBack", state.message))
                return Decision(state, f"gate breached ({gate.value:g} > {rollout.gate.max:g}): rolled back "
                                       f"from {served}% to {back}%", events, None)
    assert state.step_started_at is not None
    position = _position(steps, served)
    if state.step_started_at + interval > now:
        state.reason = "StepServed"
        state.message = f"step {position} of {n}: {served}% served"
        return progressing(state)
    if waiting is not None:
        state.reason = "GateWaiting"
        state.message = f"step {position} of {n} held at {served}%: gate has no value: {waiting}"
        return progressing(state)
    if position >= n:
        state.phase, state.reason, state.next_step_at = COMPLETED, "AllStepsServed", None
        state.message = f"every step served: {served}% of users"
        events.append(("Normal", "RolloutCompleted", f"stepped rollout completed at {served}% of users"))
        return Decision(state, None, events, None)
    served = steps[position]
    state.percentage, state.step, state.step_started_at = served, position + 1, now
    state.reason, state.message = "StepServed", f"step {position + 1} of {n}: {served}% served"
    events.append(("Normal", "RolloutStepped", f"step {position + 1} of {n}: {served}% of users"))
    return progressing(state, f"step {position + 1} of {n}: {served}%")
