"""The operator's own control schema, migrated at start-up.

All replicas may start at once: an advisory lock held for the migration transaction means
exactly one applies the pending files and the others then find nothing to do.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from psycopg import sql

from tenancy_operator.db.targets import Conn
from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)

# An arbitrary constant that identifies "tenancy-operator control schema migration".
MIGRATION_LOCK_KEY = 7_341_905_118_220_431


def control_migrations() -> list[tuple[str, str]]:
    """(version, sql text) of the packaged control-schema migrations, in order."""
    folder = resources.files("tenancy_operator.db") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def _up_to_date(conn: Conn, schema: str) -> bool:
    """Read-only: are all packaged migrations recorded with their checksums? (No DDL, no lock.)"""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL AS present", [f'"{schema}".operator_migrations'])
    row = await cur.fetchone()
    if not row or not row["present"]:
        return False
    cur = await conn.execute(
        sql.SQL("SELECT version, checksum FROM {}.operator_migrations").format(sql.Identifier(schema))
    )
    done = {str(r["version"]): str(r["checksum"]) for r in await cur.fetchall()}
    return all(done.get(version) == checksum(text) for version, text in control_migrations())


async def migrate_control_schema(conn: Conn, schema: str) -> list[str]:
    """Apply pending control-schema migrations; returns the versions applied now. A start with
    nothing to do issues no DDL at all (restarts must be free of schema changes)."""
    if await _up_to_date(conn, schema):
        return []
    applied_now: list[str] = []
    ident = sql.Identifier(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(ident))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS operator_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version, checksum FROM operator_migrations")
        done = {str(r["version"]): str(r["checksum"]) for r in await cur.fetchall()}
        for version, text in control_migrations():
            if version in done:
                if done[version] != checksum(text):
                    raise RuntimeError(f"control migration {version} changed after it was applied")
                continue
            # Packaged, reviewed SQL shipped with the operator (not user input).
            await conn.execute(sql.SQL(text))
            await conn.execute(
                "INSERT INTO operator_migrations (version, checksum) VALUES (%s, %s)",
                [version, checksum(text)],
            )
            applied_now.append(version)
    return applied_now
