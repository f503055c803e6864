"""Benchmark (not a test): feature flag evaluations per second, in-process.

    .venv/bin/python bench/flags_eval.py [--users 100000] [--flagd]

Measures `tenancy_operator.flags.evaluate` on a few flag shapes with distinct users (so every
evaluation hashes), the bare bucketing hash, and with --flagd the official OpenFeature flagd
provider (in-process, from a file) on the same flag for comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.flags import FlagDefinition, bucket_hash, evaluate, flagd_document

SHAPES: dict[str, dict[str, object]] = {
    "kill switch": {"enabled": False, "rollout": {"variant": "on", "percentage": 25}},
    "no rollout (static default)": {},
    "25% rollout": {"rollout": {"variant": "on", "percentage": 25}},
    "weighted rollout, 4 variants": {
        "variants": {v: {"value": v} for v in ("a", "b", "c", "d")}, "defaultVariant": "a",
        "rollout": {"weights": [{"variant": v, "weight": w} for v, w in (("a", 1), ("b", 2), ("c", 3), ("d", 4))]},
    },
    "rollout + 1000 user and 200 tenant overrides": {
        "rollout": {"variant": "on", "percentage": 25},
        "tenants": [{"tenant": f"tenant-{i}", "variant": "on", "percentage": 50} for i in range(200)],
        "users": [{"tenant": f"tenant-{i % 200}", "user": f"user-{i}", "variant": "on"} for i in range(1000)],
    },
}


def rate(fn: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="evaluations per measurement")
    parser.add_argument("--flagd", action="store_true", help="also measure the OpenFeature flagd provider")
    args = parser.parse_args()
    n = args.users
    users = [f"user-{i}" for i in range(n)]
    tenants = [f"tenant-{i % 400}" for i in range(n)]

    print(f"{'what':<48} {'evaluations/s':>14}")
    print(f"{'bucket_hash (CBOR + MurmurHash3)':<48} {rate(lambda i: bucket_hash('flag', users[i]), n):>14,.0f}")
    for label, spec in SHAPES.items():
        flag = FlagDefinition.from_spec(FeatureFlagSpec.model_validate(spec), "bench")
        print(f"{label:<48} {rate(lambda i, f=flag: evaluate(f, tenants[i], users[i]), n):>14,.0f}")

    if args.flagd:
        from openfeature import api
        from openfeature.contrib.provider.flagd import FlagdProvider
        from openfeature.contrib.provider.flagd.config import ResolverType
        from openfeature.evaluation_context import EvaluationContext

        logging.getLogger("openfeature").setLevel(logging.CRITICAL)
        flag = FlagDefinition.from_spec(FeatureFlagSpec.model_validate(SHAPES["25% rollout"]), "bench")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "flagd.json"
            path.write_text(json.dumps(flagd_document([flag])))
            api.set_provider_and_wait(FlagdProvider(resolver_type=ResolverType.FILE,
                                                    offline_flag_source_path=str(path)))
            client = api.get_client()
            m = max(1, n // 10)
            contexts = [EvaluationContext(users[i], {"tenant": tenants[i]}) for i in range(m)]
            r = rate(lambda i: client.get_boolean_value("bench", False, contexts[i]), m)
            print(f"{'flagd provider (SDK), 25% rollout':<48} {r:>14,.0f}")
            api.shutdown()


if __name__ == "__main__":
    main()
