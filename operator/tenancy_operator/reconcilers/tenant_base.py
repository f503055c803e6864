"""What the Tenant reconcile's parts share: the outcome, the names of what it makes, pure
helpers, and the base of its steps (reconcilers/tenant.py, tenant_credentials.py,
tenant_lifecycle.py)."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.names import (
    RETRY_ANNOTATION,
    SCHEMA_PIN_ANNOTATION,
    SECRET_ROTATION_ANNOTATION,
)
from tenancy_operator.api.schemarollout import SCHEMA_ROLLOUT, SchemaRolloutStatus, governing, version_cap
from tenancy_operator.api.tenant import TenantPhase, TenantSpec
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import logins, registry
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.k8s.client import ApiError, Kube, older_version
from tenancy_operator.k8s.managed_fields import annotation_path, last_change
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.lifecycle import Connector, JobFailed, JobGate
from tenancy_operator.runtime_context import OperatorContext

TEMPLATE_TTL = 30.0


JOB_REASONS = {
    "provision": "ProvisionFailed", "migrate": "MigrationFailed", "suspend": "SuspendFailed",
    "resume": "ResumeFailed", "rotate": "RotationFailed", "restore": "RestoreFailed",
    "archive": "ArchiveFailed", "delete": "DeleteFailed", "purge": "PurgeFailed",
}


class StepFailed(Exception):
    """A job step failed for a reason worth showing as is (not a transient error)."""


@dataclass
class Outcome:
    """What one reconcile found and did; the handler turns it into status, Events and metrics."""

    ready: bool
    reason: str
    message: str
    phase: TenantPhase
    stalled: bool = False
    retry: bool = False  # a job attempt failed and will be tried again after a backoff
    tenant_id: str | None = None
    schema_version: str | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    repairs: list[str] = field(default_factory=list)
    schema_recreated: bool = False
    # The schema was found dropped and re-created empty, now or earlier and not yet acknowledged.
    data_loss: bool = False
    jobs: list[ledger.Job] = field(default_factory=list)
    credentials: dict[str, Any] | None = None
    """status.credentials as of this reconcile."""
    applied: dict[str, str] | None = None
    """The tenant's migration records (version -> checksum) as last read in this reconcile."""
    database: str | None = None
    """The target that holds the tenant's data when it is not spec.database (a move not done)."""
    last_move: dict[str, Any] | None = None
    """status.lastMove, when this reconcile moved the tenant."""

    def fail(self, reason: str, message: str, *, stalled: bool, retry: bool = False) -> None:
        self.ready, self.reason, self.message, self.phase = False, reason, message, "Failed"
        self.stalled, self.retry = stalled, retry


def secret_name(tenant_name: str) -> str:
    return f"{tenant_name}-db"


def readonly_secret_name(tenant_name: str) -> str:
    return f"{tenant_name}-db-readonly"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def connection_keys(info: Mapping[str, Any], host_override: str | None, sslrootcert_override: str | None, *,
                    user: str, password: str, schema: str) -> dict[str, str]:
    """The keys of a credentials Secret; the same set at every rotation. TLS settings of the
    target (sslmode, root certificate) go into ``uri`` and ``jdbcUrl``; the certificate itself,
    when the target names one, is the key ``ca.crt``."""
    host = host_override or info.get("host") or "localhost"
    port = str(info.get("port") or "5432")
    dbname = info.get("dbname") or "postgres"
    sslmode = str(info.get("sslmode") or "prefer")
    rootcert_path = info.get("sslrootcert")
    q = urllib.parse.quote
    params = {"sslmode": sslmode}
    data = {"host": host, "port": port, "dbname": dbname, "user": user, "password": password, "schema": schema,
            "sslmode": sslmode}
    if rootcert_path:
        cert_at = sslrootcert_override or str(rootcert_path)
        params["sslrootcert"] = cert_at
        data["sslrootcert"] = cert_at
        try:
            data["ca.crt"] = Path(str(rootcert_path)).read_text()
        except OSError:
            data["ca.crt"] = ""
    query = urllib.parse.urlencode(params)
    data["uri"] = f"postgresql://{q(user)}:{q(password, safe='')}@{host}:{port}/{q(dbname)}?{query}"
    jdbc = urllib.parse.urlencode({"user": user, "password": password, "currentSchema": schema, **params})
    data["jdbcUrl"] = f"jdbc:postgresql://{host}:{port}/{q(dbname)}?{jdbc}"
    return data


def enum_value(v: Any) -> str:
    return str(getattr(v, "value", v))


