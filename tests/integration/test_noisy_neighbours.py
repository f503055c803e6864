"""Noisy neighbours against the real API server, real PostgreSQL and the operator process.

Three tenants share the default target; one runs a CPU-heavy query loop over its own login. Its
share of the target's load, its metric and its NoisyNeighbor condition rise, a declared containment
lowers its role's limits (Events, ledger jobs), and everything is undone once the loop stops. The
quiet tenants are never flagged. The session operator measures every 2 s; every wait is a poll with
a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, connect, eventually, sql_value
from .test_quota import QUOTAS, TENANTS, provision, quota, role

HEAVY = "SELECT count(*) FROM generate_series(1, 400000) g WHERE g % 7 = 3"


@contextmanager
def busy(uri: str) -> Iterator[list[int]]:
    """A bounded CPU-heavy loop over the tenant's login in a thread, stopped on exit."""
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            with connect(uri) as conn:
                for _ in range(100_000):
                    if stop.is_set():
                        return
                    conn.execute(HEAVY)
                    done.append(1)
        except psycopg.errors.QueryCanceled:
            pass  # a statement_timeout of the containment may cut one: fine, it is load too
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=loop, name="noisy-loop", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the load loop did not stop"
    assert not errors, errors


def load(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return dict((cluster.get(QUOTAS, namespace, name).get("status") or {}).get("load") or {})


def noisy(cluster: Cluster, plural: str, namespace: str, name: str) -> str | None:
    return cluster.condition(plural, namespace, name, "NoisyNeighbor").get("status")


def ledger(stack: LocalStack, namespace: str, name: str, kind: str) -> int:
    return int(sql_value(
        stack.admin_dsn(),
        "SELECT count(*) FROM tenancy.lifecycle_jobs j JOIN tenancy.tenants t ON t.id = j.tenant_id"
        " WHERE t.namespace = %s AND t.name = %s AND j.kind = %s AND j.state = 'succeeded'",
        [namespace, name, kind],
    ))


def has_statements(stack: LocalStack) -> bool:
    """pg_stat_statements is installed in the tenancy database and its library loaded."""
    return bool(sql_value(
        stack.admin_dsn(),
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_stat_statements')"
        " AND 'pg_stat_statements' = ANY(string_to_array(replace(current_setting('shared_preload_libraries'),"
        " ' ', ''), ','))",
    ))


POLICY = {
    "multiple": 1.5, "window": "6s", "minLoad": "500ms",
    "containment": {"connections": {"factor": 0.5, "floor": 2},
                    "statementTimeout": {"factor": 0.5, "floor": "2s"}},
}


def test_a_busy_tenant_is_flagged_contained_and_released(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    loud_uri = provision(cluster, namespace, "loud", tier="starter")
    provision(cluster, namespace, "quiet", tier="starter")
    provision(cluster, namespace, "hushed", tier="starter")  # no Quota: its condition is on the Tenant
    limits = {"connections": 10, "statementTimeout": "10s"}
    cluster.create(QUOTAS, namespace, quota("loud", "loud", limits=limits, noisyNeighbor=POLICY))
    cluster.create(QUOTAS, namespace, quota("quiet", "quiet", limits=limits, noisyNeighbor=POLICY))
    cluster.wait_condition(QUOTAS, namespace, "loud")
    cluster.wait_condition(QUOTAS, namespace, "quiet")
    source = "pg_stat_statements" if has_statements(stack) else "pg_stat_activity"

    # Measured and calm before any load: the condition is False on both Quotas and on the Tenant
    # without a Quota; status says where the numbers come from.
    eventually(lambda: noisy(cluster, QUOTAS, namespace, "loud") == "False", what="loud measured, calm")
    eventually(lambda: noisy(cluster, QUOTAS, namespace, "quiet") == "False", what="quiet measured, calm")
    eventually(lambda: noisy(cluster, TENANTS, namespace, "hushed") == "False",
               what="NoisyNeighbor=False on the Tenant without a Quota")
    assert load(cluster, namespace, "loud")["source"] == source
    assert role(stack, "loud")[0] == 10

    quiet_flags: list[str] = []

    def quiet_never_flagged() -> None:
        for plural, name in ((QUOTAS, "quiet"), (TENANTS, "hushed")):
            if noisy(cluster, plural, namespace, name) == "True":
                quiet_flags.append(name)
        assert not quiet_flags, f"quiet tenants flagged: {quiet_flags}"

    with busy(loud_uri) as done:
        def flagged() -> dict[str, Any]:
            quiet_never_flagged()
            assert noisy(cluster, QUOTAS, namespace, "loud") == "True", load(cluster, namespace, "loud")
            return load(cluster, namespace, "loud")

        status = eventually(flagged, timeout=90, what="loud is a noisy neighbour")
        assert done, "the loop ran no statement"
        assert status["share"] > 0.5, status
        assert status["ratioToAverage"] > 1.5, status
        assert status["executionSeconds"] > 0, status
        if source == "pg_stat_statements":
            assert status["calls"] > 0, status
        assert operator.metric("tenant_noisy_neighbor", namespace=namespace, tenant="loud") == 1
        assert operator.metric("tenant_resource_usage_seconds_total", namespace=namespace, tenant="loud") > 0
        assert operator.metric("tenant_load_share_ratio", namespace=namespace, tenant="loud") > 0.5
        eventually(lambda: cluster.has_event(namespace, "loud", "NoisyNeighbor", "Warning"),
                   what="NoisyNeighbor Event")

        # Declared containment: half the limits in force, above the floors; an Event and a ledger job.
        def contained() -> bool:
            limit, config = role(stack, "loud")
            assert limit == 5, limit
            assert "statement_timeout=5000" in config, config
            return True
        eventually(contained, what="loud's role contained")
        contained_now = sorted(load(cluster, namespace, "loud").get("contained") or [])
        assert contained_now == ["connections", "statementTimeout"], contained_now
        eventually(lambda: cluster.has_event(namespace, "loud", "NoisyNeighborContained", "Warning"),
                   what="NoisyNeighborContained Event")
        assert ledger(stack, namespace, "loud", "contain") == 1

        # The printer columns show the share next to storage and connections.
        table = stack.kubectl("get", "tq", "-n", namespace).stdout
        assert "LOAD-SHARE" in table.splitlines()[0], table
        quiet_never_flagged()
        loud_usage = operator.metric("tenant_resource_usage_seconds_total", namespace=namespace, tenant="loud")
        quiet_usage = operator.metric("tenant_resource_usage_seconds_total", namespace=namespace, tenant="quiet")
        assert quiet_usage < loud_usage / 10, (quiet_usage, loud_usage)

    # The loop stopped: calm again once the window passes, containment undone, Events and a job.
    def calm() -> bool:
        quiet_never_flagged()
        assert noisy(cluster, QUOTAS, namespace, "loud") == "False", load(cluster, namespace, "loud")
        return True
    eventually(calm, timeout=60, what="loud calm again")

    def restored() -> bool:
        limit, config = role(stack, "loud")
        assert limit == 10, limit
        assert "statement_timeout=10000" in config, config
        return True
    eventually(restored, what="loud's role restored")
    assert not load(cluster, namespace, "loud").get("contained")
    cluster.wait_event(namespace, "loud", "NoisyNeighborCalm", "Normal")
    eventually(lambda: cluster.has_event(namespace, "loud", "NoisyNeighborReleased", "Normal"),
               what="Released Event")
    assert ledger(stack, namespace, "loud", "release") == 1
    eventually(lambda: operator.metric("tenant_noisy_neighbor", namespace=namespace, tenant="loud") == 0,
               what="metric back to 0")
    for name in ("quiet", "hushed"):
        assert not any(e["reason"].startswith("NoisyNeighbor") for e in cluster.events(namespace, name)), name
    assert ledger(stack, namespace, "quiet", "contain") == 0


def test_without_pg_stat_statements_load_is_sampled_and_status_says_so(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "sampled", tier="starter")
    cluster.create(QUOTAS, namespace, quota("sampled", "sampled", noisyNeighbor={"window": "6s"}))
    cluster.wait_condition(QUOTAS, namespace, "sampled")
    if not has_statements(stack):  # an installation without the library: the fallback all along
        status = eventually(lambda: load(cluster, namespace, "sampled") or None, what="load measured")
        assert status["source"] == "pg_stat_activity"
        assert "pg_stat_statements" in status["detail"]
        return
    eventually(lambda: load(cluster, namespace, "sampled").get("source") == "pg_stat_statements",
               what="load from pg_stat_statements")
    with connect(stack.admin_dsn()) as conn:
        conn.execute("DROP EXTENSION pg_stat_statements")
    try:
        def sampled() -> dict[str, Any]:
            status = load(cluster, namespace, "sampled")
            assert status.get("source") == "pg_stat_activity", status
            return status
        status = eventually(sampled, timeout=60, what="load sampled from sessions")
        assert "pg_stat_statements is not available" in status["detail"], status
        assert noisy(cluster, QUOTAS, namespace, "sampled") in ("False", "Unknown")
        assert operator.metric("tenant_load_statements_available", target="default") == 0
    finally:
        with connect(stack.admin_dsn()) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    eventually(lambda: load(cluster, namespace, "sampled").get("source") == "pg_stat_statements", timeout=90,
               what="back to pg_stat_statements")
