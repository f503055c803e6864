"""What the models of every kind share: their base class, and the object names they validate.

The pydantic models in this package are the single source of truth for the CRDs: `crdgen` turns
them into OpenAPI schemas, and the operator parses the objects it watches with the same models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

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

    @classmethod
    def with_nulls(cls, fields: Mapping[str, Any]) -> JsonDict:
        """``fields`` (a dump of this model) with a null for each of the model's fields it lacks: a
        merge patch that carries it leaves none of them as an older write set them."""
        return {**{(f.alias or name): None for name, f in cls.model_fields.items()}, **fields}


# --- Names ------------------------------------------------------------------------------------

DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_LABEL_PATTERN)]
"""An object name that is a DNS-1123 label (Tenant names, Namespace names)."""

DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN_PATTERN)]
"""An object name that is a DNS-1123 subdomain (ConfigMap and Secret names)."""
