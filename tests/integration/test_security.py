"""Isolation between tenants, with real logins, for every ordered pair."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, as_owner, connect, sql_value, tenant

PLURAL = "tenants"


def test_isolation_matrix(stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    members = {"iso-red": "default", "iso-green": "default", "iso-blue": "second"}
    for name, target in members.items():
        cluster.create(PLURAL, namespace, tenant(name, database=target))
    creds = {}
    for name in members:
        cluster.wait_condition(PLURAL, namespace, name)
        creds[name] = cluster.secret_data(namespace, f"{name}-db")
        owner = "tenant_" + name.replace("-", "_")
        with as_owner(stack.admin_dsn(members[name]), owner) as conn:  # what the tenant's migrations do
            conn.execute("CREATE TABLE private (v text)")
            conn.execute("CREATE FUNCTION secret_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'")
            conn.execute("GRANT EXECUTE ON FUNCTION secret_fn() TO PUBLIC")  # callable by anyone who reaches it
        with connect(creds[name]["uri"]) as conn:
            conn.execute("INSERT INTO private VALUES ('belongs to ' || current_user)")

    for a, b in itertools.permutations(members, 2):
        schema_b = "tenant_" + b.replace("-", "_")
        owner_a = "tenant_" + a.replace("-", "_")
        # A's application login, and A's owner (what A's migrations run as) on A's server.
        for session in (connect(creds[a]["uri"]), as_owner(stack.admin_dsn(members[a]), owner_a)):
            with session as conn:
                for statement in (
                    f"SELECT * FROM {schema_b}.private",
                    f"INSERT INTO {schema_b}.private VALUES ('intruder')",
                    f"SELECT {schema_b}.secret_fn()",
                    f"CREATE TABLE {schema_b}.planted (v int)",
                    f"DROP TABLE {schema_b}.private",
                ):
                    with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable,
                                        psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedFunction)):
                        conn.execute(statement)
                # Listing: the catalog shows nothing inside B's schema to A.
                listed = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                                      [schema_b]).fetchone()
                assert listed == (0,), f"{a} can list {b}'s tables"
        if members[a] != members[b]:
            # A's login does not exist on B's database server at all.
            other = creds[b]
            with pytest.raises(psycopg.OperationalError):
                connect(f"postgresql://{creds[a]['user']}:{creds[a]['password']}@{other['host']}:{other['port']}"
                        f"/{other['dbname']}")

    for name in members:
        with connect(creds[name]["uri"]) as conn:
            for statement in ("SELECT * FROM tenancy.tenants", "SELECT * FROM tenancy.lifecycle_jobs",
                              "CREATE TABLE public.planted (v int)", "CREATE SCHEMA sneaky",
                              "ALTER ROLE CURRENT_USER CONNECTION LIMIT 1000", "CREATE ROLE accomplice"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
            assert conn.execute("SELECT count(*) FROM private").fetchone() == (1,)


def test_operator_login_is_not_a_superuser(stack: LocalStack) -> None:
    for target in ("default", "second"):
        row = sql_value(stack.operator_dsn(target),
                        "SELECT rolsuper::text || rolcreatedb::text || rolbypassrls::text FROM pg_roles"
                        " WHERE rolname = current_user")
        assert row == "falsefalsefalse"


def test_suspended_tenant_cannot_log_in(cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    cluster.create(PLURAL, namespace, tenant("iso-sleeper", state="Suspended"))
    cluster.wait_condition(PLURAL, namespace, "iso-sleeper", reason="Suspended")
    with pytest.raises(psycopg.OperationalError):
        connect(cluster.secret_data(namespace, "iso-sleeper-db")["uri"])
