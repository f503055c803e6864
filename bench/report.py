"""Turns a benchmark record (bench/results/*.json) into a section of docs/benchmarks.md.

The page holds the latest figures, not a log: one section per stack and N, between HTML comments,
replaced by the next run of the same stack and N (its label only names the run in the heading).
Every run's record stays in bench/results/. Text outside the markers is written by people and
never touched.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS_MARKER = "<!-- bench:results (generated: one section per stack and N, replaced by its next run) -->"


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ok(value: float | None, limit: float, *, lower: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "yes" if (value <= limit if lower else value >= limit) else "**no**"


def section(r: dict[str, Any]) -> tuple[str, str]:
    n = r["tenants"]
    label = r.get("label") or ""
    key = f"converge:{r['stack']}:N={n}"
    s = r["scenarios"]
    c, rs, idle, fleet, flags = (s.get(k, {}) for k in ("converge", "restart", "idle", "fleet", "flags"))
    m, v = r.get("machine", {}), r.get("versions", {})
    out = [f"<!-- bench:{key} -->", f"### N = {n}, {r['stack']} stack" + (f" ({label})" if label else "")
           + f" — {r.get('when', '')}", ""]
    # Records from before the operator spoke HTTP itself name the client library they used.
    http = f"aiohttp {v['aiohttp']}" if "aiohttp" in v else f"kubernetes_asyncio {v.get('kubernetes_asyncio')}"
    out.append(f"`{r.get('command', '')}` at {r.get('git', '?')}; machine: {m.get('nproc')} cores "
               f"({m.get('cpu', '?')}), {m.get('memory')}, kernel {m.get('kernel')}; Python {v.get('python')}, "
               f"Kopf {v.get('kopf')}, {http}, psycopg {v.get('psycopg')}, "
               f"PostgreSQL {v.get('postgresql')}, Kubernetes {v.get('kubernetes')}."
               + (f" Operator settings from the environment: {r['operator_env']}." if r.get("operator_env") else
                  " Operator settings: defaults."))
    if r.get("what_if"):
        out.append(f"**What-if run**: {r['what_if']}; not the operator as shipped.")
    if r.get("notes"):
        out.append("Notes: " + "; ".join(r["notes"]) + ".")
    out += ["", "| Scenario | Measured | Target (1000 tenants) | Met | Load (1-min avg before -> after) |",
            "|---|---|---|---|---|"]
    if c:
        ratio = c.get("floor_ratio")
        lat = c.get("latency", {})
        if c.get("converged", True):
            out.append(f"| converge | {_f(c.get('seconds'), 1)} s to all Ready ({_f(c.get('throughput_per_s'), 1)} "
                       f"tenants/s; apply took {_f(c.get('apply_seconds'), 1)} s); apply-to-Ready p50/p95/p99 "
                       f"{_f(lat.get('p50'))}/{_f(lat.get('p95'))}/{_f(lat.get('p99'))} s | ≤ 60 s | "
                       f"{_ok(c.get('seconds'), 60) if n == 1000 else '-'} | {c.get('load_before_after', '')} |")
        else:
            curve = ", ".join(f"{t:.0f} s: {k}" for t, k, _ in c.get("progress_t_tenants_quotas", [])[::6])
            out.append(f"| converge | **not converged**: {c.get('tenants_ready')}/{n} tenants Ready after "
                       f"{_f(c.get('elapsed_seconds'), 0)} s ({_f(c.get('throughput_per_s'), 2)} tenants/s on "
                       f"average; Ready over time: {curve}) | ≤ 60 s | **no** | {c.get('load_before_after', '')} |")
        if "floor" in c:
            fl = c["floor"]
            out.append(f"| floor (no operator) | {_f(fl.get('seconds'), 1)} s ({_f(fl.get('throughput_per_s'), 1)} "
                       f"tenants/s); p50/p95 {_f(fl['latency'].get('p50'))}/{_f(fl['latency'].get('p95'))} s; "
                       f"operator/floor throughput = **{'at most ' if not c.get('converged', True) else ''}"
                       f"{_f(ratio, 3)}** | ≥ 0.5 | {_ok(ratio, 0.5, lower=False)} | "
                       f"{fl.get('load_before_after', '')} |")
        out.append(f"| converge: operator process | peak RSS {_f(c.get('peak_rss_mb'), 1)} MB, "
                   f"{_f(c.get('cpu_seconds'), 1)} CPU s ({_f(1000 * c.get('cpu_seconds', 0) / n, 1)} ms/tenant) "
                   "| (the RSS target is for idle, below) | - | |")
    if rs and "error" not in rs:
        done = rs.get("seconds_to_resumed", rs.get("seconds_to_idle"))
        quiet = rs.get("seconds_to_quiet", done)
        out.append((f"| restart | idle (< 3 % CPU for 3 s) with all resumed {_f(done, 1)} s after start (healthy "
                    f"after {_f(rs.get('seconds_to_healthy'), 1)} s" if "seconds_to_idle" in rs else
                    f"| restart | all resumed {_f(done, 1)} s after start (healthy after "
                    f"{_f(rs.get('seconds_to_healthy'), 1)} s; "
                    + (f"quiet (< 3 % CPU for 3 s) after {_f(quiet, 1)} s" if quiet is not None
                       else "**never quiet** within 30 s more"))
                   + f"); {rs.get('ddl')} DDL, {rs.get('status_writes')} status writes, {rs.get('api_writes')} API "
                   "writes | ≤ 20 s, 0 DDL, 0 status writes | "
                   + ("-" if n != 1000 else ("yes" if (done or 99) <= 20 and rs.get("ddl") == 0
                                             and rs.get("status_writes") == 0 else "**no**"))
                   + f" | {rs.get('load_before_after', '')} |")
    if idle and "error" not in idle:
        out.append(f"| idle ({_f(idle.get('seconds'), 0)} s) | CPU {_f(idle.get('cpu_percent'))} %, RSS "
                   f"{_f(idle.get('rss_mb'), 1)} MB (max {_f(idle.get('rss_mb_max'), 1)}) | CPU < 2 %, RSS < 250 MB | "
                   + ("-" if n != 1000 else ("yes" if idle.get("cpu_percent", 99) < 2 and idle.get("rss_mb", 999) < 250
                                             else "**no**")) + f" | {idle.get('load_before_after', '')} |")
    if fleet and "error" not in fleet:
        out.append(f"| fleet migration | {_f(fleet.get('seconds'), 1)} s until all {n} report the new migration "
                   f"({fleet.get('tenants_migrated_in_postgres')} recorded in PostgreSQL) | ≤ 60 s | "
                   + (_ok(fleet.get("seconds"), 60) if n == 1000 else "-")
                   + f" | {fleet.get('load_before_after', '')} |")
    if flags and "error" not in flags:
        lat = flags.get("latency", {})
        out.append(f"| flag propagation | p50 {_f(lat.get('p50'), 3)} s, p95 {_f(lat.get('p95'), 3)} s, max "
                   f"{_f(lat.get('max'), 3)} s over {flags.get('edits')} edits"
                   + (f" (after the operator was quiet: {_f(flags['waited_for_quiet_seconds'], 1)} s)"
                      if flags.get("waited_for_quiet_seconds") is not None else "")
                   + " | p95 < 1 s | "
                   f"{_ok(lat.get('p95'), 1)} | {flags.get('load_before_after', '')} |")
    for name in ("restart", "idle", "fleet", "flags"):
        if "error" in s.get(name, {}):
            out.append(f"| {name} | failed: {s[name]['error']} | | | |")
    out.append("")
    if c:
        out.append("<details><summary>Details: requests, statements, stages</summary>\n")
        out.append(f"- Converge, API requests (kube-apiserver's count, all clients incl. the benchmark's own "
                   f"creates and watches): {_reqs(c['api'])}; writes per tenant {c['api'].get('writes_per_tenant')}.")
        if "floor" in c:
            out.append(f"- Floor, API requests: {_reqs(c['floor']['api'])}; writes per tenant "
                       f"{c['floor']['api'].get('writes_per_tenant')}.")
        out.append(f"- Converge, SQL: {_sql(c['sql'])}.")
        if "floor" in c:
            out.append(f"- Floor, SQL: {_sql(c['floor']['sql'])}.")
        if c.get("stages"):
            st = "; ".join(f"{k} p50 {_f(v['p50'])} s / p95 {_f(v['p95'])} s" for k, v in c["stages"].items())
            out.append(f"- Where a tenant waited (from watch events): {st}. Watch MODIFIED events per tenant: "
                       f"{_f(c.get('modified_events_per_tenant'), 1)}.")
        if c.get("log_lines"):
            out.append(f"- Operator log lines by level during the run: {c['log_lines']}.")
        if c.get("profile") and "busy_by_category_percent" in c["profile"]:
            p = c["profile"]
            out.append(f"- Profile (py-spy, main thread busy {p.get('main_thread_busy_percent')} % of "
                       f"{p.get('main_thread_seconds_sampled')} s): "
                       + ", ".join(f"{k} {v} %" for k, v in p["busy_by_category_percent"].items()) + ".")
        for name in ("restart", "idle", "fleet"):
            d = s.get(name, {})
            if d and "api" in d:
                out.append(f"- {name.capitalize()}, API requests: {_reqs(d['api'])}; SQL: {_sql(d['sql'])}.")
        out.append("\n</details>")
    out.append(f"<!-- /bench:{key} -->")
    return key, "\n".join(out) + "\n"


def _reqs(api: dict[str, Any]) -> str:
    items = list(api.get("by_verb_resource", {}).items())
    return ", ".join(f"{k} {v}" for k, v in items[:16]) + (" ..." if len(items) > 16 else "")


def _sql(sql: dict[str, Any]) -> str:
    return (f"operator {sql.get('operator_statements')} statements ({sql.get('per_tenant_operator')}/tenant), tenant "
            f"logins {sql.get('tenant_statements')} ({sql.get('per_tenant_tenant_login')}/tenant), "
            f"DDL {sql.get('ddl')}, "
            f"transactions {sql.get('xacts')} ({sql.get('xacts_per_tenant')}/tenant); by role:kind "
            f"{sql.get('by_role_kind')}")


def update_docs(path: Path, result: dict[str, Any]) -> None:
    key, text = section(result)
    doc = path.read_text() if path.exists() else f"# Benchmarks\n\n{RESULTS_MARKER}\n"
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    if start in doc and end in doc:
        before, rest = doc.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        doc = before + text + ("\n" + after if after else "")
    elif RESULTS_MARKER in doc:
        before, after = doc.split(RESULTS_MARKER, 1)
        doc = before + RESULTS_MARKER + "\n\n" + text + "\n" + after.lstrip("\n")
    else:
        doc = doc.rstrip("\n") + f"\n\n{RESULTS_MARKER}\n\n{text}"
    path.write_text(doc)


if __name__ == "__main__":
    # Re-render a section from a saved record: python -m bench.report bench/results/<file>.json
    update_docs(Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[1] / "docs/benchmarks.md",
                json.loads(Path(sys.argv[1]).read_text()))
