"""What every `kubectl tenancy` command shares: the Session (parsed arguments and the API
connection of one invocation, polling for --wait), the CommandError a command raises, exit codes,
the resources' plural names and small helpers for output and Secrets."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from tenancy_operator.k8s.kubectl import PluginKube

TENANTS, QUOTAS, FLAGS, SCHEMA_ROLLOUTS = "tenants", "quotas", "featureflags", "schemarollouts"
ARCHIVES = "tenantarchives"
ROLLOUT_KINDS = {"schemarollout": SCHEMA_ROLLOUTS, "featureflag": FLAGS}
POLL_INTERVAL = 1.0
EXIT_FAILED, EXIT_USAGE = 1, 2


class CommandError(Exception):
    """A failure worth one line to the user; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def now() -> datetime:
    return datetime.now(UTC)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


class Session:
    """The parsed arguments and the API connection of one invocation."""

    def __init__(self, args: argparse.Namespace, kube: PluginKube, namespace: str) -> None:
        self.args = args
        self.kube = kube
        self.namespace = namespace

    async def tenant(self, name: str) -> dict[str, Any]:
        body = await self.kube.get_object(TENANTS, self.namespace, name)
        if body is None:
            raise CommandError(f"Tenant {self.namespace}/{name} not found", EXIT_USAGE)
        return body

    async def wait(self, what: str, check: Callable[[], Awaitable[str | None]]) -> str:
        """Poll ``check`` until it returns a message (done) or the timeout passes. ``check`` raises
        CommandError when the operator reports the request failed."""
        deadline = time.monotonic() + float(self.args.timeout)
        print(f"waiting up to {self.args.timeout:g}s for {what} ...", file=sys.stderr)
        while True:
            done = await check()
            if done is not None:
                return done
            if time.monotonic() > deadline:
                raise CommandError(f"timed out after {self.args.timeout:g}s waiting for {what}")
            await asyncio.sleep(POLL_INTERVAL)
