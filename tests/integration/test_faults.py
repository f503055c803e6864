"""Faults survived: real processes killed, stopped and restarted; the end state checked by invariants.

This module runs its own stack (control plane + PostgreSQL) and operator, so its outages never
disturb other tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, as_owner, connect, eventually, own_stack, sql_value

PLURAL = "tenants"


def report(fault: str, measured: str) -> None:
    """Recovery figures for docs/reliability.md (shown with pytest -s)."""
    print(f"\nRECOVERY {fault}: {measured}")


class Faults:
    def __init__(self, stack: LocalStack, cluster: Cluster, operator: OperatorProcess) -> None:
        self.stack, self.cluster, self.operator = stack, cluster, operator

    @property
    def pg(self) -> Any:
        return self.stack.postgres["default"]

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{int(time.time() * 1000) % 10**8}"
        self.stack.kubectl("create", "namespace", name)
        return name

    def apply_many(self, namespace: str, names: list[str], **spec: Any) -> None:
        """One kubectl call for many Tenants, as a GitOps sync would do."""
        docs = []
        for n in names:
            lines = [
                "apiVersion: tenancy.dev/v1alpha1",
                "kind: Tenant",
                f"metadata: {{name: {n}, namespace: {namespace}}}",
                "spec:",
            ]
            lines += [f"  {k}: {v}" for k, v in spec.items()] or ["  {}"]
            docs.append("\n".join(lines))
        self.stack.kubectl("apply", "-f", "-", input="\n---\n".join(docs))

    def all_ready(self, namespace: str, names: list[str]) -> bool:
        items = self.cluster.custom.list_namespaced_custom_object("tenancy.dev", "v1alpha1", namespace, PLURAL)["items"]
        ready = {
            i["metadata"]["name"]
            for i in items
            if (i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"]
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in (i.get("status") or {}).get("conditions") or []
            )
        }
        return set(names) <= ready

    def check_invariants(self, namespace: str, names: list[str], rows: dict[str, int] | None = None) -> None:
        """Exactly one schema, role, Secret and live registry row per tenant; no orphans; data kept."""
        assert self.all_ready(namespace, names)
        admin = self.stack.admin_dsn()
        idents = {"tenant_" + n.replace("-", "_") for n in names}
        with connect(admin) as conn:
            live = conn.execute(
                "SELECT schema_name, namespace, name FROM tenancy.tenants"
                " WHERE state IN ('provisioning', 'active', 'suspended', 'deleted')"
            ).fetchall()
            schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%'")}
            roles = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'tenant\\_%'")}
        registry_here = {r[0] for r in live if r[1] == namespace}
        assert registry_here == idents, f"registry rows differ: {registry_here ^ idents}"
        live_schemas = {r[0] for r in live}
        assert schemas == live_schemas, f"orphan or missing schemas: {schemas ^ live_schemas}"
        assert roles == live_schemas, f"orphan or missing roles: {roles ^ live_schemas}"
        secrets = self.cluster.core.list_namespaced_secret(namespace, label_selector="tenancy.dev/tenant").items
        by_tenant: dict[str, int] = {}
        for s in secrets:
            by_tenant[s.metadata.labels["tenancy.dev/tenant"]] = (
                by_tenant.get(s.metadata.labels["tenancy.dev/tenant"], 0) + 1
            )
        assert by_tenant == dict.fromkeys(names, 1)
        for name, count in (rows or {}).items():
            schema = "tenant_" + name.replace("-", "_")
            assert sql_value(admin, f"SELECT count(*) FROM {schema}.facts") == count, name

    def write_rows(self, namespace: str, names: list[str], count: int = 25) -> dict[str, int]:
        for n in names:
            with as_owner(self.stack.admin_dsn(), "tenant_" + n.replace("-", "_")) as owner:  # its migration
                owner.execute("CREATE TABLE IF NOT EXISTS facts (id serial PRIMARY KEY, v text)")
            with connect(self.cluster.secret_data(namespace, f"{n}-db")["uri"]) as conn:
                conn.execute("INSERT INTO facts (v) SELECT 'row ' || g FROM generate_series(1, %s) g", [count])
        return dict.fromkeys(names, count)


@pytest.fixture(scope="module")
def faults(request: pytest.FixtureRequest) -> Iterator[Faults]:
    with own_stack(request, "faults") as stack:
        small_pool = {"TENANCY_POOL_MAX_SIZE": "4", "TENANCY_DB_CONNECT_TIMEOUT_SECONDS": "2"}
        operator = OperatorProcess(stack, stack.workdir, sweep_interval=3.0, env=small_pool)
        try:
            operator.start()
            yield Faults(stack, Cluster(stack.kubeconfig), operator)
        finally:
            operator.stop()


@pytest.mark.timeout(1200)
def test_operator_sigkilled_while_provisioning_200_tenants(faults: Faults) -> None:
    ns = faults.namespace("kill")
    early = [f"early-{i}" for i in range(3)]
    faults.apply_many(ns, early)
    eventually(lambda: faults.all_ready(ns, early), timeout=60, what="early tenants ready")
    rows = faults.write_rows(ns, early)

    names = [f"bulk-{i:03d}" for i in range(200)]
    faults.apply_many(ns, names)
    admin = faults.stack.admin_dsn()
    eventually(
        lambda: (
            sql_value(
                admin, "SELECT count(*) FROM tenancy.tenants WHERE namespace = %s AND provisioned_at IS NOT NULL", [ns]
            )
            >= 30
        ),
        timeout=120,
        interval=0.1,
        what="provisioning under way",
    )
    faults.operator.kill()
    provisioned_at_kill = sql_value(
        admin, "SELECT count(*) FROM tenancy.tenants WHERE namespace = %s AND provisioned_at IS NOT NULL", [ns]
    )
    assert provisioned_at_kill < len(names) + len(early), "the kill came after everything was done"
    restarted = time.monotonic()
    faults.operator.start()
    eventually(lambda: faults.all_ready(ns, names + early), timeout=420, interval=1.0, what="all 203 tenants Ready")
    report(
        "SIGKILL during 200-tenant provisioning",
        f"{provisioned_at_kill} provisioned at the kill; all Ready "
        f"{time.monotonic() - restarted:.1f} s after the restart",
    )
    faults.check_invariants(ns, names + early, rows)


def test_postgres_down_for_30s_during_bulk_apply(faults: Faults) -> None:
    ns = faults.namespace("pgdown")
    early = ["before-0", "before-1"]
    faults.apply_many(ns, early)
    eventually(lambda: faults.all_ready(ns, early), timeout=60, what="early tenants ready")
    rows = faults.write_rows(ns, early)
    failures_before = faults.operator.metric("reconcile_failures_total", kind="Tenant", reason="DatabaseUnavailable")

    faults.pg.stop()
    stopped_at = time.monotonic()
    names = [f"during-{i:02d}" for i in range(30)]
    try:
        faults.apply_many(ns, names)
        eventually(
            lambda: faults.operator.metric("queue_depth", kind="Tenant") >= 10,
            timeout=25,
            what="queue_depth rises while PostgreSQL is down",
        )
        eventually(
            lambda: (
                faults.operator.metric("reconcile_failures_total", kind="Tenant", reason="DatabaseUnavailable")
                > failures_before
            ),
            timeout=25,
            what="failures counted as DatabaseUnavailable",
        )
        obj = faults.cluster.get(PLURAL, ns, "during-00")
        # Not Ready: no Ready condition yet (its first reconcile still waits for the database), or False.
        ready = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)
        assert ready is None or ready["status"] != "True"
        # The outage lasts 30 s (the scenario), not a synchronisation wait.
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped_at)))
    finally:
        faults.pg.start()
    back = time.monotonic()
    eventually(
        lambda: faults.all_ready(ns, names + early), timeout=180, interval=1.0, what="everything converges without help"
    )
    report("PostgreSQL down 30 s", f"all 32 Ready {time.monotonic() - back:.1f} s after PostgreSQL was back")
    eventually(
        lambda: faults.operator.metric("queue_depth", kind="Tenant") == 0, timeout=60, what="queue_depth back to 0"
    )
    faults.check_invariants(ns, names + early, rows)


def test_control_plane_restart_watches_recover(faults: Faults) -> None:
    ns = faults.namespace("cprestart")
    faults.apply_many(ns, ["steady"])
    eventually(lambda: faults.all_ready(ns, ["steady"]), timeout=60, what="steady ready")
    faults.stack.control_plane.stop()
    faults.stack.control_plane.start()
    back = time.monotonic()
    # Later changes are reconciled: a new tenant, and a suspension of the old one.
    faults.apply_many(ns, ["after-restart"])
    faults.cluster.patch(PLURAL, ns, "steady", {"spec": {"state": "Suspended"}})
    eventually(lambda: faults.all_ready(ns, ["after-restart"]), timeout=120, what="new tenant reconciled")
    faults.cluster.wait_condition(PLURAL, ns, "steady", reason="Suspended", timeout=120)
    report("control plane restart", f"changes made after the restart reconciled {time.monotonic() - back:.1f} s later")
    assert sql_value(  # neither the owner nor a login role of the tenant logs in
        faults.stack.admin_dsn(),
        "SELECT count(*) FROM pg_roles WHERE rolcanlogin"
        " AND (rolname = 'tenant_steady' OR rolname LIKE 'tl\\_steady\\_%')",
    ) == 0


def test_deletions_while_postgres_is_down_complete_once_it_returns(faults: Faults) -> None:
    ns = faults.namespace("deldown")
    faults.apply_many(ns, ["gone-delete"], deletionPolicy="Delete")
    faults.apply_many(ns, ["gone-archive"], deletionPolicy="Archive")
    eventually(lambda: faults.all_ready(ns, ["gone-delete", "gone-archive"]), timeout=60, what="ready")
    faults.write_rows(ns, ["gone-archive"], count=40)
    faults.pg.stop()
    try:
        faults.cluster.delete(PLURAL, ns, "gone-delete")
        faults.cluster.delete(PLURAL, ns, "gone-archive")
        for name in ("gone-delete", "gone-archive"):
            # One status, read once: the phase and the condition checked come from the same write.
            status = eventually(
                lambda n=name: (
                    (st := faults.cluster.get(PLURAL, ns, n).get("status") or {}).get("phase") == "Deleting"
                    and any(c.get("type") == "Ready" and c.get("reason") == "DatabaseUnavailable"
                            for c in st.get("conditions") or [])
                    and st
                ),
                timeout=30,
                what=f"{name} shows Deleting, waiting for the database",
            )
            assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "False"
    finally:
        faults.pg.start()
    back = time.monotonic()
    for name in ("gone-delete", "gone-archive"):
        eventually(lambda n=name: faults.cluster.gone(PLURAL, ns, n), timeout=120, what=f"{name} deleted")
    report("deletions while PostgreSQL down", f"both deletions done {time.monotonic() - back:.1f} s after it was back")
    admin = faults.stack.admin_dsn()
    with connect(admin) as conn:
        jobs = conn.execute(
            "SELECT t.name, j.kind, j.state, count(*) FROM tenancy.lifecycle_jobs j JOIN tenancy.tenants t"
            " ON t.id = j.tenant_id WHERE t.namespace = %s AND j.kind IN ('delete', 'archive')"
            " AND j.state = 'succeeded' GROUP BY 1, 2, 3 ORDER BY 1, 2",
            [ns],
        ).fetchall()
        states = dict(conn.execute("SELECT name, state FROM tenancy.tenants WHERE namespace = %s", [ns]).fetchall())
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('tenant_gone_delete', 'tenant_gone_archive')"
        ).fetchone()
    # Each drop (and the archive) happened exactly once.
    assert jobs == [
        ("gone-archive", "archive", "succeeded", 1),
        ("gone-archive", "delete", "succeeded", 1),
        ("gone-delete", "delete", "succeeded", 1),
    ]
    assert states == {"gone-delete": "dropped", "gone-archive": "archived"}
    assert leftovers == (0,)


def test_slow_migrations_do_not_starve_other_tenants(faults: Faults) -> None:
    """Pool of 4 connections; two tenants stuck in 20 s migrations; ten others still reconcile."""
    ns = faults.namespace("slowpool")
    faults.cluster.core.create_namespaced_config_map(
        ns, {"metadata": {"name": "slow"}, "data": {"0001_slow.sql": "SELECT pg_sleep(20); CREATE TABLE t (v int);"}}
    )
    faults.apply_many(ns, ["slow-a", "slow-b"], schemaTemplate="slow")
    admin = faults.stack.admin_dsn()
    eventually(
        lambda: (
            sql_value(
                admin,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'tenancy-operator-migrate' AND query LIKE '%%pg_sleep%%'",
            )
            == 2
        ),
        timeout=60,
        what="both slow migrations running",
    )
    started = time.monotonic()
    quick = [f"quick-{i}" for i in range(10)]
    faults.apply_many(ns, quick)
    eventually(lambda: faults.all_ready(ns, quick), timeout=60, what="quick tenants ready meanwhile")
    # They got through while the slow migrations still held their sessions.
    still_slow = sql_value(
        admin,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
        " 'tenancy-operator-migrate' AND query LIKE '%%pg_sleep%%'",
    )
    assert still_slow == 2, f"the quick tenants only got through after {time.monotonic() - started:.1f}s"
    eventually(lambda: faults.all_ready(ns, ["slow-a", "slow-b"]), timeout=90, what="slow tenants finish too")
