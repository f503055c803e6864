"""Pure formatting for `kubectl tenancy`: API objects (plain dicts as the API server sends them) in,
text or JSON-ready dicts out. No I/O here, so every table and summary is unit-tested."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from tenancy_operator.api.quota import NEAR_LIMIT_RATIO
from tenancy_operator.api.tenant import serving_database
from tenancy_operator.observability.text import clean_message

PHASE_ORDER = ("Provisioning", "Active", "Suspended", "Deleting", "Failed")
ARCHIVE_REASONS = ("Archived", "ArchiveFailed", "Restored", "RestoreFailed", "RestoreRefused", "Dropped", "Retained")
"""Tenant Events that tell where a tenant's data went: what `archives` lists."""
_ARCHIVE_ID = re.compile(r"archive (\S+) ")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: Any, now: datetime) -> str:
    """kubectl's short age (`45s`, `12m`, `5h`, `3d`); `-` when unknown."""
    when = parse_time(value)
    if when is None:
        return "-"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= size):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> str:
    """Columns aligned like kubectl's (three spaces apart); the last column is not padded."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        lines.append(indent + "   ".join(padded).rstrip())
    return "\n".join(lines)


def condition(body: Mapping[str, Any], type_: str) -> dict[str, Any]:
    return next((dict(c) for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


@dataclass(frozen=True)
class Pressure:
    """The fullest limit of a tenant's Quota(s): used / hard."""

    quota: str
    limit: str
    ratio: float
    used: str | None
    hard: str | None

    def short(self) -> str:
        return f"{round(self.ratio * 100)}% {self.limit}"


def quota_pressure(quotas: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Pressure]:
    """(namespace, tenant) -> the highest usage ratio of the Quotas naming that tenant."""
    out: dict[tuple[str, str], Pressure] = {}
    for q in quotas:
        namespace, name = _key(q)
        tenant = ((q.get("spec") or {}).get("tenantRef") or {}).get("name")
        status = q.get("status") or {}
        ratios = status.get("usageRatio") or {}
        if not tenant or not ratios:
            continue
        limit, ratio = max(ratios.items(), key=lambda kv: (float(kv[1]), kv[0]))
        candidate = Pressure(name, str(limit), float(ratio), (status.get("used") or {}).get(limit),
                             (status.get("hard") or {}).get(limit))
        current = out.get((namespace, str(tenant)))
        if current is None or candidate.ratio > current.ratio:
            out[(namespace, str(tenant))] = candidate
    return out


def job_text(job: Mapping[str, Any] | None) -> str:
    if not job:
        return "-"
    text = f"{job.get('kind', '?')} {job.get('state', '?')}"
    if int(job.get("attempt") or 1) > 1:
        text += f" (attempt {job['attempt']})"
    return text


@dataclass(frozen=True)
class FleetRow:
    namespace: str
    name: str
    phase: str
    ready: str
    """True, False or Unknown (no Ready condition yet)."""
    reason: str
    message: str
    tier: str
    version: str
    quota: str
    quota_ratio: float | None
    job: str
    reconciling: bool
    """The operator has not reported on the latest generation yet."""


def fleet_rows(tenants: Iterable[Mapping[str, Any]], quotas: Iterable[Mapping[str, Any]]) -> list[FleetRow]:
    pressure = quota_pressure(quotas)
    rows = []
    for t in tenants:
        namespace, name = _key(t)
        meta, status = t.get("metadata") or {}, t.get("status") or {}
        ready = condition(t, "Ready")
        p = pressure.get((namespace, name))
        generation = int(meta.get("generation") or 0)
        observed = int(status.get("observedGeneration") or 0)
        rows.append(FleetRow(
            namespace=namespace, name=name,
            phase=str(("Deleting" if meta.get("deletionTimestamp") else None) or status.get("phase") or "Provisioning"),
            ready=str(ready.get("status") or "Unknown"),
            reason=str(ready.get("reason") or ""), message=str(ready.get("message") or ""),
            tier=str((t.get("spec") or {}).get("tier") or "free"),
            version=str(status.get("schemaVersion") or "-"),
            quota=p.short() if p else "-", quota_ratio=p.ratio if p else None,
            job=job_text(status.get("currentJob")),
            reconciling=observed < generation,
        ))
    return sorted(rows, key=lambda r: (r.namespace, r.name))


