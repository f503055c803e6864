"""A tenant's own schema migrations.

The text comes from a ConfigMap, so it runs over a connection logged in *as the tenant role*,
never under ``SET ROLE`` in the operator's session (where ``RESET ROLE`` would hand it the
operator's rights). Each migration and its record commit in one transaction in the tenant's
schema (``tenancy_schema_migrations``), so a crash can never apply a migration twice.

The authoritative record is the operator's own, in the control schema (``tenant_migrations``):
the operator never reads the tenant's table in its own session, because the tenant owns it and
can put a view calling its own functions in its place (a function called by the operator's
session runs with the operator's rights). The tenant's table is read only over the tenant's
login, while migrating, to learn of a migration that committed just before a crash and was not
recorded in the control schema yet; a tenant that forges rows there only skips its own
migrations.

Every migration runs under a client-side deadline: a tenant can lift any server-side timeout
(``SET LOCAL statement_timeout = 0``) and catch a cancel in plpgsql, so past the deadline the
operator ends the backend (``pg_terminate_backend``) and reports ``MigrationTimeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from tenancy_operator.db import tenant_login
from tenancy_operator.db.targets import Conn

RECORD_TABLE = "tenancy_schema_migrations"
SNAPSHOT_MARK = re.compile(r"^\s*--\s*tenancy:\s*snapshot-before\s*$", re.MULTILINE)
# Bounds of a template, checked before anything runs: a ConfigMap holds at most 1 MiB in all.
MAX_MIGRATIONS = 1000
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
T = TypeVar("T")
# Errors a later try usually gets past: lock waits cut short by lock_timeout, conflicts.
TRANSIENT = (
    psycopg.errors.LockNotAvailable,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)


@dataclass(frozen=True)
class Migration:
    version: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def snapshot_before(self) -> bool:
        """Marked risky (a line `-- tenancy: snapshot-before`): the tenant is archived before it runs."""
        return bool(SNAPSHOT_MARK.search(self.text))


class ChecksumMismatch(Exception):
    def __init__(self, version: str) -> None:
        super().__init__(f"migration {version} was changed after it was applied; it is never re-run")
        self.version = version


class MigrationTimeout(Exception):
    """A migration ran past its client-side deadline; its backend was ended."""

    MARK = "ran past its deadline"

    def __init__(self, version: str, seconds: float) -> None:
        super().__init__(f"migration {version} {self.MARK} ({seconds:g} s); its session was ended")
        self.version = version


class MigrationFailed(Exception):
    def __init__(self, version: str, detail: str) -> None:
        super().__init__(f"migration {version} failed: {detail}")
        self.version = version
        self.detail = detail


class InvalidTemplate(Exception):
    """A template the operator refuses to run (too many migrations, a version name out of bounds)."""


DOWN_SUFFIX = ".down.sql"


def migrations_from_data(data: dict[str, str]) -> list[Migration]:
    """ConfigMap keys ending in .sql, sorted: 0001_init.sql runs before 0002_orders.sql. A key
    ending in .down.sql is not one: it undoes the migration of its name (down_migrations_from_data)."""
    return [
        Migration(key.removesuffix(".sql"), text)
        for key, text in sorted(data.items())
        if key.endswith(".sql") and not key.endswith(DOWN_SUFFIX)
    ]


def down_migrations_from_data(data: dict[str, str]) -> dict[str, Migration]:
    """version -> the migration that undoes it (ConfigMap key `<version>.down.sql`), run only on an
    explicit rollback (docs/schema-rollouts.md)."""
    return {key.removesuffix(DOWN_SUFFIX): Migration(key.removesuffix(DOWN_SUFFIX), text)
            for key, text in data.items() if key.endswith(DOWN_SUFFIX)}


def check_template(migrations: list[Migration]) -> None:
    """Raises InvalidTemplate when a template is out of the operator's bounds."""
    if len(migrations) > MAX_MIGRATIONS:
        raise InvalidTemplate(f"the template declares {len(migrations)} migrations; at most {MAX_MIGRATIONS}")
    bad = next((m.version for m in migrations if not VERSION.match(m.version)), None)
    if bad is not None:
        raise InvalidTemplate(f"migration key {bad[:100]!r}.sql: a version is 1 to 100 letters, digits, '_', '.', '-'")


