"""TenantArchive reconcile: observe the catalog row behind the object, decide, apply (the
protection flag into the catalog; on deletion, the purge), and return the status to show.

The row is the truth; the object is its view (reconcilers/archive_catalog.py). An object without
a row of its own (made by hand, or a copy) is reported NotManaged and never acted on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tenancy_operator.api.tenantarchive import TenantArchiveSpec, TenantArchiveStatus
from tenancy_operator.db import archives as archive_sql
from tenancy_operator.reconcilers import archive_catalog as catalog
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, Verdict, database_retry
from tenancy_operator.reconcilers.lifecycle import JobFailed
from tenancy_operator.runtime_context import OperatorContext

PLURAL = catalog.PLURAL
NOT_MANAGED = ("the operator did not create this TenantArchive (no archive of this namespace has this name and "
               "token): it is not acted on, and deleting it purges nothing")


@dataclass
class Outcome(Verdict):
    status: TenantArchiveStatus | None = None
    done: bool = True
    """On deletion: may the object go (purged, or nothing to purge)?"""


def _spec(body: Mapping[str, Any]) -> TenantArchiveSpec:
    return TenantArchiveSpec.model_validate(body.get("spec") or {})


class TenantArchiveReconciler:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx

    async def _row(self, body: Mapping[str, Any]) -> archive_sql.ArchiveRow | None:
        meta = body["metadata"]
        try:
            return await catalog.find_row(self.ctx, str(meta["namespace"]), str(meta["name"]))
        except DATABASE_ERRORS as exc:
            raise database_retry(exc, "archive catalog") from exc

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        row = await self._row(body)
        if row is None or row.target is None or not catalog.managed(body, row):
            return Outcome(False, "NotManaged", NOT_MANAGED, stalled=True,
                           status=TenantArchiveStatus(phase="NotManaged"))
        protected = _spec(body).protected
        uid = str(body["metadata"]["uid"])
        if protected != row.protected or uid != row.object_uid:
            async with self.ctx.targets.connection(row.target) as conn:
                await archive_sql.set_protected(conn, self.ctx.settings.control_schema, row.id, protected)
                await archive_sql.set_object(conn, self.ctx.settings.control_schema, row.id, uid)
        status = catalog.status_of(row)
        if row.purged_at:
            return Outcome(False, "Purged", "the archive was purged from its store", status=status)
        message = f"{row.size_bytes} bytes at {row.path}" + (" (protected)" if protected else "")
        return Outcome(True, "Available", message, status=status)

    async def finalize(self, body: Mapping[str, Any]) -> Outcome:
        """The object is being deleted: purge its archive, unless protected."""
        row = await self._row(body)
        if row is None or row.target is None or row.purged_at or not catalog.managed(body, row):
            return Outcome(True, "Purged", "nothing to purge")
        status = catalog.status_of(row)
        if _spec(body).protected:
            message = "the archive is protected: set spec.protected to false to let this deletion purge it"
            return Outcome(False, "Protected", message, status=status, done=False,
                           events=[("Warning", "PurgeBlocked", message)])
        status.phase = "Purging"
        try:
            async with self.ctx.targets.connection(row.target) as conn:
                await catalog.purge(self.ctx, conn, row, "its TenantArchive was deleted")
        except JobFailed as exc:
            message = f"purge failed, retrying: {exc.error}"
            return Outcome(False, "PurgeFailed", message, status=status, done=False,
                           events=[("Warning", "PurgeFailed", message)])
        except DATABASE_ERRORS as exc:
            raise database_retry(exc, "archive catalog") from exc
        return Outcome(True, "Purged", f"archive {row.id} purged from {row.path.rsplit('/', 1)[0]}/",
                       events=[("Normal", "Purged", f"archive {row.id} removed from its store")])
