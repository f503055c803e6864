"""Where archive bytes live: an S3-compatible bucket, or a local directory for small installs.

Both stores are synchronous (the S3 client is; so is a file): archive.py calls them from worker
threads, streaming. A store addresses an archive by a *location*, the string the catalog keeps:
``s3://bucket/key`` or an absolute path. The S3 client is minio's (Apache-2.0, any S3-compatible
server, typed, no dependency shared with the Kubernetes clients), made afresh per operation so
rotated credentials files take effect at once. It is imported at the first S3 operation: a replica
without an S3 store does not carry it and its cryptography (about 6 MB of each replica's memory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import urllib3

from tenancy_operator.config import StoreConfig

if TYPE_CHECKING:
    from minio import Minio
    from minio.sse import Sse

CHUNK = 1 << 20
PART_SIZE = 16 << 20
"""Multipart upload part: the most a streamed dump holds in memory at once."""


class StoreError(Exception):
    """The store could not be reached or refused the request; the message names the store, never a secret."""


class Store(Protocol):
    def location(self, key: str) -> str: ...

    def put(self, location: str, reader: _Readable) -> None:
        """Stream ``reader`` to its end into ``location``."""

    def put_bytes(self, location: str, data: bytes) -> None: ...

    def read(self, location: str) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """The object's bytes in chunks; StoreError if missing."""

    def delete(self, location: str) -> None:
        """Remove an object; no error if it is already gone."""

    def list(self, prefix: str) -> list[str]:
        """Locations of the objects under ``prefix`` (a key prefix of this store)."""


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class S3Store:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.bucket = config.bucket

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.config.prefix}"

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.config.prefix}{key}"

    def _key(self, location: str) -> str:
        head = f"s3://{self.bucket}/"
        if not location.startswith(head):
            raise StoreError(f"{location} is not in store {self}")
        return location[len(head):]

    def _client(self) -> Minio:
        from minio import Minio
        from minio.credentials.providers import ChainedProvider, EnvAWSProvider, IamAwsProvider, StaticProvider

        cfg = self.config
        endpoint = urlsplit(cfg.endpoint) if cfg.endpoint else None
        host = endpoint.netloc if endpoint else f"s3.{cfg.region}.amazonaws.com"
        secure = endpoint.scheme == "https" if endpoint else True
        timeout = urllib3.Timeout(connect=min(cfg.timeout_seconds, 10.0), read=cfg.timeout_seconds)
        # Few retries: the job ledger retries a failed archive job, and an outage must show soon.
        http = urllib3.PoolManager(timeout=timeout, retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                                                          status_forcelist=(500, 502, 503, 504)))
        if cfg.credentials_dir is not None:
            provider: StaticProvider | ChainedProvider = StaticProvider(*_read_credentials(cfg.credentials_dir))
        else:
            provider = ChainedProvider([EnvAWSProvider(), IamAwsProvider()])
        return Minio(host, secure=secure, region=cfg.region, credentials=provider, http_client=http)

    def _sse(self) -> Sse | None:
        from minio.sse import SseKMS, SseS3

        if self.config.server_side_encryption == "AES256":
            return SseS3()
        if self.config.server_side_encryption == "aws:kms":
            return SseKMS(self.config.kms_key_id, {})
        return None

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        from minio.error import MinioException, S3Error

        def failure(exc: Exception) -> str:
            if isinstance(exc, S3Error):
                return f"archive store {self}: {what}: {exc.code}"
            return f"archive store {self} unreachable: {what}: {type(exc).__name__}"

        return _as_store_error((MinioException, urllib3.exceptions.HTTPError, OSError, ValueError), failure)

    def put(self, location: str, reader: _Readable) -> None:
        with self._errors("upload"):
            self._client().put_object(self.bucket, self._key(location), reader, length=-1,  # type: ignore[arg-type]
                                      part_size=PART_SIZE, num_parallel_uploads=1, sse=self._sse())

    def put_bytes(self, location: str, data: bytes) -> None:
        import io

        with self._errors("upload"):
            self._client().put_object(self.bucket, self._key(location), io.BytesIO(data), length=len(data),
                                      sse=self._sse())

    @contextlib.contextmanager
    def read(self, location: str) -> Iterator[Iterator[bytes]]:
        with self._errors("download"):
            response = self._client().get_object(self.bucket, self._key(location))
        try:
            yield self._chunks(response)
        finally:
            response.close()
            response.release_conn()

    def _chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        with self._errors("download"):
            yield from response.stream(CHUNK)

    def delete(self, location: str) -> None:
        with self._errors("delete"):
            self._client().remove_object(self.bucket, self._key(location))

    def list(self, prefix: str) -> list[str]:
        with self._errors("list"):
            return [self.location(str(o.object_name)[len(self.config.prefix):])
                    for o in self._client().list_objects(self.bucket, prefix=self.config.prefix + prefix,
                                                         recursive=True)
                    if o.object_name]


