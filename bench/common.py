"""What every benchmark shares: the stack it runs on, the operator process, and the meters.

Meters read what the components themselves count, never our guesses: the kernel (/proc) for the
operator's CPU and memory, the kube-apiserver's own ``apiserver_request_total`` for API requests,
PostgreSQL's ``pg_stat_statements`` and ``pg_stat_database`` for statements and transactions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tenancy_devenv.binaries import ensure_binaries
from tenancy_devenv.process import die_with_parent, http_ok
from tenancy_devenv.stack import OPERATOR_PYTHON_FLAGS, LocalStack

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "tenancy.dev", "v1alpha1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
DDL_WORDS = ("CREATE", "ALTER", "GRANT", "REVOKE", "DROP", "COMMENT", "TRUNCATE")
PG_STAT_STATEMENTS_MAX = 100_000  # every tenant's DDL is a distinct entry (identifiers are not normalised)
STATEMENTS_PER_TENANT = 80  # distinct entries a tenant's provisioning, limits and flags leave, with room


OPERATOR_VENV = ROOT / ".venv-operator"


def operator_python() -> str:
    """The Python the measured replicas run on: a venv holding the operator installed as its image
    installs it (Dockerfile: no extras, so no Kubernetes client library, which Kopf would import
    whole), made on first use and again when pyproject.toml changes."""
    python = OPERATOR_VENV / "bin" / "python"
    stamp = OPERATOR_VENV / ".pyproject.sha256"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not python.exists() or not stamp.exists() or stamp.read_text() != wanted:
        log(f"installing the operator into {OPERATOR_VENV} (as the image does)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(OPERATOR_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
        stamp.write_text(wanted)
    return str(python)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(data)))
    return data[rank - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the operator process -------------------------------------------------------------------------


@dataclass
class ProcSample:
    t: float
    cpu_seconds: float
    rss_mb: float
    hwm_mb: float


def proc_sample(pid: int) -> ProcSample:
    """CPU seconds (user + system) and memory of ``pid`` from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    status = Path(f"/proc/{pid}/status").read_text()

    def kb(key: str) -> float:
        m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / 1024 if m else math.nan

    return ProcSample(time.monotonic(), cpu, kb("VmRSS"), kb("VmHWM"))


class Operator:
    """``python -OO -m tenancy_operator run`` as the image runs it, configured by environment variables.

    Settings are the operator's defaults (worker limit, pool size, sweep and quota intervals, JSON
    logs at INFO) unless the caller's environment sets TENANCY_* variables, which pass through.
    """

    def __init__(
        self, kubeconfig: Path, operator_dsn: str, workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.operator_dsn = operator_dsn
        self.workdir = workdir
        self.extra_env = dict(env or {})
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log_offset = 0
        self._levels: Counter[str] = Counter()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        return {
            "TENANCY_LOG_FORMAT": "json",
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TENANCY_DATABASE_TARGETS": json.dumps({"default": self.operator_dsn}),
            "TENANCY_METRICS_PORT": str(self.metrics_port),
            "TENANCY_HEALTH_PORT": str(self.health_port),
            "TENANCY_BIND_ADDRESS": "127.0.0.1",
            "TENANCY_ARCHIVE_DIR": str(self.workdir / "archive"),
            **self.extra_env,
        }

    def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as out:
            self.started_at = time.monotonic()
            # bench.operator_whatif only for a what-if Kopf setting or memory figures; else exactly as users run it.
            whatif = any(self.env().get(k) for k in ("BENCH_KOPF_IDLE_TIMEOUT", "BENCH_TRACEMALLOC",
                                                       "BENCH_MALLOC_STATS", "BENCH_GC_DEFAULTS"))
            module = "bench.operator_whatif" if whatif else "tenancy_operator"
            self.proc = subprocess.Popen(
                [operator_python(), *OPERATOR_PYTHON_FLAGS, "-m", module, "run"], env=self.env(), stdout=out, cwd=ROOT,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"operator not healthy within {timeout}s; see {self.log_path}")
            time.sleep(0.1)  # polling a health endpoint

    def healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def sample(self) -> ProcSample:
        return proc_sample(self.pid)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The operator's own Prometheus samples: (name, sorted labels) -> value."""
        text = self.metrics_text()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric_sum(self, name: str) -> float:
        return text_sum(self.metrics_text(), name)

    def metric(self, name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in self.scrape().items()
                   if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))

    def log_counts(self) -> Counter[str]:
        """Log lines by level (JSON logs) since the process was first started; reads only new lines."""
        if not self.log_path.exists():
            return Counter(self._levels)
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                self._levels[str(rec.get("level", "?")).lower()] += 1
            except (json.JSONDecodeError, AttributeError):
                self._levels["unparsed"] += 1
        return Counter(self._levels)


