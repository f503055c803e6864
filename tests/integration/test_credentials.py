"""Credentials as an application lives with them: role-swap rotation no query notices, the grace
period, least-privilege logins, migrations the application can use without a manual grant, the
conversion of a tenant provisioned with a single owner login, the schedule, the read-only login and
suspension. Real API server, real PostgreSQL, the operator process."""

from __future__ import annotations

import base64
import threading
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, connect, eventually, sql_value, tenant

PLURAL = "tenants"
ROTATE = "tenancy.dev/rotate-credentials"

INIT = """
CREATE TABLE items (id serial PRIMARY KEY, v text);
CREATE FUNCTION doubled(x int) RETURNS int LANGUAGE sql AS 'SELECT 2 * x';
CREATE FUNCTION secret_sauce() RETURNS int LANGUAGE sql AS 'SELECT 42';
DO $$ BEGIN
  EXECUTE format('GRANT EXECUTE ON FUNCTION doubled(int) TO %s', current_setting('tenancy.app_roles'));
END $$;
"""


def template(cluster: Cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    body = {"metadata": {"name": name}, "data": data}
    try:
        cluster.core.replace_namespaced_config_map(name, namespace, body)
    except Exception:
        cluster.core.create_namespaced_config_map(namespace, body)


def provision(cluster: Cluster, namespace: str, name: str, **spec: object) -> dict[str, Any]:
    cluster.create(PLURAL, namespace, tenant(name, **spec))
    return cluster.wait_condition(PLURAL, namespace, name)


def can_login(dsn: str) -> bool:
    try:
        with connect(dsn) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def alive(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


class App:
    """An application with a pool of connections kept open; it re-reads its Secret only when told
    (as a Secret volume is updated after its sync delay), then replaces its connections one by one.
    Every failed query is recorded."""

    def __init__(self, cluster: Cluster, namespace: str, secret: str, size: int = 4) -> None:
        self.cluster, self.namespace, self.secret = cluster, namespace, secret
        self.creds = cluster.secret_data(namespace, secret)
        self.pool = [connect(self.creds["uri"]) for _ in range(size)]
        self.failures: list[str] = []
        self.queries = 0
        self.reread = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            if self.reread.is_set():
                self.reread.clear()
                self.creds = self.cluster.secret_data(self.namespace, self.secret)
                for i, old in enumerate(self.pool):
                    try:
                        self.pool[i] = connect(self.creds["uri"])
                    except psycopg.Error as exc:
                        self.failures.append(f"connect: {exc}")
                    old.close()
            for conn in self.pool:
                n += 1
                try:
                    conn.execute("INSERT INTO items (v) VALUES (%s)", [f"q{n}"])
                    conn.execute("SELECT count(*) FROM items").fetchone()
                    conn.execute("SELECT doubled(%s)", [n]).fetchone()
                    self.queries += 1
                except psycopg.Error as exc:
                    self.failures.append(f"{self.creds['user']}: {type(exc).__name__}: {exc}")
            self.stop.wait(0.05)

    def user(self) -> str:
        return self.creds["user"]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for conn in self.pool:
            conn.close()


def test_two_rotations_no_failed_query_and_old_login_retired(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    template(cluster, namespace, "app-schema", {"0001_init.sql": INIT})
    obj = provision(cluster, namespace, "steady-app", schemaTemplate="app-schema", tier="professional",
                    credentials={"gracePeriod": "20s"})
    first = cluster.secret_data(namespace, "steady-app-db")
    keys = set(first)
    assert {"host", "port", "dbname", "user", "password", "schema", "uri", "sslmode", "jdbcUrl"} <= keys
    assert "sslmode=" in first["uri"] and first["jdbcUrl"].startswith("jdbc:postgresql://")
    assert first["user"] != "tenant_steady_app"  # the application logs in as a login role, not the owner
    assert obj["status"]["credentials"]["user"] == first["user"]

    app = App(cluster, namespace, "steady-app-db", size=2)  # within the tier's connection limit
    app.thread.start()
    try:
        users = [first["user"]]
        previous = first
        for i in (1, 2):
            stale = connect(previous["uri"])  # a session of the previous login nobody re-reads for
            cluster.patch(PLURAL, namespace, "steady-app", {"metadata": {"annotations": {ROTATE: f"r{i}"}}})
            new = eventually(lambda p=previous: (d := cluster.secret_data(namespace, "steady-app-db"))["user"]
                             != p["user"]
                             and d, what=f"rotation {i}: the Secret names the other login")
            assert set(new) == keys  # keys stay stable across rotations
            users.append(new["user"])
            # The previous login keeps working during the grace period.
            assert can_login(previous["uri"])
            app.reread.set()  # the Secret volume caught up
            eventually(lambda n=new: app.user() == n["user"] and not app.reread.is_set(), what="app re-read the Secret")
            # After the grace period: the old password no longer logs in, its sessions are gone.
            eventually(lambda p=previous: not can_login(p["uri"]), timeout=90, what="old login retired")
            eventually(lambda s=stale: not alive(s), what="old login's session ended")
            stale.close()
            eventually(lambda: cluster.has_event(namespace, "steady-app", "CredentialsRetired"),
                       what="CredentialsRetired Event")
            previous = new
        assert users[0] != users[1] and users[2] == users[0]  # two roles alternate
        assert first["password"] != previous["password"]
        cluster.wait_event(namespace, "steady-app", "CredentialsRotated")
        count_before = app.queries
        eventually(lambda: app.queries > count_before + 10, what="app still querying")
    finally:
        app.close()
    assert app.failures == []
    status = cluster.get(PLURAL, namespace, "steady-app")["status"]["credentials"]
    assert status["user"] == previous["user"] and status.get("retiringUser") is None
    assert status["lastRotatedAt"]
    assert operator.metric("tenant_credentials_age_seconds", namespace=namespace, tenant="steady-app") >= 0


def test_application_login_has_data_privileges_only(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    template(cluster, namespace, "least-schema", {"0001_init.sql": INIT})
    provision(cluster, namespace, "least", schemaTemplate="least-schema")
    uri = cluster.secret_data(namespace, "least-db")["uri"]
    with connect(uri) as conn:
        conn.execute("INSERT INTO items (v) VALUES ('a')")
        conn.execute("UPDATE items SET v = 'b'")
        assert conn.execute("SELECT doubled(21)").fetchone() == (42,)
        for ddl in ("CREATE TABLE mine (x int)", "ALTER TABLE items ADD COLUMN w int", "DROP TABLE items",
                    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "TRUNCATE items",
                    "SELECT secret_sauce()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)
        conn.execute("DELETE FROM items")
    # A later migration adds a table (and a sequence): the application uses it without any grant.
    template(cluster, namespace, "least-schema", {
        "0001_init.sql": INIT,
        "0002_later.sql": "CREATE TABLE later (id bigserial PRIMARY KEY, note text);",
    })
    cluster.patch(PLURAL, namespace, "least", {"metadata": {"annotations": {"example.com/nudge": "1"}}})
    eventually(lambda: cluster.get(PLURAL, namespace, "least")["status"].get("schemaVersion") == "0002_later",
               what="0002_later applied")
    with connect(uri) as conn:
        conn.execute("INSERT INTO later (note) VALUES ('works')")
        assert conn.execute("SELECT note FROM later").fetchall() == [("works",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE later")
    # The objects belong to the owner (no login), not to the application's login.
    assert sql_value(stack.admin_dsn(), "SELECT tableowner FROM pg_tables WHERE schemaname = 'tenant_least'"
                     " AND tablename = 'later'") == "tenant_least"
    assert sql_value(stack.admin_dsn(), "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'tenant_least'") is False


def test_tenant_with_a_single_owner_login_is_converted_without_downtime(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "legacy", credentials={"gracePeriod": "15s"})
    admin = stack.admin_dsn()
    # What earlier versions left: the owner logs in and the Secret names it; no login roles.
    operator.stop()
    try:
        password = "legacy-owner-pw-1"
        with connect(admin) as conn, conn.transaction():
            conn.execute(sql.SQL("ALTER ROLE tenant_legacy LOGIN PASSWORD {}").format(sql.Literal(password)))
            conn.execute("ALTER DEFAULT PRIVILEGES FOR ROLE tenant_legacy GRANT EXECUTE ON FUNCTIONS TO PUBLIC")
            logins = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'tl\\_legacy\\_%'")]
            for role in logins:
                conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))
            conn.execute("UPDATE tenancy.tenants SET login_slot = NULL, retiring_role = NULL, retire_at = NULL,"
                         " rotated_at = NULL WHERE namespace = %s AND name = 'legacy' AND state = 'active'",
                         [namespace])
        old = cluster.secret_data(namespace, "legacy-db")
        host, port, db = old["host"], old["port"], old["dbname"]
        owner_uri = f"postgresql://tenant_legacy:{password}@{host}:{port}/{db}"
        legacy_data = {"host": host, "port": port, "dbname": db, "user": "tenant_legacy", "password": password,
                       "schema": "tenant_legacy", "uri": owner_uri}
        cluster.core.patch_namespaced_secret("legacy-db", namespace, {"data": {
            **dict.fromkeys(old), **{k: base64.b64encode(v.encode()).decode() for k, v in legacy_data.items()}}})
        app = App(cluster, namespace, "legacy-db", size=2)
        with connect(owner_uri) as conn:
            conn.execute("CREATE TABLE items (id serial PRIMARY KEY, v text)")
            conn.execute("CREATE FUNCTION doubled(x int) RETURNS int LANGUAGE sql AS 'SELECT 2 * x'")
        app.thread.start()
    finally:
        operator.start()
    try:
        new = eventually(lambda: (d := cluster.secret_data(namespace, "legacy-db"))["user"] != "tenant_legacy" and d,
                         timeout=90, what="the Secret names a login role")
        assert can_login(owner_uri)  # the owner's password keeps working during the grace period
        app.reread.set()
        eventually(lambda: app.user() == new["user"] and not app.reread.is_set(), what="app re-read the Secret")
        eventually(lambda: not can_login(owner_uri), timeout=90, what="owner login retired")
        count_before = app.queries
        eventually(lambda: app.queries > count_before + 10, what="app still querying")
    finally:
        app.close()
    assert app.failures == []
    assert sql_value(admin, "SELECT rolcanlogin OR rolpassword IS NOT NULL FROM pg_authid"
                     " WHERE rolname = 'tenant_legacy'") is False
    with connect(new["uri"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DROP TABLE items")


def test_rotate_every_schedules_a_rotation(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    obj = provision(cluster, namespace, "sched", credentials={"rotateEvery": "1h", "gracePeriod": "10s"})
    creds = obj["status"]["credentials"]
    last = datetime.fromisoformat(creds["lastRotatedAt"].replace("Z", "+00:00"))
    nxt = datetime.fromisoformat(creds["nextRotationAt"].replace("Z", "+00:00"))
    assert nxt - last == timedelta(hours=1)
    before = cluster.secret_data(namespace, "sched-db")
    # An hour passes (in the registry): the sweep rotates.
    with connect(stack.admin_dsn()) as conn:
        conn.execute("UPDATE tenancy.tenants SET rotated_at = now() - interval '2 hours'"
                     " WHERE namespace = %s AND name = 'sched' AND state = 'active'", [namespace])
    after = eventually(lambda: (d := cluster.secret_data(namespace, "sched-db"))["user"] != before["user"] and d,
                       what="scheduled rotation")
    assert can_login(after["uri"])
    cluster.wait_event(namespace, "sched", "CredentialsRotated")

    def rescheduled() -> bool:
        c = cluster.get(PLURAL, namespace, "sched")["status"]["credentials"]
        return bool(datetime.fromisoformat(c["lastRotatedAt"].replace("Z", "+00:00")) > last
                    and c["nextRotationAt"] != creds["nextRotationAt"])

    eventually(rescheduled, what="nextRotationAt moved on")
    # Too short a schedule is refused by the API server.
    with pytest.raises(Exception, match="rotateEvery"):
        cluster.create(PLURAL, namespace, tenant("too-often", credentials={"rotateEvery": "5m"}))


def test_read_only_login_and_suspension_ends_every_login(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    template(cluster, namespace, "ro-schema", {"0001_init.sql": INIT})
    provision(cluster, namespace, "report", schemaTemplate="ro-schema",
              credentials={"readOnlyLogin": True, "gracePeriod": "10m"})
    ro = cluster.secret_data(namespace, "report-db-readonly")  # there once the Tenant is Ready
    app = cluster.secret_data(namespace, "report-db")
    assert ro["user"] != app["user"]
    with connect(app["uri"]) as conn:
        conn.execute("INSERT INTO items (v) VALUES ('x')")
    with connect(ro["uri"]) as conn:
        assert conn.execute("SELECT v FROM items").fetchall() == [("x",)]
        for write in ("INSERT INTO items (v) VALUES ('y')", "UPDATE items SET v = 'z'", "DELETE FROM items",
                      "CREATE TABLE t (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(write)
    # A rotation leaves two application logins working (grace period of 10 minutes); suspension
    # ends them all at once, the read-only login too.
    cluster.patch(PLURAL, namespace, "report", {"metadata": {"annotations": {ROTATE: "1"}}})
    new = eventually(lambda: (d := cluster.secret_data(namespace, "report-db"))["user"] != app["user"] and d,
                     what="rotated")
    sessions = [connect(app["uri"]), connect(new["uri"]), connect(ro["uri"])]
    cluster.patch(PLURAL, namespace, "report", {"spec": {"state": "Suspended"}})
    eventually(lambda: not any(alive(s) for s in sessions), what="every session ended")
    for s in sessions:
        s.close()
    for uri in (app["uri"], new["uri"], ro["uri"]):
        assert not can_login(uri)
    cluster.patch(PLURAL, namespace, "report", {"spec": {"state": "Active"}})
    eventually(lambda: can_login(new["uri"]) and can_login(ro["uri"]), what="logins back after resume")


def test_a_read_only_secret_made_beforehand_is_never_taken_over(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A namespace user creates `<tenant>-db-readonly` before the Tenant asks for a read-only login:
    the operator refuses it by name, leaves it as it was, and gives its password to no login."""
    planted = {"user": "tl_spy_r_00000000", "password": "chosen-by-the-namespace-user"}
    cluster.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "spy-db-readonly"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in planted.items()},
    })
    cluster.create(PLURAL, namespace, tenant("spy", credentials={"readOnlyLogin": True}))
    obj = cluster.wait_condition(PLURAL, namespace, "spy", status="False", reason="Conflict")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert "spy-db-readonly" in ready["message"]
    assert cluster.secret_data(namespace, "spy-db-readonly") == planted
    ro_login = sql_value(stack.admin_dsn(), "SELECT rolname FROM pg_roles WHERE rolname LIKE 'tl_spy_r_%'")
    if ro_login is not None:  # made, perhaps, but not with the planted password
        assert not can_login(make_conninfo(stack.admin_dsn(), user=ro_login, password=planted["password"]))
