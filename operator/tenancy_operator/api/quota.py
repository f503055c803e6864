"""Resource limits of one Tenant (storage, connections, request rate, jobs, timeouts), with
time-boxed overrides.

The Quota kind's spec and status; this first paragraph is its description in the CRD.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, AwareDatetime, Field, WithJsonSchema, model_validator

from tenancy_operator.api.common import ApiModel
from tenancy_operator.api.conditions import Conditions, KindStatus
from tenancy_operator.api.durations import (
    DURATION_MAX_LENGTH,
    DURATION_PATTERN,
    STATEMENT_TIMEOUT_MAX,
    PositiveDuration,
    check_duration_at_most,
    duration_field,
    duration_millis_cel,
    parse_duration,
)
from tenancy_operator.api.quantities import (
    QUANTITY_MAX,
    QUANTITY_MAX_VALUE,
    QUANTITY_PATTERN,
    PositiveQuantity,
    parse_quantity,
)
from tenancy_operator.api.resource import ResourceInfo, columns
from tenancy_operator.api.schema_extra import cel, cel_string, immutable, list_map, list_set, validations
from tenancy_operator.api.tenant import TENANT_NAME_MAX_LENGTH, TENANT_NAME_PATTERN, LimitValue, Tier

LimitName = Literal["storage", "connections", "requestsPerSecond", "burst", "concurrentJobs", "statementTimeout"]
"""JSON names of the limits; also the keys of status.hard, status.used and Tenant effectiveLimits."""
LIMIT_NAMES: tuple[LimitName, ...] = get_args(LimitName)
COUNT_LIMITS: tuple[LimitName, ...] = ("connections", "requestsPerSecond", "burst", "concurrentJobs")
"""Limits whose values are plain positive integers."""

StorageEnforcement = Literal["Warn", "BlockWrites"]

STATEMENT_TIMEOUT_MAX_MS = 2**31 - 1
"""PostgreSQL's statement_timeout is an int4 of milliseconds (about 24.8 days): STATEMENT_TIMEOUT_MAX."""
COUNT_MAX = 2**31 - 1
"""Largest count limit: PostgreSQL's CONNECTION LIMIT is an int4, and so are the others' columns."""
CONNECTION_LIMIT_MAX = COUNT_MAX

INT_OR_STRING_MAX_LENGTH = 64
IntOrString = Annotated[
    int | str, WithJsonSchema({"x-kubernetes-int-or-string": True, "maxLength": INT_OR_STRING_MAX_LENGTH})
]
"""An integer or a string (of at most 64 characters) in JSON, like Kubernetes' IntOrString. The
length bound keeps the CEL rules on it within the API server's cost budget."""

CONDITION_NEAR_LIMIT = "NearLimit"
CONDITION_EXCEEDED = "Exceeded"
CONDITION_NOISY_NEIGHBOR = "NoisyNeighbor"
NEAR_LIMIT_RATIO = 0.9
"""A limit is near at 90 % of its value (the seeds' "Quota exhaustion > 90%" alert)."""


class TenantRef(ApiModel):
    """Reference to a Tenant in the same namespace."""

    name: str = Field(max_length=TENANT_NAME_MAX_LENGTH, pattern=TENANT_NAME_PATTERN)
    """Name of the Tenant."""


class QuotaLimits(ApiModel):
    """Hard limits; a limit left out is taken from the tenant's tier defaults."""

    storage: PositiveQuantity | None = None
    """Total size of the tenant schema, e.g. 10Gi."""
    connections: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    """Concurrent connections of the tenant role (PostgreSQL CONNECTION LIMIT)."""
    requests_per_second: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    """Sustained request rate the application's rate limiter grants the tenant."""
    burst: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    """Requests the rate limiter lets through at once above the sustained rate."""
    concurrent_jobs: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    """Background jobs of the tenant that may run at the same time."""
    statement_timeout: PositiveDuration | None = None
    """statement_timeout of the tenant role, e.g. 30s; at most 2147483647ms (PostgreSQL's limit)."""

    def as_strings(self) -> dict[str, str]:
        """The limits that are set, by JSON name, as strings (the shape of status.hard)."""
        return {key: str(value) for key, value in self.model_dump(by_alias=True, exclude_none=True).items()}


class QuotaEnforcement(ApiModel):
    """What the operator does when a limit is reached."""

    storage: StorageEnforcement = "Warn"
    """Warn: set the Exceeded condition and emit an event. BlockWrites: also make the tenant role
    read-only until usage is back under the limit."""


