"""Quota policy as pure functions: effective limits, usage levels, role settings, the registry
document, status patches and Events, plus the loop's wake-up at an override's expiry."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from tenancy_operator.api.quota import TIER_DEFAULTS, QuotaSpec, limit_amount, tier_defaults_from_json
from tenancy_operator.conditions import status_patch
from tenancy_operator.config import Settings
from tenancy_operator.db.quota import RoleQuotaState, is_on, role_setting
from tenancy_operator.k8s.client import Page
from tenancy_operator.reconcilers.noisy import Delta, Sample, Verdict
from tenancy_operator.reconcilers.quota import QuotaService
from tenancy_operator.reconcilers.quota_limits import (
    EXCEEDED,
    NEAR,
    OK,
    RoleSettings,
    desired_role,
    effective_limits,
    format_used,
    level,
    next_expiry,
    registry_document,
    role_changes,
    sort_quotas,
    usage_ratios,
    used_amounts,
)
from tenancy_operator.reconcilers.quota_policy import evaluate
from tenancy_operator.reconcilers.quota_types import LoadView, Memory, Probe, Subject
from tenancy_operator.runtime_context import KeyedLocks, slim_tenant
from tenancy_operator.shards import Ownership
from tenancy_operator.status_writer import StatusWriter
from tenancy_operator.watch_cache import WatchCache

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
NS = "acme"
STALE = timedelta(minutes=5)
MiB = 2**20


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


# --- Tier defaults -------------------------------------------------------------------------------


def test_tier_defaults_cover_every_tier_and_limit() -> None:
    assert set(TIER_DEFAULTS) == {"free", "starter", "professional", "enterprise"}
    for limits in TIER_DEFAULTS.values():
        assert set(limits) == {"storage", "connections", "requestsPerSecond", "burst", "concurrentJobs",
                               "statementTimeout"}
    assert tier_defaults_from_json("") == TIER_DEFAULTS


def test_tier_defaults_merge_over_the_builtin_table() -> None:
    table = tier_defaults_from_json('{"free": {"connections": 3, "storage": "512Mi"}, "enterprise": {"burst": null}}')
    assert table["free"]["connections"] == "3"
    assert table["free"]["storage"] == "512Mi"
    assert table["free"]["burst"] == TIER_DEFAULTS["free"]["burst"]
    assert "burst" not in table["enterprise"]  # null: no default, unlimited unless a Quota sets it
    assert table["starter"] == TIER_DEFAULTS["starter"]


@pytest.mark.parametrize(("raw", "fragment"), [
    ("{not json", "not valid JSON"),
    ("[1]", "JSON object"),
    ('{"gold": {}}', "unknown tier 'gold'"),
    ('{"free": {"cpu": 1}}', "unknown limit(s) cpu"),
    ('{"free": {"connections": 0}}', "free"),
    ('{"free": {"storage": "-1Gi"}}', "free"),
    ('{"free": {"statementTimeout": "0s"}}', "free"),
    ('{"free": 5}', "must be an object"),
])
def test_bad_tier_defaults_stop_the_operator_at_start(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="TENANCY_TIER_DEFAULTS") as info:
        tier_defaults_from_json(raw)
    assert fragment in str(info.value)
    with pytest.raises(ValidationError):
        Settings(tier_defaults=raw)


def test_quota_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TENANCY_QUOTA_INTERVAL_SECONDS", "TENANCY_QUOTA_PER_TENANT_METRICS", "TENANCY_TIER_DEFAULTS"):
        monkeypatch.delenv(var, raising=False)
    cfg = Settings()
    assert cfg.quota_interval_seconds == 60
    assert cfg.quota_per_tenant_metrics is True
    assert cfg.tier_limits == TIER_DEFAULTS
    monkeypatch.setenv("TENANCY_QUOTA_PER_TENANT_METRICS", "false")
    monkeypatch.setenv("TENANCY_TIER_DEFAULTS", '{"starter": {"connections": 25}}')
    cfg = Settings()
    assert cfg.quota_per_tenant_metrics is False
    assert cfg.tier_limits["starter"]["connections"] == "25"


def test_limit_amounts() -> None:
    assert limit_amount("storage", "10Gi") == 10 * 2**30
    assert limit_amount("statementTimeout", "1.5s") == 1500
    assert limit_amount("statementTimeout", "1m") == 60_000
    assert limit_amount("statementTimeout", "60d") == 2**31 - 1  # PostgreSQL's maximum
    assert limit_amount("connections", "20") == 20


# --- Effective limits ------------------------------------------------------------------------------


def spec(**kwargs: Any) -> QuotaSpec:
    return QuotaSpec.model_validate({"tenantRef": {"name": "acme-corp"}, **kwargs})


def override(limit: str, value: Any, expires: datetime, reason: str | None = None) -> dict[str, Any]:
    return {"limit": limit, "value": value, "expiresAt": iso(expires), "reason": reason}


def test_effective_limits_layer_defaults_quota_and_unexpired_overrides() -> None:
    defaults = TIER_DEFAULTS["starter"]
    assert effective_limits(defaults, None, NOW) == defaults
    s = spec(limits={"connections": 7, "storage": "20Gi"}, overrides=[
        override("connections", 50, NOW + timedelta(hours=1)),
        override("burst", 999, NOW - timedelta(seconds=1)),  # expired: ignored
        override("statementTimeout", "2m", NOW + timedelta(minutes=5)),
    ])
    hard = effective_limits(defaults, s, NOW)
    assert hard == {**defaults, "storage": "20Gi", "connections": "50", "statementTimeout": "2m"}
    assert list(hard) == ["storage", "connections", "requestsPerSecond", "burst", "concurrentJobs",
                          "statementTimeout"]
    # At the override's expiry the Quota's own value is back.
    assert effective_limits(defaults, s, NOW + timedelta(hours=1))["connections"] == "7"


def test_next_expiry_is_the_earliest_future_override() -> None:
    s = spec(overrides=[
        override("connections", 50, NOW + timedelta(hours=1)),
        override("burst", 5, NOW + timedelta(minutes=3)),
        override("storage", "1Gi", NOW - timedelta(minutes=3)),
    ])
    assert next_expiry(s, NOW) == NOW + timedelta(minutes=3)
    assert next_expiry(s, NOW + timedelta(minutes=3)) == NOW + timedelta(hours=1)
    assert next_expiry(s, NOW + timedelta(hours=2)) is None
    assert next_expiry(None, NOW) is None


# --- Usage -------------------------------------------------------------------------------------------


def test_usage_ratios_and_levels() -> None:
    used = used_amounts(9 * MiB, 2, {"concurrentJobs": Decimal(1), "statementTimeout": Decimal(5), "other": Decimal(1)})
    assert set(used) == {"storage", "connections", "concurrentJobs"}  # no usage for a timeout, no strangers
    hard = {"storage": "10Mi", "connections": "2", "concurrentJobs": "4", "statementTimeout": "30s"}
    ratios = usage_ratios(hard, used)
    assert ratios == {"storage": 0.9, "connections": 1.0, "concurrentJobs": 0.25}
    assert [level(r) for r in (0.25, 0.9, 0.95, 1.0, 1.3)] == [OK, NEAR, NEAR, EXCEEDED, EXCEEDED]
    assert format_used("storage", Decimal(9 * MiB)) == "9Mi"
    assert format_used("storage", Decimal(12345)) == "12345"
    assert format_used("requestsPerSecond", Decimal("12.50")) == "12.5"
    assert format_used("connections", Decimal(3)) == "3"


# --- Role settings -----------------------------------------------------------------------------------


def state(**kw: Any) -> RoleQuotaState:
    base: dict[str, Any] = {
        "tenant_id": "11111111-1111-1111-1111-111111111111", "row_namespace": NS, "row_name": "acme-corp",
        "published": {}, "role_exists": True, "connection_limit": -1, "statement_timeout": None,
        "read_only": False,
    }
    base.update(kw)
    return RoleQuotaState(**base)


def test_role_settings_and_what_differs() -> None:
    want = desired_role({"connections": "20", "statementTimeout": "30s"}, read_only=False)
    assert want == RoleSettings(20, 30_000, False)
    assert desired_role({}, read_only=True) == RoleSettings(-1, None, True)
    assert role_changes(state(), want) == ["connections", "statementTimeout"]
    assert role_changes(state(connection_limit=20, statement_timeout="30000"), want) == []
    # Set by hand as '30s': rewritten once in the operator's form, then stable.
    assert role_changes(state(connection_limit=20, statement_timeout="30s"), want) == ["statementTimeout"]
    assert role_changes(state(connection_limit=20, statement_timeout="30000", read_only=True), want) == ["readOnly"]


def test_rolconfig_parsing() -> None:
    config = ["search_path=tenant_x", "statement_timeout=30000", "default_transaction_read_only=on"]
    assert role_setting(config, "statement_timeout") == "30000"
    assert role_setting(config, "lock_timeout") is None
    assert role_setting(None, "statement_timeout") is None
    assert is_on(role_setting(config, "default_transaction_read_only"))
    assert is_on("true")
    assert not is_on("off")
    assert not is_on(None)


# --- Registry document and status patches ------------------------------------------------------------


def test_registry_document() -> None:
    s = spec(overrides=[override("connections", 50, NOW + timedelta(hours=1), "migration")])
    doc = registry_document({"storage": "10Gi", "connections": "50", "statementTimeout": "30s"},
                            enforcement="BlockWrites", blocked=False, active=s.active_overrides(NOW), quota="q")
    assert doc == {
        "storage": "10Gi", "storageBytes": 10 * 2**30, "connections": 50, "statementTimeout": "30s",
        "statementTimeoutMs": 30_000, "storageEnforcement": "BlockWrites", "writesBlocked": False,
        "overrides": [{"limit": "connections", "value": "50", "expiresAt": "2026-11-22T13:00:00Z"}],
        "quota": "q",
    }


def test_merge_patch_only_what_differs() -> None:
    current = {"hard": {"storage": "1Gi", "burst": "5"}, "used": {"storage": "1Ki"}, "x": [1], "keep": 1}
    assert status_patch(current, {"hard": {"storage": "1Gi", "burst": "5"}, "x": [1]}) == {}
    assert status_patch(current, {"hard": {"storage": "2Gi"}}) == {"hard": {"storage": "2Gi", "burst": None}}
    assert status_patch(current, {"used": {}, "x": []}) == {"used": {"storage": None}, "x": []}
    assert status_patch(None, {"hard": {"a": "1"}}) == {"hard": {"a": "1"}}
    assert status_patch({"hard": None}, {"hard": {}}) == {"hard": {}}


def test_the_oldest_quota_is_in_force() -> None:
    def q(name: str, created: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "creationTimestamp": created}}

    ordered = sort_quotas([q("b", "2026-01-02T00:00:00Z"), q("z", "2026-01-01T00:00:00Z"),
                           q("a", "2026-01-02T00:00:00Z")])
    assert [x["metadata"]["name"] for x in ordered] == ["z", "a", "b"]


# --- evaluate: the whole policy for one tenant ---------------------------------------------------------


def tenant_body(tier: str = "starter", *, conditions: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "acme-corp", "namespace": NS, "uid": "t-uid", "generation": 1},
        "spec": {"tier": tier},
    }
    if conditions:
        body["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    return body


def quota_body(name: str = "acme-corp", created: str = "2026-01-01T00:00:00Z", **spec_: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "Quota",
        "metadata": {"name": name, "namespace": NS, "uid": f"q-{name}", "generation": 1,
                     "creationTimestamp": created},
        "spec": {"tenantRef": {"name": "acme-corp"}, **spec_},
    }


def probe(storage: int = 0, connections: int = 0, load: LoadView | None = None, **st: Any) -> Probe:
    return Probe(state=state(**st), storage=storage, connections=connections, target="default",
                 ident="tenant_acme_corp", load=load)


def run(subject: Subject, p: Probe | None, memory: Memory | None = None, now: datetime = NOW) -> Any:
    return evaluate(subject, p, tier_limits=TIER_DEFAULTS, now=now, memory=memory, stale_after=STALE)


def conds(patch: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}


def events(plan: Any) -> list[tuple[str, str]]:
    return [(type_, reason) for _, type_, reason, _ in plan.events]


def applied(body: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``body`` after the API server applied the merge ``patch`` to its status."""
    out = copy.deepcopy(body)
    status = out.setdefault("status", {})
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(status.get(k), dict):
            status[k].update(v)
            status[k] = {kk: vv for kk, vv in status[k].items() if vv is not None}
        else:
            status[k] = v
    return out


