"""The conditions in every kind's status, shaped like `metav1.Condition`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from tenancy_operator.api.common import ApiModel
from tenancy_operator.api.schema_extra import list_map

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


class KindStatus(ApiModel):
    """What every kind's status starts with: the generation it describes and its conditions."""

    observed_generation: int | None = None
    """metadata.generation this status describes."""
    conditions: Conditions


class Explained(ApiModel):
    """Why an object or one of its parts is where it is, for machines and for humans."""

    reason: str | None = Field(default=None, max_length=64)
    """CamelCase reason, the one the Ready condition or the phase shows."""
    message: str | None = Field(default=None, max_length=1024)
    """The same, for humans."""


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of the given type, if present."""
    return next((c for c in conditions if c.type == type_), None)
