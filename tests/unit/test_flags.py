"""Feature flag evaluation, bucketing, export and diff: pure functions, no stack."""

from __future__ import annotations

import datetime
from typing import Any

import cbor2
import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.flags import (
    FlagDefinition,
    Reason,
    bucket_hash,
    bucketing_bytes,
    evaluate,
    flagd_flag,
    fractional,
    json_diff,
    pick,
    summarize,
)
from tenancy_operator.reconcilers.featureflag_policy import configmap_name, last_spec_change


def flag(name: str = "dash", **spec: Any) -> FlagDefinition:
    return FlagDefinition.from_spec(FeatureFlagSpec.model_validate(spec), name)


def users_in(f: FlagDefinition, tenant: str | None, n: int = 400) -> set[str]:
    return {f"user-{i}" for i in range(n) if evaluate(f, tenant, f"user-{i}").variant == "on"}


# --- bucketing ---------------------------------------------------------------------------------

@given(st.text(max_size=300), st.text(max_size=300))
@settings(max_examples=200)
def test_cbor_encoding_is_cbor2_canonical(key: str, user: str) -> None:
    try:
        expected = cbor2.dumps([key, user], canonical=True)
    except (UnicodeEncodeError, cbor2.CBOREncodeError):
        with pytest.raises(UnicodeEncodeError):
            bucketing_bytes(key, user)
        return
    assert bucketing_bytes(key, user) == expected


@pytest.mark.parametrize("length", [0, 23, 24, 255, 256, 65535, 65536])
def test_cbor_length_boundaries(length: int) -> None:
    assert bucketing_bytes("k", "x" * length) == cbor2.dumps(["k", "x" * length], canonical=True)


def test_hash_is_unsigned_murmur3_of_the_cbor_bytes() -> None:
    raw = cbor2.dumps(["new-dashboard", "user-1"], canonical=True)
    assert bucket_hash("new-dashboard", "user-1") == mmh3.hash(raw, 0, signed=False)
    assert 0 <= bucket_hash("a", "b") < 2**32


def test_pick_follows_cumulative_weights() -> None:
    assert pick([("a", 1), ("b", 1)], 0) == "a"
    assert pick([("a", 1), ("b", 1)], 2**31 - 1) == "a"
    assert pick([("a", 1), ("b", 1)], 2**31) == "b"
    assert pick([("a", 0), ("b", 5)], 0) == "b"
    assert pick([("a", 0), ("b", 0)], 0) is None
    assert pick([("a", 2**31)], 0) is None  # flagd refuses weights above MaxInt32


def test_fractional_needs_a_targeting_key() -> None:
    assert fractional("f", None, [("a", 1)]) is None
    assert fractional("f", "", [("a", 1)]) is None
    assert fractional("f", "\ud800", [("a", 1)]) is None  # cannot be encoded: no bucket, as flagd
    assert fractional("f", "u", [("a", 1)]) == "a"


@given(st.text(min_size=1, max_size=40), st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=60),
       st.integers(0, 100), st.integers(0, 100))
@settings(max_examples=300)
def test_raising_the_percentage_only_adds_users(key: str, users: list[str], p1: int, p2: int) -> None:
    low, high = sorted((p1, p2))
    f_low = FlagDefinition(key=key, enabled=True, variants={"on": True, "off": False}, default_variant="off",
                           rollout=flag(rollout={"variant": "on", "percentage": low}).rollout)
    f_high = FlagDefinition(key=key, enabled=True, variants={"on": True, "off": False}, default_variant="off",
                            rollout=flag(rollout={"variant": "on", "percentage": high}).rollout)
    got_low = {u for u in users if evaluate(f_low, None, u).variant == "on"}
    got_high = {u for u in users if evaluate(f_high, None, u).variant == "on"}
    assert got_low <= got_high


