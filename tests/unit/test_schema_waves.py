"""Schema rollout waves (reconcilers/waves.py) and what a Tenant obeys (api/schemarollout.py),
rule by rule, on a clock the test moves and Tenants the test migrates."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from tenancy_operator.api.schemarollout import (
    SchemaRolloutSpec,
    SchemaRolloutStatus,
    tenant_bucket,
    version_cap,
)
from tenancy_operator.observability.prometheus import GateReading
from tenancy_operator.reconcilers.waves import Decision, TenantState, decide

NS, TEMPLATE = "shop", "shop-schema"
T0 = datetime.datetime(2026, 12, 3, 8, 0, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
OLD, NEW = ["0001_init", "0002_orders"], ["0001_init", "0002_orders", "0003_refunds"]


def fleet(n: int, version: str = "0002_orders") -> list[TenantState]:
    return [TenantState(f"t{i:02d}", tenant_bucket(NS, TEMPLATE, f"t{i:02d}"), version, True) for i in range(n)]


def spec(**fields: Any) -> SchemaRolloutSpec:
    return SchemaRolloutSpec.model_validate({"template": TEMPLATE, "pause": "5m", **fields})


def run(s: SchemaRolloutSpec, previous: SchemaRolloutStatus | None, tenants: list[TenantState], at: datetime.datetime,
        versions: list[str] = NEW, token: str | None = None, gate: GateReading | None = None,
        rollback: str | None = None) -> Decision:
    return decide(s, previous, namespace=NS, versions=versions, tenants=tenants, resume_token=token, now=at,
                  gate=gate, check_seconds=30, rollback_token=rollback)


def admitted(st: SchemaRolloutStatus, tenants: list[TenantState]) -> set[str]:
    return {t.name for t in tenants if version_cap(st, NS, TEMPLATE, t.name) is None}


def migrate(tenants: list[TenantState], st: SchemaRolloutStatus, fail: set[str] = frozenset()) -> list[TenantState]:
    """What the Tenant reconciles do: the admitted reach the target (or fail)."""
    out = []
    for t in tenants:
        if t.name in admitted(st, tenants) and not t.pinned:
            t = (dataclasses.replace(t, ready=False, reason="MigrationFailed", message="division by zero")
                 if t.name in fail else dataclasses.replace(t, version=st.target_version))
        out.append(t)
    return out


def test_first_sight_takes_the_template_as_it_is() -> None:
    d = run(spec(), None, fleet(5), T0, versions=OLD)
    assert (d.status.phase, d.status.base_version) == ("Idle", "0002_orders")
    assert admitted(d.status, fleet(5)) == set()  # nothing newer: the cap is what they may have anyway
    assert version_cap(None, NS, TEMPLATE, "t00") is None  # no rollout: no cap
    idle = run(spec(), d.status, fleet(5), T0, versions=OLD, token="r", rollback="b").status
    assert (idle.phase, idle.resumed_by, idle.rolled_back_by) == ("Idle", "r", "b")  # nothing to do: taken as done


def test_canary_then_waves_then_everyone() -> None:
    tenants = fleet(20)
    s = spec(canary={"tenants": ["t07"], "count": 1}, waves=[{"percentage": 50}, {"percentage": 100}])
    st = run(s, None, tenants, T0, versions=OLD).status
    d = run(s, st, tenants, T0)
    st = d.status
    assert (st.phase, st.wave, st.waves, st.target_version) == ("Progressing", 1, 3, "0003_refunds")
    first = min((t for t in tenants if t.name != "t07"), key=lambda t: (t.bucket, t.name)).name
    assert admitted(st, tenants) == {"t07", first} and st.canary == sorted({"t07", first})
    assert [e[1] for e in d.events] == ["WaveStarted"]
    assert run(s, st, tenants, T0 + MINUTE).status.reason == "WaveMigrating"  # not migrated yet

    tenants = migrate(tenants, st)
    d = run(s, st, tenants, T0 + 2 * MINUTE)
    assert d.status.reason == "Pausing" and [e[1] for e in d.events] == ["WaveCompleted"]
    st = run(s, d.status, tenants, T0 + 8 * MINUTE).status
    assert st.wave == 2 and len(admitted(st, tenants)) == 10  # 50 % of 20, the canary included
    tenants = migrate(tenants, st)
    st = run(s, st, tenants, T0 + 9 * MINUTE).status
    st = run(s, st, tenants, T0 + 15 * MINUTE).status
    assert st.wave == 3 and len(admitted(st, tenants)) == 20
    tenants = migrate(tenants, st)
    st = run(s, st, tenants, T0 + 16 * MINUTE).status
    d = run(s, st, tenants, T0 + 22 * MINUTE)
    st = d.status
    assert (st.phase, st.base_version, st.migrated, st.pending) == ("Completed", "0003_refunds", 20, 0)
    assert [e[1] for e in d.events] == ["RolloutCompleted"] and d.check_in == 30
    assert st.canary == [] and st.admit_below == 0  # the next version starts from no one again
    d = run(s, st, tenants, T0 + 30 * MINUTE, versions=[*NEW, "0004_tax"])
    assert d.status.wave == 1 and d.status.target_version == "0004_tax" and len(admitted(d.status, tenants)) == 2


def test_failures_over_budget_halt_and_the_rest_stay() -> None:
    tenants = fleet(10)
    s = spec(canary={"count": 3}, failureBudget={"count": 1})
    st = run(s, run(s, None, tenants, T0, versions=OLD).status, tenants, T0).status
    canary = admitted(st, tenants)
    tenants = migrate(tenants, st, fail=set(sorted(canary)[:2]))
    d = run(s, st, tenants, T0 + MINUTE)
    st = d.status
    assert (st.phase, st.reason, st.failed) == ("Halted", "BudgetSpent", 2)
    assert [f.name for f in st.failed_tenants] == sorted(canary)[:2]
    assert st.failed_tenants[0].reason == "MigrationFailed"
    assert [e[:2] for e in d.events] == [("Warning", "RolloutHalted")] and d.check_in is None
    later = run(s, st, tenants, T0 + 60 * MINUTE).status
    assert later.phase == "Halted" and admitted(later, tenants) == canary  # no one more admitted
    assert {t.version for t in tenants if t.name not in canary} == {"0002_orders"}
    # Fixed (the failed ones retried and migrated), then resumed: the rollout goes on.
    tenants = migrate(tenants, st)
    tenants = [dataclasses.replace(t, ready=True, reason=None) for t in tenants]
    st = run(s, later, tenants, T0 + 61 * MINUTE, token="fixed").status
    assert (st.phase, st.resumed_by, st.failed) == ("Progressing", "fixed", 0)


def test_one_failure_within_budget_goes_on() -> None:
    tenants = fleet(10)
    s = spec(canary={"count": 4}, failureBudget={"percentage": 25}, pause="0s")
    st = run(s, run(s, None, tenants, T0, versions=OLD).status, tenants, T0).status
    tenants = migrate(tenants, st, fail={sorted(admitted(st, tenants))[0]})
    st = run(s, st, tenants, T0 + MINUTE).status
    assert st.phase == "Progressing" and st.wave == 2 and st.failed == 1


def test_paused_admits_no_one_and_pins_are_skipped() -> None:
    tenants = fleet(6)
    tenants[0] = dataclasses.replace(tenants[0], pinned=True)
    s = spec(canary={"count": 6})
    st = run(s, run(s, None, tenants, T0, versions=OLD).status, tenants, T0).status
    assert tenants[0].name not in st.canary and st.pinned == 1 and len(st.canary) == 5
    held = run(spec(canary={"count": 6}, paused=True), st, tenants, T0 + MINUTE).status
    assert (held.phase, held.reason) == ("Paused", "PausedBySpec")
    assert run(s, held, tenants, T0 + 2 * MINUTE).status.phase == "Progressing"


def test_the_gate_halts_or_holds_before_the_next_wave() -> None:
    tenants = fleet(4)
    s = spec(canary={"count": 1}, gate={"query": "errors", "max": 0.1}, pause="0s")
    st = run(s, run(s, None, tenants, T0, versions=OLD).status, tenants, T0).status
    tenants = migrate(tenants, st)
    waiting = run(s, st, tenants, T0 + MINUTE, gate=GateReading(None, "the query returned 0 series")).status
    assert waiting.reason == "GateWaiting" and waiting.wave == 1
    breached = run(s, waiting, tenants, T0 + 2 * MINUTE, gate=GateReading(0.5)).status
    assert (breached.phase, breached.reason, breached.gate_value) == ("Halted", "GateBreached", 0.5)
    ok = run(s, waiting, tenants, T0 + 2 * MINUTE, gate=GateReading(0.01)).status
    assert ok.phase == "Progressing" and ok.wave == 2


def test_rollback_admits_no_one_until_every_tenant_is_back_then_resume_starts_over() -> None:
    tenants = fleet(6)
    s = spec(canary={"count": 2})
    st = run(s, run(s, None, tenants, T0, versions=OLD).status, tenants, T0).status
    canary = admitted(st, tenants)
    tenants = migrate(tenants, st)
    d = run(s, st, tenants, T0 + MINUTE, rollback="undo")
    st = d.status
    assert (st.phase, st.reason, st.rolled_back_by) == ("RolledBack", "RollingBack", "undo")
    assert admitted(st, tenants) == set() and st.base_version == "0002_orders"  # everyone capped at the base
    assert [e[:2] for e in d.events] == [("Warning", "RolloutRolledBack")] and d.check_in == 30
    # The canary's down migrations ran: back at the base.
    tenants = [dataclasses.replace(t, version="0002_orders") if t.name in canary else t for t in tenants]
    d = run(s, st, tenants, T0 + 2 * MINUTE, rollback="undo")
    assert d.status.reason == "RolledBack" and d.check_in is None and not d.events
    again = run(s, d.status, tenants, T0 + 3 * MINUTE, rollback="undo", token="fixed")
    assert (again.status.phase, again.status.wave) == ("Progressing", 1) and admitted(again.status, tenants) == canary


def test_down_migrations_are_not_migrations_of_their_own() -> None:
    from tenancy_operator.db import tenant_migrations as tm

    data = {"0001_init.sql": "a", "0002_refunds.sql": "b", "0002_refunds.down.sql": "DROP TABLE refunds;",
            "README.md": "x"}
    assert [m.version for m in tm.migrations_from_data(data)] == ["0001_init", "0002_refunds"]
    down = tm.down_migrations_from_data(data)
    assert list(down) == ["0002_refunds"] and down["0002_refunds"].text == "DROP TABLE refunds;"


def test_the_snapshot_mark_is_a_line_of_its_own() -> None:
    from tenancy_operator.db.tenant_migrations import Migration

    assert Migration("0003_drop", "-- tenancy: snapshot-before\nALTER TABLE items DROP COLUMN note;").snapshot_before
    assert Migration("0003_drop", "ALTER TABLE items DROP COLUMN note;\n  --tenancy:snapshot-before  ").snapshot_before
    assert not Migration("0003_drop", "SELECT '-- tenancy: snapshot-before';").snapshot_before
    assert not Migration("0003_drop", "ALTER TABLE items DROP COLUMN note;").snapshot_before


def test_the_rollout_cache_tells_what_it_holds_without_a_request() -> None:
    import asyncio

    from tenancy_operator.reconcilers.tenant_base import RolloutCache, admission

    def body(name: str, created: str, admit_below: int) -> dict[str, Any]:
        return {"metadata": {"namespace": NS, "name": name, "creationTimestamp": created, "resourceVersion": "1",
                             "uid": name},
                "spec": {"template": TEMPLATE}, "status": {"baseVersion": "0001_init", "admitBelow": admit_below}}

    class Lister:
        lists = 0

        async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
            self.lists += 1
            return [body("older", "2026-01-01T00:00:00Z", 10), body("newer", "2026-02-01T00:00:00Z", 99)]

    kube = Lister()
    cache = RolloutCache(kube)  # type: ignore[arg-type]
    assert cache.peek(NS, TEMPLATE) == (False, None) and kube.lists == 0  # a cold namespace is not LISTed to peek
    governing = asyncio.run(cache.get(NS, TEMPLATE))
    assert governing is not None and governing["metadata"]["name"] == "older" and kube.lists == 1
    changed = body("older", "2026-01-01T00:00:00Z", 500)
    changed["metadata"]["resourceVersion"] = "2"
    known, before = cache.peek(NS, TEMPLATE)
    cache.seen(changed)
    assert known and admission(before) != admission(cache.peek(NS, TEMPLATE)[1])
