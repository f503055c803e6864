"""Freed memory goes back to the system once a burst of work is over, not during it; the cyclic
collector suits a heap holding a fleet."""

from __future__ import annotations

import gc
import weakref

from tenancy_operator.observability.memory import GC_THRESHOLDS, QuietTrim, tune_gc


def test_trims_once_a_burst_is_over_and_not_during_it() -> None:
    decide = QuietTrim(work=1.0, quiet=0.1)
    assert [decide.step(0.9, 1.0) for _ in range(5)] == [False] * 5  # busy: no trim however long
    assert decide.step(0.02, 1.0)  # the first quiet second after the burst
    assert not decide.step(0.02, 1.0)  # nothing new to give back


def test_idle_work_adds_up_to_an_occasional_trim() -> None:
    decide = QuietTrim(work=1.0, quiet=0.1)
    steps = [decide.step(0.05, 1.0) for _ in range(60)]  # 5 % of a core: periodic passes
    assert steps.count(True) == 3 and steps.index(True) == 19


def test_the_collector_is_tuned_for_a_fleet_and_still_frees_cycles() -> None:
    """What start-up built is frozen out of the cyclic collector and young collections are spaced
    out; a cycle of garbage made afterwards is still freed by the collector."""
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0

        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
