"""A tenant's own schema migrations.

The text comes from a ConfigMap, so it runs over a connection logged in *as the tenant role*,
never under ``SET ROLE`` in the operator's session (where ``RESET ROLE`` would hand it the
operator's rights). Each migration and its record commit in one transaction in the tenant's
schema, so a crash can never apply a migration twice. The control schema keeps a mirror
for reporting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

from tenancy_operator.db.targets import Conn
from tenancy_operator.db.tenants import acting_for

RECORD_TABLE = "tenancy_schema_migrations"
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


class ChecksumMismatch(Exception):
    def __init__(self, version: str) -> None:
        super().__init__(f"migration {version} was changed after it was applied; it is never re-run")
        self.version = version


class MigrationFailed(Exception):
    def __init__(self, version: str, detail: str) -> None:
        super().__init__(f"migration {version} failed: {detail}")
        self.version = version
        self.detail = detail


def migrations_from_data(data: dict[str, str]) -> list[Migration]:
    """ConfigMap keys ending in .sql, sorted: 0001_init.sql runs before 0002_orders.sql."""
    return [
        Migration(key.removesuffix(".sql"), text)
        for key, text in sorted(data.items())
        if key.endswith(".sql")
    ]


def default_migrations() -> list[Migration]:
    folder = resources.files("tenancy_operator") / "templates"
    return migrations_from_data({p.name: p.read_text() for p in folder.iterdir() if p.name.endswith(".sql")})


async def applied(conn: Conn, schema: str) -> dict[str, str]:
    """version -> checksum applied in the tenant's schema, read with the tenant role's rights
    (granted for this transaction only; the role and its schema share one name)."""
    async with acting_for(conn, schema):
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL AS present",
                                 [f'"{schema}"."{RECORD_TABLE}"'])
        row = await cur.fetchone()
        if not row or not row["present"]:
            return {}
        cur = await conn.execute(
            sql.SQL("SELECT version, checksum FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(RECORD_TABLE)
            )
        )
        return {str(r["version"]): str(r["checksum"]) for r in await cur.fetchall()}


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
    connect_timeout: float, records: dict[str, str] | None = None,
) -> list[str]:
    """Apply ``todo`` in order, each in its own transaction; stops at the first failure. Returns
    the versions applied; ``records``, when given, receives every record the schema holds after
    a successful run, read over the same login (the caller need not read them again)."""
    done: list[str] = []
    record = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(RECORD_TABLE))
    async with await psycopg.AsyncConnection.connect(
        tenant_dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
        application_name="tenancy-operator-migrate",
        # Declared migrations still apply while a quota blocks the tenant's own writes.
        options="-c default_transaction_read_only=off",
    ) as conn:
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(record)
        )
        for m in todo:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('lock_timeout', %s, true),"
                                       " set_config('statement_timeout', %s, true),"
                                       " set_config('search_path', %s, true)",
                                       [lock_timeout, statement_timeout, f'"{schema}"'])
                    cur = await conn.execute(
                        sql.SQL("SELECT 1 FROM {} WHERE version = %s FOR UPDATE").format(record), [m.version]
                    )
                    if await cur.fetchone():
                        continue  # another run applied it meanwhile
                    # The tenant's declared migration, run with the tenant's own rights only.
                    await conn.execute(sql.SQL(m.text))
                    await conn.execute(
                        sql.SQL("INSERT INTO {} (version, checksum) VALUES (%s, %s)").format(record),
                        [m.version, m.checksum],
                    )
            except psycopg.errors.Error as exc:
                if isinstance(exc, TRANSIENT) or (isinstance(exc, psycopg.OperationalError) and conn.broken):
                    raise  # worth retrying as is
                raise MigrationFailed(m.version, exc.diag.message_primary or type(exc).__name__) from exc
            done.append(m.version)
        if records is not None:
            cur = await conn.execute(sql.SQL("SELECT version, checksum FROM {}").format(record))
            records.update({str(v): str(c) for v, c in await cur.fetchall()})
    return done


async def mirror(conn: Conn, control: str, tenant_id: str, schema: str,
                 records: dict[str, str] | None = None) -> dict[str, str]:
    """Copy the tenant's migration records (read now unless given) into the control schema, for
    fleet reporting; returns them (version -> checksum)."""
    done = records if records is not None else await applied(conn, schema)
    if not done:
        return done
    await conn.execute(
        sql.SQL(
            "INSERT INTO {}.tenant_migrations (tenant_id, version, checksum)"
            " SELECT %s::uuid, v, c FROM unnest(%s::text[], %s::text[]) AS x(v, c)"
            " ON CONFLICT (tenant_id, version) DO NOTHING"
        ).format(sql.Identifier(control)),
        [tenant_id, list(done), list(done.values())],
    )
    return done
