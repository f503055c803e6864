"""What a move compares on both sides: per table of a tenant's schema, its row count and a checksum
of its rows (order-independent), read over a login with the tenant's rights only, read-only, under
a deadline. Tenant code runs in those reads (a column type's output function, a table's row
security): with the tenant's rights, never the operator's."""

from __future__ import annotations

from psycopg import sql

from . import tenant_login

MAX_TABLES = 10_000


async def fingerprints(tenant_dsn: str, schema: str, *, connect_timeout: float,
                       deadline: float) -> dict[str, tuple[int, str]]:
    """table name -> (rows, md5 of the sorted md5s of its rows as text)."""
    async with tenant_login.read_only(tenant_dsn, connect_timeout=connect_timeout, deadline=deadline,
                                      application_name="tenancy-operator-verify") as conn:
        cur = await conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY c.relname LIMIT %s",
            [schema, MAX_TABLES])
        tables = [str(r[0]) for r in await cur.fetchall()]
        found: dict[str, tuple[int, str]] = {}
        for table in tables:
            cur = await conn.execute(sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(h, ',' ORDER BY h), ''))"
                " FROM (SELECT md5(t::text) AS h FROM {} t) rows"
            ).format(sql.Identifier(schema, table)))
            row = await cur.fetchone()
            found[table] = (int(row[0]), str(row[1])) if row else (0, "")
        return found


def differences(source: dict[str, tuple[int, str]], destination: dict[str, tuple[int, str]]) -> list[str]:
    """What differs, table by table, for a message (empty: the same)."""
    out = []
    for table in sorted(set(source) | set(destination)):
        a, b = source.get(table), destination.get(table)
        if a is None or b is None:
            out.append(f"{table}: only on the {'destination' if a is None else 'source'}")
        elif a[0] != b[0]:
            out.append(f"{table}: {a[0]} rows on the source, {b[0]} on the destination")
        elif a[1] != b[1]:
            out.append(f"{table}: same row count ({a[0]}), different contents")
    return out
