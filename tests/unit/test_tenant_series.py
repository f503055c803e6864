"""Per-tenant series (observability.metrics.TenantSeries) scrape as prometheus_client's own
gauges and counters would: same names, labels and values, gone when removed."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tenancy_operator.observability.metrics import TenantSeries


def scrape(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]


def test_gauge_with_resource_scrapes_and_is_removed() -> None:
    registry = CollectorRegistry()
    limit = TenantSeries("tenant_quota_limit", "Effective limit.", resource=True, registry=registry)
    limit.set(("ns", "acme", "connections"), 10)
    limit.set(("ns", "acme", "connections"), 12)
    limit.set(("ns", "beta", "storage"), 1024)
    assert scrape(registry) == [
        'tenant_quota_limit{namespace="ns",resource="connections",tenant="acme"} 12.0',
        'tenant_quota_limit{namespace="ns",resource="storage",tenant="beta"} 1024.0',
    ]
    assert registry.get_sample_value("tenant_quota_limit",
                                     {"namespace": "ns", "tenant": "acme", "resource": "connections"}) == 12.0
    limit.remove(("ns", "acme", "connections"))
    limit.remove(("ns", "acme", "connections"))  # a series already gone is no error
    assert scrape(registry) == ['tenant_quota_limit{namespace="ns",resource="storage",tenant="beta"} 1024.0']


def test_counter_is_exposed_with_total_and_only_goes_up() -> None:
    registry = CollectorRegistry()
    calls = TenantSeries("tenant_resource_calls_total", "Statements.", counter=True, registry=registry)
    calls.inc(("ns", "acme"))  # exists from now on, at 0
    assert scrape(registry) == ['tenant_resource_calls_total{namespace="ns",tenant="acme"} 0.0']
    calls.inc(("ns", "acme"), 3)
    calls.inc(("ns", "acme"), 2.5)
    assert registry.get_sample_value("tenant_resource_calls_total", {"namespace": "ns", "tenant": "acme"}) == 5.5
    with pytest.raises(ValueError, match="only goes up"):
        calls.inc(("ns", "acme"), -1)
    assert [f.type for f in registry.collect()] == ["counter"]


def test_a_scrape_while_the_series_change_never_fails() -> None:
    """Prometheus scrapes from the HTTP server's thread while the event loop adds and removes series."""
    registry = CollectorRegistry()
    share = TenantSeries("tenant_load_share_ratio", "Share.", registry=registry)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            share.set(("ns", f"t{i % 500}"), 0.5)
            share.remove(("ns", f"t{(i + 250) % 500}"))
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(200):
            generate_latest(registry)
            share.exposition()  # the metrics page's own rendering
    finally:
        stop.set()
        thread.join()


def test_its_own_rendering_is_prometheus_clients() -> None:
    """The metrics page renders per-tenant families itself (faster): the same text as
    prometheus_client's, label values with quotes, backslashes and newlines included."""
    registry = CollectorRegistry()
    limit = TenantSeries("tenant_quota_limit", "Effective limit (bytes\nfor storage).", resource=True,
                         registry=registry)
    calls = TenantSeries("tenant_resource_calls_total", "Statements.", counter=True, registry=registry)
    for i, value in enumerate((0.0, 1.5, 12.0, 1e21, float("inf"), 1024.0 ** 4, -3.0)):
        limit.set((f"ns-{i}", f"t{i}", "connections" if i % 2 else 'odd"\\\nname'), value)
        calls.inc((f"ns-{i}", f"t{i}"), abs(value))
    assert limit.exposition() + calls.exposition() == generate_latest(registry).decode()


def test_an_age_series_counts_from_its_time() -> None:
    registry = CollectorRegistry()
    age = TenantSeries("tenant_credentials_age_seconds", "Since rotation.", age=True, registry=registry)
    now = time.time()
    age.set(("ns", "old"), now - 3600)
    age.set(("ns", "future"), now + 60)  # a clock ahead of ours: no negative age
    assert 3600 <= registry.get_sample_value("tenant_credentials_age_seconds",
                                             {"namespace": "ns", "tenant": "old"}) < 3660
    assert registry.get_sample_value("tenant_credentials_age_seconds", {"namespace": "ns", "tenant": "future"}) == 0
    (old, future) = [line for line in age.exposition().splitlines() if not line.startswith("#")]
    assert old.startswith('tenant_credentials_age_seconds{namespace="ns",tenant="old"} 360')
    assert future == 'tenant_credentials_age_seconds{namespace="ns",tenant="future"} 0.0'


def test_a_label_value_cannot_forge_a_series() -> None:
    """Tenant and namespace names are validated before they reach a series; the page's own
    rendering escapes label values anyway, so a value that closes the braces and starts a line
    stays one label of one sample."""
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    share = TenantSeries("tenant_load_share_ratio", "Share.", registry=registry)
    forged = 'x"} 1\ntenant_noisy_neighbor{namespace="victim",tenant="victim"} 1\n# '
    share.set(("ns", forged), 0.25)
    families = list(text_string_to_metric_families(share.exposition()))
    assert [f.name for f in families] == ["tenant_load_share_ratio"]
    assert [(s.labels, s.value) for s in families[0].samples] == [({"namespace": "ns", "tenant": forged}, 0.25)]
