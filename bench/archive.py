"""Archive, restore and move benchmark: a tenant of N MB archived to the S3-compatible store
(s3proxy on this machine, as `make dev` runs it) by its deletion, restored into a new Tenant, then
moved to a second database target (another PostgreSQL cluster on this machine).

    bench/archive --sizes 100,1000        # MB of table data per tenant

Per size it prints the data size, the dump's size, and four times:

- archive: the operator's `archive` job (`pg_dump` streamed into the store, read back in full with
  its SHA-256 checked, the catalog row written);
- delete: `kubectl delete` until the Tenant is gone (the archive job, then the drop);
- restore: the `restore` job (checksum pass, then `pg_restore` in one transaction);
- ready: from the Tenant's creation with `restoreFrom` until it is Ready;
- move: from the change of spec.database until status.lastMove is written, and the move's write
  downtime (status.lastMove.writeDowntimeSeconds: writes stopped on the source until possible on
  the destination).

It also prints the operator's peak RSS, which shows that no dump is held in memory. Results go to
bench/results/archive-<sizes>-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import time
from typing import Any

import psycopg
from psycopg import sql

from bench.common import (
    GROUP,
    ROOT,
    VERSION,
    Operator,
    Sampler,
    Stack,
    fmt_s,
    git_describe,
    is_ready,
    log,
    machine,
    wait_until,
)

NAMESPACE = "bench-archive"
ROW_BYTES = 1000  # payload per row: 1000 hex characters, about what a row of mixed text holds


def tenant(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Tenant", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec}


def get(stack: Stack, name: str) -> dict[str, Any] | None:
    out = stack.local.kubectl("get", "tenant", name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def job_seconds(stack: Stack, name: str, kind: str) -> float:
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM j.finished_at - j.started_at) FROM tenancy.lifecycle_jobs j"
            " JOIN tenancy.tenants t ON t.id = j.tenant_id WHERE t.namespace = %s AND t.name = %s AND j.kind = %s"
            " AND j.state = 'succeeded' ORDER BY j.started_at DESC LIMIT 1", [NAMESPACE, name, kind]).fetchone()
    return float(row[0]) if row else float("nan")


def fill(stack: Stack, ident: str, megabytes: int) -> int:
    """``megabytes`` of rows in a table of the tenant's (as its owner); returns the table's size."""
    rows = megabytes * 1_000_000 // ROW_BYTES
    table = sql.Identifier(ident, "payload")
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(ident)))
        conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text)").format(table))
        step = 200_000
        for start in range(0, rows, step):
            conn.execute(
                # Every 32 characters drawn anew: hex that compresses about 2:1, like real text, not
                # one repeated string that pg_dump's compression would shrink 40 times.
                sql.SQL("INSERT INTO {} SELECT g, (SELECT string_agg(md5(random()::text || g || i), '')"
                        " FROM generate_series(1, %s) i) FROM generate_series(%s::bigint, %s::bigint) g").format(table),
                [ROW_BYTES // 32, start + 1, min(rows, start + step)])
        size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", [f"{ident}.payload"]).fetchone()
    return int(size[0]) if size else 0


async def one(stack: Stack, op: Operator, megabytes: int) -> dict[str, Any]:
    name = f"arc-{megabytes}mb"
    ident = "tenant_" + name.replace("-", "_")
    stack.kubectl("apply", "-f", "-", input=json.dumps(tenant(name, deletionPolicy="Archive")))
    wait_until(lambda: is_ready(get(stack, name) or {"metadata": {}}), 120, f"{name} Ready")
    log(f"{name}: writing {megabytes} MB")
    table_bytes = fill(stack, ident, megabytes)

    sampler = Sampler(op.pid).start()
    started = time.monotonic()
    stack.local.kubectl("delete", "tenant", name, "-n", NAMESPACE, "--wait=false")
    await asyncio.to_thread(wait_until, lambda: get(stack, name) is None, 7200, f"{name} archived and gone", 0.2)
    deleted = time.monotonic() - started
    archive_job = job_seconds(stack, name, "archive")
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        found = conn.execute("SELECT id, size_bytes FROM tenancy.tenant_archives WHERE namespace = %s AND name = %s"
                             " ORDER BY created_at DESC LIMIT 1", [NAMESPACE, name]).fetchone()
    assert found is not None, "no archive recorded"
    archive_id, dump_bytes = found
    log(f"{name}: archived in {archive_job:.1f} s ({dump_bytes / 1e6:.0f} MB dump); restoring")

    started = time.monotonic()
    stack.kubectl("apply", "-f", "-", input=json.dumps(tenant(name, restoreFrom=archive_id)))
    await asyncio.to_thread(wait_until, lambda: is_ready(get(stack, name) or {"metadata": {}}), 7200,
                            f"{name} restored", 0.2)
    ready = time.monotonic() - started
    restore_job = job_seconds(stack, name, "restore")
    log(f"{name}: restored in {restore_job:.1f} s; moving to the second target")
    started = time.monotonic()
    stack.local.kubectl("patch", "tenant", name, "-n", NAMESPACE, "--type", "merge", "-p",
                        json.dumps({"spec": {"database": "second"}}))

    def moved() -> bool:
        obj = get(stack, name) or {}
        return bool((obj.get("status") or {}).get("lastMove")) and is_ready(obj)

    await asyncio.to_thread(wait_until, moved, 7200, f"{name} moved", 0.2)
    move_s = time.monotonic() - started
    last_move = ((get(stack, name) or {}).get("status") or {}).get("lastMove") or {}
    await sampler.stop()
    with psycopg.connect(stack.local.admin_dsn("second"), autocommit=True) as conn:
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(ident, "payload"))).fetchone()
    if count is None or count[0] != megabytes * 1_000_000 // ROW_BYTES:
        raise RuntimeError(f"restored {count} rows, expected {megabytes * 1_000_000 // ROW_BYTES}")
    return {"megabytes": megabytes, "table_bytes": table_bytes, "dump_bytes": int(dump_bytes),
            "archive_job_s": archive_job, "delete_s": deleted, "restore_job_s": restore_job, "ready_s": ready,
            "move_s": move_s, "move_write_downtime_s": float(last_move.get("writeDowntimeSeconds") or "nan"),
            "operator_peak_rss_mb": sampler.peak_rss_mb}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated MB per tenant (default 100,1000)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    stack = Stack.own(targets=("default", "second"))
    targets = {t: stack.local.operator_dsn(t) for t in ("default", "second")}
    op = Operator(stack.kubeconfig, stack.operator_dsn, stack.workdir,
                  env={"TENANCY_ARCHIVE_STORE": json.dumps(stack.local.archive_store_config()),
                       "TENANCY_DATABASE_TARGETS": json.dumps(targets),
                       "TENANCY_PG_BIN_DIR": str(stack.local.pg_bindir)})
    results: list[dict[str, Any]] = []
    try:
        op.start()
        stack.kubectl("create", "namespace", NAMESPACE)
        for megabytes in sizes:
            results.append(await one(stack, op, megabytes))
    finally:
        op.stop()
        stack.close()
    print(f"{'size':>8} {'table MB':>9} {'dump MB':>8} {'archive s':>10} {'delete s':>9} {'restore s':>10}"
          f" {'ready s':>8} {'move s':>7} {'downtime s':>11} {'op RSS MB':>10}")
    for r in results:
        print(f"{r['megabytes']:>6}MB {r['table_bytes'] / 1e6:>9.0f} {r['dump_bytes'] / 1e6:>8.0f}"
              f" {fmt_s(r['archive_job_s']):>10} {fmt_s(r['delete_s']):>9} {fmt_s(r['restore_job_s']):>10}"
              f" {fmt_s(r['ready_s']):>8} {fmt_s(r['move_s']):>7} {fmt_s(r['move_write_downtime_s']):>11}"
              f" {r['operator_peak_rss_mb']:>10.0f}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench" / "results" / f"archive-{'-'.join(map(str, sizes))}-{stamp}.json"
    out.write_text(json.dumps({"git": git_describe(), "machine": machine(), "results": results}, indent=2) + "\n")
    log(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
