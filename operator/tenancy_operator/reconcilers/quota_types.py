"""The values the quota modules pass each other: a ``Subject`` (one tenant key and what the API
server says about it) and its ``Probe`` (what the database says, quota_probe.py) go into
``evaluate`` (quota_policy.py); a ``Plan`` comes out for ``QuotaService.apply`` (quota.py,
quota_enforce.py, quota_metrics.py), with the ``Memory`` the next evaluation starts from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from tenancy_operator.db.quota import RoleQuotaState
from tenancy_operator.reconcilers.noisy import Verdict
from tenancy_operator.reconcilers.quota_limits import RoleSettings

Key = tuple[str, str]
"""(namespace, tenant name): quotas are per tenant, so is every lock and memory entry."""
LOCK_KIND = "QuotaTenant"
"""The kind of the per-tenant lock every evaluation of a tenant holds (one at a time)."""


@dataclass(frozen=True)
class Probe:
    """What the database says about one subject (or why it could not be asked)."""

    state: RoleQuotaState | None = None
    storage: int = 0
    connections: int = 0
    reported: Mapping[str, Decimal] = field(default_factory=dict)
    problem: tuple[str, str] | None = None
    """(reason, message) when the tenant's limits cannot be enforced now."""
    target: str | None = None
    ident: str | None = None
    load: LoadView | None = None
    """The tenant's load on its target (periodic passes; a handler's evaluation reuses the last)."""


@dataclass(frozen=True)
class LoadView:
    """What the last pass found about a tenant's load."""

    verdict: Verdict | None
    """None until two samples cover some time."""
    source: str
    detail: str | None
    window: str
    active: int = 0
    waiting: int = 0
    wait_events: tuple[str, ...] = ()


@dataclass
class Subject:
    """One tenant key and what the API server says about it."""

    namespace: str
    name: str
    tenant: dict[str, Any] | None
    quotas: list[dict[str, Any]]
    """Quotas naming the tenant, the one in force first (see ``sort_quotas``)."""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@dataclass
class Memory:
    """What the last evaluation of a subject found, for transition Events (in memory only)."""

    uid: str
    tier: str
    levels: dict[str, int]
    active: set[tuple[str, str]]
    """(limit, expiresAt) of the overrides in force."""
    noisy: bool | None = None
    """The NoisyNeighbor verdict in force (None: never judged)."""
    contained: tuple[str, ...] = ()
    """Role attributes lowered by containment."""


@dataclass
class Plan:
    """What one evaluation decided; ``QuotaService.apply`` does it."""

    enforce: bool = False
    target: str | None = None
    ident: str | None = None
    tenant_id: str | None = None
    role: RoleSettings | None = None
    role_changes: list[str] = field(default_factory=list)
    terminate: bool = False
    publish: dict[str, Any] | None = None
    quota_patches: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    tenant_patch: dict[str, Any] | None = None
    events: list[tuple[dict[str, Any], str, str, str]] = field(default_factory=list)
    hard: dict[str, str] = field(default_factory=dict)
    amounts_used: dict[str, Decimal] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    next_expiry: datetime | None = None
    memory: Memory | None = None
    expired: list[str] = field(default_factory=list)
    """Limits whose override ended at this evaluation (for logs)."""
    ledger: list[tuple[str, str]] = field(default_factory=list)
    """(kind, detail) of containment jobs to record in the lifecycle ledger with the role change."""
    tenant_version: str | None = None
    """resourceVersion the Tenant status patch is conditional on (it replaces the conditions list)."""
    noisy: bool | None = None
    load_share: float | None = None
