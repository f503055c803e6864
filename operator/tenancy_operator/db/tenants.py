"""SQL for tenants: registry, roles, schemas, sessions, passwords. Nothing else builds tenant SQL.

Identifiers go through ``sql.Identifier``; values are parameters. ``ALTER ROLE ... PASSWORD``
cannot take a bind parameter, so it gets a client-side SCRAM verifier as ``sql.Literal``:
the clear-text password never reaches the server, its logs or ``pg_stat_activity``.

The operator holds no standing membership in tenant roles: it is granted one for the statements
that need it (a schema owned by the role, the role's sessions, its tables, dropping it) and revoked
in the same transaction (``membership_statements``, ``acting_for``). Standing membership in N roles
would make every new tenant cost O(N²): each membership check walks the whole list of the
operator's memberships, and every CREATE/ALTER ROLE resets the cache of it (bench/membership.py
measures the cost). It is also less privilege held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from tenancy_operator.db.targets import Conn

LIVE_STATES = ("provisioning", "active", "suspended", "deleted")
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
    replaces a closed connection)."""
    try:
        await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [TENANT_LOCK_CLASS, ident])
    except psycopg.errors.LockNotAvailable as exc:
        raise TenantBusy(ident) from exc
    try:
        yield
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [TENANT_LOCK_CLASS, ident])
        except psycopg.Error:
            await conn.close()


@dataclass(frozen=True)
class RegistryRow:
    id: str
    namespace: str
    name: str
    schema_name: str
    role_name: str
    state: str
    provisioned_at: Any
    schema_recreated_at: Any
    schema_recreated_ack: str | None
    k8s_uid: str | None = None
    secret_uid: str | None = None
    """metadata.uid of the credentials Secret the operator created (a Secret of another uid is not ours)."""
    secret_claim: str | None = None
    """Random token written here before the Secret is created, and into its annotations."""
    login_slot: str | None = None
    """The login role the Secret names (``a`` or ``b``); None: not converted yet (the Secret names the owner)."""
    retiring_role: str | None = None
    """The previous login, retired (NOLOGIN, sessions ended) at ``retire_at``."""
    retire_at: Any = None
    rotated_at: Any = None
    ro_secret_uid: str | None = None
    ro_secret_claim: str | None = None


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


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for SCRAM-SHA-256 (RFC 5802/7677), computed client-side."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


_CRED_COLUMNS = " login_slot, retiring_role, retire_at, rotated_at, ro_secret_uid, ro_secret_claim"


def _t(control_schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(control_schema), sql.Identifier(table))