def default_migrations() -> list[Migration]:
    folder = resources.files("tenancy_operator") / "templates"
    return migrations_from_data({p.name: p.read_text() for p in folder.iterdir() if p.name.endswith(".sql")})


async def applied(conn: Conn, control: str, tenant_id: str) -> dict[str, str]:
    """version -> checksum of the tenant's applied migrations, from the operator's own record."""
    cur = await conn.execute(
        sql.SQL("SELECT version, checksum FROM {}.tenant_migrations WHERE tenant_id = %s").format(
            sql.Identifier(control)),
        [tenant_id],
    )
    return {str(r["version"]): str(r["checksum"]) for r in await cur.fetchall()}


async def forget(conn: Conn, control: str, tenant_id: str) -> None:
    """The tenant's schema is new (re-created after it was dropped): none of its migrations ran."""
    await conn.execute(
        sql.SQL("DELETE FROM {}.tenant_migrations WHERE tenant_id = %s").format(sql.Identifier(control)),
        [tenant_id],
    )


def pending(wanted: list[Migration], done: dict[str, str]) -> list[Migration]:
    """Migrations still to run; raises when an applied one's text changed."""
    out = []
    for m in wanted:
        if m.version in done:
            if done[m.version] != m.checksum:
                raise ChecksumMismatch(m.version)
        else:
            out.append(m)
    return out


async def apply_as_tenant(
    tenant_dsn: str, schema: str, todo: list[Migration], *, lock_timeout: str, statement_timeout: str,
    connect_timeout: float, deadline: float, end_backend: Callable[[int], Awaitable[object]],
    records: dict[str, str] | None = None, role: str | None = None, app_roles: str | None = None,
    revert: bool = False,
) -> list[str]:
    """Apply ``todo`` in order, each in its own transaction and under ``deadline`` seconds; stops at
    the first failure. Returns the versions applied now; ``records`` receives, as soon as each
    commits, every version of ``todo`` the schema holds (applied now, or by an earlier run whose
    bookkeeping a crash cut short), also when a later one fails.

    ``revert``: ``todo`` are down migrations (each named by the version it undoes, newest first);
    each runs with the deletion of its version's record, and ``records`` receives every version
    of ``todo`` the schema no longer holds.

    Past the deadline ``end_backend(pid)`` ends the session on the server (a cancel alone is not
    enough: plpgsql can catch it) and ``MigrationTimeout`` is raised."""
    done: list[str] = []
    record = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(RECORD_TABLE))
    async with await psycopg.AsyncConnection.connect(
        tenant_dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
        application_name="tenancy-operator-migrate",
        # Declared migrations still apply while a quota blocks the tenant's own writes.
        options="-c default_transaction_read_only=off",
    ) as conn:
        pid = conn.info.backend_pid
        if role is not None:  # the owner's role: the objects the migrations create are the owner's
            await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if app_roles is not None:  # for GRANT EXECUTE ON FUNCTION ... TO <application logins>
            await conn.execute("SELECT set_config(%s, %s, false)", ["tenancy.app_roles", app_roles])

        async def bounded(what: str, work: Awaitable[T]) -> T:
            timer = asyncio.timeout(deadline)
            try:
                async with timer:
                    return await work
            except Exception:
                # Past the deadline psycopg cancels the query and, if the server does not stop,
                # closes the connection (whatever error that ends in); the backend may still run.
                if not timer.expired():
                    raise
                await end_backend(pid)
                raise MigrationTimeout(what, deadline) from None

        await bounded(todo[0].version if todo else "-", conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(record)
        ))
        step = _revert_one if revert else _apply_one
        for m in todo:
            try:
                if await bounded(m.version, step(conn, record, schema, m, lock_timeout, statement_timeout)):
                    done.append(m.version)
                if records is not None:
                    records[m.version] = m.checksum
            except psycopg.errors.Error as exc:
                if isinstance(exc, TRANSIENT) or (isinstance(exc, psycopg.OperationalError) and conn.broken):
                    raise  # worth retrying as is
                raise MigrationFailed(m.version, exc.diag.message_primary or type(exc).__name__) from exc
    return done


