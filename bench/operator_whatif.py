"""``python -m tenancy_operator`` with Kopf settings the operator does not expose changed: what-if
measurements only (``bench/converge --kopf-idle-timeout 0.5``), never a way to run the operator.

BENCH_KOPF_IDLE_TIMEOUT: ``settings.queueing.idle_timeout``, how long an idle per-object worker keeps
its slot of ``worker_limit`` (Kopf's default: 5 s).

BENCH_TRACEMALLOC: a file path. tracemalloc traces the operator's allocations (8 frames; it slows
allocation, so no timing of such a run means anything), and each time ``<path>.request`` appears
the live allocations are written to ``<path>`` (by file and line, and by call stack) and the
request file removed (bench/scale --trace-memory).
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import kopf


def dump(path: Path) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")])
    total = sum(s.size for s in snapshot.statistics("filename"))
    lines = [f"traced {total / 2**20:.1f} MiB live", "", "by file:"]
    lines += [f"{s.size / 2**20:8.2f} MiB {s.count:9d} blocks  {s.traceback[0].filename}"
              for s in snapshot.statistics("filename")[:30]]
    lines += ["", "by line:"]
    lines += [f"{s.size / 2**20:8.2f} MiB {s.count:9d} blocks  {s.traceback[0].filename}:{s.traceback[0].lineno}"
              for s in snapshot.statistics("lineno")[:40]]
    lines += ["", "by call stack:"]
    for s in snapshot.statistics("traceback")[:25]:
        lines.append(f"{s.size / 2**20:8.2f} MiB {s.count:9d} blocks")
        lines += [f"      {f.filename}:{f.lineno}" for f in s.traceback]
    path.write_text("\n".join(lines) + "\n")


def trace_memory(path: Path) -> None:
    tracemalloc.start(8)

    def serve() -> None:
        request = path.with_name(path.name + ".request")
        while True:
            if request.exists():
                dump(path)
                request.unlink()
            time.sleep(0.5)  # polling for a request file

    threading.Thread(target=serve, name="bench-tracemalloc", daemon=True).start()


def main() -> None:
    if os.environ.get("BENCH_TRACEMALLOC"):
        trace_memory(Path(os.environ["BENCH_TRACEMALLOC"]))
    idle = os.environ.get("BENCH_KOPF_IDLE_TIMEOUT")
    if idle:
        original = kopf.operator

        async def operator(*args: Any, **kwargs: Any) -> Any:
            settings = kwargs.get("settings") or kopf.OperatorSettings()
            settings.queueing.idle_timeout = float(idle)
            kwargs["settings"] = settings
            return await original(*args, **kwargs)

        kopf.operator = operator
    sys.argv = ["tenancy_operator", *sys.argv[1:]]
    runpy.run_module("tenancy_operator", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
