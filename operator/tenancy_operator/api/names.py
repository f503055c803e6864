"""The labels, annotations and finalizer the operator reads and writes: part of its API, since
users and tools set the annotations and select by the labels. Defined here once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tenancy_operator import GROUP

FINALIZER = f"{GROUP}/finalizer"
MANAGED_BY_KEY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "tenancy-operator"
OPERATOR = MANAGED_BY_VALUE
"""The actor recorded for what the operator does on its own (a schedule, a repair, a policy)."""
MANAGED_BY = {MANAGED_BY_KEY: MANAGED_BY_VALUE}
PART_OF = {"app.kubernetes.io/part-of": "tenancy-operator"}

# Labels on what the operator creates.
TENANT_LABEL = f"{GROUP}/tenant"
FLAG_LABEL = f"{GROUP}/featureflag"
FLAGD_LABEL = f"{GROUP}/flagd"
"""On each per-flag flagd ConfigMap (`<name>-flagd`), value "true"."""
FLAGD_SOURCE_LABEL = f"{GROUP}/flagd-source"
"""On the namespace's flagd ConfigMap (every flag of the namespace in one document), value "namespace"."""
SLICE_LABEL = f"{GROUP}/slice"
"""On each Quota of a sharded fleet: the slice of the Tenant it names, as ``<count>-<index>``
(shards.Slices.label). Each replica watches only the Quotas of its slices and the unlabelled ones
(shards.Ownership.quota_selector); the replica that holds the Tenant sets it."""

# Annotations users set on a Tenant (or a FeatureFlag, for retry).
RETRY_ANNOTATION = f"{GROUP}/retry"
ROTATE_ANNOTATION = f"{GROUP}/rotate-credentials"
ACK_SCHEMA_RECREATED_ANNOTATION = f"{GROUP}/acknowledge-schema-recreated"
RESUME_ROLLOUT_ANNOTATION = f"{GROUP}/resume-rollout"
"""On a FeatureFlag or a SchemaRollout: a new value resumes its rollout after a breach, a halt or a hand edit."""
ROLLBACK_ROLLOUT_ANNOTATION = f"{GROUP}/rollback-rollout"
"""On a SchemaRollout: a new value rolls its Tenants back to its base version with the down migrations."""
SCHEMA_PIN_ANNOTATION = f"{GROUP}/schema-pin"
"""On a Tenant: the newest template version it may have (e.g. 0002_orders); SchemaRollouts skip it."""

# Annotations the operator writes.
SECRET_ROTATION_ANNOTATION = f"{GROUP}/rotated-for"
SECRET_CLAIM_ANNOTATION = f"{GROUP}/claim"
GENERATION_ANNOTATION = f"{GROUP}/generation"
ARCHIVE_TOKEN_ANNOTATION = f"{GROUP}/archive-token"
"""On a TenantArchive the operator made: the archive's secret token (from its catalog row), so a
copied or hand-made object is told apart and never acted on."""


REQUEST_TOKEN_MAX = 253
"""Characters of a request annotation's value kept in status (resumedBy, rolledBackBy)."""


def request_token(meta: Mapping[str, Any], annotation: str) -> str | None:
    """The value of a request annotation (resume, rollback) as status records it: at most
    REQUEST_TOKEN_MAX characters, so a long value is compared with what was stored, not acted on
    again at every look."""
    value = (meta.get("annotations") or {}).get(annotation)
    return str(value)[:REQUEST_TOKEN_MAX] if value else None
