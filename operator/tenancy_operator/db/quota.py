"""SQL for quotas: bulk usage measurement, the role attributes the operator enforces, the registry.

A measurement takes all tenants of a target at once (``unnest`` of their identifiers), so its cost
grows with the catalog, not with round trips: one statement reads the registry, the roles, storage
and sessions; one more records the measurements and reads the platform's usage back. Identifiers go
through ``sql.Identifier``; ``ALTER ROLE`` accepts no bind parameters, so its numbers are
``sql.Literal`` of Python ints (never text from a spec).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from tenancy_operator.db import logins
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


@dataclass(frozen=True)
class Measured:
    """Usage of one identifier as the catalog shows it now."""

    storage: int
    """Bytes of the schema's relations (0: no schema, or an empty one)."""
    connections: int
    """Open sessions of the role on the whole server."""


async def observe(
    conn: Conn, control: str, idents: list[str]
) -> tuple[dict[str, RoleQuotaState], dict[str, Measured]]:
    """Registry row and role attributes of every identifier and, for those that have both a live
    registry row and a role (only they can be enforced), storage and sessions: one statement.

    Storage is ``sum(pg_total_relation_size)`` over the schema's tables, partitioned tables,
    materialized views and sequences (with their indexes and TOAST); sessions are counted in
    ``pg_stat_activity`` (the whole server, like CONNECTION LIMIT). Identifiers without a row or
    a role are not measured at all: a tenant being provisioned costs no catalog scan.

    A tenant's lock must not stop the measurement of every tenant: sizing a relation opens it,
    which waits behind an ACCESS EXCLUSIVE lock. A relation locked so is sized from the catalog
    (``relpages`` of it, its TOAST and indexes: as of its last VACUUM or ANALYZE), and the whole
    statement waits at most ``LOCK_WAIT`` for a lock taken between the two; past it, everything is
    sized from the catalog this once."""
    try:
        async with conn.transaction():
            await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_WAIT)))
            return await _observe(conn, control, idents, exact=True)
    except psycopg.errors.LockNotAvailable:
        return await _observe(conn, control, idents, exact=False)


LOCK_WAIT = "1s"
_ESTIMATE = """(c.relpages::bigint + coalesce(toast.relpages, 0)
                 + coalesce((SELECT sum(i.relpages) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                              WHERE x.indrelid = c.oid), 0))
               * current_setting('block_size')::bigint"""


