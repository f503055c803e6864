"""A feature flag with variants, a percentage or weighted rollout, and per-tenant and per-user
overrides, published in a flagd-compatible form.

The operator compiles these into flagd-compatible flag definitions, so the variant a user gets
can be computed by any OpenFeature flagd provider. The first paragraph is the kind's description
in the CRD.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, Field, WithJsonSchema, model_validator

from tenancy_operator.api.common import ApiModel, JsonDict
from tenancy_operator.api.conditions import Explained, KindStatus
from tenancy_operator.api.durations import Duration, parse_duration
from tenancy_operator.api.resource import PrinterColumn, ResourceInfo
from tenancy_operator.api.schema_extra import cel, list_map, list_set, validations
from tenancy_operator.api.tenant import TENANT_NAME_MAX_LENGTH, TENANT_NAME_PATTERN

FLAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VARIANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_VARIANTS = 64
MAX_WEIGHT = 1_000_000
"""Per-variant weight cap: 64 variants * 1e6 stays far below flagd's 2^31-1 total weight."""
DEFAULT_VARIANTS: dict[str, Any] = {"on": {"value": True}, "off": {"value": False}}
ON_VARIANT = "on"

VALUE_MAX_DEPTH = 8
"""Lists and objects in a variant value nest at most this deep (`[[1]]` is 2 deep)."""
VALUE_MAX_ENTRIES = 1000
"""Items of one list, or keys of one object, in a variant value."""
VALUE_MAX_STRING = 8192
"""Characters of one string in a variant value."""


def value_depth_schema(level: int = 0) -> JsonDict:
    """Schema of a variant value: any JSON, with lists and objects nested at most VALUE_MAX_DEPTH deep.

    Structural schemas cannot say "any JSON at most N deep", and CEL cannot see untyped values, so
    the bound is spelled out: each level is an untyped node (any JSON value) whose list items and
    object values are the next level, and the last level holds only scalars (or an empty list or
    object). Items and object values each need their own copy of the next level, so the schema has
    2^(N+1) - 1 nodes: N stays small.
    """
    node: JsonDict = {"x-kubernetes-preserve-unknown-fields": True, "maxLength": VALUE_MAX_STRING}
    if level >= VALUE_MAX_DEPTH:
        node.update(maxItems=0, maxProperties=0)
    else:
        node.update(
            maxItems=VALUE_MAX_ENTRIES,
            maxProperties=VALUE_MAX_ENTRIES,
            items=value_depth_schema(level + 1),
            additionalProperties=value_depth_schema(level + 1),
        )
    return node


def check_value(value: Any) -> Any:
    """Return `value` if the CRD's value schema accepts it (value_depth_schema), else raise ValueError.

    Iterative, so a value nested thousands deep (stored before the CRD had the bound) is refused
    without deep recursion."""
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, str):
            if len(node) > VALUE_MAX_STRING:
                raise ValueError(f"a string in the value is longer than {VALUE_MAX_STRING} characters")
        elif isinstance(node, (list, dict)):
            if not node:
                continue
            if level >= VALUE_MAX_DEPTH:
                raise ValueError(f"lists and objects in the value nest deeper than {VALUE_MAX_DEPTH} levels")
            if len(node) > VALUE_MAX_ENTRIES:
                raise ValueError(f"a list or object in the value has more than {VALUE_MAX_ENTRIES} entries")
            todo.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return value


VariantValue = Annotated[Any, AfterValidator(check_value), WithJsonSchema(value_depth_schema())]
"""Any JSON value, bounded by VALUE_MAX_DEPTH, VALUE_MAX_ENTRIES and VALUE_MAX_STRING."""

VariantName = Annotated[str, Field(max_length=64, pattern=VARIANT_NAME_PATTERN)]
TenantName = Annotated[str, Field(max_length=TENANT_NAME_MAX_LENGTH, pattern=TENANT_NAME_PATTERN)]
Percentage = Annotated[int, Field(ge=0, le=100)]


class Variant(ApiModel):
    """One value the flag can serve.

    The value sits in an object (`on: {value: true}`) rather than directly under the variant name
    because the API server's CEL cannot see the keys of a map whose values are untyped, and the
    CRD checks with CEL that every variant a flag refers to exists.
    """

    value: VariantValue
    """The value served: any JSON value (boolean, string, number, list or object); lists and objects
    nest at most 8 deep and hold at most 1000 entries each, strings at most 8192 characters."""
    description: str | None = Field(default=None, max_length=256)
    """What the variant means, for humans."""


class Weight(ApiModel):
    """Relative share of users that get one variant."""

    variant: VariantName
    """One of the flag's variants."""
    weight: int = Field(ge=0, le=MAX_WEIGHT)
    """Users get the variant with probability weight / sum of weights."""


