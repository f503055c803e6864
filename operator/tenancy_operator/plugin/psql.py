"""`kubectl tenancy psql`: psql as the tenant's login, with the credentials of its Secret. The
password reaches psql through its environment; psql owns the terminal until it exits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tenancy_operator.plugin.session import EXIT_USAGE, CommandError, Session, decoded

PSQL_CONNECTION_FAILED = 2
"""psql's exit status when it could not connect (the psql manual, "Exit Status")."""


def psql_environment(data: Mapping[str, str], *, host: str | None, port: str | None,
                     base: Mapping[str, str]) -> dict[str, str]:
    """libpq's environment for a credentials Secret's keys: the password goes to PGPASSWORD, never
    to argv (other users of the machine see argv in ps)."""
    env = dict(base)
    for var, key, override in (("PGHOST", "host", host), ("PGPORT", "port", port), ("PGUSER", "user", None),
                               ("PGDATABASE", "dbname", None), ("PGSSLMODE", "sslmode", None)):
        value = override or data.get(key)
        if value:
            env[var] = value
    env["PGPASSWORD"] = data.get("password", "")
    env.setdefault("PGAPPNAME", "kubectl-tenancy")
    return env


async def cmd_psql(s: Session) -> int:
    from tenancy_operator.reconcilers.tenant_base import readonly_secret_name, secret_name

    name = s.args.tenant
    await s.tenant(name)
    secret = readonly_secret_name(name) if s.args.read_only else secret_name(name)
    body = await s.kube.read_secret(s.namespace, secret)
    if body is None:
        hint = " (spec.credentials.readOnlyLogin: true makes it)" if s.args.read_only else ""
        raise CommandError(f"Secret {s.namespace}/{secret} not found{hint}")
    data = decoded(body)
    psql = s.args.psql or shutil.which("psql")
    if not psql:
        raise CommandError("psql not found on PATH; install the PostgreSQL client or pass --psql", EXIT_USAGE)
    env = psql_environment(data, host=s.args.host, port=s.args.port, base=os.environ)
    with tempfile.TemporaryDirectory(prefix="kubectl-tenancy-") as tmp:
        if data.get("ca.crt"):  # the target's CA; the Secret's sslrootcert is a path on the operator's side
            ca = Path(tmp) / "ca.crt"
            ca.write_text(data["ca.crt"])
            env["PGSSLROOTCERT"] = str(ca)
        print(f"psql: {env.get('PGUSER')}@{env.get('PGHOST')}:{env.get('PGPORT')}/{env.get('PGDATABASE')} "
              f"(Secret {secret}, sslmode {env.get('PGSSLMODE', 'prefer')})", file=sys.stderr)
        # Ctrl-C belongs to psql (it cancels the query), not to us.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # Blocking on purpose: psql owns the terminal until it exits; nothing else runs meanwhile.
            code = subprocess.call([psql, *s.args.psql_args], env=env)  # noqa: ASYNC221
        finally:
            signal.signal(signal.SIGINT, previous)
    if code == PSQL_CONNECTION_FAILED and not s.args.host:
        print(f"hint: the Secret's host {env.get('PGHOST')} may not be reachable from here; forward a port "
              "(kubectl port-forward) and pass --host 127.0.0.1 --port <local port>", file=sys.stderr)
    return code
