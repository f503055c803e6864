"""Session fixtures for the operator under test, on top of the stack fixture in conftest, and the
module fixtures of rollout gates (a Prometheus where the operator looks, scraping an exporter the
test sets through `gate(name, value)`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from minio import Minio

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, eventually
from .prom import SERIES, Exporter, Prometheus


@pytest.fixture(scope="session")
def cluster(stack: LocalStack) -> Cluster:
    return Cluster(stack.kubeconfig)


@pytest.fixture(scope="session")
def s3(stack: LocalStack) -> Minio:
    """A client of the stack's object store, with its keys, to list, read, put or corrupt archives
    behind the operator's back (bucket: ``stack.objectstore.bucket``)."""
    return stack.objectstore.client()


@pytest.fixture(scope="session")
def operator(stack: LocalStack) -> Iterator[OperatorProcess]:
    """One operator process for the session, watching all namespaces, sweeping every 3 s."""
    proc = OperatorProcess(stack, stack.workdir, sweep_interval=3.0, env={"TENANCY_QUOTA_INTERVAL_SECONDS": "2"})
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, f"operator did not shut down cleanly on SIGTERM (exit {code}):\n{proc.log_tail()}"


@pytest.fixture(scope="module")
def gate_exporter() -> Iterator[Exporter]:
    exp = Exporter()
    yield exp
    exp.stop()


@pytest.fixture(scope="module")
def gate_prometheus(stack: LocalStack, operator: OperatorProcess, gate_exporter: Exporter,
                    request: pytest.FixtureRequest) -> Iterator[Prometheus]:
    """At the address the operator asks for its gates, scraping the exporter."""
    workdir = stack.workdir / f"prometheus-{request.module.__name__.rsplit('.', 1)[-1]}"
    prom = Prometheus(workdir, {"gates": gate_exporter.port}, port=operator.prometheus_port)
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def gate(gate_exporter: Exporter, gate_prometheus: Prometheus) -> Callable[[str, float], None]:
    """Set the flag's series to a value and wait until Prometheus has scraped it."""
    def set_value(flag: str, value: float) -> None:
        gate_exporter.values[flag] = value

        def check() -> bool:
            result = gate_prometheus.query(f'{SERIES}{{flag="{flag}"}}')
            return len(result) == 1 and float(result[0]["value"][1]) == value
        eventually(check, timeout=60, what=f"Prometheus scraped {SERIES}{{flag={flag!r}}} = {value}")
    return set_value
