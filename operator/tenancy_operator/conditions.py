"""Status conditions as kstatus, Flux and ``kubectl wait`` expect them.

One entry per type; ``lastTransitionTime`` only moves when the status flips, so re-running a
reconcile that finds nothing new produces an identical status and no write at all. Every message
goes through ``clean_message`` here, the one place conditions are built (it often carries text a
tenant wrote, such as a PostgreSQL error from its migration).
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tenancy_operator.observability.text import clean_message


@dataclass(frozen=True)
class Cond:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""

    def __post_init__(self) -> None:
        # Cleaned at once, so comparing a Cond with a stored condition compares like with like.
        object.__setattr__(self, "message", clean_message(self.message))


def reported(body: Mapping[str, Any]) -> bool:
    """Whether the operator has written this object's status: until then the API server serves
    the CRD's default, `observedGeneration: 0` (api/resource.py, ResourceInfo.initial_status)."""
    return bool((body.get("status") or {}).get("observedGeneration"))


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge(
    old: Iterable[Mapping[str, Any]] | None, new: Iterable[Cond], generation: int, *, drop: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """The conditions list after applying ``new``; types in ``drop`` are removed (Flux drops
    Reconciling/Stalled when they are not True)."""
    by_type = {str(c.get("type")): dict(c) for c in (old or [])}
    for t in drop:
        by_type.pop(t, None)
    for c in new:
        prev = by_type.get(c.type)
        changed = prev is None or prev.get("status") != c.status
        by_type[c.type] = {
            "type": c.type,
            "status": c.status,
            "observedGeneration": generation,
            "lastTransitionTime": now_iso() if changed or prev is None else prev.get("lastTransitionTime"),
            "reason": c.reason,
            "message": clean_message(c.message),
        }
    order = ["Ready", "Reconciling", "Stalled"]
    return sorted(by_type.values(), key=lambda c: (order.index(c["type"]) if c["type"] in order else 9, c["type"]))


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any],
                 whole: Collection[str] = ()) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``desired`` for the keys of
    ``desired``; empty when nothing differs. Map entries missing from a desired map are removed
    (``None``); lists are replaced whole.

    ``whole``: keys of ``desired`` that are one decision (a rollout's position, phase and reason):
    when any of them differs, all of them are sent as ``desired`` has them (its maps with a null
    for each field they no longer have). ``current`` may be older than the object (a snapshot read
    before this process's own last write): a difference alone would then send only the fields
    the snapshot lacks and leave the others as the last write set them, a mix of two decisions."""
    patch = _difference(current, desired)
    if any(k in patch for k in whole):
        patch.update({k: desired[k] for k in whole if k in desired})
    return patch


def _difference(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    current = current or {}
    patch: dict[str, Any] = {}
    for k, want in desired.items():
        have = current.get(k)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = _difference(have, want)
            for gone in set(have) - set(want):
                sub[gone] = None
            if sub:
                patch[k] = sub
        elif have != want:
            patch[k] = want
    return patch


def readiness(ready: bool, stalled: bool, reason: str, message: str) -> tuple[list[Cond], list[str]]:
    """The Ready/Reconciling/Stalled conditions every kind reports for one reconcile's outcome, and
    the ones to drop: Ready; while not ready, Stalled (the operator stopped trying: a person must
    act) or Reconciling (it retries on its own)."""
    if ready:
        return [Cond("Ready", "True", reason, message)], ["Reconciling", "Stalled"]
    if stalled:
        return [Cond("Ready", "False", reason, message), Cond("Stalled", "True", reason, message)], ["Reconciling"]
    return [Cond("Ready", "False", reason, message), Cond("Reconciling", "True", "Retrying", message)], ["Stalled"]
