"""A real Prometheus (Debian's package) for the tests: scrapes the given targets every second."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tenancy_devenv.process import die_with_parent

from .harness import eventually, free_port


class Prometheus:
    """Started at once, ready when constructed; ``stop`` ends it."""

    def __init__(self, workdir: Path, jobs: Mapping[str, int], *, port: int | None = None,
                 rule_files: Sequence[Path] = ()) -> None:
        """``jobs``: job name -> port of a /metrics on 127.0.0.1."""
        exe = shutil.which("prometheus")
        assert exe, "prometheus is missing: run hack/install-system-deps.sh (Debian package prometheus)"
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": [{
                "job_name": job,
                # As the chart's ServiceMonitor: tenant_quota_* keep the tenant's namespace label.
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{target}"]}],
            } for job, target in jobs.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
            )
        eventually(self.ready, timeout=60, what="Prometheus /-/ready")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our own http:// URL
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400 for a query that does not parse
            body = json.loads(exc.read())
        return body

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = self.api("query", query=promql)
        assert body["status"] == "success", f"{promql}: {body.get('error')}"
        return body["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


