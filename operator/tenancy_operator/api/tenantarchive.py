"""One archive of a Tenant's schema (a verified pg_dump in the archive store): listed, restorable
with a Tenant's restoreFrom, purged when deleted unless protected.

The operator creates one when it archives a Tenant (deletionPolicy Archive, or a snapshot before a
risky migration). The object is where an archive is found and managed: `kubectl get
tenantarchives` lists them with their tenant, size and expiry; a Tenant's `restoreFrom` names one;
deleting one purges the archive from its store unless `spec.protected` is true. The facts (source
tenant, location, checksum, times) are in status and come from the operator's catalog, which the
operator alone writes: an object the operator did not create (no catalog row with its name,
namespace and token) is reported as not managed and never acted on.

The first paragraph is the kind's description in the CRD.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from tenancy_operator.api.common import ApiModel
from tenancy_operator.api.conditions import Explained, KindStatus
from tenancy_operator.api.resource import ResourceInfo, columns

ArchivePhase = Literal["Available", "Purging", "NotManaged"]


class TenantArchiveSpec(ApiModel):
    """What a user may change about an archive."""

    protected: bool = False
    """While true, deleting this object does not purge the archive (the deletion waits), and the
    archive is kept past its expiry."""


class ArchivedTenant(ApiModel):
    """The Tenant the archive was made from."""

    namespace: str = Field(max_length=63)
    name: str = Field(max_length=63)
    uid: str | None = Field(default=None, max_length=64)


class TenantArchiveStatus(KindStatus, Explained):
    """The archive as the operator's catalog records it."""

    phase: ArchivePhase | None = None
    """Available, Purging (deleted: the archive is being removed from its store), or NotManaged
    (an object the operator did not create)."""
    tenant: ArchivedTenant | None = None
    target: str | None = Field(default=None, max_length=63)
    """The database target the tenant was on."""
    schema_name: str | None = Field(default=None, max_length=63)
    location: str | None = Field(default=None, max_length=2048)
    """Where the dump is: s3://bucket/key, or a path on the operator's volume."""
    size_bytes: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Checked as the dump is stored and again before every restore."""
    created_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    """When retention purges it (not while protected)."""


TENANT_ARCHIVE = ResourceInfo(
    "TenantArchive", TenantArchiveSpec, TenantArchiveStatus, short_names=("tarc",),
    printer_columns=columns({
        "Tenant": ".status.tenant.name", "Target": ".status.target", "Size": ".status.sizeBytes",
        "Expires": ".status.expiresAt", "Protected": ".spec.protected",
    }),
)
