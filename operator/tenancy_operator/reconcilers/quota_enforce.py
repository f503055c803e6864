"""What a quota evaluation writes to its tenant's database (the plan's database part)."""

from __future__ import annotations

import psycopg
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tenancy_operator.api.names import OPERATOR
from tenancy_operator.db import jobs as dbjobs
from tenancy_operator.db import logins
from tenancy_operator.db import quota as dbq
from tenancy_operator.db import tenants as sqlt
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, database_retry
from tenancy_operator.reconcilers.lifecycle import is_transient
from tenancy_operator.reconcilers.quota_types import Plan
from tenancy_operator.runtime_context import OperatorContext

log = get_logger(__name__)


async def write_database(ctx: OperatorContext, plan: Plan) -> None:
    """Carry out a plan's database part on its target: the role attributes (the owner role's are
    the record; its login roles get the same), the registry the platform reads, ledger entries.
    Raises Retry (DatabaseBusy/DatabaseUnavailable) when the target cannot take them."""
    assert plan.target
    assert plan.ident
    assert plan.role is not None
    role, want = plan.ident, plan.role
    try:
        # Every step is idempotent: a try that met a concurrent change of the same role
        # (a rotation, a deletion) is simply made again.
        async for attempt in AsyncRetrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(4),
                                           wait=wait_exponential_jitter(multiplier=0.1, max=1.0), reraise=True):
            with attempt:
                # Pipeline mode: the statements go in one round trip (an error skips the rest,
                # and the whole attempt is made again).
                async with ctx.targets.connection(plan.target) as conn:
                    roles = [role, *await logins.existing_logins(conn, role)] if plan.role_changes else [role]
                async with ctx.targets.connection(plan.target) as conn, conn.pipeline():
                    for r in roles:
                        if "connections" in plan.role_changes:
                            await dbq.set_connection_limit(conn, r, want.connection_limit)
                        if "statementTimeout" in plan.role_changes:
                            await dbq.set_statement_timeout(conn, r, want.statement_timeout_ms)
                        if "readOnly" in plan.role_changes:
                            await dbq.set_read_only(conn, r, want.read_only)
                            # Sessions keep the default they logged in with: end them so the change holds.
                            await sqlt.terminate_sessions(conn, r)
                    if plan.publish is not None and plan.tenant_id:
                        await dbq.publish(conn, ctx.settings.control_schema, plan.tenant_id, plan.publish)
                    for kind, detail in plan.ledger:
                        if plan.tenant_id:
                            await dbjobs.record(conn, ctx.settings.control_schema, plan.tenant_id, kind, detail=detail,
                                                requested_by=OPERATOR)
    except psycopg.errors.UndefinedObject:
        log.info("role vanished while applying limits", role=role)  # dropped meanwhile: nothing to limit
    except DATABASE_ERRORS as exc:
        raise database_retry(exc, f"database {plan.target!r}") from exc
