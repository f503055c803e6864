"""SQL for feature flags in the control schema: the `feature_flags` rows and the audit trail.

A flag's rows are replaced in one transaction under an advisory lock on (namespace, key): a reader's
single SELECT sees the whole old flag or the whole new one, and two writers (a handler and the
sweep, or two replicas) never interleave. The comparison with what is stored happens inside that
transaction too, so exactly one of two racing writers records the change in the audit trail.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from tenancy_operator.db.targets import Conn
from tenancy_operator.flags.diff import json_diff
from tenancy_operator.flags.model import FlagDefinition, Rollout, TenantRule

# pg_advisory_xact_lock(classid, objid): a constant class for "tenancy-operator feature flag".
LOCK_CLASS = 0x7E4A11
COLUMNS = (
    "namespace", "flag_key", "level", "tenant", "user_id", "name", "k8s_uid", "generation", "enabled",
    "variant", "rollout_percentage", "weights", "default_variant", "variants", "description",
)


@dataclass(frozen=True)
class StoredFlag:
    """A flag as its rows in one target describe it."""

    namespace: str
    definition: FlagDefinition
    name: str
    uid: str
    generation: int
    written_at: datetime.datetime


@dataclass
class WriteResult:
    """What a write did: `operation` is None when nothing needed writing."""

    operation: str | None = None
    diff: list[dict[str, Any]] = field(default_factory=list)
    old: FlagDefinition | None = None
    conflict: str | None = None
    """Another FeatureFlag (by name) owns this key in the namespace; nothing was written."""
    stale: bool = False
    """The stored rows come from a newer generation of the same object; nothing was written."""
    stored: StoredFlag | None = None
    """What the target holds after the write."""


def _t(control: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(control), sql.Identifier(table))


_ONE_FLAG = sql.SQL("namespace = %s AND flag_key = %s")
_ALL_FLAGS = sql.SQL("true")


def _select(control: str, where: sql.SQL) -> sql.Composed:
    return sql.SQL(
        "SELECT namespace, flag_key, level, tenant, user_id, name, k8s_uid, generation, enabled, variant,"
        " rollout_percentage, weights, default_variant, variants, description, written_at FROM {} WHERE {}"
        " ORDER BY namespace, flag_key, level, tenant, user_id"
    ).format(_t(control, "feature_flags"), where)


def definition_from_rows(rows: Sequence[Mapping[str, Any]]) -> StoredFlag | None:
    """Rebuild one flag from its rows (all of one namespace and key); None without a global row."""
    glob = next((r for r in rows if r["level"] == "global"), None)
    if glob is None:
        return None
    rollout = None
    if glob["weights"] is not None:
        rollout = Rollout(weights=tuple((str(w["variant"]), int(w["weight"])) for w in glob["weights"]))
    elif glob["variant"] is not None:
        rollout = Rollout(variant=str(glob["variant"]), percentage=int(glob["rollout_percentage"]))
    tenants = {
        str(r["tenant"]): TenantRule(
            str(r["variant"]), None if r["rollout_percentage"] is None else int(r["rollout_percentage"])
        )
        for r in rows if r["level"] == "tenant"
    }
    users = {(str(r["tenant"]), str(r["user_id"])): str(r["variant"]) for r in rows if r["level"] == "user"}
    definition = FlagDefinition(
        key=str(glob["flag_key"]), enabled=bool(glob["enabled"]), variants=dict(glob["variants"]),
        default_variant=str(glob["default_variant"]), rollout=rollout, tenants=tenants, users=users,
        description=glob["description"],
    )
    return StoredFlag(
        namespace=str(glob["namespace"]), definition=definition, name=str(glob["name"]), uid=str(glob["k8s_uid"]),
        generation=int(glob["generation"]), written_at=glob["written_at"],
    )


def rows_for(namespace: str, name: str, uid: str, generation: int, flag: FlagDefinition) -> list[tuple[Any, ...]]:
    """The rows that store `flag`, in COLUMNS order."""
    common = (namespace, flag.key)
    meta = (name, uid, generation)
    r = flag.rollout
    weights = Jsonb([{"variant": v, "weight": w} for v, w in r.weights]) if r is not None and r.weights else None
    rows: list[tuple[Any, ...]] = [(
        *common, "global", None, None, *meta, flag.enabled,
        r.variant if r is not None else None, r.percentage if r is not None else None, weights,
        flag.default_variant, Jsonb(dict(flag.variants)), flag.description,
    )]
    for tenant, rule in sorted(flag.tenants.items()):
        rows.append((*common, "tenant", tenant, None, *meta, None, rule.variant, rule.percentage,
                     None, None, None, None))
    for (tenant, user), variant in sorted(flag.users.items()):
        rows.append((*common, "user", tenant, user, *meta, None, variant, None, None, None, None, None))
    return rows


async def load(conn: Conn, control: str, namespace: str, key: str) -> StoredFlag | None:
    """One flag, read with one statement (so from one snapshot)."""
    cur = await conn.execute(_select(control, _ONE_FLAG), [namespace, key])
    return definition_from_rows(await cur.fetchall())


async def load_all(conn: Conn, control: str) -> list[StoredFlag]:
    """Every flag stored in this target."""
    cur = await conn.execute(_select(control, _ALL_FLAGS))
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in await cur.fetchall():
        groups.setdefault((str(row["namespace"]), str(row["flag_key"])), []).append(row)
    found = (definition_from_rows(rows) for rows in groups.values())
    return [f for f in found if f is not None]


async def namespaces_with_key(conn: Conn, control: str, key: str) -> list[str]:
    cur = await conn.execute(
        sql.SQL("SELECT namespace FROM {} WHERE flag_key = %s AND level = 'global' ORDER BY 1").format(
            _t(control, "feature_flags")),
        [key],
    )
    return [str(r["namespace"]) for r in await cur.fetchall()]


async def _lock(conn: Conn, namespace: str, key: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [LOCK_CLASS, f"{namespace}/{key}"])


async def _audit(
    conn: Conn, control: str, *, namespace: str, key: str, name: str, uid: str | None, generation: int | None,
    operation: str, change: list[dict[str, Any]], changed_by: str | None, changed_at: datetime.datetime | None,
) -> None:
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (namespace, flag_key, name, k8s_uid, generation, operation, change, changed_by,"
            " changed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(_t(control, "feature_flag_changes")),
        [namespace, key, name, uid, generation, operation, Jsonb(change), changed_by, changed_at],
    )


async def _last_audited_generation(
    conn: Conn, control: str, namespace: str, key: str, uid: str
) -> tuple[int, str] | None:
    cur = await conn.execute(
        sql.SQL(
            "SELECT generation, operation FROM {} WHERE namespace = %s AND flag_key = %s AND k8s_uid = %s"
            " ORDER BY id DESC LIMIT 1"
        ).format(_t(control, "feature_flag_changes")),
        [namespace, key, uid],
    )
    row = await cur.fetchone()
    return (int(str(row["generation"] or 0)), str(row["operation"])) if row else None


async def replace(
    conn: Conn, control: str, *, namespace: str, name: str, uid: str, generation: int, flag: FlagDefinition,
    changed_by: str | None, changed_at: datetime.datetime | None, take_over: bool = False,
    automatic: str | None = None,
) -> WriteResult:
    """Make the target hold exactly `flag` for (namespace, flag.key), with an audit row when the
    definition changes. Does nothing when it already does; refuses when another FeatureFlag owns
    the key (unless `take_over`, for an owner that no longer exists) or when the stored rows come
    from a newer generation of the same object (a stale event must not roll a flag back).

    An audit row's operation is `create`, `update`, or `repair` when the rows were changed or
    deleted outside the operator although the object's generation did not move; `rollout` when
    only the served percentage changed and ``automatic`` says the operator's stepped rollout
    changed it (a step or a rollback; the audit's actor is then the operator, with that reason).
    """
    table = _t(control, "feature_flags")
    async with conn.transaction():
        await _lock(conn, namespace, flag.key)
        current = await load(conn, control, namespace, flag.key)
        if current is not None and current.name != name and not take_over:
            return WriteResult(conflict=current.name, stored=current)
        if current is not None and current.uid == uid and current.generation > generation:
            return WriteResult(stale=True, stored=current)
        new_json = flag.to_json()
        if current is None:
            last = await _last_audited_generation(conn, control, namespace, flag.key, uid)
            repair = last is not None and last[0] == generation and last[1] != "delete"
            operation = "repair" if repair else "create"
            diff = [{"op": "add", "path": "", "new": new_json}]
        else:
            diff = json_diff(current.definition.to_json(), new_json)
            same = current.uid == uid and current.name == name
            if not diff:
                if same and current.generation == generation:
                    return WriteResult(stored=current)
                # Same flag, new generation (or object): keep rows and written_at, note the owner.
                await conn.execute(
                    sql.SQL("UPDATE {} SET name = %s, k8s_uid = %s, generation = %s"
                            " WHERE namespace = %s AND flag_key = %s").format(table),
                    [name, uid, generation, namespace, flag.key],
                )
                stored = await load(conn, control, namespace, flag.key)
                return WriteResult(stored=stored)
            operation = "repair" if same and current.generation == generation else "update"
            if automatic is not None and all(op["path"] == "/rollout/percentage" for op in diff):
                operation = "rollout"
        await conn.execute(sql.SQL("DELETE FROM {} WHERE namespace = %s AND flag_key = %s").format(table),
                           [namespace, flag.key])
        async with conn.cursor() as cur:
            await cur.executemany(
                sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
                    sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
                ),
                rows_for(namespace, name, uid, generation, flag),
            )
        await _audit(
            conn, control, namespace=namespace, key=flag.key, name=name, uid=uid, generation=generation,
            operation=operation, change=diff,
            changed_by={"repair": "tenancy-operator (repair)",
                        "rollout": f"tenancy-operator (rollout: {automatic})"}.get(operation, changed_by),
            changed_at=changed_at if operation not in ("repair", "rollout") else None,
        )
        stored = await load(conn, control, namespace, flag.key)
    return WriteResult(operation=operation, diff=diff, old=current.definition if current else None, stored=stored)


async def remove(
    conn: Conn, control: str, *, namespace: str, name: str, uid: str | None, key: str, generation: int | None,
    changed_at: datetime.datetime | None, same_uid: bool = False,
) -> WriteResult:
    """Delete the flag's rows if this FeatureFlag owns them, with a `delete` audit row.
    ``same_uid``: only if they were written for this very object (not a newer one of its name)."""
    async with conn.transaction():
        await _lock(conn, namespace, key)
        current = await load(conn, control, namespace, key)
        if current is None or current.name != name or (same_uid and current.uid != uid):
            return WriteResult()
        await conn.execute(
            sql.SQL("DELETE FROM {} WHERE namespace = %s AND flag_key = %s").format(_t(control, "feature_flags")),
            [namespace, key],
        )
        diff = [{"op": "remove", "path": "", "old": current.definition.to_json()}]
        await _audit(
            conn, control, namespace=namespace, key=key, name=name, uid=uid, generation=generation,
            operation="delete", change=diff, changed_by=None, changed_at=changed_at,
        )
    return WriteResult(operation="delete", diff=diff, old=current.definition)


async def changes(conn: Conn, control: str, namespace: str, key: str) -> list[dict[str, Any]]:
    """The audit trail of one flag, oldest first."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT id, namespace, flag_key, name, k8s_uid, generation, operation, change, changed_by, changed_at,"
            " recorded_at FROM {} WHERE namespace = %s AND flag_key = %s ORDER BY id"
        ).format(_t(control, "feature_flag_changes")),
        [namespace, key],
    )
    return [dict(r) for r in await cur.fetchall()]
