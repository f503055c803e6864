"""The isolation audit: what a tenant role holds beyond its own schema, and taking it back.

A tenant role should hold its schema and nothing else: no membership in any role, no privilege
on another schema or on objects in one, nothing on the database beyond what PUBLIC has, no
dangerous role attribute, and no objects of its own outside its schema. The audit reads
``pg_catalog`` only (plus the operator's own registry, ``<control>.tenants``), in a few bulk
queries for every live tenant of a target: no tenant-owned object is ever evaluated, so no
tenant-defined code runs in the operator's session, and catalog reads wait on no tenant's lock.

``fix`` revokes each finding in its own short transaction and audits again: what is still
there was not revoked. The operator's login is not a superuser, so some findings cannot be
taken back by it (a superuser attribute; on PostgreSQL 16 and later a membership a superuser
granted; a privilege on an object whose owner is not the operator or a tenant); they stay
findings, reported as such, until someone with the rights revokes them (``tenancy-operator
audit --fix`` with an administrator's DSN).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from tenancy_operator.db import logins, registry, role_sql
from tenancy_operator.db.targets import Conn


class Kind(enum.StrEnum):
    """What a finding is about; the bounded label of ``isolation_violations_total``."""

    MEMBERSHIP = "membership"
    ATTRIBUTE = "attribute"
    SCHEMA = "schema"
    RELATION = "relation"
    ROUTINE = "routine"
    DATABASE = "database"
    PARAMETER = "parameter"
    OWNERSHIP = "ownership"


# Revoked first: a membership may be what lets a later statement fail (a cycle when the operator
# takes membership of an owner that is itself a member of the operator's role).
ORDER = {kind: i for i, kind in enumerate(Kind)}

ATTRIBUTES = {
    "rolsuper": "SUPERUSER",
    "rolcreaterole": "CREATEROLE",
    "rolcreatedb": "CREATEDB",
    "rolreplication": "REPLICATION",
    "rolbypassrls": "BYPASSRLS",
}
RELKINDS = {
    "r": "table", "p": "table", "v": "view", "m": "materialized view", "f": "foreign table",
    "S": "sequence", "c": "type",
}
PROKINDS = {"f": "function", "p": "procedure", "a": "aggregate", "w": "function"}
DATABASE_PRIVILEGES = ("CREATE", "CONNECT", "TEMPORARY")
PUBLIC_DATABASE_PRIVILEGES = ("CONNECT", "TEMPORARY")
"""What PUBLIC holds on a database by default: the same held explicitly is no finding there."""

DEFAULT_STATEMENT_TIMEOUT = "30s"
DEFAULT_LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class TenantRef:
    """A live registry row: the tenant a role belongs to."""

    role: str
    schema: str
    namespace: str
    name: str
    k8s_uid: str | None = None


@dataclass(frozen=True)
class Finding:
    """One thing ``role`` holds beyond its schema."""

    role: str
    kind: Kind
    object_type: str
    """role, attribute, schema, table, view, sequence, function, procedure, database, parameter..."""
    name: str
    schema: str | None = None
    privileges: tuple[str, ...] = ()
    args: tuple[tuple[str, str], ...] = ()
    """A routine's input argument types, (schema, type name) each: how REVOKE names it."""
    owner: str | None = None
    grantor: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str, str, tuple[tuple[str, str], ...]]:
        return (self.role, self.kind.value, self.object_type, self.schema or "", self.name, self.args)

    def describe(self) -> str:
        """One line a person reads; names are catalog text a tenant may have chosen: made printable."""
        obj = clean(self.name) if self.schema is None else f"{clean(self.schema)}.{clean(self.name)}"
        if self.args:
            obj += "(" + ", ".join(clean(t) for _, t in self.args) + ")"
        elif self.kind is Kind.ROUTINE:
            obj += "()"
        privileges = ", ".join(clean(p) for p in self.privileges)
        if self.kind is Kind.MEMBERSHIP:
            return f"member of role {obj}"
        if self.kind is Kind.ATTRIBUTE:
            return f"role attribute {obj}"
        if self.kind is Kind.OWNERSHIP:
            return f"owns {self.object_type} {obj}"
        return f"{privileges} on {self.object_type} {obj}"


