"""Benchmark (not a test): the noisy-neighbour verdicts of one database target, in-process.

    .venv/bin/python -m bench.noisy_assess [--sizes 1000,10000,100000]

Each periodic quota pass judges every tenant of a target against the average tenant's load on it
(``reconcilers/noisy.assess``). This prints the CPU seconds of one such judgement for N tenants
with three samples each, a pass interval apart, and the default policy, as the quota pass runs it.
"""

from __future__ import annotations

import argparse
import random
import time

from tenancy_operator.reconcilers.noisy import History, Policy, assess

INTERVAL_SECONDS = 60.0
"""The quota pass's default interval (Settings.quota_interval_seconds)."""


def histories(tenants: int, rng: random.Random) -> dict[int, History]:
    out = {}
    for key in range(tenants):
        history = History("pg_stat_statements")
        load = 0.0
        for sample in range(3):
            load += rng.random()
            history.add_counters(INTERVAL_SECONDS * sample, load, sample * 10, sample, sample, 0, 1 << 20)
        out[key] = history
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/noisy_assess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated tenant counts")
    args = parser.parse_args()
    rng = random.Random(1)
    for tenants in (int(n) for n in args.sizes.split(",")):
        fleet = histories(tenants, rng)
        policies = dict.fromkeys(fleet, Policy())
        started = time.process_time()
        verdicts = assess(fleet, policies, [])
        seconds = time.process_time() - started
        print(f"noisy_assess tenants={tenants} verdicts={len(verdicts)} cpu_seconds={seconds:.3f}")


if __name__ == "__main__":
    main()
