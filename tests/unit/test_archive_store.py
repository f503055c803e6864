"""The archive store configuration, the local directory store, and how a TenantArchive is
recognised as the operator's. The S3 store runs against a real S3 server in
tests/integration/test_archives.py."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tenancy_operator.api.names import ARCHIVE_TOKEN_ANNOTATION
from tenancy_operator.archive_store import LocalStore, S3Store, StoreError, store_for_location
from tenancy_operator.config import Settings, StoreConfig, store_config
from tenancy_operator.db.archives import ArchiveRow
from tenancy_operator.reconcilers.archive_catalog import managed, object_for


def test_the_operator_loads_the_s3_client_only_to_use_it() -> None:
    """A replica archiving to a volume does not carry minio and its cryptography in memory."""
    probe = ("import sys; import tenancy_operator.runtime, tenancy_operator.archive; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('minio', 'Crypto', 'argon2')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_store_from_a_url_or_json() -> None:
    assert store_config("s3://tenancy-archives/eu/prod", "x").prefix == "eu/prod/"
    assert store_config("s3://tenancy-archives", "x").prefix == ""
    config = store_config('{"url": "s3://bkt/p", "endpoint": "http://minio:9000", "credentialsDir": "/etc/s"}', "x")
    assert (config.bucket, config.endpoint, config.credentials_dir) == ("bkt", "http://minio:9000", Path("/etc/s"))


@pytest.mark.parametrize("bad", [
    "s3://B/upper", "s3://ab", "https://bucket/x", '{"url": "s3://bkt", "unknown": 1}',
    '{"url": "s3://bkt", "serverSideEncryption": "rot13"}', "{not json",
])
def test_bad_store_settings_fail_at_start_up(bad: str) -> None:
    with pytest.raises(ValueError, match="TENANCY_ARCHIVE_STORE"):
        Settings(archive_store=bad)


def test_stores_per_target_override_the_operator_wide_one() -> None:
    settings = Settings(archive_store="s3://shared-bucket", archive_stores='{"eu": "s3://eu-bucket/x"}')
    assert settings.store_for("eu") == StoreConfig(url="s3://eu-bucket/x")
    assert settings.store_for("us") == StoreConfig(url="s3://shared-bucket")
    assert Settings().store_for("us") is None  # the local directory
    with pytest.raises(ValueError, match="TENANCY_ARCHIVE_STORES"):
        Settings(archive_stores='{"eu": "nope"}')


def test_a_location_finds_its_store() -> None:
    configs = [StoreConfig(url="s3://one-bucket"), StoreConfig(url="s3://two-bucket/p")]
    store = store_for_location("s3://two-bucket/p/ns/t/a.dump", configs)
    assert isinstance(store, S3Store) and store.bucket == "two-bucket"
    assert isinstance(store_for_location("/var/lib/tenancy/archive/ns/t/a.dump", configs), LocalStore)
    with pytest.raises(StoreError, match="no archive store is configured for bucket 'gone-bucket'"):
        store_for_location("s3://gone-bucket/a.dump", configs)


def test_a_bucket_name_on_two_stores_is_told_apart_by_the_archives_target() -> None:
    eu = StoreConfig(url="s3://archives/x", endpoint="http://minio.eu:9000")
    us = StoreConfig(url="s3://archives/x", endpoint="http://minio.us:9000", server_side_encryption="AES256")
    store = store_for_location("s3://archives/x/ns/t/a.dump", [eu, us], preferred=us)
    assert isinstance(store, S3Store) and store.config == us
    assert store_for_location("s3://archives/x/ns/t/a.dump", [eu, us], preferred=eu).config == eu  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match="configured on several archive stores"):
        store_for_location("s3://archives/x/ns/t/a.dump", [eu, us])
    # A target's store that does not hold that bucket (changed since): the bucket's store.
    other = StoreConfig(url="s3://elsewhere")
    assert store_for_location("s3://archives/x/a.dump", [eu, other], preferred=other).config == eu  # type: ignore[attr-defined]


def test_the_local_store_writes_whole_objects_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    location = store.location("ns/t/a.dump")
    store.put(location, io.BytesIO(b"x" * 3_000_000))
    with store.read(location) as chunks:
        assert b"".join(chunks) == b"x" * 3_000_000

    class Broken(io.RawIOBase):
        def read(self, size: int = -1, /) -> bytes:
            raise OSError(5, "Input/output error")

    second = store.location("ns/t/b.dump")
    with pytest.raises(StoreError, match="Input/output error"):
        store.put(second, Broken())
    assert store.list("ns") == [location]  # no partial file left, none listed
    store.delete(location)
    store.delete(location)  # twice: no error
    assert store.list("ns") == []


def test_an_unusable_local_store_says_where(tmp_path: Path) -> None:
    (tmp_path / "ns").write_text("a file where a folder should be")
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match=f"archive location {tmp_path} unusable"):
        store.put(store.location("ns/t/a.dump"), io.BytesIO(b"data"))


def _row(token: str | None = "t0ken") -> ArchiveRow:  # noqa: S107 - a test value
    return ArchiveRow(id="shop-20261203t090000z-abc123", tenant_id="00000000-0000-0000-0000-000000000001",
                      namespace="team-a", name="shop", schema_name="tenant_shop", path="s3://b/x.dump",
                      sha256="0" * 64, size_bytes=1, created_at=None, expires_at=None, token=token)


def test_only_the_object_made_for_the_row_is_the_operators() -> None:
    row = _row()
    made = object_for(row)
    assert made["metadata"]["annotations"][ARCHIVE_TOKEN_ANNOTATION] == "t0ken"
    assert made["metadata"]["finalizers"] == ["tenancy.dev/finalizer"]
    assert managed(made, row)
    assert not managed({"metadata": {"annotations": {ARCHIVE_TOKEN_ANNOTATION: "guess"}}}, row)
    assert not managed({"metadata": {}}, row)
    assert not managed(made, None)
    assert not managed({"metadata": {"annotations": {}}}, _row(token=None))