def clean(text: str, limit: int = 80) -> str:
    """Printable and short: catalog names may hold any character (quoted identifiers)."""
    out = "".join(c if c.isprintable() else "?" for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


@dataclass
class Report:
    """One audit of one target: the findings, and with ``fix`` what became of each."""

    tenants: dict[str, TenantRef]
    findings: list[Finding]
    fixed: bool = False
    revoked: set[tuple[Any, ...]] = field(default_factory=set)
    not_revoked: dict[tuple[Any, ...], str] = field(default_factory=dict)
    """key -> why (an SQLSTATE condition name, or what is needed to take it back)."""

    def outcome(self, finding: Finding) -> str:
        if finding.key in self.revoked:
            return "revoked"
        if finding.key in self.not_revoked:
            return f"not revoked: {self.not_revoked[finding.key]}"
        return "found"

    def by_role(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.role, []).append(f)
        return out

    def remaining(self, role: str | None = None) -> list[Finding]:
        """Findings still held (all of them when nothing was revoked)."""
        return [f for f in self.findings if f.key not in self.revoked and (role is None or f.role == role)]


def _t(control: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(control), sql.Identifier(table))


async def live_tenants(conn: Conn, control: str, namespaces: Iterable[str] = ()) -> dict[str, TenantRef]:
    """role -> tenant, for every live registry row (of ``namespaces`` if given)."""
    wanted = sorted(set(namespaces)) or None
    cur = await conn.execute(
        sql.SQL(
            "SELECT role_name, schema_name, namespace, name, k8s_uid FROM {}"
            " WHERE state = ANY(%s) AND (%s::text[] IS NULL OR namespace = ANY(%s))"
        ).format(_t(control, "tenants")),
        [list(registry.LIVE_STATES), wanted, wanted],
    )
    out: dict[str, TenantRef] = {}
    for r in await cur.fetchall():
        uid = None if r["k8s_uid"] is None else str(r["k8s_uid"])
        schema = str(r["schema_name"])
        # The tenant's login roles are audited with it: their schema is the tenant's (where they
        # hold data privileges), and they must hold nothing else either.
        for role in (str(r["role_name"]), *logins.login_roles(str(r["role_name"]))):
            out[role] = TenantRef(role, schema, str(r["namespace"]), str(r["name"]), uid)
    return out


# Every query starts from the audited roles: (oid, name, oid of the role's own schema or NULL).
ROLES = sql.SQL(
    """
WITH t AS (
  SELECT r.oid AS roid, r.rolname::text AS role, n.oid AS nsp
    FROM unnest(%(roles)s::text[], %(schemas)s::text[]) AS want(name, schema)
    JOIN pg_catalog.pg_roles r ON r.rolname = want.name
    LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = want.schema
)
"""
)

Q_ATTRIBUTES = """
SELECT t.role, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls
  FROM t JOIN pg_catalog.pg_roles r ON r.oid = t.roid
"""

Q_MEMBERSHIP = """
SELECT t.role, g.rolname::text AS name, gr.rolname::text AS grantor
  FROM t
  JOIN pg_catalog.pg_auth_members m ON m.member = t.roid
  JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
  LEFT JOIN pg_catalog.pg_roles gr ON gr.oid = m.grantor
"""

Q_SCHEMA = """
SELECT t.role, n.nspname::text AS name, o.rolname::text AS owner,
       array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type) AS privileges
  FROM pg_catalog.pg_namespace n
  CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
  JOIN t ON t.roid = a.grantee
  JOIN pg_catalog.pg_roles o ON o.oid = n.nspowner
 WHERE n.nspacl IS NOT NULL AND n.oid IS DISTINCT FROM t.nsp AND a.grantee <> n.nspowner
 GROUP BY t.role, n.nspname, o.rolname
"""

# Grants on a relation, and grants on its columns (`UPDATE (col)`): a row for each, merged into one
# finding by findings_from_rows.
Q_RELATION = """
SELECT g.role, s.nspname::text AS schema, c.relname::text AS name, c.relkind::text AS subkind,
       o.rolname::text AS owner, g.privileges
  FROM (SELECT t.role, c.oid, array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type) AS privileges
          FROM pg_catalog.pg_class c
          CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
          JOIN t ON t.roid = a.grantee
         WHERE c.relacl IS NOT NULL AND c.relnamespace IS DISTINCT FROM t.nsp AND a.grantee <> c.relowner
         GROUP BY t.role, c.oid
        UNION ALL
        SELECT t.role, c.oid, array_agg(DISTINCT a.privilege_type || ' (' || at.attname || ')'
                                        ORDER BY a.privilege_type || ' (' || at.attname || ')')
          FROM pg_catalog.pg_attribute at
          CROSS JOIN LATERAL pg_catalog.aclexplode(at.attacl) a
          JOIN t ON t.roid = a.grantee
          JOIN pg_catalog.pg_class c ON c.oid = at.attrelid
         WHERE at.attacl IS NOT NULL AND c.relnamespace IS DISTINCT FROM t.nsp AND a.grantee <> c.relowner
         GROUP BY t.role, c.oid) g
  JOIN pg_catalog.pg_class c ON c.oid = g.oid
  JOIN pg_catalog.pg_namespace s ON s.oid = c.relnamespace
  JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
"""

Q_ROUTINE = """
SELECT g.role, s.nspname::text AS schema, p.proname::text AS name, p.prokind::text AS subkind,
       pg_catalog.pg_get_userbyid(p.proowner)::text AS owner, g.privileges,
       ARRAY(SELECT tn.nspname::text FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY x(typ, ord)
               JOIN pg_catalog.pg_type ty ON ty.oid = x.typ
               JOIN pg_catalog.pg_namespace tn ON tn.oid = ty.typnamespace ORDER BY x.ord) AS arg_schemas,
       ARRAY(SELECT ty.typname::text FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY x(typ, ord)
               JOIN pg_catalog.pg_type ty ON ty.oid = x.typ ORDER BY x.ord) AS arg_types
  FROM (SELECT t.role, p.oid, array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type) AS privileges
          FROM pg_catalog.pg_proc p
          CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
          JOIN t ON t.roid = a.grantee
         WHERE p.proacl IS NOT NULL AND p.pronamespace IS DISTINCT FROM t.nsp AND a.grantee <> p.proowner
         GROUP BY t.role, p.oid) g
  JOIN pg_catalog.pg_proc p ON p.oid = g.oid
  JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
"""

# Explicit privileges on a database: on the current one, what PUBLIC has by default is no finding.
Q_DATABASE = """
SELECT t.role, 'database' AS subkind, d.datname::text AS name, o.rolname::text AS owner,
       array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type) AS privileges
  FROM pg_catalog.pg_database d
  CROSS JOIN LATERAL pg_catalog.aclexplode(d.datacl) a
  JOIN t ON t.roid = a.grantee
  JOIN pg_catalog.pg_roles o ON o.oid = d.datdba
 WHERE d.datacl IS NOT NULL AND a.grantee <> d.datdba
   AND (d.datname <> pg_catalog.current_database() OR a.privilege_type <> ALL(%(public_db)s::text[]))
 GROUP BY t.role, d.datname, o.rolname
UNION ALL
SELECT t.role, 'tablespace', sp.spcname::text, o.rolname::text,
       array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type)
  FROM pg_catalog.pg_tablespace sp
  CROSS JOIN LATERAL pg_catalog.aclexplode(sp.spcacl) a
  JOIN t ON t.roid = a.grantee
  JOIN pg_catalog.pg_roles o ON o.oid = sp.spcowner
 WHERE sp.spcacl IS NOT NULL AND a.grantee <> sp.spcowner
 GROUP BY t.role, sp.spcname, o.rolname
"""

Q_PARAMETER = """
SELECT t.role, pa.parname::text AS name,
       array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type) AS privileges
  FROM pg_catalog.pg_parameter_acl pa
  CROSS JOIN LATERAL pg_catalog.aclexplode(pa.paracl) a
  JOIN t ON t.roid = a.grantee
 WHERE pa.paracl IS NOT NULL
 GROUP BY t.role, pa.parname
"""

# Objects a tenant owns outside its schema (its temporary tables and TOAST tables excluded).
Q_OWNERSHIP = """
SELECT t.role, 'schema' AS subkind, NULL::text AS schema, n.nspname::text AS name
  FROM pg_catalog.pg_namespace n JOIN t ON n.nspowner = t.roid
 WHERE n.oid IS DISTINCT FROM t.nsp AND n.nspname !~ '^pg_(toast_)?temp_'
UNION ALL
SELECT t.role, c.relkind::text, s.nspname::text, c.relname::text
  FROM pg_catalog.pg_class c JOIN t ON c.relowner = t.roid
  JOIN pg_catalog.pg_namespace s ON s.oid = c.relnamespace
 WHERE c.relnamespace IS DISTINCT FROM t.nsp AND c.relkind NOT IN ('t', 'i', 'I')
   AND s.nspname <> 'pg_toast' AND s.nspname !~ '^pg_(toast_)?temp_'
UNION ALL
SELECT t.role, 'p' || p.prokind::text, s.nspname::text, p.proname::text
  FROM pg_catalog.pg_proc p JOIN t ON p.proowner = t.roid
  JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
 WHERE p.pronamespace IS DISTINCT FROM t.nsp AND s.nspname !~ '^pg_(toast_)?temp_'
UNION ALL
SELECT t.role, 'type', s.nspname::text, ty.typname::text
  FROM pg_catalog.pg_type ty JOIN t ON ty.typowner = t.roid
  JOIN pg_catalog.pg_namespace s ON s.oid = ty.typnamespace
 WHERE ty.typnamespace IS DISTINCT FROM t.nsp AND ty.typrelid = 0 AND ty.typcategory <> 'A'
   AND s.nspname !~ '^pg_(toast_)?temp_'
UNION ALL
SELECT t.role, 'database', NULL, d.datname::text
  FROM pg_catalog.pg_database d JOIN t ON d.datdba = t.roid
"""


def _object_type(subkind: str) -> str:
    if subkind.startswith("p") and len(subkind) == 2:
        return PROKINDS.get(subkind[1], "function")
    return RELKINDS.get(subkind, subkind)


def findings_from_rows(rows: dict[str, list[dict[str, Any]]]) -> list[Finding]:
    """Typed findings from the audit queries' rows (by query name), merged and sorted."""
    out: dict[tuple[Any, ...], Finding] = {}

    def add(f: Finding) -> None:
        prev = out.get(f.key)
        if prev is not None:
            f = replace(prev, privileges=tuple(sorted(set(prev.privileges) | set(f.privileges))))
        out[f.key] = f

    for r in rows.get("attributes", []):
        for column, attribute in ATTRIBUTES.items():
            if r.get(column):
                add(Finding(r["role"], Kind.ATTRIBUTE, "attribute", attribute))
    for r in rows.get("membership", []):
        add(Finding(r["role"], Kind.MEMBERSHIP, "role", r["name"], grantor=r.get("grantor")))
    for r in rows.get("schema", []):
        add(Finding(r["role"], Kind.SCHEMA, "schema", r["name"], privileges=tuple(r["privileges"]),
                    owner=r["owner"]))
    for r in rows.get("relation", []):
        add(Finding(r["role"], Kind.RELATION, RELKINDS.get(r["subkind"], "table"), r["name"], r["schema"],
                    tuple(r["privileges"]), owner=r["owner"]))
    for r in rows.get("routine", []):
        args = tuple(zip(r["arg_schemas"] or [], r["arg_types"] or [], strict=True))
        add(Finding(r["role"], Kind.ROUTINE, PROKINDS.get(r["subkind"], "function"), r["name"], r["schema"],
                    tuple(r["privileges"]), args, owner=r["owner"]))
    for r in rows.get("database", []):
        add(Finding(r["role"], Kind.DATABASE, r["subkind"], r["name"], privileges=tuple(r["privileges"]),
                    owner=r["owner"]))
    for r in rows.get("parameter", []):
        add(Finding(r["role"], Kind.PARAMETER, "parameter", r["name"], privileges=tuple(r["privileges"])))
    for r in rows.get("ownership", []):
        add(Finding(r["role"], Kind.OWNERSHIP, _object_type(r["subkind"]), r["name"], r["schema"]))
    return sorted(out.values(), key=lambda f: (f.role, ORDER[f.kind], f.key))


async def find(
    conn: Conn, tenants: dict[str, TenantRef], *, statement_timeout: str = DEFAULT_STATEMENT_TIMEOUT,
    lock_timeout: str = DEFAULT_LOCK_TIMEOUT,
) -> list[Finding]:
    """Every finding for ``tenants``: catalog reads in one read-only transaction, under a deadline."""
    if not tenants:
        return []
    refs = sorted(tenants.values(), key=lambda t: t.role)
    params: dict[str, Any] = {
        "roles": [t.role for t in refs], "schemas": [t.schema for t in refs],
        "public_db": list(PUBLIC_DATABASE_PRIVILEGES),
    }
    queries = {
        "attributes": Q_ATTRIBUTES, "membership": Q_MEMBERSHIP, "schema": Q_SCHEMA, "relation": Q_RELATION,
        "routine": Q_ROUTINE, "database": Q_DATABASE, "ownership": Q_OWNERSHIP,
    }
    if conn.info.server_version >= 150000:  # pg_parameter_acl came with 15
        queries["parameter"] = Q_PARAMETER
    rows: dict[str, list[dict[str, Any]]] = {}
    async with conn.transaction():
        await _limits(conn, statement_timeout, lock_timeout)
        await conn.execute("SET TRANSACTION READ ONLY")
        for name, query in queries.items():
            # Packaged SQL text, no input in it: the roles and schemas are parameters.
            cur = await conn.execute(ROLES + sql.SQL(query), params)
            rows[name] = [dict(r) for r in await cur.fetchall()]
    return findings_from_rows(rows)


async def _limits(conn: Conn, statement_timeout: str, lock_timeout: str) -> None:
    # Built-in functions and operators only: nothing a tenant created is on the search path. No JIT:
    # the routines query's estimate crosses jit_above_cost with a large fleet, and compiling would
    # then cost far more than running these short catalog scans.
    await conn.execute(
        "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true),"
        " pg_catalog.set_config('statement_timeout', %s, true), pg_catalog.set_config('lock_timeout', %s, true),"
        " pg_catalog.set_config('jit', 'off', true)",
        [statement_timeout, lock_timeout],
    )


_REVOKE_ALL = sql.SQL("REVOKE ALL ON {} {} FROM {} CASCADE")


def revoke_statement(f: Finding, *, server_version: int) -> sql.Composed | None:
    """The statement that takes ``f`` back; None for what is not a grant (ownership)."""
    role = sql.Identifier(f.role)
    if f.kind is Kind.MEMBERSHIP:
        stmt = sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(f.name), role)
        if server_version >= 160000 and f.grantor:
            # Since 16 a membership is revoked per grantor; the grantor's rights are needed.
            stmt = sql.SQL("{} GRANTED BY {}").format(stmt, sql.Identifier(f.grantor))
        return stmt
    if f.kind is Kind.ATTRIBUTE:
        if f.name not in ATTRIBUTES.values():
            raise ValueError(f"unknown role attribute {f.name!r}")
        return sql.SQL("ALTER ROLE {} {}").format(role, sql.SQL("NO" + f.name))
    if f.kind is Kind.SCHEMA:
        return _REVOKE_ALL.format(sql.SQL("SCHEMA"), sql.Identifier(f.name), role)
    if f.kind is Kind.RELATION:
        keyword = "SEQUENCE" if f.object_type == "sequence" else "TABLE"  # TABLE also revokes column grants
        return _REVOKE_ALL.format(sql.SQL(keyword), sql.Identifier(f.schema or "", f.name), role)
    if f.kind is Kind.ROUTINE:
        args = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in f.args)
        target = sql.SQL("{}({})").format(sql.Identifier(f.schema or "", f.name), args)
        return _REVOKE_ALL.format(sql.SQL("ROUTINE"), target, role)
    if f.kind is Kind.DATABASE:
        if f.object_type == "tablespace":
            return _REVOKE_ALL.format(sql.SQL("TABLESPACE"), sql.Identifier(f.name), role)
        privileges = [p for p in f.privileges if p in DATABASE_PRIVILEGES]
        if not privileges:
            return None
        return sql.SQL("REVOKE {} ON DATABASE {} FROM {} CASCADE").format(
            sql.SQL(", ").join(sql.SQL(p) for p in privileges), sql.Identifier(f.name), role)
    if f.kind is Kind.PARAMETER:
        return _REVOKE_ALL.format(sql.SQL("PARAMETER"), sql.Identifier(f.name), role)
    return None


