"""Lifecycle jobs: fleet migrations, stall and admin retry, crash safety, archive/restore, retention
(test_archives.py: the archive store, TenantArchive objects, outages and corruption)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tenancy_devenv.stack import LocalStack
from tenancy_operator.db import logins

from .harness import Cluster, OperatorProcess, as_owner, connect, eventually, sql_value, stored_bytes, tenant

PLURAL = "tenants"


def set_template(cluster: Cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    body = {"metadata": {"name": name}, "data": data}
    try:
        cluster.core.replace_namespaced_config_map(name, namespace, body)
    except Exception:
        cluster.core.create_namespaced_config_map(namespace, body)


def versions(cluster: Cluster, namespace: str, names: list[str]) -> dict[str, Any]:
    return {n: (cluster.get(PLURAL, namespace, n).get("status") or {}).get("schemaVersion") for n in names}


def ledger(stack: LocalStack, namespace: str, name: str, kind: str) -> list[tuple[Any, ...]]:
    with connect(stack.admin_dsn()) as conn:
        return conn.execute(
            "SELECT j.state, j.attempt, j.error, j.note, j.retry_token FROM tenancy.lifecycle_jobs j"
            " JOIN tenancy.tenants t ON t.id = j.tenant_id WHERE t.namespace = %s AND t.name = %s AND j.kind = %s"
            " ORDER BY j.started_at",
            [namespace, name, kind],
        ).fetchall()


INIT = "CREATE TABLE accounts (id int PRIMARY KEY); CREATE TABLE migration_runs (version text);"


def test_fleet_migration_isolates_the_failing_tenant_then_admin_retry_fixes_it(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    names = [f"fleet-{i}" for i in range(5)]
    set_template(cluster, namespace, "fleet-schema", {"0001_init.sql": INIT})
    for n in names:
        cluster.create(PLURAL, namespace, tenant(n, schemaTemplate="fleet-schema"))
    for n in names:
        cluster.wait_condition(PLURAL, namespace, n)
    # fleet-3 made a table out of band that the next migration wants to create.
    with as_owner(stack.admin_dsn(), "tenant_fleet_3") as owner:
        owner.execute("CREATE TABLE invoices (legacy text)")

    set_template(
        cluster,
        namespace,
        "fleet-schema",
        {
            "0001_init.sql": INIT,
            "0002_invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY, total numeric);"
            " INSERT INTO migration_runs VALUES ('0002');",
        },
    )
    healthy = [n for n in names if n != "fleet-3"]
    eventually(
        lambda: set(versions(cluster, namespace, healthy).values()) == {"0002_invoices"},
        timeout=60,
        what="every other tenant reached 0002_invoices",
    )
    # The failing tenant is marked, retried with backoff, then stalled: it no longer retries on its own.
    obj = cluster.wait_condition(PLURAL, namespace, "fleet-3", type_="Stalled", status="True", timeout=90)
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "MigrationFailed"
    assert "invoices" in ready["message"] and "tenancy.dev/retry" in ready["message"]
    assert obj["status"]["schemaVersion"] == "0001_init"
    assert obj["status"]["currentJob"]["kind"] == "migrate" and obj["status"]["currentJob"]["state"] == "failed"
    attempts = ledger(stack, namespace, "fleet-3", "migrate")  # 0001 succeeded, then 0002 failed 3 times
    assert [a[0] for a in attempts] == ["succeeded", "failed", "failed", "failed"]
    assert [a[1] for a in attempts[1:]] == [1, 2, 3]
    assert operator.metric("lifecycle_job_failures_total", job_kind="migrate") >= 3
    cluster.wait_event(namespace, "fleet-3", "MigrationFailed", "Warning")
    # A summary of the rollout on the ConfigMap itself.
    summary = eventually(
        lambda: [
            e
            for e in cluster.events(namespace, "fleet-schema")
            if e["reason"] == "FleetMigration" and "failed: fleet-3" in e["message"]
        ],
        what="FleetMigration summary Event naming the failed tenant",
    )
    assert "4 at 0002_invoices" in summary[-1]["message"]

    # The admin fixes the cause and asks for one more attempt.
    with connect(stack.admin_dsn()) as conn:
        conn.execute("DROP TABLE tenant_fleet_3.invoices")
    cluster.patch(PLURAL, namespace, "fleet-3", {"metadata": {"annotations": {"tenancy.dev/retry": "after-fix"}}})
    obj = cluster.wait_condition(PLURAL, namespace, "fleet-3", timeout=60)
    assert obj["status"]["schemaVersion"] == "0002_invoices"
    last = ledger(stack, namespace, "fleet-3", "migrate")[-1]
    assert last[0] == "succeeded" and last[4] == "after-fix" and "admin override" in last[3]
    # Each migration ran exactly once per tenant.
    for n in names:
        schema = "tenant_" + n.replace("-", "_")
        assert sql_value(stack.admin_dsn(), f"SELECT count(*) FROM {schema}.migration_runs") == 1

    # The jobs CLI shows the history a person needs.
    out = subprocess.run(
        [sys.executable, "-m", "tenancy_operator", "jobs", "fleet-3", "-n", namespace, "--dsn", stack.admin_dsn()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "provision" in out and "migrate" in out and "failed" in out and "admin override" in out


def test_operator_killed_during_fleet_migration_finishes_after_restart(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    names = [f"crash-{i}" for i in range(8)]
    set_template(cluster, namespace, "crash-schema", {"0001_init.sql": INIT})
    for n in names:
        cluster.create(PLURAL, namespace, tenant(n, schemaTemplate="crash-schema"))
    for n in names:
        cluster.wait_condition(PLURAL, namespace, n)
    set_template(
        cluster,
        namespace,
        "crash-schema",
        {
            "0001_init.sql": INIT,
            "0002_slow.sql": "SELECT pg_sleep(0.4); CREATE TABLE ledger (id int);"
            " INSERT INTO migration_runs VALUES ('0002');",
        },
    )
    admin = stack.admin_dsn()
    count_migrated = (
        "SELECT count(*) FROM tenancy.tenant_migrations m JOIN tenancy.tenants t ON t.id = m.tenant_id"
        " WHERE t.namespace = %s AND m.version = '0002_slow'"
    )
    # Kill it once the rollout is under way but not finished.
    eventually(
        lambda: (
            sql_value(
                admin, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tenancy-operator-migrate'"
            )
            > 0
        ),
        interval=0.02,
        what="a migration is running",
    )
    operator.kill()
    done_at_kill = sql_value(admin, count_migrated, [namespace])
    assert done_at_kill < len(names), "the kill came too late to test anything"
    operator.start()
    eventually(
        lambda: set(versions(cluster, namespace, names).values()) == {"0002_slow"},
        timeout=90,
        what="every tenant at 0002_slow after the restart",
    )
    for n in names:
        schema = "tenant_" + n.replace("-", "_")
        assert sql_value(admin, f"SELECT count(*) FROM {schema}.migration_runs") == 1, n


def test_first_provisioning_cut_off_before_its_migration_keeps_the_password_it_set(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """The process ends (as a sharded run's stop cancels its reconciles) while a new Tenant's
    first migration runs, after its login got its password. The next attempt finds the login and
    its password in place and leaves them: the Secret already holds that password."""
    set_template(cluster, namespace, "cutoff-schema",
                 {"0001_slow.sql": "SELECT pg_sleep(5); CREATE TABLE accounts (id int PRIMARY KEY);"})
    cluster.create(PLURAL, namespace, tenant("cutoff-first", schemaTemplate="cutoff-schema"))
    admin = stack.admin_dsn()
    login = logins.login_role("tenant_cutoff_first", "a")
    verifier = "SELECT rolpassword FROM pg_authid WHERE rolname = %s"
    eventually(
        lambda: sql_value(admin, "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                                 " 'tenancy-operator-migrate' AND query LIKE '%%pg_sleep(5)%%'") > 0,
        interval=0.02, what="the first migration running",
    )
    before = sql_value(admin, verifier, [login])
    assert before, "the login has no password while its first migration runs"
    operator.kill()
    operator.start()
    obj = cluster.wait_condition(PLURAL, namespace, "cutoff-first", timeout=90)
    assert obj["status"]["schemaVersion"] == "0001_slow"
    assert sql_value(admin, verifier, [login]) == before, "the password was set again"
    with connect(cluster.secret_data(namespace, "cutoff-first-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (0,)


def test_archive_then_restore_brings_every_row_back(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("vault", deletionPolicy="Archive"))
    cluster.wait_condition(PLURAL, namespace, "vault")
    with as_owner(stack.admin_dsn(), "tenant_vault") as owner:
        owner.execute("CREATE TABLE gold (id int PRIMARY KEY, note text)")
    with connect(cluster.secret_data(namespace, "vault-db")["uri"]) as conn:
        conn.execute("INSERT INTO gold SELECT g, 'bar ' || g FROM generate_series(1, 500) g")
    cluster.delete(PLURAL, namespace, "vault")
    eventually(lambda: cluster.gone(PLURAL, namespace, "vault"), timeout=60, what="Tenant deleted after archive")
    admin = stack.admin_dsn()
    assert sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_vault'") == 0
    row = (
        connect(admin)
        .execute(
            "SELECT id, path, sha256 FROM tenancy.tenant_archives WHERE namespace = %s AND name = 'vault'", [namespace]
        )
        .fetchone()
    )
    assert row is not None
    archive_id, location, sha = row
    assert hashlib.sha256(stored_bytes(stack, location) or b"").hexdigest() == sha
    assert json.loads(stored_bytes(stack, location.removesuffix(".dump") + ".json") or b"{}")["sha256"] == sha
    assert (
        sql_value(admin, "SELECT state FROM tenancy.tenants WHERE namespace = %s AND name = 'vault'", [namespace])
        == "archived"
    )

    cluster.create(PLURAL, namespace, tenant("vault", restoreFrom="latest"))
    cluster.wait_condition(PLURAL, namespace, "vault", timeout=60)
    with connect(cluster.secret_data(namespace, "vault-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM gold").fetchone() == (500, 125250)
        conn.execute("INSERT INTO gold VALUES (501, 'new')")  # the application's grants are back
    assert sql_value(admin, "SELECT tableowner FROM pg_tables WHERE schemaname = 'tenant_vault' AND tablename = 'gold'"
                     ) == "tenant_vault"  # owned by the tenant's owner again
    assert eventually(
        lambda: any(archive_id in e["message"] for e in cluster.events(namespace, "vault") if e["reason"] == "Restored")
    )


def test_expired_archives_are_purged(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("fleeting", deletionPolicy="Archive", archiveRetention="1s"))
    cluster.wait_condition(PLURAL, namespace, "fleeting")
    cluster.delete(PLURAL, namespace, "fleeting")
    eventually(lambda: cluster.gone(PLURAL, namespace, "fleeting"), timeout=60, what="archived")
    admin = stack.admin_dsn()
    location = sql_value(
        admin, "SELECT path FROM tenancy.tenant_archives WHERE namespace = %s AND name = 'fleeting'", [namespace]
    )
    eventually(
        lambda: (
            sql_value(
                admin,
                "SELECT purged_at IS NOT NULL FROM tenancy.tenant_archives WHERE namespace = %s AND name = 'fleeting'",
                [namespace],
            )
            is True
        ),
        timeout=30,
        what="archive purged after its retention",
    )
    assert stored_bytes(stack, location, missing_ok=True) is None
    assert [r[0] for r in ledger(stack, namespace, "fleeting", "purge")] == ["succeeded"]


@pytest.mark.parametrize("bad", ["nope-does-not-exist"])
def test_restore_from_an_unknown_archive_is_reported(
    cluster: Cluster, operator: OperatorProcess, namespace: str, bad: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("orphan", restoreFrom=bad))
    obj = cluster.wait_condition(PLURAL, namespace, "orphan", status="False", reason="ArchiveNotFound")
    assert cluster.condition(PLURAL, namespace, "orphan", "Stalled")["status"] == "True"
    assert bad in next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]


def test_every_intervention_records_who_asked_for_it(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Suspend, rotate and resume, each asked for by another tool: the job history (status and the
    ledger behind `tenancy-operator jobs`) names who asked and when."""
    cluster.create(PLURAL, namespace, tenant("audited"))
    cluster.wait_condition(PLURAL, namespace, "audited")

    def job(kind: str, by: str) -> dict[str, Any] | None:
        jobs = cluster.get(PLURAL, namespace, "audited").get("status", {}).get("recentJobs") or []
        return next((j for j in jobs if j["kind"] == kind and j.get("requestedBy") == by), None)

    cluster.patch(PLURAL, namespace, "audited", {"spec": {"state": "Suspended"}}, field_manager="alice-console")
    suspended = eventually(lambda: job("suspend", "alice-console"), what="suspend job requested by alice-console")
    assert suspended["state"] == "succeeded" and suspended["requestedAt"]

    cluster.patch(PLURAL, namespace, "audited",
                  {"metadata": {"annotations": {"tenancy.dev/rotate-credentials": "1"}}}, field_manager="bob-cli")
    eventually(lambda: job("rotate", "bob-cli"), what="rotate job requested by bob-cli")

    cluster.patch(PLURAL, namespace, "audited", {"spec": {"state": "Active"}}, field_manager="carol-gitops")
    eventually(lambda: job("resume", "carol-gitops"), what="resume job requested by carol-gitops")
    # The provisioning is the creator's; the suspension stays alice's after carol's later change.
    assert job("provision", "alice-console") is None and job("suspend", "alice-console") is not None

    # As inside the operator's pod: the targets it is configured with, no --dsn.
    out = subprocess.run(
        [sys.executable, "-m", "tenancy_operator", "jobs", "audited", "-n", namespace],
        capture_output=True, text=True, check=True,
        env={**os.environ, "TENANCY_DATABASE_TARGETS": json.dumps({"default": stack.admin_dsn()})},
    ).stdout
    assert "REQUESTED BY" in out and "alice-console" in out and "bob-cli" in out and "carol-gitops" in out
