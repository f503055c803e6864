"""Cross-check with a client nobody here wrote: the official OpenFeature Python SDK with the flagd
provider (in-process resolver reading our exported flagd JSON from a file) must give every
tenant/user the variant and value our own evaluation gives."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagEvaluationDetails

from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.flags import TENANT_ATTRIBUTE, FlagDefinition, evaluate, flagd_document

TENANTS = ["acme", "globex", "initech", "umbrella", "hooli", "a1"]


@pytest.fixture
def quiet_provider() -> Iterator[None]:
    # The provider logs an error for every percentage evaluated without a targeting key.
    logger = logging.getLogger("openfeature")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def random_spec(rng: random.Random) -> tuple[dict[str, Any], str]:
    """A random valid FeatureFlag spec and the type of its values."""
    kind = rng.choice(["boolean", "string", "integer", "object"])
    names = rng.sample(["on", "off", "a", "b", "c", "blue", "green", "true"], rng.randint(1, 5))
    values = {
        "boolean": lambda i: i % 2 == 0,
        "string": lambda i: f"value-{i}",
        "integer": lambda i: i * 10,
        "object": lambda i: {"n": i, "tags": ["x", i]},
    }[kind]
    spec: dict[str, Any] = {
        "enabled": rng.random() > 0.2,
        "variants": {n: {"value": values(i)} for i, n in enumerate(names)},
        "defaultVariant": rng.choice(names),
    }
    form = rng.choice(["none", "percentage", "weights"])
    if form == "percentage":
        spec["rollout"] = {"variant": rng.choice(names), "percentage": rng.choice([0, 1, 10, 33, 50, 99, 100])}
    elif form == "weights":
        spec["rollout"] = {"weights": [{"variant": n, "weight": rng.choice([0, 1, 3, 7, 1000])} for n in names]}
        spec["rollout"]["weights"][0]["weight"] = max(1, spec["rollout"]["weights"][0]["weight"])
    percentage_only_ok = "variant" in spec.get("rollout", {}) or "on" in names
    tenants = []
    for t in rng.sample(TENANTS, rng.randint(0, 4)):
        shape = rng.choice(["variant", "both"] + (["percentage"] if percentage_only_ok else []))
        override: dict[str, Any] = {"tenant": t}
        if shape in ("variant", "both"):
            override["variant"] = rng.choice(names)
        if shape in ("percentage", "both"):
            override["percentage"] = rng.randint(0, 100)
        tenants.append(override)
    spec["tenants"] = tenants
    pairs = {(rng.choice(TENANTS), f"user-{rng.randint(0, 60)}") for _ in range(rng.randint(0, 25))}
    spec["users"] = [{"tenant": t, "user": u, "variant": rng.choice(names)} for t, u in sorted(pairs)]
    return spec, kind


def details(client: OpenFeatureClient, kind: str, key: str, ctx: EvaluationContext) -> FlagEvaluationDetails[Any]:
    if kind == "boolean":
        return client.get_boolean_details(key, False, ctx)
    if kind == "string":
        return client.get_string_details(key, "code-default", ctx)
    if kind == "integer":
        return client.get_integer_details(key, -1, ctx)
    return client.get_object_details(key, {"code": "default"}, ctx)


def provider_client(path: Path, domain: str) -> OpenFeatureClient:
    provider = FlagdProvider(resolver_type=ResolverType.FILE, offline_flag_source_path=str(path))
    api.set_provider_and_wait(provider, domain)  # loads the file before the first evaluation
    return api.get_client(domain)


def assert_same_answers(
    client: OpenFeatureClient, flags: list[tuple[FlagDefinition, str]], pairs: list[tuple[str | None, str | None]]
) -> int:
    compared = 0
    for flag, kind in flags:
        for tenant, user in pairs:
            ctx = EvaluationContext(targeting_key=user, attributes={TENANT_ATTRIBUTE: tenant} if tenant else {})
            theirs = details(client, kind, flag.key, ctx)
            ours = evaluate(flag, tenant, user)
            assert theirs.error_code is None, (flag.key, tenant, user, theirs.error_message)
            assert (theirs.variant, theirs.value) == (ours.variant, ours.value), (flag.to_json(), tenant, user)
            compared += 1
    return compared


def test_flagd_provider_agrees_on_random_flags_and_users(tmp_path: Path, quiet_provider: None) -> None:
    rng = random.Random(20261122)
    flags = []
    for i in range(40):
        spec, kind = random_spec(rng)
        flags.append((FlagDefinition.from_spec(FeatureFlagSpec.model_validate(spec), f"flag-{i}"), kind))
    path = tmp_path / "flags.flagd.json"
    path.write_text(json.dumps(flagd_document([f for f, _ in flags])))
    pairs: list[tuple[str | None, str | None]] = [
        (rng.choice([*TENANTS, "unknown", None]), rng.choice([f"user-{rng.randint(0, 60)}", f"u-{rng.random()}"]))
        for _ in range(150)
    ]
    pairs += [("acme", None), (None, None), ("globex", ""), ("acme", "ünïcødé-☃")]
    try:
        assert assert_same_answers(provider_client(path, "random"), flags, pairs) == 40 * len(pairs)
    finally:
        api.shutdown()


def test_flagd_provider_agrees_on_a_large_rollout(tmp_path: Path, quiet_provider: None) -> None:
    """Thousands of random users on one percentage rollout: the bucketing itself must agree."""
    spec = FeatureFlagSpec.model_validate({
        "rollout": {"variant": "on", "percentage": 37},
        "tenants": [{"tenant": "acme", "variant": "on", "percentage": 5}],
    })
    flag = FlagDefinition.from_spec(spec, "new-dashboard")
    path = tmp_path / "flagd.json"
    path.write_text(json.dumps(flagd_document([flag])))
    rng = random.Random(7)
    pairs: list[tuple[str | None, str | None]] = [
        (rng.choice(["acme", "globex"]), f"{rng.getrandbits(64):x}") for _ in range(3000)
    ]
    try:
        assert assert_same_answers(provider_client(path, "large"), [(flag, "boolean")], pairs) == 3000
    finally:
        api.shutdown()
