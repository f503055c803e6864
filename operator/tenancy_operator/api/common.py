"""Building blocks shared by the custom resource models.

The pydantic models in this package are the single source of truth for the CRDs: `crdgen` turns
them into OpenAPI schemas, and the operator parses the objects it watches with the same models.
Anything the API server must enforce beyond plain JSON schema (CEL rules, list types) is attached
with `json_schema_extra` so it lives next to the field it is about.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tenancy_operator import GROUP, VERSION

JsonDict = dict[str, Any]


class ApiModel(BaseModel):
    """Base for every API model: camelCase JSON names, Python names accepted too.

    `extra="ignore"` because objects read from the API server may carry fields a newer CRD added;
    the API server prunes unknown fields on write anyway, so the schema stays closed.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )

    def to_api(self) -> JsonDict:
        """JSON-ready dict in the API's shape (camelCase, unset optionals left out) for patches."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel(
    rule: str,
    message: str | None = None,
    *,
    message_expression: str | None = None,
    reason: str | None = None,
    field_path: str | None = None,
) -> JsonDict:
    """One `x-kubernetes-validations` entry (a CEL rule the API server evaluates)."""
    entry: JsonDict = {"rule": rule}
    if message is not None:
        entry["message"] = message
    if message_expression is not None:
        entry["messageExpression"] = message_expression
    if reason is not None:
        entry["reason"] = reason
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def cel_string(value: str) -> str:
    """`value` as a CEL string literal (regex patterns contain backslashes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def validations(*rules: JsonDict) -> JsonDict:
    """`json_schema_extra` carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}


def list_set() -> JsonDict:
    """`json_schema_extra` for a list of unique scalars that server-side apply merges as a set."""
    return {"x-kubernetes-list-type": "set"}


def list_atomic() -> JsonDict:
    """`json_schema_extra` for a list whose order means something: server-side apply replaces it whole."""
    return {"x-kubernetes-list-type": "atomic"}


def list_map(*keys: str) -> JsonDict:
    """`json_schema_extra` for a list of objects keyed by `keys`; SSA merges entries by key and
    the API server rejects two entries with the same key."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


def immutable(what: str) -> JsonDict:
    """`json_schema_extra` for a field that may not change once set (transition rule)."""
    return validations(cel("self == oldSelf", f"{what} is immutable"))


# --- Names ------------------------------------------------------------------------------------

DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_LABEL_PATTERN)]
"""An object name that is a DNS-1123 label (Tenant names, Namespace names)."""

DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN_PATTERN)]
"""An object name that is a DNS-1123 subdomain (ConfigMap and Secret names)."""


# --- Durations --------------------------------------------------------------------------------

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
DURATION_MAX_LENGTH = 32
"""Longest duration string accepted: `1d2h3m4s5ms` fits many times over; the bound keeps the CEL
rules on durations cheap and the numbers far from any overflow."""
_DURATION_PART_PATTERN = r"[0-9]+(\.[0-9]+)?(ms|s|m|h|d)"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_RE = re.compile(DURATION_PATTERN)
_MICROSECONDS = {
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
}


def _duration_micros(value: str) -> Decimal:
    if not _DURATION_RE.fullmatch(value):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 30s, 5m, 1h30m, 30d")
    return sum(
        (Decimal(number) * _MICROSECONDS[unit] for number, unit in _DURATION_PART.findall(value)),
        Decimal(0),
    )


def parse_duration(value: str) -> timedelta:
    """Parse `1h30m`, `30d`, `1.5s`, `250ms` into a timedelta (exact to the microsecond).

    Go's `time.ParseDuration` has no days; retention periods are naturally said in days, so `d`
    (24h) is added. Raises ValueError on anything the CRD pattern would reject, and on a duration
    longer than a timedelta holds (999999999 days).
    """
    micros = _duration_micros(value)
    try:
        return timedelta(microseconds=int(micros.to_integral_value()))
    except OverflowError:
        raise ValueError(f"duration {value!r} is too long") from None


def duration_millis_cel(expr: str = "self") -> str:
    """CEL for the duration string `expr` in milliseconds, as a double (what `parse_duration` reads:
    the sum of its `<number><unit>` parts). Kubernetes' CEL `duration()` has no `d` unit."""
    unit = (
        "(p.endsWith('ms') ? 1.0 : p.endsWith('s') ? 1000.0 : p.endsWith('m') ? 60000.0 : "
        "p.endsWith('h') ? 3600000.0 : 86400000.0)"
    )
    number = cel_string(r"^[0-9]+(\.[0-9]+)?")
    return f"{expr}.findAll({cel_string(_DURATION_PART_PATTERN)}).map(p, double(p.find({number})) * {unit}).sum()"


