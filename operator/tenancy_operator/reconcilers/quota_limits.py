"""Quota arithmetic, pure: which Quota is in force, the effective limits (tier defaults, the
Quota's limits, its unexpired overrides), usage amounts, ratios and levels, the role attributes the
limits ask for, and what is derived from them for others to read (the tenants.quotas registry
document, metric amounts). Status, conditions and Events are quota_policy.py's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tenancy_operator.api.quantities import format_quantity
from tenancy_operator.api.quota import (
    CONNECTION_LIMIT_MAX,
    LIMIT_NAMES,
    NEAR_LIMIT_RATIO,
    QuotaOverride,
    QuotaSpec,
    limit_amount,
)
from tenancy_operator.db.quota import RoleQuotaState

OK, NEAR, EXCEEDED = 0, 1, 2
LEVEL_NAMES = {NEAR: "near", EXCEEDED: "exceeded"}


@dataclass(frozen=True)
class RoleSettings:
    """The role attributes the operator owns for quotas."""

    connection_limit: int
    """-1: unlimited."""
    statement_timeout_ms: int | None
    read_only: bool


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def sort_quotas(quotas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Quota in force first: the oldest (creationTimestamp, then name); later ones conflict."""
    return sorted(quotas, key=lambda q: (q["metadata"].get("creationTimestamp") or "", q["metadata"]["name"]))


def effective_limits(defaults: Mapping[str, str], spec: QuotaSpec | None, now: datetime) -> dict[str, str]:
    """Tier defaults, then the Quota's limits, then its unexpired overrides."""
    hard = dict(defaults)
    if spec is not None:
        hard.update(spec.effective_limits(now))
    return {name: hard[name] for name in LIMIT_NAMES if name in hard}


def next_expiry(spec: QuotaSpec | None, now: datetime) -> datetime | None:
    """When the next override ends: the limits change then, so the operator wakes then."""
    if spec is None:
        return None
    upcoming = [o.expires_at for o in spec.overrides if o.expires_at > now]
    return min(upcoming) if upcoming else None


def used_amounts(storage: int, connections: int, reported: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Usage by limit name: measured storage and connections, platform-reported for the rest."""
    used = {name: Decimal(value) for name, value in reported.items() if name in LIMIT_NAMES}
    used.pop("statementTimeout", None)  # a timeout has no usage
    used["storage"] = Decimal(storage)
    used["connections"] = Decimal(connections)
    return {name: used[name] for name in LIMIT_NAMES if name in used}


def format_used(limit: str, amount: Decimal) -> str:
    if limit == "storage":
        return format_quantity(int(amount))
    if amount == amount.to_integral_value():
        return str(int(amount))
    return format(amount.normalize(), "f")


def usage_ratios(hard: Mapping[str, str], used: Mapping[str, Decimal]) -> dict[str, float]:
    """used / hard for every limit that has both (1.0 = at the limit)."""
    ratios: dict[str, float] = {}
    for name, amount in used.items():
        if name in hard and name != "statementTimeout":
            ratios[name] = round(float(amount) / limit_amount(name, hard[name]), 4)
    return ratios


def level(ratio: float) -> int:
    if ratio >= 1.0:
        return EXCEEDED
    if ratio >= NEAR_LIMIT_RATIO:
        return NEAR
    return OK


def desired_role(hard: Mapping[str, str], read_only: bool) -> RoleSettings:
    connections = hard.get("connections")
    timeout = hard.get("statementTimeout")
    return RoleSettings(
        connection_limit=min(int(connections), CONNECTION_LIMIT_MAX) if connections else -1,
        statement_timeout_ms=limit_amount("statementTimeout", timeout) if timeout else None,
        read_only=read_only,
    )


def role_changes(state: RoleQuotaState, want: RoleSettings) -> list[str]:
    """Which owned attributes differ from the catalog (a hand-made '30s' differs from 30000: it is
    rewritten once in the operator's form)."""
    changes = []
    if state.connection_limit != want.connection_limit:
        changes.append("connections")
    current_timeout = state.statement_timeout
    wanted_timeout = None if want.statement_timeout_ms is None else str(want.statement_timeout_ms)
    if current_timeout != wanted_timeout:
        changes.append("statementTimeout")
    if state.read_only != want.read_only:
        changes.append("readOnly")
    return changes


def registry_document(
    hard: Mapping[str, str], *, enforcement: str, blocked: bool, active: Mapping[str, QuotaOverride],
    quota: str | None,
) -> dict[str, Any]:
    """tenants.quotas: what the platform's rate limiter and job runner read. Counts as numbers,
    storage and statementTimeout both as written and in bytes / milliseconds."""
    doc: dict[str, Any] = {}
    for name, value in hard.items():
        if name == "storage":
            doc["storage"] = value
            doc["storageBytes"] = limit_amount(name, value)
        elif name == "statementTimeout":
            doc["statementTimeout"] = value
            doc["statementTimeoutMs"] = limit_amount(name, value)
        else:
            doc[name] = int(value)
    doc["storageEnforcement"] = enforcement
    doc["writesBlocked"] = blocked
    doc["overrides"] = [
        {"limit": o.limit, "value": str(o.value), "expiresAt": iso(o.expires_at)}
        for _, o in sorted(active.items())
    ]
    doc["quota"] = quota
    return doc


def metric_amount(limit: str, value: str) -> float:
    """A limit for Prometheus: bytes, seconds (statementTimeout), counts."""
    amount = limit_amount(limit, value)
    return amount / 1000 if limit == "statementTimeout" else float(amount)


def quota_version(quota: Mapping[str, Any]) -> tuple[str, int]:
    """What a Quota's evaluation depends on: (uid, generation); status and metadata edits do not count."""
    return (str(quota["metadata"].get("uid") or ""), int(quota["metadata"].get("generation") or 0))