def text_sum(text: str, name: str, **labels: str) -> float:
    """The sum of one metric's samples with ``labels`` in an operator's metrics page, read from the
    text without parsing the rest: with thousands of tenants the page holds hundreds of thousands
    of per-tenant samples, and serving it takes the operator seconds of CPU, so a caller waiting for
    the operator to be quiet reads it once quiet, not while polling."""
    wanted = "".join(f'(?=[^}}]*\\b{re.escape(k)}="{re.escape(v)}")' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:{{{wanted}[^}}]*}}){'' if labels else '?'} (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def resumed(text: str) -> float:
    """Tenant and FeatureFlag reconciles an operator counted (``reconcile_total``, any result): after
    a start, each one found in sync counts one."""
    return sum(text_sum(text, "reconcile_total", kind=kind) for kind in ("Tenant", "FeatureFlag"))


class Sampler:
    """Samples a process's CPU and RSS in a background asyncio task."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[ProcSample] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.samples.append(proc_sample(self.pid))
            await asyncio.sleep(self.interval)

    def start(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def peak_rss_mb(self) -> float:
        return max((s.rss_mb for s in self.samples), default=math.nan)


# --- the stack -------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A control plane and one PostgreSQL (target "default") to run benchmarks on."""

    kind: str  # "own" (started here, in a temp dir) or "dev" (the one `make dev-up` started)
    workdir: Path
    kubeconfig: Path
    admin_dsn: str
    operator_dsn: str
    local: LocalStack
    bin_dir: Path
    notes: list[str] = field(default_factory=list)

    @classmethod
    def own(cls, workdir: Path | None = None, targets: tuple[str, ...] = ("default",),
            tenants: int = 0) -> Stack:
        bin_dir = ensure_binaries()
        wd = workdir or Path(tempfile.mkdtemp(prefix="tenancy-bench-"))
        wd.chmod(0o755)  # the postgres user must traverse it
        local = LocalStack(wd, list(targets), detached=False, with_operator=False, bin_dir=bin_dir)
        local.up()
        stack = cls("own", wd, local.kubeconfig, local.admin_dsn(), local.operator_dsn(), local, bin_dir)
        stack.ensure_pg_stat_statements(max(PG_STAT_STATEMENTS_MAX, tenants * STATEMENTS_PER_TENANT))
        return stack

    @classmethod
    def dev(cls) -> Stack:
        wd = ROOT / ".dev"
        if not (wd / "state.json").exists():
            raise SystemExit("no dev stack: run `make dev-up` first (or use --stack own)")
        local = LocalStack(wd, ["default"], detached=True, with_operator=True)
        if local.postgres["default"].pid() is None:
            raise SystemExit("the dev stack's PostgreSQL is not running: run `make dev-up` first")
        stack = cls("dev", wd, local.kubeconfig, local.admin_dsn(), local.operator_dsn(), local, local.bin_dir)
        if local.operator.pid() is not None:
            # The bench runs its own operator process against the dev stack, so the same meters
            # apply; `make dev-up` afterwards restarts the dev operator (done in close()).
            local.operator.stop()
            stack.notes.append("dev operator stopped for the run and restarted afterwards")
        stack.ensure_pg_stat_statements()
        return stack

    def close(self, *, keep: bool = False) -> None:
        if self.kind == "own":
            self.local.down()
            if not keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            subprocess.run([str(ROOT / ".venv/bin/tenancy-dev"), "up"], check=False,
                           stdout=subprocess.DEVNULL)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.local.kubectl(*args, input=input).stdout

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5)

    def ensure_pg_stat_statements(self, entries: int = PG_STAT_STATEMENTS_MAX) -> None:
        """Load pg_stat_statements with room for ``entries`` statements (a restart of this
        PostgreSQL if it was not preloaded or had less room)."""
        with self.admin() as conn:
            loaded = conn.execute("SHOW shared_preload_libraries").fetchone()
            preloaded = bool(loaded) and "pg_stat_statements" in str(loaded[0])
            # The stack may preload it already (the operator's load readings use it), with the
            # default of 5000 entries: every tenant's DDL is an entry of its own, so counts of a
            # larger fleet would lose the entries evicted.
            size = conn.execute("SHOW pg_stat_statements.max").fetchone() if preloaded else None
            restart = not preloaded or not size or int(size[0]) < entries
        if restart:
            pg = self.local.postgres["default"]
            # postgresql.conf, not ALTER SYSTEM: the extension's settings are unknown until it is loaded.
            with (pg.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\n# added by bench/ (tenancy-operator benchmarks)\n"
                           + ("" if preloaded else "shared_preload_libraries = 'pg_stat_statements'\n")
                           + f"pg_stat_statements.max = {entries}\n"
                           "pg_stat_statements.track_utility = on\n")
            pg.stop()
            pg.start()
            self.notes.append("pg_stat_statements preloaded (PostgreSQL restarted once)")
        with self.admin() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    # versions, for the report

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {"python": platform.python_version()}
        try:
            from importlib.metadata import version

            for pkg in ("kopf", "aiohttp", "psycopg", "psycopg-pool"):
                out[pkg] = version(pkg)
        except Exception as exc:  # only for the report
            out["packages"] = f"unknown ({exc})"
        with self.admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
        try:
            ver = json.loads(self.kubectl("version", "-o", "json"))
            out["kubernetes"] = ver.get("serverVersion", {}).get("gitVersion", "?")
        except Exception:
            out["kubernetes"] = "?"
        return out