def acting_as(f: Finding, tenant_roles: Iterable[str]) -> str | None:
    """The tenant role whose membership a revocation takes: the object's owner, when that is a
    tenant (another one's table granted to this one). Grants on objects of any other owner are
    revoked with the operator's own rights, or not at all."""
    if f.kind in (Kind.SCHEMA, Kind.RELATION, Kind.ROUTINE) and f.owner and f.owner != f.role:
        return f.owner if f.owner in set(tenant_roles) else None
    return None


async def revoke(
    conn: Conn, findings: Sequence[Finding], tenant_roles: Iterable[str], *,
    statement_timeout: str = DEFAULT_STATEMENT_TIMEOUT, lock_timeout: str = DEFAULT_LOCK_TIMEOUT,
) -> dict[tuple[Any, ...], str]:
    """Revoke each finding in its own transaction; returns why each one that failed did
    (a statement that silently revoked nothing shows up only in the next audit)."""
    roles = set(tenant_roles)
    failed: dict[tuple[Any, ...], str] = {}
    for f in sorted(findings, key=lambda f: ORDER[f.kind]):
        stmt = revoke_statement(f, server_version=conn.info.server_version)
        if stmt is None:
            failed[f.key] = "not a grant: drop or reassign it by hand"
            continue
        owner = acting_as(f, roles)
        try:
            async with conn.transaction():
                await _limits(conn, statement_timeout, lock_timeout)
                if owner:
                    await conn.execute(role_sql.grant_role_to_operator(owner))
                await conn.execute(stmt)
                if owner:
                    await conn.execute(role_sql.revoke_role_from_operator(owner))
        except psycopg.Error as exc:
            failed[f.key] = _why(exc)
    return failed


