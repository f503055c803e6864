"""Freed memory goes back to the system once a burst of work is over, not during it."""

from __future__ import annotations

from tenancy_operator.observability.memory import QuietTrim


def test_trims_once_a_burst_is_over_and_not_during_it() -> None:
    decide = QuietTrim(work=1.0, quiet=0.1)
    assert [decide.step(0.9, 1.0) for _ in range(5)] == [False] * 5  # busy: no trim however long
    assert decide.step(0.02, 1.0)  # the first quiet second after the burst
    assert not decide.step(0.02, 1.0)  # nothing new to give back


def test_idle_work_adds_up_to_an_occasional_trim() -> None:
    decide = QuietTrim(work=1.0, quiet=0.1)
    steps = [decide.step(0.05, 1.0) for _ in range(60)]  # 5 % of a core: periodic passes
    assert steps.count(True) == 3 and steps.index(True) == 19
