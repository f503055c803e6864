"""The Argo CD health check (helm/tenancy-operator/argocd/health.lua) run by real Lua interpreters.

Argo CD runs health scripts with gopher-lua (Lua 5.1); we run the script with Debian's lua5.1 and
lua5.4 (hack/install-system-deps.sh installs both) on sample objects shaped like ours.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "tenancy-operator"
SCRIPT = CHART / "argocd" / "health.lua"
INTERPRETERS = ("lua5.1", "lua5.4")
KINDS = ("Tenant", "Quota", "FeatureFlag", "SchemaRollout")


def lua_literal(value: Any) -> str:
    """A Python value (as parsed from JSON/YAML) as a Lua table constructor."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def health(obj: dict[str, Any], interpreter: str) -> tuple[str, str]:
    """Run the script as Argo CD does: ``obj`` is a global, the chunk returns a table."""
    program = (
        f"obj = {lua_literal(obj)}\n"
        f"local hs = (function()\n{SCRIPT.read_text()}\nend)()\n"
        'io.write(hs.status, "\\n", hs.message or "")\n'
    )
    exe = shutil.which(interpreter)
    assert exe is not None, f"{interpreter} is missing: run hack/install-system-deps.sh"
    out = subprocess.run([exe, "-"], input=program, capture_output=True, text=True, timeout=10, check=True)
    status, _, message = out.stdout.partition("\n")
    return status, message


def cond(type_: str, status: str, reason: str, message: str = "", generation: int | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message,
                         "lastTransitionTime": "2026-01-01T00:00:00Z"}
    if generation is not None:
        c["observedGeneration"] = generation
    return c


def obj(kind: str = "Tenant", generation: int = 3, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "tenancy.dev/v1alpha1", "kind": kind,
        "metadata": {"name": "acme-corp", "namespace": "acme", "generation": generation, **meta},
        "spec": {},
    }
    if status is not None:
        body["status"] = status
    return body


