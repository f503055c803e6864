"""The operator's image installs no Kubernetes client library (the `kubectl` extra is the plugin's):
the operator must start without one, and Kopf must not find one to import (k8s/http.py)."""

from __future__ import annotations

import subprocess
import sys

WITHOUT_CLIENT_LIBRARIES = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("kubernetes_asyncio", "kubernetes"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
import tenancy_operator.cli, tenancy_operator.runtime
tenancy_operator.runtime.build_registry()
from tenancy_operator.k8s.client import Kube
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("kubernetes_asyncio", "kubernetes"))
print(loaded)
"""


def test_the_operator_loads_without_a_kubernetes_client_library() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_CLIENT_LIBRARIES], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
