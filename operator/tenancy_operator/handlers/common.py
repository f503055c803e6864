"""What every kind's handlers share."""

from __future__ import annotations

import random


def backoff(retry: int) -> float:
    """Delay before Kopf's next retry: exponential with jitter, 1, 2, 4 ... 60 s."""
    return min(60.0, 2.0 ** min(retry, 6)) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
