"""Quota behaviour against the real API server, real PostgreSQL and the operator process.

The session operator measures usage every 2 s (TENANCY_QUOTA_INTERVAL_SECONDS in fixtures.py);
every wait below is a poll with a deadline on what a user would look at.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import psycopg
import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator.api.quota import TIER_DEFAULTS

from .harness import GROUP, VERSION, Cluster, OperatorProcess, as_owner, connect, eventually, sql_value, tenant

TENANTS, QUOTAS = "tenants", "quotas"


def quota(name: str, tenant_name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Quota", "metadata": {"name": name},
        "spec": {"tenantRef": {"name": tenant_name}, **spec},
    }


def provision(cluster: Cluster, namespace: str, name: str, **spec: Any) -> str:
    """A Ready tenant; returns its connection URI."""
    cluster.create(TENANTS, namespace, tenant(name, **spec))
    cluster.wait_condition(TENANTS, namespace, name)
    return cluster.secret_data(namespace, f"{name}-db")["uri"]


def published(stack: LocalStack, namespace: str, name: str) -> dict[str, Any]:
    """tenants.quotas of the tenant: what the platform's services read."""
    doc = sql_value(
        stack.admin_dsn(),
        "SELECT quotas FROM tenancy.tenants WHERE namespace = %s AND name = %s"
        " AND state <> ALL('{dropped,archived}')",
        [namespace, name],
    )
    return dict(doc or {})


def role(stack: LocalStack, name: str) -> tuple[int, list[str]]:
    """(rolconnlimit, rolconfig) of the tenant's role."""
    with connect(stack.admin_dsn()) as conn:
        row = conn.execute(
            "SELECT rolconnlimit, coalesce(rolconfig, '{}') FROM pg_roles WHERE rolname = %s",
            ["tenant_" + name.replace("-", "_")],
        ).fetchone()
    assert row is not None
    return int(row[0]), list(row[1])


def connection_limit(stack: LocalStack, name: str) -> int:
    return role(stack, name)[0]


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.get(QUOTAS, namespace, name).get("status") or {})


def fill(uri: str, rows: int = 2500) -> None:
    """Into ``blobs`` (made by the tenant's owner): about 1.5 MB of uncompressed rows (under 2 kB
    each, so TOAST never compresses them)."""
    with connect(uri) as conn:
        conn.execute("INSERT INTO blobs (payload) SELECT repeat(md5(g::text), 16) FROM generate_series(1, %s) g",
                     [rows])


def insert_one(uri: str) -> None:
    with connect(uri) as conn:
        conn.execute("INSERT INTO blobs (payload) VALUES ('one more')")


def later(seconds: float) -> str:
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_tier_defaults_apply_without_quota_and_edits_change_the_registry(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "tiered", tier="starter")
    starter = TIER_DEFAULTS["starter"]

    def defaults_published() -> dict[str, Any]:
        doc = published(stack, namespace, "tiered")
        assert doc.get("connections") == 20, doc
        return doc

    doc = eventually(defaults_published, what="starter defaults in tenants.quotas")
    assert doc["storage"] == "10Gi"
    assert doc["storageBytes"] == 10 * 2**30
    assert doc["statementTimeoutMs"] == 30_000
    assert doc["requestsPerSecond"] == 50
    assert doc["quota"] is None
    assert doc["writesBlocked"] is False

    def role_limited() -> bool:
        limit, config = role(stack, "tiered")
        assert limit == 20, limit
        assert "statement_timeout=30000" in config, config
        return True

    eventually(role_limited, what="role has the tier's connection limit and statement_timeout")
    # The tenant owner sees the limits in the Tenant's status.
    eventually(lambda: cluster.get(TENANTS, namespace, "tiered")["status"].get("effectiveLimits") == starter,
               what="Tenant status.effectiveLimits = tier defaults")

    # A Quota overrides some limits; the rest stay the tier's.
    cluster.create(QUOTAS, namespace, quota("tiered", "tiered", limits={"connections": 7, "requestsPerSecond": 42}))
    obj = cluster.wait_condition(QUOTAS, namespace, "tiered")
    assert obj["status"]["hard"] == {**starter, "connections": "7", "requestsPerSecond": "42"}
    doc = published(stack, namespace, "tiered")  # applied before Ready was reported
    assert (doc["connections"], doc["requestsPerSecond"], doc["burst"], doc["quota"]) == (7, 42, 100, "tiered")
    assert connection_limit(stack, "tiered") == 7
    assert cluster.get(TENANTS, namespace, "tiered")["status"]["effectiveLimits"]["connections"] == "7"

    # An edit takes effect at once, not at the next interval.
    cluster.patch(QUOTAS, namespace, "tiered", {"spec": {"limits": {"connections": 9}}})
    eventually(lambda: published(stack, namespace, "tiered")["connections"] == 9, timeout=10,
               what="edited limit published")
    assert connection_limit(stack, "tiered") == 9

    # Printer columns: tenant, storage used/hard, connections used/hard, Ready.
    table = stack.kubectl("get", "quotas.tenancy.dev", "tiered", "-n", namespace).stdout
    for column in ("TENANT", "STORAGE-USED", "STORAGE-HARD", "CONNS-USED", "CONNS-HARD", "READY"):
        assert column in table
    assert "10Gi" in table

    # A hand edit of the registry (the runbooks' jsonb_set) is put back.
    with connect(stack.admin_dsn()) as conn:
        conn.execute("UPDATE tenancy.tenants SET quotas = jsonb_set(quotas, '{connections}', '500')"
                     " WHERE namespace = %s AND name = 'tiered'", [namespace])
    eventually(lambda: published(stack, namespace, "tiered")["connections"] == 9, what="registry repaired")

    # Deleting the Quota returns the tenant to its tier's defaults; a tier change moves them.
    cluster.delete(QUOTAS, namespace, "tiered")
    eventually(lambda: published(stack, namespace, "tiered")["connections"] == 20, timeout=10,
               what="back to tier defaults")
    assert published(stack, namespace, "tiered")["quota"] is None
    cluster.patch(TENANTS, namespace, "tiered", {"spec": {"tier": "professional"}})
    eventually(lambda: published(stack, namespace, "tiered")["connections"] == 50, what="professional defaults")
    eventually(lambda: connection_limit(stack, "tiered") == 50, what="professional connection limit")
    eventually(lambda: cluster.get(TENANTS, namespace, "tiered")["status"]["effectiveLimits"]
               == TIER_DEFAULTS["professional"], what="Tenant effectiveLimits follow the tier")


