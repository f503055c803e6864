"""FeatureFlag behaviour against the real API server, both PostgreSQL targets and the operator
process: rows everywhere, the flagd ConfigMap, the CLI, the audit trail, atomic replacement."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext
from psycopg.rows import dict_row

from tenancy_devenv.stack import LocalStack
from tenancy_operator.db.flags import definition_from_rows
from tenancy_operator.flags import TENANT_ATTRIBUTE, FlagDefinition, evaluate

from .harness import GROUP, VERSION, Cluster, OperatorProcess, eventually, tenant

PLURAL = "featureflags"
TARGETS = ("default", "second")
ROWS = "SELECT * FROM tenancy.feature_flags WHERE namespace = %s AND flag_key = %s"


def featureflag(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {"name": name}, "spec": spec}


def stored(stack: LocalStack, namespace: str, key: str, target: str = "default") -> tuple[FlagDefinition | None, int]:
    """The flag as one target's rows describe it, and the generation they were written from."""
    with psycopg.connect(stack.admin_dsn(target), autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(ROWS, [namespace, key]).fetchall()
    found = definition_from_rows(rows)
    return (found.definition, found.generation) if found else (None, 0)


def changes(stack: LocalStack, namespace: str, key: str, target: str = "default") -> list[dict[str, Any]]:
    with psycopg.connect(stack.admin_dsn(target), autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT operation, generation, change, changed_by, changed_at FROM tenancy.feature_flag_changes"
            " WHERE namespace = %s AND flag_key = %s ORDER BY id", [namespace, key]).fetchall()


def written(stack: LocalStack, namespace: str, key: str, generation: int) -> FlagDefinition:
    """Wait until every target holds the flag at `generation` (or later)."""
    def check() -> FlagDefinition:
        found = [stored(stack, namespace, key, t) for t in TARGETS]
        assert all(f is not None and g >= generation for f, g in found), f"not written yet: {found}"
        assert found[0][0] == found[1][0], "targets differ"
        flag = found[0][0]
        assert flag is not None
        return flag
    return eventually(check, timeout=60, what=f"{namespace}/{key} generation {generation} in every target")


def cli(stack: LocalStack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenancy_operator", "flags", *args, "--dsn", stack.admin_dsn()],
        capture_output=True, text=True, check=check, timeout=60,
    )


def cli_eval(stack: LocalStack, namespace: str, key: str, tenant: str | None, user: str | None) -> dict[str, Any]:
    args = ["eval", key, "-n", namespace, "-o", "json"]
    args += ["--tenant", tenant] if tenant is not None else []
    args += ["--user", user] if user is not None else []
    return json.loads(cli(stack, *args).stdout)  # type: ignore[no-any-return]


def patch(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any], manager: str) -> int:
    obj = cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec},
        field_manager=manager, _content_type="application/merge-patch+json",
    )
    return int(obj["metadata"]["generation"])


# --- published everywhere ----------------------------------------------------------------------

