"""The archive catalog and its TenantArchive objects: shared by the Tenant reconcile (which
archives) and the TenantArchive reconcile (which shows and purges).

The catalog (tenant_archives on each target) is the operator's record; a TenantArchive object is its
view for users. An object counts as the operator's only if its name and namespace have a catalog row
and its `tenancy.dev/archive-token` annotation carries that row's token: a user can create objects of
the kind, never make the operator act on an archive through one. Every archive also has a
description beside it in the store, from which the catalog is rebuilt after a reinstall.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from typing import Any

from tenancy_operator import GROUP, VERSION, archive
from tenancy_operator.api.names import ARCHIVE_TOKEN_ANNOTATION, FINALIZER, MANAGED_BY, TENANT_LABEL
from tenancy_operator.api.tenantarchive import TENANT_ARCHIVE, ArchivedTenant, TenantArchiveStatus
from tenancy_operator.archive_store import StoreError
from tenancy_operator.db import archives as archive_sql
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.lifecycle import JobFailed, JobGate, using
from tenancy_operator.runtime_context import OperatorContext

PLURAL = TENANT_ARCHIVE.plural
log = get_logger(__name__)


def managed(body: Mapping[str, Any], row: archive_sql.ArchiveRow | None) -> bool:
    """Is this object the view of ``row`` that the operator created?"""
    token = ((body.get("metadata") or {}).get("annotations") or {}).get(ARCHIVE_TOKEN_ANNOTATION)
    return row is not None and bool(row.token) and token == row.token


def status_of(row: archive_sql.ArchiveRow) -> TenantArchiveStatus:
    return TenantArchiveStatus(
        phase="Purging" if row.purged_at else "Available",
        tenant=ArchivedTenant(namespace=row.namespace, name=row.name, uid=row.tenant_uid),
        target=row.target, schema_name=row.schema_name, location=row.path, size_bytes=row.size_bytes,
        sha256=row.sha256, created_at=row.created_at, expires_at=row.expires_at,
    )


def object_for(row: archive_sql.ArchiveRow) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": TENANT_ARCHIVE.kind,
        "metadata": {
            "name": row.id,
            "namespace": row.namespace,
            "labels": {**MANAGED_BY, TENANT_LABEL: row.name},
            "annotations": {ARCHIVE_TOKEN_ANNOTATION: row.token},
            # From the start, so a deletion before the operator's first look still purges.
            "finalizers": [FINALIZER],
        },
        "spec": {"protected": row.protected},
    }


async def find_row(ctx: OperatorContext, namespace: str, archive_id: str) -> archive_sql.ArchiveRow | None:
    """The catalog row of ``namespace``'s archive ``archive_id``, on whichever target holds it."""
    for target in ctx.targets.pools:
        await ctx.ensure_control_schema(target)
        async with ctx.targets.connection(target) as conn:
            row = await archive_sql.by_id(conn, ctx.settings.control_schema, namespace, archive_id)
        if row is not None:
            return row if row.target else archive_sql.ArchiveRow(**{**row.__dict__, "target": target})
    return None


async def publish(ctx: OperatorContext, conn: Conn, row: archive_sql.ArchiveRow) -> bool:
    """Create the TenantArchive of ``row`` (or recognise the one made earlier, by its token). False
    when it cannot be created now (the namespace is gone or terminating): the catalog keeps the
    archive, and the next sweep tries again."""
    if not row.token:
        return False
    try:
        created = await ctx.kube.create_object(PLURAL, row.namespace, object_for(row))
    except ApiError as exc:
        if exc.status == 409:
            existing = await ctx.kube.get_object(PLURAL, row.namespace, row.id)
            if existing is None or not managed(existing, row):
                log.warning("archive object name taken by an object the operator did not create",
                            namespace=row.namespace, archive=row.id)
                return False
            created = existing
        elif exc.status in (403, 404):  # namespace terminating or gone
            return False
        else:
            raise
    await archive_sql.set_object(conn, ctx.settings.control_schema, row.id, str(created["metadata"]["uid"]))
    return True


async def purge(ctx: OperatorContext, conn: Conn, row: archive_sql.ArchiveRow, why: str) -> None:
    """Remove the archive from its store and mark it purged, as a ``purge`` job in the tenant's ledger.
    Raises JobFailed (the store unreachable, ...)."""
    control = ctx.settings.control_schema
    gate = JobGate(using(conn), control, row.tenant_id, generation=None, retry_token=None, max_attempts=1_000_000)

    async def step() -> None:
        try:
            store = ctx.store_at(row.path, row.target)
        except StoreError as exc:
            raise archive.ArchiveUnavailable(str(exc)) from exc
        await archive.purge(store, row.path)
        await archive_sql.mark_purged(conn, control, row.id)

    await gate.run("purge", step, detail=f"archive {row.id}: {why}")


class CatalogSweep:
    """Per target, at each sweep: expired archives purged (and their objects deleted), archives
    without their object given one, and, every ``rebuild_seconds``, descriptions in the store that
    the catalog lacks put back (after a reinstall)."""

    def __init__(self, ctx: OperatorContext, rebuild_seconds: float) -> None:
        self.ctx = ctx
        self.rebuild_seconds = rebuild_seconds
        self._rebuilt: dict[str, float] = {}

    async def run(self, target: str) -> list[str]:
        """The ids purged."""
        control = self.ctx.settings.control_schema
        if time.monotonic() - self._rebuilt.get(target, -1e9) >= self.rebuild_seconds:
            restored = await self.rebuild(target)
            self._rebuilt[target] = time.monotonic()
            if restored:
                log.info("archive catalog rebuilt from the store", target=target, archives=restored)
        purged: list[str] = []
        async with self.ctx.targets.connection(target) as conn:
            for row in await archive_sql.expired(conn, control):
                try:
                    await purge(self.ctx, conn, row, "past its retention")
                except JobFailed:
                    continue  # counted and logged in the ledger; tried again at the next sweep
                purged.append(row.id)
                if row.object_uid:
                    await self.ctx.kube.delete_object(PLURAL, row.namespace, row.id, row.object_uid)
            for row in await archive_sql.unlisted(conn, control):
                await publish(self.ctx, conn, row)
        return purged

    async def rebuild(self, target: str) -> list[str]:
        """Catalog rows for the archives of ``target`` whose description is in the store but not in
        the catalog. Errors of the store are logged, not raised: archives keep working meanwhile."""
        try:
            found = await archive.descriptions(self.ctx.archive_store(target))
        except archive.ArchiveUnavailable as exc:
            log.warning("archive store not readable for the catalog check", target=target, error=str(exc))
            return []
        restored: list[str] = []
        async with self.ctx.targets.connection(target) as conn:
            for meta in found:
                if meta.get("target") != target or "tenant_id" not in meta or "expires_at" not in meta:
                    continue
                if await archive_sql.restore_row(conn, self.ctx.settings.control_schema, meta):
                    restored.append(str(meta["id"]))
        return restored


def expiry(retention: datetime.timedelta) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + retention
