"""Long-running processes tracked through pid files.

Pid files (not in-memory handles) are the source of truth so that one command (``dev down``) can
stop what another (``dev up``) started, and so that ``up`` restarts only what has died.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class DevEnvError(RuntimeError):
    """A part of the local stack could not be built, started or stopped."""


def free_ports(count: int) -> list[int]:
    """Ports the kernel considers free on loopback; all sockets are held open together so the
    ports are distinct."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    *,
    alive: Callable[[], None] | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``ready`` until it is true; ``alive`` raises as soon as the awaited process dies, so a
    crash is reported at once instead of after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        if ready():
            return
        if time.monotonic() > deadline:
            raise DevEnvError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """True if a GET of ``url`` (a server of ours) answers 200; False while nothing listens, or on an
    error status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own http:// URL
            return bool(response.status == 200)
    except OSError:  # URLError and HTTPError included
        return False


def run(argv: Sequence[str], user: pwd.struct_passwd | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion, as ``user`` if given; output captured."""
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        check=False,
        user=None if user is None else user.pw_uid,
        group=None if user is None else user.pw_gid,
        extra_groups=None if user is None else [],
    )


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn asking the kernel to SIGKILL the child when the parent dies, so a killed
    pytest leaves no orphans. It must run after any uid change (which clears the setting)."""
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Service:
    """One process of the stack: pid file ``<workdir>/<name>.pid``, log ``<workdir>/logs/<name>.log``.

    Every one of ``markers`` must occur in the process's command line; they keep a recycled pid
    from being taken for ours.
    """

    def __init__(self, name: str, workdir: Path, markers: Sequence[str], stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.pid_file = workdir / f"{name}.pid"
        self.log_file = workdir / "logs" / f"{name}.log"
        self.markers = tuple(markers)
        self.stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        """The recorded pid if that process is still alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if self._proc is not None and self._proc.pid == pid:
            return pid if self._proc.poll() is None else None  # reaps it, keeping the exit code
        return pid if _alive(pid, self.markers) else None

    def start(
        self,
        argv: Sequence[str],
        *,
        detached: bool,
        env: Mapping[str, str] | None = None,
        user: pwd.struct_passwd | None = None,
    ) -> int:
        """Start in a new session (so Ctrl-C in the terminal reaches only the controlling Python
        process, which stops everything in order); non-detached children die with their parent."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,
                preexec_fn=None if detached else die_with_parent(),
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        return self._proc.pid

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.pid() is None:
            code = self._proc.poll() if self._proc is not None else None
            how = "exited" if code is None else f"exited with code {code}"
            raise DevEnvError(f"{self.name} {how}; its log ({self.log_file}) ends with:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Send ``stop_signal``, SIGKILL the process group after ``timeout``; idempotent."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self.stop_signal)
            if not self._wait_gone(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                if not self._wait_gone(pid, 10.0):
                    raise DevEnvError(f"{self.name} (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        self._proc = None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the log written since the last start."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.rpartition("\n=== ")[2].splitlines()[1:][-lines:])

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        try:
            # Not _alive: an exiting process's command line reads empty before it is a zombie, and
            # it must be gone, not merely unrecognisable, before the next start or the caller's check.
            wait_for(f"{self.name} to exit", lambda: not _exists(pid), timeout)
        except DevEnvError:
            return False
        return True


class Placement(TypedDict, total=False):
    """Where and how a :class:`LoopbackServer` runs; each server kind has its own defaults."""

    port: int | None
    name: str
    detached: bool
    timeout: float


class LoopbackServer:
    """A server of the stack on a loopback port, run as one :class:`Service` (``service``, set by
    the subclass): its files in ``<workdir>/<name>/``, data in ``<workdir>/<name>/data``.

    The port may be given so that a restarted stack keeps its address; otherwise a free one is
    picked now, so it is known before ``start``.
    """

    service: Service
    default_name: str
    default_timeout = 60.0

    def __init__(self, workdir: Path, **where: Unpack[Placement]) -> None:
        self.workdir = workdir
        self.port = where.get("port") or free_ports(1)[0]
        self.name = where.get("name", self.default_name)
        self.detached = where.get("detached", False)
        self.timeout = where.get("timeout", self.default_timeout)
        self.directory = workdir / self.name
        self.data_dir = self.directory / "data"

    def pid(self) -> int | None:
        return self.service.pid()


def _exists(pid: int) -> bool:
    """True until ``pid`` has exited (a zombie counts as exited; ours is reaped here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _alive(pid: int, markers: Sequence[str]) -> bool:
    """True if ``pid`` runs, is not a zombie, and its command line contains all ``markers``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        return False
    text = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return all(m in text for m in markers)


def stop_all(services: Sequence[Service], timeout: float = 20.0) -> None:
    """Stop each service in order even if an earlier one fails; raise the first failure after."""
    errors: list[DevEnvError] = []
    for service in services:
        try:
            service.stop(timeout)
        except DevEnvError as e:
            errors.append(e)
    if errors:
        raise errors[0]