def test_flag_is_written_to_every_target_and_flagd_configmap(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster.create("tenants", namespace, tenant("acme-corp"))
    cluster.create(PLURAL, namespace, featureflag(
        "new-dashboard", description="The redesigned dashboard.",
        rollout={"variant": "on", "percentage": 25},
        tenants=[{"tenant": "acme-corp", "variant": "on"}, {"tenant": "ghost", "percentage": 50}],
        users=[{"tenant": "acme-corp", "user": "alice", "variant": "off"}],
    ))
    obj = cluster.wait_condition(PLURAL, namespace, "new-dashboard")
    status = obj["status"]
    assert status["key"] == "new-dashboard"
    assert status["variantShares"] == {"on": 0.25, "off": 0.75}
    assert (status["tenantOverrides"], status["userOverrides"]) == (2, 1)
    assert status["unknownTenants"] == ["ghost"]
    assert status["configMap"] == "new-dashboard-flagd"
    assert status["lastWrittenAt"]
    resolved = cluster.condition(PLURAL, namespace, "new-dashboard", "TenantsResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "UnknownTenants")
    assert "ghost" in resolved["message"]

    flag = written(stack, namespace, "new-dashboard", 1)
    assert flag.tenants["ghost"].percentage == 50  # kept although the tenant does not exist
    with psycopg.connect(stack.admin_dsn("second"), autocommit=True) as conn:
        levels = conn.execute("SELECT level, count(*) FROM tenancy.feature_flags WHERE namespace = %s"
                              " GROUP BY level ORDER BY level", [namespace]).fetchall()
    assert levels == [("global", 1), ("tenant", 2), ("user", 1)]

    # The ConfigMap, owned by the flag, read by the official flagd provider: same answers.
    cm = cluster.core.read_namespaced_config_map("new-dashboard-flagd", namespace)
    assert cm.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    path = tmp_path / "flagd.json"
    path.write_text(cm.data["flagd.json"])
    logging.getLogger("openfeature").setLevel(logging.CRITICAL)
    api.set_provider_and_wait(FlagdProvider(resolver_type=ResolverType.FILE, offline_flag_source_path=str(path)),
                              "it")
    client = api.get_client("it")
    rng = random.Random(5)
    try:
        for _ in range(2000):
            t = rng.choice(["acme-corp", "ghost", "globex", None])
            u = rng.choice(["alice", f"user-{rng.randint(0, 10**6)}"])
            theirs = client.get_boolean_details(
                "new-dashboard", False, EvaluationContext(u, {TENANT_ATTRIBUTE: t} if t else {}))
            assert theirs.variant == evaluate(flag, t, u).variant, (t, u)
    finally:
        api.shutdown()

    # Printer columns, Events.
    out = stack.kubectl("get", "featureflags", "-n", namespace).stdout
    assert "ENABLED" in out
    assert "ROLLOUT" in out
    assert "25" in out
    cluster.wait_event(namespace, "new-dashboard", "FlagCreated")

    # The missing tenant appears: the condition follows without any change to the flag.
    cluster.create("tenants", namespace, tenant("ghost"))
    eventually(lambda: cluster.condition(PLURAL, namespace, "new-dashboard", "TenantsResolved")["status"] == "True",
               timeout=30, what="TenantsResolved=True once the Tenant exists")
    after = cluster.get(PLURAL, namespace, "new-dashboard")["status"]
    assert after["unknownTenants"] == []
    assert after["lastWrittenAt"] == status["lastWrittenAt"]  # the rows stay as written

    # And goes back when it is deleted.
    cluster.delete("tenants", namespace, "ghost")
    eventually(lambda: cluster.get(PLURAL, namespace, "new-dashboard")["status"]["unknownTenants"] == ["ghost"],
               timeout=30, what="unknownTenants names the deleted Tenant again")
    resolved = cluster.condition(PLURAL, namespace, "new-dashboard", "TenantsResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "UnknownTenants")
    assert cluster.condition(PLURAL, namespace, "new-dashboard", "Ready")["status"] == "True"


def test_a_write_held_up_by_a_lock_reports_database_busy_and_lands_once_the_lock_goes(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Another session holds the flags table of one target past the operator's lock_timeout: the
    flag says DatabaseBusy (the server answers; something holds it up), not DatabaseUnavailable,
    keeps what it wrote elsewhere, and is written there once the lock is released."""
    with psycopg.connect(stack.admin_dsn("second"), autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE tenancy.feature_flags IN ACCESS EXCLUSIVE MODE")

        def busy() -> dict[str, Any]:
            ready = cluster.condition(PLURAL, namespace, "held-up", "Ready")
            return ready if ready.get("reason") == "DatabaseBusy" else {}

        cluster.create(PLURAL, namespace, featureflag("held-up"))
        ready = eventually(busy, timeout=90, what="Ready=False DatabaseBusy while the lock is held")
        assert ready["status"] == "False"
        assert "database 'second' busy" in ready["message"], ready
        assert ready["message"].endswith("written to default"), ready
        assert stored(stack, namespace, "held-up", "default")[1] == 1
        holder.execute("ROLLBACK")
    written(stack, namespace, "held-up", 1)
    eventually(lambda: cluster.condition(PLURAL, namespace, "held-up", "Ready")["status"] == "True", timeout=60,
               what="Ready once the lock is gone")


# --- precedence, kill switch, stickiness through the CLI -----------------------------------------

def test_precedence_and_kill_switch_through_the_cli(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, featureflag(
        "checkout", key="checkout-v2",
        variants={"on": {"value": True}, "off": {"value": False}, "beta": {"value": "b"}},
        defaultVariant="off",
        rollout={"variant": "on", "percentage": 100},
        tenants=[{"tenant": "acme", "variant": "beta"}, {"tenant": "none", "percentage": 0}],
        users=[{"tenant": "acme", "user": "alice", "variant": "off"},
               {"tenant": "other", "user": "bob", "variant": "beta"}],
    ))
    cluster.wait_condition(PLURAL, namespace, "checkout")
    written(stack, namespace, "checkout-v2", 1)
    table = [
        ("acme", "alice", "off", "USER_OVERRIDE"),
        ("other", "bob", "beta", "USER_OVERRIDE"),
        ("acme", "bob", "beta", "TENANT_OVERRIDE"),
        ("acme", "zed", "beta", "TENANT_OVERRIDE"),
        ("none", "zed", "off", "TENANT_OVERRIDE"),
        ("globex", "zed", "on", "ROLLOUT"),
        ("globex", None, "off", "DEFAULT"),
    ]
    for t, u, variant, reason in table:
        got = cli_eval(stack, namespace, "checkout-v2", t, u)
        assert (got["variant"], got["reason"]) == (variant, reason), (t, u, got)
    text = cli(stack, "eval", "checkout-v2", "--tenant", "acme", "--user", "alice").stdout
    assert text.split("\t")[:3] == ["off", "false", "USER_OVERRIDE"]
    assert cli(stack, "eval", "no-such-flag", "--tenant", "a", "--user", "b", check=False).returncode == 1

    before = operator.metric("feature_flag_changes_total", change="update")
    generation = patch(cluster, namespace, "checkout", {"enabled": False}, "incident-bot")
    written(stack, namespace, "checkout-v2", generation)
    for t, u, _, _ in table:
        got = cli_eval(stack, namespace, "checkout-v2", t, u)
        assert (got["variant"], got["reason"]) == ("off", "KILL_SWITCH"), (t, u, got)
    eventually(lambda: cluster.has_event(namespace, "checkout", "KillSwitchThrown", "Warning"),
               timeout=30, what="Warning KillSwitchThrown")
    assert operator.metric("feature_flag_changes_total", change="update") == before + 1
    obj = cluster.wait_condition(PLURAL, namespace, "checkout")
    assert obj["status"]["variantShares"] == {"off": 1}
    assert changes(stack, namespace, "checkout-v2")[-1]["changed_by"] == "incident-bot"


def test_rollout_is_sticky_as_it_grows_and_rolls_back(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, featureflag("search", rollout={"variant": "on", "percentage": 0}))
    cluster.wait_condition(PLURAL, namespace, "search")
    users = [f"user-{i}" for i in range(1000)]

    def exposed(generation: int) -> set[str]:
        flag = written(stack, namespace, "search", generation)
        return {u for u in users if evaluate(flag, "acme", u).variant == "on"}

    assert exposed(1) == set()
    seen: list[set[str]] = []
    for pct in (10, 30, 60):
        seen.append(exposed(patch(cluster, namespace, "search", {"rollout": {"percentage": pct}}, "rollout-script")))
        assert abs(len(seen[-1]) / len(users) - pct / 100) < 0.05
    assert seen[0] <= seen[1] <= seen[2]
    # The CLI agrees with the library for users on both sides of the rollout.
    inside, outside = sorted(seen[2])[0], sorted(set(users) - seen[2])[0]
    assert cli_eval(stack, namespace, "search", "acme", inside)["variant"] == "on"
    assert cli_eval(stack, namespace, "search", "acme", outside)["variant"] == "off"
    assert cli_eval(stack, namespace, "search", "acme", inside)["reason"] == "ROLLOUT"
    # Roll back.
    assert exposed(patch(cluster, namespace, "search", {"rollout": {"percentage": 0}}, "rollout-script")) == set()


# --- audit trail, atomicity ------------------------------------------------------------------

def test_audit_rows_for_create_update_and_delete(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    manifest = featureflag("audited", rollout={"variant": "on", "percentage": 10})
    manifest["metadata"]["namespace"] = namespace
    stack.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    cluster.wait_condition(PLURAL, namespace, "audited")
    generation = patch(cluster, namespace, "audited", {"rollout": {"percentage": 60}}, "release-manager")
    written(stack, namespace, "audited", generation)
    history = [json.loads(line) for line in cli(stack, "history", "audited", "-n", namespace).stdout.splitlines()]
    assert [h["operation"] for h in history] == ["create", "update"]
    exported = json.loads(cli(stack, "export", "audited", "-n", namespace).stdout)
    assert exported["flags"]["audited"]["targeting"] == {"fractional": [["on", 60], ["off", 40]]}
    cluster.delete(PLURAL, namespace, "audited")
    eventually(lambda: cluster.gone(PLURAL, namespace, "audited"), timeout=60, what="FeatureFlag deleted")
    for target in TARGETS:
        assert stored(stack, namespace, "audited", target) == (None, 0)
        rows = changes(stack, namespace, "audited", target)
        assert [r["operation"] for r in rows] == ["create", "update", "delete"], target
        create, update, delete = rows
        assert create["changed_by"] == "kubectl-client-side-apply"
        assert create["change"][0]["op"] == "add"
        assert create["change"][0]["new"]["rollout"] == {"variant": "on", "percentage": 10}
        assert update["changed_by"] == "release-manager"
        assert update["generation"] == generation
        assert update["change"] == [{"op": "replace", "path": "/rollout/percentage", "old": 10, "new": 60}]
        assert delete["change"][0]["op"] == "remove"
        assert update["changed_at"] is not None
    eventually(lambda: not [c for c in cluster.core.list_namespaced_config_map(namespace).items
                            if c.metadata.name == "audited-flagd"], timeout=30, what="ConfigMap removed")
    cluster.wait_event(namespace, "audited", "FlagChanged")


def test_readers_never_see_a_partial_flag(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    users = [{"tenant": "acme", "user": f"user-{i}", "variant": "on"} for i in range(300)]
    tenants = [{"tenant": f"tenant-{i}", "variant": "on"} for i in range(100)]
    cluster.create(PLURAL, namespace, featureflag(
        "atomic", rollout={"variant": "on", "percentage": 0}, users=users, tenants=tenants))
    cluster.wait_condition(PLURAL, namespace, "atomic")
    written(stack, namespace, "atomic", 1)

    stop = threading.Event()
    snapshots: list[tuple[int, int, int, set[str], set[int], int]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with psycopg.connect(stack.admin_dsn("second"), autocommit=True, row_factory=dict_row) as conn:
                while not stop.is_set():
                    rows = conn.execute(ROWS, [namespace, "atomic"]).fetchall()
                    glob = next(r for r in rows if r["level"] == "global")
                    snapshots.append((
                        glob["rollout_percentage"], sum(r["level"] == "user" for r in rows),
                        sum(r["level"] == "tenant" for r in rows),
                        {r["variant"] for r in rows if r["level"] != "global"},
                        {r["generation"] for r in rows}, glob["generation"],
                    ))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for i in range(1, 7):
            variant, pct = ("off", 90) if i % 2 else ("on", 10)
            generation = patch(cluster, namespace, "atomic", {
                "rollout": {"percentage": pct},
                "users": [{**u, "variant": variant} for u in users],
                "tenants": [{**t, "variant": variant} for t in tenants],
            }, "flipper")
            written(stack, namespace, "atomic", generation)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert len(snapshots) > 20
    generations = set()
    for pct, n_users, n_tenants, variants, row_generations, generation in snapshots:
        assert (n_users, n_tenants) == (300, 100)
        assert len(row_generations) == 1  # every row from the same write
        assert len(variants) == 1
        assert (pct, variants) in ((0, {"on"}), (10, {"on"}), (90, {"off"}))
        generations.add(generation)
    assert len(generations) >= 3  # the reader really overlapped several changes


# --- keys, conflicts, drift --------------------------------------------------------------------

def test_keys_are_per_namespace_and_conflicts_are_reported(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    other = f"{namespace}-b"
    stack.kubectl("create", "namespace", other)
    try:
        cluster.create(PLURAL, namespace, featureflag("shared", rollout={"variant": "on", "percentage": 10}))
        cluster.create(PLURAL, other, featureflag("shared", rollout={"variant": "on", "percentage": 90}))
        cluster.wait_condition(PLURAL, namespace, "shared")
        cluster.wait_condition(PLURAL, other, "shared")
        flag_a, flag_b = written(stack, namespace, "shared", 1), written(stack, other, "shared", 1)
        assert flag_a.rollout is not None
        assert flag_b.rollout is not None
        assert (flag_a.rollout.percentage, flag_b.rollout.percentage) == (10, 90)
        # Same key twice in one namespace: the second one is refused, the first untouched.
        cluster.create(PLURAL, namespace, featureflag("impostor", key="shared", enabled=False))
        cluster.wait_condition(PLURAL, namespace, "impostor", status="False", reason="Conflict")
        assert written(stack, namespace, "shared", 1).enabled is True
        assert cli(stack, "eval", "shared", "--user", "u", check=False).returncode == 2  # ambiguous
        # The owner goes away: the other one takes the key over.
        cluster.delete(PLURAL, namespace, "shared")
        cluster.wait_condition(PLURAL, namespace, "impostor", timeout=60)
        eventually(lambda: written(stack, namespace, "shared", 1).enabled is False, timeout=30,
                   what="impostor took the key over")
    finally:
        stack.kubectl("delete", "namespace", other, "--wait=false", "--ignore-not-found")


def test_rows_and_configmap_changed_by_hand_are_repaired(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, featureflag("drifty", rollout={"variant": "on", "percentage": 40}))
    cluster.wait_condition(PLURAL, namespace, "drifty")
    original = written(stack, namespace, "drifty", 1)
    with psycopg.connect(stack.admin_dsn("second"), autocommit=True) as conn:
        conn.execute("UPDATE tenancy.feature_flags SET rollout_percentage = 100 WHERE namespace = %s", [namespace])
    cluster.core.delete_namespaced_config_map("drifty-flagd", namespace)
    eventually(lambda: stored(stack, namespace, "drifty", "second")[0] == original, timeout=30,
               what="rows repaired by the sweep")
    eventually(lambda: cluster.core.read_namespaced_config_map("drifty-flagd", namespace), timeout=30,
               what="ConfigMap re-created")
    ops = [r["operation"] for r in changes(stack, namespace, "drifty", "second")]
    assert ops == ["create", "repair"]
    assert [r["operation"] for r in changes(stack, namespace, "drifty", "default")] == ["create"]
