"""A real Prometheus (Debian's package) for the tests, scraping the given targets every second, and
for rollout gates an exporter the test drives: `gate(name, value)` sets the series
`checkout_error_ratio{flag=name}` and waits until Prometheus has scraped it."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tenancy_devenv.process import die_with_parent, http_ok

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
        return http_ok(f"http://127.0.0.1:{self.port}/-/ready")

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


SERIES = "checkout_error_ratio"


class Exporter:
    """A /metrics the test sets: one gauge per flag name, `checkout_error_ratio{flag="..."}`."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                lines = [f"# TYPE {SERIES} gauge"]
                lines += [f'{SERIES}{{flag="{flag}"}} {value}' for flag, value in sorted(exporter.values.items())]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
