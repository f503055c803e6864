"""Tenant credentials: the login roles, the Secrets that name them, rotation with a grace period
and the read-only login; a Secret is never taken over from anyone else (reconcilers/tenant.py
calls these steps)."""

from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Mapping
from typing import Any

from psycopg import sql

from tenancy_operator import GROUP, VERSION
from tenancy_operator.api.durations import parse_duration
from tenancy_operator.api.names import (
    MANAGED_BY,
    OPERATOR,
    ROTATE_ANNOTATION,
    SECRET_CLAIM_ANNOTATION,
    SECRET_ROTATION_ANNOTATION,
    TENANT_LABEL,
)
from tenancy_operator.api.tenant import TenantSpec
from tenancy_operator.db import logins, registry, role_sql
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.targets import Conn
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.k8s.managed_fields import annotation_path, last_change
from tenancy_operator.observability import metrics
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.lifecycle import JobGate
from tenancy_operator.reconcilers.tenant_base import (
    KubeReads,
    Outcome,
    OwnershipConflict,
    SecretClaim,
    TenantSteps,
    connection_keys,
    enum_value,
    iso_ts,
    owned_by,
    readonly_secret_name,
    rotation_of,
    secret_data,
    secret_name,
    utcnow,
)


class CredentialSteps(TenantSteps):
    async def _claim_secret(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                            row: registry.RegistryRow, reads: KubeReads) -> SecretClaim:
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
            password = role_sql.generate_password()
            uid = await self._create_secret(meta["namespace"], self._secret_body(
                body, spec, ident, password, rotation, claim=claim, user=logins.login_role(ident, "a")))
            if uid is not None:
                await registry.set_secret_uid(conn, self.control, row.id, uid)
                return SecretClaim(password, None)
            current = await self._read_secret(meta["namespace"], secret_name(meta["name"]))
            if current is None:
                raise Retry("KubernetesAPI", "the Secret was deleted while it was created; trying again")
        await self._check_secret(conn, current, row, meta)
        password = ""
        if rotation_of(current) == rotation:
            password = secret_data(current).get("password", "")  # apps already use it: keep it
        return SecretClaim(password or role_sql.generate_password(), current)

    def _login_statements(self, ident: str, spec: TenantSpec, lobs: Mapping[str, logins.LoginObserved], marker: str,
                          out: Outcome, *, drift: bool) -> list[sql.Composable]:
        """Login roles that are missing, their marks and search_path, and their grants (data
        privileges only, also through the owner's default privileges) where they are not whole."""
        idle = self.ctx.settings.tenant_idle_in_transaction_timeout
        todo: list[sql.Composable] = []
        grants: list[sql.Composable] = []
        created = False
        for slot, lo in lobs.items():
            if slot == logins.READ_ONLY_SLOT and not spec.credentials.read_only_login and not lo.exists:
                continue
            role = logins.login_role(ident, slot)
            want_marker = logins.login_marker(marker, slot)
            if not lo.exists:
                todo += logins.create_login(role, want_marker, ident, idle)
                created = True
                if drift and slot in logins.SLOTS and any(x.exists for x in lobs.values()):
                    out.repairs.append("login-role")
            else:
                if lo.marker != want_marker:
                    todo.append(role_sql.mark_role(role, want_marker))
                if lo.search_path not in (ident, f'"{ident}"'):
                    todo.append(role_sql.set_search_path(role, ident))
            if not lo.exists or not lo.grants_ok:
                grants += logins.grant_statements(ident, ident, role, read_only=slot == logins.READ_ONLY_SLOT)
                if lo.exists and drift:
                    out.repairs.append("login-grants")
        if created and not lobs["a"].exists:
            grants.append(logins.private_functions(ident))
        return todo + role_sql.membership_statements(ident, grants)

    async def _credentials(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                           row: registry.RegistryRow, current: dict[str, Any] | None, out: Outcome, gate: JobGate,
                           marker: str, *, revived: bool) -> None:
        """Login roles, their grants, the Secret, role-swap rotation, retirement and login states."""
        meta = body["metadata"]
        suspended = enum_value(spec.state) == "Suspended"
        rotation = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION, "")
        lobs = await logins.observe_logins(conn, ident)
        await role_sql.run_batch(conn, self._login_statements(ident, spec, lobs, marker, out, drift=True))
        created = [logins.login_role(ident, s) for s, lo in lobs.items() if not lo.exists
                   and (s != logins.READ_ONLY_SLOT or spec.credentials.read_only_login)]
        if created:
            await logins.copy_limits(conn, ident, created)
        now = utcnow()
        grace = parse_duration(str(spec.credentials.grace_period))
        slot, retiring, retire_at, rotated = row.login_slot, row.retiring_role, row.retire_at, row.rotated_at

        if retiring and retire_at is not None and retire_at <= now:
            await role_sql.set_login(conn, retiring, False)
            if retiring == ident:
                await conn.execute(sql.SQL("ALTER ROLE {} PASSWORD NULL").format(sql.Identifier(ident)))
            ended = await sqlt.terminate_sessions(conn, retiring)
            out.events.append(("Normal", "CredentialsRetired",
                               f"previous login {retiring} retired after the grace period, {ended} session(s) ended"))
            retiring, retire_at = None, None
            await registry.set_credentials(conn, self.control, row.id, login_slot=slot, retiring_role=None,
                                           retire_at=None, rotated_at=rotated)

        async def rotate(reason: str, previous: str | None) -> None:
            nonlocal slot, retiring, retire_at, rotated
            new_slot = "a" if slot is None else ("b" if slot == "a" else "a")
            user = logins.login_role(ident, new_slot)
            password = role_sql.generate_password()
            await role_sql.run_batch(conn, [await role_sql.password_statement(user, password, self._iterations),
                                            role_sql.login_statement(user, not suspended)])
            desired = self._secret_body(body, spec, ident, password, rotation, user=user)
            if current is not None:
                desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self._write_secret(meta["namespace"], desired, replace=True)
            else:
                fresh = await self._claimed(conn, row)
                desired["metadata"]["annotations"][SECRET_CLAIM_ANNOTATION] = str(fresh.secret_claim)
                uid = await self._write_secret(meta["namespace"], desired, replace=False)
                await registry.set_secret_uid(conn, self.control, row.id, uid)
            slot, rotated = new_slot, now
            retiring, retire_at = (previous, now + grace) if previous else (None, None)
            await registry.set_credentials(conn, self.control, row.id, login_slot=slot, retiring_role=retiring,
                                           retire_at=retire_at, rotated_at=rotated)
            metrics.CREDENTIAL_ROTATIONS.inc()
            if previous:
                out.events.append(("Normal", "CredentialsRotated",
                                   f"{reason}: the Secret names login {user} now; {previous} keeps working until "
                                   f"{iso_ts(retire_at)}"))

        if current is None:
            # No Secret (first time, deleted out of band, or re-applied): a new login for the
            # application at once; the old one has nothing that names it any more.
            await rotate("Secret re-created", None)
            if not revived:
                out.repairs.append("secret")
        else:
            await self._check_secret(conn, current, row, meta)
            data = secret_data(current)
            every = spec.credentials.rotate_every
            due = (rotation_of(current) != rotation and "on demand") \
                or (slot is None and "conversion to separate owner and login roles") \
                or (every and rotated is not None and rotated + parse_duration(str(every)) <= now and "scheduled") \
                or (slot is not None and data.get("user") != logins.login_role(ident, slot) and "Secret out of date")
            if due == "Secret out of date" and retiring and data.get("user") == retiring:
                # A read from before this rotation's write (a watch cache behind): the registry
                # says the Secret already names the new login; rotating again would renew the
                # login the application is moving to. The next reconcile reads the new Secret.
                pass
            elif due and retiring and slot is not None and due != "Secret out of date":
                out.message = (f"rotation waits until {retiring} is retired at "
                               f"{retire_at.isoformat(timespec='seconds') if retire_at else '?'}")
            elif due:
                previous = ident if slot is None else logins.login_role(ident, slot)
                await gate.run("rotate", lambda: rotate(str(due), previous), detail=str(due),
                               requested=last_change(meta, annotation_path(ROTATE_ANNOTATION))
                               if due == "on demand" else (OPERATOR, None))
            else:
                assert slot is not None
                user, password = logins.login_role(ident, slot), data.get("password", "")
                if user in created:  # dropped out of band: back with the password the application uses
                    await role_sql.set_password(conn, user, password, self._iterations)
                desired = self._secret_body(body, spec, ident, password, rotation, user=user)
                if desired["data"] != current.get("data") or not owned_by(current, meta["uid"]):
                    desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    await self._write_secret(meta["namespace"], desired, replace=True)
        await self._read_only_secret(conn, body, spec, ident, row, suspended)

        # Login states: the current login (and the previous one in its grace period) and the
        # read-only login may log in unless the tenant is suspended; nothing else may.
        want = logins.wanted_logins(ident, slot=slot, retiring=retiring, suspended=suspended,
                                    read_only=spec.credentials.read_only_login)
        lobs = await logins.observe_logins(conn, ident)
        owner_obs = (await sqlt.observe(conn, [ident]))[ident]
        have = {ident: owner_obs.can_login,
                **{logins.login_role(ident, s): lo.can_login for s, lo in lobs.items() if lo.exists}}
        wrong = {r: w for r, w in want.items() if r in have and have[r] != w}
        if suspended and row.state != "suspended" and (wrong or any(have.values())):
            async def suspend() -> int:
                await role_sql.run_batch(conn, [role_sql.login_statement(r, False) for r in have])
                return await sqlt.terminate_all_sessions(conn, ident)
            ended = await gate.run("suspend", suspend, requested=last_change(meta, ("f:spec", "f:state")))
            out.events.append(("Normal", "Suspended", f"every login disabled, {ended} session(s) ended"))
        elif not suspended and row.state in ("suspended", "deleted") and wrong:
            resume = [role_sql.login_statement(r, w) for r, w in wrong.items()]
            await gate.run("resume", lambda: role_sql.run_batch(conn, resume),
                           detail="re-applied after deletion" if revived else None,
                           requested=last_change(meta, ("f:spec",) if revived else ("f:spec", "f:state")))
            out.events.append(("Normal", "Restored", "tenant re-applied; retained data is back") if revived
                              else ("Normal", "Resumed", "login enabled"))
        elif wrong:
            await role_sql.run_batch(conn, [role_sql.login_statement(r, w) for r, w in wrong.items()])
            disabled = [r for r, w in wrong.items() if not w]
            for r in disabled:
                await sqlt.terminate_sessions(conn, r)
            out.repairs.append("login")
        every = spec.credentials.rotate_every
        out.credentials = {
            "user": logins.login_role(ident, slot) if slot else ident,
            "lastRotatedAt": iso_ts(rotated),
            "nextRotationAt": iso_ts(rotated + parse_duration(str(every))) if every and rotated else None,
            "retiringUser": retiring,
            "retiringAt": iso_ts(retire_at),
        }
        metrics.credentials_rotated(meta["namespace"], meta["name"], rotated)

    async def _read_only_secret(self, conn: Conn, body: Mapping[str, Any], spec: TenantSpec, ident: str,
                                row: registry.RegistryRow, suspended: bool) -> None:
        """``<tenant>-db-readonly`` for the read-only login when the spec asks for one; ours only
        by its recorded uid or claim (as the main Secret)."""
        meta = body["metadata"]
        name = readonly_secret_name(meta["name"])
        current = await self._read_secret(meta["namespace"], name)
        ours = current is not None and (
            (row.ro_secret_uid is not None and current["metadata"].get("uid") == row.ro_secret_uid)
            or (bool(row.ro_secret_claim) and (current["metadata"].get("annotations") or {}).get(
                SECRET_CLAIM_ANNOTATION) == row.ro_secret_claim))
        user = logins.login_role(ident, logins.READ_ONLY_SLOT)
        if not spec.credentials.read_only_login:
            if current is not None and ours:
                try:
                    await self.ctx.kube.delete_secret(meta["namespace"], name, uid=current["metadata"]["uid"])
                except ApiError as exc:
                    raise Retry("KubernetesAPI", f"deleting Secret failed: {exc.status}") from exc
                await registry.set_ro_secret(conn, self.control, row.id, uid=None, claim=None)
            return
        if current is not None and not ours:
            raise OwnershipConflict(
                f"Secret {meta['namespace']}/{name} exists and was not created by the operator for this Tenant; "
                "delete or rename it, and the operator creates its own")
        if current is not None:
            password = secret_data(current).get("password", "")
            desired = self._secret_body(body, spec, ident, password, "", user=user, name=name)
            if desired["data"] != current.get("data"):
                desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self._write_secret(meta["namespace"], desired, replace=True)
            if current["metadata"].get("uid") != row.ro_secret_uid:
                await registry.set_ro_secret(conn, self.control, row.id, uid=current["metadata"]["uid"], claim=None)
            return
        claim = secrets.token_hex(16)
        await registry.set_ro_secret(conn, self.control, row.id, uid=None, claim=claim)
        password = role_sql.generate_password()
        await role_sql.set_password(conn, user, password, self._iterations)
        uid = await self._write_secret(meta["namespace"], self._secret_body(
            body, spec, ident, password, "", claim=claim, user=user, name=name), replace=False)
        await registry.set_ro_secret(conn, self.control, row.id, uid=uid, claim=None)

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
                    "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": "Tenant",
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

    async def _claimed(self, conn: Conn, row: registry.RegistryRow) -> registry.RegistryRow:
        """The registry row with a claim for the Secret about to be created, committed before the
        Secret exists: an operator stopped after creating it, before its uid was recorded,
        recognises it by the claim in its annotations. Nobody else's Secret can carry it."""
        if row.secret_claim:
            return row
        claim = secrets.token_hex(16)
        await registry.set_secret_claim(conn, self.control, row.id, claim)
        return dataclasses.replace(row, secret_claim=claim)

    async def _check_secret(self, conn: Conn, current: Mapping[str, Any], row: registry.RegistryRow,
                            meta: Mapping[str, Any]) -> None:
        """The Secret is the one the operator created for this Tenant (the uid it recorded, or the
        claim of one created just before a stop), or, for a tenant provisioned by an earlier
        version that recorded neither, owned by this Tenant. Its uid is recorded."""
        uid = current["metadata"].get("uid")
        claim = (current["metadata"].get("annotations") or {}).get(SECRET_CLAIM_ANNOTATION)
        ours = (row.secret_uid is not None and uid == row.secret_uid) \
            or (bool(row.secret_claim) and claim == row.secret_claim) \
            or (row.secret_uid is None and not row.secret_claim and row.provisioned_at is not None
                and owned_by(current, meta["uid"]))
        if not ours:
            raise OwnershipConflict(
                f"Secret {meta['namespace']}/{current['metadata']['name']} exists and was not created by the operator "
                "for this Tenant; it is left as it is: delete or rename it, and the operator creates its own")
        if uid != row.secret_uid or row.secret_claim:
            await registry.set_secret_uid(conn, self.control, row.id, str(uid))

