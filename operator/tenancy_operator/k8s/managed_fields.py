"""Who asked for a change: the field manager that last set a field, from managedFields.

Kubernetes records which manager set which fields, not who made the last request; the manager
whose entry covers a field and was written last is the best answer it gives ("kubectl-edit",
"kubectl-client-side-apply", "argocd-controller", "kubectl-tenancy", ...). Entries of the status
and other subresources are ignored: they are the operator's own writes.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any


def parse_time(value: Any) -> datetime.datetime | None:
    """An API server timestamp (RFC 3339) or a datetime, as an aware datetime; None if neither."""
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    if isinstance(value, str) and value:
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _covers(fields: Mapping[str, Any], path: Sequence[str]) -> bool:
    node: Any = fields
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def last_change(meta: Mapping[str, Any], *paths: Sequence[str]) -> tuple[str | None, datetime.datetime | None]:
    """The manager (and time) of the newest managedFields entry that covers any of ``paths``
    (each a fieldsV1 path such as ``("f:spec", "f:state")``); (None, None) when none does."""
    best: tuple[datetime.datetime, int, str] | None = None
    for i, entry in enumerate(meta.get("managedFields") or []):
        if entry.get("subresource"):
            continue
        fields = entry.get("fieldsV1") or {}
        if not any(_covers(fields, path) for path in paths):
            continue
        when = parse_time(entry.get("time"))
        if when is None:
            continue
        candidate = (when, i, str(entry.get("manager") or ""))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        return None, None
    return best[2] or None, best[0]


def annotation_path(key: str) -> tuple[str, str, str]:
    return ("f:metadata", "f:annotations", f"f:{key}")
