"""A SaaS tenant: the operator gives it a PostgreSQL schema and role, credentials in a Secret,
quotas and feature flags. The name becomes the identifier tenant_<name>.

The Tenant kind's spec and status; this first paragraph is its description in the CRD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, Field

from tenancy_operator.api.common import ApiModel, DnsSubdomain
from tenancy_operator.api.conditions import KindStatus
from tenancy_operator.api.durations import (
    Duration,
    check_duration_at_most,
    duration_field,
    duration_millis_cel,
    parse_duration,
)
from tenancy_operator.api.resource import PHASE_COLUMN, READY_COLUMN, PrinterColumn, ResourceInfo
from tenancy_operator.api.schema_extra import cel, cel_string, list_map, validations

TENANT_NAME_MAX_LENGTH = 56
"""`tenant_` (7 bytes) + 56 = 63 bytes, PostgreSQL's identifier limit (NAMEDATALEN - 1)."""
TENANT_NAME_PATTERN = r"^[a-z]([a-z0-9-]*[a-z0-9])?$"
"""A DNS-1123 label that starts with a letter: no dots, so `-` -> `_` gives a plain identifier."""
TENANT_IDENTIFIER_PREFIX = "tenant_"
_TENANT_NAME_RE = re.compile(TENANT_NAME_PATTERN)

DATABASE_PATTERN = r"^[a-z]([a-z0-9_-]{0,61}[a-z0-9])?$"
RESTORE_FROM_PATTERN = r"^(latest|[A-Za-z0-9._-]{1,128})$"
DEFAULT_DATABASE = "default"

LimitValue = Annotated[str, Field(max_length=64)]
"""One limit as status shows it (`10Gi`, `50`, `30s`)."""

Tier = Literal["free", "starter", "professional", "enterprise"]
TenantState = Literal["Active", "Suspended"]
DeletionPolicy = Literal["Retain", "Archive", "Delete"]
TenantPhase = Literal["Provisioning", "Active", "Suspended", "Deleting", "Failed"]


def validate_tenant_name(name: str) -> str:
    """Return `name` if it can name a Tenant, else raise ValueError saying why.

    Same rules as the CRD's root validation, so the operator and the API server agree.
    """
    if len(name) > TENANT_NAME_MAX_LENGTH:
        raise ValueError(
            f"tenant name {name!r} is {len(name)} characters; at most {TENANT_NAME_MAX_LENGTH} fit "
            f"in the PostgreSQL identifier {TENANT_IDENTIFIER_PREFIX}<name>"
        )
    if not _TENANT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r} must start with a lowercase letter, contain only lowercase "
            "letters, digits and '-', and end with a letter or digit"
        )
    return name


def tenant_identifier(name: str) -> str:
    """PostgreSQL schema name and role name of a tenant: `acme-corp` -> `tenant_acme_corp`.

    Valid names contain no `_`, so the mapping is injective; the result needs no quoting and is at
    most 63 bytes, so PostgreSQL never truncates it into another tenant's identifier.
    """
    validate_tenant_name(name)
    return TENANT_IDENTIFIER_PREFIX + name.replace("-", "_")


_RESTORE_FROM_IMMUTABLE = cel(
    "!has(oldSelf.restoreFrom) || (has(self.restoreFrom) && self.restoreFrom == oldSelf.restoreFrom)",
    "restoreFrom is immutable once set",
    field_path=".restoreFrom",
)


GRACE_PERIOD_MAX = "24h"
"""Longest grace period of a retired login: a leaked old password is no good for longer."""
ROTATE_EVERY_MIN = "1h"
ROTATE_EVERY_MAX = "3650d"


def _grace(value: str) -> str:
    return check_duration_at_most(value, GRACE_PERIOD_MAX)


def _rotate_every(value: str) -> str:
    check_duration_at_most(value, ROTATE_EVERY_MAX)
    if parse_duration(value) < parse_duration(ROTATE_EVERY_MIN):
        raise ValueError(f"rotateEvery {value!r} is shorter than {ROTATE_EVERY_MIN}")
    return value


GracePeriod = Annotated[
    str,
    duration_field(GRACE_PERIOD_MAX, what="gracePeriod"),
    AfterValidator(_grace),
]
RotateEvery = Annotated[
    str,
    duration_field(
        ROTATE_EVERY_MAX,
        cel(f"{duration_millis_cel()} >= {float(parse_duration(ROTATE_EVERY_MIN).total_seconds() * 1000)!r}",
            f"rotateEvery must be at least {ROTATE_EVERY_MIN}"),
        what="rotateEvery"),
    AfterValidator(_rotate_every),
]


