"""Tenant reconcile: compare the declared Tenant with Postgres and Kubernetes, do only what is missing.

Level-based and idempotent: every step first looks at the real state (catalog, registry, Secret,
the tenant's migration records) and acts only on a difference. Our own status is never an input.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
from kubernetes_asyncio.client.exceptions import ApiException

from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import Conn, UnknownTarget
from tenancy_operator.observability import metrics
from tenancy_operator.runtime_context import OperatorContext

ROTATE_ANNOTATION = "tenancy.dev/rotate-credentials"
ACK_SCHEMA_RECREATED_ANNOTATION = "tenancy.dev/acknowledge-schema-recreated"
SECRET_ROTATION_ANNOTATION = "tenancy.dev/rotated-for"  # noqa: S105 - an annotation key
MANAGED_BY = {"app.kubernetes.io/managed-by": "tenancy-operator"}
TENANT_LABEL = "tenancy.dev/tenant"


class Retry(Exception):
    """Transient: the handler retries with backoff; ``reason`` is a bounded metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Outcome:
    """What one reconcile found and did; the handler turns it into status, Events and metrics."""

    ready: bool
    reason: str
    message: str
    phase: str
    stalled: bool = False
    tenant_id: str | None = None
    schema_version: str | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    repairs: list[str] = field(default_factory=list)
    schema_recreated: bool = False
    # The schema was found dropped and re-created empty, now or earlier and not yet acknowledged.
    data_loss: bool = False


def secret_name(tenant_name: str) -> str:
    return f"{tenant_name}-db"


def _enum(v: Any) -> str:
    return str(getattr(v, "value", v))


