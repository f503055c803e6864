"""A second S3-compatible server on loopback, SeaweedFS (`weed mini`: master, volume server, filer
and S3 gateway in one process), for what s3proxy cannot show: server-side encryption. SeaweedFS
honours ``x-amz-server-side-encryption: AES256`` (SSE-S3): the object is encrypted before it
reaches the volume files, with a key-encryption key kept in ``<dir>/.mini_sse_kek``, and read back
decrypted; ``stat`` answers with the header.

`weed` is built once per machine from the Go module proxy by hack/build-seaweedfs.sh.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Unpack

from tenancy_devenv.binaries import repo_root
from tenancy_devenv.objectstore import BUCKET, ObjectStore, _write_private
from tenancy_devenv.process import DevEnvError, Placement, Service, free_ports, wait_for

# Every listener of `weed mini` on a port of ours: two stores (or a dev stack and a test session)
# never collide on SeaweedFS's fixed defaults.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port.grpc", "admin.port", "admin.port.grpc",
)


def ensure_weed() -> Path:
    """Build (first run only, about 10 min) or find the cached `weed` binary."""
    script = repo_root() / "hack" / "build-seaweedfs.sh"
    result = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise DevEnvError(f"{script} failed with exit code {result.returncode} (its log is above)")
    return Path(lines[-1])


class SeaweedStore(ObjectStore):
    """SeaweedFS with one bucket and one identity (our keys), data in ``<workdir>/<name>/data``;
    same interface as :class:`ObjectStore` (client, start, stop, credentials directory)."""

    default_name = "objectstore-sse"
    default_timeout = 90.0

    def __init__(self, workdir: Path, *, access_key: str | None = None, secret_key: str | None = None,
                 bucket: str = BUCKET, other_ports: dict[str, int] | None = None,
                 **where: Unpack[Placement]) -> None:
        fresh = free_ports(len(PORT_FLAGS) + 1)  # in one call, so all distinct
        where["port"] = where.get("port") or fresh[-1]
        super().__init__(workdir, access_key=access_key, secret_key=secret_key, bucket=bucket, **where)
        self.config_file = self.directory / "s3.json"
        saved = other_ports or {}
        self.other_ports = {flag: saved.get(flag, free) for flag, free in zip(PORT_FLAGS, fresh[:-1], strict=True)}
        self.service = Service(self.name, workdir, ["weed", "mini", f"-dir={self.data_dir}"])

    def start(self) -> None:
        """Start `weed mini` unless it runs, wait until S3 answers with our keys, create the bucket
        if missing; idempotent."""
        self._write_credentials()
        if self.pid() is None:
            self._write_config()
            argv = [
                str(ensure_weed()), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={self.port}", f"-s3.config={self.config_file}",
                *(f"-{flag}={port}" for flag, port in self.other_ports.items()),
                # Only the S3 gateway is needed: no WebDAV, no admin UI, no table catalogs.
                "-webdav=false", "-admin.ui=false", "-admin.port.legacy=0", "-debug.port=0",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=64",  # small volume files for a store of a few test archives
            ]
            self.service.start(argv, detached=self.detached)
        probe = self.client(probe=True)
        wait_for(f"SeaweedFS {self.name} to answer on {self.endpoint}", lambda: self._answers(probe),
                 self.timeout, alive=self.service.check_alive, interval=0.2)
        self._ensure_bucket(probe)

    def volume_bytes(self) -> bytes:
        """Everything the volume server has written, as stored on disk (to look for plaintext)."""
        return b"".join(p.read_bytes() for p in sorted(self.data_dir.rglob("*.dat")))

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {"name": "tenancy", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        _write_private(self.config_file, json.dumps({"identities": [identity]}))