class CredentialsSpec(ApiModel):
    """How the application's logins are rotated."""

    rotate_every: RotateEvery | None = None
    """Rotate on a schedule (e.g. `720h`), at least 1h; unset: only on demand (the annotation)."""
    grace_period: GracePeriod = "5m"
    """How long the previous login keeps working after a rotation (its sessions are ended then); at most 24h."""
    read_only_login: bool = False
    """Also a read-only login (SELECT only) with its own Secret `<tenant>-db-readonly`, e.g. for reporting."""


class CredentialsStatus(ApiModel):
    """The application's credentials as the operator last set them."""

    user: str | None = Field(default=None, max_length=63)
    """The login role the Secret names now."""
    last_rotated_at: AwareDatetime | None = None
    next_rotation_at: AwareDatetime | None = None
    """When the next scheduled rotation is due (spec.credentials.rotateEvery)."""
    retiring_user: str | None = Field(default=None, max_length=63)
    """The previous login, still working until retiringAt."""
    retiring_at: AwareDatetime | None = None


PLACEMENT_KEY_PATTERN = r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"
PLACEMENT_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
PlacementKey = Annotated[str, Field(max_length=63, pattern=PLACEMENT_KEY_PATTERN)]
PlacementValue = Annotated[str, Field(max_length=63, pattern=PLACEMENT_VALUE_PATTERN)]


class Placement(ApiModel):
    """Where the tenant's data may live."""

    required_labels: dict[PlacementKey, PlacementValue] = Field(default_factory=dict, max_length=16)
    """Labels the tenant's database target must carry (the operator's TENANCY_DATABASE_TARGET_LABELS),
    e.g. `residency: eu`. On a target without them nothing is provisioned: Ready=False, reason
    PlacementViolation."""


def serving_database(tenant: Mapping[str, object]) -> str:
    """The database target a Tenant's data is served from: status.database (where the operator
    put it), else spec.database. They differ while a move is not done (in progress, refused or
    failed): the source keeps serving until the switch."""
    status, spec = tenant.get("status"), tenant.get("spec")
    reported = status.get("database") if isinstance(status, Mapping) else None
    wanted = spec.get("database") if isinstance(spec, Mapping) else None
    return str(reported or wanted or "default")


def placement_violations(required: Mapping[str, str], labels: Mapping[str, str]) -> list[str]:
    """The required labels ``labels`` lacks or holds with another value, as `key=value`."""
    return [f"{k}={v}" for k, v in sorted(required.items()) if labels.get(k) != v]


class TenantSpec(ApiModel, json_schema_extra=validations(_RESTORE_FROM_IMMUTABLE)):
    """Desired state of a tenant."""

    display_name: str | None = Field(default=None, max_length=256)
    """Human-readable name, free text."""
    tier: Tier = "free"
    """Plan the tenant is on; selects default quotas and feature flags."""
    state: TenantState = "Active"
    """Suspended keeps all data but revokes the tenant role's login."""
    database: str = Field(default=DEFAULT_DATABASE, max_length=63, pattern=DATABASE_PATTERN)
    """Which configured PostgreSQL database holds the tenant's schema. Changing it moves the tenant:
    writes stopped, dumped, restored on the new target as the tenant, every table verified (rows
    and checksum), the Secret switched; the old copy is kept (logins off) for moveGracePeriod."""
    schema_template: DnsSubdomain | None = None
    """Name of a ConfigMap in the Tenant's namespace with SQL to run in a new tenant schema."""
    deletion_policy: DeletionPolicy = "Retain"
    """What happens to the schema when the Tenant is deleted: keep it (Retain), dump it to an
    archive and drop it (Archive), or drop it (Delete)."""
    archive_retention: Duration = "30d"
    """How long archives made by deletionPolicy Archive are kept; at most 3650d."""
    restore_from: str | None = Field(default=None, max_length=128, pattern=RESTORE_FROM_PATTERN)
    """Archive id (or `latest`) to restore the schema from when it is created. Immutable once set."""
    credentials: CredentialsSpec = Field(default_factory=CredentialsSpec)
    """Rotation schedule, grace period and the optional read-only login."""
    move_grace_period: Duration = "7d"
    """How long the copy left on the old target by a move is kept (logins off) before it is
    dropped; at most 3650d."""
    placement: Placement | None = None
    """Requirements on the database target (data residency, tier of hardware...)."""