def fleet_table(rows: Sequence[FleetRow], *, all_namespaces: bool) -> str:
    headers = ["NAMESPACE"] if all_namespaces else []
    headers += ["NAME", "PHASE", "READY", "TIER", "VERSION", "QUOTA", "JOB"]
    body = []
    for r in rows:
        ready = r.ready if r.ready == "True" else f"{r.ready} ({r.reason})" if r.reason else r.ready
        if r.reconciling:
            ready += " *"
        cells = [r.namespace] if all_namespaces else []
        body.append([*cells, r.name, r.phase, ready, r.tier, r.version, r.quota, r.job])
    return table(headers, body)


def fleet_summary(rows: Sequence[FleetRow]) -> dict[str, Any]:
    phases = Counter(r.phase for r in rows)
    failures = Counter(r.reason for r in rows if r.ready == "False" and r.reason)
    versions = Counter(r.version for r in rows if r.version != "-")
    return {
        "tenants": len(rows),
        "phases": {p: phases[p] for p in (*PHASE_ORDER, *sorted(set(phases) - set(PHASE_ORDER))) if phases[p]},
        "notReady": sum(1 for r in rows if r.ready != "True"),
        "failures": dict(sorted(failures.items())),
        "versions": dict(sorted(versions.items())),
        "nearQuota": sum(1 for r in rows if r.quota_ratio is not None and r.quota_ratio >= NEAR_LIMIT_RATIO),
        "reconciling": sum(1 for r in rows if r.reconciling),
    }


def summary_text(summary: Mapping[str, Any]) -> str:
    if not summary["tenants"]:
        return "No tenants."
    parts = [f"{summary['tenants']} tenant(s): " + ", ".join(f"{n} {p}" for p, n in summary["phases"].items())]
    if summary["notReady"]:
        failures = ", ".join(f"{reason} {n}" for reason, n in summary["failures"].items())
        parts.append(f"{summary['notReady']} not ready" + (f" ({failures})" if failures else ""))
    if summary["versions"]:
        parts.append("versions: " + ", ".join(f"{v} ({n})" for v, n in summary["versions"].items()))
    if summary["nearQuota"]:
        parts.append(f"{summary['nearQuota']} at >= {round(NEAR_LIMIT_RATIO * 100)}% of a quota limit")
    if summary["reconciling"]:
        parts.append(f"{summary['reconciling']} with changes not yet reported (*)")
    return "; ".join(parts)


def fleet_json(rows: Sequence[FleetRow]) -> dict[str, Any]:
    return {"summary": fleet_summary(rows), "tenants": [asdict(r) for r in rows]}


# --- describe ---------------------------------------------------------------------------------


def flag_targets(flags: Iterable[Mapping[str, Any]], tenant: str) -> list[dict[str, Any]]:
    """The FeatureFlags whose overrides name ``tenant``: what each gives it."""
    out = []
    for f in flags:
        spec = f.get("spec") or {}
        name = _key(f)[1]
        rule = next((t for t in spec.get("tenants") or [] if t.get("tenant") == tenant), None)
        users = {str(u.get("user")): str(u.get("variant"))
                 for u in spec.get("users") or [] if u.get("tenant") == tenant}
        if rule is None and not users:
            continue
        parts = []
        if rule is not None:
            variant = rule.get("variant")
            if rule.get("percentage") is not None:
                parts.append(f"{rule['percentage']}% of its users get {variant or 'the rollout variant'}")
            else:
                parts.append(f"all its users get {variant}")
        if users:
            parts.append(f"{len(users)} user override(s): "
                         + ", ".join(f"{u}={v}" for u, v in sorted(users.items())[:5])
                         + (", ..." if len(users) > 5 else ""))
        out.append({
            "name": name, "key": (f.get("status") or {}).get("key") or spec.get("key") or name,
            "enabled": spec.get("enabled", True), "override": "; ".join(parts),
            "ready": condition(f, "Ready").get("status") or "Unknown",
        })
    return sorted(out, key=lambda x: str(x["name"]))


def event_time(event: Mapping[str, Any]) -> str | None:
    value = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") \
        or (event.get("metadata") or {}).get("creationTimestamp")
    return str(value) if value else None


