"""Waves in which a schema template's new migrations reach its Tenants: a canary, then batches,
each gated on the Tenants' health, a failure budget and optionally a Prometheus query.

A SchemaRollout names a schema template (the ConfigMap Tenants name in spec.schemaTemplate) of its
namespace. Without one, a new migration in the template goes to every Tenant at once; with one,
versions newer than the rollout's `baseVersion` reach only the Tenants it has admitted: a canary
set, then waves by count or percentage, each judged by a health gate before the next.

Which Tenants are admitted is two numbers in status, not a list: the canary names, and
`admitBelow`, a cut in a fixed order of the template's Tenants (a hash of namespace, template and
name, `tenant_bucket`). A Tenant reconcile reads them from the SchemaRollout and needs nothing else
(`version_cap`).

The first paragraph is the kind's description in the CRD.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field, model_validator

from tenancy_operator.api.common import ApiModel, DnsSubdomain
from tenancy_operator.api.conditions import Explained, KindStatus
from tenancy_operator.api.durations import Duration, parse_duration
from tenancy_operator.api.featureflag import RolloutGate
from tenancy_operator.api.resource import ResourceInfo, columns
from tenancy_operator.api.schema_extra import cel, immutable, list_atomic, list_map, list_set, validations
from tenancy_operator.api.tenant import TENANT_NAME_MAX_LENGTH, TENANT_NAME_PATTERN

BUCKETS = 10_000
"""The order of a template's Tenants is their bucket, 0 to BUCKETS - 1 (ties by name)."""
MAX_WAVES = 20
MAX_CANARY = 100
MAX_LISTED = 50
"""Failed tenants listed in status (the count is exact, the list the first ones by name)."""
PAUSE_DEFAULT = "10m"

TenantName = Annotated[str, Field(max_length=TENANT_NAME_MAX_LENGTH, pattern=TENANT_NAME_PATTERN)]
Percentage = Annotated[int, Field(ge=1, le=100)]


class Canary(ApiModel, json_schema_extra=validations(
    cel("has(self.tenants) || has(self.count)", "a canary needs tenants, a count or both"),
)):
    """The first wave: Tenants named, and/or a count of others (the first in the rollout's order)."""

    tenants: list[TenantName] | None = Field(default=None, min_length=1, max_length=MAX_CANARY,
                                             json_schema_extra=list_set())
    """Tenants of the namespace migrated first (a name with no Tenant is skipped)."""
    count: int | None = Field(default=None, ge=1, le=MAX_CANARY)
    """How many more Tenants, besides the named ones, the canary takes."""

    @model_validator(mode="after")
    def _something(self) -> Canary:
        if self.tenants is None and self.count is None:
            raise ValueError("a canary needs tenants, a count or both")
        return self


class Wave(ApiModel, json_schema_extra=validations(
    cel("has(self.count) != has(self.percentage)", "a wave is a count or a percentage, not both"),
)):
    """One wave after the canary: how many of the template's Tenants have been admitted once it starts."""

    count: int | None = Field(default=None, ge=1, le=1_000_000)
    """Tenants admitted in this wave."""
    percentage: Percentage | None = None
    """Share of all the template's Tenants admitted once this wave starts (cumulative, 1-100)."""

    @model_validator(mode="after")
    def _one(self) -> Wave:
        if (self.count is None) == (self.percentage is None):
            raise ValueError("a wave is a count or a percentage, not both")
        return self


class FailureBudget(ApiModel, json_schema_extra=validations(
    cel("has(self.count) != has(self.percentage)", "a failure budget is a count or a percentage, not both"),
)):
    """How many of the Tenants admitted so far (the canary and the waves up to the current one) may
    have failed their migration before the rollout halts: failures count for the whole rollout,
    not wave by wave."""

    count: int | None = Field(default=None, ge=0, le=1_000_000)
    """Failed Tenants the rollout tolerates."""
    percentage: int | None = Field(default=None, ge=0, le=100)
    """Share of the Tenants admitted so far that may fail (rounded down)."""

    @model_validator(mode="after")
    def _one(self) -> FailureBudget:
        if (self.count is None) == (self.percentage is None):
            raise ValueError("a failure budget is a count or a percentage, not both")
        return self

    def allows(self, admitted: int) -> int:
        """Failures tolerated with ``admitted`` Tenants admitted."""
        if self.count is not None:
            return self.count
        return admitted * (self.percentage or 0) // 100


class SchemaRolloutSpec(ApiModel, json_schema_extra=validations(
    cel("!has(self.waves) || self.waves.all(w, !has(w.percentage)) || "
        "self.waves.filter(w, has(w.percentage)).map(w, w.percentage).isSorted()",
        "wave percentages are cumulative: each at least the one before", field_path=".waves"),
)):
    """Waves in which a schema template's new migrations reach its Tenants."""

    template: DnsSubdomain = Field(json_schema_extra=immutable("template"))
    """The schema template ConfigMap (in this namespace) whose new migrations this rollout paces. Immutable."""
    canary: Canary | None = None
    """The first wave; without it, the first of `waves` is the first."""
    waves: list[Wave] = Field(default_factory=lambda: [Wave(percentage=100)], min_length=1, max_length=MAX_WAVES,
                              json_schema_extra=list_atomic())
    """The waves after the canary, in order; the Tenants left after the last one are admitted with
    it (a last wave below 100 % still ends the rollout with every Tenant admitted). Default: one
    wave of 100 %."""
    pause: Duration | None = None
    """The least time between a wave's end (every Tenant of it migrated or failed within budget)
    and the next wave; default 10m."""
    failure_budget: FailureBudget | None = None
    """Failed migrations the rollout tolerates among the Tenants admitted so far; default none (a
    count of 0)."""
    gate: RolloutGate | None = None
    """A Prometheus query checked before each next wave; above `max`, the rollout halts."""
    paused: bool | None = None
    """true: admit no further Tenants (those admitted go on migrating) until false or removed."""

    @model_validator(mode="after")
    def _cumulative(self) -> SchemaRolloutSpec:
        shares = [w.percentage for w in self.waves if w.percentage is not None]
        if any(a > b for a, b in itertools.pairwise(shares)):
            raise ValueError("wave percentages are cumulative: each at least the one before")
        return self

    def pause_for(self) -> datetime.timedelta:
        return parse_duration(self.pause or PAUSE_DEFAULT)

    def budget(self, admitted: int) -> int:
        return self.failure_budget.allows(admitted) if self.failure_budget is not None else 0


