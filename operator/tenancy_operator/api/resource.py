"""How each kind is described to the API server (names, printer columns: `ResourceInfo`), and a
whole object of a kind as read from it (`KubeObject`)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from pydantic import AwareDatetime, Field

from tenancy_operator import GROUP, VERSION
from tenancy_operator.api.common import ApiModel, JsonDict


@dataclass(frozen=True)
class PrinterColumn:
    """One `additionalPrinterColumns` entry (`kubectl get` column)."""

    name: str
    json_path: str
    description: str = ""
    priority: int = 0
    type: Literal["string", "integer", "number", "boolean", "date"] | None = None
    """Default: the type of the field at ``json_path`` (crdgen looks it up in the kind's schema)."""

    def to_crd(self, type_: str) -> JsonDict:
        """The CRD form of the column, of type ``type_`` (its own, or that of the field it shows)."""
        column: JsonDict = {"name": self.name, "type": type_, "jsonPath": self.json_path}
        if self.description:
            column["description"] = self.description
        if self.priority:
            column["priority"] = self.priority
        return column


READY_COLUMN = PrinterColumn(
    "Ready", '.status.conditions[?(@.type=="Ready")].status', "Ready condition status", type="string"
)
PHASE_COLUMN = PrinterColumn("Phase", ".status.phase")
AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", type="date")


def columns(paths: Mapping[str, str]) -> tuple[PrinterColumn, ...]:
    """Plain columns in the order given, ``{name: JSON path}``: each of its field's type, with no
    description."""
    return tuple(PrinterColumn(name, path) for name, path in paths.items())


def _first_paragraph(doc: str | None) -> str:
    return " ".join(inspect.cleandoc(doc or "").split("\n\n", 1)[0].split())


@dataclass(frozen=True)
class ResourceInfo:
    """Names of one custom resource kind, for the CRD and for API calls (Kopf handlers, clients)."""

    kind: str
    spec_model: type[ApiModel]
    status_model: type[ApiModel]
    short_names: tuple[str, ...]
    description: str = ""
    """Default: the first paragraph of the docstring of the module that declares the spec model, so
    the kind is described once, for `kubectl explain` and for readers of the code (as kubebuilder
    takes it from the type's doc comment)."""
    plural: str = ""
    """Default: the kind in lower case with an s (tenants, quotas, featureflags)."""
    singular: str = ""
    """Default: the kind in lower case."""
    printer_columns: tuple[PrinterColumn, ...] = ()
    """The kind's own columns for ``kubectl get``; Phase (where the status has one), Ready and Age
    follow where the kind does not place them, so every kind shows them alike."""
    root_validations: tuple[JsonDict, ...] = ()
    selectable_fields: tuple[str, ...] = ()
    """JSON paths a LIST or watch may select on with a fieldSelector (the CRD's selectableFields)."""
    categories: tuple[str, ...] = ("tenancy",)
    initial_phase: str | None = None
    """`status.phase` the API server shows before the operator's first status write."""
    group: str = GROUP
    version: str = VERSION
    namespaced: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "singular", self.singular or self.kind.lower())
        object.__setattr__(self, "plural", self.plural or f"{self.kind.lower()}s")
        if not self.description:
            doc = sys.modules[self.spec_model.__module__].__doc__
            object.__setattr__(self, "description", _first_paragraph(doc))
        phase = (PHASE_COLUMN,) if "phase" in self.status_model.model_fields else ()
        placed = [c for c in (*phase, READY_COLUMN) if c not in self.printer_columns]
        object.__setattr__(self, "printer_columns", (*self.printer_columns, *placed, AGE_COLUMN))

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