class TemplateCache:
    """Template ConfigMaps as last read or seen in a watch event, for TEMPLATE_TTL seconds: a
    thousand Tenants sharing a template cost one GET, not one each. The template handler puts
    every event of a used template here before it migrates the fleet; the TTL bounds how long a
    change the watch missed (a deletion while the stream was down) can go unseen. The callers
    that miss while a read is in flight take its answer: after a restart, or once the TTL has
    passed, hundreds of Tenant reconciles ask for the same template at once."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future[dict[str, Any] | None]] = {}

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        hit = self._entries.get(key)
        if hit is not None and time.monotonic() - hit[0] < TEMPLATE_TTL:
            return hit[1]
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read(namespace, name))
            reading.add_done_callback(lambda done: self._read_done(key, done))
        # Shielded: one caller cancelled (its handler's timeout) must not cancel the others' read.
        return await asyncio.shield(reading)

    async def _read(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            cm = await self.kube.get_configmap(namespace, name)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"reading ConfigMap failed: {exc.status}") from exc
        if cm is not None:
            self.seen(cm)
        return cm

    def _read_done(self, key: tuple[str, str], done: asyncio.Future[dict[str, Any] | None]) -> None:
        self._reading.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here, also when every caller was cancelled meanwhile

    def seen(self, cm: Mapping[str, Any]) -> None:
        """A watch event or a read of a template ConfigMap; an older version never replaces a newer one."""
        meta = cm["metadata"]
        key = (meta["namespace"], meta["name"])
        hit = self._entries.get(key)
        if hit is not None and hit[1] is not None and older_version(meta, hit[1]["metadata"]):
            return
        self._entries[key] = (time.monotonic(), dict(cm))

    def deleted(self, namespace: str, name: str) -> None:
        self._entries.pop((namespace, name), None)


class RolloutCache:
    """SchemaRollouts of each namespace, as LISTed (at most once per TEMPLATE_TTL seconds per
    namespace while its Tenants reconcile) and as seen in watch events since: a Tenant reconcile
    learns which template versions it may have without a request of its own."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._namespaces: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}

    async def get(self, namespace: str, template: str) -> dict[str, Any] | None:
        """The SchemaRollout governing ``template`` (the oldest, when several name it), or None."""
        hit = self._namespaces.get(namespace)
        if hit is None or time.monotonic() - hit[0] >= TEMPLATE_TTL:
            try:
                items = await self.kube.list_objects(SCHEMA_ROLLOUT.plural, namespace)
            except ApiError as exc:
                raise Retry("KubernetesAPI", f"listing SchemaRollouts failed: {exc.status}") from exc
            hit = (time.monotonic(), {str(i["metadata"]["name"]): i for i in items})
            self._namespaces[namespace] = hit
        return governing(hit[1].values(), template)

    def peek(self, namespace: str, template: str) -> tuple[bool, dict[str, Any] | None]:
        """Without a request: whether the namespace's SchemaRollouts are held, and the governing one."""
        hit = self._namespaces.get(namespace)
        return (False, None) if hit is None else (True, governing(hit[1].values(), template))

    def seen(self, body: Mapping[str, Any]) -> None:
        hit = self._namespaces.get(body["metadata"]["namespace"])
        if hit is None:
            return  # not read yet: the first reconcile of the namespace LISTs
        current = hit[1].get(body["metadata"]["name"])
        if current is None or not older_version(body["metadata"], current["metadata"]):
            hit[1][body["metadata"]["name"]] = dict(body)

    def deleted(self, body: Mapping[str, Any]) -> None:
        hit = self._namespaces.get(body["metadata"]["namespace"])
        if hit is not None:
            hit[1].pop(body["metadata"]["name"], None)


def rolled_back(rollout: Mapping[str, Any] | None) -> bool:
    """The governing SchemaRollout asks its Tenants past its base version to run their down migrations."""
    return rollout is not None and (rollout.get("status") or {}).get("phase") == "RolledBack"