MAX_STEPS = 20
STEP_INTERVAL_DEFAULT = "10m"
BREACH_ACTIONS = ("Zero", "LastHealthyStep")
OnBreach = Literal["Zero", "LastHealthyStep"]


class RolloutGate(ApiModel):
    """A health check of a stepped rollout: a Prometheus query that must stay at or under `max`.

    The operator evaluates the query on its own Prometheus (setting TENANCY_PROMETHEUS_URL, never a
    URL from the object) at every check of a step. A value above `max` is a breach: the rollout is
    rolled back (see onBreach) and stops until a person resumes it. No answer (Prometheus down, no
    series, more than one series) is no proof of health: the rollout holds its step and says why.
    """

    query: str = Field(min_length=1, max_length=4096)
    """PromQL that returns one number (a scalar or a one-series vector), for example the error
    ratio of the users on the new variant."""
    max: float
    """The largest healthy value; above it the gate breaches."""


_ROLLOUT_RULES = validations(
    cel(
        "has(self.weights) != (has(self.percentage) || has(self.steps))",
        "rollout needs exactly one of percentage or steps (with variant), or weights",
    ),
    cel(
        "has(self.variant) == (has(self.percentage) || has(self.steps))",
        "rollout.variant goes with percentage or steps: set both, or use weights alone",
    ),
    cel(
        "!has(self.weights) || self.weights.exists(w, w.weight > 0)",
        "at least one rollout weight must be greater than zero",
        field_path=".weights",
    ),
    cel(
        "!has(self.steps) || self.steps.isSorted()",
        "rollout.steps must be increasing percentages, e.g. [1, 5, 25, 50, 100]",
        field_path=".steps",
    ),
    cel(
        "has(self.steps) || !(has(self.stepInterval) || has(self.gate) || has(self.onBreach) || has(self.paused))",
        "stepInterval, gate, onBreach and paused belong to a stepped rollout: set steps too",
    ),
)