RolloutPhase = Literal["Idle", "Progressing", "Paused", "Halted", "Completed", "RolledBack"]


class FailedTenant(ApiModel):
    """A Tenant whose migration to the target version failed."""

    name: TenantName
    reason: str = Field(max_length=64)
    """The Tenant's Ready reason (MigrationFailed, MigrationTimeout, ...)."""
    message: str = Field(default="", max_length=512)


class SchemaRolloutStatus(KindStatus, Explained):
    """Where the rollout stands; `baseVersion`, `canary` and `admitBelow` are what Tenants obey."""

    phase: RolloutPhase | None = None
    """Idle (nothing newer than baseVersion), Progressing, Paused, Halted (a wave's failures went
    over the budget or the gate breached: no further Tenants admitted until resumed), Completed,
    or RolledBack (on request, every Tenant runs the down migrations back to baseVersion)."""
    base_version: str | None = Field(default=None, max_length=253)
    """Every Tenant of the template may have the migrations up to this version."""
    target_version: str | None = Field(default=None, max_length=253)
    """The template's newest version, which the waves bring to the Tenants."""
    canary: list[TenantName] = Field(default_factory=list, max_length=2 * MAX_CANARY, json_schema_extra=list_set())
    """Tenants admitted by name (the canary wave)."""
    admit_below: int = Field(default=0, ge=0, le=BUCKETS)
    """Tenants whose bucket (tenant_bucket) is below this are admitted too."""
    wave: int | None = Field(default=None, ge=0, le=MAX_WAVES + 1)
    """The current wave: 1 is the first (the canary, when there is one)."""
    waves: int | None = Field(default=None, ge=0, le=MAX_WAVES + 1)
    """How many waves this rollout has, the canary included."""
    wave_started_at: AwareDatetime | None = None
    wave_ended_at: AwareDatetime | None = None
    """When every Tenant of the current wave was migrated (or failed within budget)."""
    tenants: int = Field(default=0, ge=0)
    """Tenants using the template (pinned ones included)."""
    migrated: int = Field(default=0, ge=0)
    """Tenants Ready at targetVersion."""
    failed: int = Field(default=0, ge=0)
    """Admitted Tenants whose migration failed."""
    pending: int = Field(default=0, ge=0)
    """Tenants not at targetVersion yet (admitted and migrating, or waiting for their wave)."""
    pinned: int = Field(default=0, ge=0)
    """Tenants pinned to a version (annotation tenancy.dev/schema-pin): never admitted."""
    failed_tenants: list[FailedTenant] = Field(default_factory=list, max_length=MAX_LISTED,
                                               json_schema_extra=list_map("name"))
    """The failed Tenants (the first 50 by name) and why."""
    gate_value: float | None = None
    resumed_by: str | None = Field(default=None, max_length=253)
    """The value of the tenancy.dev/resume-rollout annotation last acted on."""
    rolled_back_by: str | None = Field(default=None, max_length=253)
    """The value of the tenancy.dev/rollback-rollout annotation last acted on."""


SCHEMA_ROLLOUT = ResourceInfo(
    "SchemaRollout", SchemaRolloutSpec, SchemaRolloutStatus, short_names=("sro",),
    printer_columns=columns({
        "Template": ".spec.template", "Target": ".status.targetVersion", "Wave": ".status.wave",
        "Migrated": ".status.migrated", "Failed": ".status.failed", "Pending": ".status.pending",
    }),
)


def tenant_bucket(namespace: str, template: str, tenant: str) -> int:
    """The Tenant's place in the rollout order of its template: stable, spread evenly, 0 to BUCKETS - 1."""
    digest = hashlib.sha256(f"{namespace}/{template}/{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def version_cap(status: SchemaRolloutStatus | None, namespace: str, template: str, tenant: str) -> str | None:
    """The newest template version the Tenant may have now; None: no limit (no rollout, or admitted)."""
    if status is None or status.base_version is None:
        return None
    if tenant in status.canary or tenant_bucket(namespace, template, tenant) < status.admit_below:
        return None
    return status.base_version


def governing(rollouts: Iterable[Mapping[str, Any]], template: str) -> dict[str, Any] | None:
    """Of the SchemaRollouts of a namespace, the one governing ``template``: the oldest naming it."""
    naming = [r for r in rollouts if (r.get("spec") or {}).get("template") == template
              and not r["metadata"].get("deletionTimestamp")]
    naming.sort(key=lambda r: (str(r["metadata"].get("creationTimestamp") or ""), str(r["metadata"]["name"])))
    return dict(naming[0]) if naming else None
