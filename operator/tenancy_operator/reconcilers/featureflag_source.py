"""The namespace's flagd source: one ConfigMap per namespace, `tenancy-flagd-source`, holds every flag
of the namespace in one flagd document (what flagd or a provider's file mode mounts as one source).

It is rebuilt whole from a LIST of the namespace's FeatureFlags each time (level-based: no
per-namespace map to keep right across restarts, deletions and missed events), under one lock per
namespace, and written only when its content differs. Rebuilds that queued behind one that LISTed
after their change are skipped (a burst of edits costs a few LISTs, not one per flag). Each flag's
own ConfigMap and rows are the reconcile's (featureflag.py).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tenancy_operator.api.featureflag import FeatureFlagSpec
from tenancy_operator.api.names import FLAGD_SOURCE_LABEL, MANAGED_BY, MANAGED_BY_KEY, MANAGED_BY_VALUE
from tenancy_operator.db import flags as dbf
from tenancy_operator.flags.flagd import flagd_flag, flagd_source
from tenancy_operator.flags.model import FlagDefinition
from tenancy_operator.k8s.client import ApiError
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import DATABASE_ERRORS, Retry
from tenancy_operator.reconcilers.featureflag_policy import FLAGD_DATA_KEY, PLURAL
from tenancy_operator.runtime_context import OperatorContext

SOURCE_CONFIGMAP = "tenancy-flagd-source"
"""The namespace's flagd source. Not `<something>-flagd`: no FeatureFlag's own ConfigMap can have this name."""
SOURCE_LABEL_VALUE = "namespace"
SOURCE_LOCK = "FlagdSource"
"""Lock kind of the namespace's source: one writer per namespace (the name is "")."""
MAX_CONFIGMAP_BYTES = 1024 * 1024
"""What the API server accepts in a ConfigMap's data (keys and values together)."""
log = get_logger(__name__)


@dataclass(frozen=True)
class SourceState:
    """How the namespace's flagd source stands after the last rebuild."""

    published: bool
    reason: str
    """Published, Removed (no FeatureFlag left), Conflict (a ConfigMap not ours), TooLarge."""
    message: str


def _is_source(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE and labels.get(FLAGD_SOURCE_LABEL) == SOURCE_LABEL_VALUE)