def test_quota_changes_made_while_the_operator_is_down_apply_at_its_start(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    # At start the first pass reads the Quotas Kopf's listing brought (QuotaCluster.filled_by_watch),
    # not a LIST of its own: what changed meanwhile must be there all the same.
    # Tenant names are one schema per database target, whatever the namespace: names of this test only.
    names = ("qr-kept", "qr-edited", "qr-dropped", "qr-added")
    for name in names:
        provision(cluster, namespace, name, tier="starter")
    for name, connections in (("qr-kept", 5), ("qr-edited", 6), ("qr-dropped", 7)):
        cluster.create(QUOTAS, namespace, quota(name, name, limits={"connections": connections}))
        cluster.wait_condition(QUOTAS, namespace, name)
    assert [connection_limit(stack, n) for n in names] == [5, 6, 7, 20]
    operator.stop()
    try:
        cluster.patch(QUOTAS, namespace, "qr-edited", {"spec": {"limits": {"connections": 8}}})
        cluster.delete(QUOTAS, namespace, "qr-dropped")
        cluster.create(QUOTAS, namespace, quota("qr-added", "qr-added", limits={"connections": 9}))
    finally:
        operator.start()
    eventually(lambda: [connection_limit(stack, n) for n in names] == [5, 8, 20, 9], timeout=60,
               what="the edit, the deletion and the new Quota applied after the start")
    assert [published(stack, namespace, n)["quota"] for n in names] == ["qr-kept", "qr-edited", None, "qr-added"]
    cluster.wait_condition(QUOTAS, namespace, "qr-added")
    eventually(lambda: status(cluster, namespace, "qr-edited").get("hard", {}).get("connections") == "8",
               what="the edited Quota reports its new limit")


def test_connection_limit_refuses_the_extra_connection(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    uri = provision(cluster, namespace, "crowded")
    cluster.create(QUOTAS, namespace, quota("crowded", "crowded", limits={"connections": 2}))
    cluster.wait_condition(QUOTAS, namespace, "crowded")
    assert connection_limit(stack, "crowded") == 2
    first, second = connect(uri), connect(uri)
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            connect(uri)
        obj = cluster.wait_condition(QUOTAS, namespace, "crowded", type_="Exceeded", status="True")
        assert obj["status"]["used"]["connections"] == "2"
        assert obj["status"]["usageRatio"]["connections"] == 1.0
        assert cluster.condition(QUOTAS, namespace, "crowded", "NearLimit")["status"] == "True"
        assert cluster.condition(QUOTAS, namespace, "crowded", "Ready")["status"] == "True"  # enforced
        cluster.wait_event(namespace, "crowded", "QuotaExceeded", "Warning", timeout=10)
        labels = {"namespace": namespace, "tenant": "crowded", "resource": "connections"}
        assert operator.metric("tenant_quota_limit", **labels) == 2
        eventually(lambda: operator.metric("tenant_quota_used", **labels) == 2, timeout=10)
        assert "crowded" in stack.kubectl("get", "tq", "-n", namespace).stdout
    finally:
        first.close()
        second.close()
    cluster.wait_condition(QUOTAS, namespace, "crowded", type_="Exceeded", status="False")
    cluster.wait_event(namespace, "crowded", "QuotaBackUnderLimit", timeout=10)


def test_statement_timeout_cancels_long_statements(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    uri = provision(cluster, namespace, "sloth")
    cluster.create(QUOTAS, namespace, quota("sloth", "sloth", limits={"statementTimeout": "500ms"}))
    cluster.wait_condition(QUOTAS, namespace, "sloth")
    assert "statement_timeout=500" in role(stack, "sloth")[1]
    with connect(uri) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("500ms",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(3)")
    assert published(stack, namespace, "sloth")["statementTimeoutMs"] == 500


def test_storage_over_limit_blocks_writes_until_back_under(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    uri = provision(cluster, namespace, "hoarder")
    cluster.create(QUOTAS, namespace, quota("hoarder", "hoarder", limits={"storage": "1Mi"},
                                             enforcement={"storage": "BlockWrites"}))
    cluster.wait_condition(QUOTAS, namespace, "hoarder")
    assert cluster.condition(QUOTAS, namespace, "hoarder", "Exceeded")["status"] == "False"
    with as_owner(stack.admin_dsn(), "tenant_hoarder") as owner:  # the tenant's migration
        owner.execute("CREATE TABLE blobs (id serial PRIMARY KEY, payload text)")
    held = connect(uri)  # an open session: ended when the tenant becomes read-only
    held.execute("INSERT INTO blobs (payload) SELECT repeat(md5(g::text), 16) FROM generate_series(1, 2500) g")

    def blocked() -> bool:
        obj = cluster.wait_condition(QUOTAS, namespace, "hoarder", type_="Exceeded", status="True", timeout=30)
        assert "storage" in cluster.condition(QUOTAS, namespace, "hoarder", "Exceeded")["message"]
        assert published(stack, namespace, "hoarder")["writesBlocked"] is True
        with connect(uri) as conn:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO blobs (payload) VALUES ('more')")
            assert conn.execute("SELECT count(*) > 0 FROM blobs").fetchone() == (True,)  # reads work
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # so does a clean-up: see docs
                conn.execute("DELETE FROM blobs")
        assert obj["status"]["usageRatio"]["storage"] >= 1.0
        return True

    blocked()
    with pytest.raises(psycopg.OperationalError):  # the session opened before the block was ended
        held.execute("SELECT 1")
    held.close()
    cluster.wait_event(namespace, "hoarder", "WritesBlocked", "Warning")
    cluster.wait_event(namespace, "hoarder", "QuotaExceeded", "Warning")
    # The documented limitation: read-only is the role's default, which a session may change itself.
    with connect(uri) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("INSERT INTO blobs (payload) VALUES ('a tenant that ignores the block')")

    def writable() -> bool:
        cluster.wait_condition(QUOTAS, namespace, "hoarder", type_="Exceeded", status="False", timeout=30)
        eventually(lambda: published(stack, namespace, "hoarder")["writesBlocked"] is False, timeout=10)
        insert_one(uri)
        return True

    # 1. An administrator frees room.
    with connect(stack.admin_dsn()) as conn:
        conn.execute("TRUNCATE tenant_hoarder.blobs")
    writable()
    cluster.wait_event(namespace, "hoarder", "WritesAllowed")

    # 2. A raised limit.
    fill(uri)
    blocked()
    cluster.patch(QUOTAS, namespace, "hoarder", {"spec": {"limits": {"storage": "64Mi"}}})
    writable()

    # 3. The tenant cleans up its own data under a temporary override (read-only sessions cannot).
    cluster.patch(QUOTAS, namespace, "hoarder", {"spec": {"limits": {"storage": "1Mi"}}})
    blocked()
    cluster.patch(QUOTAS, namespace, "hoarder", {"spec": {"overrides": [
        {"limit": "storage", "value": "64Mi", "expiresAt": later(3600), "reason": "clean-up window"},
    ]}})
    writable()
    with connect(uri) as conn:  # the application's login deletes; that frees no disk, and it cannot TRUNCATE
        conn.execute("DELETE FROM blobs")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE blobs")
    with as_owner(stack.admin_dsn(), "tenant_hoarder") as owner:  # a migration gives the space back
        owner.execute("VACUUM FULL blobs")
    cluster.patch(QUOTAS, namespace, "hoarder", {"spec": {"overrides": []}})
    eventually(lambda: status(cluster, namespace, "hoarder")["hard"]["storage"] == "1Mi", timeout=10)
    writable()


def test_override_raises_a_limit_then_expires_by_itself(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "surge")
    expires = later(6)
    cluster.create(QUOTAS, namespace, quota("surge", "surge", limits={"connections": 3}, overrides=[
        {"limit": "connections", "value": 8, "expiresAt": expires, "reason": "load test"},
    ]))
    obj = cluster.wait_condition(QUOTAS, namespace, "surge")
    assert obj["status"]["hard"]["connections"] == "8"
    [active] = obj["status"]["activeOverrides"]
    assert (active["limit"], active["value"], active["reason"]) == ("connections", 8, "load test")
    assert connection_limit(stack, "surge") == 8
    assert published(stack, namespace, "surge")["connections"] == 8

    eventually(lambda: connection_limit(stack, "surge") == 3, timeout=30, interval=0.1,
               what="limit back to 3 after the override expired")
    dropped = time.time()
    expiry = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
    assert dropped >= expiry
    cluster.wait_event(namespace, "surge", "OverrideExpired", timeout=10)
    final = status(cluster, namespace, "surge")
    assert final["hard"]["connections"] == "3"
    assert final.get("activeOverrides", []) == []
    assert published(stack, namespace, "surge")["connections"] == 3
    assert published(stack, namespace, "surge")["overrides"] == []
    message = next(e["message"] for e in cluster.events(namespace, "surge") if e["reason"] == "OverrideExpired")
    assert "load test" in message
    assert "connections is 3 again" in message


def test_quota_for_a_missing_tenant_and_two_quotas_for_one_tenant(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(QUOTAS, namespace, quota("early", "latecomer", limits={"connections": 4}))
    cluster.wait_condition(QUOTAS, namespace, "early", status="False", reason="TenantNotFound")
    provision(cluster, namespace, "latecomer")
    cluster.wait_condition(QUOTAS, namespace, "early", timeout=30)  # resolved without an edit
    assert connection_limit(stack, "latecomer") == 4

    cluster.create(QUOTAS, namespace, quota("second", "latecomer", limits={"connections": 6}))
    obj = cluster.wait_condition(QUOTAS, namespace, "second", status="False", reason="Conflict")
    assert "early" in next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert cluster.condition(QUOTAS, namespace, "early", "Ready")["status"] == "True"
    assert connection_limit(stack, "latecomer") == 4
    cluster.wait_event(namespace, "second", "Conflict", "Warning")

    # The first one goes: the second applies.
    cluster.delete(QUOTAS, namespace, "early")
    cluster.wait_condition(QUOTAS, namespace, "second", timeout=30)
    eventually(lambda: connection_limit(stack, "latecomer") == 6, timeout=10)

    # The Tenant goes: its Quota says so.
    cluster.delete(TENANTS, namespace, "latecomer")
    cluster.wait_condition(QUOTAS, namespace, "second", status="False", reason="TenantNotFound", timeout=30)


def test_usage_the_platform_reports_is_read_back(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "worker")
    cluster.create(QUOTAS, namespace, quota("worker", "worker", limits={"concurrentJobs": 2}))
    cluster.wait_condition(QUOTAS, namespace, "worker")
    # The operator's own measurements are in the runbooks' table.
    measured = eventually(lambda: sql_value(
        stack.admin_dsn(),
        "SELECT count(*) FROM tenancy.tenant_quota_usage u JOIN tenancy.tenants t ON t.id = u.tenant_id"
        " WHERE t.namespace = %s AND t.name = 'worker' AND u.source = 'operator'"
        " AND u.resource IN ('storage', 'connections')",
        [namespace],
    ) == 2, what="storage and connections recorded")
    assert measured
    # The job runner reports two running jobs.
    with connect(stack.admin_dsn()) as conn:
        conn.execute(
            "INSERT INTO tenancy.tenant_quota_usage (tenant_id, resource, used, source)"
            " SELECT id, 'concurrentJobs', 2, 'job-runner' FROM tenancy.tenants"
            " WHERE namespace = %s AND name = 'worker' AND state <> ALL('{dropped,archived}')",
            [namespace],
        )
    obj = cluster.wait_condition(QUOTAS, namespace, "worker", type_="Exceeded", status="True", timeout=30)
    assert obj["status"]["used"]["concurrentJobs"] == "2"
    assert "concurrentJobs" in cluster.condition(QUOTAS, namespace, "worker", "Exceeded")["message"]
    labels = {"namespace": namespace, "tenant": "worker", "resource": "concurrentJobs"}
    eventually(lambda: operator.metric("tenant_quota_used", **labels) == 2, timeout=10)
    assert operator.metric("tenant_quota_limit", **labels) == 2
    # The tenants-per-state gauges are recounted at most once a second.
    eventually(lambda: operator.metric("tenant_quota_tenants", resource="concurrentJobs", state="exceeded") >= 1,
               timeout=10)
