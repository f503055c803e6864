"""Benchmark (not a test): what one Prometheus scrape of the operator costs with N tenants, in-process.

    .venv/bin/python -m bench.metrics_scrape [--tenants 10000] [--repeat 5]

Fills the operator's per-tenant families as a converged fleet has them (each tenant with a Quota
on three resources, measured load and a credential rotation), then times the metrics page
(``observability.metrics_server.exposition``) against prometheus_client rendering the same registries
(``generate_latest``), and the page's gzip compression (Prometheus asks for it) at the operator's
level and at prometheus_client's (9). CPU seconds of the best of ``--repeat`` runs; the scrape
runs in the metrics server's thread, holding the interpreter meanwhile. One line:

    metrics_scrape tenants=N samples=S page_mb=M page_cpu_s=P prometheus_client_cpu_s=C
                   gzip_cpu_s=G gzip_mb=Z gzip9_cpu_s=H gzip9_mb=Y
"""

from __future__ import annotations

import argparse
import gzip
import time
from collections.abc import Callable

from prometheus_client import REGISTRY, generate_latest

from tenancy_operator.observability import metrics
from tenancy_operator.observability.metrics_server import GZIP_LEVEL, exposition

RESOURCES = ("connections", "storage", "statementTimeout")


def fill(tenants: int) -> int:
    now = time.time()
    for i in range(tenants):
        key = (f"ns-{i % 100:03d}", f"tenant-{i:06d}")
        for resource in RESOURCES:
            metrics.TENANT_QUOTA_LIMIT.set((*key, resource), 10 + i)
            metrics.TENANT_QUOTA_USED.set((*key, resource), i / 3)
        for family in (metrics.TENANT_RESOURCE_USAGE, metrics.TENANT_RESOURCE_CALLS, metrics.TENANT_RESOURCE_ROWS,
                       metrics.TENANT_RESOURCE_SHARED_BLOCKS, metrics.TENANT_RESOURCE_TEMP_BLOCKS):
            family.inc(key, i * 7.25)
        for family in (metrics.TENANT_SESSIONS_ACTIVE, metrics.TENANT_SESSIONS_WAITING, metrics.TENANT_LOAD_SHARE,
                       metrics.TENANT_NOISY_NEIGHBOR):
            family.set(key, i % 3)
        metrics.CREDENTIAL_AGE.set(key, now - i)
    return sum(len(f.values) for f in metrics.TENANT_FAMILIES)


def best(repeat: int, fn: Callable[[], bytes]) -> tuple[float, bytes]:
    runs = []
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        runs.append(time.process_time() - t0)
    return min(runs), out


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/metrics_scrape", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tenants", "-n", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    samples = fill(args.tenants)
    page_s, page = best(args.repeat, exposition)
    client_s, client = best(args.repeat, lambda: generate_latest(REGISTRY) + generate_latest(metrics.TENANT_REGISTRY))
    gzip_s, zipped = best(args.repeat, lambda: gzip.compress(page, compresslevel=GZIP_LEVEL))
    gzip9_s, zipped9 = best(args.repeat, lambda: gzip.compress(page, compresslevel=9))
    print(f"metrics_scrape tenants={args.tenants} samples={samples} page_mb={len(page) / 1e6:.1f} "
          f"page_cpu_s={page_s:.3f} prometheus_client_cpu_s={client_s:.3f} gzip_cpu_s={gzip_s:.3f} "
          f"gzip_mb={len(zipped) / 1e6:.2f} gzip9_cpu_s={gzip9_s:.3f} gzip9_mb={len(zipped9) / 1e6:.2f}", flush=True)
    assert len(client) > 0.99 * len(page)  # the same series (their ages' digits may differ)


if __name__ == "__main__":
    main()
