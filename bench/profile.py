"""py-spy around a benchmark phase, and a breakdown of where the operator's CPU went.

py-spy samples the operator process (``--nonblocking``: it reads the process's memory without
stopping it, so the measurement barely disturbs what it measures). Two recordings run together:
raw collapsed stacks for the tables below, and an SVG flame graph for people.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, log

RATE = 100  # samples per second


def _rules(table: dict[str, str]) -> list[tuple[str, re.Pattern[str]]]:
    """(label, compiled pattern) in the table's order: the first label that matches wins."""
    return [(label, re.compile(pattern)) for label, pattern in table.items()]


# A busy sample is charged to the category of the frame nearest its leaf that belongs to a
# library or to our code; standard-library frames (json, ssl, asyncio, selectors ...) are skipped,
# so a TLS read inside aiohttp counts as HTTP client, a log call from Kopf as logging, a socket
# write for a query as PostgreSQL client. Samples with no such frame count as "event loop, stdlib".
CATEGORIES = _rules({
    "logging (structlog, logging)": r"structlog|/logging/",
    "PostgreSQL client (psycopg, pool)": r"psycopg",
    "HTTP client (aiohttp)": r"kubernetes_asyncio|aiohttp|yarl|multidict",
    "prometheus_client": r"prometheus_client",
    "pydantic": r"pydantic",
    # py-spy names a package's files from the package on (kopf/_core/...), without a leading slash.
    "Kopf (its own logic)": r"(^|/)kopf/",
    # Before "our logic": safejson is our wrapper around orjson's decoding of the API's answers.
    "JSON decoding (safejson, orjson)": r"k8s/safejson\.py",
    # py-spy names some of our modules by their bare file name (quota.py for reconcilers/quota.py).
    "tenancy_operator (our logic)":
        r"tenancy_operator/(?!cli\.py|__main__\.py)|^(quota|tenant|lifecycle|featureflag(_policy|_source)?|sweep|errors)\.py$",
})
OWNERS = _rules({
    # Which part of the operator a busy sample works for: the frame nearest the root that names one.
    "FeatureFlag handlers and flag sweep": r"(^|/)featureflag(_policy|_source)?\.py|db/flags\.py",
    "Quota handlers and quota pass": r"(^|/)quota\.py",
    "Tenant handlers": r"(^|/)(tenant|lifecycle|sweep|tenant_migrations|tenants|jobs)\.py",
    "Kopf watch streams (receiving events)": r"kopf/_cogs/clients/watching\.py",
    "Kopf processing (patches, progress, logging)": r"(^|/)kopf/",
})


@dataclass
class Spy:
    procs: list[subprocess.Popen[bytes]]
    raw: Path
    svg: Path
    started: float
    interrupted: bool = False


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -e '.[bench]'")
    return found


def start(pid: int, stem: Path) -> Spy:
    exe = _py_spy()
    raw, svg = stem.with_suffix(".txt"), stem.with_suffix(".svg")
    common = ["--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
    procs = [
        subprocess.Popen([exe, "record", *common, "--format", "raw", "--threads", "--idle", "-o", str(raw)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([exe, "record", *common, "--format", "flamegraph", "-o", str(svg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    time.sleep(0.5)  # let py-spy attach before the phase starts
    return Spy(procs, raw, svg, time.monotonic())


def interrupt(spy: Spy) -> None:
    """End the recording now (py-spy writes its output on SIGINT); ``stop`` then waits for it."""
    if not spy.interrupted:
        spy.interrupted = True
        for p in spy.procs:
            p.send_signal(signal.SIGINT)


def stop(spy: Spy) -> dict[str, Any]:
    interrupt(spy)
    for p in spy.procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    log(f"profile: {spy.raw} and {spy.svg}")
    return analyse(spy.raw) | {"raw": str(spy.raw), "svg": str(spy.svg)}


FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> tuple[str, list[tuple[str, str]]]:
    parts = stack.split(";")
    thread = parts[0]
    frames = []
    for f in parts[1:]:
        m = FRAME.match(f)
        frames.append((m.group("fn"), m.group("file")) if m else (f, ""))
    return thread, frames


def _idle(frames: list[tuple[str, str]]) -> bool:
    if not frames:
        return True
    fn, file = frames[-1]
    return fn.rsplit(".", 1)[-1] in ("select", "poll", "epoll") and "selectors" in file


def _category(frames: list[tuple[str, str]]) -> str:
    for _, file in reversed(frames):
        for name, pat in CATEGORIES:
            if pat.search(file):
                return name
    return "event loop, stdlib"


def _owner(frames: list[tuple[str, str]]) -> str:
    for name, pat in OWNERS:
        if any(pat.search(file) for _, file in frames):
            return name
    return "other (metrics server, probes, start-up)"


def analyse(raw: Path, top: int = 20) -> dict[str, Any]:
    """Busy share of the main thread, CPU by category and by owner, hottest functions."""
    total = busy = 0
    cats: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    if not raw.exists():
        return {"error": f"no profile at {raw}"}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        thread, frames = _frames(stack)
        if "MainThread" not in thread:
            continue
        total += count
        if _idle(frames):
            continue
        busy += count
        cats[_category(frames)] += count
        owners[_owner(frames)] += count
        fn, file = frames[-1]
        self_fn[f"{fn} ({_short(file)})"] += count
        seen = set()
        for fn, file in frames:
            if re.search(r"tenancy_operator/(?!cli|__main__)|^\w+\.py$|kopf/|kubernetes_asyncio/client/api_client",
                         file) and "asyncio/" not in file:
                key = f"{fn} ({_short(file)})"
                if key not in seen:
                    seen.add(key)
                    incl_fn[key] += count

    def pct(c: Counter[str], k: int) -> dict[str, float]:
        return {name: round(100 * v / busy, 1) for name, v in c.most_common(k)} if busy else {}

    return {
        "main_thread_seconds_sampled": round(total / RATE, 1),
        "main_thread_busy_percent": round(100 * busy / total, 1) if total else None,
        "busy_seconds": round(busy / RATE, 1),
        "busy_by_category_percent": pct(cats, 20),
        "busy_by_owner_percent": pct(owners, 20),
        "top_self": pct(self_fn, top),
        "top_inclusive": pct(incl_fn, top * 2),
    }


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/operator/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(analyse(Path(sys.argv[1])), indent=1))
