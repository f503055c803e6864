"""An S3-compatible object store on loopback for tenant archives: s3proxy, a real S3 server (not a
mock), keeping its buckets in a directory of the stack's workdir.

s3proxy is one jar from Maven Central, fetched once per machine into the cache that
hack/build-control-plane.sh uses too; it needs a Java 17+ runtime (hack/install-system-deps.sh
installs one).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import secrets
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Unpack

import urllib3
from minio import Minio
from minio.error import S3Error

from tenancy_devenv.process import DevEnvError, LoopbackServer, Placement, Service, wait_for

S3PROXY_VERSION = "3.1.0"
S3PROXY_JAR = f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar"
S3PROXY_URL = f"https://repo1.maven.org/maven2/org/gaul/s3proxy/{S3PROXY_VERSION}/{S3PROXY_JAR}"
BUCKET = "tenancy-archives"
REGION = "us-east-1"
# A store of a few test archives needs little heap; the client compiler alone starts faster.
JVM_OPTIONS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


def cache_root() -> Path:
    """Shared with the hack/ scripts: ``$TENANCY_CACHE_DIR``, else ``$XDG_CACHE_HOME/tenancy-operator``."""
    if os.environ.get("TENANCY_CACHE_DIR"):
        return Path(os.environ["TENANCY_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tenancy-operator"


def ensure_s3proxy_jar() -> Path:
    """The cached s3proxy jar, downloaded first if missing.

    A lock makes concurrent first runs (test sessions, checkouts sharing the cache) download once;
    the jar appears under its name only after its SHA-1 matched Maven Central's, so a cut-off
    download is never taken for the jar.
    """
    directory = cache_root() / f"s3proxy-{S3PROXY_VERSION}"
    jar = directory / S3PROXY_JAR
    if jar.is_file():
        return jar
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not jar.is_file():
            print(f"[tenancy-devenv] downloading {S3PROXY_URL} (once per machine)", file=sys.stderr, flush=True)
            _download_verified(S3PROXY_URL, jar)
    return jar


def _download_verified(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same directory, checking the
    SHA-1 that Maven Central publishes beside it (``<url>.sha1``)."""
    expected = _expected_sha1(url)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha1(usedforsecurity=False)  # integrity only; HTTPS authenticates the source
        with os.fdopen(fd, "wb") as out, _open(url) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise DevEnvError(f"{url} downloaded with SHA-1 {digest.hexdigest()}, but Maven Central says {expected}")
        tmp.chmod(0o644)
        tmp.replace(dest)
    except (OSError, http.client.HTTPException) as e:  # HTTPException: e.g. the connection cut mid-body
        raise DevEnvError(f"downloading {url} failed: {e}; check the network (or https_proxy) and retry") from None
    finally:
        tmp.unlink(missing_ok=True)


def _expected_sha1(url: str) -> str:
    try:
        with _open(url + ".sha1") as response:
            text = response.read(1024).decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        raise DevEnvError(f"fetching {url}.sha1 failed: {e}; check the network (or https_proxy) and retry") from None
    # The file holds the digest, sometimes followed by the file name.
    match = re.match(r"\s*([0-9a-fA-F]{40})\b", text)
    if match is None:
        raise DevEnvError(f"{url}.sha1 does not hold a SHA-1 digest: {text[:80]!r}")
    return match.group(1).lower()


def _open(url: str) -> http.client.HTTPResponse:
    if not url.startswith("https://"):
        raise DevEnvError(f"refusing to download {url} over anything but HTTPS")
    response: http.client.HTTPResponse = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - HTTPS only, above
    return response


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise DevEnvError("java not found: install a Java 17+ runtime (hack/install-system-deps.sh does)")
    return java


