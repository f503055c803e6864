"""A JSON diff for the audit trail: what changed between two stored flag definitions.

Like RFC 6902 JSON Patch (op, JSON-pointer path) but each operation carries the old value too,
because an audit row must say what a value was, not only what it became. Objects are compared key
by key (tenants and users are objects keyed by name in the stored form); lists are replaced whole.
"""

from __future__ import annotations

import json
from typing import Any


def _pointer(parts: list[str]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _canonical(value: Any) -> str:
    # Type-exact comparison: true and 1, 1 and 1.0 are different JSON values.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def json_diff(old: Any, new: Any, _path: list[str] | None = None) -> list[dict[str, Any]]:
    """Operations turning `old` into `new`: `add` (new), `remove` (old), `replace` (old, new)."""
    path = _path or []
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = [*path, str(key)]
            if key not in new:
                ops.append({"op": "remove", "path": _pointer(sub), "old": old[key]})
            elif key not in old:
                ops.append({"op": "add", "path": _pointer(sub), "new": new[key]})
            else:
                ops += json_diff(old[key], new[key], sub)
        return ops
    if _canonical(old) == _canonical(new):
        return []
    return [{"op": "replace", "path": _pointer(path), "old": old, "new": new}]


def summarize(ops: list[dict[str, Any]], limit: int = 6) -> str:
    """A one-line human summary of a diff, for Events."""

    def show(v: Any) -> str:
        text = repr(v) if not isinstance(v, dict | list) else ("{...}" if isinstance(v, dict) else "[...]")
        return text if len(text) <= 40 else text[:37] + "..."

    parts = []
    for op in ops[:limit]:
        where = op["path"].lstrip("/").replace("/", ".") or "flag"
        if op["op"] == "add":
            parts.append(f"{where} added ({show(op['new'])})")
        elif op["op"] == "remove":
            parts.append(f"{where} removed")
        else:
            parts.append(f"{where}: {show(op['old'])} -> {show(op['new'])}")
    if len(ops) > limit:
        parts.append(f"and {len(ops) - limit} more")
    return "; ".join(parts)
