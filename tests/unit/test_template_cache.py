"""The template ConfigMap cache: Tenant reconciles that ask at once share one read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tenancy_operator.k8s.client import ApiError
from tenancy_operator.reconcilers.errors import Retry
from tenancy_operator.reconcilers.tenant_base import TemplateCache


class Reads:
    """Stands in for the API server's GET: answers when told, counting the requests."""

    def __init__(self, answer: dict[str, Any] | None) -> None:
        self.answer, self.calls, self.fail = answer, 0, False
        self.answered = asyncio.Event()

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls += 1
        await self.answered.wait()
        if self.fail:
            raise ApiError(503, "unavailable")
        return self.answer


def configmap(version: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "tpl", "resourceVersion": version},
            "data": {"0001_init.sql": "CREATE TABLE t (id int);"}}


async def test_callers_that_ask_at_once_share_one_read() -> None:
    reads = Reads(configmap("7"))
    cache = TemplateCache(reads)  # type: ignore[arg-type]
    waiting = [asyncio.ensure_future(cache.get("ns", "tpl")) for _ in range(50)]
    await asyncio.sleep(0)  # every caller is waiting on the read in flight
    reads.answered.set()
    answers = await asyncio.gather(*waiting)
    assert reads.calls == 1
    assert {a["metadata"]["resourceVersion"] for a in answers if a is not None} == {"7"}
    assert await cache.get("ns", "tpl") == configmap("7") and reads.calls == 1  # then from the cache


async def test_a_missing_template_is_one_read_too_and_asked_again_later() -> None:
    reads = Reads(None)
    cache = TemplateCache(reads)  # type: ignore[arg-type]
    waiting = [asyncio.ensure_future(cache.get("ns", "tpl")) for _ in range(10)]
    await asyncio.sleep(0)
    reads.answered.set()
    assert await asyncio.gather(*waiting) == [None] * 10
    assert reads.calls == 1
    assert await cache.get("ns", "tpl") is None and reads.calls == 2  # not found is not kept


async def test_a_cancelled_caller_leaves_the_read_to_the_others_and_errors_reach_each() -> None:
    reads = Reads(configmap("8"))
    cache = TemplateCache(reads)  # type: ignore[arg-type]
    first, second = asyncio.ensure_future(cache.get("ns", "tpl")), asyncio.ensure_future(cache.get("ns", "tpl"))
    await asyncio.sleep(0)
    first.cancel()
    reads.answered.set()
    assert (await second)["metadata"]["resourceVersion"] == "8"  # type: ignore[index]
    cache.deleted("ns", "tpl")
    reads.fail = True
    failing = [asyncio.ensure_future(cache.get("ns", "tpl")) for _ in range(3)]
    for f in failing:
        with pytest.raises(Retry):
            await f
    assert reads.calls == 2