_STORAGE_VALUE = cel(
    "self.limit != 'storage' || (type(self.value) == int ? "
    f"(self.value > 0 && self.value <= {QUANTITY_MAX_VALUE}) : "
    f"(self.value.matches({cel_string(QUANTITY_PATTERN)}) && self.value.matches('[1-9]') && "
    f"quantity(self.value).compareTo(quantity('{QUANTITY_MAX}')) <= 0))",
    f"a storage override value must be a quantity greater than zero and at most {QUANTITY_MAX}, e.g. 20Gi",
    field_path=".value",
)
_TIMEOUT_VALUE = cel(
    "self.limit != 'statementTimeout' || (type(self.value) == string && "
    f"self.value.matches({cel_string(DURATION_PATTERN)}) && self.value.matches('[1-9]') && "
    f"{duration_millis_cel('self.value')} <= {float(STATEMENT_TIMEOUT_MAX_MS)!r})",
    "a statementTimeout override value must be a duration greater than zero and at most "
    f"{STATEMENT_TIMEOUT_MAX}, e.g. 60s",
    field_path=".value",
)
_COUNT_VALUE = cel(
    "self.limit in ['storage', 'statementTimeout'] || "
    f"(type(self.value) == int && self.value >= 1 && self.value <= {COUNT_MAX})",
    message_expression=f"'an override value for ' + self.limit + ' must be an integer from 1 to {COUNT_MAX}'",
    field_path=".value",
)


def check_limit_value(limit: LimitName, value: int | str) -> int | str:
    """Raise ValueError unless `value` is a valid positive value for `limit` (mirrors the CEL)."""
    if isinstance(value, str) and len(value) > INT_OR_STRING_MAX_LENGTH:
        raise ValueError(f"a limit value has at most {INT_OR_STRING_MAX_LENGTH} characters")
    if limit == "storage":
        if not 0 < parse_quantity(value) <= QUANTITY_MAX_VALUE:
            raise ValueError(
                f"a storage value must be a quantity greater than zero and at most {QUANTITY_MAX}, e.g. 20Gi"
            )
    elif limit == "statementTimeout":
        if not isinstance(value, str) or parse_duration(value).total_seconds() <= 0:
            raise ValueError("a statementTimeout value must be a duration greater than zero, e.g. 60s")
        check_duration_at_most(value, STATEMENT_TIMEOUT_MAX)
    elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= COUNT_MAX:
        raise ValueError(f"a value for {limit} must be an integer from 1 to {COUNT_MAX}")
    return value


class QuotaOverride(ApiModel, json_schema_extra=validations(_STORAGE_VALUE, _TIMEOUT_VALUE, _COUNT_VALUE)):
    """A temporary value for one limit, e.g. more connections during a migration."""

    limit: LimitName
    """Which limit this overrides."""
    value: IntOrString
    """New value: an integer for counts, a quantity for storage, a duration for statementTimeout."""
    expires_at: AwareDatetime
    """When the override stops applying (RFC 3339). Required so overrides cannot be forgotten."""
    reason: str | None = Field(default=None, max_length=512)
    """Why the override was granted, for the audit trail."""

    @model_validator(mode="after")
    def _value_fits_limit(self) -> QuotaOverride:
        check_limit_value(self.limit, self.value)
        return self


NOISY_WINDOW_MAX = "24h"
"""Longest load window: the operator keeps the samples of a window in memory."""
NOISY_MULTIPLE_MIN, NOISY_MULTIPLE_MAX = 1.1, 1000.0


def _positive_window(value: str) -> str:
    if parse_duration(value).total_seconds() <= 0:
        raise ValueError("a window must be greater than zero")
    return check_duration_at_most(value, NOISY_WINDOW_MAX)


Window = Annotated[
    str,
    duration_field(NOISY_WINDOW_MAX, positive=True),
    AfterValidator(_positive_window),
]
"""A duration greater than zero and at most NOISY_WINDOW_MAX."""


class ConnectionContainment(ApiModel):
    """Lower the role's CONNECTION LIMIT while the tenant is a noisy neighbour."""

    factor: float = Field(default=0.5, gt=0, le=1)
    """The limit in force times this (rounded up); an unlimited role gets the floor."""
    floor: int = Field(ge=1, le=COUNT_MAX)
    """Never lower than this (and never higher than the limit in force)."""


class TimeoutContainment(ApiModel):
    """Lower the role's statement_timeout while the tenant is a noisy neighbour."""

    factor: float = Field(default=0.5, gt=0, le=1)
    """The timeout in force times this (rounded up); a role without one gets the floor."""
    floor: PositiveDuration
    """Never shorter than this (and never longer than the timeout in force)."""


class NoisyContainment(ApiModel):
    """What the operator does to a noisy neighbour; each part only when declared."""

    connections: ConnectionContainment | None = None
    """Lower the connection limit while noisy; restored when calm."""
    statement_timeout: TimeoutContainment | None = None
    """Lower the statement_timeout while noisy; restored when calm."""


