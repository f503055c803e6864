"""Moving a tenant between database targets by changing spec.database: the session's two targets
are separate PostgreSQL clusters (default: residency eu, second: residency us)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, as_owner, connect, eventually, sql_value, tenant
from .test_archives import archive_with_rows

PLURAL = "tenants"


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.get(PLURAL, namespace, name).get("status") or {}


@contextlib.contextmanager
def squatted(stack: LocalStack, schema: str) -> Iterator[None]:
    """Someone else's schema of the tenant's name on the second target, for the block: a move
    there is refused (MoveRefused)."""
    with connect(stack.admin_dsn("second")) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield
    finally:
        with connect(stack.admin_dsn("second")) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(schema)))


def can_login(admin_dsn: str, ident: str) -> list[bool]:
    with connect(admin_dsn) as conn:
        rows = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname LIKE %s ORDER BY rolname",
                            [f"tl_{ident.removeprefix('tenant_')}_%"]).fetchall()
    return [bool(r[0]) for r in rows]


def test_a_tenant_moves_with_its_data_verified_and_its_secret_switched(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("nomad", moveGracePeriod="20s"))
    cluster.wait_condition(PLURAL, namespace, "nomad")
    with as_owner(stack.admin_dsn(), "tenant_nomad") as owner:
        owner.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    with connect(cluster.secret_data(namespace, "nomad-db")["uri"]) as conn:
        conn.execute("INSERT INTO ledger SELECT g, 'entry ' || g FROM generate_series(1, 1000) g")
    before = cluster.secret_data(namespace, "nomad-db")

    cluster.patch(PLURAL, namespace, "nomad", {"spec": {"database": "second"}})

    def moved() -> dict[str, Any]:
        st = status(cluster, namespace, "nomad")
        assert st.get("database") == "second" and st.get("lastMove"), st
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True", ready
        return st

    st = eventually(moved, timeout=120, what="nomad moved to second and Ready")
    move = st["lastMove"]
    assert (move["source"], move["destination"]) == ("default", "second")
    assert move["rows"] >= 1000 and move["tables"] >= 1 and move["writeDowntimeSeconds"] > 0
    assert move["archive"] and cluster.get("tenantarchives", namespace, move["archive"])

    # The Secret names the destination; the application reads and writes there.
    after = cluster.secret_data(namespace, "nomad-db")
    second_port = str(psycopg.conninfo.conninfo_to_dict(stack.admin_dsn("second"))["port"])
    assert after["port"] == second_port and after["port"] != before["port"]
    with connect(after["uri"]) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM ledger").fetchone() == (1000, 500500)
        conn.execute("INSERT INTO ledger VALUES (1001, 'after the move')")
    cluster.wait_event(namespace, "nomad", "Moved")
    jobs = {j["kind"]: j for j in st.get("recentJobs") or []}
    assert "move" in jobs and "writes stopped" in (jobs["move"].get("message") or ""), st.get("recentJobs")
    assert sql_value(stack.admin_dsn("default"), "SELECT j.state FROM tenancy.lifecycle_jobs j JOIN tenancy.tenants t"
                     " ON t.id = j.tenant_id WHERE t.namespace = %s AND t.name = 'nomad' AND j.kind = 'move'",
                     [namespace]) == "succeeded"

    # The old copy: kept with every login off, then dropped after the grace period.
    admin = stack.admin_dsn("default")
    assert sql_value(admin, "SELECT state FROM tenancy.tenants WHERE namespace = %s AND name = 'nomad'"
                     " ORDER BY created_at DESC LIMIT 1", [namespace]) in ("moved", "dropped")
    assert not any(can_login(admin, "tenant_nomad"))
    try:
        with psycopg.connect(before["uri"], connect_timeout=5):
            raise AssertionError("the old login still works on the source")
    except psycopg.OperationalError:
        pass
    eventually(lambda: sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_nomad'") == 0,
               timeout=90, what="the source copy dropped after the grace period")
    assert sql_value(admin, "SELECT count(*) FROM pg_roles WHERE rolname = 'tenant_nomad'") == 0
    with connect(after["uri"]) as conn:  # the destination untouched by that
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1001,)


def test_a_move_the_destination_cannot_take_leaves_the_source_serving(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("rooted"))
    cluster.wait_condition(PLURAL, namespace, "rooted")
    with as_owner(stack.admin_dsn(), "tenant_rooted") as owner:
        owner.execute("CREATE TABLE t (v int)")
    uri = cluster.secret_data(namespace, "rooted-db")["uri"]
    with connect(uri) as conn:
        conn.execute("INSERT INTO t VALUES (7)")
    # Someone else's schema of that name on the destination.
    with squatted(stack, "tenant_rooted"):
        cluster.patch(PLURAL, namespace, "rooted", {"spec": {"database": "second"}})
        found = cluster.wait_condition(PLURAL, namespace, "rooted", status="False", reason="MoveRefused")
        message = next(c for c in found["status"]["conditions"] if c["type"] == "Ready")["message"]
        assert "did not create for this Tenant" in message, message
        assert found["status"]["database"] == "default"
        with connect(uri) as conn:  # the source serves, untouched
            assert conn.execute("SELECT v FROM t").fetchone() == (7,)
        assert sql_value(stack.admin_dsn("second"), "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_rooted'"
                         ) == 0
        # Back to where it is: Ready again, nothing moved.
        cluster.patch(PLURAL, namespace, "rooted", {"spec": {"database": "default"}})
        cluster.wait_condition(PLURAL, namespace, "rooted")


def test_a_move_that_would_break_placement_is_refused(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("settled", placement={"requiredLabels": {"residency": "eu"}}))
    cluster.wait_condition(PLURAL, namespace, "settled")
    uri = cluster.secret_data(namespace, "settled-db")["uri"]
    cluster.patch(PLURAL, namespace, "settled", {"spec": {"database": "second"}})
    cluster.wait_condition(PLURAL, namespace, "settled", status="False", reason="PlacementViolation")
    with connect(uri) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert sql_value(stack.admin_dsn("second"), "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_settled'"
                     ) == 0


def test_a_move_that_fails_after_the_cut_turns_the_source_back_on(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """The archive store is down when the move archives the source: the source's logins come back,
    the application keeps working there, and the move completes once the store is back (retry)."""
    cluster.create(PLURAL, namespace, tenant("drifter"))
    cluster.wait_condition(PLURAL, namespace, "drifter")
    with as_owner(stack.admin_dsn(), "tenant_drifter") as owner:
        owner.execute("CREATE TABLE t (v int)")
    uri = cluster.secret_data(namespace, "drifter-db")["uri"]
    with connect(uri) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    stack.objectstore.stop()
    try:
        cluster.patch(PLURAL, namespace, "drifter", {"spec": {"database": "second"}})
        cond = eventually(
            lambda: (c := cluster.condition(PLURAL, namespace, "drifter", "Ready")).get("reason") == "MoveFailed" and c,
            timeout=90, what="MoveFailed while the store is down")
        assert "the archive of the source failed" in cond["message"], cond
        assert "serves from 'default'" in cond["message"], cond
        assert status(cluster, namespace, "drifter")["database"] == "default"

        def writes_work() -> bool:
            with connect(uri) as conn:
                conn.execute("INSERT INTO t VALUES (2)")
            return True

        eventually(writes_work, timeout=30, what="the source's login on again")
        assert sql_value(stack.admin_dsn("second"), "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_drifter'"
                         ) == 0
    finally:
        stack.objectstore.start()
    cluster.patch(PLURAL, namespace, "drifter", {"metadata": {"annotations": {"tenancy.dev/retry": "store-back"}}})

    def moved() -> dict[str, Any]:
        st = status(cluster, namespace, "drifter")
        assert st.get("database") == "second" and st.get("lastMove"), st
        return st

    eventually(moved, timeout=120, what="the move done once the store is back")
    with connect(cluster.secret_data(namespace, "drifter-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] >= 2


def test_a_restored_tenant_moves_and_stays_ready(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A Tenant that still carries spec.restoreFrom (its archive lives in the source's catalog) moves:
    the restore is not attempted again on the destination, and the Tenant is Ready there."""
    archive = archive_with_rows(stack, cluster, namespace, "wanderer", rows=300)["metadata"]["name"]
    cluster.create(PLURAL, namespace, tenant("wanderer", restoreFrom=archive, moveGracePeriod="1h"))
    cluster.wait_condition(PLURAL, namespace, "wanderer", timeout=90)
    with connect(cluster.secret_data(namespace, "wanderer-db")["uri"]) as conn:
        conn.execute("INSERT INTO ledger VALUES (301, 'after the restore')")

    cluster.patch(PLURAL, namespace, "wanderer", {"spec": {"database": "second"}})

    def moved() -> dict[str, Any]:
        st = status(cluster, namespace, "wanderer")
        ready = next(c for c in st.get("conditions") or [] if c["type"] == "Ready")
        assert st.get("database") == "second" and ready["status"] == "True", (st.get("database"), ready)
        return st

    eventually(moved, timeout=120, what="wanderer moved to second and Ready")
    with connect(cluster.secret_data(namespace, "wanderer-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM ledger").fetchone() == (301, 45451)
    # Reconciled again on the destination (a spec change; wait_condition waits for its generation):
    # still Ready, no restore looked for in the destination's catalog.
    cluster.patch(PLURAL, namespace, "wanderer", {"spec": {"moveGracePeriod": "2h"}})
    cluster.wait_condition(PLURAL, namespace, "wanderer")
    assert not cluster.has_event(namespace, "wanderer", "ArchiveNotFound")


def test_a_tenant_deleted_while_its_move_is_refused_is_deleted_where_it_lives(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """spec.database names the destination, the data is still on the source: the deletion policy
    applies on the source (no schema left behind with its logins on), and the destination's schema
    that the operator did not create stays."""
    cluster.create(PLURAL, namespace, tenant("castaway", deletionPolicy="Delete"))
    cluster.wait_condition(PLURAL, namespace, "castaway")
    with as_owner(stack.admin_dsn(), "tenant_castaway") as owner:
        owner.execute("CREATE TABLE t (v int)")
    with squatted(stack, "tenant_castaway"):
        cluster.patch(PLURAL, namespace, "castaway", {"spec": {"database": "second"}})
        cluster.wait_condition(PLURAL, namespace, "castaway", status="False", reason="MoveRefused")
        cluster.delete(PLURAL, namespace, "castaway")
        eventually(lambda: cluster.gone(PLURAL, namespace, "castaway"), timeout=60, what="castaway deleted")
        admin = stack.admin_dsn("default")
        assert sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_castaway'") == 0
        assert sql_value(admin, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tenant_castaway%%'"
                         " OR rolname LIKE 'tl_castaway_%%'") == 0
        assert sql_value(stack.admin_dsn("second"),
                         "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_castaway'") == 1


def test_a_quota_keeps_applying_where_the_tenant_serves_while_its_move_is_refused(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """The Quota follows status.database (where the data is), not spec.database (where a refused
    move would take it): a changed limit still reaches the source's role, and once moved, the
    destination's."""
    cluster.create(PLURAL, namespace, tenant("moored"))
    cluster.wait_condition(PLURAL, namespace, "moored")
    cluster.create("quotas", namespace, {"apiVersion": "tenancy.dev/v1alpha1", "kind": "Quota",
                                         "metadata": {"name": "moored"},
                                         "spec": {"tenantRef": {"name": "moored"}, "limits": {"connections": 4}}})
    admin = stack.admin_dsn("default")
    limit = "SELECT rolconnlimit FROM pg_roles WHERE rolname = 'tenant_moored'"
    eventually(lambda: sql_value(admin, limit) == 4, timeout=30, what="the quota on the source")
    with squatted(stack, "tenant_moored"):
        cluster.patch(PLURAL, namespace, "moored", {"spec": {"database": "second"}})
        cluster.wait_condition(PLURAL, namespace, "moored", status="False", reason="MoveRefused")
        cluster.patch("quotas", namespace, "moored", {"spec": {"limits": {"connections": 6}}})
        eventually(lambda: sql_value(admin, limit) == 6, timeout=30, what="the new limit on the source")
        cluster.wait_condition("quotas", namespace, "moored")
    # The destination free now: the move done after a retry, the limit follows the tenant there.
    cluster.patch(PLURAL, namespace, "moored", {"metadata": {"annotations": {"tenancy.dev/retry": "freed"}}})
    eventually(lambda: status(cluster, namespace, "moored").get("database") == "second", timeout=120,
               what="moored moved to second")
    eventually(lambda: sql_value(stack.admin_dsn("second"), limit) == 6, timeout=30,
               what="the limit on the destination's role")
