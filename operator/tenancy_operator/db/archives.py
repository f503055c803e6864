"""SQL for the archive catalog (tenant_archives in the control schema of the tenant's target)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from tenancy_operator.db.targets import Conn


@dataclass(frozen=True)
class ArchiveRow:
    id: str
    tenant_id: str
    namespace: str
    name: str
    schema_name: str
    path: str
    """The archive's location: s3://bucket/key, or a path on the operator's volume."""
    sha256: str
    size_bytes: int
    created_at: datetime.datetime
    expires_at: datetime.datetime
    target: str | None = None
    tenant_uid: str | None = None
    object_uid: str | None = None
    token: str | None = None
    protected: bool = False
    purged_at: datetime.datetime | None = None


_COLS = sql.SQL(
    "id, tenant_id::text, namespace, name, schema_name, path, sha256, size_bytes, created_at, expires_at,"
    " target, tenant_uid, object_uid, token, protected, purged_at"
)


def _t(control: str) -> sql.Composed:
    return sql.SQL("{}.tenant_archives").format(sql.Identifier(control))


def _insert(control: str, values: dict[str, Any]) -> sql.Composed:
    """INSERT of one catalog row: ``values`` by column name, passed as named parameters."""
    return sql.SQL("INSERT INTO {t} ({columns}) VALUES ({values})").format(
        t=_t(control), columns=sql.SQL(", ").join(map(sql.Identifier, values)),
        values=sql.SQL(", ").join(map(sql.Placeholder, values)),
    )


async def record(conn: Conn, control: str, *, archive_id: str, tenant_id: str, namespace: str, name: str,
                 schema: str, path: str, sha256: str, size_bytes: int, expires_at: datetime.datetime,
                 target: str, tenant_uid: str | None, token: str) -> ArchiveRow:
    values = {"id": archive_id, "tenant_id": tenant_id, "namespace": namespace, "name": name, "schema_name": schema,
              "path": path, "sha256": sha256, "size_bytes": size_bytes, "expires_at": expires_at, "target": target,
              "tenant_uid": tenant_uid, "token": token}
    cur = await conn.execute(_insert(control, values) + sql.SQL(" RETURNING {}").format(_COLS), values)
    row = await cur.fetchone()
    return ArchiveRow(**row)  # type: ignore[arg-type]


async def restore_row(conn: Conn, control: str, meta: dict[str, Any]) -> bool:
    """Put back the catalog row of an archive found in the store (after a reinstall): with a registry
    row in state 'archived' for its tenant if there is none. False if the catalog already has it."""
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, namespace, name, k8s_uid, schema_name, role_name, tier, state, deleted_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'unknown', 'archived', now()) ON CONFLICT (id) DO NOTHING"
        ).format(sql.Identifier(control, "tenants")),
        [meta["tenant_id"], meta["namespace"], meta["name"], meta.get("tenant_uid"), meta["schema"], meta["schema"]],
    )
    values = {"id": meta["id"], "tenant_id": meta["tenant_id"], "namespace": meta["namespace"], "name": meta["name"],
              "schema_name": meta["schema"], "path": meta["location"], "sha256": meta["sha256"],
              "size_bytes": int(meta["size_bytes"]), "created_at": meta["created_at"], "expires_at": meta["expires_at"],
              "target": meta.get("target"), "tenant_uid": meta.get("tenant_uid"), "token": meta.get("token")}
    cur = await conn.execute(_insert(control, values) + sql.SQL(" ON CONFLICT (id) DO NOTHING"), values)
    return cur.rowcount == 1


async def find(conn: Conn, control: str, namespace: str, name: str, ref: str) -> ArchiveRow | None:
    """An unpurged archive of ``namespace/name``: by id, or the newest one for ``latest``. An
    archive restores only into the namespace and name it came from: another namespace's Tenant
    naming its id finds nothing (and learns nothing of whether it exists)."""
    if ref == "latest":
        query = sql.SQL(
            "SELECT {c} FROM {t} WHERE namespace = %s AND name = %s AND purged_at IS NULL"
            " ORDER BY created_at DESC LIMIT 1"
        ).format(c=_COLS, t=_t(control))
        params: list[Any] = [namespace, name]
    else:
        query = sql.SQL(
            "SELECT {c} FROM {t} WHERE id = %s AND namespace = %s AND name = %s AND purged_at IS NULL"
        ).format(c=_COLS, t=_t(control))
        params = [ref, namespace, name]
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return ArchiveRow(**row) if row else None  # type: ignore[arg-type]


async def by_id(conn: Conn, control: str, namespace: str, archive_id: str) -> ArchiveRow | None:
    """The archive ``archive_id`` of ``namespace`` (purged or not): a TenantArchive's row."""
    cur = await conn.execute(
        sql.SQL("SELECT {c} FROM {t} WHERE id = %s AND namespace = %s").format(c=_COLS, t=_t(control)),
        [archive_id, namespace],
    )
    row = await cur.fetchone()
    return ArchiveRow(**row) if row else None  # type: ignore[arg-type]


async def expired(conn: Conn, control: str) -> list[ArchiveRow]:
    """Past their retention and not protected."""
    cur = await conn.execute(
        sql.SQL("SELECT {c} FROM {t} WHERE purged_at IS NULL AND expires_at <= now() AND NOT protected").format(
            c=_COLS, t=_t(control))
    )
    return [ArchiveRow(**r) for r in await cur.fetchall()]  # type: ignore[arg-type]


async def unlisted(conn: Conn, control: str, limit: int = 100) -> list[ArchiveRow]:
    """Unpurged archives without their TenantArchive object yet."""
    cur = await conn.execute(
        sql.SQL("SELECT {c} FROM {t} WHERE object_uid IS NULL AND purged_at IS NULL ORDER BY created_at LIMIT %s")
        .format(c=_COLS, t=_t(control)), [limit],
    )
    return [ArchiveRow(**r) for r in await cur.fetchall()]  # type: ignore[arg-type]


async def set_object(conn: Conn, control: str, archive_id: str, object_uid: str) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET object_uid = %s WHERE id = %s").format(_t(control)),
                       [object_uid, archive_id])


async def set_protected(conn: Conn, control: str, archive_id: str, protected: bool) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET protected = %s WHERE id = %s AND protected <> %s").format(_t(control)),
                       [protected, archive_id, protected])


async def mark_purged(conn: Conn, control: str, archive_id: str) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET purged_at = now() WHERE id = %s AND purged_at IS NULL")
                       .format(_t(control)), [archive_id])
