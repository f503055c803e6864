"""Soak: steady churn (create, update, delete Tenants; edit FeatureFlags) against the real operator,
sampling its memory and error counts over time.

    .venv/bin/python -m bench.soak --minutes 30            # own temporary stack
    .venv/bin/python -m bench.soak --minutes 5 --base 100 --period 5

Every ``--period`` seconds: one new Tenant (with its Quota), one update of an existing Tenant
(tier or display name; every 10th a credentials rotation), one deletion of the oldest churned
Tenant (deletionPolicy Delete: schema and role dropped), every 2nd period one Tenant created and
deleted at once, and every 3rd period one FeatureFlag edit.
The population stays at ``--base``. Every 5 s: the operator's RSS and CPU, its log lines by level,
``reconcile_failures_total``, the benchmark's own API errors and how many Tenants are not Ready.

Writes docs/soak.png (RSS and errors over time), a JSON record in bench/results/, a section of
docs/benchmarks.md, and ends with:

    soak minutes=M rss_start_mb=A rss_end_mb=B rss_slope_mb_per_hour=S errors=E leftovers=L

L: roles, schemas and live registry rows of deleted tenants still there at the end (all should be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from bench.common import (
    ROOT,
    Operator,
    Stack,
    flag_obj,
    git_describe,
    is_ready,
    loadavg,
    log,
    machine,
    quota_obj,
    template_cm,
    tenant_name,
    tenant_obj,
)
from bench.kube import Kube, Watcher, apply_all
from tenancy_operator.api.tenant import tenant_identifier

SAMPLE_SECONDS = 5.0
LEFTOVER_DEADLINE_SECONDS = 120.0
FLAGS = 3


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 3:
        return math.nan
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return math.nan
    return 3600 * sum((p[0] - mx) * (p[1] - my) for p in points) / var


class Soak:
    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.run_id = uuid.uuid4().hex[:6]
        self.ns = f"soak-{self.run_id}"
        self.workdir = Path(tempfile.gettempdir()) / "tenancy-bench-runs" / f"soak-{self.run_id}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.operator = Operator(stack.kubeconfig, stack.operator_dsn, self.workdir)
        self.samples: list[dict[str, Any]] = []
        self.driver_errors = 0
        self.ops = {"create": 0, "update": 0, "delete": 0, "blink": 0, "flag": 0, "rotate": 0}
        self.live: list[str] = []
        self.next_index = 0
        self.leftovers: dict[str, int] = {}

    async def run(self) -> dict[str, Any]:
        kube = self.kube = await Kube.connect(self.stack.kubeconfig)
        try:
            await kube.ensure_namespace(self.ns)
            await kube.create(self.ns, template_cm())
            await asyncio.to_thread(self.operator.start)
            w = self.watcher = await Watcher(kube, self.ns).start()
            base = [self._new_name() for _ in range(self.args.base)]
            objs: list[dict[str, Any]] = []
            for name in base:
                objs += self._tenant(name)
            objs += [flag_obj(i, base) for i in range(FLAGS)]
            log(f"soak: {len(base)} base tenants, then churn every {self.args.period}s for {self.args.minutes} min")
            await apply_all(kube, self.ns, objs, w)
            self.live = list(base)
            await w.wait_for(lambda: w.count("tenants") >= len(base), max(600.0, 3.0 * len(base)), "base Ready",
                             lambda: f"{w.count('tenants')}/{len(base)}")
            self.t0 = time.monotonic()
            sampler = asyncio.get_running_loop().create_task(self._sample_forever())
            end = self.t0 + 60 * self.args.minutes
            period = 0
            while time.monotonic() < end:
                tick = time.monotonic()
                await self._churn(period)
                period += 1
                await asyncio.sleep(max(0.0, self.args.period - (time.monotonic() - tick)))  # the churn's pace
            log("soak: churn over; waiting for the operator to catch up")
            with contextlib.suppress(TimeoutError):
                await w.wait_for(lambda: self._not_ready() == 0, 600, "all live tenants Ready")
            await self._sample()
            self.leftovers = await self._wait_for_leftovers()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        finally:
            await asyncio.to_thread(self.operator.stop)
            with contextlib.suppress(Exception):
                await self.watcher.stop()
            await kube.close()
        return self._summary()

    def _new_name(self) -> str:
        name = tenant_name("s", self.next_index)
        self.next_index += 1
        return name

    def _tenant(self, name: str) -> list[dict[str, Any]]:
        t = tenant_obj(name)
        t["spec"]["deletionPolicy"] = "Delete"
        return [t, quota_obj(name)]

    async def _churn(self, period: int) -> None:
        kube, ns = self.kube, self.ns
        try:
            name = self._new_name()
            for obj in self._tenant(name):
                self.watcher.track(("tenants" if obj["kind"] == "Tenant" else "quotas", name)).sent = time.monotonic()
                await kube.create(ns, obj)
            self.live.append(name)
            self.ops["create"] += 1
            victim = random.choice(self.live[:-1])
            if period % 10 == 9:
                patch: dict[str, Any] = {"metadata": {"annotations": {"tenancy.dev/rotate-credentials": str(period)}}}
                self.ops["rotate"] += 1
            else:
                patch = {"spec": {"displayName": f"Soak {victim} {period}",
                                  "tier": random.choice(["free", "starter", "professional"])}}
            await kube.patch(ns, "tenants", victim, patch)
            self.ops["update"] += 1
            old = self.live.pop(0)
            await kube.delete(ns, "quotas", old)
            await kube.delete(ns, "tenants", old)
            self.ops["delete"] += 1
            if period % 2 == 0:  # created and deleted at once: a GitOps change reverted
                blink = self._new_name()
                await kube.create(ns, self._tenant(blink)[0])
                await kube.delete(ns, "tenants", blink)
                self.ops["blink"] += 1
            if period % 3 == 0:
                flag = f"bench-flag-{period % FLAGS}"
                await kube.patch(ns, "featureflags", flag, {"spec": {"rollout": {"percentage": period % 100}}})
                self.ops["flag"] += 1
        except ApiException as exc:
            self.driver_errors += 1
            log(f"soak: API error {exc.status} {exc.reason}")

    def _leftovers(self) -> dict[str, int]:
        """What the deleted tenants left in PostgreSQL (all 0 when every deletion ran to its end,
        and nothing, such as a sweep's stale snapshot, provisioned one again)."""
        live = set(self.live)
        gone = [tenant_identifier(n) for n in (tenant_name("s", i) for i in range(self.next_index)) if n not in live]
        with self.stack.admin() as conn:
            def count(query: str, *params: Any) -> int:
                row = conn.execute(query, params).fetchone()
                return int(row[0]) if row else 0
            return {
                "roles": count("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", gone),
                "schemas": count("SELECT count(*) FROM pg_namespace WHERE nspname = ANY(%s)", gone),
                "registry_rows": count("SELECT count(*) FROM tenancy.tenants WHERE namespace = %s"
                                       " AND schema_name = ANY(%s) AND state <> 'dropped'", self.ns, gone),
            }

    async def _wait_for_leftovers(self) -> dict[str, int]:
        """The last deletions may still be running when the live tenants are Ready: poll with a deadline."""
        deadline = time.monotonic() + LEFTOVER_DEADLINE_SECONDS
        while True:
            found = await asyncio.to_thread(self._leftovers)
            if not any(found.values()) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(1.0)  # polling interval

    def _not_ready(self) -> int:
        live = set(self.live)
        return sum(1 for (p, n), o in list(self.watcher.objects.items()) if p == "tenants" and n in live
                   and not is_ready(o))

    async def _sample_forever(self) -> None:
        while True:
            await self._sample()
            await asyncio.sleep(SAMPLE_SECONDS)  # sampling interval

    async def _sample(self) -> None:
        s = self.operator.sample()
        levels = await asyncio.to_thread(self.operator.log_counts)
        try:
            failures = await asyncio.to_thread(self.operator.metric, "reconcile_failures_total")
        except OSError:
            failures = math.nan
        self.samples.append({
            "t": s.t - self.t0, "rss_mb": s.rss_mb, "cpu_seconds": s.cpu_seconds,
            "log_errors": levels.get("error", 0) + levels.get("critical", 0), "log_warnings": levels.get("warning", 0),
            "reconcile_failures": failures, "driver_errors": self.driver_errors, "not_ready": self._not_ready(),
            "load1": float(loadavg().split()[0]),
        })

    def _summary(self) -> dict[str, Any]:
        s = self.samples
        if not s:
            return {"error": "no samples"}
        half = [(x["t"], x["rss_mb"]) for x in s if x["t"] >= s[-1]["t"] / 2]
        minutes = s[-1]["t"] / 60
        return {
            "minutes": round(minutes, 1), "period_seconds": self.args.period, "base_tenants": self.args.base,
            "ops": self.ops, "rss_start_mb": s[0]["rss_mb"], "rss_end_mb": s[-1]["rss_mb"],
            "rss_max_mb": max(x["rss_mb"] for x in s),
            "rss_slope_mb_per_hour_second_half": slope_per_hour(half),
            "cpu_seconds": s[-1]["cpu_seconds"] - s[0]["cpu_seconds"],
            "cpu_percent": 100 * (s[-1]["cpu_seconds"] - s[0]["cpu_seconds"]) / max(1e-9, s[-1]["t"] - s[0]["t"]),
            "log_errors": s[-1]["log_errors"] - s[0]["log_errors"],
            "log_warnings": s[-1]["log_warnings"] - s[0]["log_warnings"],
            "reconcile_failures": s[-1]["reconcile_failures"] - s[0]["reconcile_failures"],
            "driver_errors": self.driver_errors, "not_ready_at_end": s[-1]["not_ready"],
            "max_not_ready": max(x["not_ready"] for x in s), "leftovers_of_deleted": self.leftovers, "samples": s,
            "operator_log": str(self.operator.log_path),
        }


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["samples"]
    t = [x["t"] / 60 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [x["rss_mb"] for x in s], color="tab:blue")
    axes[0].set_ylabel("operator RSS (MB)")
    axes[0].set_ylim(0, 1.25 * max(x["rss_mb"] for x in s))
    axes[0].grid(alpha=0.3)
    axes[0].set_title(title, fontsize=10)
    base = s[0]
    for key, label, color in (("log_errors", "ERROR log lines", "tab:red"),
                              ("log_warnings", "WARNING log lines", "tab:orange"),
                              ("reconcile_failures", "reconcile_failures_total", "tab:purple"),
                              ("driver_errors", "benchmark API errors", "tab:gray")):
        axes[1].plot(t, [x[key] - base[key] for x in s], label=label, color=color)
    axes[1].set_ylabel("errors (cumulative)")
    axes[1].legend(fontsize=8, loc="upper left")
    axes[1].grid(alpha=0.3)
    axes[2].plot(t, [x["not_ready"] for x in s], color="tab:green", label="live Tenants not Ready")
    axes[2].plot(t, [x["load1"] for x in s], color="tab:brown", alpha=0.6, label="machine load (1 min)")
    axes[2].set_ylabel("backlog / load")
    axes[2].set_xlabel("minutes of churn")
    axes[2].legend(fontsize=8, loc="upper left")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def docs_section(r: dict[str, Any]) -> str:
    s = r["soak"]
    m, v = r["machine"], r["versions"]
    return "\n".join([
        "<!-- bench:soak -->",
        f"### Soak, {s['minutes']} min — {r['when']}", "",
        f"`{r['command']}` at {r.get('git', '?')}; {m['nproc']} cores, {m['memory']}; Python {v.get('python')}, "
        f"Kopf {v.get('kopf')}, PostgreSQL {v.get('postgresql')}, Kubernetes {v.get('kubernetes')}. "
        f"Churn every {s['period_seconds']} s "
        f"on {s['base_tenants']} live tenants: {s['ops']}."
        + (f" Operator settings from the environment: {r['operator_env']}." if r.get("operator_env") else ""), "",
        "| RSS start / end / max | RSS slope (2nd half) | CPU | ERROR / WARNING log lines | reconcile failures |"
        " benchmark API errors | not Ready at end (max during) | left by deleted tenants |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['rss_start_mb']:.1f} / {s['rss_end_mb']:.1f} / {s['rss_max_mb']:.1f} MB | "
        f"{s['rss_slope_mb_per_hour_second_half']:+.1f} MB/h | {s['cpu_percent']:.1f} % | {s['log_errors']} / "
        f"{s['log_warnings']} | {s['reconcile_failures']:.0f} | {s['driver_errors']} | {s['not_ready_at_end']} "
        f"({s['max_not_ready']}) | {_leftover_text(s.get('leftovers_of_deleted'))} |", "",
        "![soak: RSS and errors over time](soak.png)", "",
        "<!-- /bench:soak -->", ""])


def _leftover_text(found: dict[str, int] | None) -> str:
    if found is None:
        return "not measured"
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in found.items())


