"""SQL for a tenant's owner role and schema, its sessions, the temporary logins that act for it
(delegates) and the tenant lock. Its login roles are in db/logins.py, its registry row in
db/registry.py, statements on roles of any kind (markers, passwords, the operator's transient
membership, ``run_batch``) in db/role_sql.py.

Identifiers go through ``sql.Identifier``; values are parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from tenancy_operator.db import logins, role_sql
from tenancy_operator.db.targets import Conn

# pg_advisory_lock(classid, objid): a constant class for "tenancy-operator tenant" (db/flags.py
# has the feature flags' own).
TENANT_LOCK_CLASS = 0x7E4A12


class TenantBusy(Exception):
    """Another session (another replica, during a hand-over of its slices) works on this tenant."""


@contextlib.asynccontextmanager
async def tenant_lock(conn: Conn, ident: str) -> AsyncIterator[None]:
    """This tenant's advisory lock on the target for the block, a second line behind the slice
    Leases of sharded replicas: a replica still finishing a reconcile of a slice that just changed
    hands, and the new holder, never interleave their statements on one tenant. Waiting is bounded
    by the session's lock_timeout (TenantBusy then). Session-level, so the block may run its own
    transactions; released at the end, or, if the session cannot say so, by closing it (the pool
    replaces a closed connection).

    A task cancelled while it waits for the lock may be cancelled just as the server granted it
    (the grant is read after psycopg's cancel request came too late), and one cancelled again
    while it unlocks cannot tell whether it unlocked: either way the session may hold the lock, and a pool
    would hand it on with the lock to the next reconcile, where every other session waits for the
    tenant until lock_timeout. So the session is closed then (the server releases its locks)."""
    try:
        await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [TENANT_LOCK_CLASS, ident])
    except psycopg.errors.LockNotAvailable as exc:
        raise TenantBusy(ident) from exc
    except BaseException:
        await conn.close()
        raise
    try:
        yield
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [TENANT_LOCK_CLASS, ident])
        except BaseException as exc:
            await conn.close()
            if not isinstance(exc, psycopg.Error):
                raise  # cancelled: the task ends; a failed unlock leaves the block's own outcome


@dataclass(frozen=True)
class Observed:
    """What exists in Postgres for one tenant role/schema name."""

    role_exists: bool
    can_login: bool
    search_path: str | None
    schema_exists: bool
    schema_owned: bool
    schema_privileges: bool
    operator_member: bool
    """A standing membership of the operator in the role (earlier versions kept one): revoked."""
    owner_marker: str | None = None
    """The role's comment: the operator marks each role it creates with its owner (``owner_marker``)."""
    idle_timeout: str | None = None
    """The role's idle_in_transaction_session_timeout setting, if any."""


OBSERVE = sql.SQL(
    """
    SELECT want.name AS name,
           r.oid IS NOT NULL AS role_exists,
           coalesce(r.rolcanlogin, false) AS can_login,
           (SELECT substr(c, length('search_path=') + 1) FROM unnest(r.rolconfig) AS c
             WHERE c LIKE 'search_path=%%' LIMIT 1) AS search_path,
           n.oid IS NOT NULL AS schema_exists,
           coalesce(n.nspowner = r.oid, false) AS schema_owned,
           CASE WHEN n.oid IS NOT NULL AND r.oid IS NOT NULL
                THEN has_schema_privilege(r.oid, n.oid, 'USAGE')
                     AND has_schema_privilege(r.oid, n.oid, 'CREATE')
                ELSE false END AS schema_privileges,
           CASE WHEN r.oid IS NOT NULL THEN pg_has_role(current_user, r.oid, 'USAGE')
                ELSE false END AS operator_member,
           shobj_description(r.oid, 'pg_authid') AS owner_marker,
           (SELECT substr(c, length('idle_in_transaction_session_timeout=') + 1) FROM unnest(r.rolconfig) AS c
             WHERE c LIKE 'idle_in_transaction_session_timeout=%%' LIMIT 1) AS idle_timeout
      FROM unnest(%s::text[]) AS want(name)
      LEFT JOIN pg_roles r ON r.rolname = want.name
      LEFT JOIN pg_namespace n ON n.nspname = want.name
    """
)


async def observe(conn: Conn, names: list[str]) -> dict[str, Observed]:
    """One catalog query for any number of tenants: the sweep's bulk check and a single reconcile."""
    cur = await conn.execute(OBSERVE, [names])
    out: dict[str, Observed] = {}
    for row in await cur.fetchall():
        name = str(row.pop("name"))
        out[name] = Observed(**row)  # type: ignore[arg-type]
    return out


MARKER_PREFIX = "tenancy-operator tenant "


def owner_marker(database: str, namespace: str, name: str) -> str:
    """What the operator writes as the comment of a tenant role it creates. Roles belong to the
    whole server, not to one database: two targets on one server share them, and the marker
    (which a tenant cannot change: COMMENT ON ROLE takes CREATEROLE) says whose a role is."""
    return f"{MARKER_PREFIX}{namespace}/{name} in database {database}"


def create_role(role: str, marker: str) -> list[sql.Composed]:
    return [sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)), role_sql.mark_role(role, marker)]