def git_describe(tree: Path = ROOT) -> str:
    """The commit measured (of ``tree``, a checkout), and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False).stdout
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short", "HEAD").strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "cpu": cpu.group(1).strip() if cpu else platform.machine(),
        "kernel": platform.release(),
    }


# --- kube-apiserver's own request counts ------------------------------------------------------------

Key = tuple[str, str]  # (verb, resource[/subresource])


class ApiServerMetrics:
    """``apiserver_request_total`` by verb and resource, read with the kubeconfig's admin cert."""

    def __init__(self, kubeconfig: Path) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        self.url = cluster["server"].rstrip("/") + "/metrics"
        self.ctx = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        self._dir = tempfile.TemporaryDirectory(prefix="bench-cert-")
        cert, key = Path(self._dir.name) / "c.pem", Path(self._dir.name) / "k.pem"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        key.chmod(0o600)
        self.ctx.load_cert_chain(str(cert), str(key))

    def snapshot(self) -> Counter[Key]:
        with urllib.request.urlopen(self.url, context=self.ctx, timeout=10) as r:  # noqa: S310
            text = r.read().decode()
        counts: Counter[Key] = Counter()
        for fam in text_string_to_metric_families(text):
            if fam.name != "apiserver_request":
                continue
            for s in fam.samples:
                if s.name != "apiserver_request_total":
                    continue
                res = s.labels.get("resource", "")
                if s.labels.get("subresource"):
                    res += "/" + s.labels["subresource"]
                counts[(s.labels.get("verb", "?"), res or "(none)")] += int(s.value)
        return counts


def delta(after: Counter[Key], before: Counter[Key]) -> Counter[Key]:
    out: Counter[Key] = Counter()
    for k, v in after.items():
        if v - before.get(k, 0) > 0:
            out[k] = v - before.get(k, 0)
    return out


# Not the operator's: leases (controller-manager and apiserver heartbeats), endpoints (the apiserver's
# own `kubernetes` Service every 10 s), non-resource URLs (/api, /metrics).
IGNORED_RESOURCES = ("leases", "endpoints", "(none)")


def writes(d: Mapping[Key, int]) -> Counter[Key]:
    return Counter({k: v for k, v in d.items() if k[0] in WRITE_VERBS and k[1] not in IGNORED_RESOURCES})


def format_requests(d: Mapping[Key, int], *, per: int | None = None) -> str:
    rows = sorted(((v, k) for k, v in d.items() if k[1] not in IGNORED_RESOURCES), reverse=True)
    parts = []
    for v, (verb, res) in rows:
        parts.append(f"{verb} {res}={v}" + (f" ({v / per:.2f}/tenant)" if per else ""))
    return ", ".join(parts) or "none"


# --- PostgreSQL's own counts ----------------------------------------------------------------------------


@dataclass
class SqlCounts:
    """Statements by role class and kind, from pg_stat_statements, plus transactions."""

    by_role_kind: Counter[tuple[str, str]]  # (operator|tenant|other, SELECT|INSERT|DDL|...) -> calls
    ddl_texts: Counter[str]  # DDL statement shapes (identifiers masked) -> calls
    xacts: int  # xact_commit + xact_rollback of the tenancy database (all roles)
    top: Counter[str] = field(default_factory=Counter)  # "role: statement shape" -> calls
    top_ms: Counter[str] = field(default_factory=Counter)  # "role: statement shape" -> server time (ms)
    # DDL shapes of statements run more than once with the same identifiers -> the calls beyond the first
    ddl_repeats: Counter[str] = field(default_factory=Counter)
    # Entries pg_stat_statements dropped to make room since the reset: counts are incomplete then.
    evicted: int = 0

    def total(self, role: str | None = None, kind: str | None = None) -> int:
        return sum(v for (r, k), v in self.by_role_kind.items()
                   if (role is None or r == role) and (kind is None or k == kind))

    def summary(self, per: int | None = None) -> str:
        parts = []
        for (role, kind), v in sorted(self.by_role_kind.items(), key=lambda kv: (kv[0][0], -kv[1])):
            parts.append(f"{role}:{kind}={v}" + (f" ({v / per:.2f}/tenant)" if per else ""))
        return ", ".join(parts)