async def find_live_row(conn: Conn, control: str, schema_name: str) -> RegistryRow | None:
    """The registry row whose data lives in ``schema_name`` (at most one, by a unique index)."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT id::text, namespace, name, schema_name, role_name, state, provisioned_at,"
            " schema_recreated_at, schema_recreated_ack, k8s_uid, secret_uid, secret_claim,"
            + _CRED_COLUMNS + " FROM {}"
            " WHERE schema_name = %s AND state <> ALL(%s)"
        ).format(_t(control, "tenants")),
        [schema_name, ["dropped", "archived"]],
    )
    row = await cur.fetchone()
    return RegistryRow(**row) if row else None  # type: ignore[arg-type]


async def insert_row(
    conn: Conn, control: str, *, namespace: str, name: str, uid: str, ident: str, tier: str,
    display_name: str | None, secret_claim: str | None = None,
) -> RegistryRow:
    cur = await conn.execute(
        sql.SQL(
            "INSERT INTO {} (namespace, name, k8s_uid, schema_name, role_name, tier, display_name, state,"
            " secret_claim) VALUES (%s, %s, %s, %s, %s, %s, %s, 'provisioning', %s)"
            " RETURNING id::text, namespace, name, schema_name, role_name, state, provisioned_at,"
            " schema_recreated_at, schema_recreated_ack, k8s_uid, secret_uid, secret_claim," + _CRED_COLUMNS
        ).format(_t(control, "tenants")),
        [namespace, name, uid, ident, ident, tier, display_name, secret_claim],
    )
    row = await cur.fetchone()
    assert row is not None
    return RegistryRow(**row)  # type: ignore[arg-type]


async def update_row(
    conn: Conn, control: str, tenant_id: str, *, uid: str, tier: str, display_name: str | None,
    state: str, provisioned: bool, schema_recreated: bool = False,
) -> None:
    """Write the declared facts; a no-op (no row version) when nothing differs."""
    await conn.execute(
        sql.SQL(
            "UPDATE {} SET k8s_uid = %(uid)s, tier = %(tier)s, display_name = %(display)s,"
            " state = %(state)s, deleted_at = NULL, updated_at = now(),"
            " provisioned_at = CASE WHEN %(provisioned)s THEN coalesce(provisioned_at, now()) END,"
            " schema_recreated_at = CASE WHEN %(recreated)s THEN now() ELSE schema_recreated_at END"
            " WHERE id = %(id)s AND (k8s_uid IS DISTINCT FROM %(uid)s OR tier IS DISTINCT FROM %(tier)s"
            "  OR display_name IS DISTINCT FROM %(display)s OR state IS DISTINCT FROM %(state)s"
            "  OR deleted_at IS NOT NULL OR (%(provisioned)s AND provisioned_at IS NULL) OR %(recreated)s)"
        ).format(_t(control, "tenants")),
        {
            "id": tenant_id, "uid": uid, "tier": tier, "display": display_name, "state": state,
            "provisioned": provisioned, "recreated": schema_recreated,
        },
    )


async def set_secret_uid(conn: Conn, control: str, tenant_id: str, uid: str) -> None:
    """Record the Secret the operator created; its claim has served and is cleared."""
    await conn.execute(
        sql.SQL("UPDATE {} SET secret_uid = %s, secret_claim = NULL"
                " WHERE id = %s AND (secret_uid IS DISTINCT FROM %s OR secret_claim IS NOT NULL)").format(
            _t(control, "tenants")),
        [uid, tenant_id, uid],
    )


async def set_secret_claim(conn: Conn, control: str, tenant_id: str, claim: str) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET secret_claim = %s WHERE id = %s").format(_t(control, "tenants")),
                       [claim, tenant_id])


async def acknowledge_schema_recreated(conn: Conn, control: str, tenant_id: str, ack: str) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET schema_recreated_at = NULL, schema_recreated_ack = %s WHERE id = %s").format(
            _t(control, "tenants")
        ),
        [ack, tenant_id],
    )


async def mark_deleted(conn: Conn, control: str, tenant_id: str, state: str) -> None:
    await conn.execute(
        sql.SQL(
            "UPDATE {} SET state = %s, deleted_at = coalesce(deleted_at, now()), updated_at = now()"
            " WHERE id = %s"
        ).format(_t(control, "tenants")),
        [state, tenant_id],
    )


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
    return [sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)), mark_role(role, marker)]


def mark_role(role: str, marker: str) -> sql.Composed:
    return sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), sql.Literal(marker))


def set_idle_timeout(role: str, timeout: str) -> sql.Composed:
    """A tenant's idle transaction cannot hold its locks (and block the operator's work) forever.
    The tenant may change its own role's defaults; drift repair sets it again."""
    return sql.SQL("ALTER ROLE {} SET idle_in_transaction_session_timeout TO {}").format(
        sql.Identifier(role), sql.Literal(timeout))


def grant_role_to_operator(role: str) -> sql.Composed:
    return sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role))


def revoke_role_from_operator(role: str) -> sql.Composed:
    return sql.SQL("REVOKE {} FROM CURRENT_USER").format(sql.Identifier(role))


def membership_statements(role: str, statements: Sequence[sql.Composable]) -> list[sql.Composable]:
    """``statements`` between a GRANT and a REVOKE of ``role`` to the operator: for ``run_batch``,
    whose one implicit transaction never leaves the membership behind, not even on failure."""
    return [grant_role_to_operator(role), *statements, revoke_role_from_operator(role)] if statements else []


