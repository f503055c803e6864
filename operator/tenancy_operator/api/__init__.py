"""API types of tenancy.dev/v1alpha1: the pydantic models behind the CRDs, and per-kind names.

`crdgen` generates crds/*.yaml from these models; the operator parses watched objects with them.
"""

from tenancy_operator.api.common import ApiModel
from tenancy_operator.api.conditions import Condition, ConditionStatus, find_condition
from tenancy_operator.api.durations import Duration, PositiveDuration, parse_duration
from tenancy_operator.api.featureflag import (
    FEATURE_FLAG,
    FeatureFlagSpec,
    FeatureFlagStatus,
    Rollout,
    TenantOverride,
    UserOverride,
    Weight,
)
from tenancy_operator.api.quantities import PositiveQuantity, Quantity, format_quantity, parse_quantity
from tenancy_operator.api.quota import (
    QUOTA,
    ActiveOverride,
    LimitName,
    QuotaEnforcement,
    QuotaLimits,
    QuotaOverride,
    QuotaSpec,
    QuotaStatus,
    TenantRef,
)
from tenancy_operator.api.resource import KubeObject, ObjectMeta, PrinterColumn, ResourceInfo
from tenancy_operator.api.schemarollout import (
    SCHEMA_ROLLOUT,
    SchemaRolloutSpec,
    SchemaRolloutStatus,
)
from tenancy_operator.api.tenant import (
    TENANT,
    JobRef,
    TenantSpec,
    TenantStatus,
    tenant_identifier,
    validate_tenant_name,
)
from tenancy_operator.api.tenantarchive import (
    TENANT_ARCHIVE,
    TenantArchiveSpec,
    TenantArchiveStatus,
)

Tenant = KubeObject[TenantSpec, TenantStatus]
Quota = KubeObject[QuotaSpec, QuotaStatus]
FeatureFlag = KubeObject[FeatureFlagSpec, FeatureFlagStatus]
SchemaRollout = KubeObject[SchemaRolloutSpec, SchemaRolloutStatus]
"""Whole objects of each kind as read from the API server."""

RESOURCES: tuple[ResourceInfo, ...] = (TENANT, QUOTA, FEATURE_FLAG, SCHEMA_ROLLOUT, TENANT_ARCHIVE)

__all__ = [
    "FEATURE_FLAG",
    "QUOTA",
    "RESOURCES",
    "SCHEMA_ROLLOUT",
    "TENANT",
    "TENANT_ARCHIVE",
    "ActiveOverride",
    "ApiModel",
    "Condition",
    "ConditionStatus",
    "Duration",
    "FeatureFlag",
    "FeatureFlagSpec",
    "FeatureFlagStatus",
    "JobRef",
    "LimitName",
    "ObjectMeta",
    "PositiveDuration",
    "PositiveQuantity",
    "PrinterColumn",
    "Quantity",
    "Quota",
    "QuotaEnforcement",
    "QuotaLimits",
    "QuotaOverride",
    "QuotaSpec",
    "QuotaStatus",
    "ResourceInfo",
    "Rollout",
    "SchemaRollout",
    "SchemaRolloutSpec",
    "SchemaRolloutStatus",
    "Tenant",
    "TenantArchiveSpec",
    "TenantArchiveStatus",
    "TenantOverride",
    "TenantRef",
    "TenantSpec",
    "TenantStatus",
    "UserOverride",
    "Weight",
    "find_condition",
    "format_quantity",
    "parse_duration",
    "parse_quantity",
    "tenant_identifier",
    "validate_tenant_name",
]
