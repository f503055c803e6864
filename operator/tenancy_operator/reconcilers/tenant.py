"""Tenant reconcile: compare the declared Tenant with Postgres and Kubernetes, do only what is missing.

Level-based and idempotent: every step first looks at the real state (catalog, registry, Secret,
the tenant's migration records, the job ledger) and acts only on a difference. Our own status is
never an input. Long or risky steps run as lifecycle jobs (reconcilers/lifecycle.py); repairs of
out-of-band drift are done directly and counted.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from pydantic import ValidationError

from tenancy_operator import archive
from tenancy_operator.api.common import parse_duration
from tenancy_operator.api.names import (
    ACK_SCHEMA_RECREATED_ANNOTATION,
    MANAGED_BY,
    OPERATOR,
    RETRY_ANNOTATION,
    ROTATE_ANNOTATION,
    SECRET_CLAIM_ANNOTATION,
    SECRET_ROTATION_ANNOTATION,
    TENANT_LABEL,
)
from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.conditions import reported
from tenancy_operator.db import archives as archive_sql
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.client import ApiError, Kube, older_version
from tenancy_operator.k8s.managed_fields import annotation_path, last_change
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.lifecycle import Connector, JobFailed, JobGate, using
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
    phase: str
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

    def fail(self, reason: str, message: str, *, stalled: bool, retry: bool = False) -> None:
        self.ready, self.reason, self.message, self.phase = False, reason, message, "Failed"
        self.stalled, self.retry = stalled, retry


def secret_name(tenant_name: str) -> str:
    return f"{tenant_name}-db"


def readonly_secret_name(tenant_name: str) -> str:
    return f"{tenant_name}-db-readonly"


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> str | None:
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


def _enum(v: Any) -> str:
    return str(getattr(v, "value", v))


class TemplateCache:
    """Template ConfigMaps as last read or seen in a watch event, for TEMPLATE_TTL seconds: a
    thousand Tenants sharing a template cost one GET, not one each. The template handler puts
    every event of a used template here before it migrates the fleet; the TTL bounds how long a
    change the watch missed (a deletion while the stream was down) can go unseen."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        hit = self._entries.get((namespace, name))
        if hit is not None and time.monotonic() - hit[0] < TEMPLATE_TTL:
            return hit[1]
        try:
            cm = await self.kube.get_configmap(namespace, name)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"reading ConfigMap failed: {exc.status}") from exc
        if cm is not None:
            self.seen(cm)
        return cm

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


