"""Errors shared by the reconcilers."""

from __future__ import annotations


class Retry(Exception):
    """Transient infrastructure trouble (database or API unreachable): the handler retries with
    backoff. Not a failed job attempt. ``reason`` is a bounded metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
