"""A tenant's own error text, echoed by the operator, arrives bounded and without control characters.

The attacker here is a namespace user with a template whose migration raises an error of its
choosing: terminal escape sequences (clear the screen, set the title), a carriage return to
overwrite what kubectl printed before, a bidirectional override, and 20,000 more characters. The
operator repeats that error in the Tenant's Ready condition, in its job summary, in a Warning
Event and in `tenancy-operator jobs`.
"""

from __future__ import annotations

import subprocess
import sys

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, eventually, tenant

PLURAL = "tenants"
HOSTILE_SQL = (
    "DO $$ BEGIN RAISE EXCEPTION '%', "
    "E'boom\\x1b[2J\\x1b]0;pwned\\x07\\rspoofed \\u202eevil ' || repeat('x', 20000); END $$;"
)
LIMIT = 1024


def clean(text: str) -> None:
    assert text.isprintable(), f"control or format characters echoed: {text[:200]!r}"
    assert len(text) <= LIMIT, f"{len(text)} characters echoed"


def test_a_tenants_error_text_is_echoed_bounded_and_clean(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "loud-schema"}, "data": {"0001_loud.sql": HOSTILE_SQL}}
    )
    cluster.create(PLURAL, namespace, tenant("echo-loud", schemaTemplate="loud-schema"))
    obj = cluster.wait_condition(PLURAL, namespace, "echo-loud", status="False", reason="MigrationFailed", timeout=90)

    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert "boom" in ready["message"] and "spoofed" in ready["message"], ready["message"][:200]
    clean(ready["message"])
    for job in [obj["status"].get("currentJob") or {}, *obj["status"].get("recentJobs", [])]:
        clean(job.get("message", ""))

    def warned() -> list[str]:
        messages = [e["message"] for e in cluster.events(namespace, "echo-loud") if e["reason"] == "MigrationFailed"]
        assert messages, "no MigrationFailed Event yet"
        return messages

    for message in eventually(warned, timeout=60, what="a MigrationFailed Event"):
        clean(message)

    out = subprocess.run(
        [sys.executable, "-m", "tenancy_operator", "jobs", "echo-loud", "-n", namespace, "--dsn", stack.admin_dsn()],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    rows = out.splitlines()
    assert len(rows) >= 2 and any("boom" in row for row in rows), out[:500]
    for row in rows:
        assert row.isprintable(), f"control characters printed: {row[:200]!r}"
        assert len(row) < 2 * LIMIT
