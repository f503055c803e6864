"""A FeatureFlag's status, from its reconcile's outcome (handlers/featureflag.desired_status)."""

from __future__ import annotations

import datetime
from typing import Any
from zoneinfo import ZoneInfo

from tenancy_operator.api.featureflag import RolloutStatus
from tenancy_operator.conditions import status_patch
from tenancy_operator.flags.model import FlagDefinition, Rollout
from tenancy_operator.handlers.featureflag import desired_status, resolved_status, status_update
from tenancy_operator.reconcilers.featureflag import Outcome


def flag(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": "acme", "name": "new-checkout", "generation": 3}, "status": status or {}}


def published() -> Outcome:
    definition = FlagDefinition(key="new-checkout", enabled=True, variants={"on": True, "off": False},
                                default_variant="off", rollout=Rollout(variant="on", percentage=25))
    written = datetime.datetime(2026, 12, 4, 7, 0, 1, 250_000, tzinfo=ZoneInfo("Europe/Berlin"))
    return Outcome(True, "Published", "published", definition=definition, written_at=written,
                   config_map="new-checkout-flagd", rollout=RolloutStatus(percentage=25))


def test_a_published_flag_reports_what_it_serves() -> None:
    status = desired_status(flag(), published())
    assert {k: v for k, v in status.items() if k not in ("conditions", "rollout")} == {
        "observedGeneration": 3,
        "unknownTenants": [],
        "variantShares": {"on": 0.25, "off": 0.75},
        "tenantOverrides": 0,
        "userOverrides": 0,
        "key": "new-checkout",
        "lastWrittenAt": "2026-12-04T06:00:01Z",
        "configMap": "new-checkout-flagd",
    }
    # The rollout's other fields are null: a merge patch that carries the rollout removes them.
    assert {k: v for k, v in status["rollout"].items() if v is not None} == {"percentage": 25}
    assert {"phase", "reason", "step", "resumedBy", "baseline"} <= set(status["rollout"])


def merge_patch(target: Any, patch: Any) -> Any:
    """What the API server does with a JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def stepped(phase: str, reason: str, resumed_by: str | None = None) -> Outcome:
    out = published()
    out.rollout = RolloutStatus(percentage=70, phase=phase, reason=reason, step=1, steps=3, baseline=70,
                                resumed_by=resumed_by, message=f"{phase} for {reason}")
    return out


def test_a_decision_written_over_an_older_snapshot_lands_whole() -> None:
    """A recheck read the flag (paused by hand), waited for the flag's lock while a handler
    resumed the rollout and wrote that, then decided from that record: held again by
    spec.rollout.paused. Its patch is computed from the older snapshot, yet the flag ends as the
    decision says, not with the resumed phase beside the new reason."""
    hand_edited = desired_status(flag(), stepped("Paused", "HandEdited"))
    resumed = merge_patch(hand_edited, status_update(flag(hand_edited), stepped("Progressing", "Resumed", "1")))
    held = stepped("Paused", "PausedBySpec", "1")
    final = merge_patch(resumed, status_update(flag(hand_edited), held))
    rollout = final["rollout"]
    assert (rollout["phase"], rollout["reason"], rollout["resumedBy"], rollout["percentage"]) == \
        ("Paused", "PausedBySpec", "1", 70)
    assert status_update(flag(final), held) == {}  # and once read back, nothing more to write


def test_a_reconcile_without_a_definition_leaves_what_was_published_alone() -> None:
    """An invalid spec or the database down: the shares, counts, rollout, write time and ConfigMap
    last published still describe what is served; nothing in the patch removes them."""
    before = desired_status(flag(), published())
    status = desired_status(flag(before), Outcome(False, "DatabaseUnavailable", "database 'default' is down"))
    patch = status_patch(before, status)
    assert set(patch) == {"conditions"}
    assert status["unknownTenants"] == []


def test_the_same_outcome_again_writes_nothing() -> None:
    before = desired_status(flag(), published())
    assert status_patch(before, desired_status(flag(before), published())) == {}


def named(status: dict[str, Any] | None = None, generation: int = 3) -> dict[str, Any]:
    body = flag(status)
    body["metadata"]["generation"] = generation
    body["spec"] = {"tenants": [{"tenant": "acme-corp", "variant": "on"}, {"tenant": "ghost", "percentage": 50}],
                    "users": [{"tenant": "initech", "user": "alice", "variant": "off"}]}
    return body


def test_a_tenant_appearing_changes_only_what_names_the_unknown_tenants() -> None:
    """What a full reconcile would write about the Tenants, from the flag as listed: the same
    condition and list, and nothing else of the status touched."""
    out = published()
    out.unknown_tenants = ["ghost", "initech"]
    before = desired_status(named(), out)
    desired = resolved_status(named(before), {"acme-corp", "ghost", "initech"})
    assert desired is not None
    out.unknown_tenants = []
    full = desired_status(named(before), out)
    assert status_patch(before, desired) == status_patch(before, full)
    assert desired["unknownTenants"] == []
    assert status_patch(before, resolved_status(named(before), {"acme-corp"}) or {}) == {}  # the same Tenants


def test_a_status_not_current_leaves_the_tenants_to_a_whole_reconcile() -> None:
    before = desired_status(named(), published())
    assert resolved_status(named(before, generation=4), {"ghost"}) is None  # an edit not yet published
    failed = desired_status(named(before), Outcome(False, "DatabaseUnavailable", "database 'default' is down"))
    assert resolved_status(named(failed), {"ghost"}) is None
    assert resolved_status(named(), {"ghost"}) is None  # never reconciled
