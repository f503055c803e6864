"""Where the stack's binaries come from: the control plane is built once per machine from Go
modules by hack/build-control-plane.sh (no Docker, no release downloads here); PostgreSQL comes
from Debian's package."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tenancy_operator.devenv.process import DevEnvError

CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")


def repo_root() -> Path:
    """The checkout this package is installed (editable) from: operator/tenancy_operator/ -> ../../."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "hack" / "build-control-plane.sh").is_file():
        raise DevEnvError(f"{root} is not a tenancy-operator checkout; install the package editable (pip -e)")
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


def postgres_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding the server binaries."""
    candidates = [
        d
        for d in Path("/usr/lib/postgresql").glob("*/bin")
        if re.fullmatch(r"\d+", d.parent.name) and (d / "postgres").is_file() and (d / "initdb").is_file()
    ]
    if not candidates:
        raise DevEnvError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
            "install Debian's postgresql package (apt-get install -y postgresql)"
        )
    return max(candidates, key=lambda d: int(d.parent.name))
