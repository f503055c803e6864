"""What Kopf logs, shaped for the operator's logs (observability/logging.py configures them).

Kopf writes each object's whole body into a debug message every time it handles a change
(``f"... is in progress: {body!r}"``), so the body is formatted whether debug is logged or not:
after a restart, once per object, about as much of the replica's time as our resume handlers
take. ``brief_kopf_bodies`` makes a body's repr name just the object unless Kopf's per-object
debug lines are logged.

When a run ends, Kopf warns once for each handler it cancels in progress: ``cancelled_handlers``
counts them instead and logs one line.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

import kopf

from tenancy_operator.observability.logging import get_logger

log = get_logger(__name__)
_FULL_BODY_REPR = kopf.Body.__repr__
_KOPF_OBJECTS = logging.getLogger("kopf.objects")


def _body_repr(body: kopf.Body) -> str:
    if _KOPF_OBJECTS.isEnabledFor(logging.DEBUG):
        return str(_FULL_BODY_REPR(body))
    meta = body.metadata
    return f"<{type(body).__name__} {meta.namespace or ''}/{meta.name or ''}>"


def brief_kopf_bodies() -> None:
    """A Kopf body's repr is its kind of body and object, not its content, while Kopf's per-object
    debug lines are not logged (see the module's docstring)."""
    kopf.Body.__repr__ = _body_repr  # type: ignore[method-assign,assignment]


CANCELLED = " is cancelled. Will escalate."
"""How Kopf's warning for a handler cancelled in progress ends (kopf/_core/actions/execution.py)."""


class _CancelledHandlers(logging.Filter):
    """Counts Kopf's warnings for handlers cancelled in progress by kind; they are logged at DEBUG
    (when Kopf's per-object debug lines are) instead of as warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not record.getMessage().endswith(CANCELLED):
            return True
        ref = getattr(record, "k8s_ref", None)
        self.kinds[str(ref.get("kind")) if isinstance(ref, dict) else "unknown"] += 1
        if not _KOPF_OBJECTS.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


@contextlib.contextmanager
def cancelled_handlers() -> Iterator[Counter[str]]:
    """Within the block (a Kopf run), the handlers Kopf reports cancelled in progress are counted
    by kind instead of warned about one by one, and logged as one line at its end. Kopf cancels
    them only when a watch ends (the run stopping: a signal, a sharded replica's hand-over), up to
    a few hundred per replica in a mass creation; each is done again by whichever run handles its
    object next (the handlers are idempotent)."""
    counting = _CancelledHandlers()
    _KOPF_OBJECTS.addFilter(counting)
    try:
        yield counting.kinds
    finally:
        _KOPF_OBJECTS.removeFilter(counting)
        if counting.kinds:
            log.info("handlers in progress were cancelled as the run ended; each object is handled again "
                     "by the next run that holds it", cancelled=dict(counting.kinds))
