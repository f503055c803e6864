"""The gateway sends a request again when the API server says it did not process it (429 with
Retry-After), and reports every other answer as it came. The server side of this is exercised for
real by the integration suite (a CRD schema change makes the API server answer 429 while its
storage reinitialises); here, the gateway's own decision and loop, with answers given in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tenancy_operator.k8s import client
from tenancy_operator.k8s.client import ApiError, raw, retry_after


class Answer:
    """What `raw` reads of an aiohttp response: status, headers, body, release."""

    def __init__(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"{}") -> None:
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.reason = "test"
        self.released = False

    async def read(self) -> bytes:
        return self.body

    def release(self) -> None:
        self.released = True

    def getheaders(self) -> dict[str, str]:
        return self.headers


class Server:
    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.sent = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Answer:
        assert kwargs.get("_preload_content") is False
        self.sent += 1
        return self.answers.pop(0)


def test_only_a_429_is_retried_and_its_wait_is_bounded() -> None:
    assert retry_after(429, {"Retry-After": "1"}) == 1.0
    assert retry_after(429, {}) == 1.0
    assert retry_after(429, {"Retry-After": "Thu, 03 Dec 2026 06:01:08 GMT"}) == 1.0
    assert retry_after(429, {"Retry-After": "3600"}) == client.RETRY_AFTER_CAP
    assert retry_after(429, {"Retry-After": "-3"}) == 0.0
    for status in (400, 403, 404, 409, 422, 500, 503):
        assert retry_after(status, {"Retry-After": "1"}) is None


def test_a_throttled_request_is_sent_again_until_it_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "RETRY_AFTER_CAP", 0.01)
    throttled = Answer(429, {"Retry-After": "1"})
    server = Server(throttled, throttled, Answer(200, body=b'{"items": []}'))
    assert asyncio.run(raw(server)) == b'{"items": []}'
    assert server.sent == 3


def test_throttling_that_does_not_end_and_other_errors_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "RETRY_AFTER_CAP", 0.01)
    throttled = Server(*(Answer(429, {"Retry-After": "1"}) for _ in range(client.THROTTLED_ATTEMPTS)))
    with pytest.raises(ApiError) as caught:
        asyncio.run(raw(throttled))
    assert caught.value.status == 429 and throttled.sent == client.THROTTLED_ATTEMPTS

    conflict = Server(Answer(409, {"Retry-After": "1"}))
    with pytest.raises(ApiError) as caught:
        asyncio.run(raw(conflict))
    assert caught.value.status == 409 and conflict.sent == 1