class TenantReconciler:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.templates = TemplateCache(ctx.kube)

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

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        try:
            spec = TenantSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:  # stored before a bound the CRD has now
            return Outcome(False, "InvalidSpec", _first_error(exc), "Failed", stalled=True)
        try:
            ident = tenant_identifier(body["metadata"]["name"])
        except ValueError as exc:
            return Outcome(False, "InvalidSpec", str(exc), "Failed", stalled=True)
        if spec.database not in self.ctx.targets.pools:
            known = ", ".join(sorted(self.ctx.targets.pools)) or "none"
            return Outcome(
                False, "UnknownDatabase",
                f"database target {spec.database!r} is not configured (known: {known})", "Failed", stalled=True,
            )
        # Kubernetes reads first, so that the pooled connection below is not held while they wait
        # on the API server (with a busy API server, held connections would limit the throughput).
        reads = await self._read_kubernetes(body, spec)
        try:
            await self.ctx.ensure_control_schema(spec.database)
            # Three phases, so that no pool connection is held while a tenant migration runs over
            # the tenant's own login: slow migrations cannot starve every other tenant of the pool.
            async with self.ctx.targets.connection(spec.database) as conn:
                out, row, plan = await self._reconcile_in(conn, body, spec, ident, reads)
            if row is None:
                return out
            if plan is not None:
                await self._run_migrations(spec.database, body, ident, row, plan, out)
            async with self.ctx.targets.connection(spec.database) as conn:
                await self._finish(conn, body, spec, ident, row, out)
            return out
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise Retry("DatabaseUnavailable", f"database {spec.database!r} unavailable: {type(exc).__name__}") from exc

    async def _read_kubernetes(self, body: Mapping[str, Any], spec: TenantSpec) -> KubeReads:
        meta = body["metadata"]
        # A Tenant the operator never reported on is almost always new: its provisioning creates
        # the Secret without reading it first (an existing one answers 409 and is read then).
        secret_read = reported(body)
        secret = await self._read_secret(meta["namespace"], secret_name(meta["name"])) if secret_read else None
        if not spec.schema_template:
            return KubeReads(secret, tm.default_migrations(), secret_read)
        cm = await self.templates.get(meta["namespace"], spec.schema_template)
        return KubeReads(secret, None if cm is None else tm.migrations_from_data(cm.get("data") or {}), secret_read)

    async def _reconcile_in(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, reads: KubeReads,
    ) -> tuple[Outcome, sqlt.RegistryRow | None, MigrationPlan | None]:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
        suspended = _enum(spec.state) == "Suspended"
        out = Outcome(True, "Suspended" if suspended else "Provisioned", "", "Suspended" if suspended else "Active")

        row = await sqlt.find_live_row(conn, self.control, ident)
        new_row = False
        if row is None:
            try:
                row = await sqlt.insert_row(
                    conn, self.control, namespace=namespace, name=name, uid=uid, ident=ident,
                    tier=_enum(spec.tier), display_name=spec.display_name, secret_claim=secrets.token_hex(16),
                )
                new_row = True
            except psycopg.errors.UniqueViolation:
                row = await sqlt.find_live_row(conn, self.control, ident)
                assert row is not None
        if (row.namespace, row.name) != (namespace, name):
            return Outcome(
                False, "Conflict",
                f"schema {ident} already belongs to tenant {row.namespace}/{row.name} on database "
                f"{spec.database!r}; rename this Tenant or use another database target",
                "Failed", stalled=True,
            ), None, None
        out.tenant_id = row.id
        if not new_row:  # a registry row inserted just now has no jobs yet
            await ledger.abandon_running(conn, self.control, row.id)
        plan = None
        try:
            plan = await self._converge(conn, body, spec, ident, row, out, reads, new_row=new_row)
        except JobFailed as exc:
            _job_failed(out, exc)
        return out, row, plan

    async def _finish(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                      row: sqlt.RegistryRow, out: Outcome) -> None:
        meta = body["metadata"]
        uid = meta.get("uid", "")
        suspended = _enum(spec.state) == "Suspended"
        if out.applied is None:  # not read in this reconcile yet (or a migration ran since)
            out.applied = await tm.applied(conn, self.control, row.id)
        out.schema_version = _latest(out.applied)
        recreated_at = row.schema_recreated_at
        # Pipeline mode: the writes go with the ledger read in one round trip.
        async with conn.pipeline():
            if out.ready:
                await sqlt.update_row(
                    conn, self.control, row.id, uid=uid, tier=_enum(spec.tier), display_name=spec.display_name,
                    state="suspended" if suspended else "active", provisioned=True,
                    schema_recreated=out.schema_recreated,
                )
            ack = (meta.get("annotations") or {}).get(ACK_SCHEMA_RECREATED_ANNOTATION)
            if recreated_at is not None and not out.schema_recreated and ack and ack != row.schema_recreated_ack:
                await sqlt.acknowledge_schema_recreated(conn, self.control, row.id, ack)
                recreated_at = None
            out.jobs = await ledger.recent(conn, self.control, row.id, limit=5)
        out.data_loss = out.schema_recreated or recreated_at is not None
        _fold_first_provisioning_events(out, ident)
        for what in out.repairs:
            metrics.DRIFT_REPAIRS.labels(kind="Tenant", object=what).inc()
        if out.repairs:
            out.events.append(("Warning" if out.schema_recreated else "Normal", "DriftRepaired",
                               "repaired out-of-band changes: " + ", ".join(out.repairs)))
        if out.schema_recreated:
            out.events.append(("Warning", "SchemaRecreated",
                               f"schema {ident} was dropped outside the operator and was re-created EMPTY: "
                               "its data is gone; restore from a backup"))

    async def _converge(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                        row: sqlt.RegistryRow, out: Outcome, reads: KubeReads, *,
                        new_row: bool) -> MigrationPlan | None:
        was_provisioned = row.provisioned_at is not None
        revived = row.state == "deleted"
        gate = self._gate(using(conn), body, row.id, new_tenant=new_row)
        obs = (await sqlt.observe(conn, [ident]))[ident]
        marker = sqlt.owner_marker(self._dbname(spec), body["metadata"]["namespace"], body["metadata"]["name"])
        try:
            self._check_ownership(ident, obs, marker, was_provisioned)
            if not was_provisioned:
                claim = await self._claim_secret(conn, body, spec, ident, row, reads)
        except OwnershipConflict as exc:
            out.fail("Conflict", str(exc), stalled=True)
            return None

        if not was_provisioned:
            password = await gate.run(
                "provision", lambda: self._provision(conn, body, spec, ident, row, obs, out, claim, marker),
                detail=f"schema and role {ident}", requested=last_change(body["metadata"], ("f:spec",)),
            )
            out.events.append(("Normal", "Provisioned", f"schema and role {ident} ready"))
            if not obs.schema_exists:
                out.applied = {}  # a schema created just now holds no migration records
            if spec.restore_from:
                await self._restore(conn, gate, body, spec, ident, row, out)
            if not out.ready:
                return None
            del password
            return await self._plan_migrations(conn, body, spec, ident, row, out, reads, new_tenant=new_row)

        statements = self._catalog_statements(ident, obs, out, marker, drift=True)
        if out.schema_recreated:  # forgotten first: a crash after the re-creation must not skip them
            await tm.forget(conn, self.control, row.id)
            out.applied = {}
        await sqlt.run_batch(conn, statements)
        if spec.restore_from:
            await self._restore(conn, gate, body, spec, ident, row, out)
            if not out.ready:
                return None

        meta = body["metadata"]
        current = reads.secret if reads.secret_read else await self._read_secret(
            meta["namespace"], secret_name(meta["name"]))
        try:
            await self._credentials(conn, body, spec, ident, row, current, out, gate, marker, revived=revived)
        except OwnershipConflict as exc:
            out.fail("Conflict", str(exc), stalled=True)
            return None
        return await self._plan_migrations(conn, body, spec, ident, row, out, reads)

    async def _claim_secret(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                            row: sqlt.RegistryRow, reads: KubeReads) -> SecretClaim:
        """The credentials Secret for a first provisioning: created now (with a new password), or
        the one this very Tenant's earlier attempt created. A Secret of that name that anyone
        else created is never taken over: OwnershipConflict."""
        meta = body["metadata"]
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        current = reads.secret
        if not reads.secret_read or current is None:
            # The claim is committed before the Secret exists: an operator stopped right after
            # creating it (before its uid is recorded) recognises its own Secret by it next time.
            row = await self._claimed(conn, row)
            claim = row.secret_claim
            password = sqlt.generate_password()
            uid = await self._create_secret(meta["namespace"], self._secret_body(
                body, spec, ident, password, rotation, claim=claim, user=sqlt.login_role(ident, "a")))
            if uid is not None:
                await sqlt.set_secret_uid(conn, self.control, row.id, uid)
                return SecretClaim(password, None)
            current = await self._read_secret(meta["namespace"], secret_name(meta["name"]))
            if current is None:
                raise Retry("KubernetesAPI", "the Secret was deleted while it was created; trying again")
        await self._check_secret(conn, current, row, meta)
        password = ""
        if _rotation_of(current) == rotation:
            password = _secret_data(current).get("password", "")  # apps already use it: keep it
        return SecretClaim(password or sqlt.generate_password(), current)

    async def _provision(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                         row: sqlt.RegistryRow, obs: sqlt.Observed, out: Outcome, claim: SecretClaim,
                         marker: str) -> str:
        """A tenant's first provisioning: what is missing of role, schema, grants, password and
        login in one round trip (one transaction), and its Secret. Returns the password."""
        meta = body["metadata"]
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        statements = self._catalog_statements(ident, obs, out, marker, drift=False)
        password = claim.password
        lobs = await sqlt.observe_logins(conn, ident)
        user = sqlt.login_role(ident, "a")
        await sqlt.run_batch(conn, [
            *statements, sqlt.login_statement(ident, False),
            *self._login_statements(ident, spec, lobs, marker, out, drift=False),
            await sqlt.password_statement(user, password, self._iterations),
            sqlt.login_statement(user, _enum(spec.state) != "Suspended")])
        now = _now()
        await sqlt.set_credentials(conn, self.control, row.id, login_slot="a", retiring_role=None, retire_at=None,
                                   rotated_at=now)
        every = spec.credentials.rotate_every
        out.credentials = {"user": user, "lastRotatedAt": _ts(now),
                           "nextRotationAt": _ts(now + parse_duration(str(every))) if every else None}
        metrics.credentials_rotated(meta["namespace"], meta["name"], now)
        current = claim.current
        if current is None:
            return password
        desired = self._secret_body(body, spec, ident, password, rotation, user=user)
        if desired["data"] != current.get("data") or not _owned_by(current, meta["uid"]) \
                or _rotation_of(current) != rotation:
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self._write_secret(meta["namespace"], desired, replace=True)
        return password

    def _check_ownership(self, ident: str, obs: sqlt.Observed, marker: str, was_provisioned: bool) -> None:
        """The role and schema are this Tenant's, or missing. Roles belong to the whole server: a
        role of this name may be another database's tenant (two targets on one server) or a role
        somebody else made; a schema may exist before the operator ever provisioned the tenant."""
        if obs.role_exists and obs.owner_marker != marker:
            theirs = obs.owner_marker or ""
            if theirs.startswith(sqlt.MARKER_PREFIX):
                raise OwnershipConflict(
                    f"role {ident} belongs to {theirs.removeprefix(sqlt.MARKER_PREFIX)} (database targets that share "
                    "a PostgreSQL server share its roles); rename this Tenant or use another server")
            if not was_provisioned:  # provisioned before: a role of an earlier version, unmarked
                raise OwnershipConflict(
                    f"role {ident} exists and was not created by the operator for this Tenant; "
                    "drop or rename that role, or rename this Tenant")
        if not was_provisioned and not obs.role_exists and obs.schema_exists:
            raise OwnershipConflict(
                f"schema {ident} exists and was not created by the operator for this Tenant; "
                "drop or rename that schema, or rename this Tenant")

    def _dbname(self, spec: TenantSpec) -> str:
        return str(self.ctx.targets.conninfo(spec.database).get("dbname") or "postgres")

    def _login_statements(self, ident: str, spec: TenantSpec, lobs: Mapping[str, sqlt.LoginObserved], marker: str,
                          out: Outcome, *, drift: bool) -> list[sql.Composable]:
        """Login roles that are missing, their marks and search_path, and their grants (data
        privileges only, also through the owner's default privileges) where they are not whole."""
        idle = self.ctx.settings.tenant_idle_in_transaction_timeout
        todo: list[sql.Composable] = []
        grants: list[sql.Composable] = []
        created = False
        for slot, lo in lobs.items():
            if slot == sqlt.READ_ONLY_SLOT and not spec.credentials.read_only_login and not lo.exists:
                continue
            role = sqlt.login_role(ident, slot)
            want_marker = sqlt.login_marker(marker, slot)
            if not lo.exists:
                todo += sqlt.create_login(role, want_marker, ident, idle)
                created = True
                if drift and slot in sqlt.SLOTS and any(x.exists for x in lobs.values()):
                    out.repairs.append("login-role")
            else:
                if lo.marker != want_marker:
                    todo.append(sqlt.mark_role(role, want_marker))
                if lo.search_path not in (ident, f'"{ident}"'):
                    todo.append(sqlt.set_search_path(role, ident))
            if not lo.exists or not lo.grants_ok:
                grants += sqlt.grant_statements(ident, ident, role, read_only=slot == sqlt.READ_ONLY_SLOT)
                if lo.exists and drift:
                    out.repairs.append("login-grants")
        if created and not lobs["a"].exists:
            grants.append(sqlt.private_functions(ident))
        return todo + sqlt.membership_statements(ident, grants)

    async def _credentials(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                           row: sqlt.RegistryRow, current: dict[str, Any] | None, out: Outcome, gate: JobGate,
                           marker: str, *, revived: bool) -> None:
        """Login roles, their grants, the Secret, role-swap rotation, retirement and login states."""
        meta = body["metadata"]
        suspended = _enum(spec.state) == "Suspended"
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        lobs = await sqlt.observe_logins(conn, ident)
        await sqlt.run_batch(conn, self._login_statements(ident, spec, lobs, marker, out, drift=True))
        created = [sqlt.login_role(ident, s) for s, lo in lobs.items() if not lo.exists
                   and (s != sqlt.READ_ONLY_SLOT or spec.credentials.read_only_login)]
        if created:
            await sqlt.copy_limits(conn, ident, created)
        now = _now()
        grace = parse_duration(str(spec.credentials.grace_period))
        slot, retiring, retire_at, rotated = row.login_slot, row.retiring_role, row.retire_at, row.rotated_at

        if retiring and retire_at is not None and retire_at <= now:
            await sqlt.set_login(conn, retiring, False)
            if retiring == ident:
                await conn.execute(sql.SQL("ALTER ROLE {} PASSWORD NULL").format(sql.Identifier(ident)))
            ended = await sqlt.terminate_sessions(conn, retiring)
            out.events.append(("Normal", "CredentialsRetired",
                               f"previous login {retiring} retired after the grace period, {ended} session(s) ended"))
            retiring, retire_at = None, None
            await sqlt.set_credentials(conn, self.control, row.id, login_slot=slot, retiring_role=None,
                                       retire_at=None, rotated_at=rotated)

        async def rotate(reason: str, previous: str | None) -> None:
            nonlocal slot, retiring, retire_at, rotated
            new_slot = "a" if slot is None else ("b" if slot == "a" else "a")
            user = sqlt.login_role(ident, new_slot)
            password = sqlt.generate_password()
            await sqlt.run_batch(conn, [await sqlt.password_statement(user, password, self._iterations),
                                        sqlt.login_statement(user, not suspended)])
            desired = self._secret_body(body, spec, ident, password, rotation, user=user)
            if current is not None:
                desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self._write_secret(meta["namespace"], desired, replace=True)
            else:
                fresh = await self._claimed(conn, row)
                desired["metadata"]["annotations"][SECRET_CLAIM_ANNOTATION] = str(fresh.secret_claim)
                uid = await self._write_secret(meta["namespace"], desired, replace=False)
                await sqlt.set_secret_uid(conn, self.control, row.id, uid)
            slot, rotated = new_slot, now
            retiring, retire_at = (previous, now + grace) if previous else (None, None)
            await sqlt.set_credentials(conn, self.control, row.id, login_slot=slot, retiring_role=retiring,
                                       retire_at=retire_at, rotated_at=rotated)
            metrics.CREDENTIAL_ROTATIONS.inc()
            if previous:
                out.events.append(("Normal", "CredentialsRotated",
                                   f"{reason}: the Secret names login {user} now; {previous} keeps working until "
                                   f"{_ts(retire_at)}"))

        if current is None:
            # No Secret (first time, deleted out of band, or re-applied): a new login for the
            # application at once; the old one has nothing that names it any more.
            await rotate("Secret re-created", None)
            if not revived:
                out.repairs.append("secret")
        else:
            await self._check_secret(conn, current, row, meta)
            data = _secret_data(current)
            every = spec.credentials.rotate_every
            due = (_rotation_of(current) != rotation and "on demand") \
                or (slot is None and "conversion to separate owner and login roles") \
                or (every and rotated is not None and rotated + parse_duration(str(every)) <= now and "scheduled") \
                or (slot is not None and data.get("user") != sqlt.login_role(ident, slot) and "Secret out of date")
            if due == "Secret out of date" and retiring and data.get("user") == retiring:
                # A read from before this rotation's write (a watch cache behind): the registry
                # says the Secret already names the new login; rotating again would renew the
                # login the application is moving to. The next reconcile reads the new Secret.
                pass
            elif due and retiring and slot is not None and due != "Secret out of date":
                out.message = (f"rotation waits until {retiring} is retired at "
                               f"{retire_at.isoformat(timespec='seconds') if retire_at else '?'}")
            elif due:
                previous = ident if slot is None else sqlt.login_role(ident, slot)
                await gate.run("rotate", lambda: rotate(str(due), previous), detail=str(due),
                               requested=last_change(meta, annotation_path(ROTATE_ANNOTATION))
                               if due == "on demand" else (OPERATOR, None))
            else:
                assert slot is not None
                user, password = sqlt.login_role(ident, slot), data.get("password", "")
                if user in created:  # dropped out of band: back with the password the application uses
                    await sqlt.set_password(conn, user, password, self._iterations)
                desired = self._secret_body(body, spec, ident, password, rotation, user=user)
                if desired["data"] != current.get("data") or not _owned_by(current, meta["uid"]):
                    desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    await self._write_secret(meta["namespace"], desired, replace=True)
        await self._read_only_secret(conn, body, spec, ident, row, suspended)

        # Login states: the current login (and the previous one in its grace period) and the
        # read-only login may log in unless the tenant is suspended; nothing else may.
        want = sqlt.wanted_logins(ident, slot=slot, retiring=retiring, suspended=suspended,
                                  read_only=spec.credentials.read_only_login)
        lobs = await sqlt.observe_logins(conn, ident)
        owner_obs = (await sqlt.observe(conn, [ident]))[ident]
        have = {ident: owner_obs.can_login,
                **{sqlt.login_role(ident, s): lo.can_login for s, lo in lobs.items() if lo.exists}}
        wrong = {r: w for r, w in want.items() if r in have and have[r] != w}
        if suspended and row.state != "suspended" and (wrong or any(have.values())):
            async def suspend() -> int:
                await sqlt.run_batch(conn, [sqlt.login_statement(r, False) for r in have])
                return await sqlt.terminate_all_sessions(conn, ident)
            ended = await gate.run("suspend", suspend, requested=last_change(meta, ("f:spec", "f:state")))
            out.events.append(("Normal", "Suspended", f"every login disabled, {ended} session(s) ended"))
        elif not suspended and row.state in ("suspended", "deleted") and wrong:
            resume = [sqlt.login_statement(r, w) for r, w in wrong.items()]
            await gate.run("resume", lambda: sqlt.run_batch(conn, resume),
                           detail="re-applied after deletion" if revived else None,
                           requested=last_change(meta, ("f:spec",) if revived else ("f:spec", "f:state")))
            out.events.append(("Normal", "Restored", "tenant re-applied; retained data is back") if revived
                              else ("Normal", "Resumed", "login enabled"))
        elif wrong:
            await sqlt.run_batch(conn, [sqlt.login_statement(r, w) for r, w in wrong.items()])
            disabled = [r for r, w in wrong.items() if not w]
            for r in disabled:
                await sqlt.terminate_sessions(conn, r)
            out.repairs.append("login")
        every = spec.credentials.rotate_every
        out.credentials = {
            "user": sqlt.login_role(ident, slot) if slot else ident,
            "lastRotatedAt": _ts(rotated),
            "nextRotationAt": _ts(rotated + parse_duration(str(every))) if every and rotated else None,
            "retiringUser": retiring,
            "retiringAt": _ts(retire_at),
        }
        metrics.credentials_rotated(meta["namespace"], meta["name"], rotated)

    async def _read_only_secret(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                                row: sqlt.RegistryRow, suspended: bool) -> None:
        """``<tenant>-db-readonly`` for the read-only login when the spec asks for one; ours only
        by its recorded uid or claim (as the main Secret)."""
        meta = body["metadata"]
        name = readonly_secret_name(meta["name"])
        current = await self._read_secret(meta["namespace"], name)
        ours = current is not None and (
            (row.ro_secret_uid is not None and current["metadata"].get("uid") == row.ro_secret_uid)
            or (bool(row.ro_secret_claim) and (current["metadata"].get("annotations") or {}).get(
                SECRET_CLAIM_ANNOTATION) == row.ro_secret_claim))
        user = sqlt.login_role(ident, sqlt.READ_ONLY_SLOT)
        if not spec.credentials.read_only_login:
            if current is not None and ours:
                try:
                    await self.ctx.kube.delete_secret(meta["namespace"], name, uid=current["metadata"]["uid"])
                except ApiError as exc:
                    raise Retry("KubernetesAPI", f"deleting Secret failed: {exc.status}") from exc
                await sqlt.set_ro_secret(conn, self.control, row.id, uid=None, claim=None)
            return
        if current is not None and not ours:
            raise OwnershipConflict(
                f"Secret {meta['namespace']}/{name} exists and was not created by the operator for this Tenant; "
                "delete or rename it, and the operator creates its own")
        if current is not None:
            password = _secret_data(current).get("password", "")
            desired = self._secret_body(body, spec, ident, password, "", user=user, name=name)
            if desired["data"] != current.get("data"):
                desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self._write_secret(meta["namespace"], desired, replace=True)
            if current["metadata"].get("uid") != row.ro_secret_uid:
                await sqlt.set_ro_secret(conn, self.control, row.id, uid=current["metadata"]["uid"], claim=None)
            return
        claim = secrets.token_hex(16)
        await sqlt.set_ro_secret(conn, self.control, row.id, uid=None, claim=claim)
        password = sqlt.generate_password()
        await sqlt.set_password(conn, user, password, self._iterations)
        uid = await self._write_secret(meta["namespace"], self._secret_body(
            body, spec, ident, password, "", claim=claim, user=user, name=name), replace=False)
        await sqlt.set_ro_secret(conn, self.control, row.id, uid=uid, claim=None)

    def _catalog_statements(self, ident: str, obs: sqlt.Observed, out: Outcome, marker: str, *,
                            drift: bool) -> list[sql.Composable]:
        """Role, schema, owner, grants, search_path: what is missing, and the repairs that counts
        (when ``drift``: the tenant was provisioned before). The statements that take the role's
        rights run inside a membership granted and revoked in the same batch."""
        todo: list[sql.Composable] = []
        if not obs.role_exists:
            todo += sqlt.create_role(ident, marker)
            out.repairs.append("role") if drift else None
        elif obs.owner_marker != marker:  # checked: an unmarked role of this tenant from an earlier version
            todo.append(sqlt.mark_role(ident, marker))
        idle = self.ctx.settings.tenant_idle_in_transaction_timeout
        if not obs.role_exists or obs.idle_timeout != idle:
            todo.append(sqlt.set_idle_timeout(ident, idle))
        as_role: list[sql.Composable] = []
        if not obs.schema_exists:
            as_role.append(sqlt.create_schema(ident, ident))
            if drift:
                out.repairs.append("schema")
                out.schema_recreated = True
        elif not obs.schema_owned:
            as_role.append(sqlt.set_schema_owner(ident, ident))
            out.repairs.append("schema-owner")
        if obs.role_exists and obs.schema_exists and not obs.schema_privileges:
            as_role.append(sqlt.grant_schema(ident, ident))
            out.repairs.append("grants")
        if as_role:
            todo += sqlt.membership_statements(ident, as_role)
        elif obs.operator_member:  # standing, from an earlier version or an interrupted archive
            todo.append(sqlt.revoke_role_from_operator(ident))
        if obs.search_path not in (ident, f'"{ident}"'):
            todo.append(sqlt.set_search_path(ident, ident))
            if obs.role_exists and drift:
                out.repairs.append("search-path")
        return todo

    # --- credentials -------------------------------------------------------------------------

    def _secret_body(
        self, body: Mapping[str, Any], spec: TenantSpec, ident: str, password: str, rotation: str,
        claim: str | None = None, *, user: str, name: str | None = None,
    ) -> dict[str, Any]:
        meta = body["metadata"]
        data = connection_keys(self.ctx.targets.conninfo(spec.database), self.ctx.settings.secret_host_override,
                               self.ctx.settings.secret_sslrootcert, user=user, password=password, schema=ident)
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name or secret_name(meta["name"]),
                "namespace": meta["namespace"],
                "labels": {**MANAGED_BY, TENANT_LABEL: meta["name"]},
                "annotations": {SECRET_ROTATION_ANNOTATION: rotation,
                                **({SECRET_CLAIM_ANNOTATION: claim} if claim else {})},
                "ownerReferences": [{
                    "apiVersion": body.get("apiVersion", "tenancy.dev/v1alpha1"), "kind": "Tenant",
                    "name": meta["name"], "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True,
                }],
            },
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    async def _read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.ctx.kube.get_secret(namespace, name)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"reading Secret failed: {exc.status}") from exc

    async def _create_secret(self, namespace: str, body: dict[str, Any]) -> str | None:
        """Create the Secret and return its uid; None when one exists already."""
        try:
            return await self.ctx.kube.create_secret(namespace, body)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise Retry("KubernetesAPI", f"writing Secret failed: {exc.status}") from exc

    async def _write_secret(self, namespace: str, body: dict[str, Any], *, replace: bool) -> str:
        """Replace or create the Secret; returns its uid."""
        try:
            if replace:
                return await self.ctx.kube.replace_secret(namespace, body["metadata"]["name"], body)
            return await self.ctx.kube.create_secret(namespace, body)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"writing Secret failed: {exc.status}") from exc

    async def _claimed(self, conn: Conn, row: sqlt.RegistryRow) -> sqlt.RegistryRow:
        """The registry row with a claim for the Secret about to be created, committed before the
        Secret exists: an operator stopped after creating it, before its uid was recorded,
        recognises it by the claim in its annotations. Nobody else's Secret can carry it."""
        if row.secret_claim:
            return row
        claim = secrets.token_hex(16)
        await sqlt.set_secret_claim(conn, self.control, row.id, claim)
        return dataclasses.replace(row, secret_claim=claim)

    async def _check_secret(self, conn: Conn, current: Mapping[str, Any], row: sqlt.RegistryRow,
                            meta: Mapping[str, Any]) -> None:
        """The Secret is the one the operator created for this Tenant (the uid it recorded, or the
        claim of one created just before a stop), or, for a tenant provisioned by an earlier
        version that recorded neither, owned by this Tenant. Its uid is recorded."""
        uid = current["metadata"].get("uid")
        claim = (current["metadata"].get("annotations") or {}).get(SECRET_CLAIM_ANNOTATION)
        ours = (row.secret_uid is not None and uid == row.secret_uid) \
            or (bool(row.secret_claim) and claim == row.secret_claim) \
            or (row.secret_uid is None and not row.secret_claim and row.provisioned_at is not None
                and _owned_by(current, meta["uid"]))
        if not ours:
            raise OwnershipConflict(
                f"Secret {meta['namespace']}/{current['metadata']['name']} exists and was not created by the operator "
                "for this Tenant; it is left as it is: delete or rename it, and the operator creates its own")
        if uid != row.secret_uid or row.secret_claim:
            await sqlt.set_secret_uid(conn, self.control, row.id, str(uid))

    # --- restore ---------------------------------------------------------------------------

    async def _restore(self, conn: Conn, gate: JobGate, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                       row: sqlt.RegistryRow, out: Outcome) -> None:
        """Restore ``spec.restoreFrom`` once into this tenant's new, empty schema."""
        if any(j.kind == "restore" and j.state == "succeeded"
               for j in await ledger.recent(conn, self.control, row.id, limit=1000)):
            return
        meta = body["metadata"]
        ref = str(spec.restore_from)
        found = await archive_sql.find(conn, self.control, meta["namespace"], meta["name"], ref)
        if found is None:
            out.fail("ArchiveNotFound", f"no archive {ref!r} for tenant {meta['namespace']}/{meta['name']}",
                     stalled=True)
            return
        if found.schema_name != ident:
            out.fail("InvalidSpec", f"archive {found.id} holds schema {found.schema_name}; restore it into a Tenant "
                     f"named {found.name}", stalled=True)
            return
        cur = await conn.execute("SELECT count(*) AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                 " WHERE n.nspname = %s", [ident])
        objects = await cur.fetchone()
        if objects and int(str(objects["n"])) > 0:
            out.fail("RestoreRefused", f"schema {ident} already holds data; refusing to restore over it", stalled=True)
            return

        async def restore() -> dict[str, str]:
            settings = self.ctx.settings
            try:
                async with sqlt.delegate_login(conn, ident, self._iterations) as (user, password):
                    login = {**self.ctx.targets.conninfo(spec.database), "user": user, "password": password}
                    await archive.restore_schema(
                        login, path=Path(found.path), sha256=found.sha256, schema=ident, role=ident,
                        workdir=settings.archive_dir, deadline=settings.archive_deadline_seconds,
                    )
                    # The archive brought the tenant's migration records along: read with its rights.
                    return await tm.read_records(
                        psycopg.conninfo.make_conninfo(**login), ident,
                        connect_timeout=settings.db_connect_timeout_seconds,
                        deadline=settings.migration_deadline_seconds,
                    )
            except (archive.ArchiveCorrupt, archive.ArchiveUnavailable) as exc:
                raise StepFailed(str(exc)) from exc

        records = await gate.run("restore", restore, detail=f"from archive {found.id}",
                                 requested=last_change(body["metadata"], ("f:spec", "f:restoreFrom")))
        await tm.forget(conn, self.control, row.id)
        await tm.mirror(conn, self.control, row.id, records)
        out.applied = None
        out.events.append(("Normal", "Restored", f"restored from archive {found.id} (checksum verified)"))

    # --- migrations ------------------------------------------------------------------------

    async def _plan_migrations(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, row: sqlt.RegistryRow,
        out: Outcome, reads: KubeReads, *, new_tenant: bool = False,
    ) -> MigrationPlan | None:
        wanted = reads.template
        namespace = body["metadata"]["namespace"]
        if wanted is None:
            out.fail("TemplateNotFound", f"schema template ConfigMap {namespace}/{spec.schema_template} not found",
                     stalled=True)
            return None
        try:
            tm.check_template(wanted)
        except tm.InvalidTemplate as exc:
            out.fail("InvalidTemplate", f"schema template ConfigMap {namespace}/{spec.schema_template}: {exc}",
                     stalled=True)
            return None
        if out.applied is None:
            out.applied = await tm.applied(conn, self.control, row.id)
        done = out.applied
        try:
            todo = tm.pending(wanted, done)
        except tm.ChecksumMismatch as exc:
            out.fail("MigrationChecksumMismatch", str(exc), stalled=True)
            return None
        out.schema_version = _latest(done)
        if not todo:
            return None
        if _enum(spec.state) == "Suspended":
            out.message = f"{len(todo)} migration(s) wait until the tenant is Active again"
            return None
        return MigrationPlan(todo, new_tenant)

    async def _run_migrations(self, target: str, body: Mapping[str, Any], ident: str, row: sqlt.RegistryRow,
                              plan: MigrationPlan, out: Outcome) -> None:
        """Apply pending migrations over the tenant's login; pool connections only for bookkeeping."""

        def short() -> contextlib.AbstractAsyncContextManager[Conn]:
            return self.ctx.targets.connection(target)

        gate = self._gate(short, body, row.id, new_tenant=plan.new_tenant)

        async def migrate() -> list[str]:
            records: dict[str, str] = {}
            # A temporary login that is a member of the owner and nothing else; the session takes
            # the owner's role (objects belong to the owner) and a RESET ROLE in tenant code gets
            # back only to that login's own rights: none.
            async with short() as conn:
                user, password = await sqlt.create_delegate(conn, ident, self._iterations)
            try:
                info = self.ctx.targets.conninfo(target)
                dsn = psycopg.conninfo.make_conninfo(self.ctx.targets.dsns[target], user=user, password=password,
                                                     host=info.get("host"), port=info.get("port"))
                return await self._apply(target, dsn, ident, user, plan.todo, records)
            finally:
                # What the schema now holds, also when a later migration failed: the operator's record.
                out.applied = None
                async with short() as conn:
                    await tm.mirror(conn, self.control, row.id, records)
                    await sqlt.drop_delegate_now(conn, user)

        try:
            async with self.ctx.migration_slots.hold(body["metadata"]["namespace"]):
                applied = await gate.run("migrate", migrate, detail=", ".join(m.version for m in plan.todo))
        except JobFailed as exc:
            _job_failed(out, exc)
            return
        for v in applied:
            out.events.append(("Normal", "MigrationApplied", f"applied {v}"))

    async def _apply(self, target: str, dsn: str, ident: str, user: str, todo: list[tm.Migration],
                     records: dict[str, str]) -> list[str]:
        async def end_backend(pid: int) -> None:
            async with self.ctx.targets.connection(target) as conn:
                await sqlt.terminate_backend(conn, user, pid)

        return await tm.apply_as_tenant(
            dsn, ident, todo, lock_timeout=self.ctx.settings.migration_lock_timeout,
            statement_timeout=self.ctx.settings.migration_statement_timeout,
            connect_timeout=self.ctx.settings.db_connect_timeout_seconds,
            deadline=self.ctx.settings.migration_deadline_seconds, end_backend=end_backend, records=records,
            role=ident, app_roles=sqlt.app_roles_setting(ident),
        )

    # --- deletion ----------------------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any], *, same_uid: bool = False) -> list[tuple[str, str, str]]:
        """Apply the deletion policy. Safe to repeat; never touches another tenant's data.

        ``same_uid``: only if the registry row is still this object's (the Tenant is gone, and a
        new one of the same name may own the row by now)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = _spec_for_deletion(body)
        events: list[tuple[str, str, str]] = []
        try:
            ident = tenant_identifier(name)
        except ValueError:
            return events  # nothing was ever provisioned for it
        if spec.database not in self.ctx.targets.pools:
            return events
        policy = _enum(spec.deletion_policy)
        try:
            await self.ctx.ensure_control_schema(spec.database)
            async with self.ctx.targets.connection(spec.database) as conn:
                row = await sqlt.find_live_row(conn, self.control, ident)
                if same_uid and (row is None or row.k8s_uid != meta.get("uid")):
                    return events
                secret_uid: str | None = None
                if row is not None and (row.namespace, row.name) == (namespace, name):
                    secret_uid = row.secret_uid
                    await ledger.abandon_running(conn, self.control, row.id)
                    # Deletion keeps trying on its own (until it can), so no stall here.
                    gate = self._gate(using(conn), body, row.id, max_attempts=1_000_000)
                    obs = (await sqlt.observe(conn, [ident]))[ident]
                    provisioned = row.provisioned_at is not None
                    marker = sqlt.owner_marker(self._dbname(spec), namespace, name)
                    # Only what the operator made for this Tenant: a Tenant that never got past a
                    # Conflict owns neither the role (another database's, or nobody's) nor the schema.
                    role_ours = obs.role_exists and (obs.owner_marker == marker
                                                     or (provisioned and obs.owner_marker is None))
                    if role_ours:
                        for r in [ident, *await sqlt.existing_logins(conn, ident)]:
                            await sqlt.set_login(conn, r, False)
                        await sqlt.terminate_all_sessions(conn, ident)
                    if policy == "Archive" and role_ours and provisioned:
                        events += await self._archive(conn, gate, body, spec, ident, row.id)
                    if policy in ("Delete", "Archive"):
                        if role_ours or provisioned:  # else nothing of the operator's is there to drop
                            await gate.run(
                                "delete", lambda: sqlt.drop_tenant_objects(conn, ident, ident, role_too=role_ours),
                                detail=f"drop schema and role {ident}")
                            events.append(("Normal", "Dropped", f"schema and role {ident} dropped"))
                        await sqlt.mark_deleted(conn, self.control, row.id,
                                                "archived" if policy == "Archive" else "dropped")
                    else:
                        await sqlt.mark_deleted(conn, self.control, row.id, "deleted")
                        events.append(("Normal", "Retained",
                                       f"schema {ident} kept, login disabled; re-apply the Tenant to restore"))
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise Retry("DatabaseUnavailable", f"database {spec.database!r} unavailable: {type(exc).__name__}") from exc
        await self._delete_own_secret(meta, secret_uid)
        return events

    async def _delete_own_secret(self, meta: Mapping[str, Any], secret_uid: str | None) -> None:
        """The credentials Secret goes with the Tenant, if it is the one the operator created for it."""
        try:
            if secret_uid is None:  # recorded by no version before this one: ours if this Tenant owns it
                current = await self.ctx.kube.get_secret(meta["namespace"], secret_name(meta["name"]))
                if current is None or not _owned_by(current, meta["uid"]):
                    return
                secret_uid = current["metadata"]["uid"]
            await self.ctx.kube.delete_secret(meta["namespace"], secret_name(meta["name"]), uid=secret_uid)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"deleting Secret failed: {exc.status}") from exc

    async def _archive(self, conn: Conn, gate: JobGate, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                       tenant_id: str) -> list[tuple[str, str, str]]:
        meta = body["metadata"]

        async def dump() -> archive.Archive:
            try:
                async with sqlt.delegate_login(conn, ident, self._iterations) as (user, password):
                    made = await archive.dump_schema(
                        {**self.ctx.targets.conninfo(spec.database), "user": user, "password": password},
                        directory=self.ctx.settings.archive_dir, namespace=meta["namespace"], name=meta["name"],
                        schema=ident, role=ident, deadline=self.ctx.settings.archive_deadline_seconds,
                    )
            except archive.ArchiveUnavailable as exc:
                raise StepFailed(str(exc)) from exc
            await archive_sql.record(
                conn, self.control, archive_id=made.id, tenant_id=tenant_id, namespace=meta["namespace"],
                name=meta["name"], schema=ident, path=str(made.path), sha256=made.sha256,
                size_bytes=made.size_bytes, retention=parse_duration(str(spec.archive_retention)),
            )
            return made

        try:
            made = await gate.run("archive", dump, detail=f"pg_dump of schema {ident}")
        except JobFailed as exc:
            raise ArchiveBlocked(exc.error) from exc
        return [("Normal", "Archived", f"archive {made.id} written and verified ({made.size_bytes} bytes, "
                 f"sha256 {made.sha256[:12]}); kept for {spec.archive_retention}")]


async def purge_expired_archives(ctx: OperatorContext, target: str) -> list[str]:
    """Delete archives past their retention (a ``purge`` job each, logged in the registry)."""
    control = ctx.settings.control_schema
    purged: list[str] = []
    async with ctx.targets.pool(target).connection() as conn:
        for row in await archive_sql.expired(conn, control):
            gate = JobGate(using(conn), control, row.tenant_id, generation=None, retry_token=None,
                           max_attempts=1_000_000)

            async def purge(row: archive_sql.ArchiveRow = row) -> None:
                await archive.purge(Path(row.path))
                await archive_sql.mark_purged(conn, control, row.id)

            try:
                await gate.run("purge", purge, detail=f"archive {row.id} past its retention")
                purged.append(row.id)
            except JobFailed:
                continue  # counted and logged in the ledger; tried again at the next sweep
    return purged


def _fold_first_provisioning_events(out: Outcome, ident: str) -> None:
    """A new tenant gets one Event that says everything, not one per step (each is an API write)."""
    if not any(reason == "Provisioned" for _, reason, _ in out.events):
        return
    applied = [message.removeprefix("applied ") for _, reason, message in out.events if reason == "MigrationApplied"]
    out.events = [e for e in out.events if e[1] not in ("Provisioned", "MigrationApplied")]
    message = f"schema and role {ident} ready" + (f"; migrations applied: {', '.join(applied)}" if applied else "")
    out.events.insert(0, ("Normal", "Provisioned", message))


@dataclass(frozen=True)
class KubeReads:
    """What a reconcile reads from Kubernetes, read before it takes a database connection."""

    secret: dict[str, Any] | None
    template: list[tm.Migration] | None
    """The migrations the Tenant's template declares (None: its ConfigMap does not exist)."""
    secret_read: bool = True
    """False: the Secret was not read (a new Tenant); ``secret`` says nothing."""


@dataclass(frozen=True)
class MigrationPlan:
    todo: list[tm.Migration]
    new_tenant: bool = False
    """Its registry row was inserted in this reconcile: the job ledger holds nothing of it yet."""


def _job_failed(out: Outcome, exc: JobFailed) -> None:
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


class ArchiveBlocked(Exception):
    """The archive could not be written: nothing is dropped, deletion waits."""


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"spec.{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid spec"))


def _spec_for_deletion(body: Mapping[str, Any]) -> TenantSpec:
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


def _latest(done: Mapping[str, str]) -> str | None:
    return max(done) if done else None


def _secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def _rotation_of(secret: Mapping[str, Any]) -> str:
    return str((secret["metadata"].get("annotations") or {}).get(SECRET_ROTATION_ANNOTATION, ""))


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])
