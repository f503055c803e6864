"""CPU seconds per process group, every 10 s, while a benchmark runs beside it.

Reads ``/proc/<pid>/stat`` of every process and groups them: kube-apiserver, etcd, PostgreSQL
(with its exited children's time: each tenant login is a backend that comes and goes), the
operator, the benchmark, and the rest. A line per step, e.g.::

    15:59:01 busy 20.0 [('apiserver', 7.5), ('operator', 5.8), ('postgres', 2.9), ...]

``busy`` is the whole machine's non-idle CPU seconds in that step (20 = both cores of this
machine for 10 s). A group's figure can be negative in the step where its processes exit. Used
for the per-process splits in docs/benchmarks.md::

    python -m bench.cpu_sampler --seconds 600 > cpu.log &
    bench/converge --tenants 1000 --scenario converge
"""

from __future__ import annotations

import argparse
import os
import time

HZ = os.sysconf("SC_CLK_TCK")


def group(cmdline: str) -> str:
    argv0 = cmdline.split(" ")[0]
    if "kube-apiserver" in cmdline:
        return "apiserver"
    if "etcd" in argv0:
        return "etcd"
    if argv0.startswith("postgres") or "/postgres" in argv0:
        return "postgres"
    if "tenancy_operator" in cmdline and " run" in cmdline:
        return "operator"
    if "bench.converge" in cmdline or "bench.soak" in cmdline:
        return "bench"
    return "other"


def snapshot() -> dict[str, int]:
    """Clock ticks used so far, per group."""
    ticks: dict[str, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        name = group(cmdline)
        own = utime + stime + (cutime + cstime if name == "postgres" else 0)
        ticks[name] = ticks.get(name, 0) + own
    return ticks


def busy_ticks() -> int:
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long to sample")
    p.add_argument("--step", type=float, default=10.0)
    args = p.parse_args()
    before, busy_before, started = snapshot(), busy_ticks(), time.monotonic()
    while time.monotonic() - started < args.seconds:
        time.sleep(args.step)  # the sampling period itself, not a synchronisation
        after, busy_after = snapshot(), busy_ticks()
        groups = set(before) | set(after)
        step = {g: round((after.get(g, 0) - before.get(g, 0)) / HZ, 1) for g in groups}
        ranked = sorted(step.items(), key=lambda kv: -kv[1])
        print(time.strftime("%H:%M:%S"), "busy", round((busy_after - busy_before) / HZ, 1), ranked, flush=True)
        before, busy_before = after, busy_after


if __name__ == "__main__":
    main()
