"""The metrics endpoint: the operator's metrics and the per-tenant families in one page, plain or gzip."""

from __future__ import annotations

import gzip
import socket
import urllib.request
from collections.abc import Iterator

import pytest

from tenancy_operator.observability import metrics
from tenancy_operator.observability.metrics_server import exposition, serve


@pytest.fixture
def page_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(port, "127.0.0.1", exposition)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def get(url: str, **headers: str) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - our own http:// URL
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own http:// URL
        return response.read(), dict(response.headers)


def test_the_page_has_the_operators_metrics_and_each_tenants(page_server: str) -> None:
    key = ("shop", "acme", "connections")
    metrics.TENANT_QUOTA_LIMIT.set(key, 25)
    try:
        body, headers = get(page_server)
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        line = 'tenant_quota_limit{namespace="shop",resource="connections",tenant="acme"} 25.0\n'
        assert "\n# TYPE reconcile_total counter\n" in text
        assert line in text
        zipped, headers = get(page_server, **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert line in gzip.decompress(zipped).decode()  # the process's own figures change between scrapes
    finally:
        metrics.TENANT_QUOTA_LIMIT.remove(key)
