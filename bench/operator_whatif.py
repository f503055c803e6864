"""``python -m tenancy_operator`` with Kopf settings the operator does not expose changed: what-if
measurements only (``bench/converge --kopf-idle-timeout 0.5``), never a way to run the operator.

BENCH_KOPF_IDLE_TIMEOUT: ``settings.queueing.idle_timeout``, how long an idle per-object worker keeps
its slot of ``worker_limit`` (Kopf's default: 5 s).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import kopf


def main() -> None:
    idle = os.environ.get("BENCH_KOPF_IDLE_TIMEOUT")
    if idle:
        original = kopf.operator

        async def operator(*args: Any, **kwargs: Any) -> Any:
            settings = kwargs.get("settings") or kopf.OperatorSettings()
            settings.queueing.idle_timeout = float(idle)
            kwargs["settings"] = settings
            return await original(*args, **kwargs)

        kopf.operator = operator
    sys.argv = ["tenancy_operator", *sys.argv[1:]]
    runpy.run_module("tenancy_operator", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
