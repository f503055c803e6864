"""SQL for a tenant's login roles.

A tenant has an owner role (``tenant_<name>``: owns the schema and every object in it, NOLOGIN;
migrations run as it; db/tenants.py) and login roles with data privileges only: two application
logins that alternate at each rotation (slots ``a`` and ``b``) and an optional read-only login
(``r``). Here: their names, what the catalog shows of them, which may log in, creating them, their
grants and limits. Which slot the Secret names is the registry's (db/registry.py).

Identifiers go through ``sql.Identifier``; values are parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from tenancy_operator.db import role_sql
from tenancy_operator.db.targets import Conn

LOGIN_PREFIX = "tl_"
SLOTS = ("a", "b")
READ_ONLY_SLOT = "r"
APP_ROLES_SETTING = "tenancy.app_roles"
"""Set in a migration's session: the application logins (quoted identifiers, comma-separated),
for ``GRANT EXECUTE ON FUNCTION ... TO`` (functions are callable by the application only when a
migration grants it)."""


def login_role(ident: str, slot: str) -> str:
    """The login role of ``slot`` for the tenant whose owner role is ``ident``:
    ``tl_<name, at most 47 bytes>_<slot>_<8 hex digits of sha256(ident)>``, at most 61 bytes.

    The prefix differs from ``tenant_`` (owner roles) and ``tenancy_delegate_`` (temporary logins),
    so no login role can be another tenant's owner role; the hash keeps two long names that share
    their first 47 characters apart."""
    base = ident.removeprefix("tenant_")[:47]
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    return f"{LOGIN_PREFIX}{base}_{slot}_{digest}"


def login_roles(ident: str, *, read_only: bool = True) -> list[str]:
    return [login_role(ident, s) for s in (*SLOTS, *((READ_ONLY_SLOT,) if read_only else ()))]


def app_roles_setting(ident: str) -> str:
    return ", ".join(sql.Identifier(login_role(ident, s)).as_string(None) for s in SLOTS)


def login_marker(marker: str, slot: str) -> str:
    return f"{marker} login {slot}"


@dataclass(frozen=True)
class LoginObserved:
    exists: bool
    can_login: bool
    marker: str | None
    search_path: str | None
    grants_ok: bool


OBSERVE_LOGINS = sql.SQL(
    """
    SELECT want.name AS name, want.ro AS ro,
           r.oid IS NOT NULL AS exists,
           coalesce(r.rolcanlogin, false) AS can_login,
           shobj_description(r.oid, 'pg_authid') AS marker,
           (SELECT substr(c, length('search_path=') + 1) FROM unnest(r.rolconfig) AS c
             WHERE c LIKE 'search_path=%%' LIMIT 1) AS search_path,
           CASE WHEN r.oid IS NULL OR n.oid IS NULL THEN false ELSE
             has_schema_privilege(r.oid, n.oid, 'USAGE')
             AND NOT has_schema_privilege(r.oid, n.oid, 'CREATE')
             AND NOT EXISTS (
               SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                  AND NOT (has_table_privilege(r.oid, c.oid, 'SELECT')
                           AND (want.ro OR c.relkind NOT IN ('r', 'p')
                                OR (has_table_privilege(r.oid, c.oid, 'INSERT')
                                    AND has_table_privilege(r.oid, c.oid, 'UPDATE')
                                    AND has_table_privilege(r.oid, c.oid, 'DELETE')))))
             AND NOT EXISTS (
               SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind = 'S'
                  AND NOT (has_sequence_privilege(r.oid, c.oid, 'SELECT')
                           AND (want.ro OR has_sequence_privilege(r.oid, c.oid, 'USAGE'))))
             AND (SELECT count(DISTINCT (d.defaclobjtype, x.privilege_type))
                    FROM pg_default_acl d CROSS JOIN LATERAL aclexplode(d.defaclacl) x
                   WHERE d.defaclrole = o.oid AND d.defaclnamespace = n.oid AND x.grantee = r.oid)
                 = CASE WHEN want.ro THEN 2 ELSE 7 END
           END AS grants_ok
      FROM unnest(%s::text[], %s::bool[], %s::text[]) AS want(name, ro, owner)
      LEFT JOIN pg_roles r ON r.rolname = want.name
      LEFT JOIN pg_namespace n ON n.nspname = want.owner
      LEFT JOIN pg_roles o ON o.rolname = want.owner
    """
)


async def observe_logins(conn: Conn, ident: str) -> dict[str, LoginObserved]:
    """The login roles of one tenant (slot -> what the catalog shows), grants included."""
    return (await observe_logins_of(conn, [ident]))[ident]


async def observe_logins_of(conn: Conn, idents: Sequence[str]) -> dict[str, dict[str, LoginObserved]]:
    """``observe_logins`` for any number of tenants in one catalog query (the sweep)."""
    slots = [*SLOTS, READ_ONLY_SLOT]
    want = [(i, s, login_role(i, s)) for i in idents for s in slots]
    cur = await conn.execute(OBSERVE_LOGINS, [[n for _, _, n in want], [s == READ_ONLY_SLOT for _, s, _ in want],
                                              [i for i, _, _ in want]])
    by_name = {str(r["name"]): r for r in await cur.fetchall()}
    out: dict[str, dict[str, LoginObserved]] = {i: {} for i in idents}
    for i, s, n in want:
        r = by_name[n]
        out[i][s] = LoginObserved(bool(r["exists"]), bool(r["can_login"]), r["marker"],  # type: ignore[arg-type]
                                  r["search_path"], bool(r["grants_ok"]))  # type: ignore[arg-type]
    return out


def wanted_logins(ident: str, *, slot: str | None, retiring: str | None, suspended: bool,
                  read_only: bool) -> dict[str, bool]:
    """Which of a tenant's roles may log in: the login the Secret names, the previous one during
    its grace period and the read-only login, unless the tenant is suspended; never the owner
    (once converted: ``slot`` set) nor anything else."""
    want = {ident: False, **{login_role(ident, s): False for s in (*SLOTS, READ_ONLY_SLOT)}}
    if not suspended:
        if slot:
            want[login_role(ident, slot)] = True
        else:
            want[ident] = True  # not converted yet: the owner is still the application's login
        if retiring:
            want[retiring] = True
        if read_only:
            want[login_role(ident, READ_ONLY_SLOT)] = True
    return want


def create_login(role: str, marker: str, schema: str, idle_timeout: str) -> list[sql.Composed]:
    return [sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(sql.Identifier(role)), role_sql.mark_role(role, marker),
            role_sql.set_search_path(role, schema), role_sql.set_idle_timeout(role, idle_timeout)]


def grant_statements(owner: str, schema: str, role: str, *, read_only: bool) -> list[sql.Composable]:
    """Data privileges of a login role on everything in the schema now, and (default privileges
    for the owner) on what later migrations create. Run with membership in the owner."""
    s, r, o = sql.Identifier(schema), sql.Identifier(role), sql.Identifier(owner)
    tables = sql.SQL("SELECT" if read_only else "SELECT, INSERT, UPDATE, DELETE")
    seqs = sql.SQL("SELECT" if read_only else "USAGE, SELECT, UPDATE")
    return [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
        sql.SQL("REVOKE CREATE ON SCHEMA {} FROM {}").format(s, r),
        sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(tables, s, r),
        sql.SQL("GRANT {} ON ALL SEQUENCES IN SCHEMA {} TO {}").format(seqs, s, r),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON TABLES TO {}").format(o, s, tables, r),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON SEQUENCES TO {}").format(o, s, seqs, r),
    ]


def private_functions(owner: str) -> sql.Composed:
    """Functions the owner creates are not callable by PUBLIC (so not by the logins) until a
    migration grants EXECUTE to the application logins."""
    return sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC").format(
        sql.Identifier(owner))


async def copy_limits(conn: Conn, owner: str, roles: Sequence[str]) -> None:
    """The owner's quota attributes (connection limit, statement timeout, read-only) on ``roles``."""
    cur = await conn.execute("SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = %s", [owner])
    row = await cur.fetchone()
    if row is None:
        return
    config: list[str] = list(row["rolconfig"] or [])  # type: ignore[call-overload]
    settings = {c.split("=", 1)[0]: c.split("=", 1)[1] for c in config if "=" in c}
    todo: list[sql.Composable] = []
    for role in roles:
        ident = sql.Identifier(role)
        todo.append(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(ident, sql.Literal(int(row["rolconnlimit"]))))  # type: ignore[call-overload]
        for name in ("statement_timeout", "default_transaction_read_only"):
            if name in settings:
                todo.append(sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(name),
                                                                       sql.Literal(settings[name])))
            else:
                todo.append(sql.SQL("ALTER ROLE {} RESET {}").format(ident, sql.Identifier(name)))
    await role_sql.run_batch(conn, todo)


async def existing_logins(conn: Conn, ident: str) -> list[str]:
    cur = await conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
                             [login_roles(ident)])
    return [str(r["rolname"]) for r in await cur.fetchall()]