def update_docs(path: Path, section: str) -> None:
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = "<!-- bench:soak -->", "<!-- /bench:soak -->"
    if start in doc and end in doc:
        before, rest = doc.split(start, 1)
        doc = before + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n## Soak\n\n" + section
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--base", type=int, default=100, help="live tenants during the churn")
    p.add_argument("--period", type=float, default=5.0, help="seconds between churn rounds")
    p.add_argument("--stack", choices=("own", "dev"), default="own")
    p.add_argument("--png", default=str(ROOT / "docs/soak.png"))
    p.add_argument("--docs", default=str(ROOT / "docs/benchmarks.md"), help="'' for none")
    args = p.parse_args(argv)
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    stack = Stack.own() if args.stack == "own" else Stack.dev()
    soak = Soak(args, stack)
    record: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "git": git_describe(),
                              "machine": machine(), "versions": stack.versions(),
                              "operator_env": {k: v for k, v in os.environ.items() if k.startswith("TENANCY_")}}
    try:
        record["soak"] = asyncio.run(soak.run())
    finally:
        stack.close()
    out = ROOT / "bench/results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    s = record["soak"]
    plot(s, Path(args.png), f"tenancy-operator soak: {s['base_tenants']} live tenants, churn every "
         f"{s['period_seconds']:.0f} s ({record['when']})")
    if args.docs:
        update_docs(Path(args.docs), docs_section(record))
    log(f"soak: results {out}, plot {args.png}")
    print(f"soak minutes={s['minutes']} rss_start_mb={s['rss_start_mb']:.1f} rss_end_mb={s['rss_end_mb']:.1f} "
          f"rss_slope_mb_per_hour={s['rss_slope_mb_per_hour_second_half']:.1f} "
          f"errors={s['log_errors'] + s['driver_errors']} "
          "leftovers=" + ",".join(f"{k}:{v}" for k, v in s["leftovers_of_deleted"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
