"""Reading a published flagd flag back (flags/published.py): what `kubectl tenancy flags eval`
evaluates must be exactly what the operator exported, or refused."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.flags import FlagDefinition, evaluate, flagd_document, flagd_flag
from tenancy_operator.flags.published import NotOurs, definition_from_document, definition_from_flagd

TENANTS = ["acme", "globex", "initech"]
VARIANTS = {"on": {"value": True}, "off": {"value": False}, "beta": {"value": {"layout": "grid"}}}
USERS = [None, "", "u1", "u2", "u3", "vip", "someone-else"]

variant = st.sampled_from(sorted(VARIANTS))
percentage = st.integers(0, 100)
rollout = st.one_of(
    st.none(),
    st.fixed_dictionaries({"variant": variant, "percentage": percentage}),
    st.fixed_dictionaries({"weights": st.lists(
        st.fixed_dictionaries({"variant": variant, "weight": st.integers(1, 1000)}),
        min_size=1, max_size=3, unique_by=lambda w: w["variant"])}),
)
tenant_override = st.builds(
    lambda t, v, p: {"tenant": t, **({"variant": v} if v else {}), **({"percentage": p} if p is not None or not v
                                                                      else {"percentage": 50})},
    st.sampled_from(TENANTS), st.one_of(st.none(), variant), st.one_of(st.none(), percentage))
user_override = st.fixed_dictionaries({"tenant": st.sampled_from(TENANTS), "user": st.sampled_from(["u1", "vip"]),
                                       "variant": variant})


@st.composite
def specs(draw: st.DrawFn) -> FeatureFlagSpec:
    raw: dict[str, Any] = {
        "enabled": draw(st.booleans()), "variants": VARIANTS, "defaultVariant": draw(variant),
        "tenants": draw(st.lists(tenant_override, max_size=3, unique_by=lambda t: t["tenant"])),
        "users": draw(st.lists(user_override, max_size=4, unique_by=lambda u: (u["tenant"], u["user"]))),
    }
    if draw(st.booleans()):
        raw["description"] = "what it is for"
    r = draw(rollout)
    if r is not None:
        raw["rollout"] = r
    try:
        return FeatureFlagSpec.model_validate(raw)
    except ValueError:
        from hypothesis import reject

        reject()


@settings(max_examples=300, deadline=None)
@given(specs())
def test_every_published_flag_reads_back_to_the_same_answers(spec: FeatureFlagSpec) -> None:
    declared = FlagDefinition.from_spec(spec, "dash")
    published = json.loads(json.dumps(flagd_document([declared], {"namespace": "ns", "featureflag": "dash"})))
    read = definition_from_document(published)
    assert read.key == "dash"
    for tenant in [*TENANTS, "nobody", None]:
        for user in USERS:
            assert evaluate(read, tenant, user) == evaluate(declared, tenant, user), (tenant, user)


def test_a_document_edited_by_hand_is_refused() -> None:
    declared = FlagDefinition.from_spec(FeatureFlagSpec.model_validate(
        {"tenants": [{"tenant": "acme", "variant": "on"}]}), "dash")
    good = flagd_flag(declared)
    assert definition_from_flagd("dash", good).tenants["acme"].variant == "on"

    odd = copy.deepcopy(good)
    odd["targeting"]["if"][0] = {"==": [{"var": "tenant"}, "acme"]}
    with pytest.raises(NotOurs):
        definition_from_flagd("dash", odd)
    odd = copy.deepcopy(good)
    odd["state"] = "DISABLED"
    with pytest.raises(NotOurs, match="published document back"):
        definition_from_flagd("dash", odd)
    with pytest.raises(NotOurs, match="no flag 'other'"):
        definition_from_document({"flags": {"dash": good}}, "other")
    with pytest.raises(NotOurs, match="name one"):
        definition_from_document({"flags": {"dash": good, "other": good}})