def test_percentage_is_about_right_and_sticky() -> None:
    f = flag(rollout={"variant": "on", "percentage": 25})
    share = len(users_in(f, None, 4000)) / 4000
    assert 0.22 < share < 0.28
    assert [evaluate(f, "t", "user-7") for _ in range(3)] == [evaluate(f, None, "user-7")] * 3
    assert users_in(flag(rollout={"variant": "on", "percentage": 0}), None) == set()
    assert len(users_in(flag(rollout={"variant": "on", "percentage": 100}), None)) == 400


def test_buckets_depend_on_the_flag_key() -> None:
    a = users_in(flag("a", rollout={"variant": "on", "percentage": 50}), None)
    b = users_in(flag("b", rollout={"variant": "on", "percentage": 50}), None)
    assert a != b


# --- precedence --------------------------------------------------------------------------------

FULL = {
    "variants": {"on": {"value": True}, "off": {"value": False}, "beta": {"value": "b"}},
    "defaultVariant": "off",
    "rollout": {"variant": "on", "percentage": 100},
    "tenants": [{"tenant": "acme", "variant": "beta"}, {"tenant": "none", "percentage": 0},
                {"tenant": "half", "variant": "beta", "percentage": 50}],
    "users": [{"tenant": "acme", "user": "alice", "variant": "off"},
              {"tenant": "other", "user": "bob", "variant": "beta"}],
}


@pytest.mark.parametrize(
    ("enabled", "tenant", "user", "variant", "reason"),
    [
        (False, "acme", "alice", "off", Reason.KILL_SWITCH),
        (False, "acme", "zed", "off", Reason.KILL_SWITCH),
        (False, None, "zed", "off", Reason.KILL_SWITCH),
        (True, "acme", "alice", "off", Reason.USER_OVERRIDE),  # user beats tenant
        (True, "other", "bob", "beta", Reason.USER_OVERRIDE),  # user beats rollout
        (True, "acme", "bob", "beta", Reason.TENANT_OVERRIDE),  # bob's override is for tenant "other"
        (True, None, "bob", "on", Reason.ROLLOUT),  # no tenant: no user override either
        (True, "acme", "zed", "beta", Reason.TENANT_OVERRIDE),  # tenant beats rollout
        (True, "acme", None, "beta", Reason.TENANT_OVERRIDE),  # a whole-tenant override needs no user
        (True, "none", "zed", "off", Reason.TENANT_OVERRIDE),  # 0 % of the tenant, even at 100 % rollout
        (True, "globex", "zed", "on", Reason.ROLLOUT),
        (True, "globex", None, "off", Reason.DEFAULT),  # a percentage needs a user to place
        (True, "globex", "", "off", Reason.DEFAULT),
        (True, "half", None, "off", Reason.DEFAULT),
    ],
)
def test_precedence(enabled: bool, tenant: str | None, user: str | None, variant: str, reason: Reason) -> None:
    ev = evaluate(flag(enabled=enabled, **FULL), tenant, user)
    assert (ev.variant, ev.reason) == (variant, reason)
    assert ev.value == {"on": True, "off": False, "beta": "b"}[variant]


def test_without_rollout_everyone_gets_the_default() -> None:
    ev = evaluate(flag(), "acme", "alice")
    assert (ev.variant, ev.value, ev.reason) == ("off", False, Reason.DEFAULT)


def test_tenant_percentage_override_splits_the_tenant() -> None:
    f = flag(**FULL)
    got = {evaluate(f, "half", f"user-{i}").variant for i in range(200)}
    assert got == {"beta", "off"}
    # Percentage-only override serves the rollout's variant.
    g = flag(rollout={"variant": "on", "percentage": 0}, tenants=[{"tenant": "t", "percentage": 100}])
    assert evaluate(g, "t", "u").variant == "on"
    assert evaluate(g, "x", "u").variant == "off"


