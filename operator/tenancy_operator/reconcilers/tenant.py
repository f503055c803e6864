"""Tenant reconcile: compare the declared Tenant with Postgres and Kubernetes, do only what is missing.

The core (this module: observe, provision, converge, finish) with its parts by concern:
tenant_credentials.py (logins, Secrets, rotation), tenant_lifecycle.py (migrations, restore,
archive, deletion), tenant_base.py (the outcome, names, pure helpers).

Level-based and idempotent: every step first looks at the real state (catalog, registry, Secret,
the tenant's migration records, the job ledger) and acts only on a difference. Our own status is
never an input. Long or risky steps run as lifecycle jobs (reconcilers/lifecycle.py); repairs of
out-of-band drift are done directly and counted.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from pydantic import ValidationError

from tenancy_operator.api.durations import parse_duration
from tenancy_operator.api.names import (
    ACK_SCHEMA_RECREATED_ANNOTATION,
    ROTATE_ANNOTATION,
)
from tenancy_operator.api.tenant import TenantSpec, placement_violations, tenant_identifier
from tenancy_operator.conditions import reported
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import logins, registry, role_sql
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.managed_fields import last_change
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, Retry, database_retry
from tenancy_operator.reconcilers.lifecycle import JobFailed, using
from tenancy_operator.reconcilers.tenant_base import (
    KubeReads,
    MigrationPlan,
    Outcome,
    OwnershipConflict,
    SecretClaim,
    enum_value,
    first_error,
    first_login_set,
    iso_ts,
    job_failed,
    latest_version,
    owned_by,
    rolled_back,
    rollout_cap,
    rotation_of,
    secret_name,
    utcnow,
)
from tenancy_operator.reconcilers.tenant_move import MoveSteps


class TenantReconciler(MoveSteps):


    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        try:
            spec = TenantSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:  # stored before a bound the CRD has now
            return Outcome(False, "InvalidSpec", first_error(exc), "Failed", stalled=True)
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
        if spec.placement is not None:
            refused = placement_violations(spec.placement.required_labels,
                                           self.ctx.settings.target_labels.get(spec.database, {}))
            if refused:
                return Outcome(
                    False, "PlacementViolation",
                    f"database target {spec.database!r} does not carry the required label(s) {', '.join(refused)} "
                    "(TENANCY_DATABASE_TARGET_LABELS); nothing of this tenant is placed or changed there",
                    "Failed", stalled=True,
                )
        uid = str(body["metadata"].get("uid") or "")
        try:
            elsewhere = await self._located_elsewhere(body, spec, ident)
            if elsewhere is not None:
                not_moved = await self._move(body, spec, ident, *elsewhere)
                if not_moved is not None:
                    return not_moved
        except DATABASE_ERRORS as exc:
            raise database_retry(exc, "a database of the move") from exc
        # Kubernetes reads first, so that the pooled connection below is not held while they wait
        # on the API server (with a busy API server, held connections would limit the throughput).
        reads = await self._read_kubernetes(body, spec)
        try:
            await self.ctx.ensure_control_schema(spec.database)
            # Three phases, so that no pool connection is held while a tenant migration runs over
            # the tenant's own login: slow migrations cannot starve every other tenant of the pool.
            async with self.ctx.targets.connection(spec.database) as conn, sqlt.tenant_lock(conn, ident):
                out, row, plan = await self._reconcile_in(conn, body, spec, ident, reads)
            if row is None:
                return out
            if plan is not None:
                await self._run_migrations(spec.database, body, ident, row, plan, out)
            async with self.ctx.targets.connection(spec.database) as conn, sqlt.tenant_lock(conn, ident):
                await self._finish(conn, body, spec, ident, row, out)
            out.last_move = self.take_move(uid)
            if out.last_move is not None:
                record = out.last_move
                out.events.append(("Normal", "Moved", (
                    f"moved from {record['source']!r} to {record['destination']!r}: writes stopped for "
                    f"{record['writeDowntimeSeconds']} s, {record['tables']} tables and {record['rows']} rows "
                    "verified; "
                    f"the copy on {record['source']!r} is dropped after {record['sourceDroppedAfter']}")))
            return out
        except DATABASE_ERRORS as exc:
            raise database_retry(exc, f"database {spec.database!r}") from exc
        except sqlt.TenantBusy as exc:
            raise Retry("Conflict", f"another session holds tenant {ident}'s lock on {spec.database!r} "
                                    "(a replica handing its slices over); retrying") from exc

    async def _read_kubernetes(self, body: Mapping[str, Any], spec: TenantSpec) -> KubeReads:
        meta = body["metadata"]
        # A Tenant the operator never reported on is almost always new: its provisioning creates
        # the Secret without reading it first (an existing one answers 409 and is read then).
        secret_read = reported(body)
        secret = await self._read_secret(meta["namespace"], secret_name(meta["name"])) if secret_read else None
        if not spec.schema_template:
            return KubeReads(secret, tm.default_migrations(), secret_read)
        cm = await self.templates.get(meta["namespace"], spec.schema_template)
        rollout = await self.rollouts.get(meta["namespace"], spec.schema_template)
        cap, because = rollout_cap(rollout, body, spec.schema_template)
        data = (cm or {}).get("data") or {}
        return KubeReads(secret, None if cm is None else tm.migrations_from_data(data), secret_read,
                         cap=cap, held_because=because, rollback=rolled_back(rollout),
                         down=tm.down_migrations_from_data(data))

    async def _reconcile_in(
        self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str, reads: KubeReads,
    ) -> tuple[Outcome, registry.RegistryRow | None, MigrationPlan | None]:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
        suspended = enum_value(spec.state) == "Suspended"
        out = Outcome(True, "Suspended" if suspended else "Provisioned", "", "Suspended" if suspended else "Active")

        row = await registry.find_live_row(conn, self.control, ident)
        new_row = False
        if row is None:
            try:
                row = await registry.insert_row(
                    conn, self.control, namespace=namespace, name=name, uid=uid, ident=ident,
                    tier=enum_value(spec.tier), display_name=spec.display_name, secret_claim=secrets.token_hex(16),
                )
                new_row = True
            except psycopg.errors.UniqueViolation:
                row = await registry.find_live_row(conn, self.control, ident)
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
            job_failed(out, exc)
        return out, row, plan

    async def _finish(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                      row: registry.RegistryRow, out: Outcome) -> None:
        meta = body["metadata"]
        uid = meta.get("uid", "")
        suspended = enum_value(spec.state) == "Suspended"
        if out.applied is None:  # not read in this reconcile yet (or a migration ran since)
            out.applied = await tm.applied(conn, self.control, row.id)
        out.schema_version = latest_version(out.applied)
        recreated_at = row.schema_recreated_at
        # Pipeline mode: the writes go with the ledger read in one round trip.
        async with conn.pipeline():
            if out.ready:
                await registry.update_row(
                    conn, self.control, row.id, uid=uid, tier=enum_value(spec.tier), display_name=spec.display_name,
                    state="suspended" if suspended else "active", provisioned=True,
                    schema_recreated=out.schema_recreated,
                )
            ack = (meta.get("annotations") or {}).get(ACK_SCHEMA_RECREATED_ANNOTATION)
            if recreated_at is not None and not out.schema_recreated and ack and ack != row.schema_recreated_ack:
                await registry.acknowledge_schema_recreated(conn, self.control, row.id, ack)
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
                        row: registry.RegistryRow, out: Outcome, reads: KubeReads, *,
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
            if spec.credentials.read_only_login:  # Ready means every login the spec asks for works
                suspended = enum_value(spec.state) == "Suspended"
                try:
                    await self._read_only_secret(conn, body, spec, ident, row, suspended)
                except OwnershipConflict as exc:
                    out.fail("Conflict", str(exc), stalled=True)
                    return None
                await role_sql.run_batch(conn, [role_sql.login_statement(
                    logins.login_role(ident, logins.READ_ONLY_SLOT), not suspended)])
            del password
            return await self._plan_migrations(conn, body, spec, ident, row, out, reads, new_tenant=new_row)

        statements = self._catalog_statements(ident, obs, out, marker, drift=True)
        if out.schema_recreated:  # forgotten first: a crash after the re-creation must not skip them
            await tm.forget(conn, self.control, row.id)
            out.applied = {}
        await role_sql.run_batch(conn, statements)
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


    async def _provision(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                         row: registry.RegistryRow, obs: sqlt.Observed, out: Outcome, claim: SecretClaim,
                         marker: str) -> str:
        """A tenant's first provisioning: what is missing of role, schema, grants, password and
        login in one round trip (one transaction), and its Secret. Returns the password."""
        meta = body["metadata"]
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        statements = self._catalog_statements(ident, obs, out, marker, drift=False)
        password = claim.password
        lobs = await logins.observe_logins(conn, ident)
        user = logins.login_role(ident, "a")
        login = lobs.get("a")
        can_login = enum_value(spec.state) != "Suspended"
        again = first_login_set(row, meta.get("uid", ""), login, claim)
        # What is in place already stays as it is: this runs again after an attempt cut off.
        await role_sql.run_batch(conn, [
            *statements,
            *([role_sql.login_statement(ident, False)] if obs.can_login else []),
            *self._login_statements(ident, spec, lobs, marker, out, drift=False),
            *([] if again else [await role_sql.password_statement(user, password, self._iterations)]),
            *([] if login is not None and login.exists and login.can_login == can_login
              else [role_sql.login_statement(user, can_login)])])
        if again:
            now = row.rotated_at
        else:
            now = utcnow()
            await registry.set_credentials(conn, self.control, row.id, login_slot="a", retiring_role=None,
                                           retire_at=None, rotated_at=now)
        every = spec.credentials.rotate_every
        out.credentials = {"user": user, "lastRotatedAt": iso_ts(now),
                           "nextRotationAt": iso_ts(now + parse_duration(str(every))) if every else None}
        metrics.credentials_rotated(meta["namespace"], meta["name"], now)
        current = claim.current
        if current is None:
            return password
        desired = self._secret_body(body, spec, ident, password, rotation, user=user)
        if desired["data"] != current.get("data") or not owned_by(current, meta["uid"]) \
                or rotation_of(current) != rotation:
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
            todo.append(role_sql.mark_role(ident, marker))
        idle = self.ctx.settings.tenant_idle_in_transaction_timeout
        if not obs.role_exists or obs.idle_timeout != idle:
            todo.append(role_sql.set_idle_timeout(ident, idle))
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
            todo += role_sql.membership_statements(ident, as_role)
        elif obs.operator_member:  # standing, from an earlier version or an interrupted archive
            todo.append(role_sql.revoke_role_from_operator(ident))
        if obs.search_path not in (ident, f'"{ident}"'):
            todo.append(role_sql.set_search_path(ident, ident))
            if obs.role_exists and drift:
                out.repairs.append("search-path")
        return todo

    # --- credentials -------------------------------------------------------------------------


    # --- restore ---------------------------------------------------------------------------


    # --- migrations ------------------------------------------------------------------------


    # --- deletion ----------------------------------------------------------------------------


def _fold_first_provisioning_events(out: Outcome, ident: str) -> None:
    """A new tenant gets one Event that says everything, not one per step (each is an API write)."""
    if not any(reason == "Provisioned" for _, reason, _ in out.events):
        return
    applied = [message.removeprefix("applied ") for _, reason, message in out.events if reason == "MigrationApplied"]
    out.events = [e for e in out.events if e[1] not in ("Provisioned", "MigrationApplied")]
    message = f"schema and role {ident} ready" + (f"; migrations applied: {', '.join(applied)}" if applied else "")
    out.events.insert(0, ("Normal", "Provisioned", message))


