"""Pure flag evaluation: which variant one user of one tenant gets, and why.

Precedence: the kill switch, then a user override, then the tenant's override, then the flag-wide
rollout, then the default variant. Percentages are decided by `bucketing.fractional`, exactly as a
flagd provider decides them from our flagd export, so both always agree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from tenancy_operator.flags.bucketing import fractional
from tenancy_operator.flags.model import FlagDefinition


class Reason(enum.StrEnum):
    KILL_SWITCH = "KILL_SWITCH"
    """`enabled: false`: everyone gets the default variant."""
    USER_OVERRIDE = "USER_OVERRIDE"
    TENANT_OVERRIDE = "TENANT_OVERRIDE"
    ROLLOUT = "ROLLOUT"
    """The flag-wide rollout placed the user (in or out of the rollout's share)."""
    DEFAULT = "DEFAULT"
    """Nothing applied, or a percentage applied but there was no user to place."""


@dataclass(frozen=True)
class Evaluation:
    variant: str
    value: Any
    reason: Reason


def evaluate(flag: FlagDefinition, tenant: str | None, user: str | None) -> Evaluation:
    """The variant `user` of `tenant` gets. A user without a targeting key (None or "") cannot be
    placed in a percentage: they get the default variant (flagd's `fractional` does the same)."""
    default = flag.default_variant
    if not flag.enabled:
        return Evaluation(default, flag.variants.get(default), Reason.KILL_SWITCH)
    if tenant is not None and user:
        variant = flag.users.get((tenant, user))
        if variant is not None:
            return Evaluation(variant, flag.variants.get(variant), Reason.USER_OVERRIDE)
    rule = flag.tenants.get(tenant) if tenant is not None else None
    if rule is not None:
        fractions = rule.fractions(default)
        if fractions is None:
            return Evaluation(rule.variant, flag.variants.get(rule.variant), Reason.TENANT_OVERRIDE)
        picked = fractional(flag.key, user, fractions)
        if picked is None:
            return Evaluation(default, flag.variants.get(default), Reason.DEFAULT)
        return Evaluation(picked, flag.variants.get(picked), Reason.TENANT_OVERRIDE)
    if flag.rollout is not None:
        picked = fractional(flag.key, user, flag.rollout.fractions(default))
        if picked is not None:
            return Evaluation(picked, flag.variants.get(picked), Reason.ROLLOUT)
    return Evaluation(default, flag.variants.get(default), Reason.DEFAULT)
