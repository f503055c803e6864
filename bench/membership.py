"""What one new tenant's catalog work costs as the fleet grows, with and without a standing
membership of the operator in every tenant role.

PostgreSQL 15 checks role membership by walking the whole list of the checking role's memberships
(``roles_is_member_of``, quadratic in their number), and every CREATE/ALTER ROLE resets the cache
of that list. An operator that is a member of N tenant roles therefore pays O(N²) for the next
``CREATE SCHEMA ... AUTHORIZATION``. The operator grants itself the membership inside the batch
that needs it and revokes it there (db/role_sql.py). This script measures both on a throwaway
PostgreSQL (the newest under /usr/lib/postgresql) with the operator's own statement helpers and
prints milliseconds per new tenant::

    python -m bench.membership [--sizes 100,1000,3000,5000]
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.common import log
from tenancy_devenv.postgres import PostgresCluster
from tenancy_operator.db import role_sql
from tenancy_operator.db import tenants as sqlt

SAMPLE = 50  # tenants timed at each size


def batch(ident: str, standing: bool) -> sql.Composed:
    """The first provisioning's catalog batch: with a standing membership, or as the operator
    sends it (membership granted and revoked inside the batch)."""
    if standing:  # the alternative the operator avoids: a GRANT kept for good
        statements = [*sqlt.create_role(ident, "bench"), role_sql.grant_role_to_operator(ident),
                      sqlt.create_schema(ident, ident)]
    else:
        statements = [*sqlt.create_role(ident, "bench"),
                      *role_sql.membership_statements(ident, [sqlt.create_schema(ident, ident)])]
    return sql.SQL("; ").join([*statements, role_sql.set_search_path(ident, ident)])


def measure(bindir: Path, sizes: list[int], standing: bool) -> dict[int, float]:
    with tempfile.TemporaryDirectory(prefix="tenancy-membership-") as tmp:
        Path(tmp).chmod(0o755)  # the postgres OS user must reach its data directory
        pg = PostgresCluster(Path(tmp), bindir)
        pg.start()
        try:
            out: dict[int, float] = {}
            with psycopg.connect(pg.operator_dsn, autocommit=True) as conn:
                made = 0
                for size in sizes:
                    while made < size:
                        conn.execute(batch(f"tenant_{made}", standing))
                        made += 1
                    started = time.perf_counter()
                    for _ in range(SAMPLE):
                        conn.execute(batch(f"tenant_{made}", standing))
                        made += 1
                    out[size] = (time.perf_counter() - started) * 1000 / SAMPLE
                    log(f"{'standing' if standing else 'per batch'}: {size} tenants, "
                        f"{out[size]:.2f} ms per new tenant")
            return out
        finally:
            pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,3000,5000")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
    standing = measure(bindir, sizes, standing=True)
    per_batch = measure(bindir, sizes, standing=False)
    print("| Tenants already there | Standing membership (before) | Membership per batch (now) |")
    print("|---|---|---|")
    for size in sizes:
        print(f"| {size} | {standing[size]:.2f} ms | {per_batch[size]:.2f} ms |")
    print(f"PostgreSQL: {bindir}")


if __name__ == "__main__":
    main()
