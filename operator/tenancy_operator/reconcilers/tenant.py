"""Tenant reconcile: compare the declared Tenant with Postgres and Kubernetes, do only what is missing.

Level-based and idempotent: every step first looks at the real state (catalog, registry, Secret,
the tenant's migration records, the job ledger) and acts only on a difference. Our own status is
never an input. Long or risky steps run as lifecycle jobs (reconcilers/lifecycle.py); repairs of
out-of-band drift are done directly and counted.
"""

from __future__ import annotations

import base64
import contextlib
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from kubernetes_asyncio.client.exceptions import ApiException
from psycopg import sql

from tenancy_operator import archive
from tenancy_operator.api.common import parse_duration
from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.conditions import reported
from tenancy_operator.db import archives as archive_sql
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.client import Kube, older_version
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.lifecycle import RETRY_ANNOTATION, Connector, JobFailed, JobGate, using
from tenancy_operator.runtime_context import OperatorContext

ROTATE_ANNOTATION = "tenancy.dev/rotate-credentials"
ACK_SCHEMA_RECREATED_ANNOTATION = "tenancy.dev/acknowledge-schema-recreated"
SECRET_ROTATION_ANNOTATION = "tenancy.dev/rotated-for"  # noqa: S105 - an annotation key
TEMPLATE_TTL = 30.0
MANAGED_BY = {"app.kubernetes.io/managed-by": "tenancy-operator"}
TENANT_LABEL = "tenancy.dev/tenant"
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
    applied: dict[str, str] | None = None
    """The tenant's migration records (version -> checksum) as last read in this reconcile."""

    def fail(self, reason: str, message: str, *, stalled: bool, retry: bool = False) -> None:
        self.ready, self.reason, self.message, self.phase = False, reason, message, "Failed"
        self.stalled, self.retry = stalled, retry


