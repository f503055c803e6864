"""Tenant lifecycle steps: migrations over the tenant's own login, restore, archive and the
deletion policy (reconcilers/tenant.py calls these steps)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from typing import Any

import psycopg

from tenancy_operator import archive
from tenancy_operator.api.durations import parse_duration
from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.archive_store import StoreError
from tenancy_operator.db import archives as archive_sql
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import logins, registry, role_sql
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.k8s.managed_fields import last_change
from tenancy_operator.reconcilers import archive_catalog as catalog
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, Retry, database_retry
from tenancy_operator.reconcilers.lifecycle import JobFailed, JobGate, using
from tenancy_operator.reconcilers.tenant_base import (
    ArchiveBlocked,
    KubeReads,
    MigrationPlan,
    Outcome,
    StepFailed,
    TenantSteps,
    enum_value,
    job_failed,
    latest_version,
    owned_by,
    secret_name,
    spec_for_deletion,
)


class LifecycleSteps(TenantSteps):
    async def _restore(self, conn: Conn, gate: JobGate, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                       row: registry.RegistryRow, out: Outcome) -> None:
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
                store = self.ctx.store_at(found.path, found.target)
                async with sqlt.delegate_login(conn, ident, self._iterations) as (user, password):
                    login = {**self.ctx.targets.conninfo(spec.database), "user": user, "password": password}
                    await archive.restore_schema(
                        login, server_version=conn.info.server_version, store=store, location=found.path,
                        sha256=found.sha256, schema=ident, role=ident, workdir=settings.archive_dir,
                        deadline=settings.archive_deadline_seconds,
                    )
                    # The archive brought the tenant's migration records along: read with its rights.
                    return await tm.read_records(
                        psycopg.conninfo.make_conninfo(**login), ident,
                        connect_timeout=settings.db_connect_timeout_seconds,
                        deadline=settings.migration_deadline_seconds,
                    )
            except (archive.ArchiveCorrupt, archive.ArchiveUnavailable, StoreError) as exc:
                raise StepFailed(str(exc)) from exc

        records = await gate.run("restore", restore, detail=f"from archive {found.id}",
                                 requested=last_change(body["metadata"], ("f:spec", "f:restoreFrom")))
        await tm.forget(conn, self.control, row.id)
        await tm.mirror(conn, self.control, row.id, records)
        out.applied = None
        out.events.append(("Normal", "Restored", f"restored from archive {found.id} (checksum verified)"))

    async def _plan_migrations(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, row: registry.RegistryRow,
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
        out.schema_version = latest_version(done)
        if reads.cap is not None and reads.rollback:
            past = sorted((v for v in done if v > reads.cap), reverse=True)
            missing = [v for v in past if v not in reads.down]
            if missing:
                out.fail("MigrationFailed", f"rollback to {reads.cap}: the template has no down migration "
                                            f"{missing[0]}.down.sql", stalled=True)
                return None
            if past:
                out.message = (f"{len(past)} migration(s) from {past[-1]} reverted and held (rolled back): "
                               f"{reads.held_because}")
                return MigrationPlan([reads.down[v] for v in past], new_tenant, revert=True)
        if reads.cap is not None:
            held = [m.version for m in todo if m.version > reads.cap]
            todo = [m for m in todo if m.version <= reads.cap]
            if held:
                out.message = f"{len(held)} migration(s) from {held[0]} held: {reads.held_because}"
        if not todo:
            return None
        if enum_value(spec.state) == "Suspended":
            out.message = f"{len(todo)} migration(s) wait until the tenant is Active again"
            return None
        risky = next((m.version for m in todo if m.snapshot_before), None)
        return MigrationPlan(todo, new_tenant, snapshot=risky if not new_tenant else None)

    async def _run_migrations(self, target: str, body: Mapping[str, Any], ident: str, row: registry.RegistryRow,
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
                return await self._apply(target, dsn, ident, user, plan, records)
            finally:
                # What the schema now holds, also when a later migration failed: the operator's record.
                out.applied = None
                async with short() as conn:
                    if plan.revert:
                        await tm.unmirror(conn, self.control, row.id, records)
                    else:
                        await tm.mirror(conn, self.control, row.id, records)
                    await sqlt.drop_delegate_now(conn, user)

        if plan.snapshot is not None:  # an archive first, restorable like any (restoreFrom)
            try:
                async with short() as conn:
                    archived = await self._archive(conn, gate, body, TenantSpec.model_validate(body.get("spec") or {}),
                                                   ident, row.id)
            except ArchiveBlocked as exc:
                out.fail("SnapshotFailed", f"the snapshot before {plan.snapshot} could not be written ({exc}); the "
                                           "migration waits for it", stalled=False, retry=True)
                return
            out.events += [("Normal", "Snapshot", f"before {plan.snapshot} (marked snapshot-before): {message}")
                           for _, _, message in archived]
        try:
            async with self.ctx.migration_slots.hold(body["metadata"]["namespace"]):
                applied = await gate.run("migrate", migrate, detail=("revert " if plan.revert else "")
                                         + ", ".join(m.version for m in plan.todo))
        except JobFailed as exc:
            job_failed(out, exc)
            return
        for v in applied:
            out.events.append(("Normal", "MigrationReverted", f"reverted {v} (its down migration ran)")
                              if plan.revert else ("Normal", "MigrationApplied", f"applied {v}"))

    async def _apply(self, target: str, dsn: str, ident: str, user: str, plan: MigrationPlan,
                     records: dict[str, str]) -> list[str]:
        async def end_backend(pid: int) -> None:
            async with self.ctx.targets.connection(target) as conn:
                await sqlt.terminate_backend(conn, user, pid)

        return await tm.apply_as_tenant(
            dsn, ident, plan.todo, lock_timeout=self.ctx.settings.migration_lock_timeout,
            statement_timeout=self.ctx.settings.migration_statement_timeout,
            connect_timeout=self.ctx.settings.db_connect_timeout_seconds,
            deadline=self.ctx.settings.migration_deadline_seconds, end_backend=end_backend, records=records,
            role=ident, app_roles=logins.app_roles_setting(ident), revert=plan.revert,
        )

    async def finalize(self, body: Mapping[str, Any], *, same_uid: bool = False) -> list[tuple[str, str, str]]:
        """Apply the deletion policy. Safe to repeat; never touches another tenant's data.

        ``same_uid``: only if the registry row is still this object's (the Tenant is gone, and a
        new one of the same name may own the row by now)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = spec_for_deletion(body)
        events: list[tuple[str, str, str]] = []
        try:
            ident = tenant_identifier(name)
        except ValueError:
            return events  # nothing was ever provisioned for it
        if spec.database not in self.ctx.targets.pools:
            return events
        # Where the data is, which is not spec.database after a move that failed (or one not done
        # yet): the policy applies there, or the source would outlive its Tenant with logins on.
        held = await self._held_at(body, spec, ident)
        if held != spec.database:
            spec = spec.model_copy(update={"database": held})
        policy = enum_value(spec.deletion_policy)
        try:
            await self.ctx.ensure_control_schema(spec.database)
            async with self.ctx.targets.connection(spec.database) as conn, sqlt.tenant_lock(conn, ident):
                row = await registry.find_live_row(conn, self.control, ident)
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
                        for r in [ident, *await logins.existing_logins(conn, ident)]:
                            await role_sql.set_login(conn, r, False)
                        await sqlt.terminate_all_sessions(conn, ident)
                    if policy == "Archive" and role_ours and provisioned:
                        events += await self._archive(conn, gate, body, spec, ident, row.id)
                    if policy in ("Delete", "Archive"):
                        if role_ours or provisioned:  # else nothing of the operator's is there to drop
                            await gate.run(
                                "delete", lambda: sqlt.drop_tenant_objects(conn, ident, ident, role_too=role_ours),
                                detail=f"drop schema and role {ident}")
                            events.append(("Normal", "Dropped", f"schema and role {ident} dropped"))
                        await registry.mark_deleted(conn, self.control, row.id,
                                                    "archived" if policy == "Archive" else "dropped")
                    else:
                        await registry.mark_deleted(conn, self.control, row.id, "deleted")
                        events.append(("Normal", "Retained",
                                       f"schema {ident} kept, login disabled; re-apply the Tenant to restore"))
        except DATABASE_ERRORS as exc:
            raise database_retry(exc, f"database {spec.database!r}") from exc
        except sqlt.TenantBusy as exc:
            raise Retry("Conflict", f"another session holds tenant {ident}'s lock; retrying") from exc
        await self._delete_own_secret(meta, secret_uid)
        return events

    async def _held_at(self, body: Mapping[str, Any], spec: TenantSpec, ident: str) -> str:
        """The target holding this Tenant's live registry row: spec.database if it does, else the
        one status.database names, else any other configured target; spec.database if none does
        (or one that does cannot be asked: the deletion then retries rather than guessing)."""
        uid = str(body["metadata"].get("uid") or "")
        reported = str((body.get("status") or {}).get("database") or "")
        candidates = dict.fromkeys([spec.database, reported, *self.ctx.targets.pools])
        for target in (t for t in candidates if t in self.ctx.targets.pools):
            try:
                await self.ctx.ensure_control_schema(target)
                async with self.ctx.targets.connection(target) as conn:
                    row = await registry.find_live_row(conn, self.control, ident)
            except DATABASE_ERRORS as exc:
                raise database_retry(exc, f"database {target!r}") from exc
            if row is not None and row.k8s_uid == uid:
                return target
        return spec.database

    async def _delete_own_secret(self, meta: Mapping[str, Any], secret_uid: str | None) -> None:
        """The credentials Secret goes with the Tenant, if it is the one the operator created for it."""
        try:
            if secret_uid is None:  # recorded by no version before this one: ours if this Tenant owns it
                current = await self.ctx.kube.get_secret(meta["namespace"], secret_name(meta["name"]))
                if current is None or not owned_by(current, meta["uid"]):
                    return
                secret_uid = current["metadata"]["uid"]
            await self.ctx.kube.delete_secret(meta["namespace"], secret_name(meta["name"]), uid=secret_uid)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"deleting Secret failed: {exc.status}") from exc

    async def _archive(self, conn: Conn, gate: JobGate, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                       tenant_id: str, *, compression: int = archive.DEFAULT_COMPRESSION) -> list[tuple[str, str, str]]:
        meta = body["metadata"]
        retention = parse_duration(str(spec.archive_retention))

        async def dump() -> archive_sql.ArchiveRow:
            token = secrets.token_hex(16)
            expires_at = catalog.expiry(retention)
            description = {"tenant_id": tenant_id, "tenant_uid": meta.get("uid"), "target": spec.database,
                           "token": token, "expires_at": expires_at.isoformat()}
            try:
                store = self.ctx.archive_store(spec.database)
                async with sqlt.delegate_login(conn, ident, self._iterations) as (user, password):
                    made = await archive.dump_schema(
                        {**self.ctx.targets.conninfo(spec.database), "user": user, "password": password},
                        server_version=conn.info.server_version, store=store, namespace=meta["namespace"],
                        name=meta["name"], schema=ident, role=ident, description=description,
                        deadline=self.ctx.settings.archive_deadline_seconds, compression=compression,
                    )
            except (archive.ArchiveUnavailable, StoreError) as exc:
                raise StepFailed(str(exc)) from exc
            return await archive_sql.record(
                conn, self.control, archive_id=made.id, tenant_id=tenant_id, namespace=meta["namespace"],
                name=meta["name"], schema=ident, path=made.location, sha256=made.sha256,
                size_bytes=made.size_bytes, expires_at=expires_at, target=spec.database,
                tenant_uid=meta.get("uid"), token=token,
            )

        try:
            made = await gate.run("archive", dump, detail=f"pg_dump of schema {ident}")
        except JobFailed as exc:
            raise ArchiveBlocked(exc.error) from exc
        # Its TenantArchive; if the namespace is going, the catalog keeps the archive all the same.
        await catalog.publish(self.ctx, conn, made)
        return [("Normal", "Archived", f"archive {made.id} written to {made.path.rsplit('/', 1)[0]}/ and verified "
                 f"({made.size_bytes} bytes, sha256 {made.sha256[:12]}); kept for {spec.archive_retention}")]