def admission(rollout: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    """What of a SchemaRollout's status decides the Tenants' versions (None: no rollout)."""
    if rollout is None:
        return None
    status = rollout.get("status") or {}
    return (status.get("baseVersion"), tuple(status.get("canary") or ()), status.get("admitBelow"), status.get("phase"))


def rollout_cap(rollout: Mapping[str, Any] | None, body: Mapping[str, Any], template: str) -> tuple[str | None, str]:
    """The newest version of ``template`` the Tenant may have now (None: any), and why (for status):
    its pin (annotation tenancy.dev/schema-pin) and the governing SchemaRollout's admission.
    (Whether a Tenant past that version goes back: rolled_back.)"""
    meta = body["metadata"]
    caps: list[tuple[str, str]] = []
    pin = (meta.get("annotations") or {}).get(SCHEMA_PIN_ANNOTATION)
    if pin:
        caps.append((pin, f"pinned to {pin} ({SCHEMA_PIN_ANNOTATION})"))
    if rollout is not None:
        try:
            status = SchemaRolloutStatus.model_validate(rollout.get("status") or {})
        except ValidationError:
            status = None
        cap = version_cap(status, meta["namespace"], template, meta["name"])
        if cap is not None:
            caps.append((cap, f"newer migrations wait for their wave of SchemaRollout {rollout['metadata']['name']}"))
    return min(caps) if caps else (None, "")


@dataclass(frozen=True)
class KubeReads:
    """What a reconcile reads from Kubernetes, read before it takes a database connection."""

    secret: dict[str, Any] | None
    template: list[tm.Migration] | None
    """The migrations the Tenant's template declares (None: its ConfigMap does not exist)."""
    secret_read: bool = True
    """False: the Secret was not read (a new Tenant); ``secret`` says nothing."""
    cap: str | None = None
    """The newest template version the Tenant may have now (a pin, a SchemaRollout's wave); None: any."""
    held_because: str = ""
    rollback: bool = False
    """A SchemaRollout rolled back: versions past ``cap`` are undone with the template's down migrations."""
    down: Mapping[str, tm.Migration] = field(default_factory=dict)
    """The template's down migrations, by the version each undoes."""


@dataclass(frozen=True)
class MigrationPlan:
    todo: list[tm.Migration]
    new_tenant: bool = False
    """Its registry row was inserted in this reconcile: the job ledger holds nothing of it yet."""
    revert: bool = False
    """``todo`` are down migrations, newest first (a SchemaRollout's rollback)."""
    snapshot: str | None = None
    """The first migration of ``todo`` marked risky: the tenant is archived before the plan runs."""


def job_failed(out: Outcome, exc: JobFailed) -> None:
    reason = JOB_REASONS[exc.kind]
    if exc.kind == "migrate" and tm.MigrationTimeout.MARK in exc.error:
        reason = "MigrationTimeout"
    out.fail(reason, str(exc) if not exc.stalled else
             f"{exc.kind} failed {exc.attempt} time(s), not retrying on its own: {exc.error}. "
             f"Fix the cause, then annotate {RETRY_ANNOTATION}=<new value> to retry once.",
             stalled=exc.stalled, retry=not exc.stalled)


class OwnershipConflict(Exception):
    """An object the Tenant needs exists and is not the operator's for this very Tenant."""


@dataclass(frozen=True)
class SecretClaim:
    password: str
    current: dict[str, Any] | None
    """The existing Secret (this Tenant's own, from an earlier attempt); None: created just now."""


def first_login_set(row: registry.RegistryRow, uid: str, login: logins.LoginObserved | None,
                    claim: SecretClaim) -> bool:
    """An earlier attempt of this very Tenant's first provisioning set its login's password: the
    registry recorded the login (after the batch that set the password), the login is there, and
    the Secret that attempt created still holds the password. The attempt ended before the
    Tenant was Ready (a sharded run's stop cancels the reconciles that wait for their
    migrations); the next one does not set the same password again."""
    return (row.k8s_uid == uid and row.login_slot == "a" and row.rotated_at is not None
            and login is not None and login.exists and claim.current is not None
            and secret_data(claim.current).get("password") == claim.password)


class ArchiveBlocked(Exception):
    """The archive could not be written: nothing is dropped, deletion waits."""


def first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"spec.{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid spec"))


def spec_for_deletion(body: Mapping[str, Any]) -> TenantSpec:
    """The spec a deletion goes by. A Tenant stored before a bound the CRD has now must still be
    deletable: its invalid fields fall back to their defaults (the database target and the
    deletion policy are plain names, checked as before)."""
    raw = dict(body.get("spec") or {})
    try:
        return TenantSpec.model_validate(raw)
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        kept = {k: v for k, v in raw.items() if k not in bad}
        if "deletionPolicy" in bad:
            kept["deletionPolicy"] = "Retain"  # nothing is dropped on a guess
        spec = TenantSpec.model_validate(kept)
        if "database" in bad:
            spec.database = ""  # no such target: nothing is touched
        return spec


def latest_version(done: Mapping[str, str]) -> str | None:
    return max(done) if done else None


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def rotation_of(secret: Mapping[str, Any]) -> str:
    return str((secret["metadata"].get("annotations") or {}).get(SECRET_ROTATION_ANNOTATION, ""))


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])



class TenantSteps:
    """The state every part of the Tenant reconcile works with."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.templates = TemplateCache(ctx.kube)
        self.rollouts = RolloutCache(ctx.kube)

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    @property
    def _iterations(self) -> int:
        return self.ctx.settings.scram_iterations

    def _gate(self, connect: Connector, body: Mapping[str, Any], tenant_id: str, *,
              max_attempts: int | None = None, new_tenant: bool = False) -> JobGate:
        meta = body["metadata"]
        return JobGate(
            connect, self.control, tenant_id, generation=meta.get("generation"),
            retry_token=(meta.get("annotations") or {}).get(RETRY_ANNOTATION),
            max_attempts=max_attempts or self.ctx.settings.job_max_attempts, no_history=new_tenant,
            retry_requested=last_change(meta, annotation_path(RETRY_ANNOTATION)),
        )

    def _dbname(self, spec: TenantSpec) -> str:
        return str(self.ctx.targets.conninfo(spec.database).get("dbname") or "postgres")