class JobRef(ApiModel):
    """A background job the operator ran or runs for the tenant (provision, migrate, archive...)."""

    id: str = Field(max_length=128)
    """Job id, unique within the tenant."""
    kind: str = Field(max_length=64)
    """What the job does, e.g. Provision, Migrate, Archive, Restore, Drop."""
    state: str = Field(max_length=64)
    """Where the job is, e.g. Pending, Running, Succeeded, Failed."""
    attempt: int = Field(default=1, ge=0)
    """How many times the job has been started."""
    started_at: AwareDatetime | None = None
    """When the current attempt started."""
    finished_at: AwareDatetime | None = None
    """When the job finished, successfully or not."""
    message: str | None = Field(default=None, max_length=1024)
    """Short outcome or error, for humans."""
    requested_by: str | None = Field(default=None, max_length=256)
    """Who asked for it: the field manager that last set the field behind it (spec.state for a
    suspension, the rotate or retry annotation, spec.restoreFrom...), or tenancy-operator for its
    own schedule, repairs and policies. Kubernetes records managers, not users: give each tool or
    person its own --field-manager to tell them apart."""
    requested_at: AwareDatetime | None = None
    """When that field was set."""


class MoveRecord(ApiModel):
    """The tenant's last move between database targets."""

    source: str = Field(max_length=63)
    destination: str = Field(max_length=63)
    started_at: AwareDatetime | None = None
    """When writes were stopped on the source."""
    finished_at: AwareDatetime | None = None
    """When the Secret named the destination and its logins worked."""
    write_downtime_seconds: float | None = Field(default=None, ge=0)
    """From writes stopped on the source to writes possible on the destination."""
    tables: int | None = Field(default=None, ge=0)
    rows: int | None = Field(default=None, ge=0)
    """Tables and rows verified equal on both sides (count and checksum per table)."""
    archive: str | None = Field(default=None, max_length=253)
    """The archive (TenantArchive) the move was made from."""
    source_dropped_after: AwareDatetime | None = None
    """When the copy on the source is dropped."""


class TenantStatus(KindStatus):
    """Observed state of a tenant, written by the operator."""

    phase: TenantPhase | None = None
    """Summary of where the tenant is in its life cycle; conditions carry the details."""
    tenant_id: str | None = Field(default=None, max_length=64)
    """Stable id of the tenant, shared with the application (e.g. in the flag store)."""
    schema_name: str | None = Field(default=None, alias="schema", max_length=63)
    """PostgreSQL schema of the tenant."""
    role: str | None = Field(default=None, max_length=63)
    """PostgreSQL role of the tenant: the owner of its schema (no login; migrations run as it)."""
    credentials: CredentialsStatus | None = None
    """The application's login and its rotation."""
    secret_name: str | None = Field(default=None, max_length=253)
    """Secret in the Tenant's namespace with the role's connection credentials."""
    database: str | None = Field(default=None, max_length=63)
    """The database target that holds the tenant's data now (during a move: the source)."""
    last_move: MoveRecord | None = None
    """The last move between database targets (spec.database changed)."""
    schema_version: str | None = Field(default=None, max_length=253)
    """Latest schema migration applied to the tenant schema."""
    effective_limits: dict[str, LimitValue] = Field(default_factory=dict, max_length=16)
    """Limits in force: tier defaults merged with the tenant's Quota and active overrides."""
    current_job: JobRef | None = None
    """The job running now, if any."""
    recent_jobs: list[JobRef] = Field(default_factory=list, max_length=10, json_schema_extra=list_map("id"))
    """The last finished jobs, newest first."""


TENANT = ResourceInfo(
    "Tenant", TenantSpec, TenantStatus, short_names=("tn",),
    printer_columns=(
        READY_COLUMN,
        PHASE_COLUMN,
        PrinterColumn("Tier", ".spec.tier"),
        PrinterColumn("Schema", ".status.schema"),
        PrinterColumn("Version", ".status.schemaVersion", "Latest schema migration applied"),
    ),
    initial_phase="Provisioning",
    # The start of a run reads only the Tenants not yet settled (sweep.Sweeper.catch_up).
    selectable_fields=(".status.phase",),
    root_validations=(
        cel(
            f"self.metadata.name.size() <= {TENANT_NAME_MAX_LENGTH}",
            f"Tenant name must be at most {TENANT_NAME_MAX_LENGTH} characters: it becomes the "
            "PostgreSQL schema and role tenant_<name>, and identifiers are limited to 63 bytes",
        ),
        cel(
            f"self.metadata.name.matches({cel_string(TENANT_NAME_PATTERN)})",
            "Tenant name must start with a lowercase letter, contain only lowercase letters, digits "
            "and '-' (no dots), and end with a letter or digit: it becomes the PostgreSQL "
            "identifier tenant_<name with - replaced by _>",
        ),
    ),
)