async def _observe(
    conn: Conn, control: str, idents: list[str], *, exact: bool
) -> tuple[dict[str, RoleQuotaState], dict[str, Measured]]:
    cur = await conn.execute(
        sql.SQL(
            """
            WITH subject AS (
                SELECT want.name AS ident, t.id::text AS tenant_id, t.namespace, t.name, t.quotas,
                       r.oid IS NOT NULL AS role_exists, coalesce(r.rolconnlimit, -1) AS connlimit,
                       r.rolconfig AS rolconfig,
                       t.id IS NOT NULL AND r.oid IS NOT NULL AS measure
                  FROM unnest(%(idents)s::text[]) AS want(name)
                  LEFT JOIN {tenants} t ON t.schema_name = want.name AND t.state <> ALL(%(gone)s::text[])
                  LEFT JOIN pg_roles r ON r.rolname = want.name
            ), locked AS (
                SELECT DISTINCT l.relation AS oid FROM pg_locks l
                 WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND l.granted
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            ), storage AS (
                SELECT n.nspname AS ident,
                       coalesce(sum(CASE WHEN %(exact)s AND c.oid NOT IN (SELECT oid FROM locked)
                                         THEN pg_total_relation_size(c.oid)
                                         ELSE {estimate} END), 0)::bigint AS bytes
                  FROM pg_namespace n
                  LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'm', 'p', 'S')
                  LEFT JOIN pg_class toast ON toast.oid = c.reltoastrelid
                 WHERE n.nspname IN (SELECT ident FROM subject WHERE measure)
                 GROUP BY n.nspname
            ), sessions AS (
                SELECT m.ident, count(*)::int AS n
                  FROM pg_stat_activity a
                  JOIN unnest(%(logins)s::text[], %(owners)s::text[]) AS m(login, ident) ON m.login = a.usename
                 WHERE m.ident IN (SELECT ident FROM subject WHERE measure)
                 GROUP BY m.ident
            )
            SELECT s.*, coalesce(st.bytes, 0) AS bytes, coalesce(se.n, 0) AS sessions
              FROM subject s
              LEFT JOIN storage st ON st.ident = s.ident
              LEFT JOIN sessions se ON se.ident = s.ident
            """
        ).format(tenants=_t(control, "tenants"), estimate=sql.SQL(_ESTIMATE)),
        {"idents": idents, "gone": ["dropped", "archived"], "exact": exact,
         # Sessions of the tenant: of its owner and of each of its login roles.
         "logins": [r for i in idents for r in (i, *logins.login_roles(i))],
         "owners": [i for i in idents for _ in range(1 + len(logins.login_roles(i)))]},
    )
    states: dict[str, RoleQuotaState] = {}
    measured: dict[str, Measured] = {}
    for row in await cur.fetchall():
        ident = str(row["ident"])
        config: list[str] | None = row["rolconfig"]  # type: ignore[assignment]
        states[ident] = RoleQuotaState(
            tenant_id=row["tenant_id"],  # type: ignore[arg-type]
            row_namespace=row["namespace"],  # type: ignore[arg-type]
            row_name=row["name"],  # type: ignore[arg-type]
            published=row["quotas"],  # type: ignore[arg-type]
            role_exists=bool(row["role_exists"]),
            connection_limit=int(row["connlimit"]),  # type: ignore[call-overload]
            statement_timeout=role_setting(config, "statement_timeout"),
            read_only=is_on(role_setting(config, "default_transaction_read_only")),
        )
        if row["measure"]:
            measured[ident] = Measured(storage=int(row["bytes"]),  # type: ignore[call-overload]
                                       connections=int(row["sessions"]))  # type: ignore[call-overload]
    return states, measured


async def record_usage(
    conn: Conn, control: str, rows: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, Decimal]]:
    """Upsert the operator's measurements (tenant id -> resource -> amount) and read back the
    usage the platform reported for the same tenants (every other resource), in one statement.
    Returns tenant id -> resource -> amount of the platform's rows."""
    ids: list[str] = []
    resources: list[str] = []
    amounts: list[int] = []
    for tenant_id, usage in rows.items():
        for resource, amount in usage.items():
            ids.append(tenant_id)
            resources.append(resource)
            amounts.append(amount)
    if not rows:
        return {}
    # The SELECT sees the table as it was before the upsert, which is what it asks for: only rows
    # the upsert does not touch (resources the operator does not measure).
    cur = await conn.execute(
        sql.SQL(
            """
            WITH recorded AS (
                INSERT INTO {usage} AS u (tenant_id, resource, used, measured_at, source)
                SELECT i, r, a, now(), %(source)s
                  FROM unnest(%(ids)s::uuid[], %(resources)s::text[], %(amounts)s::numeric[]) AS x(i, r, a)
                ON CONFLICT (tenant_id, resource) DO UPDATE
                   SET used = EXCLUDED.used, measured_at = EXCLUDED.measured_at, source = EXCLUDED.source
            )
            SELECT tenant_id::text AS id, resource, used FROM {usage}
             WHERE tenant_id = ANY(%(tenants)s::uuid[]) AND NOT (resource = ANY(%(measured)s::text[]))
            """
        ).format(usage=_t(control, "tenant_quota_usage")),
        {"source": OPERATOR_SOURCE, "ids": ids, "resources": resources, "amounts": amounts,
         "tenants": list(rows), "measured": list(MEASURED)},
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
