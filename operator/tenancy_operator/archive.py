"""Tenant archives: pg_dump of one schema streamed to an archive store (archive_store.py: an
S3-compatible bucket or a local directory), verified before anything is dropped and before every
restore.

Connection details reach pg_dump/pg_restore through PG* environment variables, never argv, so no
password shows in ``ps``. Both tools log in as a temporary login that holds only the tenant role's
rights (``db.tenants.delegate_login``): a dump or restore touches objects the tenant defined, and
their code runs with the rights of the login user, which ``--role`` alone does not bound. Each run
has a wall-clock deadline; the tool is killed past it (and its session ends with the login).

No full local copy is made. A dump counts only once the stored object has been read back in full
by ``pg_restore`` with the SHA-256 computed on the way in; only then is its description (the
``.json`` beside it, from which the catalog can be rebuilt) written. A restore checks the SHA-256
in a first pass, and in the second holds back the object's last chunk until the bytes fed to
``pg_restore`` (one transaction) hash to the same value: an object changed in between is killed
before commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tenancy_operator.archive_store import Store, StoreError


class ArchiveUnavailable(Exception):
    """The archive store cannot take or give the dump (down, missing, full) or a tool failed."""


class ArchiveCorrupt(Exception):
    """An archive's bytes no longer match its recorded checksum, or it is missing."""


@dataclass(frozen=True)
class Archive:
    id: str
    location: str
    sha256: str
    size_bytes: int


def pg_env(conninfo: dict[str, Any]) -> dict[str, str]:
    mapping = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
               "dbname": "PGDATABASE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({mapping[k]: str(v) for k, v in conninfo.items() if k in mapping and v is not None})
    return env


DEBIAN_PG_DIRS = Path("/usr/lib/postgresql")
"""Debian's and PGDG's layout: the client tools of each installed major in ``<major>/bin``."""
_VERSION = re.compile(rb"\(PostgreSQL\) (\d+)")


def tool_dirs() -> list[str]:
    """Where pg_dump and pg_restore are looked for, in order: TENANCY_PG_BIN_DIR (directories
    separated by ``:``), Debian's per-major directories, then PATH."""
    configured = os.environ.get("TENANCY_PG_BIN_DIR", "").split(os.pathsep)
    debian = sorted((str(d) for d in DEBIAN_PG_DIRS.glob("*/bin")), reverse=True)
    return [d for d in (*configured, *debian, *os.environ.get("PATH", os.defpath).split(os.pathsep)) if d]