def secret_name(tenant_name: str) -> str:
    return f"{tenant_name}-db"


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
        except ApiException as exc:
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
        )

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        spec = TenantSpec.model_validate(body.get("spec") or {})
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
        # on the API server (with a busy API server the pool was what limited the throughput).
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
                    tier=_enum(spec.tier), display_name=spec.display_name,
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
            out.applied = await tm.applied(conn, ident)
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
        suspended = _enum(spec.state) == "Suspended"
        was_provisioned = row.provisioned_at is not None
        revived = row.state == "deleted"
        gate = self._gate(using(conn), body, row.id, new_tenant=new_row)
        obs = (await sqlt.observe(conn, [ident]))[ident]

        if not was_provisioned:
            password = await gate.run(
                "provision", lambda: self._provision(conn, body, spec, ident, obs, out, reads),
                detail=f"schema and role {ident}",
            )
            out.events.append(("Normal", "Provisioned", f"schema and role {ident} ready"))
            if not obs.schema_exists:
                out.applied = {}  # a schema created just now holds no migration records
            if spec.restore_from:
                await self._restore(conn, gate, body, spec, ident, row, out)
            if not out.ready:
                return None
            return await self._plan_migrations(conn, body, spec, ident, password, out, reads, new_tenant=new_row)

        await self._ensure_catalog(conn, ident, obs, out, drift=True)
        if spec.restore_from:
            await self._restore(conn, gate, body, spec, ident, row, out)
            if not out.ready:
                return None

        meta = body["metadata"]
        current = reads.secret if reads.secret_read else await self._read_secret(
            meta["namespace"], secret_name(meta["name"]))
        password, action = await self._ensure_secret(conn, body, spec, ident, current,
                                                     role_created=not obs.role_exists, gate=gate)
        if action == "rotated":
            out.events.append(("Normal", "CredentialsRotated", "new password set; old sessions ended"))
        elif action == "recreated" and not revived:
            out.repairs.append("secret")

        want_login = not suspended
        if obs.can_login != want_login:
            if not want_login and row.state != "suspended":
                ended = await gate.run("suspend", lambda: self._set_login(conn, ident, False))
                out.events.append(("Normal", "Suspended", f"login disabled, {ended} session(s) ended"))
            elif want_login and row.state in ("suspended", "deleted"):
                await gate.run("resume", lambda: self._set_login(conn, ident, True),
                               detail="re-applied after deletion" if revived else None)
                out.events.append(("Normal", "Restored", "tenant re-applied; retained data is back") if revived
                                  else ("Normal", "Resumed", "login enabled"))
            else:
                await self._set_login(conn, ident, want_login)
                out.repairs.append("login")

        return await self._plan_migrations(conn, body, spec, ident, password, out, reads)

    async def _provision(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                         obs: sqlt.Observed, out: Outcome, reads: KubeReads) -> str:
        """A tenant's first provisioning: what is missing of role, schema, grants, password and
        login in one round trip (one transaction), and its Secret. Returns the password."""
        meta = body["metadata"]
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        statements = self._catalog_statements(ident, obs, out, drift=False)

        async def provision(password: str) -> str:
            await sqlt.run_batch(conn, [*statements, await sqlt.password_statement(ident, password, self._iterations),
                                        sqlt.login_statement(ident, _enum(spec.state) != "Suspended")])
            return password

        current = reads.secret
        if not reads.secret_read:
            password = sqlt.generate_password()
            if await self._create_secret(meta["namespace"], self._secret_body(body, spec, ident, password, rotation)):
                return await provision(password)
            current = await self._read_secret(meta["namespace"], secret_name(meta["name"]))
        password = ""
        if current is not None and _rotation_of(current) == rotation:
            password = _secret_data(current).get("password", "")  # apps already use it: keep it
        password = await provision(password or sqlt.generate_password())
        desired = self._secret_body(body, spec, ident, password, rotation)
        if current is None:
            await self._write_secret(meta["namespace"], desired, replace=False)
        elif desired["data"] != current.get("data") or not _owned_by(current, meta["uid"]) \
                or _rotation_of(current) != rotation:
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self._write_secret(meta["namespace"], desired, replace=True)
        return password

    async def _set_login(self, conn: Conn, ident: str, login: bool) -> int:
        await sqlt.set_login(conn, ident, login)
        return 0 if login else await sqlt.terminate_sessions(conn, ident)

    async def _ensure_catalog(self, conn: Conn, ident: str, obs: sqlt.Observed, out: Outcome, *, drift: bool) -> None:
        await sqlt.run_batch(conn, self._catalog_statements(ident, obs, out, drift=drift))

    def _catalog_statements(self, ident: str, obs: sqlt.Observed, out: Outcome, *,
                            drift: bool) -> list[sql.Composable]:
        """Role, schema, owner, grants, search_path: what is missing, and the repairs that counts
        (when ``drift``: the tenant was provisioned before). The statements that take the role's
        rights run inside a membership granted and revoked in the same batch."""
        todo: list[sql.Composable] = []
        if not obs.role_exists:
            todo.append(sqlt.create_role(ident))
            out.repairs.append("role") if drift else None
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
        self, body: Mapping[str, Any], spec: TenantSpec, ident: str, password: str, rotation: str
    ) -> dict[str, Any]:
        meta = body["metadata"]
        info = self.ctx.targets.conninfo(spec.database)
        host = self.ctx.settings.secret_host_override or info.get("host") or "localhost"
        port = str(info.get("port") or "5432")
        dbname = info.get("dbname") or "postgres"
        uri = (
            f"postgresql://{urllib.parse.quote(ident)}:{urllib.parse.quote(password, safe='')}"
            f"@{host}:{port}/{urllib.parse.quote(dbname)}"
        )
        data = {"host": host, "port": port, "dbname": dbname, "user": ident, "password": password,
                "schema": ident, "uri": uri}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": secret_name(meta["name"]),
                "namespace": meta["namespace"],
                "labels": {**MANAGED_BY, TENANT_LABEL: meta["name"]},
                "annotations": {SECRET_ROTATION_ANNOTATION: rotation},
                "ownerReferences": [{
                    "apiVersion": body.get("apiVersion", "tenancy.dev/v1alpha1"), "kind": "Tenant",
                    "name": meta["name"], "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True,
                }],
            },
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    async def _ensure_secret(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, current: dict[str, Any] | None,
        *, role_created: bool, gate: JobGate | None = None,
    ) -> tuple[str, str]:
        """Returns (password, what happened: "", "rotated" or "recreated")."""
        meta = body["metadata"]
        namespace = meta["namespace"]
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        if current is not None:
            password = _secret_data(current).get("password", "")
            if _rotation_of(current) == rotation and password:
                if role_created:  # a role dropped out of band comes back with the password apps use
                    await sqlt.set_password(conn, ident, password, self._iterations)
                desired = self._secret_body(body, spec, ident, password, rotation)
                if desired["data"] != current.get("data") or not _owned_by(current, meta["uid"]):
                    desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    await self._write_secret(namespace, desired, replace=True)
                return password, ""
        # No Secret (first time, deleted out of band, or re-applied): a new password.
        if current is None:
            password = sqlt.generate_password()
            await sqlt.set_password(conn, ident, password, self._iterations)
            await self._write_secret(namespace, self._secret_body(body, spec, ident, password, rotation), replace=False)
            return password, "recreated"

        async def rotate() -> str:
            new = sqlt.generate_password()
            await sqlt.set_password(conn, ident, new, self._iterations)
            desired = self._secret_body(body, spec, ident, new, rotation)
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self._write_secret(namespace, desired, replace=True)
            await sqlt.terminate_sessions(conn, ident)
            return new

        if gate is None:
            return await rotate(), "rotated"
        return await gate.run("rotate", rotate, detail=f"{ROTATE_ANNOTATION}={rotation}"), "rotated"

    async def _read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.ctx.kube.get_secret(namespace, name)
        except ApiException as exc:
            raise Retry("KubernetesAPI", f"reading Secret failed: {exc.status}") from exc

    async def _create_secret(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create the Secret; False when one exists already."""
        try:
            await self.ctx.kube.create_secret(namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise Retry("KubernetesAPI", f"writing Secret failed: {exc.status}") from exc
        return True

    async def _write_secret(self, namespace: str, body: dict[str, Any], *, replace: bool) -> None:
        try:
            if replace:
                await self.ctx.kube.replace_secret(namespace, body["metadata"]["name"], body)
            else:
                await self.ctx.kube.create_secret(namespace, body)
        except ApiException as exc:
            raise Retry("KubernetesAPI", f"writing Secret failed: {exc.status}") from exc

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

        async def restore() -> None:
            try:
                async with sqlt.lent_membership(conn, ident):  # pg_restore --role
                    await archive.restore_schema(
                        self.ctx.targets.conninfo(spec.database), path=Path(found.path), sha256=found.sha256,
                        schema=ident, role=ident, workdir=self.ctx.settings.archive_dir,
                    )
            except (archive.ArchiveCorrupt, archive.ArchiveUnavailable) as exc:
                raise StepFailed(str(exc)) from exc

        await gate.run("restore", restore, detail=f"from archive {found.id}")
        await tm.mirror(conn, self.control, row.id, ident)
        out.events.append(("Normal", "Restored", f"restored from archive {found.id} (checksum verified)"))

    # --- migrations ------------------------------------------------------------------------

    async def _plan_migrations(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, password: str, out: Outcome,
        reads: KubeReads, *, new_tenant: bool = False,
    ) -> MigrationPlan | None:
        wanted = reads.template
        if wanted is None:
            namespace = body["metadata"]["namespace"]
            out.fail("TemplateNotFound", f"schema template ConfigMap {namespace}/{spec.schema_template} not found",
                     stalled=True)
            return None
        if out.applied is None:
            out.applied = await tm.applied(conn, ident)
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
        info = self.ctx.targets.conninfo(spec.database)
        dsn = psycopg.conninfo.make_conninfo(
            self.ctx.targets.dsns[spec.database], user=ident, password=password,
            host=info.get("host"), port=info.get("port"),
        )
        return MigrationPlan(todo, dsn, password, new_tenant)

    async def _run_migrations(self, target: str, body: Mapping[str, Any], ident: str, row: sqlt.RegistryRow,
                              plan: MigrationPlan, out: Outcome) -> None:
        """Apply pending migrations over the tenant's login; pool connections only for bookkeeping."""

        def short() -> contextlib.AbstractAsyncContextManager[Conn]:
            return self.ctx.targets.connection(target)

        gate = self._gate(short, body, row.id, new_tenant=plan.new_tenant)

        async def migrate() -> list[str]:
            records: dict[str, str] = {}
            ok = False
            try:
                try:
                    done = await self._apply(plan.dsn, ident, plan.todo, records)
                except psycopg.OperationalError as exc:
                    if "authentication failed" not in str(exc):
                        raise
                    # The role's password was changed behind our back: the Secret is the truth.
                    async with short() as conn:
                        await sqlt.set_password(conn, ident, plan.password, self._iterations)
                    out.repairs.append("password")
                    done = await self._apply(plan.dsn, ident, plan.todo, records)
                ok = True
                return done
            finally:
                # What the migrations left: read by the run itself when it succeeded, else here.
                out.applied = None
                async with short() as conn:
                    out.applied = await tm.mirror(conn, self.control, row.id, ident, records if ok else None)

        try:
            async with self.ctx.migration_slots:
                applied = await gate.run("migrate", migrate, detail=", ".join(m.version for m in plan.todo))
        except JobFailed as exc:
            _job_failed(out, exc)
            return
        for v in applied:
            out.events.append(("Normal", "MigrationApplied", f"applied {v}"))

    async def _apply(self, dsn: str, ident: str, todo: list[tm.Migration],
                     records: dict[str, str] | None = None) -> list[str]:
        return await tm.apply_as_tenant(
            dsn, ident, todo, lock_timeout=self.ctx.settings.migration_lock_timeout,
            statement_timeout=self.ctx.settings.migration_statement_timeout,
            connect_timeout=self.ctx.settings.db_connect_timeout_seconds, records=records,
        )

    # --- deletion ----------------------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any], *, same_uid: bool = False) -> list[tuple[str, str, str]]:
        """Apply the deletion policy. Safe to repeat; never touches another tenant's data.

        ``same_uid``: only if the registry row is still this object's (the Tenant is gone, and a
        new one of the same name may own the row by now)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = TenantSpec.model_validate(body.get("spec") or {})
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
                if row is not None and (row.namespace, row.name) == (namespace, name):
                    await ledger.abandon_running(conn, self.control, row.id)
                    # Deletion keeps trying on its own (until it can), so no stall here.
                    gate = self._gate(using(conn), body, row.id, max_attempts=1_000_000)
                    obs = (await sqlt.observe(conn, [ident]))[ident]
                    if obs.role_exists:
                        await sqlt.set_login(conn, ident, False)
                        await sqlt.terminate_sessions(conn, ident)
                    if policy == "Archive":
                        events += await self._archive(conn, gate, body, spec, ident, row.id)
                    if policy in ("Delete", "Archive"):
                        await gate.run("delete", lambda: sqlt.drop_tenant_objects(conn, ident, ident),
                                       detail=f"drop schema and role {ident}")
                        await sqlt.mark_deleted(conn, self.control, row.id,
                                                "archived" if policy == "Archive" else "dropped")
                        events.append(("Normal", "Dropped", f"schema and role {ident} dropped"))
                    else:
                        await sqlt.mark_deleted(conn, self.control, row.id, "deleted")
                        events.append(("Normal", "Retained",
                                       f"schema {ident} kept, login disabled; re-apply the Tenant to restore"))
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise Retry("DatabaseUnavailable", f"database {spec.database!r} unavailable: {type(exc).__name__}") from exc
        try:
            await self.ctx.kube.delete_secret(namespace, secret_name(name))
        except ApiException as exc:
            raise Retry("KubernetesAPI", f"deleting Secret failed: {exc.status}") from exc
        return events

    async def _archive(self, conn: Conn, gate: JobGate, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                       tenant_id: str) -> list[tuple[str, str, str]]:
        meta = body["metadata"]

        async def dump() -> archive.Archive:
            try:
                async with sqlt.lent_membership(conn, ident):  # pg_dump --role
                    made = await archive.dump_schema(
                        self.ctx.targets.conninfo(spec.database), directory=self.ctx.settings.archive_dir,
                        namespace=meta["namespace"], name=meta["name"], schema=ident, role=ident,
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
    dsn: str
    password: str
    new_tenant: bool = False
    """Its registry row was inserted in this reconcile: the job ledger holds nothing of it yet."""


def _job_failed(out: Outcome, exc: JobFailed) -> None:
    out.fail(JOB_REASONS[exc.kind], str(exc) if not exc.stalled else
             f"{exc.kind} failed {exc.attempt} time(s), not retrying on its own: {exc.error}. "
             f"Fix the cause, then annotate {RETRY_ANNOTATION}=<new value> to retry once.",
             stalled=exc.stalled, retry=not exc.stalled)


class ArchiveBlocked(Exception):
    """The archive could not be written: nothing is dropped, deletion waits."""


def _latest(done: Mapping[str, str]) -> str | None:
    return max(done) if done else None


def _secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def _rotation_of(secret: Mapping[str, Any]) -> str:
    return str((secret["metadata"].get("annotations") or {}).get(SECRET_ROTATION_ANNOTATION, ""))


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])
