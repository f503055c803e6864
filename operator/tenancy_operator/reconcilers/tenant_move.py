"""Moving a tenant to another database target: what follows a change of spec.database.

The registry is the truth of where a tenant is: a live, provisioned row of this very Tenant (its
uid) on a target other than spec.database means a move is due. The move, in order:

1. Refusals that change nothing: the destination holds a schema or role of that name that is not
   this Tenant's (placement is checked before, in reconcile).
2. The cut: every login of the tenant on the source off, its sessions ended. Writes stop here.
3. An archive of the source (a TenantArchive: the move's backup), and a fingerprint of every table
   (rows and checksum), both over a login with the tenant's rights only.
4. On the destination: registry row, roles, schema and grants, a new login (off), the archive
   restored into the schema as the tenant, the migration records mirrored.
5. Verification: the destination's fingerprints must equal the source's.
6. The switch: the Secret names the destination (new host, login, password), the destination's
   login on, the source's row kept as `moved` until spec.moveGracePeriod is over (the sweep drops it).

Steps 3 to 6 are one `move` job of the source's ledger. A failure before the switch undoes the
destination (only what this Tenant owns there) and turns the source's login back on: the tenant
serves from the source as before, with Ready=False MoveFailed saying what failed. The job ledger's
retries, stall and retry annotation apply as to any job.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import psycopg

from tenancy_operator import archive
from tenancy_operator.api.durations import parse_duration
from tenancy_operator.api.names import ROTATE_ANNOTATION
from tenancy_operator.api.tenant import TenantSpec
from tenancy_operator.db import archives as archive_sql
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import logins, registry, role_sql
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.fingerprints import differences, fingerprints
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.managed_fields import last_change
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS
from tenancy_operator.reconcilers.lifecycle import JobFailed, JobGate, using
from tenancy_operator.reconcilers.tenant_base import (
    ArchiveBlocked,
    Outcome,
    enum_value,
    iso_ts,
    secret_name,
    utcnow,
)
from tenancy_operator.reconcilers.tenant_credentials import CredentialSteps
from tenancy_operator.reconcilers.tenant_lifecycle import LifecycleSteps
from tenancy_operator.runtime_context import OperatorContext

log = get_logger(__name__)


class MoveMismatch(Exception):
    """The destination's tables differ from the source's after the restore."""


class MoveSteps(CredentialSteps, LifecycleSteps):
    def __init__(self, ctx: OperatorContext) -> None:
        super().__init__(ctx)
        self._placed: dict[str, str] = {}
        """uid -> the target a Tenant was found at (its spec.database then): no move to look for
        while spec.database stays that."""
        self._moved: dict[str, dict[str, Any]] = {}
        """Moves done in this process, by uid, for the status of the reconcile that did them."""

    def _catalog_statements(self, ident: str, obs: sqlt.Observed, out: Outcome, marker: str, *,
                            drift: bool) -> list[Any]:
        raise NotImplementedError  # the core's (reconcilers/tenant.py)

    async def _located_elsewhere(self, body: Mapping[str, Any], spec: TenantSpec,
                                 ident: str) -> tuple[str, registry.RegistryRow] | None:
        """The target that holds this Tenant's data if it is not spec.database (a move is due)."""
        uid = str(body["metadata"].get("uid") or "")
        if self._placed.get(uid) == spec.database or len(self.ctx.targets.pools) < 2:
            return None
        unknown = False
        for target in self.ctx.targets.pools:
            if target == spec.database:
                continue
            try:
                await self.ctx.ensure_control_schema(target)
                async with self.ctx.targets.connection(target) as conn:
                    row = await registry.find_live_row(conn, self.control, ident)
            except DATABASE_ERRORS:
                unknown = True  # that target is down: look again next time
                continue
            if row is not None and row.k8s_uid == uid and row.provisioned_at is not None \
                    and row.state in ("active", "suspended"):
                return target, row
        if not unknown:
            self._placed[uid] = spec.database
        return None

    async def _move(self, body: Mapping[str, Any], spec: TenantSpec, ident: str, source: str,
                    src: registry.RegistryRow) -> Outcome | None:
        """Move the tenant from ``source`` to spec.database. None when it is there now (the
        reconcile goes on there); an Outcome to report otherwise."""
        meta = body["metadata"]
        dest = spec.database
        await self.ctx.ensure_control_schema(dest)
        uid = str(meta.get("uid") or "")
        async with self.ctx.targets.connection(dest) as dconn:
            there = await registry.find_live_row(dconn, self.control, ident)
        if there is not None and there.k8s_uid == uid and there.provisioned_at is not None:
            # Switched already (the operator stopped before it marked the source): finish that.
            async with self.ctx.targets.connection(source) as sconn:
                await registry.mark_moved(sconn, self.control, src.id,
                                          utcnow() + parse_duration(str(spec.move_grace_period)))
            self._placed[uid] = dest
            return None
        refused = await self._clear_destination(body, spec, ident, source)
        if refused is not None:
            return refused
        src_spec = spec.model_copy(update={"database": source})
        started = utcnow()
        async with self.ctx.targets.connection(source) as sconn:
            gate = self._gate(using(sconn), body, src.id)
            # The cut: no writes on the source from here on.
            for role in [ident, *await logins.existing_logins(sconn, ident)]:
                await role_sql.set_login(sconn, role, False)
            await sqlt.terminate_all_sessions(sconn, ident)
            archived = await self._move_archive(sconn, gate, body, src_spec, ident, src, dest)
            if isinstance(archived, Outcome):
                await self._serve_from_source(sconn, spec, ident, src)
                return archived

            async def move() -> dict[str, Any]:
                return await self._build(body, spec, ident, source, src, archived, started)

            try:
                record = await gate.run("move", move, detail=f"{source} -> {dest} from archive {archived.id}")
            except JobFailed as exc:
                await self._serve_from_source(sconn, spec, ident, src)
                return self._failed(source, dest, exc.error, stalled=exc.stalled)
            await registry.mark_moved(sconn, self.control, src.id, datetime.datetime.fromisoformat(
                str(record["sourceDroppedAfter"]).replace("Z", "+00:00")))
        self._placed[str(meta.get("uid") or "")] = dest
        self._moved[str(meta.get("uid") or "")] = record
        log.info("tenant moved", namespace=meta["namespace"], name=meta["name"], source=source, destination=dest,
                 downtime=record["writeDowntimeSeconds"])
        return None

    def forget_placement(self, uid: str) -> None:
        """A Tenant gone: nothing of it to remember."""
        self._placed.pop(uid, None)
        self._moved.pop(uid, None)

    def take_move(self, uid: str) -> dict[str, Any] | None:
        return self._moved.pop(uid, None)

    async def _move_archive(self, conn: Conn, gate: JobGate, body: Mapping[str, Any], src_spec: TenantSpec,
                            ident: str, src: registry.RegistryRow, dest: str) -> archive_sql.ArchiveRow | Outcome:
        """The archive the move restores: the one taken at an earlier attempt (writes have been off
        since), else a new one."""
        meta = body["metadata"]
        taken = await registry.move_archive(conn, self.control, src.id)
        if taken is not None:
            found = await archive_sql.find(conn, self.control, meta["namespace"], meta["name"], taken)
            if found is not None:
                return found
        try:
            await self._archive(conn, gate, body, src_spec, ident, src.id, compression=archive.FAST_COMPRESSION)
        except ArchiveBlocked as exc:
            return self._failed(src_spec.database, dest, f"the archive of the source failed: {exc}", stalled=False)
        found = await archive_sql.find(conn, self.control, meta["namespace"], meta["name"], "latest")
        assert found is not None  # just recorded
        await registry.set_move_archive(conn, self.control, src.id, found.id)
        return found

    async def _clear_destination(self, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                                 source: str) -> Outcome | None:
        """The destination must hold nothing of that name but what this Tenant left there (a copy
        from an earlier move away, or an attempt that failed): that is dropped; anything else refuses."""
        meta = body["metadata"]
        marker = sqlt.owner_marker(self._dbname(spec), meta["namespace"], meta["name"])
        async with self.ctx.targets.connection(spec.database) as conn:
            row = await registry.find_live_row(conn, self.control, ident)
            if row is not None and (row.namespace, row.name) != (meta["namespace"], meta["name"]):
                return self._failed(source, spec.database, f"database {spec.database!r} holds schema {ident} of tenant "
                                    f"{row.namespace}/{row.name}", stalled=True, reason="MoveRefused")
            obs = (await sqlt.observe(conn, [ident]))[ident]
            if (obs.role_exists and obs.owner_marker != marker) or (obs.schema_exists and not obs.role_exists):
                return self._failed(source, spec.database, f"database {spec.database!r} holds a schema or role {ident} "
                                    "the operator did not create for this Tenant; drop or rename it",
                                    stalled=True, reason="MoveRefused")
            if row is not None or obs.role_exists:
                await sqlt.drop_tenant_objects(conn, ident, ident, role_too=obs.role_exists)
                if row is not None:
                    await registry.mark_deleted(conn, self.control, row.id, "dropped")
        return None

    async def _build(self, body: Mapping[str, Any], spec: TenantSpec, ident: str, source: str,
                     src: registry.RegistryRow, archived: archive_sql.ArchiveRow,
                     started: datetime.datetime) -> dict[str, Any]:
        """Steps 3 to 6 (module docstring); a failure before the switch leaves nothing on the destination."""
        meta = body["metadata"]
        dest = spec.database
        settings = self.ctx.settings
        async with self.ctx.targets.connection(source) as sconn:
            before = await self._fingerprints(sconn, source, ident)
        async with self.ctx.targets.connection(dest) as dconn:
            row = await registry.insert_row(
                dconn, self.control, namespace=meta["namespace"], name=meta["name"], uid=str(meta.get("uid") or ""),
                ident=ident, tier=enum_value(spec.tier), display_name=spec.display_name,
                secret_claim=src.secret_claim)
            try:
                user, password = await self._provision_destination(dconn, body, spec, ident, row)
                async with sqlt.delegate_login(dconn, ident, self._iterations) as (duser, dpassword):
                    login = {**self.ctx.targets.conninfo(dest), "user": duser, "password": dpassword}
                    await archive.restore_schema(
                        login, server_version=dconn.info.server_version,
                        store=self.ctx.store_at(archived.path, archived.target), location=archived.path,
                        sha256=archived.sha256, schema=ident, role=ident, workdir=settings.archive_dir,
                        deadline=settings.archive_deadline_seconds)
                    records = await tm.read_records(
                        psycopg.conninfo.make_conninfo(**login), ident,
                        connect_timeout=settings.db_connect_timeout_seconds,
                        deadline=settings.migration_deadline_seconds)
                await tm.mirror(dconn, self.control, row.id, records)
                after = await self._fingerprints(dconn, dest, ident)
                diff = differences(before, after)
                if diff:
                    raise MoveMismatch("verification failed: " + "; ".join(diff[:5]))
                await self._switch_secret(body, spec, ident, user, password, src)
            except BaseException:
                await sqlt.drop_tenant_objects(dconn, ident, ident)
                await registry.mark_deleted(dconn, self.control, row.id, "dropped")
                raise
            suspended = enum_value(spec.state) == "Suspended"
            await role_sql.set_login(dconn, user, not suspended)
            await registry.update_row(dconn, self.control, row.id, uid=str(meta.get("uid") or ""),
                                      tier=enum_value(spec.tier), display_name=spec.display_name,
                                      state="suspended" if suspended else "active", provisioned=True)
            finished = utcnow()
            drop_after = finished + parse_duration(str(spec.move_grace_period))
            record = {
                "source": source, "destination": dest, "startedAt": iso_ts(started), "finishedAt": iso_ts(finished),
                "writeDowntimeSeconds": round((finished - started).total_seconds(), 3),
                "tables": len(after), "rows": sum(n for n, _ in after.values()), "archive": archived.id,
                "sourceDroppedAfter": iso_ts(drop_after),
            }
            # The restore is done: a spec.restoreFrom the Tenant still carries must not look for its
            # archive in this target's catalog (the archive of the move is the source's).
            await ledger.record(dconn, self.control, row.id, "restore", detail=f"from archive {archived.id} (a move)")
            # The move in the destination's ledger too (status.recentJobs there), with its downtime.
            await ledger.record(
                dconn, self.control, row.id, "move", requested_by=last_change(meta, ("f:spec", "f:database"))[0],
                detail=f"from {source!r}: writes stopped {record['writeDowntimeSeconds']} s, {record['tables']} "
                       f"tables and {record['rows']} rows verified, archive {archived.id}")
        return record

    async def _provision_destination(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                                     row: registry.RegistryRow) -> tuple[str, str]:
        """Role, schema, grants and the first login (off until the switch): (login, password)."""
        meta = body["metadata"]
        marker = sqlt.owner_marker(self._dbname(spec), meta["namespace"], meta["name"])
        scratch = Outcome(True, "", "", "Provisioning")
        obs = (await sqlt.observe(conn, [ident]))[ident]
        lobs = await logins.observe_logins(conn, ident)
        user, password = logins.login_role(ident, "a"), role_sql.generate_password()
        await role_sql.run_batch(conn, [
            *self._catalog_statements(ident, obs, scratch, marker, drift=False), role_sql.login_statement(ident, False),
            *self._login_statements(ident, spec, lobs, marker, scratch, drift=False),
            await role_sql.password_statement(user, password, self._iterations), role_sql.login_statement(user, False)])
        await registry.set_credentials(conn, self.control, row.id, login_slot="a", retiring_role=None, retire_at=None,
                                       rotated_at=utcnow())
        return user, password

    async def _switch_secret(self, body: Mapping[str, Any], spec: TenantSpec, ident: str, user: str, password: str,
                             src: registry.RegistryRow) -> None:
        meta = body["metadata"]
        current = await self._read_secret(meta["namespace"], secret_name(meta["name"]))
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        desired = self._secret_body(body, spec, ident, password, rotation, claim=src.secret_claim, user=user)
        if current is None:
            await self._write_secret(meta["namespace"], desired, replace=False)
            return
        desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await self._write_secret(meta["namespace"], desired, replace=True)

    async def _fingerprints(self, conn: Conn, target: str, ident: str) -> dict[str, tuple[int, str]]:
        settings = self.ctx.settings
        async with sqlt.delegate_login(conn, ident, self._iterations) as (user, password):
            dsn = psycopg.conninfo.make_conninfo(**{**self.ctx.targets.conninfo(target), "user": user,
                                                    "password": password})
            return await fingerprints(dsn, ident, connect_timeout=settings.db_connect_timeout_seconds,
                                      deadline=settings.archive_deadline_seconds)

    async def _serve_from_source(self, conn: Conn, spec: TenantSpec, ident: str, src: registry.RegistryRow) -> None:
        """A move that did not happen: the source's logins as they were (the Secret still names them).
        Writes resume, so a later attempt takes a new archive."""
        await registry.set_move_archive(conn, self.control, src.id, None)
        if enum_value(spec.state) == "Suspended":
            return
        for slot in (src.login_slot or "a", *((logins.READ_ONLY_SLOT,) if spec.credentials.read_only_login else ())):
            role = logins.login_role(ident, slot)
            if role in await logins.existing_logins(conn, ident):
                await role_sql.set_login(conn, role, True)

    @staticmethod
    def _failed(source: str, dest: str, message: str, *, stalled: bool,
                reason: str = "MoveFailed") -> Outcome:
        where = f"; the tenant serves from {source!r} as before"
        todo = ("fix the cause, then annotate tenancy.dev/retry, or set spec.database back"
                if stalled else "retrying")
        out = Outcome(False, reason, f"move to {dest!r} failed: {message}{where} ({todo})", "Failed",
                      stalled=stalled, retry=not stalled)
        out.database = source
        out.events.append(("Warning", reason, out.message))
        return out



async def drop_moved_copies(ctx: OperatorContext, target: str) -> list[str]:
    """Drop the copies moves left on ``target`` whose grace period is over (a ``delete`` job each
    in their registry row's ledger): their schema, roles and logins, the operator's for that tenant."""
    control = ctx.settings.control_schema
    dropped: list[str] = []
    async with ctx.targets.connection(target) as conn:
        for row in await registry.moved_due(conn, control):
            gate = JobGate(using(conn), control, row.id, generation=None, retry_token=None, max_attempts=1_000_000)
            ident = row.schema_name
            obs = (await sqlt.observe(conn, [ident]))[ident]
            ours = obs.role_exists and (obs.owner_marker or "").startswith(
                f"{sqlt.MARKER_PREFIX}{row.namespace}/{row.name} in database ")
            async def drop(ident: str = ident, ours: bool = ours) -> None:
                await sqlt.drop_tenant_objects(conn, ident, ident, role_too=ours)

            try:
                await gate.run("delete", drop, detail=f"the copy of {ident} a move left here")
            except JobFailed:
                continue
            await registry.mark_deleted(conn, control, row.id, "dropped")
            dropped.append(f"{row.namespace}/{row.name}")
    return dropped
