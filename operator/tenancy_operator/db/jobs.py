"""The lifecycle job ledger: what ran for a tenant, how often it failed, and whether to try again.

The ledger lives in the control schema, next to the data it describes, so "should this step run
again?" is answered from durable facts (failed attempts, the retry token an admin gave), never
from our own status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql

from tenancy_operator.api.tenant import JobRef
from tenancy_operator.db.targets import Conn
from tenancy_operator.observability.text import clean_message

KINDS = ("provision", "migrate", "suspend", "resume", "rotate", "archive", "restore", "purge", "delete",
         "contain", "release")


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: str
    attempt: int
    generation: int | None
    detail: str | None
    error: str | None
    retry_token: str | None
    note: str | None
    started_at: Any
    finished_at: Any
    requested_by: str | None = None
    """Who asked for it: a field manager, or "tenancy-operator" for its own schedule and repairs."""
    requested_at: Any = None

    def summary(self) -> JobRef:
        """The job as TenantStatus.currentJob / recentJobs show it."""
        message = self.error or self.note or self.detail
        known = {
            "started_at": self.started_at, "finished_at": self.finished_at, "requested_at": self.requested_at,
            # A manager name the user chose, and often a tenant's own error text: one clean line.
            "requested_by": clean_message(self.requested_by, limit=256) if self.requested_by else None,
            "message": clean_message(message) if message else None,
        }
        # Only what is known is set: a job is an item of a list, which the status holds as written
        # (the API server drops nulls there), so a null would differ from it at every compare.
        return JobRef(id=self.id, kind=self.kind, state=self.state, attempt=self.attempt,
                      **{k: v for k, v in known.items() if v is not None})


_COLUMNS = sql.SQL(
    "id::text, kind, state, attempt, generation, detail, error, retry_token, note, started_at, finished_at,"
    " requested_by, requested_at"
)


def _t(control: str) -> sql.Composed:
    return sql.SQL("{}.lifecycle_jobs").format(sql.Identifier(control))


async def failed_streak(conn: Conn, control: str, tenant_id: str, kind: str) -> list[Job]:
    """Failed attempts of ``kind`` since its last success, newest first."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT {cols} FROM {t} WHERE tenant_id = %s AND kind = %s AND state = 'failed'"
            " AND started_at > coalesce((SELECT max(started_at) FROM {t} WHERE tenant_id = %s AND kind = %s"
            " AND state = 'succeeded'), '-infinity') ORDER BY started_at DESC"
        ).format(cols=_COLUMNS, t=_t(control)),
        [tenant_id, kind, tenant_id, kind],
    )
    return [Job(**r) for r in await cur.fetchall()]  # type: ignore[arg-type]


async def start(
    conn: Conn, control: str, tenant_id: str, kind: str, *, attempt: int, generation: int | None,
    detail: str | None = None, retry_token: str | None = None, note: str | None = None,
    requested_by: str | None = None, requested_at: Any = None,
) -> str:
    cur = await conn.execute(
        sql.SQL(
            "INSERT INTO {} (tenant_id, kind, state, attempt, generation, detail, retry_token, note,"
            " requested_by, requested_at)"
            " VALUES (%s, %s, 'running', %s, %s, %s, %s, %s, %s, %s) RETURNING id::text AS id"
        ).format(_t(control)),
        [tenant_id, kind, attempt, generation, detail, retry_token, note, requested_by, requested_at],
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row["id"])


async def finish(conn: Conn, control: str, job_id: str, *, ok: bool, error: str | None = None) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET state = %s, error = %s, finished_at = now() WHERE id = %s").format(_t(control)),
        ["succeeded" if ok else "failed", error, job_id],
    )


async def abandon_running(conn: Conn, control: str, tenant_id: str) -> None:
    """Jobs left 'running' by a crashed operator are failed attempts: the step restarts safely."""
    await conn.execute(
        sql.SQL(
            "UPDATE {} SET state = 'failed', error = 'interrupted (operator restarted)', finished_at = now()"
            " WHERE tenant_id = %s AND state = 'running'"
        ).format(_t(control)),
        [tenant_id],
    )


async def recent(conn: Conn, control: str, tenant_id: str, limit: int = 10) -> list[Job]:
    cur = await conn.execute(
        sql.SQL("SELECT {cols} FROM {t} WHERE tenant_id = %s ORDER BY started_at DESC LIMIT %s").format(
            cols=_COLUMNS, t=_t(control)
        ),
        [tenant_id, limit],
    )
    return [Job(**r) for r in await cur.fetchall()]  # type: ignore[arg-type]


async def history(conn: Conn, control: str, namespace: str, name: str) -> list[dict[str, Any]]:
    """All jobs of every incarnation of a tenant name, oldest first (for the CLI)."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT j.id::text AS id, j.kind, j.state, j.attempt, j.generation, j.detail, j.error, j.note,"
            " j.started_at, j.finished_at, j.requested_by, j.requested_at, t.id::text AS tenant_id"
            " FROM {jobs} j JOIN {tenants} t ON t.id = j.tenant_id"
            " WHERE t.namespace = %s AND t.name = %s ORDER BY j.started_at"
        ).format(jobs=_t(control), tenants=sql.SQL("{}.tenants").format(sql.Identifier(control))),
        [namespace, name],
    )
    return list(await cur.fetchall())


async def record(conn: Conn, control: str, tenant_id: str, kind: str, *, detail: str | None = None,
                 requested_by: str | None = None) -> None:
    """A job done in one step (containment of a noisy neighbour and its release): recorded succeeded."""
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (tenant_id, kind, state, attempt, detail, finished_at, requested_by, requested_at)"
            " VALUES (%s, %s, 'succeeded', 1, %s, now(), %s, now())"
        ).format(_t(control)),
        [tenant_id, kind, detail, requested_by],
    )
