"""Session fixtures for the operator under test, on top of the stack fixture in conftest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess


@pytest.fixture(scope="session")
def cluster(stack: LocalStack) -> Cluster:
    return Cluster(stack.kubeconfig)


@pytest.fixture(scope="session")
def operator(stack: LocalStack) -> Iterator[OperatorProcess]:
    """One operator process for the session, watching all namespaces, sweeping every 3 s."""
    proc = OperatorProcess(stack, stack.workdir, sweep_interval=3.0, env={"TENANCY_QUOTA_INTERVAL_SECONDS": "2"})
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, f"operator did not shut down cleanly on SIGTERM (exit {code}):\n{proc.log_tail()}"
