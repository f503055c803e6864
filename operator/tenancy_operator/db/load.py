"""SQL for tenant load: PostgreSQL's own statistics, summed per tenant role, for a whole target at once.

One statement per target and pass, whatever the number of tenants: ``pg_stat_statements`` summed by
``userid`` (the tenant role) when the extension is installed in the database and its library is
loaded, and ``pg_stat_activity`` grouped by role. Neither reads a tenant object nor takes a lock a
tenant can hold (both are views over shared memory), so a tenant cannot block or slow the read.
The statements' text is never read (``pg_stat_statements(false)``).

What the operator's login may see decides the detail:

* ``pg_stat_statements`` gives the counters of every role to any role that may call it; without it
  (not installed, or its library not in ``shared_preload_libraries``) load is sampled from active
  sessions instead (``LoadCapabilities.statements`` is False and status says so).
* ``pg_stat_activity`` shows ``state`` and ``wait_event`` of other roles' sessions only to members
  of ``pg_read_all_stats``: without it sessions are still counted, but none is seen active or
  waiting (``LoadCapabilities.read_all_stats`` is False and status says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from tenancy_operator.db.logins import login_roles
from tenancy_operator.db.targets import Conn

MAX_WAIT_EVENTS = 8


@dataclass(frozen=True)
class LoadCapabilities:
    statements: bool
    """pg_stat_statements can be read (installed in this database, library loaded)."""
    schema: str | None
    """Schema the extension is installed in."""
    read_all_stats: bool
    """The login has the privileges of pg_read_all_stats (other roles' session states)."""

    def detail(self) -> str | None:
        """Why the detail is reduced, in one sentence; None at full detail."""
        parts = []
        if not self.statements:
            parts.append("pg_stat_statements is not available on this target: load is sampled from active "
                         "sessions (no calls, rows or blocks)")
        if not self.read_all_stats:
            parts.append("the operator's login lacks pg_read_all_stats: active and waiting sessions of "
                         "tenants are not visible")
        return "; ".join(parts) or None


@dataclass(frozen=True)
class RoleLoad:
    """Cumulative statement counters (since the statistics were last reset) and sessions now."""

    exec_seconds: float = 0.0
    calls: int = 0
    rows: int = 0
    shared_blocks: int = 0
    temp_blocks: int = 0
    active: int = 0
    waiting: int = 0
    wait_events: tuple[str, ...] = field(default_factory=tuple)


async def capabilities(conn: Conn) -> LoadCapabilities:
    """What this target lets the operator read (one small catalog query). Whether the library is
    loaded is not asked (shared_preload_libraries needs pg_read_all_settings): reading the
    extension's function fails then, and ``read``'s caller falls back to sessions."""
    cur = await conn.execute(
        """
        SELECT (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                 WHERE e.extname = 'pg_stat_statements') AS schema,
               pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats
        """
    )
    row = await cur.fetchone()
    assert row is not None
    schema = row["schema"]
    return LoadCapabilities(
        statements=bool(schema),
        schema=str(schema) if schema else None,
        read_all_stats=bool(row["read_all_stats"]),
    )


async def read(conn: Conn, caps: LoadCapabilities, idents: Sequence[str]) -> dict[str, RoleLoad]:
    """Load of every tenant in ``idents`` (owner role names), summed over the owner and all its
    login roles (the application's logins run the queries): one statement. Tenants none of whose
    roles exist are left out. Raises psycopg.errors.ObjectNotInPrerequisiteState if
    pg_stat_statements stopped being loaded."""
    names: list[str] = []
    owners: list[str] = []
    for ident in idents:
        for role in (ident, *login_roles(ident)):
            names.append(role)
            owners.append(ident)
    statements = sql.SQL("""
        SELECT r.rolname AS owner, sum(s.total_exec_time) / 1000.0 AS exec_seconds, sum(s.calls)::bigint AS calls,
               sum(s.rows)::bigint AS rows,
               sum(s.shared_blks_hit + s.shared_blks_read + s.shared_blks_dirtied + s.shared_blks_written)::bigint
                   AS shared_blocks,
               sum(s.temp_blks_read + s.temp_blks_written)::bigint AS temp_blocks
          FROM {schema}.pg_stat_statements(false) s
          JOIN roles r ON r.oid = s.userid
         WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         GROUP BY r.rolname
    """).format(schema=sql.Identifier(caps.schema)) if caps.statements and caps.schema else sql.SQL("""
        SELECT NULL::name AS owner, 0::float8 AS exec_seconds, 0::bigint AS calls, 0::bigint AS rows,
               0::bigint AS shared_blocks, 0::bigint AS temp_blocks WHERE false
    """)
    cur = await conn.execute(
        sql.SQL("""
            WITH roles AS (
                SELECT r.oid, want.owner::name AS rolname
                  FROM unnest(%(names)s::text[], %(owners)s::text[]) AS want(name, owner)
                  JOIN pg_roles r ON r.rolname = want.name
            ), stmts AS ({statements}), sessions AS (
                SELECT r.rolname AS owner,
                       count(*) FILTER (WHERE a.state = 'active')::int AS active,
                       count(*) FILTER (WHERE a.state = 'active' AND a.wait_event IS NOT NULL
                                          AND a.wait_event_type <> 'Activity')::int AS waiting,
                       (array_agg(DISTINCT a.wait_event_type || ':' || a.wait_event)
                          FILTER (WHERE a.state = 'active' AND a.wait_event IS NOT NULL
                                    AND a.wait_event_type <> 'Activity'))[1:{max_events}] AS wait_events
                  FROM pg_stat_activity a
                  JOIN roles r ON r.oid = a.usesysid
                 GROUP BY r.rolname
            )
            SELECT r.rolname AS ident, coalesce(s.exec_seconds, 0)::float8 AS exec_seconds,
                   coalesce(s.calls, 0) AS calls, coalesce(s.rows, 0) AS rows,
                   coalesce(s.shared_blocks, 0) AS shared_blocks, coalesce(s.temp_blocks, 0) AS temp_blocks,
                   coalesce(a.active, 0) AS active, coalesce(a.waiting, 0) AS waiting,
                   coalesce(a.wait_events, '{{}}') AS wait_events
              FROM (SELECT DISTINCT rolname FROM roles) r
              LEFT JOIN stmts s ON s.owner = r.rolname
              LEFT JOIN sessions a ON a.owner = r.rolname
        """).format(statements=statements, max_events=sql.Literal(MAX_WAIT_EVENTS)),
        {"names": names, "owners": owners},
    )
    out: dict[str, RoleLoad] = {}
    for row in await cur.fetchall():
        out[str(row["ident"])] = RoleLoad(
            exec_seconds=float(row["exec_seconds"]),  # type: ignore[arg-type]
            calls=int(row["calls"]),  # type: ignore[call-overload]
            rows=int(row["rows"]),  # type: ignore[call-overload]
            shared_blocks=int(row["shared_blocks"]),  # type: ignore[call-overload]
            temp_blocks=int(row["temp_blocks"]),  # type: ignore[call-overload]
            active=int(row["active"]),  # type: ignore[call-overload]
            waiting=int(row["waiting"]),  # type: ignore[call-overload]
            wait_events=tuple(str(e) for e in list(row["wait_events"] or ())),  # type: ignore[call-overload]
        )
    return out


STATEMENTS_UNAVAILABLE = (psycopg.errors.ObjectNotInPrerequisiteState, psycopg.errors.UndefinedFunction,
                          psycopg.errors.InvalidSchemaName,
                          psycopg.errors.InsufficientPrivilege)
"""Errors that mean pg_stat_statements cannot be read after all: fall back to sessions."""