def duration_at_most_rule(maximum: str, expr: str = "self", what: str = "duration") -> JsonDict:
    """CEL rule: the duration string `expr` is at most `maximum`."""
    millis = float(_duration_micros(maximum) / 1000)
    return cel(f"{duration_millis_cel(expr)} <= {millis!r}", f"{what} must be at most {maximum}")


def check_duration_at_most(value: str, maximum: str) -> str:
    """Return `value` if it is a duration of at most `maximum`, else raise ValueError."""
    if _duration_micros(value) > _duration_micros(maximum):
        raise ValueError(f"duration {value!r} is longer than the maximum {maximum}")
    return value


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


def _check_positive(value: str) -> str:
    # A quantity or duration is zero exactly when its number has no non-zero digit (the unit
    # suffixes have no digits); the same test is the CEL rule in the CRD.
    if not re.search(r"[1-9]", value):
        raise ValueError(f"{value!r} must be greater than zero")
    return value


_POSITIVE = cel("self.matches('[1-9]')", "must be greater than zero")


def _at_most(maximum: str) -> AfterValidator:
    return AfterValidator(lambda value: check_duration_at_most(value, maximum))


def duration_field(maximum: str, *rules: JsonDict, positive: bool = False, what: str = "duration") -> Any:
    """The Field of a duration string in the CRD: its syntax, greater than zero if ``positive``, at
    most ``maximum``, and further CEL ``rules``."""
    bounds = (_POSITIVE,) if positive else ()
    return Field(pattern=DURATION_PATTERN, max_length=DURATION_MAX_LENGTH,
                 json_schema_extra=validations(*bounds, duration_at_most_rule(maximum, what=what), *rules))


ARCHIVE_RETENTION_MAX = "3650d"
"""Longest archive retention (about ten years): `now() + interval` stays far inside PostgreSQL's
timestamps (up to the year 294276) and Python's datetime (up to 9999)."""

STATEMENT_TIMEOUT_MAX = "2147483647ms"
"""PostgreSQL's statement_timeout is an int4 of milliseconds (about 24.8 days)."""

Duration = Annotated[
    str,
    duration_field(ARCHIVE_RETENTION_MAX),
    AfterValidator(_check_duration),
    _at_most(ARCHIVE_RETENTION_MAX),
]
"""A duration string: one or more `<number><unit>` with units ms, s, m, h, d (e.g. `1h30m`), at
most ARCHIVE_RETENTION_MAX."""

PositiveDuration = Annotated[
    str,
    duration_field(STATEMENT_TIMEOUT_MAX, positive=True),
    AfterValidator(_check_duration),
    AfterValidator(_check_positive),
    _at_most(STATEMENT_TIMEOUT_MAX),
]
"""A Duration greater than zero and at most STATEMENT_TIMEOUT_MAX (the timeouts PostgreSQL takes)."""


# --- Quantities -------------------------------------------------------------------------------

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
_QUANTITY_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_QUANTITY_MULTIPLIERS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_quantity(value: str | int) -> int:
    """Parse a Kubernetes-style quantity (`10Gi`, `1.5G`, `500`) into whole units (bytes).

    Fractions round up, as Kubernetes' `Quantity.Value()` does, so a limit is never silently
    lowered. Only non-negative quantities with the suffixes above are accepted (no milli, no
    exponents): these are byte sizes and counts.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid quantity {value}: must not be negative")
        return value
    match = _QUANTITY_RE.fullmatch(str(value))
    if not match:
        raise ValueError(f"invalid quantity {value!r}: expected e.g. 500, 1.5Gi, 10G")
    number, suffix = match.groups()
    return math.ceil(Decimal(number) * _QUANTITY_MULTIPLIERS[suffix])


def format_quantity(value: int) -> str:
    """Shortest exact binary-suffixed form of a byte count (`10737418240` -> `10Gi`), for status."""
    if value < 0:
        raise ValueError("quantities are never negative")
    for suffix in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _QUANTITY_MULTIPLIERS[suffix]
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


QUANTITY_MAX = "1024Pi"
"""Largest quantity (2^60, one exbibyte): far beyond any schema, well inside PostgreSQL's bigint."""
QUANTITY_MAX_VALUE = 2**60


def _check_quantity(value: str) -> str:
    if parse_quantity(value) > QUANTITY_MAX_VALUE:
        raise ValueError(f"quantity {value!r} is larger than the maximum {QUANTITY_MAX}")
    return value


def quantity_at_most_cel(expr: str = "self") -> str:
    """CEL: the quantity string `expr` is at most QUANTITY_MAX (exact: Kubernetes' quantity library).
    A string that is no quantity passes here; the pattern reports it."""
    return (
        f"!{expr}.matches({cel_string(QUANTITY_PATTERN)}) || "
        f"quantity({expr}).compareTo(quantity('{QUANTITY_MAX}')) <= 0"
    )


_QUANTITY_AT_MOST = cel(quantity_at_most_cel(), f"must be at most {QUANTITY_MAX}")

