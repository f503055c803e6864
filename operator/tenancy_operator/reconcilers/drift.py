"""Drift: what differs between a provisioned tenant's declaration and the catalog. Pure; the
sweep and the start-up fast path decide with it whether a Tenant needs a reconcile."""

from __future__ import annotations

from collections.abc import Mapping

from tenancy_operator.api.tenant import TenantSpec
from tenancy_operator.db.logins import READ_ONLY_SLOT, LoginObserved, login_role, wanted_logins
from tenancy_operator.db.registry import CredentialsRow
from tenancy_operator.db.tenants import Observed


def drifted(spec: TenantSpec, ident: str, obs: Observed,
            logins: Mapping[str, LoginObserved] | None = None,
            creds: CredentialsRow | None = None) -> list[str]:
    """What differs between a provisioned tenant's declaration and the catalog. With its login
    roles (``logins``) and the registry's record of them (``creds``): also missing login roles,
    incomplete grants of a login role, and a role that may log in although it should not (or the
    other way round)."""
    checks = {
        "role": obs.role_exists,
        "schema": obs.schema_exists,
        "schema-owner": obs.schema_owned,
        "grants": obs.schema_privileges,
        "search-path": obs.search_path in (ident, f'"{ident}"'),
    }
    if logins is not None:
        read_only = spec.credentials.read_only_login
        checks["login-role"] = all(lo.exists for s, lo in logins.items() if s != READ_ONLY_SLOT or read_only)
        checks["login-grants"] = all(lo.grants_ok for lo in logins.values() if lo.exists)
        want = wanted_logins(
            ident, slot=creds.login_slot if creds else None, retiring=creds.retiring_role if creds else None,
            suspended=str(getattr(spec.state, "value", spec.state)) == "Suspended", read_only=read_only)
        have = {ident: obs.can_login,
                **{login_role(ident, s): lo.can_login for s, lo in logins.items() if lo.exists}}
        checks["login"] = all(have[r] == w for r, w in want.items() if r in have)
    return [k for k, ok in checks.items() if not ok]