def create_schema(schema: str, role: str) -> sql.Composed:
    return sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
        sql.Identifier(schema), sql.Identifier(role)
    )


def set_schema_owner(schema: str, role: str) -> sql.Composed:
    return sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), sql.Identifier(role))


def grant_schema(schema: str, role: str) -> sql.Composed:
    return sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(role))


async def terminate_backend(conn: Conn, role: str, pid: int) -> None:
    """End one session of ``role`` (a migration past its deadline), whatever it is doing."""
    async with role_sql.acting_for(conn, role):
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND usename = %s",
                           [pid, role])


@contextlib.asynccontextmanager
async def delegate_login(conn: Conn, role: str, iterations: int) -> AsyncIterator[tuple[str, str]]:
    """A temporary login that holds the tenant role's rights and nothing else: (user, password).

    Restoring or dumping a tenant's schema touches objects the tenant defined (a function in a
    default, a check, a view), and such code runs with the rights of the session's login user;
    ``SET ROLE`` is no bound, since tenant code can ``RESET ROLE``. So these tools log in as a role
    whose only privilege is membership of the tenant role (the tenant's own login may be disabled
    at that moment, and its password is the application's). Dropped when the block ends; the
    sweep drops any a crash left behind (``DELEGATE_PREFIX``)."""
    user, password = await create_delegate(conn, role, iterations)
    try:
        yield user, password
    finally:
        await drop_delegate_now(conn, user)


async def create_delegate(conn: Conn, role: str, iterations: int) -> tuple[str, str]:
    """See ``delegate_login``; the caller drops it with ``drop_delegate_now``."""
    user = f"{DELEGATE_PREFIX}{secrets.token_hex(8)}"
    _LIVE_DELEGATES.add(user)
    password = role_sql.generate_password()
    verifier = await asyncio.to_thread(role_sql.scram_sha256_verifier, password, iterations)
    ident = sql.Identifier(user)
    await role_sql.run_batch(conn, [
        sql.SQL("CREATE ROLE {} LOGIN INHERIT CONNECTION LIMIT 4 PASSWORD {}").format(ident, sql.Literal(verifier)),
        role_sql.mark_role(user, f"tenancy-operator temporary login for {role}"),
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), ident),
    ])
    return user, password


async def drop_delegate_now(conn: Conn, user: str) -> None:
    try:
        await drop_delegate(conn, user)
    finally:
        _LIVE_DELEGATES.discard(user)


DELEGATE_PREFIX = "tenancy_delegate_"
_LIVE_DELEGATES: set[str] = set()


async def drop_delegate(conn: Conn, user: str) -> None:
    async with role_sql.acting_for(conn, user):
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [user])
    ident = sql.Identifier(user)
    await role_sql.run_batch(conn, [role_sql.grant_role_to_operator(user), sql.SQL("DROP OWNED BY {}").format(ident),
                                    sql.SQL("DROP ROLE {}").format(ident)])


async def stale_delegates(conn: Conn) -> list[str]:
    """Temporary logins that no block holds any more (a crash in the middle of a dump): they
    have no session and were created by this operator (their comment says so)."""
    cur = await conn.execute(
        "SELECT r.rolname FROM pg_roles r WHERE starts_with(r.rolname, %s)"
        " AND shobj_description(r.oid, 'pg_authid') LIKE 'tenancy-operator temporary login for %%'"
        " AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.usename = r.rolname)",
        [DELEGATE_PREFIX],
    )
    return [str(r["rolname"]) for r in await cur.fetchall() if r["rolname"] not in _LIVE_DELEGATES]


async def terminate_sessions(conn: Conn, role: str) -> int:
    async with role_sql.acting_for(conn, role):  # signalling a role's backends takes its privileges
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
            " WHERE usename = %s AND pid <> pg_backend_pid()",
            [role],
        )
        row = await cur.fetchone()
    return int(row["n"]) if row else 0  # type: ignore[call-overload]


async def drop_tenant_objects(conn: Conn, schema: str, role: str, *, role_too: bool = True) -> None:
    """Drop the schema, everything the role owns, and the role (with ``role_too``: the role is the
    operator's for this tenant). Safe to repeat."""
    drop_schema = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
    cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
    if not role_too or not await cur.fetchone():
        await conn.execute(drop_schema)
        return
    # One transaction; dropping the roles ends the memberships granted for them. The login
    # roles go with the owner (their grants first, with the owner's default privileges for them).
    roles = [role, *await logins.existing_logins(conn, role)]
    idents = sql.SQL(", ").join(sql.Identifier(r) for r in roles)
    await role_sql.run_batch(conn, [
        *(role_sql.grant_role_to_operator(r) for r in roles), drop_schema,
        sql.SQL("DROP OWNED BY {}").format(idents), sql.SQL("DROP ROLE {}").format(idents),
    ])


async def terminate_all_sessions(conn: Conn, role: str) -> int:
    """End the sessions of the owner and of every login role of the tenant."""
    n = 0
    for r in [role, *await logins.existing_logins(conn, role)]:
        n += await terminate_sessions(conn, r)
    return n
