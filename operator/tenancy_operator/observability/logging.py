"""JSON logs through structlog, for our own records and Kopf's.

Kopf's per-object records carry extra attributes (``settings``, ``k8s_skip``, ``k8s_ref``)
that JSON cannot serialise; we lift namespace and name out of ``k8s_ref`` and drop the rest.

Kopf writes each object's whole body into a debug message every time it handles a change
(``f"... is in progress: {body!r}"``), so the body is formatted whether debug is logged or not:
after a restart, once per object, about as much of the replica's time as our resume handlers
take. ``brief_kopf_bodies`` makes a body's repr name just the object unless Kopf's per-object
debug lines are logged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import kopf
import structlog

_DROPPED_EXTRAS = {"settings", "k8s_skip", "k8s_ref"}


def _kopf_object_ref(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    ref = getattr(record, "k8s_ref", None) if record is not None else None
    if isinstance(ref, dict):
        event_dict.setdefault("namespace", ref.get("namespace"))
        event_dict.setdefault("name", ref.get("name"))
        event_dict.setdefault("kind", ref.get("kind"))
    for key in list(event_dict):
        if key in _DROPPED_EXTRAS:
            event_dict.pop(key, None)
    return event_dict


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            _kopf_object_ref,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Kopf's per-object lines at INFO say that a handler succeeded and how an object's handling
    # went ("Creation is processed: 1 succeeded; 0 failed."): beside the operator's own line per
    # reconcile, and at every start once per object however in sync it is (after a restart every
    # object is a "creation" to Kopf: handlers/common.MemoryDiffBaseStorage), 10,000 lines for
    # 10,000 Tenants, each a log record made and rendered on the event loop. Kopf's warnings and
    # errors (failures, retries) stay; at DEBUG everything is logged.
    _KOPF_OBJECTS.setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    brief_kopf_bodies()
    # Kopf's and aiohttp's chatter at DEBUG is not useful at INFO.
    for noisy in ("aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


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


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
