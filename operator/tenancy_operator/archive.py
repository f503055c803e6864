"""Tenant archives: pg_dump of one schema to a directory, verified before anything is dropped.

Connection details reach pg_dump/pg_restore through PG* environment variables, never argv, so no
password shows in ``ps``. Both tools log in as a temporary login that holds only the tenant role's
rights (``db.tenants.delegate_login``): a dump or restore touches objects the tenant defined, and
their code runs with the rights of the login user, which ``--role`` alone does not bound. Each run
has a wall-clock deadline; the tool is killed past it (and its session ends with the login).

A dump counts only once it is complete on disk: written to a partial file, fsynced, checksummed,
read back in full by ``pg_restore``, then renamed into place.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ArchiveUnavailable(Exception):
    """The archive location cannot take the dump (missing, not writable, full) or a tool failed."""


class ArchiveCorrupt(Exception):
    """An archive's bytes no longer match its recorded checksum."""


@dataclass(frozen=True)
class Archive:
    id: str
    path: Path
    sha256: str
    size_bytes: int


def pg_env(conninfo: dict[str, Any]) -> dict[str, str]:
    mapping = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
               "dbname": "PGDATABASE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({mapping[k]: str(v) for k, v in conninfo.items() if k in mapping and v is not None})
    return env


async def _run(argv: list[str], env: dict[str, str], deadline: float = 3600.0) -> str:
    # TENANCY_PG_BIN_DIR (config.Settings.pg_bin_dir) first: pg_dump refuses a server of a newer major.
    search = [os.environ.get("TENANCY_PG_BIN_DIR", ""), os.environ.get("PATH", os.defpath)]
    tool = shutil.which(argv[0], path=os.pathsep.join(p for p in search if p))
    if tool is None:
        raise ArchiveUnavailable(f"{argv[0]} not found: the operator image must contain the PostgreSQL client tools")
    proc = await asyncio.create_subprocess_exec(
        tool, *argv[1:], env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(deadline):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ArchiveUnavailable(f"{argv[0]} ran past its {deadline:g} s deadline and was stopped") from None
    if proc.returncode != 0:
        raise ArchiveUnavailable(f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace').strip()[:500]}")
    return out.decode(errors="replace")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_archive_id(name: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


async def dump_schema(conninfo: dict[str, Any], *, directory: Path, namespace: str, name: str, schema: str,
                      role: str, deadline: float = 3600.0) -> Archive:
    """``conninfo`` logs in as a login with the tenant's rights only (``delegate_login``)."""
    archive_id = new_archive_id(name)
    folder = directory / namespace / name
    try:
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        if not await asyncio.to_thread(os.access, folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as exc:
        raise ArchiveUnavailable(f"archive location {directory} unusable: {exc.strerror or exc}") from exc
    partial = folder / f".{archive_id}.dump.partial"
    final = folder / f"{archive_id}.dump"
    env = pg_env(conninfo)
    try:
        await _run(["pg_dump", "--format=custom", f"--schema={schema}", "--no-owner", "--no-acl",
                    "--lock-wait-timeout=30000", f"--role={role}", f"--file={partial}"], env, deadline)
        await asyncio.to_thread(_fsync, partial)
        sha = await asyncio.to_thread(_sha256, partial)
        # Read every byte back: a truncated or unreadable dump fails here, before any drop.
        await _run(["pg_restore", "--file=/dev/null", str(partial)], env, deadline)
        size = (await asyncio.to_thread(partial.stat)).st_size
        await asyncio.to_thread(partial.rename, final)
        meta = {"id": archive_id, "namespace": namespace, "name": name, "schema": schema, "sha256": sha,
                "size_bytes": size, "created_at": datetime.datetime.now(datetime.UTC).isoformat()}
        await asyncio.to_thread((folder / f"{archive_id}.sha256").write_text, f"{sha}  {final.name}\n")
        await asyncio.to_thread((folder / f"{archive_id}.json").write_text, json.dumps(meta, indent=2) + "\n")
        await asyncio.to_thread(_fsync, folder)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ArchiveUnavailable(f"writing the archive failed: {exc.strerror or exc}") from exc
    except ArchiveUnavailable:
        partial.unlink(missing_ok=True)
        raise
    return Archive(archive_id, final, sha, size)


async def restore_schema(conninfo: dict[str, Any], *, path: Path, sha256: str, schema: str, role: str,
                         workdir: Path, deadline: float = 3600.0) -> None:
    """Restore a dump into an existing, empty ``schema`` as ``role``, in one transaction.
    ``conninfo`` logs in as a login with the tenant's rights only (``delegate_login``)."""
    if not await asyncio.to_thread(path.exists):
        raise ArchiveCorrupt(f"archive file {path} is missing")
    actual = await asyncio.to_thread(_sha256, path)
    if actual != sha256:
        raise ArchiveCorrupt(f"archive {path.name} checksum mismatch: recorded {sha256[:12]}, found {actual[:12]}")
    env = pg_env(conninfo)
    toc = await _run(["pg_restore", "--list", str(path)], env)
    # The schema itself already exists (the operator creates it as the tenant's owner): skip it.
    kept = [line for line in toc.splitlines() if not (" SCHEMA - " in line and line.rstrip().endswith(schema))]
    listing = workdir / f".{path.stem}.{secrets.token_hex(4)}.list"
    await asyncio.to_thread(listing.write_text, "\n".join(kept) + "\n")
    try:
        await _run(["pg_restore", "--no-owner", "--no-acl", f"--role={role}", "--exit-on-error",
                    "--single-transaction", f"--use-list={listing}", f"--dbname={conninfo.get('dbname', '')}",
                    str(path)], env, deadline)
    finally:
        listing.unlink(missing_ok=True)


async def purge(path: Path) -> None:
    """Remove an archive's files; safe to repeat."""
    for suffix in (".dump", ".sha256", ".json"):
        await asyncio.to_thread(path.with_suffix(suffix).unlink, missing_ok=True)
