"""The pure noisy-neighbour logic: histories, verdicts with hysteresis, containment targets."""

from __future__ import annotations

import pytest

from tenancy_operator.reconcilers.noisy import (
    CLEAR_FRACTION,
    MAX_SAMPLES,
    Histories,
    History,
    Policy,
    assess,
    contain,
    decide,
)

POLICY = Policy(multiple=3.0, window=10.0, min_load=1.0)


def counters(points: list[tuple[float, float]]) -> History:
    h = History("pg_stat_statements")
    for at, load in points:
        h.add_counters(at, load, 0, 0, 0, 0, 0)
    return h


def test_history_needs_two_samples_and_takes_the_window() -> None:
    h = counters([(0, 0.0)])
    assert h.over(10) is None
    h = counters([(0, 0.0), (5, 1.0), (10, 2.0), (15, 10.0)])
    d = h.over(10)
    assert d is not None
    assert (d.seconds, d.load) == (10, 9.0)  # from the sample at 5 to the one at 15
    d = h.over(100)  # longer than kept: from the oldest
    assert d is not None
    assert (d.seconds, d.load) == (15, 10.0)


def test_a_counter_reset_is_folded_in() -> None:
    h = counters([(0, 5.0), (2, 7.0), (4, 1.0), (6, 3.0)])  # reset between 2 and 4
    assert [s.load for s in h.samples] == [5.0, 7.0, 8.0, 10.0]


def test_a_history_keeps_the_newest_max_samples() -> None:
    h = counters([(float(i), float(i)) for i in range(MAX_SAMPLES + 40)])
    assert len(h.samples) == MAX_SAMPLES
    assert (h.samples[0].at, h.samples[-1].at) == (40.0, MAX_SAMPLES + 39.0)
    d = h.over(10_000)  # longer than kept: from the oldest kept
    assert d is not None and d.seconds == MAX_SAMPLES - 1


def test_sessions_accumulate_busy_seconds() -> None:
    h = History("pg_stat_activity")
    h.add_sessions(0, 3, 100)
    h.add_sessions(2, 2, 150)
    h.add_sessions(4, 0, 170)
    d = h.over(10)
    assert d is not None
    assert (d.load, d.storage_growth) == (4.0, 70)  # 2 active x 2 s; the 3 before the first sample are unseen


def test_histories_keep_what_the_longest_window_of_the_target_reads() -> None:
    # A pass a minute for three hours: a tenant with a 5-minute window and one with an hour. Each
    # keeps about an hour of samples (the hour-long window averages over both), not MAX_SAMPLES,
    # and the verdicts are those of the untrimmed histories.
    policies = {"short": Policy(window=300.0), "long": Policy(window=3600.0)}
    kept: Histories[str] = Histories()
    full: dict[str, History] = {k: History("pg_stat_statements") for k in policies}
    for minute in range(180):
        for key, per_minute in (("short", 2.0), ("long", 0.5)):
            for histories in (kept.get(key, "pg_stat_statements"), full[key]):
                histories.add_counters(minute * 60.0, minute * per_minute, 0, 0, 0, 0, 0)
        assert assess(kept.by_key, policies, []) == assess(full, policies, [])
        kept.trim(policies)
    assert all(len(h.samples) == 61 for h in kept.by_key.values())
    assert all(len(h.samples) == 180 for h in full.values())


def test_decide_has_hysteresis_and_a_minimum_load() -> None:
    assert not decide(False, 3.0, 100, POLICY)  # at the multiple, not above
    assert decide(False, 3.1, 100, POLICY)
    assert not decide(False, 10.0, 0.5, POLICY)  # too little load to matter
    assert decide(True, 3.0 * CLEAR_FRACTION + 0.01, 100, POLICY)  # stays noisy near the threshold
    assert not decide(True, 3.0 * CLEAR_FRACTION, 100, POLICY)
    assert not decide(True, 10.0, 0.1, POLICY)


def test_assess_compares_with_the_average_tenant_of_the_target() -> None:
    histories = {k: counters([(0, 0.0), (10, v)]) for k, v in {"a": 20.0, "b": 1.0, "c": 0.0, "d": 0.0}.items()}
    verdicts = assess(histories, dict.fromkeys(histories, POLICY), [])
    assert verdicts["a"].noisy
    assert verdicts["a"].share == pytest.approx(20 / 21, abs=1e-4)
    assert verdicts["a"].ratio == pytest.approx(20 / (21 / 4), abs=0.01)
    assert verdicts["a"].tenants == 4
    assert not any(verdicts[k].noisy for k in "bcd")
    # Two equally busy tenants are not each other's noisy neighbour.
    even = {k: counters([(0, 0.0), (10, 50.0)]) for k in "xy"}
    assert not any(v.noisy for v in assess(even, dict.fromkeys(even, POLICY), []).values())


def test_assess_skips_tenants_without_a_window_yet() -> None:
    histories = {"a": counters([(0, 0.0)]), "b": counters([(0, 0.0), (10, 5.0)])}
    verdicts = assess(histories, dict.fromkeys(histories, POLICY), [])
    assert set(verdicts) == {"b"}


def test_contain_lowers_by_the_factor_never_under_the_floor_nor_above_the_limit() -> None:
    assert contain(10, 10_000, connections=(0.5, 2), statement_timeout=(0.5, 2_000)) == (
        5, 5_000, ["connections", "statementTimeout"])
    assert contain(3, 3_000, connections=(0.5, 2), statement_timeout=(0.1, 2_000)) == (
        2, 2_000, ["connections", "statementTimeout"])
    # Already at or under the floor: nothing is lowered (and never raised).
    assert contain(2, 1_000, connections=(0.5, 5), statement_timeout=(0.5, 2_000)) == (2, 1_000, [])
    # Unlimited becomes the floor; undeclared parts stay.
    assert contain(-1, None, connections=(0.5, 4), statement_timeout=None) == (4, None, ["connections"])
    assert contain(-1, None, connections=None, statement_timeout=(0.5, 1_500)) == (-1, 1_500, ["statementTimeout"])
