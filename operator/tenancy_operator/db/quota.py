"""SQL for quotas: bulk usage measurement, the role attributes the operator enforces, the registry.

Every measurement takes all tenants of a target in one statement (``unnest`` of their identifiers),
so the cost of a measurement pass grows with the catalog, not with round trips. Identifiers go
through ``sql.Identifier``; ``ALTER ROLE`` accepts no bind parameters, so its numbers are
``sql.Literal`` of Python ints (never text from a spec).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from tenancy_operator.db.targets import Conn

OPERATOR_SOURCE = "operator"
MEASURED = ("storage", "connections")
"""Resources the operator measures itself; every other row of tenant_quota_usage is the platform's."""

_TRUE = {"on", "true", "yes", "1", "t", "y"}


@dataclass(frozen=True)
class RoleQuotaState:
    """What the catalog and the registry say about one tenant identifier."""

    tenant_id: str | None
    """Registry row whose data lives in the schema (None: not provisioned yet)."""
    row_namespace: str | None
    row_name: str | None
    published: dict[str, Any] | None
    """tenants.quotas as stored now."""
    role_exists: bool
    connection_limit: int
    """pg_roles.rolconnlimit (-1: unlimited)."""
    statement_timeout: str | None
    """The role's statement_timeout setting as stored in rolconfig, if any."""
    read_only: bool
    """default_transaction_read_only is on for the role."""


def _t(control: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(control), sql.Identifier(table))


def role_setting(rolconfig: Iterable[str] | None, name: str) -> str | None:
    """The value of ``name`` in a pg_roles.rolconfig array (``['search_path=x', ...]``)."""
    prefix = name + "="
    for entry in rolconfig or ():
        if entry.startswith(prefix):
            return entry[len(prefix):]
    return None


def is_on(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


async def observe(conn: Conn, control: str, idents: list[str]) -> dict[str, RoleQuotaState]:
    """Registry row and role attributes of every identifier, in one query."""
    cur = await conn.execute(
        sql.SQL(
            """
            SELECT want.name AS ident, t.id::text AS tenant_id, t.namespace, t.name, t.quotas,
                   r.oid IS NOT NULL AS role_exists, coalesce(r.rolconnlimit, -1) AS connlimit,
                   r.rolconfig AS rolconfig
              FROM unnest(%s::text[]) AS want(name)
              LEFT JOIN {} t ON t.schema_name = want.name AND t.state <> ALL(%s)
              LEFT JOIN pg_roles r ON r.rolname = want.name
            """
        ).format(_t(control, "tenants")),
        [idents, ["dropped", "archived"]],
    )
    out: dict[str, RoleQuotaState] = {}
    for row in await cur.fetchall():
        config: list[str] | None = row["rolconfig"]  # type: ignore[assignment]
        out[str(row["ident"])] = RoleQuotaState(
            tenant_id=row["tenant_id"],  # type: ignore[arg-type]
            row_namespace=row["namespace"],  # type: ignore[arg-type]
            row_name=row["name"],  # type: ignore[arg-type]
            published=row["quotas"],  # type: ignore[arg-type]
            role_exists=bool(row["role_exists"]),
            connection_limit=int(row["connlimit"]),  # type: ignore[call-overload]
            statement_timeout=role_setting(config, "statement_timeout"),
            read_only=is_on(role_setting(config, "default_transaction_read_only")),
        )
    return out


async def measure_storage(conn: Conn, schemas: list[str]) -> dict[str, int]:
    """Bytes of every schema's relations (tables, materialized views, sequences, with their
    indexes and TOAST), in one query. A schema that does not exist is missing from the result."""
    cur = await conn.execute(
        """
        SELECT n.nspname AS schema,
               coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint AS bytes
          FROM pg_namespace n
          LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'm', 'p', 'S')
         WHERE n.nspname = ANY(%s::text[])
         GROUP BY n.nspname
        """,
        [schemas],
    )
    return {str(r["schema"]): int(r["bytes"]) for r in await cur.fetchall()}  # type: ignore[call-overload]


async def measure_connections(conn: Conn, roles: list[str]) -> dict[str, int]:
    """Open sessions of every role (on the whole server, like CONNECTION LIMIT), in one query."""
    cur = await conn.execute(
        "SELECT usename AS role, count(*)::int AS n FROM pg_stat_activity"
        " WHERE usename = ANY(%s::text[]) GROUP BY usename",
        [roles],
    )
    return {str(r["role"]): int(r["n"]) for r in await cur.fetchall()}  # type: ignore[call-overload]


async def record_usage(conn: Conn, control: str, rows: Mapping[str, Mapping[str, int]]) -> None:
    """Upsert the operator's measurements (tenant id -> resource -> amount) in one statement."""
    ids: list[str] = []
    resources: list[str] = []
    amounts: list[int] = []
    for tenant_id, usage in rows.items():
        for resource, amount in usage.items():
            ids.append(tenant_id)
            resources.append(resource)
            amounts.append(amount)
    if not ids:
        return
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} AS u (tenant_id, resource, used, measured_at, source)"
            " SELECT i, r, a, now(), %s FROM unnest(%s::uuid[], %s::text[], %s::numeric[]) AS x(i, r, a)"
            " ON CONFLICT (tenant_id, resource) DO UPDATE"
            " SET used = EXCLUDED.used, measured_at = EXCLUDED.measured_at, source = EXCLUDED.source"
        ).format(_t(control, "tenant_quota_usage")),
        [OPERATOR_SOURCE, ids, resources, amounts],
    )


