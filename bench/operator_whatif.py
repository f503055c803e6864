"""``python -m tenancy_operator`` with Kopf settings the operator does not expose changed: what-if
measurements only (``bench/converge --kopf-idle-timeout 0.5``), never a way to run the operator.

BENCH_KOPF_IDLE_TIMEOUT: ``settings.queueing.idle_timeout``, how long an idle per-object worker keeps
its slot of ``worker_limit`` (Kopf's default: 5 s).

BENCH_TRACEMALLOC: a file path. tracemalloc traces the operator's allocations (8 frames; it slows
allocation, so no timing of such a run means anything), and each time ``<path>.request`` appears
the live allocations are written to ``<path>`` (by file and line, and by call stack) and the
request file removed (bench/scale --trace-memory).

BENCH_MALLOC_STATS: a file path. Each time ``<path>.request`` appears, what the allocators hold is
written to ``<path>`` as JSON and the request file removed (bench/scale --malloc-stats): CPython's
object allocator (``sys._debugmallocstats``: arenas, bytes in used and in free blocks) and glibc's
heap (``mallinfo2``: in use, free, and the free part ``malloc_trim`` could not return). Reading
them costs milliseconds; no timing changes. The same JSON carries the time the cyclic garbage
collector took since start (``gc_seconds``, ``gc_collections``, and per generation, timed by a gc
callback in CPU time of the collecting thread: wall time would count the moments the process waits
for a core, which with several replicas on 2 cores is most of it) and the process's CPU seconds, so
runs on a machine of varying speed compare by the collector's share.

BENCH_CENSUS: ``1`` (with BENCH_MALLOC_STATS; the environment of ``bench/scale`` passes it on) adds
to each reading the number of live coroutines and the live objects over 512 bytes (those CPython
leaves to glibc) by type: bytes and count. It walks every object, which takes seconds with
thousands of tenants and holds the interpreter meanwhile.

BENCH_GC_DEFAULTS: ``1`` leaves the collector as CPython sets it (no observability.memory.tune_gc):
the what-if of the operator without its tuning.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import runpy
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
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


def serve(path: Path, write: Callable[[Path], None]) -> None:
    """On a thread: ``write(path)`` each time ``<path>.request`` appears, then remove the request."""

    def loop() -> None:
        request = path.with_name(path.name + ".request")
        while True:
            if request.exists():
                write(path)
                request.unlink()
            time.sleep(0.5)  # polling for a request file

    threading.Thread(target=loop, name=f"bench-{path.stem}", daemon=True).start()


def trace_memory(path: Path) -> None:
    tracemalloc.start(8)
    serve(path, dump)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


PYMALLOC_FIGURES = {
    "arenas": r"# arenas allocated current\s*=\s*([\d,]+)",
    "allocated_blocks_bytes": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
    "available_blocks_bytes": r"# bytes in available blocks\s*=\s*([\d,]+)",
    "unused_pools_bytes": r"\d+ unused pools \* \d+ bytes\s*=\s*([\d,]+)",
    "total_bytes": r"^Total\s*=\s*([\d,]+)",
}


GC_TIME = {"seconds": 0.0, "collections": 0.0, **{f"gen{g}_seconds": 0.0 for g in range(3)},
           **{f"gen{g}_collections": 0.0 for g in range(3)}}
_gc_started = [0.0]


def _time_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.thread_time()
    else:
        took = time.thread_time() - _gc_started[0]
        GC_TIME["seconds"] += took
        GC_TIME[f"gen{info['generation']}_seconds"] += took
        GC_TIME[f"gen{info['generation']}_collections"] += 1
        GC_TIME["collections"] += 1


def malloc_stats(path: Path) -> None:
    """Both allocators' figures as JSON (bytes). ``sys._debugmallocstats`` writes to the C stderr:
    fd 2 points at a temporary file for that call (the operator logs to stdout)."""
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    figures: dict[str, int] = {}
    for name, pattern in PYMALLOC_FIGURES.items():
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            figures[f"pymalloc_{name}"] = int(m.group(1).replace(",", ""))
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    figures.update(glibc_heap_bytes=info.arena, glibc_in_use_bytes=info.uordblks, glibc_free_bytes=info.fordblks,
                   glibc_mmapped_bytes=info.hblkhd, glibc_top_releasable_bytes=info.keepcost)
    out: dict[str, Any] = {**figures, **{f"gc_{k}": round(v, 3) for k, v in GC_TIME.items()},
                           "cpu_seconds": round(time.process_time(), 3)}
    if os.environ.get("BENCH_CENSUS") == "1":
        out["census"] = census()
    path.write_text(json.dumps(out, indent=1) + "\n")


def census() -> dict[str, Any]:
    """The live objects over 512 bytes (glibc's, not pymalloc's) by type, bytes and count;
    containers from the collector's lists, strings and bytes as their referents."""
    big: dict[str, list[int]] = {}
    seen: set[int] = set()
    coroutines = 0

    def count(obj: object) -> None:
        size = sys.getsizeof(obj)
        if size > 512:
            entry = big.setdefault(type(obj).__name__, [0, 0])
            entry[0] += size
            entry[1] += 1

    for obj in gc.get_objects():
        coroutines += type(obj).__name__ == "coroutine"
        count(obj)
        for ref in gc.get_referents(obj):
            if isinstance(ref, (str, bytes, bytearray)) and id(ref) not in seen:
                seen.add(id(ref))
                count(ref)
    top = sorted(big.items(), key=lambda kv: -kv[1][0])[:25]
    return {"coroutines": coroutines, "large": {k: {"mb": round(v[0] / 2**20, 1), "count": v[1]} for k, v in top}}


def main() -> None:
    if os.environ.get("BENCH_TRACEMALLOC"):
        trace_memory(Path(os.environ["BENCH_TRACEMALLOC"]))
    if os.environ.get("BENCH_MALLOC_STATS"):
        gc.callbacks.append(_time_gc)
        serve(Path(os.environ["BENCH_MALLOC_STATS"]), malloc_stats)
    if os.environ.get("BENCH_GC_DEFAULTS") == "1":
        import tenancy_operator.runtime

        tenancy_operator.runtime.tune_gc = lambda: None  # type: ignore[assignment]
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
