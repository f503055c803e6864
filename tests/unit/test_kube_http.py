"""The gateway's HTTP: it sends a request again when the API server says it did not process it
(429 with Retry-After), once more with fresh credentials after a 401, reports every other answer
as it came, and gives up on a request that gets no answer within REQUEST_SECONDS. The API server's
side of this is exercised for real by the integration suite (a CRD schema change makes it answer
429 while its storage reinitialises; every request of the operator goes through this transport);
here, the transport's own decisions, against a local HTTP server that gives the answers in order."""

from __future__ import annotations

import asyncio

import kopf
import pytest
from aiohttp import web

from tenancy_operator.k8s import http
from tenancy_operator.k8s.http import ApiError, Transport, path, retry_after


class Server:
    """Answers each request with the next of ``answers`` (status, headers, body), recording the
    Authorization header it came with."""

    def __init__(self, *answers: tuple[int, dict[str, str], bytes]) -> None:
        self.answers = list(answers)
        self.authorizations: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization", ""))
        status, headers, body = self.answers.pop(0)
        return web.Response(status=status, headers=headers, body=body)


def exchange(server: Server, tokens: tuple[str, ...] = ("first", "second")) -> bytes:
    """One GET through a Transport to ``server``; the answer's body. The credentials give each of
    ``tokens`` in turn when asked, then the last again."""

    async def run() -> bytes:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        given = iter(tokens)

        def credentials() -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token=next(given, tokens[-1]))

        transport = await Transport.connect(credentials)
        try:
            return await transport.request("GET", "/api/v1/namespaces")
        finally:
            await transport.close()
            await runner.cleanup()

    return asyncio.run(run())


def test_only_a_429_is_retried_and_its_wait_is_bounded() -> None:
    assert retry_after(429, {"Retry-After": "1"}) == 1.0
    assert retry_after(429, {}) == 1.0
    assert retry_after(429, {"Retry-After": "Thu, 03 Dec 2026 06:01:08 GMT"}) == 1.0
    assert retry_after(429, {"Retry-After": "3600"}) == http.RETRY_AFTER_CAP
    assert retry_after(429, {"Retry-After": "-3"}) == 0.0
    for status in (400, 403, 404, 409, 422, 500, 503):
        assert retry_after(status, {"Retry-After": "1"}) is None


def test_a_throttled_request_is_sent_again_until_it_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "RETRY_AFTER_CAP", 0.01)
    throttled = (429, {"Retry-After": "1"}, b"")
    server = Server(throttled, throttled, (200, {}, b'{"items": []}'))
    assert exchange(server) == b'{"items": []}'
    assert len(server.authorizations) == 3


def test_throttling_that_does_not_end_and_other_errors_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "RETRY_AFTER_CAP", 0.01)
    throttled = Server(*((429, {"Retry-After": "1"}, b"") for _ in range(http.THROTTLED_ATTEMPTS)))
    with pytest.raises(ApiError) as caught:
        exchange(throttled)
    assert caught.value.status == 429 and len(throttled.authorizations) == http.THROTTLED_ATTEMPTS

    status = b'{"kind": "Status", "code": 409, "message": "the object has been modified"}'
    conflict = Server((409, {"Retry-After": "1"}, status))
    with pytest.raises(ApiError) as caught:
        exchange(conflict)
    assert caught.value.status == 409 and len(conflict.authorizations) == 1
    assert caught.value.message == "the object has been modified"
    assert str(caught.value) == "(409) the object has been modified"


def test_a_401_is_sent_once_more_with_the_credentials_taken_again() -> None:
    """A ServiceAccount token rotated on disk: the request is sent again with the new one."""
    server = Server((401, {}, b""), (200, {}, b"{}"))
    assert exchange(server) == b"{}"
    assert server.authorizations == ["Bearer first", "Bearer second"]

    refused = Server((401, {}, b""), (401, {}, b""))
    with pytest.raises(ApiError) as caught:
        exchange(refused)
    assert caught.value.status == 401 and len(refused.authorizations) == 2


def test_unchanged_credentials_make_a_401_final() -> None:
    server = Server((401, {}, b""))
    with pytest.raises(ApiError) as caught:
        exchange(server, tokens=("same",))
    assert caught.value.status == 401 and server.authorizations == ["Bearer same"]


def test_a_request_that_gets_no_answer_fails_after_the_request_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server (or the way to it) that accepts the request and then says nothing: the request
    fails once REQUEST_SECONDS have passed, not after aiohttp's default of five minutes."""
    monkeypatch.setattr(http, "REQUEST_SECONDS", 0.5)

    async def run() -> tuple[bool, BaseException | None]:
        silent = asyncio.Event()

        async def handle(_: web.Request) -> web.Response:
            await silent.wait()  # set only once the test is over: no answer
            return web.Response()

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        transport = await Transport.connect(lambda: kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
        request = asyncio.ensure_future(transport.request("GET", "/api/v1/namespaces"))
        try:
            await asyncio.wait({request}, timeout=10)  # far beyond the bound, far below aiohttp's default
            done = request.done()
            return done, request.exception() if done else None
        finally:
            request.cancel()
            silent.set()
            await transport.close()
            await runner.cleanup()

    done, error = asyncio.run(run())
    assert done, "the request was still waiting for an answer"
    assert isinstance(error, TimeoutError), error


def test_a_name_cannot_add_a_path_segment_or_a_query() -> None:
    assert path("api", "v1", "namespaces", "a/../b", "secrets", "x?watch=1") == \
        "/api/v1/namespaces/a%2F..%2Fb/secrets/x%3Fwatch%3D1"