def test_missing_tenant_and_conflicting_quota() -> None:
    first, second = quota_body("first"), quota_body("second", created="2026-02-01T00:00:00Z")
    plan = run(Subject(NS, "acme-corp", None, [first, second]), None)
    assert not plan.enforce
    patches = {b["metadata"]["name"]: p for b, p in plan.quota_patches}
    assert conds(patches["first"])["Ready"] == ("False", "TenantNotFound")
    assert conds(patches["second"])["Ready"] == ("False", "Conflict")
    assert ("Warning", "TenantNotFound") in events(plan)
    assert ("Warning", "Conflict") in events(plan)
    # Reported once: the same state again posts nothing new and writes nothing.
    again = run(Subject(NS, "acme-corp", None, [applied(first, patches["first"]), applied(second, patches["second"])]),
                None)
    assert again.quota_patches == []
    assert again.events == []


def test_tenant_without_quota_gets_tier_defaults() -> None:
    t = tenant_body("professional")
    plan = run(Subject(NS, "acme-corp", t, []), probe())
    assert plan.enforce
    assert plan.hard == TIER_DEFAULTS["professional"]
    assert plan.role == RoleSettings(50, 60_000, False)
    assert plan.role_changes == ["connections", "statementTimeout"]
    assert plan.publish is not None
    assert plan.publish["quota"] is None
    assert plan.tenant_patch == {"effectiveLimits": TIER_DEFAULTS["professional"]}
    assert plan.quota_patches == []
    # Before the Tenant's own first status, effectiveLimits waits (it keys off an empty status).
    assert run(Subject(NS, "acme-corp", tenant_body(conditions=False), []), probe()).tenant_patch is None


