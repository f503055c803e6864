"""Red team: each attack of a hostile tenant or namespace user, done as the attacker would do it,
through the real API server and PostgreSQL, with nothing but what the attacker holds: the tenant's
Secret (its application login: data privileges only), what its migrations run as (its owner role,
through a template it writes; the tests take that role with ``as_owner``), or the right to write
objects in its own namespace.

The module runs its own stack: one PostgreSQL server holding two database targets (``default``
and ``shared``, as two targets on one managed server would be), and an operator whose migration
deadline is short enough to watch it act.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, as_owner, connect, eventually, own_stack, sql_value, tenant

PLURAL = "tenants"
DEADLINE_SECONDS = 20


@dataclass
class RedTeam:
    stack: LocalStack
    cluster: Cluster
    operator: OperatorProcess

    @property
    def admin(self) -> str:
        return self.stack.admin_dsn()

    @property
    def shared_admin(self) -> str:
        return self.admin.rsplit("/", 1)[0] + "/tenancy_shared"

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.stack.kubectl("create", "namespace", name)
        return name

    def template(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": data})

    def login(self, namespace: str, name: str) -> str:
        return self.cluster.secret_data(namespace, f"{name}-db")["uri"]

    def role_exists(self, role: str) -> bool:
        return bool(sql_value(self.admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s", [role]))

    def memberships(self, role: str) -> list[str]:
        with connect(self.admin) as conn:
            rows = conn.execute(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
                " JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s", [role]).fetchall()
        return [str(r[0]) for r in rows]

    def reason(self, namespace: str, name: str) -> str:
        cond = self.cluster.condition(PLURAL, namespace, name, "Ready")
        return str(cond.get("reason", ""))


@pytest.fixture(scope="module")
def red(request: pytest.FixtureRequest) -> Iterator[RedTeam]:
    with own_stack(request, "redteam") as stack:
        with connect(stack.admin_dsn()) as conn:  # a second database target on the same server
            conn.execute("CREATE DATABASE tenancy_shared")
            conn.execute("GRANT CREATE, CONNECT ON DATABASE tenancy_shared TO tenancy_operator")
        default = stack.operator_dsn()
        targets = {"default": default, "shared": default.rsplit("/", 1)[0] + "/tenancy_shared"}
        operator = OperatorProcess(stack, stack.workdir, sweep_interval=2.0, env={
            "TENANCY_DATABASE_TARGETS": json.dumps(targets),
            "TENANCY_MIGRATION_DEADLINE_SECONDS": str(DEADLINE_SECONDS),
            "TENANCY_MIGRATION_CONCURRENCY": "4",
            "TENANCY_JOB_MAX_ATTEMPTS": "1",
            "TENANCY_QUOTA_INTERVAL_SECONDS": "2",
        })
        try:
            operator.start()
            yield RedTeam(stack, Cluster(stack.kubeconfig), operator)
        finally:
            operator.stop()


def test_a_view_in_place_of_the_migration_record_runs_nothing_with_operator_rights(red: RedTeam) -> None:
    """The tenant swaps its migration record for a view over its own function, which creates a role
    and grants the tenant pg_read_all_data when it runs with the operator's rights."""
    ns = red.namespace("escalate")
    red.template(ns, "shop", {"0001_init.sql": "CREATE TABLE items (id int);"})
    red.cluster.create(PLURAL, ns, tenant("victim"))
    red.cluster.create(PLURAL, ns, tenant("mallory", schemaTemplate="shop"))
    red.cluster.wait_condition(PLURAL, ns, "victim")
    red.cluster.wait_condition(PLURAL, ns, "mallory")
    with as_owner(red.admin, "tenant_victim") as conn:
        conn.execute("CREATE TABLE secrets (v text)")
    with connect(red.login(ns, "victim")) as conn:
        conn.execute("INSERT INTO secrets VALUES ('victim data')")
    pwned = f"redteam_{uuid.uuid4().hex[:8]}"
    with as_owner(red.admin, "tenant_mallory") as conn:  # as a migration of Mallory's would
        conn.execute("ALTER TABLE tenancy_schema_migrations RENAME TO real_records")
        conn.execute(sql.SQL("""
            CREATE FUNCTION records() RETURNS TABLE(version text, checksum text) LANGUAGE plpgsql AS $f$
            BEGIN
                BEGIN
                    EXECUTE 'CREATE ROLE {pwned}';
                    EXECUTE 'GRANT pg_read_all_data TO tenant_mallory';
                EXCEPTION WHEN insufficient_privilege OR duplicate_object THEN NULL;
                END;
                RETURN QUERY SELECT r.version, r.checksum FROM tenant_mallory.real_records r;
            END $f$""").format(pwned=sql.SQL(pwned)))
        conn.execute("CREATE VIEW tenancy_schema_migrations AS SELECT * FROM records()")
        # Drift the operator repairs, so that it looks at the tenant again.
        conn.execute("ALTER ROLE CURRENT_USER SET search_path = public")
    obj = red.cluster.get(PLURAL, ns, "mallory")
    red.cluster.patch(PLURAL, ns, "mallory", {"spec": {"displayName": "Mallory, edited"}})
    red.cluster.wait_condition(PLURAL, ns, "mallory")
    eventually(lambda: sql_value(red.admin, "SELECT 'search_path=tenant_mallory' = ANY(rolconfig) FROM pg_roles"
                                 " WHERE rolname = 'tenant_mallory'"), timeout=60, what="search_path repaired")
    assert red.cluster.get(PLURAL, ns, "mallory")["metadata"]["generation"] > obj["metadata"]["generation"]

    assert not red.role_exists(pwned), "tenant code ran with the operator's rights"
    assert red.memberships("tenant_mallory") == []
    assert red.memberships(red.cluster.secret_data(ns, "mallory-db")["user"]) == []
    with connect(red.login(ns, "mallory")) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM tenant_victim.secrets")


