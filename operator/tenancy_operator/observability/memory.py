"""Giving freed memory back to the system.

A burst of work (a mass creation, the resume of every object after a restart) parses and builds
far more objects at once than the operator keeps. CPython frees them, but glibc's allocator keeps
the freed pages of its heaps mapped, so the resident size stays at the burst's peak for the life of
the process. ``malloc_trim(0)`` hands every wholly free page back (glibc >= 2.8: anywhere in the
heap, not only at its top).

When: once a burst is over. Trimming during one hands back pages the next moment faults in again
(measured: a trim every 3 s added about a fifth to a mass creation's CPU), and a fixed long
interval leaves the peak resident for that long after each burst. So the process's own CPU time is
read every second: after at least ``work`` CPU-seconds since the last trim, the first second that
used less than ``quiet`` of a core trims. Without glibc (musl, macOS) there is nothing to call and
this does nothing.

The cyclic garbage collector (``tune_gc``): CPython's defaults suit small heaps. A full
collection walks every object the process holds; by default one may run after every 70,000 net
allocations, once objects promoted since the last one make a quarter of the old ones, and an
operator holding a fleet churns through such objects (cache copies and Kopf's per-object state
replaced at each event). With one replica and 5,000 tenants (`bench/scale --malloc-stats`, which
times the collector) it took a quarter of the converge's CPU, most of it in full collections. So
the objects of start-up (modules, classes, settings) are frozen out of it, and a full collection
waits for 100 collections of the middle generation instead of 10. The young generations are
collected as CPython sets them: short-lived cycles of garbage go as soon as before. The quiet
moment after a burst runs a full collection before it trims.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)


GC_THRESHOLDS = (700, 10, 100)
"""gc.set_threshold's three figures (CPython's defaults: 700, 10, 10). Spacing young collections out
too (10,000, 20, 20) saved a little more CPU and kept 25 to 40 MB more at 5,000 tenants."""


def tune_gc() -> None:
    """Freeze what start-up built out of the cyclic collector and space its collections out (see
    the module's docstring). Once per process, after the imports, before any object is listed."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


@dataclass
class QuietTrim:
    """Decides, one check at a time, whether to trim now (see the module's docstring)."""

    work: float = 1.0
    """CPU-seconds since the last trim that make a trim worth it."""
    quiet: float = 0.1
    """Fraction of a core below which a check interval counts as quiet."""
    since: float = 0.0

    def step(self, used: float, interval: float) -> bool:
        """``used`` CPU-seconds in the last ``interval`` seconds; True: trim now."""
        self.since += used
        if self.since >= self.work and used < self.quiet * interval:
            self.since = 0.0
            return True
        return False


async def trim_when_quiet(interval: float = 1.0) -> None:
    trim = _malloc_trim()
    if trim is None:
        log.info("malloc_trim unavailable (not glibc): freed memory stays with the allocator")
        return
    decide = QuietTrim()
    before = time.process_time()
    while True:
        await asyncio.sleep(interval)
        now = time.process_time()
        if decide.step(now - before, interval):
            gc.collect()  # the burst's cycles of garbage first, so their pages can go back too
            await asyncio.to_thread(trim, 0)
            now = time.process_time()  # the trim's own CPU is not work
        before = now
