"""A Tenant's status, from its reconcile's outcome (handlers/tenant.desired_status)."""

from __future__ import annotations

import datetime
from typing import Any

from tenancy_operator.conditions import status_patch
from tenancy_operator.db.jobs import Job
from tenancy_operator.handlers.tenant import desired_status
from tenancy_operator.reconcilers.tenant_base import Outcome

T0 = datetime.datetime(2026, 12, 4, 5, 0, 1, 250_000, tzinfo=datetime.UTC)


def tenant(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": "acme", "name": "globex", "generation": 2},
            "spec": {"tier": "free"}, "status": status or {}}


def job(id_: str, state: str, *, error: str | None = None) -> Job:
    return Job(id=id_, kind="provision", state=state, attempt=1, generation=1, detail=None, error=error,
               retry_token=None, note=None, started_at=T0, finished_at=None if state == "running" else T0)


def active() -> Outcome:
    return Outcome(True, "Provisioned", "", "Active", tenant_id="t-1", schema_version="0002_orders",
                   jobs=[job("2", "failed", error="relation\n\"orders\" exists"), job("1", "succeeded")],
                   credentials={"user": "tl_globex_a", "lastRotatedAt": "2026-12-04T05:00:01Z",
                                "nextRotationAt": None})


def test_an_active_tenant_reports_its_schema_credentials_and_jobs() -> None:
    status = desired_status(tenant(), active(), "tenant_globex", {"connections": "5"})
    assert {k: v for k, v in status.items() if k not in ("conditions", "recentJobs", "currentJob")} == {
        "observedGeneration": 2, "phase": "Active", "database": "default",
        "tenantId": "t-1", "schema": "tenant_globex", "role": "tenant_globex", "secretName": "globex-db",
        "schemaVersion": "0002_orders",
        "credentials": {"user": "tl_globex_a", "lastRotatedAt": "2026-12-04T05:00:01Z", "nextRotationAt": None},
        "effectiveLimits": {"connections": "5"},
    }
    assert status["currentJob"]["id"] == "2"
    assert status["currentJob"]["message"] == 'relation "orders" exists'  # one clean line
    # List items as the API server keeps them: no nulls (it drops them), so a compare finds no change.
    assert status["recentJobs"][1] == {"id": "1", "kind": "provision", "state": "succeeded", "attempt": 1,
                                       "startedAt": "2026-12-04T05:00:01.250000Z",
                                       "finishedAt": "2026-12-04T05:00:01.250000Z"}


def test_the_same_outcome_again_writes_nothing() -> None:
    before = desired_status(tenant(), active(), "tenant_globex", {"connections": "5"})
    stored = {**before, "credentials": {"user": "tl_globex_a", "lastRotatedAt": "2026-12-04T05:00:01Z"}}
    assert status_patch(stored, desired_status(tenant(stored), active(), "tenant_globex", {"connections": "5"})) == {}


def test_a_failure_before_the_registry_was_read_leaves_what_the_tenant_was_given() -> None:
    before = desired_status(tenant(), active(), "tenant_globex", {"connections": "5"})
    failed = Outcome(False, "DatabaseUnavailable", "database 'default' is down", "Failed")
    patch = status_patch(before, desired_status(tenant(before), failed, "tenant_globex"))
    assert set(patch) == {"conditions", "phase"}
