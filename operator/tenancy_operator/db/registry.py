"""SQL for the control schema's registry of tenants (``<control>.tenants``): one row a tenant on
a target, with its state, the Secrets the operator created for it, its login slot and rotation,
and a move's leftovers. The catalog side of a tenant is in db/tenants.py and db/logins.py.

Identifiers go through ``sql.Identifier``; values are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql

from tenancy_operator.db.targets import Conn

LIVE_STATES = ("provisioning", "active", "suspended", "deleted")


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


@dataclass(frozen=True)
class CredentialsRow:
    """The registry's record of a tenant's logins (the sweep's view)."""

    login_slot: str | None
    retiring_role: str | None
    retire_at: Any
    rotated_at: Any


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
