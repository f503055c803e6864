"""TenancyIsolationViolation (cross-tenant access detected): privileges a tenant role was given beyond its own schema.

Written as the incident happens: someone with the rights (here the PostgreSQL superuser; in the
issue, tenant code that ran with the operator's login) grants a tenant role the predefined
``pg_read_all_data``, another tenant's role, the control schema, another tenant's table and
CREATE on the database. The sweep (every 3 s in tests) must find all of it, revoke what the
operator's login can, and say so (Warning Event, ``IsolationBreach`` condition, metric, log); an
SRE runs the same audit on demand and takes back the rest with an administrator's DSN.

What the operator's login (CREATEROLE, not a superuser) can revoke depends on the server:
before 16 also a superuser's membership grants; from 16 on only the grantor (or a superuser) can.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, as_owner, connect, eventually, sql_value, tenant

PLURAL = "tenants"
THIEF, VICTIM = "aud-thief", "aud-victim"
THIEF_ROLE, VICTIM_ROLE = "tenant_aud_thief", "tenant_aud_victim"


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_DATABASE")}
    return subprocess.run([sys.executable, "-m", "tenancy_operator", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def explicit_grants(admin_dsn: str, role: str) -> set[str]:
    """The role's explicit ACL entries on schemas and relations outside its schema, as the catalog has them."""
    with connect(admin_dsn) as conn:
        rows = conn.execute(
            "SELECT 'schema ' || n.nspname FROM pg_namespace n, aclexplode(n.nspacl) a"
            " WHERE a.grantee = %(r)s::text::regrole AND n.nspname::text <> %(r)s::text"
            " UNION SELECT 'relation ' || c.oid::regclass::text FROM pg_class c, aclexplode(c.relacl) a"
            " WHERE a.grantee = %(r)s::text::regrole AND c.relnamespace <> %(r)s::text::regnamespace",
            {"r": role},
        ).fetchall()
    return {str(r[0]) for r in rows}


