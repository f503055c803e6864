"""Giving freed memory back to the system.

A burst of work (a mass creation, the resume of every object after a restart) parses and builds
far more objects at once than the operator keeps. CPython frees them, but glibc's allocator keeps
the freed pages of its heaps mapped, so the resident size stays at the burst's peak for the life of
the process. ``malloc_trim(0)`` hands every wholly free page back (glibc >= 2.8: anywhere in the
heap, not only at its top). It runs in a worker thread, every ``interval`` seconds; without glibc
(musl, macOS) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

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


async def trim_forever(interval: float) -> None:
    trim = _malloc_trim()
    if trim is None:
        log.info("malloc_trim unavailable (not glibc): freed memory stays with the allocator")
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(trim, 0)