class Rollout(ApiModel, json_schema_extra=_ROLLOUT_RULES):
    """How users who match no override are spread over the variants.

    Either `percentage` of users get `variant` and the rest get `defaultVariant`, or users are
    split over `weights`. A user keeps their bucket as the percentage grows, so raising it only
    adds users. Percentages are whole numbers; for finer steps use weights (e.g. 1 and 999).

    With `steps`, the operator raises the percentage itself: it serves each step for at least
    `stepInterval`, checks `gate` all along, and rolls the flag back on a breach. `percentage`
    then is a hand override: setting or changing it while the steps run serves it and pauses the
    steps (annotate `tenancy.dev/resume-rollout=<new value>` to go on from there).
    """

    variant: VariantName | None = None
    """Variant served to `percentage` of users (or to the current step's share)."""
    percentage: Percentage | None = None
    """Share of users, 0-100, that get `variant`; with steps, a hand override that pauses them."""
    weights: list[Weight] | None = Field(
        default=None, min_length=1, max_length=MAX_VARIANTS, json_schema_extra=list_map("variant")
    )
    """Split of users over several variants."""
    steps: list[Percentage] | None = Field(default=None, min_length=1, max_length=MAX_STEPS,
                                           json_schema_extra=list_set())
    """Increasing shares of users, 0-100, the operator serves `variant` to in turn (e.g. 1, 5, 25,
    50, 100); status.rollout says where it stands."""
    step_interval: Duration | None = None
    """The least time each step is served (and its gate checked) before the next; default 10m."""
    gate: RolloutGate | None = None
    """A Prometheus query checked while the steps run; without it, steps advance on time alone."""
    on_breach: OnBreach | None = None
    """What a breach of the gate serves: `Zero` (the default: nobody gets `variant`) or
    `LastHealthyStep` (the step before the one that breached, 0 before the first)."""
    paused: bool | None = None
    """true: hold the current step (no advance, no gate check) until it is false or removed."""

    @model_validator(mode="after")
    def _one_form(self) -> Rollout:
        stepped = self.percentage is not None or self.steps is not None
        if (self.weights is not None) == stepped:
            raise ValueError("rollout needs exactly one of percentage or steps (with variant), or weights")
        if (self.variant is not None) != stepped:
            raise ValueError("rollout.variant goes with percentage or steps: set both, or use weights alone")
        if self.weights is not None and not any(w.weight > 0 for w in self.weights):
            raise ValueError("at least one rollout weight must be greater than zero")
        if self.steps is not None and any(a >= b for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("rollout.steps must be increasing percentages, e.g. [1, 5, 25, 50, 100]")
        if self.steps is None and (self.step_interval, self.gate, self.on_breach, self.paused) != (None,) * 4:
            raise ValueError("stepInterval, gate, onBreach and paused belong to a stepped rollout: set steps too")
        return self

    def interval(self) -> datetime.timedelta:
        """The least time a step is served."""
        return parse_duration(self.step_interval or STEP_INTERVAL_DEFAULT)


class TenantOverride(
    ApiModel,
    json_schema_extra=validations(
        cel(
            "has(self.variant) || has(self.percentage)",
            "a tenant override needs a variant, a percentage or both",
        )
    ),
):
    """What the users of one tenant get, instead of the flag-wide rollout.

    - `variant` alone: every user of the tenant gets `variant`.
    - `percentage` alone: that share of the tenant's users get the flag's rollout variant
      (`rollout.variant` when the rollout is a percentage, otherwise `on`); the rest get
      `defaultVariant`.
    - both: that share of the tenant's users get `variant`; the rest get `defaultVariant`.

    User overrides still win over tenant overrides.
    """

    tenant: TenantName
    """Name of a Tenant in the FeatureFlag's namespace."""
    variant: VariantName | None = None
    """Variant the tenant's users (or `percentage` of them) get."""
    percentage: Percentage | None = None
    """Share of the tenant's users, 0-100, that get the variant; the rest get defaultVariant."""

    @model_validator(mode="after")
    def _something_set(self) -> TenantOverride:
        if self.variant is None and self.percentage is None:
            raise ValueError("a tenant override needs a variant, a percentage or both")
        return self


class UserOverride(ApiModel):
    """The variant one user of one tenant gets, whatever else applies."""

    tenant: TenantName
    """Name of the user's Tenant."""
    user: str = Field(min_length=1, max_length=256)
    """The user's targeting key, as the application passes it to the flag provider."""
    variant: VariantName
    """Variant the user gets."""


_KEY_IMMUTABLE = cel(
    "has(self.key) == has(oldSelf.key) && (!has(self.key) || self.key == oldSelf.key)",
    "key is immutable: it cannot be added, removed or changed after the FeatureFlag is created",
    field_path=".key",
)
_SPEC_RULES = validations(
    _KEY_IMMUTABLE,
    cel(
        "!has(self.defaultVariant) || !has(self.variants) || self.defaultVariant in self.variants",
        message_expression="'defaultVariant \"' + self.defaultVariant + '\" is not one of variants'",
        field_path=".defaultVariant",
    ),
    cel(
        "!has(self.rollout) || !has(self.rollout.variant) || self.rollout.variant in self.variants",
        message_expression="'rollout.variant \"' + self.rollout.variant + '\" is not one of variants'",
        field_path=".rollout.variant",
    ),
    cel(
        "!has(self.rollout) || !has(self.rollout.weights) || self.rollout.weights.all(w, w.variant in self.variants)",
        "every rollout.weights[].variant must be one of variants",
        field_path=".rollout.weights",
    ),
    cel(
        "!has(self.tenants) || self.tenants.all(t, !has(t.variant) || t.variant in self.variants)",
        "every tenants[].variant must be one of variants",
        field_path=".tenants",
    ),
    cel(
        "!has(self.tenants) || self.tenants.all(t, has(t.variant) || "
        "((has(self.rollout) && has(self.rollout.variant) ? self.rollout.variant : 'on') in self.variants))",
        "a tenant override with only a percentage serves rollout.variant (or 'on' without a percentage "
        "rollout), which must be one of variants",
        field_path=".tenants",
    ),
    cel(
        "!has(self.users) || self.users.all(u, u.variant in self.variants)",
        "every users[].variant must be one of variants",
        field_path=".users",
    ),
)


class FeatureFlagSpec(ApiModel, json_schema_extra=_SPEC_RULES):
    """Desired definition of a feature flag.

    Evaluation order for a user: `enabled: false` gives `defaultVariant` to everyone; then a user
    override; then the tenant's override; then the rollout; else `defaultVariant`.
    """

    key: str | None = Field(default=None, max_length=128, pattern=FLAG_KEY_PATTERN)
    """Flag key the application asks for; defaults to the object's name. Immutable."""
    description: str | None = Field(default=None, max_length=1024)
    """What the flag is for, for humans."""
    enabled: bool = True
    """false is the kill switch: every user gets defaultVariant."""
    variants: dict[VariantName, Variant] = Field(
        default=DEFAULT_VARIANTS, validate_default=True, min_length=1, max_length=MAX_VARIANTS
    )
    """Variant name -> the value it serves; by default `on` (true) and `off` (false)."""
    default_variant: VariantName = "off"
    """Variant served when nothing else applies and when the flag is disabled."""
    rollout: Rollout | None = None
    """Flag-wide split of users over variants; without it, users get defaultVariant."""
    tenants: list[TenantOverride] = Field(default_factory=list, max_length=1000, json_schema_extra=list_map("tenant"))
    """Per-tenant overrides, at most one per tenant."""
    users: list[UserOverride] = Field(
        default_factory=list, max_length=1000, json_schema_extra=list_map("tenant", "user")
    )
    """Per-user overrides, at most one per user of a tenant."""

    def effective_key(self, name: str) -> str:
        """The flag key: spec.key, or the object's name when it is not set."""
        return self.key if self.key is not None else name

    def variant_values(self) -> dict[str, Any]:
        """Variant name -> value, the shape of flagd's `variants`."""
        return {name: variant.value for name, variant in self.variants.items()}

    def rollout_variant(self) -> str:
        """Variant a percentage-only tenant override serves (see TenantOverride)."""
        if self.rollout is not None and self.rollout.variant is not None:
            return self.rollout.variant
        return ON_VARIANT

    @model_validator(mode="after")
    def _variants_exist(self) -> FeatureFlagSpec:
        known = self.variants
        named = [("defaultVariant", self.default_variant)]
        if self.rollout is not None:
            if self.rollout.variant is not None:
                named.append(("rollout.variant", self.rollout.variant))
            named += [("rollout.weights[].variant", w.variant) for w in self.rollout.weights or []]
        named += [("tenants[].variant", t.variant or self.rollout_variant()) for t in self.tenants]
        named += [("users[].variant", u.variant) for u in self.users]
        unknown = [f"{where} {variant!r}" for where, variant in named if variant not in known]
        if unknown:
            raise ValueError(f"unknown variants (not in variants): {', '.join(unknown)}")
        return self


RolloutPhase = Literal["Progressing", "Paused", "Completed", "RolledBack"]


class RolloutStatus(Explained):
    """Where the flag-wide rollout stands: the share served now and, with steps, their progress.

    With steps this is also the operator's record of the rollout (as Flagger's and Argo Rollouts'
    status are): which step is served since when, and whether a breach or a hand edit stopped it.
    """

    percentage: Percentage | None = None
    """Share of users, 0-100, that get the rollout's variant now."""
    phase: RolloutPhase | None = None
    """Progressing, Paused (spec.rollout.paused or a hand edit of percentage), Completed (the last
    step served its interval with a healthy gate) or RolledBack (the gate breached; stopped)."""
    step: int | None = Field(default=None, ge=0, le=MAX_STEPS)
    """How many of spec.rollout.steps have been reached (1: the first step is served)."""
    steps: int | None = Field(default=None, ge=0, le=MAX_STEPS)
    """How many steps the rollout has."""
    step_started_at: AwareDatetime | None = None
    """When the current step began to be served."""
    next_step_at: AwareDatetime | None = None
    """When the next step is due, if the gate stays healthy; none when stopped or at the last step's end."""
    baseline: Percentage | None = None
    """spec.rollout.percentage when the steps started or were last resumed (none: not set); a
    different value is a hand edit, which pauses the steps."""
    resumed_by: str | None = Field(default=None, max_length=253)
    """The value of the tenancy.dev/resume-rollout annotation last acted on."""
    gate_value: float | None = None
    """The gate query's last value."""
    reason: str | None = Field(default=None, max_length=64)
    """Why the rollout is in its phase: StepServed, GateWaiting, GateBreached, PausedBySpec,
    FlagDisabled, HandEdited, Resumed or AllStepsServed."""


class FeatureFlagStatus(KindStatus):
    """What the operator last published for the flag."""

    variant_shares: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, max_length=MAX_VARIANTS
    )
    """Expected share of users per variant under the flag-wide rules (0-1)."""
    tenant_overrides: int = Field(default=0, ge=0)
    """Number of tenant overrides published."""
    user_overrides: int = Field(default=0, ge=0)
    """Number of user overrides published."""
    last_written_at: AwareDatetime | None = None
    """When the flag definition was last written to the flag store."""
    unknown_tenants: list[TenantName] = Field(default_factory=list, max_length=1000, json_schema_extra=list_set())
    """Tenants named in overrides that do not exist in the namespace."""
    key: str | None = Field(default=None, max_length=128)
    """The flag key applications ask for (spec.key, or the object's name)."""
    config_map: str | None = Field(default=None, max_length=253)
    """ConfigMap holding the flag in flagd's format (key `flagd.json`), owned by this FeatureFlag."""
    rollout: RolloutStatus | None = None
    """The share of users the flag-wide rollout serves now and, with steps, their progress."""


FEATURE_FLAG = ResourceInfo(
    "FeatureFlag", FeatureFlagSpec, FeatureFlagStatus, short_names=("ff",),
    printer_columns=(
        PrinterColumn("Enabled", ".spec.enabled"),
        PrinterColumn("Rollout", ".status.rollout.percentage", "Percentage of users in the rollout now"),
        PrinterColumn("Step", ".status.rollout.phase", "Stepped rollout: Progressing, Paused, ..."),
    ),
)