def event_messages(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [str(e["message"]) for e in cluster.events(namespace, name)
            if e["reason"] == "IsolationViolation" and e["type"] == "Warning"]


def test_cross_tenant_grants_are_revoked_and_reported(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str,
) -> None:
    for name in (THIEF, VICTIM):
        cluster.create(PLURAL, namespace, tenant(name))
    for name in (THIEF, VICTIM):
        cluster.wait_condition(PLURAL, namespace, name)
    thief = cluster.secret_data(namespace, f"{THIEF}-db")
    victim = cluster.secret_data(namespace, f"{VICTIM}-db")
    with as_owner(stack.admin_dsn(), VICTIM_ROLE) as owner:  # the victim's migration
        owner.execute("CREATE TABLE private (v text)")
    with connect(victim["uri"]) as conn:
        conn.execute("INSERT INTO private VALUES ('the victim''s secret')")
    kinds = ("membership", "schema", "relation", "database")
    before = {k: operator.metric("isolation_violations_total", kind=k) for k in kinds}
    admin = stack.admin_dsn()
    major = int(sql_value(admin, "SHOW server_version_num")) // 10000

    # The incident: one transaction, checked to have taken effect before it commits (the sweep
    # may take it back any moment after).
    t, v = sql.Identifier(THIEF_ROLE), sql.Identifier(VICTIM_ROLE)
    with connect(admin) as conn, conn.transaction():
        conn.execute(sql.SQL("GRANT pg_read_all_data, {} TO {}").format(v, t))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA tenancy TO {}").format(t))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(v, t))
        conn.execute(sql.SQL("GRANT SELECT ON {}.private TO {}").format(v, t))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE tenancy TO {}").format(t))
        held = conn.execute(
            "SELECT pg_has_role(%(t)s, 'pg_read_all_data', 'MEMBER'), pg_has_role(%(t)s, %(v)s, 'MEMBER'),"
            " has_schema_privilege(%(t)s, 'tenancy', 'USAGE'), has_database_privilege(%(t)s, 'tenancy', 'CREATE')",
            {"t": THIEF_ROLE, "v": VICTIM_ROLE}).fetchone()
        assert held == (True, True, True, True)

    revocable = {"USAGE on schema tenancy", f"USAGE on schema {VICTIM_ROLE}",
                 f"SELECT on table {VICTIM_ROLE}.private"}
    memberships = {"member of role pg_read_all_data", f"member of role {VICTIM_ROLE}"}
    not_revocable = {"CREATE on database tenancy"}
    if major < 16:
        revocable |= memberships
    else:
        not_revocable |= memberships

    # The sweep finds it all and says what it did: one Warning Event...
    def reported() -> str:
        messages = event_messages(cluster, namespace, THIEF)
        assert messages, "no IsolationViolation Event yet"
        return messages[0]

    message = eventually(reported, timeout=60, what="IsolationViolation Event on the thief")
    for found in revocable:
        assert f"{found}: revoked" in message, message
    for found in not_revocable:
        assert f"{found}: not revoked" in message, message
    assert thief["password"] not in message and victim["password"] not in message

    # ... the condition, while something is still held ...
    cond = eventually(lambda: cluster.condition(PLURAL, namespace, THIEF, "IsolationBreach"),
                      timeout=30, what="IsolationBreach condition")
    assert cond["status"] == "True", cond
    assert cond["reason"] == "PrivilegesHeld", cond
    assert "CREATE on database tenancy: not revoked" in cond["message"]
    assert thief["password"] not in cond["message"]
    # ... the metric and a warning log line; the victim was never flagged.
    def counted() -> bool:
        for kind, n in {"membership": 2, "schema": 2, "relation": 1, "database": 1}.items():
            assert operator.metric("isolation_violations_total", kind=kind) >= before[kind] + n, kind
        assert operator.metric("isolation_violations_held", kind="database") >= 1
        return True

    eventually(counted, timeout=30, what="isolation_violations_total and _held")
    assert '"isolation violation"' in operator.log_text() and THIEF_ROLE in operator.log_text()
    assert not event_messages(cluster, namespace, VICTIM)
    assert cluster.condition(PLURAL, namespace, VICTIM, "IsolationBreach") == {}

    # What the operator revoked is gone from the catalog and from the thief's login.
    assert explicit_grants(admin, THIEF_ROLE) == set()
    # (The grants went to the thief's owner role, what its migrations run as; its login holds no more either.)
    if major < 16:
        for session in (lambda: as_owner(admin, THIEF_ROLE), lambda: connect(thief["uri"])):
            with session() as conn:
                assert conn.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')",
                                    [VICTIM_ROLE]).fetchone() == (False,)
                for statement in (f"SELECT * FROM {VICTIM_ROLE}.private", "SELECT * FROM tenancy.tenants"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(statement)

    # The SRE's audit on demand, with the operator's DSN: read-only, a line per finding, exit 1.
    result = audit_cli("--dsn", stack.operator_dsn(), "-n", namespace)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert all(f"{namespace}/{THIEF}" in line for line in lines), lines
    assert {line.split("\t")[4] for line in lines} == not_revocable, lines
    assert all(line.endswith("\tfound") for line in lines), lines
    assert sql_value(admin, "SELECT has_database_privilege(%s, 'tenancy', 'CREATE')", [THIEF_ROLE]) is True

    # With an administrator's DSN, --fix takes back the rest.
    result = audit_cli("--dsn", admin, "-n", namespace, "--fix")
    assert result.returncode == 1, result.stderr
    assert {line.split("\t")[4] for line in result.stdout.splitlines()} == not_revocable, result.stdout
    assert all(line.endswith("\trevoked") for line in result.stdout.splitlines()), result.stdout
    for session in (lambda: as_owner(admin, THIEF_ROLE), lambda: connect(thief["uri"])):
        with session() as conn:
            for statement in (f"SELECT * FROM {VICTIM_ROLE}.private", "SELECT * FROM tenancy.tenants",
                              "CREATE SCHEMA sneaky"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    with as_owner(admin, THIEF_ROLE) as owner:
        owner.execute("CREATE TABLE mine (v int)")  # its own schema still works
    with connect(thief["uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM mine").fetchone() == (0,)

    # The next sweep finds the role clean: the condition clears; the audit is clean too.
    def cleared() -> dict[str, Any]:
        c = cluster.condition(PLURAL, namespace, THIEF, "IsolationBreach")
        assert c.get("status") == "False", c
        return c

    assert eventually(cleared, timeout=30, what="IsolationBreach=False")["reason"] == "NoneFound"
    result = audit_cli("--dsn", stack.operator_dsn(), "-n", namespace)
    assert (result.returncode, result.stdout) == (0, ""), result
    cluster.wait_condition(PLURAL, namespace, THIEF)  # Ready all along