@contextlib.asynccontextmanager
async def acting_for(conn: Conn, role: str) -> AsyncIterator[None]:
    """Membership in ``role`` for the statements of the block, in one transaction with them."""
    async with conn.transaction():
        await conn.execute(grant_role_to_operator(role))
        yield
        await conn.execute(revoke_role_from_operator(role))


def create_schema(schema: str, role: str) -> sql.Composed:
    return sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
        sql.Identifier(schema), sql.Identifier(role)
    )


def set_schema_owner(schema: str, role: str) -> sql.Composed:
    return sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), sql.Identifier(role))


def grant_schema(schema: str, role: str) -> sql.Composed:
    return sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(role))


def set_search_path(role: str, schema: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} SET search_path TO {}").format(sql.Identifier(role), sql.Identifier(schema))


def login_statement(role: str, login: bool) -> sql.Composed:
    keyword = sql.SQL("LOGIN" if login else "NOLOGIN")
    return sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), keyword)


async def password_statement(role: str, password: str, iterations: int) -> sql.Composed:
    """``ALTER ROLE ... PASSWORD <verifier>``; PBKDF2 runs in a thread, not in the event loop."""
    verifier = await asyncio.to_thread(scram_sha256_verifier, password, iterations)
    return sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))


async def run_batch(conn: Conn, statements: Sequence[sql.Composable]) -> None:
    """Run parameterless statements in one round trip (the simple query protocol).

    PostgreSQL runs such a batch as one implicit transaction: a failing statement undoes the
    ones before it, so a retried step starts from the state it observed."""
    if statements:
        await conn.execute(sql.SQL("; ").join(statements))


async def set_login(conn: Conn, role: str, login: bool) -> None:
    await conn.execute(login_statement(role, login))


async def set_password(conn: Conn, role: str, password: str, iterations: int) -> None:
    await conn.execute(await password_statement(role, password, iterations))


async def terminate_backend(conn: Conn, role: str, pid: int) -> None:
    """End one session of ``role`` (a migration past its deadline), whatever it is doing."""
    async with acting_for(conn, role):
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
    password = generate_password()
    verifier = await asyncio.to_thread(scram_sha256_verifier, password, iterations)
    ident = sql.Identifier(user)
    await run_batch(conn, [
        sql.SQL("CREATE ROLE {} LOGIN INHERIT CONNECTION LIMIT 4 PASSWORD {}").format(ident, sql.Literal(verifier)),
        mark_role(user, f"tenancy-operator temporary login for {role}"),
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
    async with acting_for(conn, user):
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [user])
    ident = sql.Identifier(user)
    await run_batch(conn, [grant_role_to_operator(user), sql.SQL("DROP OWNED BY {}").format(ident),
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
    async with acting_for(conn, role):  # signalling a role's backends takes its privileges
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
    roles = [role, *await existing_logins(conn, role)]
    idents = sql.SQL(", ").join(sql.Identifier(r) for r in roles)
    await run_batch(conn, [
        *(grant_role_to_operator(r) for r in roles), drop_schema,
        sql.SQL("DROP OWNED BY {}").format(idents), sql.SQL("DROP ROLE {}").format(idents),
    ])


async def terminate_all_sessions(conn: Conn, role: str) -> int:
    """End the sessions of the owner and of every login role of the tenant."""
    n = 0
    for r in [role, *await existing_logins(conn, role)]:
        n += await terminate_sessions(conn, r)
    return n


# --- login roles ---------------------------------------------------------------------------------
#
# A tenant has an owner role (``tenant_<name>``: owns the schema and every object in it, NOLOGIN;
# migrations run as it) and login roles with data privileges only: two application logins that
# alternate at each rotation (slots ``a`` and ``b``) and an optional read-only login (``r``).

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


@dataclass(frozen=True)
class CredentialsRow:
    """The registry's record of a tenant's logins (the sweep's view)."""

    login_slot: str | None
    retiring_role: str | None
    retire_at: Any
    rotated_at: Any


def create_login(role: str, marker: str, schema: str, idle_timeout: str) -> list[sql.Composed]:
    return [sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(sql.Identifier(role)), mark_role(role, marker),
            set_search_path(role, schema), set_idle_timeout(role, idle_timeout)]


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
    await run_batch(conn, todo)


async def existing_logins(conn: Conn, ident: str) -> list[str]:
    cur = await conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
                             [login_roles(ident)])
    return [str(r["rolname"]) for r in await cur.fetchall()]


async def set_credentials(conn: Conn, control: str, tenant_id: str, *, login_slot: str | None,
                          retiring_role: str | None, retire_at: Any, rotated_at: Any) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET login_slot = %s, retiring_role = %s, retire_at = %s, rotated_at = %s"
                " WHERE id = %s").format(_t(control, "tenants")),
        [login_slot, retiring_role, retire_at, rotated_at, tenant_id])


