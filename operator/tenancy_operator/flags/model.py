"""The normalized flag definition: what the operator stores in Postgres and exports to flagd.

A FeatureFlag's spec has conveniences (defaults, a percentage-only tenant override that serves the
rollout's variant, lists keyed by tenant and user). `FlagDefinition` is the same flag with those
resolved, so the rows in Postgres, the flagd export and the evaluation all describe one thing, and
two definitions compare equal exactly when every user gets the same variant and value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tenancy_operator.api.featureflag import FeatureFlagSpec

PERCENT = 100


@dataclass(frozen=True)
class Rollout:
    """Either `percentage` % of users get `variant` (the rest the default), or `weights`."""

    variant: str | None = None
    percentage: int | None = None
    weights: tuple[tuple[str, int], ...] | None = None

    def fractions(self, default_variant: str) -> tuple[tuple[str, int], ...]:
        """(variant, weight) in bucket order, the arguments of flagd's `fractional`."""
        if self.weights is not None:
            return self.weights
        assert self.variant is not None
        assert self.percentage is not None
        return ((self.variant, self.percentage), (default_variant, PERCENT - self.percentage))

    def to_json(self) -> dict[str, Any]:
        if self.weights is not None:
            return {"weights": [{"variant": v, "weight": w} for v, w in self.weights]}
        return {"variant": self.variant, "percentage": self.percentage}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Rollout:
        if raw.get("weights") is not None:
            return cls(weights=tuple((str(w["variant"]), int(w["weight"])) for w in raw["weights"]))
        return cls(variant=str(raw["variant"]), percentage=int(raw["percentage"]))


@dataclass(frozen=True)
class TenantRule:
    """All users of a tenant get `variant`, or `percentage` % of them do and the rest the default."""

    variant: str
    percentage: int | None = None

    def fractions(self, default_variant: str) -> tuple[tuple[str, int], ...] | None:
        if self.percentage is None:
            return None
        return ((self.variant, self.percentage), (default_variant, PERCENT - self.percentage))

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "percentage": self.percentage}


@dataclass(frozen=True)
class FlagDefinition:
    key: str
    enabled: bool
    variants: Mapping[str, Any]
    default_variant: str
    rollout: Rollout | None = None
    tenants: Mapping[str, TenantRule] = field(default_factory=dict)
    users: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(tenant, user) -> variant."""
    description: str | None = None

    @classmethod
    def from_spec(cls, spec: FeatureFlagSpec, name: str, served: int | None = None) -> FlagDefinition:
        """The definition a FeatureFlag named `name` declares. ``served``: the share its stepped
        rollout serves now (status.rollout.percentage); unknown, nobody gets the variant yet."""
        rollout = None
        if spec.rollout is not None:
            if spec.rollout.weights is not None:
                rollout = Rollout(weights=tuple((w.variant, w.weight) for w in spec.rollout.weights))
            elif spec.rollout.steps is not None:
                rollout = Rollout(variant=spec.rollout.variant, percentage=served if served is not None else 0)
            else:
                rollout = Rollout(variant=spec.rollout.variant, percentage=spec.rollout.percentage)
        return cls(
            key=spec.effective_key(name),
            enabled=spec.enabled,
            variants=spec.variant_values(),
            default_variant=spec.default_variant,
            rollout=rollout,
            tenants={t.tenant: TenantRule(t.variant or spec.rollout_variant(), t.percentage) for t in spec.tenants},
            users={(u.tenant, u.user): u.variant for u in spec.users},
            description=spec.description,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON form keyed by tenant and user, so that a diff of two of them names what changed."""
        users: dict[str, dict[str, str]] = {}
        for (tenant, user), variant in sorted(self.users.items()):
            users.setdefault(tenant, {})[user] = variant
        return {
            "key": self.key,
            "description": self.description,
            "enabled": self.enabled,
            "variants": dict(self.variants),
            "defaultVariant": self.default_variant,
            "rollout": self.rollout.to_json() if self.rollout is not None else None,
            "tenants": {t: rule.to_json() for t, rule in sorted(self.tenants.items())},
            "users": users,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FlagDefinition:
        return cls(
            key=str(raw["key"]),
            enabled=bool(raw["enabled"]),
            variants=dict(raw["variants"]),
            default_variant=str(raw["defaultVariant"]),
            rollout=Rollout.from_json(raw["rollout"]) if raw.get("rollout") else None,
            tenants={t: TenantRule(str(r["variant"]), r.get("percentage")) for t, r in raw.get("tenants", {}).items()},
            users={(t, u): str(v) for t, us in raw.get("users", {}).items() for u, v in us.items()},
            description=raw.get("description"),
        )

    def variant_shares(self) -> dict[str, float]:
        """Expected share of users per variant under the flag-wide rules (kill switch, rollout),
        ignoring overrides; what `status.variantShares` reports."""
        if not self.enabled or self.rollout is None:
            return {self.default_variant: 1.0}
        fractions = self.rollout.fractions(self.default_variant)
        total = sum(max(0, w) for _, w in fractions)
        shares: dict[str, float] = {}
        for variant, weight in fractions:
            shares[variant] = shares.get(variant, 0.0) + max(0, weight) / total
        return {v: round(s, 6) for v, s in shares.items() if s > 0}

    def tenant_names(self) -> set[str]:
        """Every tenant an override names."""
        return set(self.tenants) | {t for t, _ in self.users}
