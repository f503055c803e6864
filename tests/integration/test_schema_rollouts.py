"""SchemaRollouts against the real API server, PostgreSQL and the operator process: a template's
new migration reaches a canary first and the other Tenants only in later waves; a pinned Tenant
is skipped; pause by field; a failed canary halts the rollout with the others untouched and still
serving, and a person's fix, retry and resume let it finish."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from tenancy_devenv.stack import LocalStack

from .harness import (
    GROUP,
    VERSION,
    Cluster,
    OperatorProcess,
    as_owner,
    connect,
    eventually,
    sql_value,
    stored_bytes,
    tenant,
)
from .prom import SERIES
from .test_lifecycle import set_template, versions

TENANTS = "tenants"
ROLLOUTS = "schemarollouts"
INIT = "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1);"
REFUNDS = "CREATE TABLE refunds (id int PRIMARY KEY, item int REFERENCES items (id));"


def rollout(name: str, template: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SchemaRollout", "metadata": {"name": name},
            "spec": {"template": template, **spec}}


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.get(ROLLOUTS, namespace, name).get("status") or {}


def wait_status(cluster: Cluster, namespace: str, name: str, **want: Any) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        st = status(cluster, namespace, name)
        assert all(st.get(k) == v for k, v in want.items()), st
        return st
    return eventually(check, timeout=90, what=f"SchemaRollout {name} with {want}")


def held(cluster: Cluster, namespace: str, name: str) -> bool:
    """The Tenant says a newer migration waits (its Ready message)."""
    ready = cluster.condition(TENANTS, namespace, name, "Ready")
    return ready.get("status") == "True" and "held" in str(ready.get("message"))


def fleet(cluster: Cluster, namespace: str, template: str, names: list[str], **annotations: dict[str, str]) -> None:
    set_template(cluster, namespace, template, {"0001_init.sql": INIT})
    for n in names:
        obj = tenant(n, schemaTemplate=template)
        if n in annotations:
            obj["metadata"]["annotations"] = annotations[n]
        cluster.create(TENANTS, namespace, obj)
    for n in names:
        cluster.wait_condition(TENANTS, namespace, n)


def annotate(cluster: Cluster, plural: str, namespace: str, name: str, key: str, value: str) -> None:
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, name, {"metadata": {"annotations": {key: value}}},
        _content_type="application/merge-patch+json")


def test_canary_first_then_the_fleet_with_a_pin_and_a_pause(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    names = ["wv-canary", "wv-b", "wv-c", "wv-d", "wv-pinned"]
    fleet(cluster, namespace, "wave-schema", names, **{"wv-pinned": {"tenancy.dev/schema-pin": "0001_init"}})
    cluster.create(ROLLOUTS, namespace, rollout("wave-schema", "wave-schema", canary={"tenants": ["wv-canary"]},
                                                waves=[{"percentage": 100}], pause="1s", paused=True))
    wait_status(cluster, namespace, "wave-schema", phase="Idle", baseVersion="0001_init")

    set_template(cluster, namespace, "wave-schema", {"0001_init.sql": INIT, "0002_refunds.sql": REFUNDS})
    eventually(lambda: versions(cluster, namespace, ["wv-canary"]) == {"wv-canary": "0002_refunds"}, timeout=90,
               what="the canary migrated")
    # Paused after the canary: no one else admitted; they stay at 0001 and say why.
    st = wait_status(cluster, namespace, "wave-schema", phase="Paused", canary=["wv-canary"])
    assert st["targetVersion"] == "0002_refunds" and st["pinned"] == 1
    for n in ("wv-b", "wv-c", "wv-d"):
        eventually(lambda n=n: held(cluster, namespace, n), timeout=60, what=f"{n} holds 0002 back")
    assert set(versions(cluster, namespace, ["wv-b", "wv-c", "wv-d"]).values()) == {"0001_init"}
    cluster.wait_event(namespace, "wave-schema", "WaveStarted", timeout=30)

    cluster.patch(ROLLOUTS, namespace, "wave-schema", {"spec": {"paused": False}})
    st = wait_status(cluster, namespace, "wave-schema", phase="Completed", baseVersion="0002_refunds")
    assert (st["migrated"], st["pinned"], st["failed"]) == (4, 1, 0)
    assert versions(cluster, namespace, names) == {
        "wv-canary": "0002_refunds", "wv-b": "0002_refunds", "wv-c": "0002_refunds", "wv-d": "0002_refunds",
        "wv-pinned": "0001_init",
    }
    eventually(lambda: cluster.has_event(namespace, "wave-schema", "RolloutCompleted"), timeout=30,
               what="RolloutCompleted")
    assert operator.metric("schema_rollout_tenants", namespace=namespace, rollout="wave-schema", state="migrated") == 4


def test_a_failed_canary_halts_the_rollout_and_the_others_keep_serving(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    names = ["hl-canary", "hl-b", "hl-c"]
    fleet(cluster, namespace, "halt-schema", names)
    cluster.create(ROLLOUTS, namespace, rollout("halt-schema", "halt-schema", canary={"tenants": ["hl-canary"]},
                                                pause="1s"))
    wait_status(cluster, namespace, "halt-schema", phase="Idle", baseVersion="0001_init")
    # The canary holds a table of that name already (made out of band): its migration fails.
    with as_owner(stack.admin_dsn(), "tenant_hl_canary") as owner:
        owner.execute("CREATE TABLE refunds (legacy text)")
    set_template(cluster, namespace, "halt-schema", {"0001_init.sql": INIT, "0002_refunds.sql": REFUNDS})

    st = wait_status(cluster, namespace, "halt-schema", phase="Halted", reason="BudgetSpent")
    assert [f["name"] for f in st["failedTenants"]] == ["hl-canary"]
    assert st["failedTenants"][0]["reason"] == "MigrationFailed" and st["failed"] == 1
    ready = cluster.condition(ROLLOUTS, namespace, "halt-schema", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "BudgetSpent"
    eventually(lambda: cluster.has_event(namespace, "halt-schema", "RolloutHalted", "Warning"), timeout=30,
               what="a Warning RolloutHalted")
    # The others were never admitted: at 0001, Ready, and their applications still work.
    for n in ("hl-b", "hl-c"):
        eventually(lambda n=n: held(cluster, namespace, n), timeout=60, what=f"{n} holds 0002 back")
        with connect(cluster.secret_data(namespace, f"{n}-db")["uri"]) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
    assert set(versions(cluster, namespace, ["hl-b", "hl-c"]).values()) == {"0001_init"}

    # A person fixes the canary, retries it, then resumes the rollout: it finishes.
    with as_owner(stack.admin_dsn(), "tenant_hl_canary") as owner:
        owner.execute("DROP TABLE refunds")
    annotate(cluster, TENANTS, namespace, "hl-canary", "tenancy.dev/retry", "after-drop")
    eventually(lambda: versions(cluster, namespace, ["hl-canary"]) == {"hl-canary": "0002_refunds"}, timeout=90,
               what="the canary migrated after its retry")
    assert status(cluster, namespace, "halt-schema")["phase"] == "Halted"  # halted until a person resumes
    annotate(cluster, ROLLOUTS, namespace, "halt-schema", "tenancy.dev/resume-rollout", "canary-fixed")
    st = wait_status(cluster, namespace, "halt-schema", phase="Completed")
    assert (st["migrated"], st["failed"], st["resumedBy"]) == (3, 0, "canary-fixed")
    assert set(versions(cluster, namespace, names).values()) == {"0002_refunds"}


def test_a_rollback_runs_the_down_migrations_on_the_migrated_tenants(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    names = ["rb-canary", "rb-b"]
    fleet(cluster, namespace, "undo-schema", names)
    cluster.create(ROLLOUTS, namespace, rollout("undo-schema", "undo-schema", canary={"tenants": ["rb-canary"]},
                                                pause="1h"))
    wait_status(cluster, namespace, "undo-schema", phase="Idle", baseVersion="0001_init")
    set_template(cluster, namespace, "undo-schema", {
        "0001_init.sql": INIT, "0002_refunds.sql": REFUNDS, "0002_refunds.down.sql": "DROP TABLE refunds;"})
    # The .down.sql key is no migration of its own: the canary reaches 0002_refunds and stops there.
    eventually(lambda: versions(cluster, namespace, names) == {"rb-canary": "0002_refunds", "rb-b": "0001_init"},
               timeout=90, what="the canary migrated, the other held")
    wait_status(cluster, namespace, "undo-schema", phase="Progressing", reason="Pausing")

    def refunds_table(name: str) -> Any:
        with connect(cluster.secret_data(namespace, f"{name}-db")["uri"]) as conn:
            return conn.execute("SELECT to_regclass('refunds')").fetchone()[0]  # type: ignore[index]

    assert refunds_table("rb-canary") == "refunds"
    annotate(cluster, ROLLOUTS, namespace, "undo-schema", "tenancy.dev/rollback-rollout", "bad-refunds")
    st = wait_status(cluster, namespace, "undo-schema", phase="RolledBack", reason="RolledBack")
    assert st["rolledBackBy"] == "bad-refunds" and st["canary"] == [] and st["admitBelow"] == 0
    assert versions(cluster, namespace, names) == {"rb-canary": "0001_init", "rb-b": "0001_init"}
    assert refunds_table("rb-canary") is None  # its down migration ran, over the tenant's own login
    cluster.wait_event(namespace, "rb-canary", "MigrationReverted")
    eventually(lambda: cluster.has_event(namespace, "undo-schema", "RolloutRolledBack", "Warning"), timeout=30,
               what="a Warning RolloutRolledBack")
    # Rolled back, the template's 0002 stays out: every Tenant holds it back.
    for n in names:
        eventually(lambda n=n: held(cluster, namespace, n), timeout=60, what=f"{n} holds 0002 back")


def test_a_risky_migration_is_preceded_by_a_snapshot_that_restores(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    init = "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'keep me');"
    set_template(cluster, namespace, "snap-schema", {"0001_init.sql": init})
    cluster.create(TENANTS, namespace, tenant("sn-a", schemaTemplate="snap-schema", deletionPolicy="Delete"))
    cluster.wait_condition(TENANTS, namespace, "sn-a")
    set_template(cluster, namespace, "snap-schema", {
        "0001_init.sql": init,
        "0002_drop_body.sql": "-- tenancy: snapshot-before\nALTER TABLE notes DROP COLUMN body;",
    })
    eventually(lambda: versions(cluster, namespace, ["sn-a"]) == {"sn-a": "0002_drop_body"}, timeout=90,
               what="the risky migration applied")
    with connect(stack.admin_dsn()) as conn:
        rows = conn.execute("SELECT id, path, sha256 FROM tenancy.tenant_archives WHERE namespace = %s AND name = %s",
                            [namespace, "sn-a"]).fetchall()
    assert len(rows) == 1, rows
    archive_id, path, sha = rows[0]
    assert hashlib.sha256(stored_bytes(stack, path) or b"").hexdigest() == sha
    snapshot = eventually(lambda: [e for e in cluster.events(namespace, "sn-a") if e["reason"] == "Snapshot"],
                          timeout=60, what="the Snapshot Event")  # posted in the background
    assert archive_id in snapshot[0]["message"] and "0002_drop_body" in snapshot[0]["message"]

    # Back to the snapshot: the Tenant re-created from it (pinned before the risky migration).
    cluster.delete(TENANTS, namespace, "sn-a")
    eventually(lambda: cluster.gone(TENANTS, namespace, "sn-a"), timeout=90, what="sn-a dropped")
    again = tenant("sn-a", schemaTemplate="snap-schema", deletionPolicy="Delete", restoreFrom=archive_id)
    again["metadata"]["annotations"] = {"tenancy.dev/schema-pin": "0001_init"}
    cluster.create(TENANTS, namespace, again)
    cluster.wait_condition(TENANTS, namespace, "sn-a", timeout=90)
    with connect(cluster.secret_data(namespace, "sn-a-db")["uri"]) as conn:
        assert conn.execute("SELECT body FROM notes WHERE id = 1").fetchone() == ("keep me",)
    assert versions(cluster, namespace, ["sn-a"]) == {"sn-a": "0001_init"}


def test_a_breached_gate_halts_before_the_next_wave(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, gate: Callable[[str, float], None]
) -> None:
    names = ["gt-a", "gt-b", "gt-c"]
    fleet(cluster, namespace, "gated-schema", names)
    gate("gated-schema", 0.5)  # the error ratio is already too high when the canary is done
    cluster.create(ROLLOUTS, namespace, rollout(
        "gated-schema", "gated-schema", canary={"count": 1}, pause="1s",
        gate={"query": f'max({SERIES}{{flag="gated-schema"}})', "max": 0.05}))
    wait_status(cluster, namespace, "gated-schema", phase="Idle", baseVersion="0001_init")
    set_template(cluster, namespace, "gated-schema", {"0001_init.sql": INIT, "0002_refunds.sql": REFUNDS})

    st = wait_status(cluster, namespace, "gated-schema", phase="Halted", reason="GateBreached")
    assert st["gateValue"] == 0.5 and st["migrated"] == 1 and st["failed"] == 0 and len(st["canary"]) == 1
    assert "gate value 0.5 > max 0.05" in st["message"]
    others = [n for n in names if n not in st["canary"]]
    assert set(versions(cluster, namespace, others).values()) == {"0001_init"}

    gate("gated-schema", 0.0)
    annotate(cluster, ROLLOUTS, namespace, "gated-schema", "tenancy.dev/resume-rollout", "errors-fixed")
    st = wait_status(cluster, namespace, "gated-schema", phase="Completed")
    assert st["gateValue"] == 0.0 and set(versions(cluster, namespace, names).values()) == {"0002_refunds"}


def test_a_down_migration_runs_with_the_tenant_rights_only(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A hostile tenant writes the down migration of its template to take more than its schema
    (its own role's rights, then its login's after RESET ROLE): the rollback fails on it, reported,
    and nothing is granted."""
    fleet(cluster, namespace, "evil-undo", ["ev-canary"])
    cluster.create(ROLLOUTS, namespace, rollout("evil-undo", "evil-undo", canary={"tenants": ["ev-canary"]},
                                                pause="1h"))
    wait_status(cluster, namespace, "evil-undo", phase="Idle", baseVersion="0001_init")
    set_template(cluster, namespace, "evil-undo", {
        "0001_init.sql": INIT, "0002_refunds.sql": REFUNDS,
        "0002_refunds.down.sql": "RESET ROLE; GRANT pg_read_all_data TO tenant_ev_canary; DROP TABLE refunds;"})
    eventually(lambda: versions(cluster, namespace, ["ev-canary"]) == {"ev-canary": "0002_refunds"}, timeout=90,
               what="the canary migrated")
    annotate(cluster, ROLLOUTS, namespace, "evil-undo", "tenancy.dev/rollback-rollout", "undo")

    st = wait_status(cluster, namespace, "evil-undo", phase="RolledBack", failed=1)
    assert st["failedTenants"][0]["name"] == "ev-canary"
    assert st["failedTenants"][0]["reason"] == "MigrationFailed"
    refused = st["failedTenants"][0]["message"]  # PostgreSQL 15 and 16+ word it differently
    assert "pg_read_all_data" in refused and ("must have admin option" in refused or "permission denied" in refused)
    stalled = cluster.condition(ROLLOUTS, namespace, "evil-undo", "Stalled")
    assert stalled["status"] == "True"
    admin = stack.admin_dsn()
    assert sql_value(admin, "SELECT pg_has_role('tenant_ev_canary', 'pg_read_all_data', 'MEMBER')") is False
    assert sql_value(admin, "SELECT to_regclass('tenant_ev_canary.refunds') IS NOT NULL") is True  # rolled back whole
    assert versions(cluster, namespace, ["ev-canary"]) == {"ev-canary": "0002_refunds"}