def test_restore_runs_tenant_code_with_the_tenant_rights_only(red: RedTeam) -> None:
    """A CHECK constraint calls a function that does RESET ROLE and creates a role: under
    ``pg_restore --role`` in an operator session that would be the operator."""
    ns = red.namespace("restore")
    red.cluster.create(PLURAL, ns, tenant("vault", deletionPolicy="Archive"))
    red.cluster.wait_condition(PLURAL, ns, "vault")
    pwned = f"redteam_{uuid.uuid4().hex[:8]}"
    with as_owner(red.admin, "tenant_vault") as conn:  # as a migration of the tenant's would
        conn.execute(sql.SQL("""
            CREATE FUNCTION audit(v int) RETURNS boolean LANGUAGE plpgsql AS $f$
            BEGIN
                BEGIN
                    RESET ROLE;
                    EXECUTE 'CREATE ROLE {pwned}';
                EXCEPTION WHEN insufficient_privilege OR duplicate_object THEN NULL;
                END;
                RETURN true;
            END $f$""").format(pwned=sql.SQL(pwned)))
        conn.execute("CREATE TABLE gold (v int CHECK (audit(v)))")
        conn.execute("GRANT EXECUTE ON FUNCTION audit(int) TO PUBLIC")
    # Rows go in through the application's login (the test's owner session is a superuser's SET
    # ROLE, which the function's RESET ROLE would leave).
    with connect(red.login(ns, "vault")) as conn:
        conn.execute("INSERT INTO gold SELECT generate_series(1, 10)")
    assert not red.role_exists(pwned)
    red.cluster.delete(PLURAL, ns, "vault")
    eventually(lambda: red.cluster.gone(PLURAL, ns, "vault"), timeout=90, what="archived and gone")
    assert not red.role_exists(pwned)

    red.cluster.create(PLURAL, ns, tenant("vault", restoreFrom="latest"))
    red.cluster.wait_condition(PLURAL, ns, "vault", timeout=90)
    with connect(red.login(ns, "vault")) as conn:
        assert conn.execute("SELECT count(*) FROM gold").fetchone() == (10,)
    assert not red.role_exists(pwned), "tenant code ran with the operator's rights during the restore"
    # No temporary login is left behind.
    assert sql_value(red.admin, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tenancy\\_delegate\\_%'") == 0


def test_a_hanging_template_in_one_namespace_does_not_stall_another(red: RedTeam) -> None:
    """Migrations that lift their server-side timeout and sleep, in one namespace, hold at most
    their share of the migration slots until the client-side deadline ends their sessions."""
    hostile = red.namespace("sleepy")
    red.template(hostile, "sleepy", {"0001_sleep.sql": "SET LOCAL statement_timeout = 0; SELECT pg_sleep(100000);"})
    sleepers = [f"sleeper-{i}" for i in range(6)]
    for name in sleepers:
        red.cluster.create(PLURAL, hostile, tenant(name, schemaTemplate="sleepy"))

    def sleeping() -> int:  # migrations log in as a temporary delegate of the tenant's owner
        return int(sql_value(red.admin, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(100000)%%'"
                             " AND usename LIKE 'tenancy\\_delegate\\_%%'"))

    eventually(lambda: sleeping() >= 3, timeout=60, what="the hostile migrations hold their slots")

    calm = red.namespace("calm")
    red.cluster.create(PLURAL, calm, tenant("calm"))
    red.cluster.wait_condition(PLURAL, calm, "calm", timeout=120)
    # Provisioned while the hostile migrations still ran: it did not wait for their deadline.
    assert all(red.reason(hostile, n) != "MigrationTimeout" for n in sleepers)
    assert sleeping() >= 1

    # Past the deadline each hanging migration is ended and reported.
    first = red.cluster.wait_condition(PLURAL, hostile, sleepers[0], status="False", reason="MigrationTimeout",
                                       timeout=DEADLINE_SECONDS * 6)
    message = next(c for c in first["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "deadline" in message
    red.cluster.wait_event(hostile, sleepers[0], "MigrationTimeout", "Warning", timeout=30)
    with connect(red.admin) as conn:
        errors = conn.execute(
            "SELECT j.error FROM tenancy.lifecycle_jobs j JOIN tenancy.tenants t ON t.id = j.tenant_id"
            " WHERE t.namespace = %s AND t.name = %s AND j.kind = 'migrate'", [hostile, sleepers[0]]).fetchall()
    assert errors and all("deadline" in str(e[0]) for e in errors)
    for name in sleepers:
        red.cluster.wait_condition(PLURAL, hostile, name, status="False", reason="MigrationTimeout",
                                   timeout=DEADLINE_SECONDS * 6)
    eventually(lambda: sleeping() == 0, timeout=30, what="no hanging migration left running on the server")

    # Deleting them ends it: nothing keeps trying.
    red.cluster.core.delete_namespaced_config_map("sleepy", hostile)
    for name in sleepers:
        red.cluster.delete(PLURAL, hostile, name)
    for name in sleepers:
        eventually(lambda n=name: red.cluster.gone(PLURAL, hostile, n), timeout=60, what=f"{name} deleted")
    assert sleeping() == 0


def test_a_planted_secret_is_never_adopted(red: RedTeam) -> None:
    """The namespace user creates ``<tenant>-db`` first, with a password it chose and keys of its own."""
    ns = red.namespace("planted")
    planted = {"password": "chosen-by-the-namespace-user", "note": "mine"}
    red.cluster.core.create_namespaced_secret(ns, {
        "metadata": {"name": "prey-db"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in planted.items()},
    })
    red.cluster.create(PLURAL, ns, tenant("prey"))
    obj = red.cluster.wait_condition(PLURAL, ns, "prey", status="False", reason="Conflict")
    message = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "Secret" in message and "prey-db" in message
    assert red.cluster.secret_data(ns, "prey-db") == planted, "the planted Secret was changed"
    port = red.stack.postgres["default"].port
    with connect(red.admin) as conn:
        roles = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = 'tenant_prey'"
                                            " OR rolname LIKE 'tl\\_prey\\_%'")]
    for role in roles:  # neither the owner nor any login takes the planted password
        with pytest.raises(psycopg.OperationalError):
            connect(f"postgresql://{role}:{planted['password']}@127.0.0.1:{port}/tenancy")

    # Once the object in the way is gone, the tenant gets its own.
    red.cluster.core.delete_namespaced_secret("prey-db", ns)
    red.cluster.wait_condition(PLURAL, ns, "prey", timeout=60)
    creds = red.cluster.secret_data(ns, "prey-db")
    assert creds["password"] != planted["password"] and "note" not in creds
    with connect(creds["uri"]) as conn:
        conn.execute("SELECT 1")


def test_an_archive_restores_only_into_its_own_namespace(red: RedTeam) -> None:
    """Another namespace names the archive id of a same-named Tenant it does not own."""
    owner, thief = red.namespace("owner"), red.namespace("thief")
    red.cluster.create(PLURAL, owner, tenant("ledger", deletionPolicy="Archive"))
    red.cluster.wait_condition(PLURAL, owner, "ledger")
    with as_owner(red.admin, "tenant_ledger") as conn:
        conn.execute("CREATE TABLE entries (v text)")
    with connect(red.login(owner, "ledger")) as conn:
        conn.execute("INSERT INTO entries VALUES ('owner only')")
    red.cluster.delete(PLURAL, owner, "ledger")
    eventually(lambda: red.cluster.gone(PLURAL, owner, "ledger"), timeout=90, what="archived")
    archive_id = sql_value(red.admin, "SELECT id FROM tenancy.tenant_archives WHERE namespace = %s", [owner])
    assert archive_id

    red.cluster.create(PLURAL, thief, tenant("ledger", restoreFrom=archive_id))
    red.cluster.wait_condition(PLURAL, thief, "ledger", status="False", reason="ArchiveNotFound", timeout=60)
    with connect(red.login(thief, "ledger")) as conn:
        assert conn.execute("SELECT to_regclass('entries')").fetchone() == (None,)


def test_targets_on_one_server_do_not_share_a_role(red: RedTeam) -> None:
    """Two database targets on one PostgreSQL server share its roles: a Tenant of the same name on
    the other target must not take over the first one's role."""
    first, second = red.namespace("first"), red.namespace("second")
    red.cluster.create(PLURAL, first, tenant("twin", database="default"))
    red.cluster.wait_condition(PLURAL, first, "twin")
    uri = red.login(first, "twin")
    red.cluster.create(PLURAL, second, tenant("twin", database="shared", deletionPolicy="Delete"))
    obj = red.cluster.wait_condition(PLURAL, second, "twin", status="False", reason="Conflict")
    message = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert f"{first}/twin" in message
    with connect(uri) as conn:
        conn.execute("SELECT 1")

    red.cluster.delete(PLURAL, second, "twin")
    eventually(lambda: red.cluster.gone(PLURAL, second, "twin"), timeout=60, what="second twin deleted")
    assert red.role_exists("tenant_twin")
    with connect(uri) as conn:
        conn.execute("SELECT 1")
    assert sql_value(red.shared_admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_twin'") == 0


def test_a_tenant_lock_does_not_stop_usage_measurement_of_others(red: RedTeam) -> None:
    """A tenant holds ACCESS EXCLUSIVE on its table in an open transaction; the usage of another
    tenant on the same target is still measured."""
    ns = red.namespace("locks")
    red.cluster.create(PLURAL, ns, tenant("holder"))
    red.cluster.create(PLURAL, ns, tenant("neighbour"))
    red.cluster.wait_condition(PLURAL, ns, "holder")
    red.cluster.wait_condition(PLURAL, ns, "neighbour")
    with as_owner(red.admin, "tenant_holder") as conn:
        conn.execute("CREATE TABLE hoard (v text)")
    with as_owner(red.admin, "tenant_neighbour") as conn:
        conn.execute("CREATE TABLE blobs (payload text)")
    with connect(red.login(ns, "holder")) as holder:  # the application's login may lock its own table
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE hoard IN ACCESS EXCLUSIVE MODE")
        with connect(red.login(ns, "neighbour")) as conn:
            conn.execute("INSERT INTO blobs SELECT repeat(md5(g::text), 16) FROM generate_series(1, 2500) g")
        red.cluster.create("quotas", ns, {
            "apiVersion": "tenancy.dev/v1alpha1", "kind": "Quota", "metadata": {"name": "neighbour"},
            "spec": {"tenantRef": {"name": "neighbour"}, "storage": "1Gi"},
        })

        def measured() -> Any:
            used = (red.cluster.get("quotas", ns, "neighbour").get("status") or {}).get("used") or {}
            storage = str(used.get("storage", "0"))
            return storage not in ("0", "") and storage

        eventually(measured, timeout=60, what="the neighbour's storage measured while the lock is held")
        assert holder.execute("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND granted"
                              " AND relation = 'hoard'::regclass").fetchone() == (1,)
        holder.execute("ROLLBACK")