class LocalStore:
    """A directory (a volume of the operator's). Writes go to a hidden partial file that is fsynced
    and renamed, so a location holds a complete object or nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __str__(self) -> str:
        return str(self.directory)

    def location(self, key: str) -> str:
        return str(self.directory / key)

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        def failure(exc: Exception) -> str:
            strerror = exc.strerror if isinstance(exc, OSError) else None
            return f"archive location {self.directory} unusable: {what}: {strerror or exc}"

        return _as_store_error((OSError,), failure)

    def put(self, location: str, reader: _Readable) -> None:
        path = Path(location)
        partial = path.with_name(f".{path.name}.partial")
        with self._errors("write"):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with partial.open("wb") as f:
                    for chunk in iter(lambda: reader.read(CHUNK), b""):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                partial.rename(path)
                _fsync_dir(path.parent)
            finally:
                partial.unlink(missing_ok=True)

    def put_bytes(self, location: str, data: bytes) -> None:
        import io

        self.put(location, io.BytesIO(data))

    @contextlib.contextmanager
    def read(self, location: str) -> Iterator[Iterator[bytes]]:
        with self._errors("read"):
            f = Path(location).open("rb")  # noqa: SIM115 - closed below, after the caller's reads
        with f:
            yield iter(lambda: f.read(CHUNK), b"")

    def delete(self, location: str) -> None:
        with self._errors("delete"):
            Path(location).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.directory / prefix
        with self._errors("list"):
            if not base.is_dir():
                return []
            return sorted(str(p) for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))


@contextlib.contextmanager
def _as_store_error(handled: tuple[type[Exception], ...], failure: Callable[[Exception], str]) -> Iterator[None]:
    """The store's library and OS errors as one StoreError saying what failed, without their
    tracebacks (which may carry request details)."""
    try:
        yield
    except handled as exc:
        raise StoreError(failure(exc)) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_credentials(directory: Path) -> tuple[str, str, str | None]:
    try:
        access = (directory / "accessKeyId").read_text().strip()
        secret = (directory / "secretAccessKey").read_text().strip()
    except OSError as exc:
        raise StoreError(f"archive store credentials in {directory} unreadable: {exc.strerror or exc}") from None
    token_file = directory / "sessionToken"
    token = token_file.read_text().strip() if token_file.is_file() else None
    return access, secret, token or None


def store_for_location(location: str, configs: list[StoreConfig], preferred: StoreConfig | None = None) -> Store:
    """The store holding ``location``: the configured S3 store of its bucket, or the local directory.

    Two stores (say one MinIO per region) may use the same bucket name, which a location does not
    tell apart: ``preferred`` (the store of the archive's target) decides then; without it, such a
    location is refused rather than looked for in the wrong store."""
    if location.startswith("s3://"):
        bucket = location[5:].split("/", 1)[0]
        candidates = [c for c in configs if c.bucket == bucket]
        if preferred is not None and preferred in candidates:
            return S3Store(preferred)
        if len({(c.endpoint, c.region) for c in candidates}) > 1:
            raise StoreError(f"bucket {bucket!r} is configured on several archive stores (TENANCY_ARCHIVE_STORES); "
                             f"cannot tell which one holds {location}")
        if candidates:
            return S3Store(candidates[0])
        raise StoreError(f"no archive store is configured for bucket {bucket!r} (TENANCY_ARCHIVE_STORE)")
    return LocalStore(Path(location).parent)
