"""Archives in the object store (a real S3-compatible server, s3proxy, started by the harness), each
listed as a TenantArchive: restore by its name, purge by deleting it (unless protected), a store
outage during a deletion, a corrupted object, objects the operator did not create, the catalog
rebuilt from the store; and the second target's store of its own, SeaweedFS with server-side
encryption."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from minio import Minio

from tenancy_devenv.stack import LocalStack

from .harness import GROUP, VERSION, Cluster, OperatorProcess, as_owner, connect, eventually, sql_value, tenant

PLURAL = "tenants"
ARCHIVES = "tenantarchives"
TOKEN = f"{GROUP}/archive-token"


def split(location: str) -> tuple[str, str]:
    assert location.startswith("s3://"), location
    bucket, key = location[5:].split("/", 1)
    return bucket, key


def object_bytes(s3: Minio, location: str) -> bytes:
    bucket, key = split(location)
    response = s3.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def exists(s3: Minio, location: str) -> bool:
    bucket, key = split(location)
    return any(o.object_name == key for o in s3.list_objects(bucket, prefix=key))


def archive_with_rows(stack: LocalStack, cluster: Cluster, namespace: str, name: str, rows: int = 200,
                      **spec: Any) -> dict[str, Any]:
    """A Tenant with a table of ``rows`` rows, deleted with deletionPolicy Archive: its TenantArchive."""
    cluster.create(PLURAL, namespace, tenant(name, deletionPolicy="Archive", **spec))
    cluster.wait_condition(PLURAL, namespace, name)
    with as_owner(stack.admin_dsn(), f"tenant_{name.replace('-', '_')}") as owner:
        owner.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    with connect(cluster.secret_data(namespace, f"{name}-db")["uri"]) as conn:
        conn.execute("INSERT INTO ledger SELECT g, 'entry ' || g FROM generate_series(1, %s) g", [rows])
    cluster.delete(PLURAL, namespace, name)
    eventually(lambda: cluster.gone(PLURAL, namespace, name), timeout=90, what=f"{name} archived and gone")

    def listed() -> dict[str, Any]:
        items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, ARCHIVES,
                                                             label_selector=f"{GROUP}/tenant={name}")["items"]
        assert len(items) == 1, items
        ready = next((c for c in (items[0].get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})
        assert ready.get("status") == "True", items[0].get("status")
        return items[0]  # type: ignore[no-any-return]

    return eventually(listed, timeout=60, what=f"the TenantArchive of {name}")


def test_an_archive_is_stored_verified_listed_and_restored_by_name(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    obj = archive_with_rows(stack, cluster, namespace, "strongbox", rows=500)
    status = obj["status"]
    assert status["phase"] == "Available"
    assert status["tenant"]["namespace"] == namespace and status["tenant"]["name"] == "strongbox"
    assert status["target"] == "default"
    assert status["location"].startswith(f"s3://{stack.objectstore.bucket}/archives/{namespace}/strongbox/")
    data = object_bytes(s3, status["location"])
    assert len(data) == status["sizeBytes"] and hashlib.sha256(data).hexdigest() == status["sha256"]
    description = json.loads(object_bytes(s3, status["location"].removesuffix(".dump") + ".json"))
    assert description["sha256"] == status["sha256"] and description["id"] == obj["metadata"]["name"]
    # What `kubectl get` shows.
    table = stack.kubectl("get", ARCHIVES, "-n", namespace).stdout
    assert obj["metadata"]["name"] in table and "strongbox" in table and "Available" in table

    cluster.create(PLURAL, namespace, tenant("strongbox", restoreFrom=obj["metadata"]["name"]))
    cluster.wait_condition(PLURAL, namespace, "strongbox", timeout=90)
    with connect(cluster.secret_data(namespace, "strongbox-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM ledger").fetchone() == (500, 125250)
    cluster.wait_event(namespace, "strongbox", "Restored")


def test_deleting_a_tenantarchive_purges_it_unless_protected(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    obj = archive_with_rows(stack, cluster, namespace, "keepsake")
    name, location = obj["metadata"]["name"], obj["status"]["location"]
    cluster.patch(ARCHIVES, namespace, name, {"spec": {"protected": True}})
    cluster.delete(ARCHIVES, namespace, name)
    cluster.wait_condition(ARCHIVES, namespace, name, status="False", reason="Protected", timeout=60)
    cluster.wait_event(namespace, name, "PurgeBlocked", "Warning")
    # Kopf's line on the retry reaches the operator's log too (its success lines do not: test_metrics).
    eventually(lambda: [r for r in map(json.loads, operator.log_text().splitlines())
                        if r.get("logger") == "kopf.objects" and r.get("level") == "error" and r.get("name") == name
                        and "the archive is protected" in r.get("event", "")],
               what="Kopf's error line on the blocked purge")
    assert exists(s3, location)
    assert sql_value(stack.admin_dsn(), "SELECT purged_at IS NULL FROM tenancy.tenant_archives WHERE id = %s",
                     [name]) is True

    cluster.patch(ARCHIVES, namespace, name, {"spec": {"protected": False}})
    eventually(lambda: cluster.gone(ARCHIVES, namespace, name), timeout=60, what="TenantArchive gone once unprotected")
    assert not exists(s3, location)
    assert not exists(s3, location.removesuffix(".dump") + ".json")
    assert sql_value(stack.admin_dsn(), "SELECT purged_at IS NOT NULL FROM tenancy.tenant_archives WHERE id = %s",
                     [name]) is True
    cluster.create(PLURAL, namespace, tenant("keepsake", restoreFrom=name))
    cluster.wait_condition(PLURAL, namespace, "keepsake", status="False", reason="ArchiveNotFound")


def test_the_store_down_during_a_deletion_drops_nothing_until_it_returns(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    cluster.create(PLURAL, namespace, tenant("stranded", deletionPolicy="Archive"))
    cluster.wait_condition(PLURAL, namespace, "stranded")
    with as_owner(stack.admin_dsn(), "tenant_stranded") as owner:
        owner.execute("CREATE TABLE precious (v int)")
    with connect(cluster.secret_data(namespace, "stranded-db")["uri"]) as conn:
        conn.execute("INSERT INTO precious VALUES (42)")
    stack.objectstore.stop()
    try:
        cluster.delete(PLURAL, namespace, "stranded")
        cond = eventually(
            lambda: (c := cluster.condition(PLURAL, namespace, "stranded", "Ready")).get("reason") == "ArchiveFailed"
            and c,
            timeout=90, what="ArchiveFailed while the store is down",
        )
        assert "nothing was dropped" in cond["message"] and "archive store" in cond["message"]
        assert cluster.get(PLURAL, namespace, "stranded")["status"]["phase"] == "Deleting"
        cluster.wait_event(namespace, "stranded", "ArchiveFailed", "Warning")
        assert sql_value(stack.admin_dsn(), "SELECT v FROM tenant_stranded.precious") == 42
    finally:
        stack.objectstore.start()
    eventually(lambda: cluster.gone(PLURAL, namespace, "stranded"), timeout=120,
               what="deletion completes once the store is back")
    location = sql_value(stack.admin_dsn(), "SELECT path FROM tenancy.tenant_archives WHERE namespace = %s"
                         " AND name = 'stranded' AND purged_at IS NULL", [namespace])
    assert exists(s3, location)
    assert sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_stranded'") == 0


def test_a_corrupted_object_is_refused_at_restore(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    obj = archive_with_rows(stack, cluster, namespace, "tampered")
    bucket, key = split(obj["status"]["location"])
    data = bytearray(object_bytes(s3, obj["status"]["location"]))
    data[len(data) // 2] ^= 0xFF
    s3.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    cluster.create(PLURAL, namespace, tenant("tampered", restoreFrom=obj["metadata"]["name"]))
    found = cluster.wait_condition(PLURAL, namespace, "tampered", status="False", reason="RestoreFailed", timeout=60)
    assert "checksum mismatch" in next(c for c in found["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_tampered'") == 0


def test_a_tenantarchive_the_operator_did_not_create_is_never_acted_on(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    """A user of another namespace copies a real archive's name and token into their own object:
    the operator reports it NotManaged, and deleting it purges nothing."""
    real = archive_with_rows(stack, cluster, namespace, "coveted")
    other = f"{namespace}-x"
    stack.kubectl("create", "namespace", other)
    try:
        fake = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TenantArchive",
                "metadata": {"name": real["metadata"]["name"],
                             "annotations": {TOKEN: real["metadata"]["annotations"][TOKEN]}},
                "spec": {}}
        cluster.create(ARCHIVES, other, fake)
        cluster.wait_condition(ARCHIVES, other, fake["metadata"]["name"], status="False", reason="NotManaged")
        assert cluster.get(ARCHIVES, other, fake["metadata"]["name"])["status"]["phase"] == "NotManaged"
        cluster.delete(ARCHIVES, other, fake["metadata"]["name"])
        eventually(lambda: cluster.gone(ARCHIVES, other, fake["metadata"]["name"]), timeout=60, what="fake deleted")
        assert exists(s3, real["status"]["location"])
        assert cluster.get(ARCHIVES, namespace, real["metadata"]["name"])["status"]["phase"] == "Available"
    finally:
        stack.kubectl("delete", "namespace", other, "--wait=false", "--ignore-not-found")


def test_the_catalog_is_rebuilt_from_the_store(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    """A reinstall lost the catalog row: the operator finds the archive's description in the store,
    puts the row back, recognises the TenantArchive it made (by its token), and restores from it."""
    obj = archive_with_rows(stack, cluster, namespace, "firebird", rows=50)
    name = obj["metadata"]["name"]
    with connect(stack.admin_dsn()) as conn:
        conn.execute("DELETE FROM tenancy.tenant_archives WHERE id = %s", [name])
    eventually(lambda: sql_value(stack.admin_dsn(), "SELECT object_uid FROM tenancy.tenant_archives WHERE id = %s",
                                 [name]) == obj["metadata"]["uid"], timeout=60, what="catalog row rebuilt")
    cluster.create(PLURAL, namespace, tenant("firebird", restoreFrom=name))
    cluster.wait_condition(PLURAL, namespace, "firebird", timeout=90)
    with connect(cluster.secret_data(namespace, "firebird-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (50,)


def test_retention_purges_the_objects_and_the_tenantarchive(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, s3: Minio
) -> None:
    cluster.create(PLURAL, namespace, tenant("fleeting-arc", deletionPolicy="Archive", archiveRetention="1s"))
    cluster.wait_condition(PLURAL, namespace, "fleeting-arc")
    cluster.delete(PLURAL, namespace, "fleeting-arc")
    eventually(lambda: cluster.gone(PLURAL, namespace, "fleeting-arc"), timeout=60, what="archived")
    location = sql_value(stack.admin_dsn(), "SELECT path FROM tenancy.tenant_archives WHERE namespace = %s"
                         " AND name = 'fleeting-arc'", [namespace])
    archive_id = sql_value(stack.admin_dsn(), "SELECT id FROM tenancy.tenant_archives WHERE namespace = %s"
                           " AND name = 'fleeting-arc'", [namespace])
    eventually(lambda: cluster.gone(ARCHIVES, namespace, archive_id), timeout=60, what="TenantArchive purged")
    assert not exists(s3, location)
    assert sql_value(stack.admin_dsn(), "SELECT purged_at IS NOT NULL FROM tenancy.tenant_archives WHERE id = %s",
                     [archive_id]) is True


def test_a_target_with_a_store_of_its_own_archives_there_encrypted(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """TENANCY_ARCHIVE_STORES gives the second target its own store, SeaweedFS with server-side
    encryption (SSE-S3): the object is stored encrypted, and restores like any."""
    store = stack.encrypted_store
    assert store is not None
    sse = store.client()
    cluster.create(PLURAL, namespace, tenant("abroad", database="second", deletionPolicy="Archive"))
    cluster.wait_condition(PLURAL, namespace, "abroad")
    with as_owner(stack.admin_dsn("second"), "tenant_abroad") as owner:
        owner.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    with connect(cluster.secret_data(namespace, "abroad-db")["uri"]) as conn:
        conn.execute("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    cluster.delete(PLURAL, namespace, "abroad")
    eventually(lambda: cluster.gone(PLURAL, namespace, "abroad"), timeout=90, what="archived")

    def listed() -> dict[str, Any]:
        (item,) = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, ARCHIVES)["items"]
        assert (item.get("status") or {}).get("phase") == "Available", item.get("status")
        return item  # type: ignore[no-any-return]

    status = eventually(listed, timeout=60, what="the TenantArchive")["status"]
    assert status["target"] == "second"
    assert status["location"].startswith(f"s3://{store.bucket}/archives/{namespace}/abroad/")
    bucket, key = split(status["location"])
    assert sse.stat_object(bucket, key).metadata.get("x-amz-server-side-encryption") == "AES256"
    data = object_bytes(sse, status["location"])  # decrypted by the server for our keys
    assert hashlib.sha256(data).hexdigest() == status["sha256"]
    # Not one 64-byte run of the dump is on the volume server's disk...
    windows = [data[i:i + 64] for i in range(0, len(data) - 64, max(1, len(data) // 16))]
    assert windows and not any(w in store.volume_bytes() for w in windows)
    # ...where the same bytes stored without encryption are found (the check can see plaintext).
    sse.put_object(bucket, f"control/{namespace}.dump", io.BytesIO(data), len(data))
    assert all(w in store.volume_bytes() for w in windows)

    cluster.create(PLURAL, namespace, tenant("abroad", database="second", restoreFrom="latest"))
    cluster.wait_condition(PLURAL, namespace, "abroad", timeout=90)
    with connect(cluster.secret_data(namespace, "abroad-db")["uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (5000,)