class ObjectStore(LoopbackServer):
    """s3proxy with one bucket: buckets in ``<workdir>/<name>/data``, config in
    ``<workdir>/<name>/s3proxy.conf``, pid file ``<workdir>/<name>.pid``.

    The keys are also written as ``<workdir>/<name>-credentials/{accessKeyId,secretAccessKey}``,
    the way a Kubernetes Secret mounted as a directory looks to the operator. Config and key files
    are written (again) on every start, so whoever keeps the keys (the stack's state.json) stays
    authoritative; omitted ones are generated.
    """

    default_name = "objectstore"

    def __init__(self, workdir: Path, *, access_key: str | None = None, secret_key: str | None = None,
                 bucket: str = BUCKET, **where: Unpack[Placement]) -> None:
        super().__init__(workdir, **where)
        self.access_key = access_key or secrets.token_hex(10)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.bucket = bucket
        self.config_file = self.directory / "s3proxy.conf"
        self.credentials_dir = workdir / f"{self.name}-credentials"
        # The trailing space keeps <name>/s3proxy.conf from matching <name>/s3proxy.conf.orig and the like.
        self.service = Service(self.name, workdir, ["s3proxy", f"--properties {self.config_file} "])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, *, probe: bool = False) -> Minio:
        """An S3 client (minio's, as the operator's) with the store's keys. ``probe``: one attempt
        with short timeouts, for readiness polls (connection refused while the JVM starts)."""
        http = None
        if probe:
            http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=urllib3.Retry(total=0))
        return Minio(f"127.0.0.1:{self.port}", access_key=self.access_key, secret_key=self.secret_key,
                     secure=False, region=REGION, http_client=http)

    def start(self) -> None:
        """Start s3proxy unless it runs, wait until it answers with our keys, create the bucket if
        missing; idempotent."""
        self._write_credentials()
        if self.pid() is None:
            argv = [_java(), *JVM_OPTIONS, "-jar", str(ensure_s3proxy_jar()), "--properties", str(self.config_file)]
            self._write_config()
            self.service.start(argv, detached=self.detached)
        probe = self.client(probe=True)
        wait_for(
            f"s3proxy {self.name} to answer on {self.endpoint}",
            lambda: self._answers(probe),
            self.timeout,
            alive=self.service.check_alive,
            interval=0.2,
        )
        self._ensure_bucket(probe)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the JVM shuts down cleanly), SIGKILL after ``timeout``; returns once it has
        exited; idempotent."""
        self.service.stop(timeout)

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        properties = {
            "s3proxy.endpoint": self.endpoint,
            "s3proxy.authorization": "aws-v2-or-v4",
            "s3proxy.identity": self.access_key,
            "s3proxy.credential": self.secret_key,
            # Newer S3 clients send x-amz-checksum-* headers, which s3proxy otherwise answers with
            # 501 NotImplemented: ignored, the objects round-trip unchanged.
            "s3proxy.ignore-unknown-headers": "true",
            # Objects as plain files under the bucket's directory (filesystem is deprecated).
            "jclouds.provider": "filesystem-nio2",
            "jclouds.filesystem.basedir": str(self.data_dir),
        }
        _write_private(self.config_file, "".join(f"{key}={value}\n" for key, value in properties.items()))

    def _write_credentials(self) -> None:
        self.credentials_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.credentials_dir.chmod(0o700)  # also if an older one was created otherwise
        _write_private(self.credentials_dir / "accessKeyId", self.access_key)
        _write_private(self.credentials_dir / "secretAccessKey", self.secret_key)

    def _answers(self, client: Minio) -> bool:
        """True once s3proxy serves S3 requests signed with our keys; a refusal of the keys (some
        other server on the port) fails at once."""
        try:
            client.list_buckets()
        except S3Error as e:
            raise DevEnvError(f"{self.endpoint} refused the object store's keys: {e.code}") from None
        except (urllib3.exceptions.HTTPError, OSError):  # not listening yet
            return False
        return True

    def _ensure_bucket(self, client: Minio) -> None:
        try:
            if not client.bucket_exists(self.bucket):
                client.make_bucket(self.bucket)
        except S3Error as e:
            raise DevEnvError(f"creating bucket {self.bucket} on {self.endpoint} failed: {e.code}") from None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only, from the first byte on (it holds a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
