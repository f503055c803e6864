"""SQL for the archive registry (tenant_archives in the control schema)."""

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
    sha256: str
    size_bytes: int
    created_at: Any
    expires_at: Any


_COLS = sql.SQL("id, tenant_id::text, namespace, name, schema_name, path, sha256, size_bytes, created_at, expires_at")


def _t(control: str) -> sql.Composed:
    return sql.SQL("{}.tenant_archives").format(sql.Identifier(control))


async def record(conn: Conn, control: str, *, archive_id: str, tenant_id: str, namespace: str, name: str,
                 schema: str, path: str, sha256: str, size_bytes: int, retention: datetime.timedelta) -> None:
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, tenant_id, namespace, name, schema_name, path, sha256, size_bytes, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now() + %s)"
        ).format(_t(control)),
        [archive_id, tenant_id, namespace, name, schema, path, sha256, size_bytes, retention],
    )


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


async def expired(conn: Conn, control: str) -> list[ArchiveRow]:
    cur = await conn.execute(
        sql.SQL("SELECT {c} FROM {t} WHERE purged_at IS NULL AND expires_at <= now()").format(c=_COLS, t=_t(control))
    )
    return [ArchiveRow(**r) for r in await cur.fetchall()]  # type: ignore[arg-type]


async def mark_purged(conn: Conn, control: str, archive_id: str) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET purged_at = now() WHERE id = %s").format(_t(control)), [archive_id])