async def _transaction_limits(conn: psycopg.AsyncConnection[Any], schema: str, lock_timeout: str,
                              statement_timeout: str) -> None:
    """The migration's transaction: its lock and statement timeouts, and the tenant's schema first."""
    await conn.execute("SELECT set_config('lock_timeout', %s, true),"
                       " set_config('statement_timeout', %s, true),"
                       " set_config('search_path', %s, true)",
                       [lock_timeout, statement_timeout, f'"{schema}"'])


async def _apply_one(conn: psycopg.AsyncConnection[Any], record: sql.Composable, schema: str, m: Migration,
                     lock_timeout: str, statement_timeout: str) -> bool:
    """One migration and its record in one transaction; False when a run before applied it."""
    async with conn.transaction():
        await _transaction_limits(conn, schema, lock_timeout, statement_timeout)
        cur = await conn.execute(sql.SQL("SELECT 1 FROM {} WHERE version = %s FOR UPDATE").format(record),
                                 [m.version])
        if await cur.fetchone():
            return False  # another run applied it meanwhile
        # The tenant's declared migration, run with the tenant's own rights only.
        await conn.execute(sql.SQL(m.text))
        await conn.execute(sql.SQL("INSERT INTO {} (version, checksum) VALUES (%s, %s)").format(record),
                           [m.version, m.checksum])
    return True


async def _revert_one(conn: psycopg.AsyncConnection[Any], record: sql.Composable, schema: str, m: Migration,
                      lock_timeout: str, statement_timeout: str) -> bool:
    """One down migration and the removal of its version's record in one transaction; False when
    the schema does not hold that version (never applied, or reverted by a run before)."""
    async with conn.transaction():
        await _transaction_limits(conn, schema, lock_timeout, statement_timeout)
        cur = await conn.execute(sql.SQL("DELETE FROM {} WHERE version = %s RETURNING 1").format(record),
                                 [m.version])
        if not await cur.fetchone():
            return False
        await conn.execute(sql.SQL(m.text))  # the tenant's declared down migration, with its rights only
    return True


async def read_records(tenant_dsn: str, schema: str, *, connect_timeout: float, deadline: float) -> dict[str, str]:
    """The migration records a schema holds, read over a login with the tenant's rights only (after
    a restore, whose archive brought the records along). Bounded: at most MAX_MIGRATIONS rows, and
    the session ends at the deadline."""
    record = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(RECORD_TABLE))
    async with tenant_login.read_only(tenant_dsn, connect_timeout=connect_timeout, deadline=deadline,
                                      application_name="tenancy-operator-read") as conn:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f'"{schema}"."{RECORD_TABLE}"'])
        present = await cur.fetchone()
        if not present or not present[0]:
            return {}
        cur = await conn.execute(sql.SQL("SELECT version::text, checksum::text FROM {} LIMIT %s").format(record),
                                 [MAX_MIGRATIONS])
        return {str(v): str(c) for v, c in await cur.fetchall()}


async def unmirror(conn: Conn, control: str, tenant_id: str, versions: Iterable[str]) -> None:
    """Versions reverted by down migrations: no longer applied in the operator's record."""
    gone = list(versions)
    if gone:
        await conn.execute(
            sql.SQL("DELETE FROM {}.tenant_migrations WHERE tenant_id = %s AND version = ANY(%s)").format(
                sql.Identifier(control)),
            [tenant_id, gone],
        )


async def mirror(conn: Conn, control: str, tenant_id: str, records: Mapping[str, str]) -> None:
    """Record migrations as applied in the operator's own record (the authoritative one)."""
    if not records:
        return
    await conn.execute(
        sql.SQL(
            "INSERT INTO {}.tenant_migrations (tenant_id, version, checksum)"
            " SELECT %s::uuid, v, c FROM unnest(%s::text[], %s::text[]) AS x(v, c)"
            " ON CONFLICT (tenant_id, version) DO NOTHING"
        ).format(sql.Identifier(control)),
        [tenant_id, list(records), list(records.values())],
    )
