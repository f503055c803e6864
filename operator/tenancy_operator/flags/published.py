"""Read a published flagd flag back into the FlagDefinition it was exported from.

The operator publishes each FeatureFlag as flagd JSON in a ConfigMap (reconcilers/featureflag.py,
flags/flagd.py). `kubectl tenancy flags eval` evaluates *that* document, what applications read,
with the operator's own evaluator (flags/evaluation.py). The targeting the exporter writes has a
fixed shape (user branches, tenant branches, then the rollout); this is its inverse, and it
accepts a document only if exporting the result gives the very same document back, so an
evaluation of the result is an evaluation of what was published, or it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tenancy_operator.flags.flagd import TENANT_ATTRIBUTE, flagd_flag
from tenancy_operator.flags.model import PERCENT, FlagDefinition, Rollout, TenantRule


class NotOurs(ValueError):
    """The document is not one the operator's exporter writes (edited by hand, another tool)."""


def _fractions(node: Any) -> tuple[tuple[str, int], ...] | None:
    if not isinstance(node, dict) or set(node) != {"fractional"} or not isinstance(node["fractional"], list):
        return None
    out: list[tuple[str, int]] = []
    for entry in node["fractional"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            return None
        out.append((entry[0], entry[1]))
    return tuple(out)


def _in_var(node: Any, var: str) -> list[str] | None:
    """The list of `{"in": [{"var": var}, [...]]}`, else None."""
    if not isinstance(node, dict) or set(node) != {"in"}:
        return None
    args = node["in"]
    if not (isinstance(args, list) and len(args) == 2 and args[0] == {"var": var} and isinstance(args[1], list)
            and all(isinstance(x, str) for x in args[1])):
        return None
    return list(args[1])


def _branch(cond: Any, result: Any, default: str, tenants: dict[str, TenantRule],
            users: dict[tuple[str, str], str]) -> None:
    if isinstance(cond, dict) and set(cond) == {"and"} and isinstance(cond["and"], list) and len(cond["and"]) == 2:
        tenant_list = _in_var(cond["and"][0], TENANT_ATTRIBUTE)
        user_list = _in_var(cond["and"][1], "targetingKey")
        if tenant_list is None or user_list is None or len(tenant_list) != 1 or not isinstance(result, str):
            raise NotOurs("a user branch of an unknown shape")
        for user in user_list:
            users[(tenant_list[0], user)] = result
        return
    names = _in_var(cond, TENANT_ATTRIBUTE)
    if names is None:
        raise NotOurs("a targeting condition of an unknown shape")
    if isinstance(result, str):
        rule = TenantRule(result)
    else:
        fractions = _fractions(result)
        if fractions is None or len(fractions) != 2 or fractions[1][0] != default \
                or fractions[0][1] + fractions[1][1] != PERCENT:
            raise NotOurs("a tenant branch of an unknown shape")
        rule = TenantRule(fractions[0][0], fractions[0][1])
    for name in names:
        tenants[name] = rule


def definition_from_flagd(key: str, published: Mapping[str, Any]) -> FlagDefinition:
    """The FlagDefinition whose export is ``published`` (one flag of a flagd document)."""
    variants = published.get("variants")
    default = published.get("defaultVariant")
    metadata = published.get("metadata") or {}
    if not isinstance(variants, dict) or not isinstance(default, str) or not isinstance(metadata, dict):
        raise NotOurs("variants, defaultVariant or metadata missing")
    enabled = metadata.get("enabled", True)
    description = metadata.get("description")
    tenants: dict[str, TenantRule] = {}
    users: dict[tuple[str, str], str] = {}
    rollout: Rollout | None = None
    rule = published.get("targeting")
    if rule is not None:
        fractions = _fractions(rule)
        if fractions is not None:
            rollout = Rollout(weights=fractions)
        elif isinstance(rule, dict) and set(rule) == {"if"} and isinstance(rule["if"], list):
            branches = list(rule["if"])
            if len(branches) % 2:
                last = _fractions(branches.pop())
                if last is None:
                    raise NotOurs("an else branch that is not a fractional rollout")
                rollout = Rollout(weights=last)
            for i in range(0, len(branches), 2):
                _branch(branches[i], branches[i + 1], default, tenants, users)
        else:
            raise NotOurs("targeting of an unknown shape")
    flag = FlagDefinition(
        key=key, enabled=bool(enabled), variants=dict(variants), default_variant=default, rollout=rollout,
        tenants=tenants, users=users, description=description if isinstance(description, str) else None,
    )
    extra = {k: v for k, v in metadata.items() if k not in ("enabled", "description")}
    if _canonical(flagd_flag(flag, extra)) != _canonical(dict(published)):
        raise NotOurs("exporting what was read does not give the published document back")
    return flag


def definition_from_document(document: Mapping[str, Any], key: str | None = None) -> FlagDefinition:
    """The flag ``key`` of a flagd document (None: its only flag)."""
    flags = document.get("flags")
    if not isinstance(flags, dict) or not flags:
        raise NotOurs("no flags in the document")
    if key is None:
        if len(flags) != 1:
            raise NotOurs(f"the document holds {len(flags)} flags; name one")
        key = next(iter(flags))
    if key not in flags:
        raise NotOurs(f"no flag {key!r} in the document (it has: {', '.join(sorted(flags))})")
    return definition_from_flagd(key, flags[key])


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