def sorted_events(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Oldest first, like kubectl describe."""
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(events, key=lambda e: parse_time(event_time(e)) or epoch)


def archive_rows(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tenant Events about archives, restores and what happened to the data at deletion."""
    out = []
    for e in sorted_events(events):
        if e.get("reason") not in ARCHIVE_REASONS:
            continue
        involved = e.get("involvedObject") or {}
        if involved.get("kind") not in (None, "Tenant"):
            continue
        message = str(e.get("message") or "")
        match = _ARCHIVE_ID.search(message) if e.get("reason") in ("Archived", "Restored") else None
        out.append({
            "namespace": involved.get("namespace") or (e.get("metadata") or {}).get("namespace"),
            "tenant": involved.get("name"), "uid": involved.get("uid"), "reason": e.get("reason"),
            "archive": match.group(1) if match else None, "time": event_time(e), "message": message,
        })
    return out


def archive_objects(items: Iterable[Mapping[str, Any]], tenant: str | None = None) -> list[dict[str, Any]]:
    """TenantArchive objects (the durable list), newest first; ``tenant``: of that Tenant only."""
    out = []
    for item in items:
        meta, status = item.get("metadata") or {}, item.get("status") or {}
        source = status.get("tenant") or {}
        if tenant and source.get("name") != tenant:
            continue
        out.append({
            "namespace": meta.get("namespace"), "name": meta.get("name"), "tenant": source.get("name"),
            "target": status.get("target"), "sizeBytes": status.get("sizeBytes"), "sha256": status.get("sha256"),
            "location": status.get("location"), "createdAt": status.get("createdAt"),
            "expiresAt": status.get("expiresAt"), "protected": bool((item.get("spec") or {}).get("protected")),
            "phase": status.get("phase"),
        })
    return sorted(out, key=lambda r: str(r["createdAt"] or ""), reverse=True)


def archive_objects_table(rows: Sequence[Mapping[str, Any]], now: datetime, *, all_namespaces: bool) -> str:
    headers = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "TENANT", "TARGET", "SIZE", "AGE", "EXPIRES",
                                                            "PROTECTED", "PHASE"]
    body = [([r["namespace"]] if all_namespaces else [])
            + [r["name"], r["tenant"] or "-", r["target"] or "-", r["sizeBytes"] if r["sizeBytes"] is not None else "-",
               age(r["createdAt"], now), r["expiresAt"] or "-", "yes" if r["protected"] else "no", r["phase"] or "-"]
            for r in rows]
    return table(headers, body)


def archives_table(rows: Sequence[Mapping[str, Any]], now: datetime, *, all_namespaces: bool) -> str:
    headers = (["NAMESPACE"] if all_namespaces else []) + ["TENANT", "EVENT", "ARCHIVE", "AGE", "MESSAGE"]
    body = [([r["namespace"]] if all_namespaces else [])
            + [r["tenant"], r["reason"], r["archive"] or "-", age(r["time"], now), r["message"]] for r in rows]
    return table(headers, body)


def _field(label: str, value: Any) -> str:
    return f"{label + ':':<16}{'-' if value is None or value == '' else value}"


def _presence(present: bool | None) -> str:
    return "" if present else " (missing)" if present is not None else " (not readable with your access)"


