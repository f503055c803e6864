"""The operator image (Dockerfile): there is no Docker engine here, so we check what the chart relies
on (non-root uid, entrypoint, PostgreSQL client) and build the wheel the image builds, from exactly
the files the Dockerfile copies, to prove the build context is enough."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.MULTILINE)]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    return steps[last_from:]


def test_runs_as_the_chart_uid_with_the_operator_entrypoint() -> None:
    values = yaml.safe_load((ROOT / "helm" / "tenancy-operator" / "values.yaml").read_text())
    stage = final_stage()
    user = [args for ins, args in stage if ins == "USER"]
    assert user == [f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"]
    entrypoint = [args for ins, args in stage if ins == "ENTRYPOINT"]
    assert entrypoint == ['["python", "-OO", "-m", "tenancy_operator", "run"]']
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'tenancy-operator = "tenancy_operator.cli:main"' in pyproject


def test_installs_the_postgresql_client_and_nothing_from_outside_registries() -> None:
    stage = final_stage()
    runs = " ".join(args for ins, args in stage if ins == "RUN")
    assert "apt-get install -y --no-install-recommends" in runs
    assert 'ARG POSTGRES_CLIENT_PACKAGE=postgresql-client' in DOCKERFILE
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert not re.search(r"\b(curl|wget)\b", DOCKERFILE)
    assert all(ins != "ADD" for ins, _ in instructions())
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE)
    assert base is not None
    assert base.group(1).startswith("python:3.11-slim")


def test_archive_directory_matches_the_chart() -> None:
    deployment = (ROOT / "helm" / "tenancy-operator" / "templates" / "deployment.yaml").read_text()
    assert "TENANCY_ARCHIVE_DIR=/var/lib/tenancy/archive" in DOCKERFILE
    assert "mountPath: /var/lib/tenancy/archive" in deployment


def copied_sources() -> list[str]:
    sources: list[str] = []
    for ins, args in instructions():
        if ins == "COPY" and "--from=" not in args:
            sources += shlex.split(args)[:-1]
    return sources


def test_dockerignore_lets_through_exactly_what_is_copied() -> None:
    lines = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {s.rstrip("/") for s in copied_sources()}


@pytest.mark.timeout(300)
def test_the_build_context_builds_a_complete_wheel(tmp_path: Path) -> None:
    """What the build stage does (pip wheel .), on a copy of only the COPY'd files."""
    context = tmp_path / "context"
    context.mkdir()
    for src in copied_sources():
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, context / src)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / "wheels"),
         str(context)],
        capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheels").glob("tenancy_operator-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    shipped_sql = {
        str(p.relative_to(ROOT / "operator")) for p in (ROOT / "operator" / "tenancy_operator").rglob("*.sql")
    }
    assert shipped_sql
    assert shipped_sql <= names, f"SQL files missing from the wheel: {sorted(shipped_sql - names)}"
    assert "tenancy_operator/cli.py" in names
    # The operator only: the local stack (devenv/) is a development tool, not part of the image.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tenancy_operator"}
    assert "tenancy-operator = tenancy_operator.cli:main" in entry_points