def _why(exc: psycopg.Error) -> str:
    diag = getattr(exc, "diag", None)
    state = getattr(diag, "sqlstate", None) or ""
    name = type(exc).__name__
    return f"{name} ({state})" if state else name


async def audit(
    conn: Conn, control: str, *, fix: bool, namespaces: Iterable[str] = (),
    tenants: dict[str, TenantRef] | None = None,
    statement_timeout: str = DEFAULT_STATEMENT_TIMEOUT, lock_timeout: str = DEFAULT_LOCK_TIMEOUT,
) -> Report:
    """Audit every live tenant of this database (or ``tenants``); with ``fix``, revoke what can be
    and audit again, so the report says what was taken back and what is still held."""
    if tenants is None:
        tenants = await live_tenants(conn, control, namespaces)
    limits = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}
    findings = await find(conn, tenants, **limits)
    report = Report(tenants, findings)
    if not fix or not findings:
        return report
    report.fixed = True
    errors = await revoke(conn, findings, tenants, **limits)
    still = {f.key for f in await find(conn, {r: tenants[r] for r in {f.role for f in findings}}, **limits)}
    for f in findings:
        if f.key not in still:
            report.revoked.add(f.key)
        else:
            report.not_revoked[f.key] = errors.get(f.key) or "the operator's login lacks the rights"
    return report
