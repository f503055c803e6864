"""JSON logs through structlog, for our own records and Kopf's.

Kopf's per-object records carry extra attributes (``settings``, ``k8s_skip``, ``k8s_ref``)
that JSON cannot serialise; we lift namespace and name out of ``k8s_ref`` and drop the rest.
"""

from __future__ import annotations

import logging
import re
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


class _QuietHandlerSuccesses(logging.Filter):
    """Drops Kopf's "Handler 'x' succeeded." lines: one per handler, object and change, and again
    for every object at each start (10,000 at a restart of 10,000 tenants), each followed by Kopf's
    summary of the object's handling ("Creation is processed: 1 succeeded; 0 failed.", kept) and
    beside the operator's own line per reconcile (``reconciled``, with its outcome). Kopf's
    failures and retries are kept."""

    succeeded = re.compile(r"Handler '[^']*' succeeded\.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and isinstance(record.msg, str)
                    and self.succeeded.fullmatch(record.msg))


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
    logging.getLogger("kopf.objects").addFilter(_QuietHandlerSuccesses())
    # Kopf's and aiohttp's chatter at DEBUG is not useful at INFO.
    for noisy in ("aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
