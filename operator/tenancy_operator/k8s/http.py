"""HTTP to the API server: one aiohttp session, authenticated as Kopf logs in.

The operator speaks to the API server as JSON over aiohttp, which Kopf already uses, with the
credentials Kopf's own login returns (``login``): one identity for Kopf's watches and our requests.
Not a generated client library: the operator sends and reads plain JSON documents, and such a
library costs memory in every replica whether used or not (kubernetes_asyncio's client package
imports every model of the API: an empty replica held 104 MB with it installed and 80 without,
``bench/scale``'s empty_rss_mb), and Kopf imports it whenever it is installed. The kubectl
plugin, which runs on workstations with any kubeconfig, keeps it (k8s/kubectl.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"

THROTTLED_ATTEMPTS = 5
"""How many times one request is sent while the API server answers 429."""
RETRY_AFTER_CAP = 5.0
"""The longest wait (seconds) between two sends, whatever Retry-After asks."""
REQUEST_SECONDS = 30.0
"""The longest one request may take, connecting included (aiohttp's default: 5 minutes): an API
server, or a connection to it, gone silent then fails the request, which is retried as any failure
is, instead of holding a reconcile. Kopf's own requests have the same bound (runtime.py)."""
CONNECT_SECONDS = 10.0
"""The longest wait for a new connection to the API server, within REQUEST_SECONDS."""


class ApiError(Exception):
    """A non-2xx answer of the API server: ``status`` holds the HTTP code, ``body`` the answer
    (usually a Status object, whose message ``str()`` shows)."""

    def __init__(self, status: int = 0, reason: str = "", body: bytes = b"",
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = dict(headers or {})
        super().__init__(f"({status}) {self.message}")

    @property
    def message(self) -> str:
        """The API server's own message (a Status object's), else the HTTP reason."""
        try:
            document = json.loads(self.body or b"{}")
        except ValueError:
            document = {}
        message = document.get("message") if isinstance(document, dict) else None
        return str(message or self.reason or "error")


def retry_after(status: int, headers: Mapping[str, str]) -> float | None:
    """Seconds to wait before sending the same request again; None: the answer is final.

    The API server answers 429 with Retry-After when it did not process the request: API Priority
    and Fairness rejected it, or a resource's storage is (re)initialising after its CRD changed.
    Sending it again is then safe for any verb, and is what client-go does; anything else is final.
    """
    if status != 429:
        return None
    try:
        seconds = float(headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The operator's credentials, for Kopf (its login handler) and for ``Transport``: in a pod,
    the ServiceAccount's token; elsewhere $KUBECONFIG (client certificates too)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


def path(*segments: str) -> str:
    """A URL path from segments, each quoted whole (a name cannot add a segment or a query)."""
    return "/" + "/".join(quote(s, safe="") for s in segments)


Query = Sequence[tuple[str, str]]


class Transport:
    """Requests to one API server. ``credentials`` is asked again when the API server answers 401
    (a ServiceAccount token is rotated on disk), and the request sent once more."""

    def __init__(self, info: kopf.ConnectionInfo, credentials: Callable[[], kopf.ConnectionInfo | None], *,
                 max_connections: int = 32, server_hostname: str | None = None) -> None:
        self._credentials = credentials
        self._server = info.server.rstrip("/")
        self._headers = {"User-Agent": "tenancy-operator", **info.as_http_headers()}
        self._server_hostname = server_hostname
        # ``limit``: the pool's bound. aiohttp reuses the longest-idle connection first, so periodic
        # light traffic keeps every pooled connection alive: without a small bound a burst's hundred
        # connections (asyncio's 256 KiB TLS read buffer each) would stay for good. ``trust_env``
        # off: no ~/.netrc and proxy variables looked up in a thread at each request.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, ssl=info.as_ssl_context()),
            proxy=info.proxy_url, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS, sock_connect=CONNECT_SECONDS),
        )

    @classmethod
    async def connect(cls, credentials: Callable[[], kopf.ConnectionInfo | None], *,
                      max_connections: int = 32) -> Transport:
        """``credentials`` reads files (a token, a kubeconfig): called in a thread."""
        info = await asyncio.to_thread(credentials)
        if info is None:
            raise kopf.LoginError("no Kubernetes credentials: no ServiceAccount token and no kubeconfig")
        return cls(info, credentials, max_connections=max_connections)

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, url_path: str, *, query: Query = (), body: Any = None,
                      content_type: str = JSON, accept: str = JSON) -> bytes:
        """The answer's body. A 429 is sent again after its Retry-After (at most THROTTLED_ATTEMPTS
        sends), a 401 once more with fresh credentials; any other non-2xx raises ApiError."""
        data = None if body is None else json.dumps(body).encode()
        relogged = False
        attempt = 1
        while True:
            headers = {**self._headers, "Accept": accept, **({"Content-Type": content_type} if data else {})}
            async with self._session.request(method, self._server + url_path, params=list(query), data=data,
                                             headers=headers, server_hostname=self._server_hostname) as response:
                answer = await response.read()
                status, reason, answer_headers = response.status, response.reason or "", response.headers
            if 200 <= status <= 299:
                return answer
            if status == 401 and not relogged and await self._relogin():
                relogged = True
                continue
            wait = retry_after(status, answer_headers)
            if wait is None or attempt >= THROTTLED_ATTEMPTS:
                raise ApiError(status, reason, answer, answer_headers)
            attempt += 1
            await asyncio.sleep(wait)

    async def _relogin(self) -> bool:
        """Take the credentials again; whether they changed (else the 401 stands)."""
        info = await asyncio.to_thread(self._credentials)
        if info is None:
            return False
        headers = {**self._headers, **info.as_http_headers()}
        changed = headers != self._headers
        self._headers = headers
        return changed
