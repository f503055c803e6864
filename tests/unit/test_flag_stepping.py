"""The stepped rollout's decisions (flags/stepping.py), rule by rule, on a clock the test moves."""

from __future__ import annotations

import datetime
from typing import Any

from tenancy_operator.api.featureflag import Rollout, RolloutStatus
from tenancy_operator.flags.stepping import Decision, decide, wants_gate
from tenancy_operator.observability.prometheus import GateReading

T0 = datetime.datetime(2026, 12, 3, 8, 0, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)


def rollout(**extra: Any) -> Rollout:
    return Rollout.model_validate({"variant": "on", "steps": [1, 5, 25, 100], "stepInterval": "10m", **extra})


def step(r: Rollout, previous: RolloutStatus | None, at: datetime.datetime, *, gate: float | None = None,
         token: str | None = None, enabled: bool = True, problem: str | None = None) -> Decision:
    reading = None
    if wants_gate(r, previous, token, enabled):
        reading = GateReading(gate, problem if gate is None else None)
    return decide(r, previous, resume_token=token, enabled=enabled, now=at, gate=reading, check_seconds=30)


def test_steps_advance_on_time_and_complete() -> None:
    r = rollout()
    d = step(r, None, T0)
    assert (d.status.percentage, d.status.phase, d.status.step) == (1, "Progressing", 1)
    assert d.status.next_step_at == T0 + 10 * MINUTE and d.check_in == 30
    assert d.change and [e[1] for e in d.events] == ["RolloutStarted"]
    held = step(r, d.status, T0 + 9 * MINUTE)
    assert held.status.percentage == 1 and held.change is None and not held.events
    seen = [1]
    state, at = d.status, T0
    while state.phase == "Progressing":
        at += 10 * MINUTE
        d = step(r, state, at)
        state = d.status
        seen.append(state.percentage or 0)
    assert seen == [1, 5, 25, 100, 100] and state.phase == "Completed" and state.next_step_at is None
    assert d.check_in is None and [e[1] for e in d.events] == ["RolloutCompleted"]


def test_a_breach_rolls_back_and_stops_until_resumed() -> None:
    r = rollout(gate={"query": "errors", "max": 0.05})
    state = step(r, None, T0).status
    state = step(r, state, T0 + 10 * MINUTE, gate=0.01).status
    assert state.percentage == 5
    breached = step(r, state, T0 + 12 * MINUTE, gate=0.2)
    assert (breached.status.percentage, breached.status.phase, breached.status.reason) == (0, "RolledBack",
                                                                                         "GateBreached")
    assert breached.change and "rolled back from 5% to 0%" in breached.change and breached.check_in is None
    assert [e[:2] for e in breached.events] == [("Warning", "RolloutRolledBack")]
    # Stopped: neither time nor a healthy gate moves it again.
    later = step(r, breached.status, T0 + 60 * MINUTE, gate=0.0)
    assert later.status.percentage == 0 and later.status.phase == "RolledBack" and later.change is None
    resumed = step(r, later.status, T0 + 61 * MINUTE, token="go")
    assert (resumed.status.percentage, resumed.status.phase, resumed.status.resumed_by) == (1, "Progressing", "go")
    assert step(r, resumed.status, T0 + 62 * MINUTE, token="go").status.resumed_by == "go"  # once per value


def test_last_healthy_step_keeps_the_step_before() -> None:
    r = rollout(gate={"query": "errors", "max": 0.05}, onBreach="LastHealthyStep")
    state = step(r, None, T0).status
    for i in range(1, 3):
        state = step(r, state, T0 + i * 10 * MINUTE, gate=0.0).status
    assert state.percentage == 25
    assert step(r, state, T0 + 21 * MINUTE, gate=1.0).status.percentage == 5


def test_no_gate_value_holds_the_step() -> None:
    r = rollout(gate={"query": "errors", "max": 0.05})
    state = step(r, None, T0).status
    d = step(r, state, T0 + 10 * MINUTE, gate=None, problem="the query returned 0 series")
    assert d.status.percentage == 1 and d.status.reason == "GateWaiting" and "0 series" in (d.status.message or "")
    assert d.check_in == 30


def test_a_hand_edit_wins_and_pauses() -> None:
    r = rollout()
    state = step(r, None, T0).status
    edited = rollout(percentage=40)
    d = step(edited, state, T0 + 20 * MINUTE)
    assert (d.status.percentage, d.status.phase, d.status.reason) == (40, "Paused", "HandEdited")
    assert d.change is None and d.check_in is None  # the person's change, audited as theirs
    d = step(edited, d.status, T0 + 60 * MINUTE)
    assert d.status.percentage == 40 and not d.events
    d = step(edited, d.status, T0 + 61 * MINUTE, token="1")
    assert (d.status.percentage, d.status.phase, d.status.baseline) == (40, "Progressing", 40)
    assert step(edited, d.status, T0 + 71 * MINUTE, token="1").status.percentage == 100


def test_paused_and_kill_switch_hold_the_step() -> None:
    state = step(rollout(), None, T0).status
    held = step(rollout(paused=True), state, T0 + 30 * MINUTE)
    assert (held.status.percentage, held.status.phase, held.status.reason) == (1, "Paused", "PausedBySpec")
    off = step(rollout(), held.status, T0 + 31 * MINUTE, enabled=False)
    assert off.status.reason == "FlagDisabled" and off.status.percentage == 1
    again = step(rollout(), off.status, T0 + 32 * MINUTE)
    assert again.status.phase == "Progressing" and again.status.step_started_at == T0 + 32 * MINUTE
    assert again.status.percentage == 1


def test_steps_added_after_completion_go_on() -> None:
    r = Rollout.model_validate({"variant": "on", "steps": [10], "stepInterval": "0s"})
    done = step(r, step(r, None, T0).status, T0)
    assert done.status.phase == "Completed"
    more = Rollout.model_validate({"variant": "on", "steps": [10, 50], "stepInterval": "0s"})
    assert step(more, done.status, T0 + MINUTE).status.percentage == 50