def _database_text(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """Where the tenant serves from, and where spec.database asks it to be if that differs (a
    move not done yet, refused or failed: the Ready condition says which)."""
    wanted = str(spec.get("database", "default"))
    serving = serving_database({"spec": spec, "status": status})
    return serving if serving == wanted else f"{serving} (spec asks for {wanted}: see Ready)"


def _move_text(move: Mapping[str, Any] | None, now: datetime) -> str | None:
    if not move:
        return None
    text = f"{move.get('source')} -> {move.get('destination')}"
    if move.get("finishedAt"):
        text += f", {age(move['finishedAt'], now)} ago"
    if move.get("writeDowntimeSeconds") is not None:
        text += f", writes stopped {float(move['writeDowntimeSeconds']):.1f} s"
    if move.get("tables") is not None:
        text += f", {move['tables']} table(s) / {move.get('rows', 0)} row(s) verified"
    if move.get("archive"):
        text += f", from archive {move['archive']}"
    return text


def describe_text(tenant: Mapping[str, Any], *, quotas: Sequence[Mapping[str, Any]],
                  flags: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]],
                  secrets_present: Mapping[str, bool | None], now: datetime) -> str:
    """`kubectl tenancy describe`: everything the API server knows about one tenant. Secrets are
    only named (and whether they exist), never read out."""
    meta, spec, status = tenant.get("metadata") or {}, tenant.get("spec") or {}, tenant.get("status") or {}
    creds_spec, creds = spec.get("credentials") or {}, status.get("credentials") or {}
    out = [
        _field("Name", meta.get("name")),
        _field("Namespace", meta.get("namespace")),
        _field("Display name", spec.get("displayName")),
        _field("Phase", ("Deleting" if meta.get("deletionTimestamp") else None) or status.get("phase")),
        _field("State", spec.get("state", "Active")),
        _field("Tier", spec.get("tier", "free")),
        _field("Database", _database_text(spec, status)),
        _field("Last move", _move_text(status.get("lastMove"), now)),
        _field("Schema", f"{status['schema']} (version {status.get('schemaVersion') or 'none'})"
               if status.get("schema") else None),
        _field("Role", status.get("role")),
        _field("Tenant ID", status.get("tenantId")),
        _field("Template", spec.get("schemaTemplate")),
        _field("Deletion", f"{spec.get('deletionPolicy', 'Retain')} "
                           f"(archives kept {spec.get('archiveRetention', '30d')})"),
        _field("Restore from", spec.get("restoreFrom")),
        _field("Generation", f"{meta.get('generation')} (observed {status.get('observedGeneration', 0)})"),
        _field("Age", age(meta.get("creationTimestamp"), now)),
        "",
        "Conditions:",
    ]
    conds = status.get("conditions") or []
    if conds:
        out.append(table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"],
                         [[c.get("type"), c.get("status"), c.get("reason"), age(c.get("lastTransitionTime"), now),
                           c.get("message")] for c in conds], indent="  "))
    else:
        out.append("  none reported yet")

    secret = status.get("secretName") or f"{meta.get('name')}-db"
    out += ["", "Credentials (values are never shown):"]
    out.append("  " + _field("Secret", secret + _presence(secrets_present.get(secret, False))))
    out.append("  " + _field("Login", creds.get("user")))
    out.append("  " + _field("Last rotated", creds.get("lastRotatedAt")))
    out.append("  " + _field("Next rotation", creds.get("nextRotationAt")
                             or ("on demand only" if not creds_spec.get("rotateEvery") else None)))
    if creds.get("retiringUser"):
        out.append("  " + _field("Retiring", f"{creds['retiringUser']} until {creds.get('retiringAt')}"))
    out.append("  " + _field("Grace period", creds_spec.get("gracePeriod", "5m")))
    if creds_spec.get("readOnlyLogin"):
        ro = f"{meta.get('name')}-db-readonly"
        out.append("  " + _field("Read-only", ro + _presence(secrets_present.get(ro, False))))

    out += ["", "Jobs (newest first):"]
    current = status.get("currentJob")
    if current:
        out.append(f"  Needs attention: {job_text(current)}: {current.get('message') or ''}".rstrip(": "))
    jobs = status.get("recentJobs") or []
    if jobs:
        out.append(table(["KIND", "STATE", "ATTEMPT", "STARTED", "FINISHED", "BY", "MESSAGE"],
                         [[j.get("kind"), j.get("state"), j.get("attempt", 1), age(j.get("startedAt"), now),
                           age(j.get("finishedAt"), now) if j.get("finishedAt") else "-", j.get("requestedBy") or "-",
                           j.get("message") or ""]
                          for j in jobs], indent="  "))
    else:
        out.append("  none reported")

    out += ["", "Quota:"]
    mine = [q for q in quotas if ((q.get("spec") or {}).get("tenantRef") or {}).get("name") == meta.get("name")]
    limits = status.get("effectiveLimits") or {}
    if not mine:
        out.append("  no Quota names this tenant" + (" (tier defaults apply)" if not limits else ""))
    for q in mine:
        qs = q.get("status") or {}
        hard, used, ratio = qs.get("hard") or {}, qs.get("used") or {}, qs.get("usageRatio") or {}
        flagged = [c["type"] for c in qs.get("conditions") or []
                   if c.get("type") != "Ready" and c.get("status") == "True"]
        out.append(f"  {_key(q)[1]}" + (f" ({', '.join(flagged)})" if flagged else "")
                   + (f", measured {age(qs.get('lastMeasuredAt'), now)} ago" if qs.get("lastMeasuredAt") else ""))
        names = sorted(set(hard) | set(used))
        out.append(table(["LIMIT", "USED", "HARD", "RATIO"],
                         [[n, used.get(n, "-"), hard.get(n, "-"),
                           f"{round(float(ratio[n]) * 100)}%" if n in ratio else "-"] for n in names], indent="    "))
        for o in qs.get("activeOverrides") or []:
            out.append(f"    override {o.get('limit')}={o.get('value')} until {o.get('expiresAt')}"
                       + (f" ({o['reason']})" if o.get("reason") else ""))
    if limits:
        out.append("  Effective limits: " + ", ".join(f"{k}={v}" for k, v in sorted(limits.items())))

    out += ["", "Feature flags targeting it:"]
    targets = flag_targets(flags, str(meta.get("name")))
    if targets:
        out.append(table(["FLAG", "KEY", "ENABLED", "OVERRIDE"],
                         [[f["name"], f["key"], f["enabled"], f["override"]] for f in targets], indent="  "))
    else:
        out.append("  none (the flags' rollouts apply)")

    out += ["", "Archives (from Events; Events expire, see docs/kubectl-plugin.md):"]
    archived = archive_rows(events)
    if archived:
        out.append(table(["EVENT", "ARCHIVE", "AGE", "MESSAGE"],
                         [[r["reason"], r["archive"] or "-", age(r["time"], now), r["message"]] for r in archived],
                         indent="  "))
    else:
        out.append("  none recorded")

    out += ["", "Events:"]
    if events:
        out.append(table(["TYPE", "REASON", "AGE", "MESSAGE"],
                         [[e.get("type"), e.get("reason"), age(event_time(e), now)
                           + (f" (x{e['count']})" if int(e.get("count") or 1) > 1 else ""), e.get("message")]
                          for e in sorted_events(events)[-20:]], indent="  "))
    else:
        out.append("  none")
    return "\n".join(out)