def _source_flags(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """The flags of the namespace's source as it stands (nothing when absent or unreadable)."""
    try:
        doc = json.loads(((obj or {}).get("data") or {}).get(FLAGD_DATA_KEY) or "{}")
    except (ValueError, RecursionError):
        return {}
    flags = doc.get("flags") if isinstance(doc, dict) else None
    return {str(k): v for k, v in flags.items() if isinstance(v, dict)} if isinstance(flags, dict) else {}


def _source_owner(flag: Mapping[str, Any]) -> str | None:
    meta = flag.get("metadata")
    return str(meta.get("featureflag")) if isinstance(meta, dict) and meta.get("featureflag") else None


class NamespaceSource:
    """Publishes the flagd source of each namespace; remembers each one's last result."""

    def __init__(self, ctx: OperatorContext, served: Callable[[Mapping[str, Any]], int | None]) -> None:
        self.ctx = ctx
        self._served = served
        """The share a listed FeatureFlag's stepped rollout serves now (None: no record)."""
        self._tickets = itertools.count(1)
        self._sources: dict[str, tuple[int, SourceState]] = {}
        """namespace -> (ticket taken before the LIST of its last completed source rebuild, result)."""

    @property
    def control(self) -> str:
        return self.ctx.settings.control_schema

    async def publish(self, namespace: str, *, changed: bool = True) -> SourceState:
        """Make `tenancy-flagd-source` hold every flag of the namespace, and say how it stands.

        ``changed``: something this flag publishes changed; without it the last result stands (the
        periodic sweep rebuilds each namespace once, which repairs drift), unless this process has
        not built the namespace's source yet. Raises Retry when the API server fails us."""
        ticket = next(self._tickets)  # taken after our change: a rebuild that LISTs later sees it
        last = self._sources.get(namespace)
        if last is not None and not changed:
            return last[1]
        async with self.ctx.lock(SOURCE_LOCK, namespace, ""):
            last = self._sources.get(namespace)
            if last is not None and last[0] > ticket:
                return last[1]  # a rebuild that began after our change completed while we waited
            start = next(self._tickets)
            state = await self._rebuild_source(namespace)
            if state.reason == "Removed":
                self._sources.pop(namespace, None)  # nothing to remember of a namespace without flags
            else:
                self._sources[namespace] = (start, state)
        if last is None or last[1] != state:
            (log.info if state.published else log.warning)(
                "namespace flagd source", namespace=namespace, configmap=SOURCE_CONFIGMAP, result=state.reason,
                detail=state.message)
        return state

    async def _rebuild_source(self, namespace: str) -> SourceState:
        kube = self.ctx.kube
        try:
            items = await kube.list_objects(PLURAL, namespace)
            current = await kube.get_configmap(namespace, SOURCE_CONFIGMAP)
        except ApiError as exc:
            raise Retry("KubernetesAPI", f"reading the namespace's flags for {SOURCE_CONFIGMAP} failed: "
                                         f"{exc.status}") from exc
        if current is not None and not _is_source(current):
            return SourceState(False, "Conflict", f"ConfigMap {SOURCE_CONFIGMAP} exists and is not managed by "
                                                  "tenancy-operator; delete or rename it to get the namespace's "
                                                  "flagd source (the per-flag ConfigMaps are unaffected)")
        live = [i for i in items if not (i.get("metadata") or {}).get("deletionTimestamp")]
        try:
            if not live:
                if current is not None:
                    await kube.delete_configmap(namespace, SOURCE_CONFIGMAP)
                return SourceState(True, "Removed", f"no FeatureFlag left: ConfigMap {SOURCE_CONFIGMAP} removed")
            previous = _source_flags(current)
            flags = await self._source_flags(namespace, live, previous)
            text = json.dumps(flagd_source(flags), sort_keys=True, separators=(",", ":")) + "\n"
            size = len(FLAGD_DATA_KEY) + len(text.encode())
            if size > MAX_CONFIGMAP_BYTES:
                kept = f"its last document ({len(previous)} flag(s)) is kept" if current is not None else "none written"
                return SourceState(False, "TooLarge", (
                    f"the namespace's {len(flags)} flags make a flagd document of {size} bytes, over the "
                    f"{MAX_CONFIGMAP_BYTES} a ConfigMap holds: ConfigMap {SOURCE_CONFIGMAP} is not updated, {kept}; "
                    "each flag's own ConfigMap is current"))
            desired: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": SOURCE_CONFIGMAP, "namespace": namespace,
                    "labels": {**MANAGED_BY, FLAGD_SOURCE_LABEL: SOURCE_LABEL_VALUE},
                },
                "data": {FLAGD_DATA_KEY: text},
            }
            if current is None:
                await kube.create_configmap(namespace, desired)
            else:
                labels = (current.get("metadata") or {}).get("labels") or {}
                if current.get("data") != desired["data"] or any(
                        labels.get(k) != v for k, v in desired["metadata"]["labels"].items()):
                    desired["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
                    await kube.replace_configmap(namespace, SOURCE_CONFIGMAP, desired)
        except ApiError as exc:
            if not live and exc.status == 404:
                return SourceState(True, "Removed", f"no FeatureFlag left: ConfigMap {SOURCE_CONFIGMAP} removed")
            raise Retry("KubernetesAPI", f"writing ConfigMap {SOURCE_CONFIGMAP} failed: {exc.status}") from exc
        return SourceState(True, "Published", f"ConfigMap {SOURCE_CONFIGMAP} (key {FLAGD_DATA_KEY}) holds every "
                                              "flag of the namespace")

    async def _source_flags(
        self, namespace: str, items: list[dict[str, Any]], previous: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """The rendered flags of the namespace, by key: one flag per key, whatever the objects say.

        Each flag is rendered exactly as in its own ConfigMap. A FeatureFlag whose spec no longer
        validates keeps what the source held for it (its rows and own ConfigMap keep theirs too).
        When FeatureFlags share a key, the one holding it in the database (the one that wrote
        first) is in; while no target answers or none holds it, the one the source held, if any
        (the take-over's reconcile rebuilds the source)."""
        by_key: dict[str, list[tuple[str, dict[str, Any] | None]]] = {}
        for item in sorted(items, key=lambda i: str(i["metadata"]["name"])):
            name = str(item["metadata"]["name"])
            try:
                flag = FlagDefinition.from_spec(FeatureFlagSpec.model_validate(item.get("spec") or {}), name,
                                                self._served(item))
            except (ValidationError, ValueError):
                for key, old in previous.items():
                    if _source_owner(old) == name:
                        by_key.setdefault(key, []).append((name, dict(old)))
                continue
            rendered = flagd_flag(flag, {"namespace": namespace, "featureflag": name})
            by_key.setdefault(flag.key, []).append((name, rendered))
        flags: dict[str, dict[str, Any]] = {}
        for key, candidates in sorted(by_key.items()):
            if len(candidates) > 1:
                owner = await self._key_owner(namespace, key)
                if owner is None:  # no target answers, or the holder went: the one published stays
                    owner = _source_owner(previous.get(key) or {})
                candidates = [c for c in candidates if c[0] == owner]
            if candidates and candidates[0][1] is not None:
                flags[key] = candidates[0][1]
        return flags

    async def _key_owner(self, namespace: str, key: str) -> str | None:
        """The FeatureFlag holding ``key`` in the first target that answers; None if none does."""
        for target in sorted(self.ctx.targets.pools):
            try:
                await self.ctx.ensure_control_schema(target)
                async with self.ctx.targets.connection(target) as conn:
                    stored = await dbf.load(conn, self.control, namespace, key)
            except DATABASE_ERRORS:
                continue
            return stored.name if stored is not None else None
        return None