Quantity = Annotated[
    str,
    Field(pattern=QUANTITY_PATTERN, max_length=64, json_schema_extra=validations(_QUANTITY_AT_MOST)),
    AfterValidator(_check_quantity),
]
"""A non-negative quantity string (`10Gi`, `500M`, `1.5Gi`, `1000`), at most QUANTITY_MAX."""

PositiveQuantity = Annotated[
    str,
    Field(pattern=QUANTITY_PATTERN, max_length=64, json_schema_extra=validations(_POSITIVE, _QUANTITY_AT_MOST)),
    AfterValidator(_check_quantity),
    AfterValidator(_check_positive),
]
"""A Quantity greater than zero."""


# --- Status -----------------------------------------------------------------------------------

CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One aspect of the object's state, shaped like `metav1.Condition` so kubectl wait, kstatus
    (Flux, Helm, kpt) and Argo CD health checks understand it."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)
    """Condition type in CamelCase: Ready, Reconciling, Stalled, ..."""
    status: ConditionStatus
    """True, False or Unknown."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation the condition was computed from."""
    last_transition_time: AwareDatetime
    """When status last changed (not when the condition was last written)."""
    reason: str = Field(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)
    """Machine-readable CamelCase reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""


Conditions = Annotated[
    list[Condition],
    Field(default_factory=list, max_length=32, json_schema_extra=list_map("type")),
]
"""The `status.conditions` list: one entry per type."""


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of the given type, if present."""
    return next((c for c in conditions if c.type == type_), None)


# --- Resource descriptions ---------------------------------------------------------------------


@dataclass(frozen=True)
class PrinterColumn:
    """One `additionalPrinterColumns` entry (`kubectl get` column)."""

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str = ""
    priority: int = 0

    def to_crd(self) -> JsonDict:
        """The CRD form of the column."""
        column: JsonDict = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            column["description"] = self.description
        if self.priority:
            column["priority"] = self.priority
        return column


READY_COLUMN = PrinterColumn(
    "Ready", "string", '.status.conditions[?(@.type=="Ready")].status', "Ready condition status"
)
AGE_COLUMN = PrinterColumn("Age", "date", ".metadata.creationTimestamp")


@dataclass(frozen=True)
class ResourceInfo:
    """Names of one custom resource kind, for the CRD and for API calls (Kopf handlers, clients)."""

    kind: str
    spec_model: type[ApiModel]
    status_model: type[ApiModel]
    short_names: tuple[str, ...]
    description: str
    plural: str = ""
    """Default: the kind in lower case with an s (tenants, quotas, featureflags)."""
    singular: str = ""
    """Default: the kind in lower case."""
    printer_columns: tuple[PrinterColumn, ...] = ()
    """The kind's own columns for ``kubectl get``; Ready (where the kind does not place it) and Age
    follow, as on every kind."""
    root_validations: tuple[JsonDict, ...] = ()
    categories: tuple[str, ...] = ("tenancy",)
    initial_phase: str | None = None
    """`status.phase` the API server shows before the operator's first status write."""
    group: str = GROUP
    version: str = VERSION
    namespaced: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "singular", self.singular or self.kind.lower())
        object.__setattr__(self, "plural", self.plural or f"{self.kind.lower()}s")
        ready = () if READY_COLUMN in self.printer_columns else (READY_COLUMN,)
        object.__setattr__(self, "printer_columns", (*self.printer_columns, *ready, AGE_COLUMN))

    @property
    def api_version(self) -> str:
        """`tenancy.dev/v1alpha1`."""
        return f"{self.group}/{self.version}"

    @property
    def initial_status(self) -> JsonDict:
        """The CRD's default for `status`, served for every object the operator has not reported on.

        `observedGeneration: 0` is below every object's generation, so kstatus (Flux, `kubectl
        wait`, cli-utils) and our Argo CD health check read a new object as InProgress from its
        creation, without the operator writing a first "Reconciling" status (that write would cost
        a PATCH and a watch event, for every watcher, per new object).
        """
        status: JsonDict = {"observedGeneration": 0}
        if self.initial_phase:
            status["phase"] = self.initial_phase
        return status

    @property
    def crd_name(self) -> str:
        """`<plural>.<group>`, the CRD's metadata.name."""
        return f"{self.plural}.{self.group}"


# --- Whole objects ------------------------------------------------------------------------------


class ObjectMeta(ApiModel):
    """The parts of `metadata` the operator reads; everything else is ignored when parsing."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    creation_timestamp: AwareDatetime | None = None
    deletion_timestamp: AwareDatetime | None = None


SpecT = TypeVar("SpecT", bound=ApiModel)
StatusT = TypeVar("StatusT", bound=ApiModel)


class KubeObject(ApiModel, Generic[SpecT, StatusT]):
    """A whole object of one of our kinds as read from the API server."""

    api_version: str = f"{GROUP}/{VERSION}"
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: StatusT | None = None