@functools.cache
def tool_major(path: str) -> int | None:
    """The PostgreSQL major of a client tool, from its ``--version``; None if it does not say."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = _VERSION.search(out)
    return int(found.group(1)) if found else None


def choose_tool(name: str, found: list[tuple[str, int | None]], server_major: int) -> str:
    """Of the ``(path, major)`` found in search order: the first of the server's major; else the
    nearest newer major (pg_dump reads older servers, and a pg_restore newer than the server may
    emit settings the server lacks: 17's ``SET transaction_timeout`` fails on 15 and 16); else one
    whose major is unknown. An older tool cannot serve: pg_dump refuses a newer server."""
    if not found:
        raise ArchiveUnavailable(f"{name} not found: the operator image must contain the PostgreSQL client tools")
    exact = [path for path, major in found if major == server_major]
    newer = sorted((major, path) for path, major in found if major is not None and major > server_major)
    unknown = [path for path, major in found if major is None]
    if exact or newer or unknown:
        return (exact or [p for _, p in newer] or unknown)[0]
    have = ", ".join(str(major) for major in sorted({m for _, m in found if m is not None}))
    raise ArchiveUnavailable(
        f"no {name} of PostgreSQL {server_major} or newer (found: {have}); install PostgreSQL {server_major}'s "
        "client tools or name their directory in TENANCY_PG_BIN_DIR")


def find_tool(name: str, server_major: int) -> str:
    found: list[tuple[str, int | None]] = []
    seen: set[str] = set()
    for directory in tool_dirs():
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if real in seen or not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        seen.add(real)
        found.append((path, tool_major(path)))
    return choose_tool(name, found, server_major)


class _Tool:
    """A pg_dump/pg_restore process run from a worker thread, killed past its deadline; its stderr
    and stdout go to temporary files (never a pipe nobody reads, which could stall it)."""

    def __init__(self, argv: list[str], env: dict[str, str], deadline: float, *, stdin: bool = False,
                 stdout: bool = False) -> None:
        self.name = os.path.basename(argv[0])
        self.deadline = deadline
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finish()
        self.out = tempfile.TemporaryFile() if not stdout else None  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stderr=self.err,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout else self.out)
        self.timed_out = threading.Event()
        self.timer = threading.Timer(deadline, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self) -> None:
        self.timed_out.set()
        self.proc.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def feed(self, chunk: bytes) -> bool:
        """Write to stdin; False once the tool stopped reading (it may have all it needs)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            return False
        return True

    def finish(self) -> str:
        """Wait for the exit; the tool's stdout (if captured to a file). Raises on failure or deadline."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.proc.stdin.close()
        try:
            code = self.proc.wait()
        finally:
            self.timer.cancel()
        try:
            if self.timed_out.is_set():
                raise ArchiveUnavailable(f"{self.name} ran past its {self.deadline:g} s deadline and was stopped")
            if code != 0:
                self.err.seek(0)
                message = self.err.read().decode(errors="replace").strip()[:500]
                raise ArchiveUnavailable(f"{self.name} failed ({code}): {message}")
            if self.out is None:
                return ""
            self.out.seek(0)
            return self.out.read().decode(errors="replace")
        finally:
            self.err.close()
            if self.out is not None:
                self.out.close()


class _Hashing:
    """A reader that hashes and counts what passes through it."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        chunk = self.source.read(size)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk


def new_archive_id(name: str) -> str:
    """Lower case: the id is also the name of the archive's TenantArchive object."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dt%H%M%Sz")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


def archive_key(namespace: str, name: str, archive_id: str) -> str:
    return f"{namespace}/{name}/{archive_id}.dump"


def description_location(location: str) -> str:
    """Where an archive's description (the .json the catalog is rebuilt from) lives."""
    return location[: -len(".dump")] + ".json" if location.endswith(".dump") else location + ".json"


def _dump_sync(store: Store, location: str, argv: list[str], env: dict[str, str], deadline: float) -> tuple[str, int]:
    tool = _Tool(argv, env, deadline, stdout=True)
    assert tool.proc.stdout is not None
    reader = _Hashing(tool.proc.stdout)
    try:
        store.put(location, reader)
    except BaseException:
        tool.kill()
        with contextlib.suppress(ArchiveUnavailable):
            tool.finish()
        with contextlib.suppress(StoreError):
            store.delete(location)
        raise
    try:
        tool.finish()
    except ArchiveUnavailable:
        with contextlib.suppress(StoreError):
            store.delete(location)  # a dump cut short: stored, but not an archive
        raise
    return reader.digest.hexdigest(), reader.size


def _read_back_sync(store: Store, location: str, argv: list[str], env: dict[str, str],
                    deadline: float) -> tuple[str, str]:
    """Stream the object into ``argv`` (a pg_restore reading stdin); its stdout and the object's SHA-256."""
    tool = _Tool(argv, env, deadline, stdin=True)
    digest = hashlib.sha256()
    reading = True  # pg_restore --list stops reading after the table of contents: hash the rest
    try:
        with store.read(location) as chunks:
            for chunk in chunks:
                digest.update(chunk)
                reading = reading and tool.feed(chunk)
    except BaseException:
        tool.kill()
        with contextlib.suppress(ArchiveUnavailable):
            tool.finish()
        raise
    return tool.finish(), digest.hexdigest()


def _restore_sync(store: Store, location: str, sha256: str, argv: list[str], env: dict[str, str],
                  deadline: float) -> None:
    tool = _Tool(argv, env, deadline, stdin=True)
    digest = hashlib.sha256()
    held: bytes | None = None
    try:
        with store.read(location) as chunks:
            for chunk in chunks:
                digest.update(chunk)
                if held is not None:
                    tool.feed(held)
                held = chunk
        if digest.hexdigest() != sha256:
            raise ArchiveCorrupt(f"archive {location} changed while it was restored; nothing was restored")
        if held is not None:
            tool.feed(held)
    except BaseException:
        tool.kill()
        with contextlib.suppress(ArchiveUnavailable):
            tool.finish()
        raise
    tool.finish()


def _describe(store: Store, location: str, meta: dict[str, Any]) -> None:
    store.put_bytes(description_location(location), (json.dumps(meta, indent=2, default=str) + "\n").encode())


DEFAULT_COMPRESSION = 6
"""pg_dump's own default: archives that are kept (deletion, retention) are stored small."""
FAST_COMPRESSION = 1
"""For a move, whose writes are stopped while it dumps: gzip level 1 compresses text-like rows
about twice as fast as level 6 for a few per cent more bytes, and the dump is the largest part of
a move's downtime."""


async def dump_schema(conninfo: dict[str, Any], *, server_version: int, store: Store, namespace: str, name: str,
                      schema: str, role: str, description: dict[str, Any], deadline: float = 3600.0,
                      compression: int = DEFAULT_COMPRESSION) -> Archive:
    """``conninfo`` logs in as a login with the tenant's rights only (``delegate_login``) to a
    server of ``server_version`` (psycopg's ``conn.info.server_version``), which picks the tools.
    ``description`` joins what the archive's .json says (the catalog's columns). ``compression``:
    pg_dump's gzip level (0-9)."""
    archive_id = new_archive_id(name)
    location = store.location(archive_key(namespace, name, archive_id))
    env = pg_env(conninfo)
    major = server_version // 10000
    pg_dump, pg_restore = [await asyncio.to_thread(find_tool, tool, major) for tool in ("pg_dump", "pg_restore")]
    dump = [pg_dump, "--format=custom", f"--schema={schema}", "--no-owner", "--no-acl",
            "--lock-wait-timeout=30000", f"--role={role}", f"--compress={int(compression)}"]
    try:
        sha, size = await asyncio.to_thread(_dump_sync, store, location, dump, env, deadline)
        # Read every byte back: a truncated or unreadable object fails here, before any drop.
        _, again = await asyncio.to_thread(_read_back_sync, store, location, [pg_restore, "--file=/dev/null"],
                                           env, deadline)
        if again != sha:
            raise ArchiveUnavailable(f"archive {location} read back with another checksum than was written")
        meta = {**description, "id": archive_id, "namespace": namespace, "name": name, "schema": schema,
                "location": location, "sha256": sha, "size_bytes": size,
                "created_at": datetime.datetime.now(datetime.UTC).isoformat()}
        await asyncio.to_thread(_describe, store, location, meta)
    except StoreError as exc:
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(store.delete, location)
        raise ArchiveUnavailable(str(exc)) from exc
    except ArchiveUnavailable:
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(store.delete, location)
        raise
    return Archive(archive_id, location, sha, size)


async def restore_schema(conninfo: dict[str, Any], *, server_version: int, store: Store, location: str,
                         sha256: str, schema: str, role: str, workdir: Path, deadline: float = 3600.0) -> None:
    """Restore an archive into an existing, empty ``schema`` as ``role``, in one transaction.
    ``conninfo`` logs in as a login with the tenant's rights only (``delegate_login``) to a server
    of ``server_version``, which picks the pg_restore."""
    env = pg_env(conninfo)
    pg_restore = await asyncio.to_thread(find_tool, "pg_restore", server_version // 10000)
    try:
        toc, actual = await asyncio.to_thread(_read_back_sync, store, location, [pg_restore, "--list"], env,
                                              deadline)
    except StoreError as exc:
        if "NoSuchKey" in str(exc) or "unusable: read" in str(exc):
            raise ArchiveCorrupt(f"archive {location} is missing from its store") from exc
        raise ArchiveUnavailable(str(exc)) from exc
    if actual != sha256:
        raise ArchiveCorrupt(f"archive {location.rsplit('/', 1)[-1]} checksum mismatch: recorded {sha256[:12]}, "
                             f"found {actual[:12]}")
    # The schema itself already exists (the operator creates it as the tenant's owner): skip it.
    kept = [line for line in toc.splitlines() if not (" SCHEMA - " in line and line.rstrip().endswith(schema))]
    listing = workdir / f".restore.{secrets.token_hex(6)}.list"
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(listing.write_text, "\n".join(kept) + "\n")
    try:
        await asyncio.to_thread(
            _restore_sync, store, location, sha256,
            [pg_restore, "--no-owner", "--no-acl", f"--role={role}", "--exit-on-error", "--single-transaction",
             f"--use-list={listing}", f"--dbname={conninfo.get('dbname', '')}"], env, deadline)
    except StoreError as exc:
        raise ArchiveUnavailable(str(exc)) from exc
    finally:
        listing.unlink(missing_ok=True)


async def purge(store: Store, location: str) -> None:
    """Remove an archive's objects (and a legacy local .sha256); safe to repeat."""
    try:
        await asyncio.to_thread(store.delete, location)
        await asyncio.to_thread(store.delete, description_location(location))
        if not location.startswith("s3://"):
            await asyncio.to_thread(store.delete, location[: -len(".dump")] + ".sha256")
    except StoreError as exc:
        raise ArchiveUnavailable(str(exc)) from exc


def _descriptions_sync(store: Store) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for location in store.list(""):
        if not location.endswith(".json"):
            continue
        with store.read(location) as chunks:
            data = b"".join(chunks)
        with contextlib.suppress(ValueError):
            meta = json.loads(data)
            if isinstance(meta, dict) and {"id", "namespace", "name", "sha256", "location"} <= meta.keys():
                found.append(meta)
    return found


async def descriptions(store: Store) -> list[dict[str, Any]]:
    """The descriptions of every archive in ``store``: what the catalog is rebuilt from."""
    try:
        return await asyncio.to_thread(_descriptions_sync, store)
    except StoreError as exc:
        raise ArchiveUnavailable(str(exc)) from exc