class NoisyNeighborPolicy(ApiModel):
    """When the tenant counts as a noisy neighbour on its database target, and what is done then."""

    multiple: float = Field(default=3.0, ge=NOISY_MULTIPLE_MIN, le=NOISY_MULTIPLE_MAX)
    """Noisy when its load over the window exceeds this multiple of the average tenant's load on the
    same target (it stays noisy until it falls under 80 % of that)."""
    window: Window = "5m"
    """Load is compared over this window (at most 24h)."""
    min_load: PositiveDuration = "1s"
    """Execution time (or busy session time) over the window under which a tenant is never noisy."""
    containment: NoisyContainment | None = None
    """Containment while noisy; none unless declared."""


class QuotaSpec(ApiModel):
    """Desired limits of one tenant.

    Overrides are keyed by (limit, expiresAt): one limit may have several overrides with different
    windows. At any time, the unexpired override of a limit that expires first is the one in force,
    so a short override stacked on a longer one applies until it ends and the longer one then
    takes over again. Expired overrides are ignored (and may be removed).
    """

    tenant_ref: TenantRef = Field(json_schema_extra=immutable("tenantRef"))
    """The Tenant these limits apply to. Immutable."""
    limits: QuotaLimits = QuotaLimits()
    """Hard limits of the tenant."""
    enforcement: QuotaEnforcement = QuotaEnforcement()
    """What happens when a limit is reached."""
    overrides: list[QuotaOverride] = Field(
        default_factory=list, max_length=64, json_schema_extra=list_map("limit", "expiresAt")
    )
    """Temporary limit values, each with an expiry."""
    noisy_neighbor: NoisyNeighborPolicy = NoisyNeighborPolicy()
    """NoisyNeighbor detection and (only when declared) containment."""

    def active_overrides(self, now: datetime) -> dict[LimitName, QuotaOverride]:
        """The override in force for each limit at `now` (see the class docstring)."""
        active: dict[LimitName, QuotaOverride] = {}
        for override in self.overrides:
            if override.expires_at <= now:
                continue
            current = active.get(override.limit)
            if current is None or override.expires_at < current.expires_at:
                active[override.limit] = override
        return active

    def effective_limits(self, now: datetime) -> dict[str, str]:
        """spec.limits with the overrides in force at `now` applied, as strings by JSON name."""
        limits = self.limits.as_strings()
        for name, override in self.active_overrides(now).items():
            limits[name] = str(override.value)
        return limits


class ActiveOverride(ApiModel):
    """An override in force when the status was written."""

    limit: LimitName
    """Which limit is overridden."""
    value: IntOrString
    """Value in force."""
    expires_at: AwareDatetime
    """When the override ends."""
    reason: str | None = Field(default=None, max_length=512)
    """Why it was granted."""


LoadSource = Literal["pg_stat_statements", "pg_stat_activity"]


class LoadStatus(ApiModel):
    """The tenant's share of its database target's load over the policy's window."""

    source: LoadSource
    """pg_stat_statements: execution time of finished statements; pg_stat_activity: active
    sessions sampled at each measurement (less detail: no calls, rows or blocks)."""
    detail: str | None = Field(default=None, max_length=512)
    """Why the detail is reduced, when it is."""
    window: str = Field(max_length=DURATION_MAX_LENGTH)
    """The window the numbers cover."""
    share: float = Field(ge=0, le=1)
    """Fraction of the target's load (all its tenants) that is this tenant's."""
    ratio_to_average: float = Field(ge=0)
    """This tenant's load divided by the average tenant's load on the target."""
    execution_seconds: float = Field(ge=0)
    """Execution (or busy session) seconds over the window."""
    calls: int = Field(default=0, ge=0)
    rows: int = Field(default=0, ge=0)
    shared_blocks: int = Field(default=0, ge=0)
    """Shared blocks hit, read, dirtied and written."""
    temp_blocks: int = Field(default=0, ge=0)
    """Temporary blocks read and written."""
    active_sessions: int = Field(default=0, ge=0)
    waiting_sessions: int = Field(default=0, ge=0)
    wait_events: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=list, max_length=8, json_schema_extra=list_set()
    )
    """Wait events of the waiting sessions at the last sample, as type:event."""
    storage_growth_bytes: int = 0
    """Change of the schema's size over the window."""
    contained: list[Literal["connections", "statementTimeout"]] = Field(
        default_factory=list, max_length=4, json_schema_extra=list_set()
    )
    """Role attributes lowered by containment now (connections, statementTimeout)."""