async def reported_usage(conn: Conn, control: str, tenant_ids: list[str]) -> dict[str, dict[str, Decimal]]:
    """Usage rows the platform wrote (anything but what the operator measures), by tenant id."""
    if not tenant_ids:
        return {}
    cur = await conn.execute(
        sql.SQL(
            "SELECT tenant_id::text AS id, resource, used FROM {}"
            " WHERE tenant_id = ANY(%s::uuid[]) AND NOT (resource = ANY(%s::text[]))"
        ).format(_t(control, "tenant_quota_usage")),
        [tenant_ids, list(MEASURED)],
    )
    out: dict[str, dict[str, Decimal]] = {}
    for r in await cur.fetchall():
        out.setdefault(str(r["id"]), {})[str(r["resource"])] = Decimal(str(r["used"]))
    return out


async def set_connection_limit(conn: Conn, role: str, limit: int) -> None:
    await conn.execute(
        sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(role), sql.Literal(int(limit)))
    )


async def set_statement_timeout(conn: Conn, role: str, millis: int | None) -> None:
    """Role default statement_timeout in milliseconds; None removes it."""
    if millis is None:
        query = sql.SQL("ALTER ROLE {} RESET statement_timeout").format(sql.Identifier(role))
    else:
        query = sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
            sql.Identifier(role), sql.Literal(int(millis))
        )
    await conn.execute(query)


async def set_read_only(conn: Conn, role: str, read_only: bool) -> None:
    """New sessions of the role start with read-only transactions (or stop doing so)."""
    if read_only:
        query = sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(role))
    else:
        query = sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(sql.Identifier(role))
    await conn.execute(query)


async def publish(conn: Conn, control: str, tenant_id: str, document: Mapping[str, Any]) -> bool:
    """Write the effective limits into tenants.quotas; no row version when nothing changed."""
    cur = await conn.execute(
        sql.SQL(
            "UPDATE {} SET quotas = %(doc)s, updated_at = now() WHERE id = %(id)s AND quotas IS DISTINCT FROM %(doc)s"
        ).format(_t(control, "tenants")),
        {"doc": Jsonb(dict(document)), "id": tenant_id},
    )
    return cur.rowcount > 0