def test_storage_over_the_limit_with_block_writes() -> None:
    q = quota_body(limits={"storage": "1Mi"}, enforcement={"storage": "BlockWrites"})
    t = tenant_body()
    subject = Subject(NS, "acme-corp", t, [q])
    plan = run(subject, probe(storage=2 * MiB, connection_limit=20, statement_timeout="30000"))
    assert plan.role == RoleSettings(20, 30_000, True)
    assert plan.role_changes == ["readOnly"]
    assert plan.terminate
    assert plan.publish["writesBlocked"] is True
    [(_, patch)] = plan.quota_patches
    assert conds(patch) == {"Ready": ("True", "Enforced"), "NearLimit": ("True", "ThresholdReached"),
                            "Exceeded": ("True", "LimitReached"), "NoisyNeighbor": ("Unknown", "NotMeasured")}
    assert patch["used"]["storage"] == "2Mi"
    assert patch["usageRatio"]["storage"] == 2.0
    assert "lastMeasuredAt" in patch
    assert events(plan) == [("Warning", "QuotaExceeded"), ("Warning", "WritesBlocked")]

    # Next evaluation, nothing changed: nothing to do, nothing to say.
    q2 = applied(q, patch)
    steady = run(Subject(NS, "acme-corp", applied(t, plan.tenant_patch), [q2]),
                 probe(storage=2 * MiB, connection_limit=20, statement_timeout="30000", read_only=True,
                       published=plan.publish), memory=plan.memory)
    assert steady.role_changes == []
    assert steady.publish is None
    assert steady.quota_patches == []
    assert steady.tenant_patch is None
    assert steady.events == []

    # Back under the limit: writes allowed again, with Events.
    freed = run(Subject(NS, "acme-corp", t, [q2]),
                probe(storage=MiB // 2, connection_limit=20, statement_timeout="30000", read_only=True,
                      published=plan.publish), memory=plan.memory)
    assert freed.role_changes == ["readOnly"]
    assert freed.role.read_only is False
    assert events(freed) == [("Normal", "QuotaBackUnderLimit"), ("Normal", "WritesAllowed")]
    assert conds(freed.quota_patches[0][1])["Exceeded"] == ("False", "WithinLimits")


