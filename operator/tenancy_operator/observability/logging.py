"""JSON logs through structlog, for our own records and Kopf's.

Kopf's per-object records carry extra attributes (``settings``, ``k8s_skip``, ``k8s_ref``)
that JSON cannot serialise; we lift namespace and name out of ``k8s_ref`` and drop the rest.
What else Kopf logs is shaped in kopf_logs.py (this module must not import Kopf: the database
layer logs through it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

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
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    # Kopf's and aiohttp's chatter at DEBUG is not useful at INFO.
    for noisy in ("aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