def rollout_rows(schema_rollouts: Iterable[Mapping[str, Any]],
                 flags: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """SchemaRollouts, and FeatureFlags with stepped rollouts, as one list: where each stands."""
    rows: list[dict[str, Any]] = []
    for body in schema_rollouts:
        st = body.get("status") or {}
        rows.append({
            "kind": "SchemaRollout", "namespace": body["metadata"]["namespace"], "name": body["metadata"]["name"],
            "phase": st.get("phase") or "-",
            "position": f"wave {st.get('wave') or '-'}/{st.get('waves') or '-'} of {st.get('targetVersion') or '-'}",
            "progress": (f"{st.get('migrated', 0)} migrated, {st.get('failed', 0)} failed, "
                         f"{st.get('pending', 0)} pending"),
            "message": st.get("message") or "",
        })
    for body in flags:
        if not ((body.get("spec") or {}).get("rollout") or {}).get("steps"):
            continue
        st = (body.get("status") or {}).get("rollout") or {}
        due = f", next step at {st['nextStepAt']}" if st.get("nextStepAt") else ""
        rows.append({
            "kind": "FeatureFlag", "namespace": body["metadata"]["namespace"], "name": body["metadata"]["name"],
            "phase": st.get("phase") or "-",
            "position": f"step {st.get('step') or '-'}/{st.get('steps') or '-'}",
            "progress": f"{st.get('percentage', 0)}% served{due}",
            "message": st.get("message") or "",
        })
    return sorted(rows, key=lambda r: (r["namespace"], r["kind"], r["name"]))


def rollouts_table(rows: Sequence[Mapping[str, Any]], *, all_namespaces: bool) -> str:
    headers = [*(["NAMESPACE"] if all_namespaces else []), "KIND", "NAME", "PHASE", "WHERE", "PROGRESS", "MESSAGE"]
    return table(headers, ([*([r["namespace"]] if all_namespaces else []), r["kind"], r["name"], r["phase"],
                            r["position"], r["progress"], clean_message(r["message"], 100)] for r in rows))