class TenantReconciler:
    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        spec = TenantSpec.model_validate(body.get("spec") or {})
        try:
            ident = tenant_identifier(body["metadata"]["name"])
        except ValueError as exc:
            return Outcome(False, "InvalidSpec", str(exc), "Failed", stalled=True)
        try:
            pool = self.ctx.targets.pool(spec.database)
        except UnknownTarget:
            known = ", ".join(sorted(self.ctx.targets.pools)) or "none"
            return Outcome(
                False, "UnknownDatabase",
                f"database target {spec.database!r} is not configured (known: {known})", "Failed", stalled=True,
            )
        try:
            await self.ctx.ensure_control_schema(spec.database)
            async with pool.connection() as conn:
                return await self._reconcile_in(conn, body, spec, ident)
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise Retry("DatabaseUnavailable", f"database {spec.database!r} unavailable: {type(exc).__name__}") from exc

    async def _reconcile_in(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str) -> Outcome:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
        suspended = _enum(spec.state) == "Suspended"
        out = Outcome(True, "Suspended" if suspended else "Provisioned", "", "Suspended" if suspended else "Active")

        row = await sqlt.find_live_row(conn, self.control, ident)
        if row is None:
            try:
                row = await sqlt.insert_row(
                    conn, self.control, namespace=namespace, name=name, uid=uid, ident=ident,
                    tier=_enum(spec.tier), display_name=spec.display_name,
                )
            except psycopg.errors.UniqueViolation:
                row = await sqlt.find_live_row(conn, self.control, ident)
                assert row is not None
        if (row.namespace, row.name) != (namespace, name):
            return Outcome(
                False, "Conflict",
                f"schema {ident} already belongs to tenant {row.namespace}/{row.name} on database "
                f"{spec.database!r}; rename this Tenant or use another database target",
                "Failed", stalled=True,
            )
        out.tenant_id = row.id
        was_provisioned = row.provisioned_at is not None
        revived = row.state == "deleted"

        obs = (await sqlt.observe(conn, [ident]))[ident]
        if not obs.role_exists:
            await sqlt.create_role(conn, ident)
            out.repairs.append("role") if was_provisioned else None
        if not obs.operator_member:
            await sqlt.grant_role_to_operator(conn, ident)
            out.repairs.append("membership") if was_provisioned and obs.role_exists else None
        if not obs.schema_exists:
            await sqlt.create_schema(conn, ident, ident)
            if was_provisioned:
                out.repairs.append("schema")
                out.schema_recreated = True
        elif not obs.schema_owned:
            await sqlt.set_schema_owner(conn, ident, ident)
            out.repairs.append("schema-owner")
        if obs.role_exists and obs.schema_exists and not obs.schema_privileges:
            await sqlt.grant_schema(conn, ident, ident)
            out.repairs.append("grants")
        if obs.search_path != ident and obs.search_path != f'"{ident}"':
            await sqlt.set_search_path(conn, ident, ident)
            if obs.role_exists and was_provisioned:
                out.repairs.append("search-path")

        password, rotated = await self._ensure_secret(conn, body, spec, ident, role_created=not obs.role_exists)
        if rotated == "rotated":
            out.events.append(("Normal", "CredentialsRotated", "new password set; old sessions ended"))
        elif rotated == "recreated" and was_provisioned and not revived:
            out.repairs.append("secret")

        want_login = not suspended
        if obs.can_login != want_login or not obs.role_exists:
            await sqlt.set_login(conn, ident, want_login)
            if not want_login:
                ended = await sqlt.terminate_sessions(conn, ident)
                if row.state != "suspended":
                    out.events.append(("Normal", "Suspended", f"login disabled, {ended} session(s) ended"))
                elif was_provisioned:
                    out.repairs.append("login")
            elif row.state == "suspended":
                out.events.append(("Normal", "Resumed", "login enabled"))
            elif revived:
                out.events.append(("Normal", "Restored", "tenant re-applied; retained data is back"))

        version = await self._migrate(conn, body, spec, ident, row.id, password, out)
        out.schema_version = version
        recreated_at = row.schema_recreated_at
        ack = (meta.get("annotations") or {}).get(ACK_SCHEMA_RECREATED_ANNOTATION)
        if recreated_at is not None and not out.schema_recreated and ack and ack != row.schema_recreated_ack:
            await sqlt.acknowledge_schema_recreated(conn, self.control, row.id, ack)
            recreated_at = None
        out.data_loss = out.schema_recreated or recreated_at is not None
        if out.ready:
            await sqlt.update_row(
                conn, self.control, row.id, uid=uid, tier=_enum(spec.tier), display_name=spec.display_name,
                state="suspended" if suspended else "active", provisioned=True,
                schema_recreated=out.schema_recreated,
            )
        if not was_provisioned and out.ready:
            out.events.append(("Normal", "Provisioned", f"schema and role {ident} ready"))
        for what in out.repairs:
            metrics.DRIFT_REPAIRS.labels(kind="Tenant", object=what).inc()
        if out.repairs:
            out.events.append(("Warning" if out.schema_recreated else "Normal", "DriftRepaired",
                               "repaired out-of-band changes: " + ", ".join(out.repairs)))
        if out.schema_recreated:
            out.events.append(("Warning", "SchemaRecreated",
                               f"schema {ident} was dropped outside the operator and was re-created EMPTY: "
                               "its data is gone; restore from a backup"))
        return out

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
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, *, role_created: bool
    ) -> tuple[str, str]:
        """Returns (password, what happened: "", "rotated" or "recreated")."""
        meta = body["metadata"]
        namespace = meta["namespace"]
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        kube = self.ctx.kube
        try:
            current = await kube.get_secret(namespace, secret_name(meta["name"]))
        except ApiException as exc:
            raise Retry("KubernetesAPI", f"reading Secret failed: {exc.status}") from exc
        if current is not None:
            data = {k: base64.b64decode(v).decode() for k, v in (current.get("data") or {}).items()}
            had = (current["metadata"].get("annotations") or {}).get(SECRET_ROTATION_ANNOTATION, "")
            password = data.get("password", "")
            if had == rotation and password:
                if role_created:  # a role dropped out of band comes back with the password apps use
                    await sqlt.set_password(conn, ident, password)
                desired = self._secret_body(body, spec, ident, password, rotation)
                if desired["data"] != current.get("data") or not _owned_by(current, meta["uid"]):
                    desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    await kube.replace_secret(namespace, desired["metadata"]["name"], desired)
                return password, ""
        # No Secret (first time, deleted out of band, or re-applied) or a rotation was asked for.
        password = sqlt.generate_password()
        await sqlt.set_password(conn, ident, password)
        desired = self._secret_body(body, spec, ident, password, rotation)
        if current is None:
            try:
                await kube.create_secret(namespace, desired)
            except ApiException as exc:
                raise Retry("KubernetesAPI", f"creating Secret failed: {exc.status}") from exc
            return password, "recreated"
        desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await kube.replace_secret(namespace, desired["metadata"]["name"], desired)
        await sqlt.terminate_sessions(conn, ident)
        return password, "rotated"

    # --- migrations --------------------------------------------------------------------------

    async def _migrate(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, tenant_id: str,
        password: str, out: Outcome,
    ) -> str | None:
        wanted = await self._template(body, spec, out)
        if wanted is None:
            return None
        done = await tm.applied(conn, ident)
        try:
            todo = tm.pending(wanted, done)
        except tm.ChecksumMismatch as exc:
            out.ready, out.reason, out.message, out.phase, out.stalled = (
                False, "MigrationChecksumMismatch", str(exc), "Failed", True)
            return _latest(done)
        if todo:
            if _enum(spec.state) == "Suspended":
                out.message = f"{len(todo)} migration(s) wait until the tenant is Active again"
                return _latest(done)
            info = self.ctx.targets.conninfo(spec.database)
            dsn = psycopg.conninfo.make_conninfo(
                self.ctx.targets.dsns[spec.database], user=ident, password=password,
                host=info.get("host"), port=info.get("port"),
            )
            try:
                try:
                    applied = await self._apply(dsn, ident, todo)
                except psycopg.OperationalError as exc:
                    if "authentication failed" not in str(exc):
                        raise
                    # The role's password was changed behind our back: the Secret is the truth.
                    await sqlt.set_password(conn, ident, password)
                    out.repairs.append("password")
                    applied = await self._apply(dsn, ident, todo)
            except tm.MigrationFailed as exc:
                out.ready, out.reason, out.message, out.phase, out.stalled = (
                    False, "MigrationFailed", str(exc), "Failed", True)
                return _latest(await tm.applied(conn, ident))
            await tm.mirror(conn, self.control, tenant_id, ident)
            for v in applied:
                out.events.append(("Normal", "MigrationApplied", f"applied {v}"))
            done = await tm.applied(conn, ident)
        return _latest(done)

    async def _apply(self, dsn: str, ident: str, todo: list[tm.Migration]) -> list[str]:
        return await tm.apply_as_tenant(
            dsn, ident, todo, lock_timeout=self.ctx.settings.migration_lock_timeout,
            statement_timeout=self.ctx.settings.migration_statement_timeout,
            connect_timeout=self.ctx.settings.db_connect_timeout_seconds,
        )

    async def _template(self, body: Mapping[str, Any], spec: TenantSpec, out: Outcome) -> list[tm.Migration] | None:
        if not spec.schema_template:
            return tm.default_migrations()
        namespace = body["metadata"]["namespace"]
        try:
            cm = await self.ctx.kube.get_configmap(namespace, spec.schema_template)
        except ApiException as exc:
            raise Retry("KubernetesAPI", f"reading ConfigMap failed: {exc.status}") from exc
        if cm is None:
            out.ready, out.reason, out.phase, out.stalled = False, "TemplateNotFound", "Failed", True
            out.message = f"schema template ConfigMap {namespace}/{spec.schema_template} not found"
            return None
        return tm.migrations_from_data(cm.get("data") or {})

    # --- deletion ----------------------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """Apply the deletion policy. Safe to repeat; never touches another tenant's data."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = TenantSpec.model_validate(body.get("spec") or {})
        events: list[tuple[str, str, str]] = []
        try:
            ident = tenant_identifier(name)
            pool = self.ctx.targets.pool(spec.database)
        except (ValueError, UnknownTarget):
            return events  # nothing was ever provisioned for it
        policy = _enum(spec.deletion_policy)
        try:
            await self.ctx.ensure_control_schema(spec.database)
            async with pool.connection() as conn:
                row = await sqlt.find_live_row(conn, self.control, ident)
                if row is not None and (row.namespace, row.name) == (namespace, name):
                    if policy == "Delete":
                        await sqlt.terminate_sessions(conn, ident)
                        await sqlt.drop_tenant_objects(conn, ident, ident)
                        await sqlt.mark_deleted(conn, self.control, row.id, "dropped")
                        events.append(("Normal", "Dropped", f"schema and role {ident} dropped"))
                    else:
                        obs = (await sqlt.observe(conn, [ident]))[ident]
                        if obs.role_exists:
                            await sqlt.set_login(conn, ident, False)
                            await sqlt.terminate_sessions(conn, ident)
                        await sqlt.mark_deleted(conn, self.control, row.id, "deleted")
                        note = "" if policy == "Retain" else " (Archive is not implemented yet: data retained)"
                        events.append(("Normal", "Retained",
                                       f"schema {ident} kept, login disabled; re-apply the Tenant to restore{note}"))
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise Retry("DatabaseUnavailable", f"database {spec.database!r} unavailable: {type(exc).__name__}") from exc
        try:
            await self.ctx.kube.delete_secret(namespace, secret_name(name))
        except ApiException as exc:
            raise Retry("KubernetesAPI", f"deleting Secret failed: {exc.status}") from exc
        return events


def _latest(done: Mapping[str, str]) -> str | None:
    return max(done) if done else None


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])
