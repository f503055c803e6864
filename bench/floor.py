"""The floor: what converging N tenants costs with no operator at all.

A minimal asyncio program that issues, for each Tenant the benchmark applies, the same writes the
operator makes on first provisioning, and nothing else: no reads to check the current state (it
knows everything is new), no Kopf bookkeeping (finalizer, annotations), no Events, no
intermediate status. Same concurrency as the operator's defaults: ``reconcile_concurrency`` objects at
once, a pool of ``pool_max_size`` connections, ``migration_concurrency`` tenant logins at once.

Per tenant (statements through the operator's own SQL helpers, so the text is identical):

- registry row (INSERT ... RETURNING), provision job row (INSERT), CREATE ROLE, GRANT role TO the
  operator, CREATE SCHEMA, ALTER ROLE search_path, ALTER ROLE PASSWORD, ALTER ROLE LOGIN, job
  finished (UPDATE);
- migrate job row (INSERT); the template's migration over a new connection logged in as the
  tenant (record table, BEGIN, set_config, lock row, migration, record row, COMMIT: the operator's
  ``apply_as_tenant``); job finished (UPDATE); migration mirror (INSERT); registry provisioned
  (UPDATE);
- Quota: ALTER ROLE CONNECTION LIMIT, ALTER ROLE SET statement_timeout, registry quotas (UPDATE);
- Kubernetes: the Secret (POST), one status PATCH for the Tenant, one for its Quota.

Per FeatureFlag: the operator's ``flags.replace`` (one transaction), the flagd ConfigMap (POST), one
status PATCH. Tenant and Quota objects are created by the same apply code as in the operator run.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bench.kube import Kube
from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.api.quota import QuotaSpec, limit_amount
from tenancy_operator.api.tenant import TenantSpec, tenant_identifier
from tenancy_operator.conditions import Cond, merge
from tenancy_operator.config import Settings
from tenancy_operator.db import flags as dbf
from tenancy_operator.db import jobs as ledger
from tenancy_operator.db import logins, registry, role_sql
from tenancy_operator.db import quota as dbq
from tenancy_operator.db import tenant_migrations as tm
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.db.control import migrate_control_schema
from tenancy_operator.flags.flagd import flagd_document
from tenancy_operator.flags.model import FlagDefinition
from tenancy_operator.handlers.featureflag import desired_status as flag_status
from tenancy_operator.handlers.tenant import desired_status as tenant_status
from tenancy_operator.reconcilers.featureflag import Outcome as FlagOutcome
from tenancy_operator.reconcilers.featureflag_policy import configmap_name
from tenancy_operator.reconcilers.quota_limits import effective_limits, registry_document
from tenancy_operator.reconcilers.tenant import TenantReconciler
from tenancy_operator.reconcilers.tenant_base import Outcome

Conn = psycopg.AsyncConnection[dict[str, Any]]


@dataclass
class FloorStats:
    tenants: int = 0
    quotas: int = 0
    flags: int = 0
    errors: list[str] = field(default_factory=list)


class Floor:
    def __init__(self, kube: Kube, operator_dsn: str, namespace: str, settings: Settings | None = None) -> None:
        self.kube = kube
        self.dsn = operator_dsn
        self.namespace = namespace
        self.settings = settings or Settings()
        self.control = self.settings.control_schema
        self.pool: AsyncConnectionPool[Conn] | None = None
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.quotas: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.migration_slots = asyncio.Semaphore(self.settings.migration_concurrency)
        self.template: list[tm.Migration] = []
        self.stats = FloorStats()
        self._secrets: Any = None

    async def setup(self, template_data: Mapping[str, str]) -> None:
        """Untimed, as the operator's start-up is: pool open, control schema migrated."""
        self.pool = AsyncConnectionPool(
            self.dsn, min_size=self.settings.pool_min_size, max_size=self.settings.pool_max_size, open=False,
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": "bench-floor"},
        )
        await self.pool.open(wait=True)
        async with self.pool.connection() as conn:
            await migrate_control_schema(conn, self.control)
        self.template = tm.migrations_from_data(dict(template_data))
        # Only to build the Secret body exactly as the operator does; no reconcile logic is used.
        self._secrets = TenantReconciler(_Ctx(self.settings, self.dsn))  # type: ignore[arg-type]

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def _quota_future(self, tenant: str) -> asyncio.Future[dict[str, Any]]:
        return self.quotas.setdefault(tenant, asyncio.get_running_loop().create_future())

    def on_created(self, obj: dict[str, Any]) -> None:
        """Called by the apply code for every object it created."""
        if obj["kind"] == "Quota":
            fut = self._quota_future(obj["spec"]["tenantRef"]["name"])
            if not fut.done():
                fut.set_result(obj)
        else:
            self.queue.put_nowait(obj)

    async def run(self, expected: int) -> None:
        """Process ``expected`` Tenant/FeatureFlag objects with ``reconcile_concurrency`` workers."""
        remaining = [expected]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                obj = await self.queue.get()
                try:
                    if obj["kind"] == "Tenant":
                        await self.tenant(obj)
                    else:
                        await self.flag(obj)
                except Exception as exc:  # counted and shown; the benchmark then waits in vain
                    self.stats.errors.append(f"{obj['metadata']['name']}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker() for _ in range(self.settings.reconcile_concurrency)))

    async def tenant(self, body: dict[str, Any]) -> None:
        assert self.pool is not None
        meta, spec = body["metadata"], TenantSpec.model_validate(body.get("spec") or {})
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        ident = tenant_identifier(name)
        tier = str(getattr(spec.tier, "value", spec.tier))
        password = role_sql.generate_password()
        async with self.pool.connection() as conn:
            row = await registry.insert_row(conn, self.control, namespace=ns, name=name, uid=uid, ident=ident,
                                            tier=tier, display_name=spec.display_name)
            gen = int(meta.get("generation") or 1)
            job = await ledger.start(conn, self.control, row.id, "provision", attempt=1, generation=gen,
                                     detail=f"schema and role {ident}")
            # The operator's provisioning statements, sent the way it sends them: one round trip.
            # The owner role never logs in (it is created NOLOGIN); the application logs in as login
            # role "a" (the second slot, "b", is created too, for rotations); see reconcilers/tenant.py
            # _provision.
            dbname = psycopg.conninfo.conninfo_to_dict(self.dsn).get("dbname") or "postgres"
            marker, idle = sqlt.owner_marker(str(dbname), ns, name), self.settings.tenant_idle_in_transaction_timeout
            user = logins.login_role(ident, "a")
            grants: list[Any] = []
            login_ddl: list[Any] = []
            for slot in logins.SLOTS:
                role = logins.login_role(ident, slot)
                login_ddl += logins.create_login(role, logins.login_marker(marker, slot), ident, idle)
                grants += logins.grant_statements(ident, ident, role, read_only=False)
            await role_sql.run_batch(conn, [
                *sqlt.create_role(ident, marker),
                role_sql.set_idle_timeout(ident, idle),
                *role_sql.membership_statements(ident, [sqlt.create_schema(ident, ident)]),
                role_sql.set_search_path(ident, ident),
                *login_ddl,
                *role_sql.membership_statements(ident, [*grants, logins.private_functions(ident)]),
                await role_sql.password_statement(user, password, self.settings.scram_iterations),
                role_sql.login_statement(user, True),
            ])
            await registry.set_credentials(conn, self.control, row.id, login_slot="a", retiring_role=None,
                                           retire_at=None, rotated_at=datetime.datetime.now(datetime.UTC))
            await self.kube.create(ns, self._secrets._secret_body(body, spec, ident, password, "", user=user))
            await ledger.finish(conn, self.control, job, ok=True)
            mjob = await ledger.start(conn, self.control, row.id, "migrate", attempt=1, generation=gen,
                                      detail=", ".join(m.version for m in self.template))
            # Migrations run over a temporary login that is a member of the owner, as the operator's do.
            delegate, delegate_password = await sqlt.create_delegate(conn, ident, self.settings.scram_iterations)
        dsn = psycopg.conninfo.make_conninfo(self.dsn, user=delegate, password=delegate_password)
        records: dict[str, str] = {}

        async def end_backend(pid: int) -> None:
            async with self.pool.connection() as conn:  # type: ignore[union-attr]
                await sqlt.terminate_backend(conn, delegate, pid)

        async with self.migration_slots:
            await tm.apply_as_tenant(dsn, ident, self.template, lock_timeout=self.settings.migration_lock_timeout,
                                     statement_timeout=self.settings.migration_statement_timeout,
                                     connect_timeout=self.settings.db_connect_timeout_seconds,
                                     deadline=self.settings.migration_deadline_seconds, end_backend=end_backend,
                                     records=records, role=ident, app_roles=logins.app_roles_setting(ident))
        async with self.pool.connection() as conn:
            await tm.mirror(conn, self.control, row.id, records)
            await sqlt.drop_delegate_now(conn, delegate)
            await ledger.finish(conn, self.control, mjob, ok=True)
            await registry.update_row(conn, self.control, row.id, uid=uid, tier=tier, display_name=spec.display_name,
                                      state="active", provisioned=True)
        # Its Quota (created by the apply right after the Tenant).
        quota = await self._quota_future(name)
        qspec = QuotaSpec.model_validate(quota["spec"])
        now = datetime.datetime.now(datetime.UTC)
        hard = effective_limits(self.settings.tier_limits[tier], qspec, now)
        async with self.pool.connection() as conn:
            # The owner's attributes are the record; its login roles get the same (as the Quota's apply).
            for role in [ident, *await logins.existing_logins(conn, ident)]:
                await dbq.set_connection_limit(conn, role, int(hard["connections"]))
                await dbq.set_statement_timeout(conn, role, limit_amount("statementTimeout", hard["statementTimeout"]))
            await dbq.publish(conn, self.control, row.id, registry_document(
                hard, enforcement="Warn", blocked=False, active={}, quota=quota["metadata"]["name"]))
        jobs = [ledger.Job(mjob, "migrate", "succeeded", 1, gen, None, None, None, None, now, now),
                ledger.Job(job, "provision", "succeeded", 1, gen, None, None, None, None, now, now)]
        out = Outcome(True, "Provisioned", "", "Active", tenant_id=row.id,
                      schema_version=max(m.version for m in self.template), jobs=jobs)
        status = tenant_status(body, out, ident)
        status["effectiveLimits"] = hard
        await self.kube.patch_status(ns, "tenants", name, status)
        self.stats.tenants += 1
        qgen = int(quota["metadata"].get("generation") or 1)
        await self.kube.patch_status(ns, "quotas", quota["metadata"]["name"], {
            "observedGeneration": qgen, "hard": hard,
            "conditions": merge(None, [Cond("Ready", "True", "InForce", "limits in force")], qgen),
        })
        self.stats.quotas += 1

    async def flag(self, body: dict[str, Any]) -> None:
        assert self.pool is not None
        meta = body["metadata"]
        spec = FeatureFlagSpec.model_validate(body.get("spec") or {})
        flag = FlagDefinition.from_spec(spec, meta["name"])
        async with self.pool.connection() as conn:
            res = await dbf.replace(conn, self.control, namespace=meta["namespace"], name=meta["name"],
                                    uid=meta["uid"], generation=int(meta.get("generation") or 1), flag=flag,
                                    changed_by=None, changed_at=None)
        doc = flagd_document([flag], {"namespace": meta["namespace"], "featureflag": meta["name"]})
        await self.kube.create(meta["namespace"], {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": configmap_name(meta["name"]), "ownerReferences": [{
                "apiVersion": body["apiVersion"], "kind": "FeatureFlag", "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True}]},
            "data": {"flagd.json": json.dumps(doc, indent=2, sort_keys=True) + "\n"},
        })
        out = FlagOutcome(True, "Published", "published", definition=flag, config_map=configmap_name(meta["name"]),
                          written_at=res.stored.written_at if res.stored else None)
        await self.kube.patch_status(meta["namespace"], "featureflags", meta["name"], flag_status(body, out))
        self.stats.flags += 1


@dataclass
class _Ctx:
    """What ``TenantReconciler`` reads from the operator's context to build a Secret body."""

    settings: Settings
    dsn: str
    kube: Any = None

    @property
    def targets(self) -> Any:
        dsn = self.dsn

        class _T:
            @staticmethod
            def conninfo(_: str) -> dict[str, Any]:
                return psycopg.conninfo.conninfo_to_dict(dsn)

        return _T()


async def cleanup(admin_dsn: str, namespace: str, control: str = "tenancy") -> float:
    """Remove what a floor run left in PostgreSQL (registry rows, schemas, roles, flag rows)."""
    started = time.monotonic()
    ident = psycopg.sql.Identifier
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        cur = await conn.execute(psycopg.sql.SQL("SELECT id, schema_name FROM {}.tenants WHERE namespace = %s").format(
            ident(control)), [namespace])
        rows = await cur.fetchall()
        refs = await (await conn.execute(
            "SELECT c.conrelid::regclass::text FROM pg_constraint c WHERE c.contype = 'f'"
            " AND c.confrelid = %s::regclass", [f"{control}.tenants"])).fetchall()
        ids = [r[0] for r in rows]
        for (table,) in refs:
            await conn.execute(psycopg.sql.SQL("DELETE FROM {} WHERE tenant_id = ANY(%s)").format(
                psycopg.sql.SQL(table)), [ids])
        await conn.execute(psycopg.sql.SQL("DELETE FROM {}.tenants WHERE namespace = %s").format(ident(control)),
                           [namespace])
        for table in ("feature_flags", "feature_flag_changes"):
            await conn.execute(psycopg.sql.SQL("DELETE FROM {}.{} WHERE namespace = %s").format(
                ident(control), ident(table)), [namespace])
        for _, schema in rows:
            await conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident(schema)))
            # The owner and its login roles; DROP OWNED takes their default privileges too.
            cur = await conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                     [[schema, *logins.login_roles(schema)]])
            names = [r for (r,) in await cur.fetchall()]
            if names:
                roles = psycopg.sql.SQL(", ").join(ident(r) for r in names)
                await conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(roles))
                await conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(roles))
    return time.monotonic() - started