async def set_ro_secret(conn: Conn, control: str, tenant_id: str, *, uid: str | None, claim: str | None) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET ro_secret_uid = %s, ro_secret_claim = %s WHERE id = %s").format(
            _t(control, "tenants")), [uid, claim, tenant_id])


async def credentials_due(conn: Conn, control: str, idents: list[str]) -> set[str]:
    """Tenants (by identifier) with a retirement due now: the sweep reconciles them."""
    cur = await conn.execute(
        sql.SQL("SELECT schema_name FROM {} WHERE schema_name = ANY(%s) AND state <> ALL(%s)"
                " AND retire_at IS NOT NULL AND retire_at <= now()").format(_t(control, "tenants")),
        [idents, ["dropped", "archived"]])
    return {str(r["schema_name"]) for r in await cur.fetchall()}


async def credentials_rows(conn: Conn, control: str, idents: list[str]) -> dict[str, CredentialsRow]:
    cur = await conn.execute(
        sql.SQL("SELECT schema_name, login_slot, retiring_role, retire_at, rotated_at FROM {}"
                " WHERE schema_name = ANY(%s) AND state <> ALL(%s)").format(
            _t(control, "tenants")), [idents, ["dropped", "archived"]])
    return {str(r["schema_name"]): CredentialsRow(r["login_slot"], r["retiring_role"], r["retire_at"],  # type: ignore[arg-type]
                                                  r["rotated_at"]) for r in await cur.fetchall()}


async def mark_moved(conn: Conn, control: str, tenant_id: str, drop_after: Any) -> None:
    """The copy a move left on this target: kept (logins off) until ``drop_after``."""
    await conn.execute(
        sql.SQL("UPDATE {} SET state = 'moved', drop_after = %s, deleted_at = now(), updated_at = now()"
                " WHERE id = %s").format(_t(control, "tenants")), [drop_after, tenant_id])


async def moved_due(conn: Conn, control: str) -> list[RegistryRow]:
    """Copies left by moves whose grace period is over."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT id::text, namespace, name, schema_name, role_name, state, provisioned_at,"
            " schema_recreated_at, schema_recreated_ack, k8s_uid, secret_uid, secret_claim,"
            + _CRED_COLUMNS + " FROM {} WHERE state = 'moved' AND drop_after <= now()"
        ).format(_t(control, "tenants")))
    return [RegistryRow(**r) for r in await cur.fetchall()]  # type: ignore[arg-type]


async def move_archive(conn: Conn, control: str, tenant_id: str) -> str | None:
    """The archive a move in progress was made from (writes stopped since), if any."""
    cur = await conn.execute(sql.SQL("SELECT move_archive FROM {} WHERE id = %s").format(_t(control, "tenants")),
                             [tenant_id])
    row = await cur.fetchone()
    return str(row["move_archive"]) if row and row["move_archive"] else None


async def set_move_archive(conn: Conn, control: str, tenant_id: str, archive_id: str | None) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET move_archive = %s WHERE id = %s").format(_t(control, "tenants")),
                       [archive_id, tenant_id])
