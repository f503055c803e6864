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
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)


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
            await asyncio.to_thread(trim, 0)
            now = time.process_time()  # the trim's own CPU is not work
        before = now