def test_the_noisy_neighbor_condition_names_the_target_when_a_limit_is_freed_too() -> None:
    # A limit back under its threshold and a measured load in one evaluation: the condition still
    # speaks of the tenant's database target, whatever the limit Events say.
    q = quota_body(limits={"storage": "1Mi"})
    t = tenant_body()
    minute = Delta.between(Sample(0.0, 0.0), Sample(60.0, 1.0))
    measured = LoadView(Verdict(False, 0.1, 1.0, minute, 3), "pg_stat_statements", None, "5m")
    full = run(Subject(NS, "acme-corp", t, [q]), probe(storage=2 * MiB, load=measured))
    freed = run(Subject(NS, "acme-corp", t, [applied(q, full.quota_patches[0][1])]),
                probe(storage=MiB // 2, load=measured), memory=full.memory)
    assert ("Normal", "QuotaBackUnderLimit") in events(freed)
    [noisy] = [c for c in freed.quota_patches[0][1]["conditions"] if c["type"] == "NoisyNeighbor"]
    assert noisy["reason"] == "LoadWithinThreshold"
    assert noisy["message"].endswith("the average tenant's load on database target 'default' over 5m")


def test_warn_enforcement_reports_but_never_blocks() -> None:
    q = quota_body(limits={"storage": "1Mi"})
    plan = run(Subject(NS, "acme-corp", tenant_body(), [q]), probe(storage=2 * MiB))
    assert plan.role.read_only is False
    assert "readOnly" not in plan.role_changes
    assert ("Warning", "QuotaExceeded") in events(plan)
    assert plan.publish["writesBlocked"] is False


def test_near_limit_event_then_exceeded_after_a_restart_without_repeats() -> None:
    q = quota_body(limits={"connections": 10})
    t = tenant_body()
    near = run(Subject(NS, "acme-corp", t, [q]), probe(connections=9))
    assert events(near) == [("Warning", "QuotaNearLimit")]
    q = applied(q, near.quota_patches[0][1])
    # A restarted operator has no memory: the status tells it what was already reported.
    again = run(Subject(NS, "acme-corp", t, [q]), probe(connections=9), memory=None)
    assert again.events == []
    over = run(Subject(NS, "acme-corp", t, [q]), probe(connections=10), memory=None)
    assert events(over) == [("Warning", "QuotaExceeded")]


def test_override_expiry_event_and_limit_back() -> None:
    expires = NOW + timedelta(seconds=5)
    q = quota_body(limits={"connections": 3},
                   overrides=[override("connections", 8, expires, "load test")])
    t = tenant_body()
    before = run(Subject(NS, "acme-corp", t, [q]), probe(connection_limit=3, statement_timeout="30000"))
    assert before.hard["connections"] == "8"
    assert before.role_changes == ["connections"]
    assert before.next_expiry == expires
    patch = before.quota_patches[0][1]
    assert patch["activeOverrides"] == [{"limit": "connections", "value": 8, "expiresAt": iso(expires),
                                         "reason": "load test"}]
    q = applied(q, patch)
    after = run(Subject(NS, "acme-corp", t, [q]), probe(connection_limit=8, statement_timeout="30000"),
                memory=before.memory, now=expires + timedelta(milliseconds=50))
    assert after.hard["connections"] == "3"
    assert after.role_changes == ["connections"]
    assert after.next_expiry is None
    assert after.expired == ["connections"]
    [(_, type_, reason, message)] = after.events
    assert (type_, reason) == ("Normal", "OverrideExpired")
    assert "load test" in message
    assert "connections is 3 again" in message
    assert after.quota_patches[0][1]["activeOverrides"] == []
    # After a restart the status still knows the override was in force: the Event is not lost.
    restarted = run(Subject(NS, "acme-corp", t, [q]), probe(connection_limit=8, statement_timeout="30000"),
                    memory=None, now=expires + timedelta(seconds=1))
    assert ("Normal", "OverrideExpired") in events(restarted)


def test_tenant_not_provisioned_yet_is_not_a_warning() -> None:
    q = quota_body(limits={"connections": 3})
    plan = run(Subject(NS, "acme-corp", tenant_body(), [q]),
               Probe(problem=("TenantNotReady", "tenant has no provisioned schema and role yet")))
    assert not plan.enforce
    [(_, patch)] = plan.quota_patches
    assert conds(patch) == {"Ready": ("False", "TenantNotReady")}
    assert patch["hard"]["connections"] == "3"
    assert plan.events == []


def test_last_measured_at_is_refreshed_when_stale_only() -> None:
    q = quota_body(limits={"connections": 10})
    t = tenant_body()
    first = run(Subject(NS, "acme-corp", t, [q]), probe(connections=1))
    q = applied(q, first.quota_patches[0][1])
    soon = run(Subject(NS, "acme-corp", t, [q]), probe(connections=1), memory=first.memory,
               now=NOW + timedelta(minutes=1))
    assert soon.quota_patches == []
    stale = run(Subject(NS, "acme-corp", t, [q]), probe(connections=1), memory=first.memory,
                now=NOW + STALE)
    assert [list(p) for _, p in stale.quota_patches] == [["lastMeasuredAt"]]


# --- The loop wakes at an override's expiry, not at the next interval ----------------------------------


class RecordingService(QuotaService):
    """The real scheduling loop; passes and evaluations are recorded instead of done."""

    def __init__(self) -> None:
        ctx = SimpleNamespace(settings=Settings(quota_interval_seconds=3600),
                              locks=defaultdict(asyncio.Lock), ownership=Ownership(),
                              tenants=WatchCache(slim_tenant),
                              status=StatusWriter(None))  # type: ignore[arg-type]  # writes nothing
        super().__init__(ctx)  # type: ignore[arg-type]
        self.passes = 0
        self.evaluated: list[tuple[str, str, str, float]] = []
        self.seen = asyncio.Event()

    async def pass_once(self) -> int:
        self.passes += 1
        return 0

    async def reconcile_tenant(self, namespace: str, name: str, *, trigger: str,
                               wanted: Callable[[], bool] | None = None) -> Any:
        self.evaluated.append((namespace, name, trigger, time.monotonic()))
        self.expiries.pop((namespace, name), None)
        self.seen.set()


async def test_loop_wakes_when_an_override_expires() -> None:
    svc = RecordingService()
    task = asyncio.create_task(svc.run_forever())
    try:
        while svc.passes == 0:  # the start-up pass
            await asyncio.sleep(0)
        start = time.monotonic()
        # A handler learned of an override ending in 0.3 s; the loop sleeps for an hour otherwise.
        svc.expiries[(NS, "acme-corp")] = datetime.now(UTC) + timedelta(seconds=0.3)
        svc.poke()
        await asyncio.wait_for(svc.seen.wait(), timeout=5)
        [(ns, name, trigger, at)] = svc.evaluated
        assert (ns, name, trigger) == (NS, "acme-corp", "override-expiry")
        assert 0.3 <= at - start < 2.0
        assert svc.passes == 1  # no interval pass was needed
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- Metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_tenant", [True, False])
def test_per_tenant_series_can_be_switched_off(per_tenant: bool) -> None:
    from prometheus_client import REGISTRY

    from tenancy_operator.observability.metrics import TENANT_REGISTRY

    svc = RecordingService()
    svc.ctx.settings = Settings(quota_per_tenant_metrics=per_tenant)
    tenant_name = f"metrics-{per_tenant}".lower()
    q = quota_body(limits={"connections": 10})
    plan = run(Subject("m", tenant_name, tenant_body(), [q]), probe(connections=9))
    svc.series.update_series(("m", tenant_name), plan)
    labels = {"namespace": "m", "tenant": tenant_name, "resource": "connections"}
    expected = (10.0, 9.0) if per_tenant else (None, None)
    assert (TENANT_REGISTRY.get_sample_value("tenant_quota_limit", labels),
            TENANT_REGISTRY.get_sample_value("tenant_quota_used", labels)) == expected
    assert TENANT_REGISTRY.get_sample_value(
        "tenant_quota_limit", {**labels, "resource": "statementTimeout"}) == (30.0 if per_tenant else None)
    svc.memory[("m", tenant_name)] = plan.memory
    svc.series.update_aggregates()  # always on: tenants per resource and state
    assert REGISTRY.get_sample_value("tenant_quota_tenants", {"resource": "connections", "state": "near"}) >= 1
    svc.forget(("m", tenant_name))  # a deleted tenant leaves no series behind
    assert TENANT_REGISTRY.get_sample_value("tenant_quota_limit", labels) is None


def test_per_state_counts_follow_each_memory() -> None:
    """The tenants-per-state counts are kept as memories change, and equal a recount over them."""
    from tenancy_operator.reconcilers.quota_limits import EXCEEDED, NEAR, OK
    from tenancy_operator.reconcilers.quota_metrics import Memories
    from tenancy_operator.reconcilers.quota_types import Memory

    book = Memories()
    book[("a", "t1")] = Memory("u1", "free", {"connections": NEAR, "storage": OK}, set(), noisy=True)
    book[("a", "t2")] = Memory("u2", "free", {"connections": EXCEEDED}, set(), noisy=False)
    book[("b", "t3")] = Memory("u3", "free", {"storage": EXCEEDED}, set(), noisy=True)
    book[("a", "t1")] = Memory("u1", "free", {"connections": EXCEEDED}, set(), noisy=None)  # replaced
    book.pop(("b", "t3"))
    book.pop(("b", "gone"), None)
    assert {k: v for k, v in book.states.items() if v} == {("connections", NEAR): 2, ("connections", EXCEEDED): 2}
    assert book.noisy == 0
    book[("b", "t3")] = Memory("u3", "free", {"storage": NEAR}, set(), noisy=True)
    assert {k: v for k, v in book.states.items() if v} == {
        ("connections", NEAR): 2, ("connections", EXCEEDED): 2, ("storage", NEAR): 1}
    assert book.noisy == 1 and len(book) == 3 and set(book) == {("a", "t1"), ("a", "t2"), ("b", "t3")}


# --- Fewer evaluations and writes during a mass creation -----------------------------------------------


class QuotaListing:
    """What a LIST of Quotas by spec.tenantRef.name answers: ``quotas`` (none unless a test says)."""

    def __init__(self) -> None:
        self.quotas: list[dict[str, Any]] = []
        self.selectors: list[str] = []

    async def list_pages(self, plural: str, namespace: str | None = None, *, field_selector: str = "",
                         label_selector: str = "") -> AsyncIterator[Page]:
        assert plural == "quotas"
        self.selectors.append(field_selector)
        name = field_selector.removeprefix("spec.tenantRef.name=")
        yield Page([q for q in self.quotas if q["spec"]["tenantRef"]["name"] == name], "1")


class CountingService(QuotaService):
    """The real scheduling and skipping logic over the watch cache; evaluations are counted, not done."""

    def __init__(self) -> None:
        locks = KeyedLocks()
        self.listing = QuotaListing()
        ctx = SimpleNamespace(settings=Settings(), locks=locks, ownership=Ownership(),
                              status=StatusWriter(None),  # type: ignore[arg-type]  # writes nothing
                              tenants=WatchCache(slim_tenant), kube=self.listing,
                              lock=lambda kind, namespace, name: locks.hold((kind, namespace, name)))
        super().__init__(ctx)  # type: ignore[arg-type]
        self.caches_read = True
        self.cluster.quotas.listed = self.cluster.tenants.listed = True  # as after Kopf's initial listing
        self.evaluations: list[str] = []
        self.subjects: list[Subject] = []
        self.probes.probe_target = self.measure  # type: ignore[method-assign]

    async def apply(self, subject: Subject, probe: Probe | None, *, trigger: str) -> Any:
        self.evaluations.append(trigger)
        self.subjects.append(subject)
        if subject.tenant is not None:  # as if enforced
            self.applied[subject.key] = (subject.tenant["metadata"]["uid"], subject.tenant["spec"]["tier"])
            self.enforced_quotas[subject.key] = {(q["metadata"]["uid"], q["metadata"]["generation"])
                                                 for q in subject.quotas}
        return None

    async def measure(self, target: str, subjects: Any) -> dict[Any, Probe]:
        return {s.key: probe() for s in subjects}


def cached(svc: QuotaService, plural: str, body: dict[str, Any], rv: int) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"]["resourceVersion"] = str(rv)
    body["metadata"]["creationTimestamp"] = iso(datetime.now(UTC).replace(microsecond=0))
    (svc.cluster.tenants if plural == "tenants" else svc.cluster.quotas).observe("MODIFIED", body)
    return body


async def settle(svc: QuotaService) -> None:
    await svc.work.join()


def test_the_cache_never_goes_back_to_an_older_version() -> None:
    svc = CountingService()
    cached(svc, "quotas", quota_body(), 10)
    older = quota_body()
    older["status"] = {"stale": True}
    cached(svc, "quotas", older, 9)  # e.g. the watch event of a write older than our own patch's answer
    assert "status" not in svc.cluster.quotas.get((NS, "acme-corp"))
    cached(svc, "quotas", older, 11)
    assert svc.cluster.quotas.get((NS, "acme-corp"))["status"] == {"stale": True}


def test_the_cache_keeps_no_managed_fields() -> None:
    svc = CountingService()
    body = quota_body()
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    cached(svc, "quotas", body, 1)
    assert "managedFields" not in svc.cluster.quotas.get((NS, "acme-corp"))["metadata"]
    assert "managedFields" in body["metadata"]  # the event's own body is left as it was


async def test_a_tenants_quotas_come_from_the_cache_by_tenant() -> None:
    svc = CountingService()
    q = cached(svc, "quotas", quota_body(), 1)
    assert [x["metadata"]["name"] for x in await svc.cluster.tenant_quotas(NS, "acme-corp")] == ["acme-corp"]
    moved = copy.deepcopy(q)
    moved["spec"]["tenantRef"]["name"] = "globex"
    cached(svc, "quotas", moved, 2)  # its tenantRef edited: it now counts for the other tenant only
    assert await svc.cluster.tenant_quotas(NS, "acme-corp") == []
    assert [x["metadata"]["resourceVersion"] for x in await svc.cluster.tenant_quotas(NS, "globex")] == ["2"]
    svc.cluster.observe("DELETED", moved)
    assert await svc.cluster.tenant_quotas(NS, "globex") == []
    assert len(svc.cluster.quotas) == 0


async def test_a_quota_handler_for_an_enforced_version_evaluates_nothing() -> None:
    svc = CountingService()
    t = cached(svc, "tenants", tenant_body(), 1)
    q = cached(svc, "quotas", quota_body(limits={"connections": 3}), 2)
    svc.tenant_changed("MODIFIED", t)  # Ready: evaluated at once, the Quota from the cache included
    await settle(svc)
    assert svc.evaluations == ["tenant-changed"]
    svc.quota_changed("ADDED", q)  # its ADDED event comes later: nothing new to do
    await settle(svc)
    assert svc.evaluations == ["tenant-changed"]
    edited = copy.deepcopy(q)
    edited["metadata"]["generation"] = 2
    svc.cluster.observe("MODIFIED", edited)
    svc.quota_changed("MODIFIED", edited)  # an edit takes effect at once
    await settle(svc)
    assert svc.evaluations == ["tenant-changed", "quota-changed"]


async def test_a_tenants_first_evaluation_reads_its_quotas_before_applying_tier_defaults() -> None:
    """A Tenant Ready before its Quota's watch event came (both made at once) is not given its tier's
    defaults for a moment: with no Quota in the cache, its first evaluation asks the API server."""
    svc = CountingService()
    svc.listing.quotas = [quota_body(limits={"connections": 3})]
    svc.tenant_changed("MODIFIED", cached(svc, "tenants", tenant_body(), 1))
    await settle(svc)
    assert [q["metadata"]["name"] for q in svc.subjects[0].quotas] == ["acme-corp"]
    assert svc.listing.selectors == ["spec.tenantRef.name=acme-corp"]
    assert svc.cluster.quotas.get((NS, "acme-corp")) is not None  # kept: the next evaluation reads the cache
    # Once enforced, a tenant without a Quota in the cache is not read again at each evaluation.
    svc.cluster.observe("DELETED", quota_body())
    svc.listing.quotas = []
    svc.spawn(NS, "acme-corp", "quota-deleted")
    await settle(svc)
    assert svc.subjects[-1].quotas == [] and len(svc.listing.selectors) == 1


async def test_tenant_events_during_an_evaluation_rerun_it_only_if_still_needed() -> None:
    svc = CountingService()
    t = cached(svc, "tenants", tenant_body(), 1)
    svc.tenant_changed("MODIFIED", t)
    svc.tenant_changed("MODIFIED", t)  # e.g. our own effectiveLimits write, while the first one runs
    await settle(svc)
    assert svc.evaluations == ["tenant-changed"]
    svc.spawn(NS, "acme-corp", "quota-deleted")
    svc.spawn(NS, "acme-corp", "quota-deleted")  # other triggers always rerun
    await settle(svc)
    assert svc.evaluations == ["tenant-changed", "quota-deleted", "quota-deleted"]
    retiered = copy.deepcopy(t)
    retiered["spec"]["tier"] = "enterprise"
    svc.tenant_changed("MODIFIED", cached(svc, "tenants", retiered, 2))
    await settle(svc)
    assert svc.evaluations[-1] == "tenant-changed"


async def test_tenant_and_quota_events_during_an_evaluation_fold_into_a_rerun_only_if_still_needed() -> None:
    svc = CountingService()
    t = cached(svc, "tenants", tenant_body(), 1)
    q = cached(svc, "quotas", quota_body(), 2)
    svc.tenant_changed("MODIFIED", t)  # starts an evaluation, which sees the Quota in the cache
    svc.quota_changed("ADDED", q)  # both come while it runs: one rerun with both triggers,
    svc.tenant_changed("MODIFIED", t)  # which finds the Tenant and this Quota version enforced
    await settle(svc)
    assert svc.evaluations == ["tenant-changed"]
    edited = copy.deepcopy(q)
    edited["metadata"]["generation"] = 2
    svc.spawn(NS, "acme-corp", "quota-deleted")  # another Quota of it went: evaluated
    svc.quota_changed("MODIFIED", cached(svc, "quotas", edited, 3))  # an edit, before that one starts:
    await settle(svc)  # that evaluation reads the edited Quota, and the rerun finds it enforced
    assert svc.evaluations == ["tenant-changed", "quota-deleted"]
    svc.quota_changed("MODIFIED", cached(svc, "quotas", {**edited, "metadata": {**edited["metadata"],
                                                                            "generation": 3}}, 4))
    await settle(svc)
    assert svc.evaluations == ["tenant-changed", "quota-deleted", "quota-changed"]


async def test_a_new_quota_of_a_tenant_not_seen_yet_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenancy_operator.reconcilers import quota as quota_module

    monkeypatch.setattr(quota_module, "UNSEEN_TENANT_GRACE_SECONDS", 0.05)
    svc = CountingService()
    reads: list[str] = []

    async def get_tenant(namespace: str, name: str) -> dict[str, Any] | None:
        if (namespace, name) in svc.cluster.tenants:
            return svc.cluster.tenants.get((namespace, name))
        reads.append(name)  # stands for the GET of a Tenant the cache has not seen
        return None

    svc.cluster.get_tenant = get_tenant  # type: ignore[method-assign]
    svc.quota_changed("ADDED", cached(svc, "quotas", quota_body(), 1))
    await settle(svc)
    assert svc.evaluations == [] and reads == []  # created together with its Tenant: no GET
    svc.tenant_changed("MODIFIED", cached(svc, "tenants", tenant_body(), 2))  # it shows up, Ready
    await settle(svc)
    assert svc.evaluations == ["tenant-changed"]

    typo = quota_body("typo")
    typo["spec"]["tenantRef"]["name"] = "nobody"
    svc.quota_changed("ADDED", cached(svc, "quotas", typo, 3))
    await settle(svc)
    deadline = time.monotonic() + 10
    while "tenant-unseen" not in svc.evaluations and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await settle(svc)
    assert svc.evaluations == ["tenant-changed", "tenant-unseen"]  # read after the grace: TenantNotFound
    assert reads == ["nobody"]


async def test_evaluations_starting_together_share_one_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenancy_operator.reconcilers import quota_probe

    monkeypatch.setattr(quota_probe, "PROBE_GATHER_SECONDS", 0.5)  # generous: the loop may be slow
    svc = CountingService()
    batches: list[list[str]] = []
    probe_all = svc.measure

    async def counting_probe(target: str, subjects: Any) -> dict[Any, Probe]:
        batches.append(sorted(s.name for s in subjects))
        return await probe_all(target, subjects)

    svc.probes.probe_target = counting_probe  # type: ignore[method-assign]
    names = [f"t{i}" for i in range(5)]
    for i, name in enumerate(names):
        body = tenant_body()
        body["metadata"].update(name=name, uid=f"u-{name}")
        svc.tenant_changed("MODIFIED", cached(svc, "tenants", body, i + 1))  # a burst of new Ready tenants
    await settle(svc)
    assert sorted(svc.evaluations) == ["tenant-changed"] * 5
    assert batches == [names]  # one probe query for the five


async def test_a_new_quota_waits_for_its_tenants_first_provisioning() -> None:
    svc = CountingService()
    provisioning = cached(svc, "tenants", tenant_body(conditions=False), 1)
    q = cached(svc, "quotas", quota_body(), 2)
    svc.quota_changed("ADDED", q)
    await settle(svc)
    assert svc.evaluations == []  # no TenantNotReady status that Ready replaces seconds later
    ready = cached(svc, "tenants", tenant_body(), 3)
    svc.tenant_changed("MODIFIED", ready)
    await settle(svc)
    assert svc.evaluations == ["tenant-changed"]  # one evaluation, one status write

    # A Tenant whose provisioning stalls: its Quota says TenantNotReady as soon as its status does.
    svc = CountingService()
    cached(svc, "tenants", provisioning, 1)
    cached(svc, "quotas", q, 2)
    svc.quota_changed("ADDED", q)
    await settle(svc)
    retrying = copy.deepcopy(provisioning)
    retrying["status"] = {"conditions": [{"type": "Ready", "status": "False"},
                                         {"type": "Reconciling", "status": "True"}]}
    svc.tenant_changed("MODIFIED", cached(svc, "tenants", retrying, 3))  # still its first provisioning
    await settle(svc)
    assert svc.evaluations == []
    stalled = copy.deepcopy(provisioning)
    stalled["status"] = {"conditions": [{"type": "Ready", "status": "False"},
                                        {"type": "Stalled", "status": "True"}]}
    svc.tenant_changed("MODIFIED", cached(svc, "tenants", stalled, 4))
    await settle(svc)
    assert svc.evaluations == ["tenant-settled"]

    # An edit is evaluated at once; so is a new Quota of a Tenant provisioning for too long.
    svc = CountingService()
    cached(svc, "tenants", provisioning, 1)
    svc.quota_changed("MODIFIED", cached(svc, "quotas", q, 2))
    await settle(svc)
    assert svc.evaluations == ["quota-changed"]
    svc = CountingService()
    old = cached(svc, "tenants", provisioning, 1)
    old["metadata"]["creationTimestamp"] = iso(datetime.now(UTC) - timedelta(hours=1))
    svc.cluster.tenants.observe("MODIFIED", old)
    svc.quota_changed("ADDED", cached(svc, "quotas", q, 2))
    await settle(svc)
    assert svc.evaluations == ["quota-changed"]


async def test_a_quota_edited_after_the_first_pass_read_the_caches_is_evaluated_on_its_own() -> None:
    """At start the first pass evaluates every tenant as it read the caches, and the events that
    came before that read (Kopf's listing) are not evaluated again. A Quota edited after that
    read, while the pass still measures, is evaluated on its own: the pass enforces the version
    it read, and the next pass is a whole interval away."""
    svc = CountingService()
    svc.caches_read = False

    async def filled_by_watch(plural: str) -> bool:
        return True  # Kopf's listing has filled the caches

    svc.cluster.filled_by_watch = filled_by_watch  # type: ignore[method-assign]
    cached(svc, "tenants", tenant_body(), 1)
    q = cached(svc, "quotas", quota_body(), 2)
    svc.quota_changed("ADDED", q)  # the listing's event: the pass covers it
    edited = copy.deepcopy(q)
    edited["metadata"]["generation"] = 2

    async def measure(target: str, subjects: Any, **_: Any) -> dict[Any, Probe]:
        svc.quota_changed("MODIFIED", cached(svc, "quotas", edited, 3))  # the edit comes meanwhile
        return {s.key: probe() for s in subjects}

    svc.probes.probe_target = measure  # type: ignore[method-assign]
    await svc.pass_once()
    await settle(svc)
    # The edit's own evaluation enforces it (and the pass, seeing that, leaves the tenant to it).
    assert "quota-changed" in svc.evaluations
    assert svc.enforced_quotas[(NS, "acme-corp")] == {("q-acme-corp", 2)}
