"""What every handler and the sweep share: settings, database pools, the Kubernetes client, locks."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tenancy_operator.config import Settings
from tenancy_operator.db.control import migrate_control_schema
from tenancy_operator.db.targets import DatabaseTargets
from tenancy_operator.k8s.client import Kube
from tenancy_operator.observability.events import EventRecorder


@runtime_checkable
class TenantWatcher(Protocol):
    """A service that follows Tenant watch events (Kopf's initial listing has type None)."""

    def tenant_changed(self, type_: str | None, body: Mapping[str, Any]) -> None: ...


@dataclass
class OperatorContext:
    settings: Settings
    targets: DatabaseTargets
    kube: Kube
    events: EventRecorder
    # One lock per object, so a handler and the sweep never reconcile the same object at once.
    locks: defaultdict[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    control_ready: set[str] = field(default_factory=set)
    # When the sweep last completed (monotonic); the liveness probe fails if it stops completing.
    last_sweep_ok: float = field(default_factory=time.monotonic)
    # Tenant migrations running at once, process-wide (each holds a tenant login, not a pool slot).
    migration_slots: asyncio.Semaphore = field(init=False)
    # Tenant reconciles and deletions at once, process-wide (Kopf's workers are many more).
    reconcile_slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.migration_slots = asyncio.Semaphore(self.settings.migration_concurrency)
        self.reconcile_slots = asyncio.Semaphore(self.settings.reconcile_concurrency)

    async def ensure_control_schema(self, target: str) -> None:
        """Migrate a target's control schema once per process, lazily: a target that was down
        at start-up is migrated the first time it is used."""
        if target in self.control_ready:
            return
        async with self.locks[("control", target, "")]:
            if target in self.control_ready:
                return
            async with self.targets.pool(target).connection() as conn:
                await migrate_control_schema(conn, self.settings.control_schema)
            self.control_ready.add(target)

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        return self.locks[(kind, namespace, name)]