def statement_kind(query: str) -> str:
    q = re.sub(r"^\s*((/\*.*?\*/|--[^\n]*)\s*)*", "", query, flags=re.S).lstrip("(").upper()
    word = q.split(None, 1)[0] if q.split() else "?"
    if word in DDL_WORDS:
        return "DDL"
    if word == "WITH":
        return "SELECT"
    return word


def _mask(query: str) -> str:
    return re.sub(r'"[^"]*"|\btenant_\w+|\bbench\w*', "<id>", re.sub(r"'[^']*'", "<lit>", query))[:90]


class PgMeter:
    def __init__(self, admin_dsn: str, operator_role: str = "tenancy_operator") -> None:
        self.admin_dsn = admin_dsn
        self.operator_role = operator_role
        self._xacts0 = 0

    def _conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5)

    def _xacts(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
                           ).fetchone()
        return int(row[0]) if row else 0

    def reset(self) -> None:
        with self._conn() as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
            self._xacts0 = self._xacts(conn)

    def read(self) -> SqlCounts:
        by: Counter[tuple[str, str]] = Counter()
        ddl: Counter[str] = Counter()
        top: Counter[str] = Counter()
        top_ms: Counter[str] = Counter()
        repeats: Counter[str] = Counter()
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT r.rolname, s.query, s.calls, s.total_plan_time + s.total_exec_time"
                " FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()"
            ).fetchall()
            xacts = self._xacts(conn) - self._xacts0
            info = conn.execute("SELECT dealloc FROM pg_stat_statements_info").fetchone()
        for rolname, query, calls, ms in rows:
            role = ("operator" if rolname == self.operator_role else
                    "tenant" if str(rolname).startswith("tenant_") else "other")
            kind = statement_kind(str(query))
            by[(role, kind)] += int(calls)
            if kind == "DDL" and role != "other":
                ddl[_mask(str(query))] += int(calls)
                if int(calls) > 1:
                    repeats[_mask(str(query))] += int(calls) - 1
            if role != "other":
                shape = f"{role}: {_mask(' '.join(str(query).split()))}"
                top[shape] += int(calls)
                top_ms[shape] += round(float(ms or 0))
        return SqlCounts(by, ddl, xacts, top, top_ms, repeats, int(info[0]) if info else 0)

    def statements(self) -> list[tuple[str, str, int]]:
        """(role, query, calls) of everything but the admin's own statements."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT r.rolname, s.query, s.calls FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid"
                " WHERE r.rolname <> 'postgres' ORDER BY s.calls DESC"
            ).fetchall()
        return [(str(a), str(b), int(c)) for a, b, c in rows]


# --- objects the benchmarks apply ------------------------------------------------------------------------

TEMPLATE = "bench-schema"
INIT_SQL = (ROOT / "operator/tenancy_operator/templates/0001_init.sql").read_text()


def tenant_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}"


def tenant_obj(name: str, *, template: str | None = TEMPLATE) -> dict[str, Any]:
    spec: dict[str, Any] = {"displayName": f"Bench {name}", "tier": ("free", "starter", "professional")[hash(name) % 3]}
    if template:
        spec["schemaTemplate"] = template
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Tenant", "metadata": {"name": name}, "spec": spec}


def quota_obj(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Quota", "metadata": {"name": name},
            "spec": {"tenantRef": {"name": name}, "limits": {"connections": 10, "statementTimeout": "30s"}}}


def flag_obj(i: int, tenants: list[str]) -> dict[str, Any]:
    """A flag with a 25 % rollout and overrides for every 10th tenant (offset by the flag's index)."""
    chosen = tenants[i % 10::10][:1000]
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FeatureFlag", "metadata": {"name": f"bench-flag-{i}"},
        "spec": {
            "description": "benchmark flag", "rollout": {"variant": "on", "percentage": 25},
            "tenants": [{"tenant": t, "variant": "on" if j % 2 else "off"} for j, t in enumerate(chosen)],
        },
    }


def template_cm(versions: int = 1) -> dict[str, Any]:
    data = {"0001_init.sql": INIT_SQL}
    for v in range(2, versions + 1):
        data[f"{v:04d}_bench.sql"] = f"CREATE TABLE bench_{v} (id bigint PRIMARY KEY, note text);\n"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": TEMPLATE}, "data": data}


def is_ready(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def fmt_s(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(interval)  # polling with a deadline