READY = cond("Ready", "True", "Provisioned", "tenant is Active", 3)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status yet", obj(), "Progressing", "Waiting for the operator"),
    ("the CRD's default status", obj(status={"observedGeneration": 0, "phase": "Provisioning"}),
     "Progressing", "generation 3"),
    ("status of an older generation", obj(status={"observedGeneration": 2, "conditions": [READY]}),
     "Progressing", "generation 3"),
    ("condition of an older generation", obj(status={
        "observedGeneration": 3, "conditions": [cond("Ready", "True", "Provisioned", "", 2)]}),
     "Progressing", "generation 3"),
    ("ready and current", obj(status={"observedGeneration": 3, "phase": "Active", "conditions": [READY]}),
     "Healthy", "Provisioned: tenant is Active"),
    ("first sight: Ready=Unknown, Reconciling", obj(status={"observedGeneration": 3, "phase": "Provisioning",
        "conditions": [cond("Ready", "Unknown", "Provisioning", "provisioning started", 3),
                       cond("Reconciling", "True", "Provisioning", "provisioning started", 3)]}),
     "Progressing", "Provisioning: provisioning started"),
    ("retrying after a transient error", obj(status={"observedGeneration": 3, "phase": "Provisioning",
        "conditions": [cond("Ready", "False", "DatabaseUnavailable", "database 'default' unavailable", 3),
                       cond("Reconciling", "True", "Retrying", "database 'default' unavailable", 3)]}),
     "Progressing", "DatabaseUnavailable: database 'default' unavailable"),
    ("stalled", obj(status={"observedGeneration": 3, "phase": "Failed",
        "conditions": [cond("Ready", "False", "Conflict", "schema tenant_acme_corp already belongs to x/y", 3),
                       cond("Stalled", "True", "Conflict", "schema tenant_acme_corp already belongs to x/y", 3)]}),
     "Degraded", "Conflict: schema tenant_acme_corp already belongs to x/y"),
    ("Ready=False without Reconciling is terminal", obj(status={"observedGeneration": 3,
        "conditions": [cond("Ready", "False", "UnknownDatabase", "database target 'nowhere' is not configured", 3)]}),
     "Degraded", "UnknownDatabase"),
    ("no Ready condition", obj(status={"observedGeneration": 3, "conditions": []}),
     "Progressing", "Waiting for the Ready condition"),
    ("suspended tenant", obj(status={"observedGeneration": 3, "phase": "Suspended",
        "conditions": [cond("Ready", "True", "Suspended", "tenant is Suspended", 3)]}),
     "Suspended", "Suspended: tenant is Suspended"),
    ("being deleted", obj(status={"observedGeneration": 3, "conditions": [READY]},
                          deletionTimestamp="2026-01-01T00:00:00Z"),
     "Progressing", "Being deleted"),
    ("ready quota", obj("Quota", 1, {"observedGeneration": 1,
        "conditions": [cond("Ready", "True", "Enforced", "limits applied", 1)]}), "Healthy", "Enforced"),
    ("feature flag behind", obj("FeatureFlag", 5, {"observedGeneration": 4,
        "conditions": [cond("Ready", "True", "Published", "", 4)]}), "Progressing", "generation 5"),
    ("feature flag without condition generations", obj("FeatureFlag", 2, {"observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Published"}]}), "Healthy", "Published"),
    ("feature flag stepping", obj("FeatureFlag", 2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "True", "Published", "", 2)], "rollout": {"percentage": 5, "phase": "Progressing",
                                                            "message": "step 2 of 5: 5% served"}}),
     "Progressing", "step 2 of 5"),
    ("feature flag rolled back by its gate", obj("FeatureFlag", 2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "True", "Published", "", 2)], "rollout": {"percentage": 0, "phase": "RolledBack",
                                                            "message": "gate breached at 25%"}}),
     "Degraded", "gate breached"),
    ("feature flag steps done", obj("FeatureFlag", 2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "True", "Published", "", 2)], "rollout": {"percentage": 100, "phase": "Completed"}}),
     "Healthy", "Published"),
    ("schema rollout in a wave", obj("SchemaRollout", 1, {"observedGeneration": 1, "phase": "Progressing",
        "message": "wave 2 of 3: 4 admitted tenant(s) still migrating",
        "conditions": [cond("Ready", "True", "WaveMigrating", "", 1)]}), "Progressing", "wave 2 of 3"),
    ("schema rollout paused", obj("SchemaRollout", 1, {"observedGeneration": 1, "phase": "Paused",
        "conditions": [cond("Ready", "True", "PausedBySpec", "", 1)]}), "Suspended", "Paused"),
    ("schema rollout halted", obj("SchemaRollout", 1, {"observedGeneration": 1, "phase": "Halted",
        "conditions": [cond("Ready", "False", "BudgetSpent", "2 failed", 1),
                       cond("Stalled", "True", "BudgetSpent", "2 failed", 1)]}), "Degraded", "BudgetSpent"),
    ("schema rollout rolling back", obj("SchemaRollout", 1, {"observedGeneration": 1, "phase": "RolledBack",
        "reason": "RollingBack", "message": "rolling back to 0002: 3 tenant(s) past it",
        "conditions": [cond("Ready", "True", "RollingBack", "", 1)]}), "Progressing", "rolling back"),
    ("schema rollout rolled back", obj("SchemaRollout", 1, {"observedGeneration": 1, "phase": "RolledBack",
        "reason": "RolledBack", "conditions": [cond("Ready", "True", "RolledBack", "every tenant back", 1)]}),
     "Healthy", "every tenant back"),
    ("schema rollout idle", obj("SchemaRollout", 1, {"observedGeneration": 1, "phase": "Idle",
        "conditions": [cond("Ready", "True", "UpToDate", "", 1)]}), "Healthy", "UpToDate"),
]


@pytest.mark.parametrize("interpreter", INTERPRETERS)
@pytest.mark.parametrize(("case", "body", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_health(interpreter: str, case: str, body: dict[str, Any], status: str, message: str) -> None:
    got_status, got_message = health(body, interpreter)
    assert got_status == status, f"{case}: {got_status} ({got_message})"
    assert message in got_message


@pytest.mark.parametrize(
    ("path", "keys"),
    [("argocd-cm.yaml", ("data",)), ("argocd-values.yaml", ("configs", "cm"))],
)
def test_shipped_config_embeds_the_script_for_each_kind(path: str, keys: tuple[str, ...]) -> None:
    doc = yaml.safe_load((CHART / "argocd" / path).read_text())
    for key in keys:
        doc = doc[key]
    script = SCRIPT.read_text()
    assert {f"resource.customizations.health.tenancy.dev_{k}" for k in KINDS} == set(doc)
    for value in doc.values():
        assert value == script, f"{path} is out of date with health.lua"
