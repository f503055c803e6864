"""What the reconcilers share: their transient error and the head of their outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field


class Retry(Exception):
    """Transient infrastructure trouble (database or API unreachable): the handler retries with
    backoff. Not a failed job attempt. ``reason`` is a bounded metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Verdict:
    """The head of a kind's reconcile outcome: what its Ready condition says, whether the operator
    stopped trying (Stalled: a person must act), and the Events to post."""

    ready: bool
    reason: str
    message: str
    stalled: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
