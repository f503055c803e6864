"""Reading one number from Prometheus: the health gates of stepped flag rollouts.

The address is the operator's setting (TENANCY_PROMETHEUS_URL), never one from an object: a
namespace user writes the query, not where it goes. Every query runs under a deadline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from tenancy_operator.observability.text import clean_message

MAX_ANSWER_BYTES = 1024 * 1024
PROBLEM_MAX = 400
"""Characters of why a gate has no value, as status messages show it."""


@dataclass(frozen=True)
class GateReading:
    """What a rollout gate's query returned: a value, or why there is none."""

    value: float | None
    problem: str | None = None


async def read_gate(base_url: str, query: str, *, deadline: float) -> GateReading:
    """A rollout gate's query on the operator's Prometheus (``base_url``; empty: none configured)."""
    if not base_url:
        return GateReading(None, "the operator has no Prometheus to ask (setting TENANCY_PROMETHEUS_URL)")
    try:
        return GateReading(await query_value(base_url, query, deadline=deadline))
    except NoValue as exc:  # may quote the query, which a namespace user wrote
        return GateReading(None, clean_message(str(exc), PROBLEM_MAX))


class NoValue(Exception):
    """The query gave no single number; the message says why (for status, so without the URL)."""


async def query_value(base_url: str, query: str, *, deadline: float) -> float:
    """The value of an instant query that returns a scalar or a vector of exactly one series."""
    url, timeout = base_url.rstrip("/") + "/api/v1/query", deadline
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False) as session,
            session.post(url, data={"query": query, "timeout": f"{int(max(1.0, timeout - 0.5) * 1000)}ms"}) as response,
        ):
            raw = b""
            async for chunk in response.content.iter_chunked(64 * 1024):
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise NoValue("Prometheus' answer is larger than 1 MiB: the query must return one number")
            status = response.status
    except TimeoutError as exc:
        raise NoValue(f"Prometheus did not answer within {timeout:g}s") from exc
    except aiohttp.ClientError as exc:
        raise NoValue(f"Prometheus unreachable ({type(exc).__name__})") from exc
    try:
        answer: Any = json.loads(raw)
    except ValueError as exc:
        raise NoValue(f"Prometheus answered HTTP {status} with no JSON") from exc
    if not isinstance(answer, dict) or answer.get("status") != "success":
        error = str(answer.get("error") if isinstance(answer, dict) else "")[:300]
        raise NoValue(f"Prometheus refused the query: {error or 'no reason given'}")
    data = answer.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar":
        sample = result
    elif data.get("resultType") == "vector" and isinstance(result, list):
        if len(result) != 1:
            raise NoValue(f"the query returned {len(result)} series; it must return exactly one")
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    else:
        raise NoValue(f"the query returned a {data.get('resultType')!s:.20}, not one number")
    try:
        value = float(sample[1])  # type: ignore[index]
    except (TypeError, ValueError, IndexError) as exc:
        raise NoValue("the query's answer holds no number") from exc
    if math.isnan(value):
        raise NoValue("the query's value is NaN (e.g. a ratio of no requests)")
    return value
