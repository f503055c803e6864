"""What Kopf logs, shaped for the operator's logs (observability/logging.py configures them).

Kopf writes each object's whole body into a debug message every time it handles a change
(``f"... is in progress: {body!r}"``), so the body is formatted whether debug is logged or not:
after a restart, once per object, about as much of the replica's time as our resume handlers
take. ``brief_kopf_bodies`` makes a body's repr name just the object unless Kopf's per-object
debug lines are logged.

When a run ends, Kopf warns once for each handler it cancels in progress and once more, in one
line naming every object, for the objects whose queued events it leaves: ``run_end_summary``
counts them instead and logs one line.
"""

from __future__ import annotations

import contextlib
import logging
import re
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
UNPROCESSED = "Unprocessed streams left for "
"""How Kopf's warning on the objects whose queued events a stopping run leaves begins (one line
naming every such object: tens of kilobytes after a mass creation; kopf/_core/reactor/queueing.py)."""
_QUEUEING = logging.getLogger("kopf._core.reactor.queueing")
_STREAM = re.compile(r"\((\S+), '")
"""One object's stream in that warning: (resource, 'uid')."""


class _RunEnd(logging.Filter):
    """Counts Kopf's warnings on the work a run's end leaves: handlers cancelled in progress by
    kind, objects with queued events by resource. Kopf's lines are logged at DEBUG (when Kopf's
    per-object debug lines are) instead of as warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: Counter[str] = Counter()
        self.unprocessed: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        if message.endswith(CANCELLED):
            ref = getattr(record, "k8s_ref", None)
            self.cancelled[str(ref.get("kind")) if isinstance(ref, dict) else "unknown"] += 1
        elif message.startswith(UNPROCESSED):
            self.unprocessed.update(_STREAM.findall(message))
        else:
            return True
        if not _KOPF_OBJECTS.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


@contextlib.contextmanager
def run_end_summary() -> Iterator[None]:
    """Within the block (a Kopf run), what Kopf warns about at the run's end, object by object, is
    counted instead and logged as one line when the block ends: the handlers it cancels in
    progress and the objects whose queued events it leaves. A run ends so on a signal or a sharded
    replica's hand-over, with up to a few hundred such objects per replica in a mass creation;
    each is handled again by whichever run holds it next (the handlers are idempotent)."""
    counting = _RunEnd()
    for logger in (_KOPF_OBJECTS, _QUEUEING):
        logger.addFilter(counting)
    try:
        yield
    finally:
        for logger in (_KOPF_OBJECTS, _QUEUEING):
            logger.removeFilter(counting)
        if counting.cancelled or counting.unprocessed:
            log.info("the run ended with work in progress; each object is handled again by the next run "
                     "that holds it", cancelled=dict(counting.cancelled), unprocessed=dict(counting.unprocessed))