def test_weighted_rollout() -> None:
    f = flag(variants={"a": {"value": 1}, "b": {"value": 2}, "c": {"value": 3}}, defaultVariant="a",
             rollout={"weights": [{"variant": "a", "weight": 0}, {"variant": "b", "weight": 1},
                                  {"variant": "c", "weight": 3}]})
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(4000):
        counts[evaluate(f, None, f"u{i}").variant] += 1
    assert counts["a"] == 0
    assert 0.22 < counts["b"] / 4000 < 0.28
    assert f.variant_shares() == {"b": 0.25, "c": 0.75}


def test_variant_shares() -> None:
    assert flag(rollout={"variant": "on", "percentage": 30}).variant_shares() == {"on": 0.3, "off": 0.7}
    assert flag(enabled=False, rollout={"variant": "on", "percentage": 30}).variant_shares() == {"off": 1.0}
    assert flag().variant_shares() == {"off": 1.0}


def test_definition_json_round_trip() -> None:
    f = flag(**FULL)
    assert FlagDefinition.from_json(f.to_json()) == f
    assert f.tenant_names() == {"acme", "none", "half", "other"}


# --- flagd export ------------------------------------------------------------------------------

def test_kill_switch_exports_a_static_default_not_disabled() -> None:
    out = flagd_flag(flag(enabled=False, **FULL))
    assert out["state"] == "ENABLED"
    assert "targeting" not in out
    assert out["defaultVariant"] == "off"
    assert out["metadata"]["enabled"] is False


def test_export_without_overrides_is_a_bare_fractional() -> None:
    out = flagd_flag(flag(rollout={"variant": "on", "percentage": 10}))
    assert out["targeting"] == {"fractional": [["on", 10], ["off", 90]]}
    assert "targeting" not in flagd_flag(flag())


# --- diff --------------------------------------------------------------------------------------

def test_diff_names_what_changed() -> None:
    old = flag(rollout={"variant": "on", "percentage": 10}, tenants=[{"tenant": "acme", "variant": "on"}]).to_json()
    new = flag(enabled=False, rollout={"variant": "on", "percentage": 50},
               users=[{"tenant": "acme", "user": "a/b", "variant": "off"}]).to_json()
    ops = json_diff(old, new)
    assert {"op": "replace", "path": "/enabled", "old": True, "new": False} in ops
    assert {"op": "replace", "path": "/rollout/percentage", "old": 10, "new": 50} in ops
    assert {"op": "remove", "path": "/tenants/acme", "old": {"variant": "on", "percentage": None}} in ops
    assert {"op": "add", "path": "/users/acme", "new": {"a/b": "off"}} in ops
    assert json_diff(old, old) == []
    assert json_diff({"v": True}, {"v": 1}) != []  # JSON types count
    assert "rollout.percentage: 10 -> 50" in summarize(ops)


# --- metadata helpers --------------------------------------------------------------------------

def test_last_spec_change_is_the_latest_spec_manager() -> None:
    meta = {"managedFields": [
        {"manager": "kubectl-client-side-apply", "operation": "Update", "time": "2026-01-01T00:00:00Z",
         "fieldsV1": {"f:spec": {}}},
        {"manager": "tenancy-operator", "operation": "Update", "subresource": "status",
         "time": "2026-01-03T00:00:00Z", "fieldsV1": {"f:status": {}}},
        {"manager": "kopf", "operation": "Update", "time": "2026-01-04T00:00:00Z",
         "fieldsV1": {"f:metadata": {}}},
        {"manager": "kubectl-edit", "operation": "Update", "time": "2026-01-02T00:00:00Z",
         "fieldsV1": {"f:spec": {"f:enabled": {}}}},
    ]}
    who, when = last_spec_change(meta)
    assert who == "kubectl-edit"
    assert when == datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    assert last_spec_change({}) == (None, None)


def test_configmap_name() -> None:
    assert configmap_name("new-dashboard") == "new-dashboard-flagd"
    long = configmap_name("a" * 253)
    assert len(long) <= 253
    assert long.endswith("-flagd")
    assert long != configmap_name("a" * 252 + "b")
