"""Export a flag in flagd's flag-definition format (https://flagd.dev/reference/flag-definitions/).

Overrides become JSONLogic `targeting` on the evaluation context: user overrides match
`tenant` and `targetingKey`, tenant overrides match `tenant`, percentages are `fractional`
(bucketing by `[flagKey, targetingKey]`). A flagd provider reading this document gives every
user the variant `evaluation.evaluate` gives.

The kill switch is exported as a flag without targeting that serves `defaultVariant`, not as
flagd's `state: DISABLED`: a DISABLED flag makes the SDK return the *caller's* code default,
which may differ from the declared default variant, and "everyone gets the default variant" is
what the FeatureFlag promises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from tenancy_operator.flags.model import FlagDefinition

FLAGD_SCHEMA = "https://flagd.dev/schema/v0/flags.json"
TENANT_ATTRIBUTE = "tenant"
"""Evaluation-context attribute holding the Tenant's name; the user is the targeting key."""


def _fractional(fractions: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    return {"fractional": [[variant, weight] for variant, weight in fractions]}


def targeting(flag: FlagDefinition) -> dict[str, Any] | None:
    """The JSONLogic rule, or None when every user gets the default variant statically."""
    if not flag.enabled:
        return None
    default = flag.default_variant
    branches: list[Any] = []
    by_tenant: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (tenant, user), variant in sorted(flag.users.items()):
        by_tenant[tenant][variant].append(user)
    for tenant, variants in sorted(by_tenant.items()):
        for variant, users in sorted(variants.items()):
            branches += [
                {"and": [{"in": [{"var": TENANT_ATTRIBUTE}, [tenant]]}, {"in": [{"var": "targetingKey"}, users]}]},
                variant,
            ]
    by_rule: dict[tuple[str, int | None], list[str]] = defaultdict(list)
    for tenant, rule in sorted(flag.tenants.items()):
        by_rule[(rule.variant, rule.percentage)].append(tenant)
    for (variant, percentage), tenants in sorted(by_rule.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
        fractions = ((variant, percentage), (default, 100 - percentage)) if percentage is not None else None
        branches += [
            {"in": [{"var": TENANT_ATTRIBUTE}, tenants]},
            _fractional(fractions) if fractions is not None else variant,
        ]
    rollout = _fractional(flag.rollout.fractions(default)) if flag.rollout is not None else None
    if not branches:
        return rollout
    if rollout is not None:
        branches.append(rollout)
    return {"if": branches}


def flagd_flag(flag: FlagDefinition, metadata: dict[str, str | int | bool] | None = None) -> dict[str, Any]:
    """One flag's flagd definition."""
    meta: dict[str, str | int | bool] = {"enabled": flag.enabled, **(metadata or {})}
    if flag.description:
        meta["description"] = flag.description
    out: dict[str, Any] = {
        "state": "ENABLED",
        "variants": dict(flag.variants),
        "defaultVariant": flag.default_variant,
        "metadata": meta,
    }
    rule = targeting(flag)
    if rule is not None:
        out["targeting"] = rule
    return out


def flagd_document(flags: list[FlagDefinition], metadata: dict[str, str | int | bool] | None = None) -> dict[str, Any]:
    """A whole flagd flag-definition document (what a flagd file source or provider reads)."""
    return {"$schema": FLAGD_SCHEMA, "flags": {f.key: flagd_flag(f, metadata) for f in flags}}


def flagd_source(flags: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A flagd document from flags already rendered by `flagd_flag`, by key: the namespace's
    source, where each flag carries its own metadata (its FeatureFlag's name)."""
    return {"$schema": FLAGD_SCHEMA, "flags": {key: dict(flag) for key, flag in flags.items()}}
