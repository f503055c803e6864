"""A real control plane, two PostgreSQL clusters and two S3-compatible servers (s3proxy for the
archives of the default target, SeaweedFS with server-side encryption for the second's), started
once per test session.

``TENANCY_TEST_PG_MAJOR`` (e.g. 15, 17 or 18; `make test` runs the suite on 15 and 18) picks the
PostgreSQL major of every stack of the run (tenancy_devenv.binaries.postgres_bindir reads it, also for the
stacks some modules start for themselves) and of the operator's pg_dump/pg_restore; unset: the
newest of Debian's packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenancy_devenv import ensure_binaries
from tenancy_devenv.binaries import PG_MAJOR_ENV
from tenancy_devenv.seaweedfs import ensure_weed
from tenancy_devenv.stack import LocalStack

from .fixtures import cluster, gate, gate_exporter, gate_prometheus, operator, s3  # noqa: F401 - fixtures for every integration test
from .harness import sql_value

HERE = Path(__file__).parent
TARGETS = ("default", "second")
PG_MAJOR = int(os.environ[PG_MAJOR_ENV]) if os.environ.get(PG_MAJOR_ENV) else None


def pytest_report_header() -> str:
    return f"PostgreSQL: {PG_MAJOR or 'newest of Debian'} ({PG_MAJOR_ENV})"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration (this hook sees the whole session's items)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    """The session's stack; always stopped, also on failure or Ctrl-C. Its workdir (with logs) is
    kept when a test failed, or always with TENANCY_KEEP_WORKDIR=1."""
    # Show the build's progress (first run on a machine: several minutes) instead of capturing it.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        bin_dir = ensure_binaries()
        ensure_weed()
    # Not under pytest's 0700 basetemp: the postgres user must be able to traverse the path.
    workdir = Path(tempfile.mkdtemp(prefix="tenancy-it-"))
    workdir.chmod(0o755)
    local = LocalStack(workdir, TARGETS, detached=False, with_operator=False, bin_dir=bin_dir,
                       encrypted_store_for="second")
    try:
        local.up()
        for target in TARGETS:
            major = sql_value(local.admin_dsn(target), "SELECT current_setting('server_version_num')::int / 10000")
            assert PG_MAJOR in (None, major), f"TENANCY_TEST_PG_MAJOR={PG_MAJOR} but {target} runs PostgreSQL {major}"
        yield local
    finally:
        local.down()
        if request.session.testsfailed or os.environ.get("TENANCY_KEEP_WORKDIR") == "1":
            print(f"\nintegration stack workdir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def namespace(stack: LocalStack) -> Iterator[str]:
    """A fresh namespace, deleted afterwards without waiting for it to go."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    stack.kubectl("create", "namespace", name)
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