class QuotaStatus(KindStatus):
    """Measured usage against the limits, written by the operator."""

    conditions: Conditions
    """Ready; NearLimit when a usage ratio passes the warning threshold; Exceeded when a limit is
    reached."""
    hard: dict[str, LimitValue] = Field(default_factory=dict, max_length=16)
    """Limits in force (overrides applied), by limit name, like ResourceQuota's status.hard."""
    used: dict[str, LimitValue] = Field(default_factory=dict, max_length=16)
    """Measured usage by limit name, like ResourceQuota's status.used."""
    usage_ratio: dict[str, float] = Field(default_factory=dict, max_length=16)
    """used / hard by limit name (1.0 = at the limit)."""
    active_overrides: list[ActiveOverride] = Field(
        default_factory=list, max_length=16, json_schema_extra=list_map("limit")
    )
    """The override in force for each overridden limit."""
    last_measured_at: AwareDatetime | None = None
    """When usage was last measured."""
    load: LoadStatus | None = None
    """Share of the database target's load (see spec.noisyNeighbor)."""


QUOTA = ResourceInfo(
    "Quota", QuotaSpec, QuotaStatus, short_names=("tq",),
    printer_columns=columns({
        "Tenant": ".spec.tenantRef.name",
        "Storage-Used": ".status.used.storage", "Storage-Hard": ".status.hard.storage",
        "Conns-Used": ".status.used.connections", "Conns-Hard": ".status.hard.connections",
        "Load-Share": ".status.load.share",
    }),
    # A Tenant's first evaluation confirms it has no Quota before applying its tier's defaults
    # (reconcilers/quota_cluster.QuotaCluster.quotas_of).
    selectable_fields=(".spec.tenantRef.name",),
)


# --- Tier defaults ---------------------------------------------------------------------------------

TIERS: tuple[Tier, ...] = get_args(Tier)
TIER_DEFAULTS: dict[str, dict[str, str]] = {
    "free": {"storage": "1Gi", "connections": "5", "requestsPerSecond": "10", "burst": "20",
             "concurrentJobs": "1", "statementTimeout": "30s"},
    "starter": {"storage": "10Gi", "connections": "20", "requestsPerSecond": "50", "burst": "100",
                "concurrentJobs": "2", "statementTimeout": "30s"},
    "professional": {"storage": "100Gi", "connections": "50", "requestsPerSecond": "200", "burst": "400",
                     "concurrentJobs": "5", "statementTimeout": "60s"},
    "enterprise": {"storage": "1Ti", "connections": "200", "requestsPerSecond": "1000", "burst": "2000",
                   "concurrentJobs": "20", "statementTimeout": "5m"},
}
"""Built-in limits of a tenant without a Quota; TENANCY_TIER_DEFAULTS is merged over them."""


def tier_defaults_from_json(raw: str) -> dict[str, dict[str, str]]:
    """The tier table: TIER_DEFAULTS with `raw` (JSON tier -> {limit: value or null}) merged over it.

    Values are checked like a Quota's spec.limits (an unknown tier or limit name, or a value a Quota
    could not hold, raises ValueError), so a typo stops the operator at start-up instead of
    silently leaving a tier unlimited.
    """
    table = {tier: dict(limits) for tier, limits in TIER_DEFAULTS.items()}
    if not raw.strip():
        return table
    try:
        given: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TENANCY_TIER_DEFAULTS is not valid JSON: {exc.msg}") from None
    if not isinstance(given, dict):
        raise ValueError("TENANCY_TIER_DEFAULTS must be a JSON object of tier -> limits")
    for tier, limits in given.items():
        if tier not in TIERS:
            raise ValueError(f"TENANCY_TIER_DEFAULTS: unknown tier {tier!r} (known: {', '.join(TIERS)})")
        if not isinstance(limits, dict):
            raise ValueError(f"TENANCY_TIER_DEFAULTS[{tier!r}] must be an object of limit -> value")
        unknown = sorted(set(limits) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"TENANCY_TIER_DEFAULTS[{tier!r}]: unknown limit(s) {', '.join(unknown)}")
        try:
            parsed = QuotaLimits.model_validate(limits)
        except ValueError as exc:
            raise ValueError(f"TENANCY_TIER_DEFAULTS[{tier!r}]: {exc}") from None
        table[tier].update(parsed.as_strings())
        for name, value in limits.items():
            if value is None:  # null: no default for this limit (unlimited unless a Quota sets one)
                table[tier].pop(name, None)
    return table




def limit_amount(limit: str, value: str) -> int:
    """A limit's value as a number: bytes for storage, milliseconds for statementTimeout (rounded
    up, capped at PostgreSQL's maximum), the integer itself for counts."""
    if limit == "storage":
        return parse_quantity(value)
    if limit == "statementTimeout":
        millis = math.ceil(parse_duration(value).total_seconds() * 1000)
        return min(max(millis, 1), STATEMENT_TIMEOUT_MAX_MS)
    return int(value)
