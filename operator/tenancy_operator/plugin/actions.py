"""The `kubectl tenancy` commands that ask the operator to act: suspend, resume, rotate, retry
(on a Tenant) and rollout resume/rollback. Each sets spec.state or a request annotation; the
operator does the work, and with --wait the command watches status until the operator reports it."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from typing import Any

from tenancy_operator.api.names import (
    RESUME_ROLLOUT_ANNOTATION,
    RETRY_ANNOTATION,
    ROLLBACK_ROLLOUT_ANNOTATION,
    ROTATE_ANNOTATION,
    SECRET_ROTATION_ANNOTATION,
)
from tenancy_operator.plugin import render
from tenancy_operator.plugin.session import (
    EXIT_USAGE,
    ROLLOUT_KINDS,
    TENANTS,
    CommandError,
    Session,
    decoded,
    now,
)


def _request_value(given: str | None) -> str:
    return given or f"{now().strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _stalled(body: Mapping[str, Any]) -> str | None:
    stalled = render.condition(body, "Stalled")
    if stalled.get("status") == "True":
        return f"{stalled.get('reason')}: {stalled.get('message')}"
    return None


async def _set_state(s: Session, state: str) -> int:
    name = s.args.tenant
    before = await s.tenant(name)
    if (before.get("spec") or {}).get("state", "Active") == state:
        print(f"tenant {s.namespace}/{name}: spec.state is {state} already")
        after = before
    else:
        after = await s.kube.merge_patch(TENANTS, s.namespace, name, {"spec": {"state": state}})
        print(f"tenant {s.namespace}/{name}: spec.state set to {state} (generation {after['metadata']['generation']})")
    if not s.args.wait:
        return 0
    generation = int(after["metadata"].get("generation") or 0)

    async def done() -> str | None:
        body = await s.tenant(name)
        status = body.get("status") or {}
        if int(status.get("observedGeneration") or 0) < generation:
            return None
        if status.get("phase") == state and render.condition(body, "Ready").get("status") == "True":
            return f"tenant {s.namespace}/{name} is {state}"
        problem = _stalled(body)
        if problem:
            raise CommandError(f"the operator could not make the tenant {state}: {problem}")
        return None

    print(await s.wait(f"the operator to report phase {state}", done))
    return 0


async def cmd_suspend(s: Session) -> int:
    return await _set_state(s, "Suspended")


async def cmd_resume(s: Session) -> int:
    return await _set_state(s, "Active")


async def cmd_rotate(s: Session) -> int:
    from tenancy_operator.reconcilers.tenant_base import JOB_REASONS, secret_name

    name = s.args.tenant
    before = await s.tenant(name)
    current = ((before.get("metadata") or {}).get("annotations") or {}).get(ROTATE_ANNOTATION)
    value = _request_value(s.args.value)
    if value == current:
        raise CommandError(f"{ROTATE_ANNOTATION} is {value!r} already; a rotation needs a new value", EXIT_USAGE)
    await s.kube.merge_patch(TENANTS, s.namespace, name, {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    secret = (before.get("status") or {}).get("secretName") or secret_name(name)
    print(f"tenant {s.namespace}/{name}: rotation requested ({ROTATE_ANNOTATION}={value}); the operator puts a new "
          f"login into Secret {secret}, the old one keeps working for the grace period")
    if not s.args.wait:
        return 0

    told: set[str] = set()

    async def done() -> str | None:
        body = await s.kube.read_secret(s.namespace, secret)
        if body is None or (body["metadata"].get("annotations") or {}).get(SECRET_ROTATION_ANNOTATION) != value:
            tenant = await s.tenant(name)
            stalled = render.condition(tenant, "Stalled")
            if stalled.get("status") == "True" and stalled.get("reason") == JOB_REASONS["rotate"]:
                raise CommandError(f"the rotation failed: {_stalled(tenant)}")
            message = str(render.condition(tenant, "Ready").get("message") or "")
            if "rotation waits" in message and message not in told:  # the previous login is in its grace period
                told.add(message)
                print(f"  {message}", file=sys.stderr)
            return None
        user = decoded(body).get("user")
        tenant = await s.tenant(name)
        creds = (tenant.get("status") or {}).get("credentials") or {}
        if creds.get("user") != user:
            return None  # the Secret is written; the status follows in the same reconcile
        retiring = f"; {creds['retiringUser']} keeps working until {creds.get('retiringAt')}" \
            if creds.get("retiringUser") else ""
        return f"rotated: Secret {secret} names login {user} now{retiring}"

    print(await s.wait("the operator to rotate the credentials", done))
    return 0


async def cmd_retry(s: Session) -> int:
    name = s.args.tenant
    before = await s.tenant(name)
    problem = _stalled(before)
    job_before = ((before.get("status") or {}).get("currentJob") or {}).get("id")
    value = _request_value(s.args.value)
    await s.kube.merge_patch(TENANTS, s.namespace, name, {"metadata": {"annotations": {RETRY_ANNOTATION: value}}})
    print(f"tenant {s.namespace}/{name}: one more attempt requested ({RETRY_ANNOTATION}={value})")
    if problem:
        print(f"  stalled on: {problem}")
    else:
        print("  note: nothing is stalled now; the value is used up only by a stalled job")
    if not s.args.wait:
        return 0

    async def done() -> str | None:
        body = await s.tenant(name)
        if render.condition(body, "Ready").get("status") == "True":
            return f"tenant {s.namespace}/{name} is Ready ({(body.get('status') or {}).get('phase')})"
        job = (body.get("status") or {}).get("currentJob") or {}
        again = _stalled(body)
        if again and job.get("id") and job.get("id") != job_before:
            raise CommandError(f"the retried job failed again: {again}")
        return None

    print(await s.wait("the retried job", done))
    return 0


# --- rollouts ---------------------------------------------------------------------------------


async def cmd_rollout_request(s: Session) -> int:
    """Resume (a halted, paused-by-hand or rolled-back rollout) or roll back (SchemaRollouts) by
    annotation: the operator acts on each new value once."""
    kind, name = s.args.kind, s.args.name
    rollback = s.args.rollout_command == "rollback"
    if rollback and kind != "schemarollout":
        raise CommandError("only a SchemaRollout rolls back (a FeatureFlag's percentage is set in its spec)",
                           EXIT_USAGE)
    plural = ROLLOUT_KINDS[kind]
    body = await s.kube.get_object(plural, s.namespace, name)
    if body is None:
        raise CommandError(f"{kind} {s.namespace}/{name} not found", EXIT_USAGE)
    status = body.get("status") or {}
    phase = (status.get("rollout") or {}).get("phase") if kind == "featureflag" else status.get("phase")
    if phase in (None, "Idle", "Completed"):
        print(f"note: {kind} {s.namespace}/{name} has no rollout in progress ({phase or 'none'}); the request "
              "is taken as done", file=sys.stderr)
    annotation = ROLLBACK_ROLLOUT_ANNOTATION if rollback else RESUME_ROLLOUT_ANNOTATION
    value = _request_value(s.args.value)
    await s.kube.merge_patch(plural, s.namespace, name, {"metadata": {"annotations": {annotation: value}}})
    print(f"{kind} {s.namespace}/{name}: {'rollback' if rollback else 'resume'} requested ({annotation}={value})")
    return 0
