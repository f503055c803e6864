"""Tenant behaviour against the real API server, real PostgreSQL and the operator process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql as psql

from tenancy_devenv.postgres import OPERATOR_ROLE
from tenancy_devenv.stack import LocalStack

from .harness import Cluster, OperatorProcess, as_owner, connect, dba_execute, eventually, sql_value, tenant

PLURAL = "tenants"


def provision(cluster: Cluster, namespace: str, name: str, **spec: object) -> dict[str, object]:
    cluster.create(PLURAL, namespace, tenant(name, **spec))
    return cluster.wait_condition(PLURAL, namespace, name)


def test_tenant_gets_schema_role_and_working_credentials(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    obj = provision(cluster, namespace, "first-light", tier="starter", displayName="Acme Corp")
    status = obj["status"]
    assert status["schema"] == "tenant_first_light"
    assert status["role"] == "tenant_first_light"
    assert status["secretName"] == "first-light-db"
    assert status["phase"] == "Active"
    assert status["database"] == "default"
    assert status["schemaVersion"] == "0001_init"
    assert len(status["tenantId"]) == 36

    # What a user does: kubectl wait, then use the Secret.
    stack.kubectl("wait", "--for=condition=Ready", "tenant/first-light", "-n", namespace, "--timeout=10s")
    creds = cluster.secret_data(namespace, "first-light-db")
    assert set(creds) == {"host", "port", "dbname", "user", "password", "schema", "uri", "sslmode", "jdbcUrl"}
    with as_owner(stack.admin_dsn(), "tenant_first_light") as owner:  # what a migration does
        owner.execute("CREATE TABLE orders (id int PRIMARY KEY, item text)")
    with connect(creds["uri"]) as conn:
        conn.execute("INSERT INTO orders VALUES (1, 'anvil')")
        assert conn.execute("SELECT item FROM orders").fetchall() == [("anvil",)]
        assert conn.execute("SELECT current_schema()").fetchone() == ("tenant_first_light",)
    # The registry knows it.
    row = sql_value(
        stack.admin_dsn(),
        "SELECT state || ':' || tier || ':' || display_name FROM tenancy.tenants"
        " WHERE namespace = %s AND name = 'first-light'",
        [namespace],
    )
    assert row == "active:starter:Acme Corp"
    # Printer columns a person looks at first.
    out = stack.kubectl("get", "tenants", "-n", namespace).stdout
    assert "READY" in out
    assert "tenant_first_light" in out
    assert "0001_init" in out
    assert "starter" in out
    cluster.wait_event(namespace, "first-light", "Provisioned")


def test_operator_keeps_no_membership_in_tenant_roles(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Membership is granted for the statements that need it and revoked with them (standing
    membership in every tenant role would make each new tenant cost O(N²)); one left by an
    earlier version goes at the tenant's next reconcile."""
    memberships = (
        "SELECT count(*)::int FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
        " JOIN pg_roles o ON o.oid = m.member WHERE r.rolname = 'tenant_no_standing' AND o.rolname = %s"
        # 16+: CREATE ROLE gives its creator a membership WITH ADMIN OPTION, INHERIT FALSE, SET FALSE
        # (how it may alter and drop the role): no privileges, not counted. 15 has no such columns.
        " AND coalesce((to_jsonb(m) ->> 'inherit_option')::bool OR (to_jsonb(m) ->> 'set_option')::bool, true)"
    )
    provision(cluster, namespace, "no-standing")
    assert sql_value(stack.admin_dsn(), memberships, [OPERATOR_ROLE]) == 0
    with connect(stack.operator_dsn()) as conn:  # what earlier versions left: the operator's own grant
        conn.execute("GRANT tenant_no_standing TO CURRENT_USER")
    cluster.patch(PLURAL, namespace, "no-standing", {"spec": {"displayName": "No Standing"}})
    eventually(lambda: sql_value(stack.admin_dsn(), memberships, [OPERATOR_ROLE]) == 0, timeout=30,
               what="the standing membership revoked")
    cluster.wait_condition(PLURAL, namespace, "no-standing")


def test_tenants_are_isolated(stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    provision(cluster, namespace, "iso-a")
    provision(cluster, namespace, "iso-b")
    a = cluster.secret_data(namespace, "iso-a-db")["uri"]
    b = cluster.secret_data(namespace, "iso-b-db")["uri"]
    with as_owner(stack.admin_dsn(), "tenant_iso_b") as owner:  # B's migration
        owner.execute("CREATE TABLE secrets_of_b (v text)")
    with connect(b) as conn:
        conn.execute("INSERT INTO secrets_of_b VALUES ('b only')")
    forbidden = [
        "SELECT * FROM tenant_iso_b.secrets_of_b",
        "INSERT INTO tenant_iso_b.secrets_of_b VALUES ('x')",
        "CREATE TABLE tenant_iso_b.planted (v int)",
        "SELECT * FROM tenancy.tenants",
        "CREATE TABLE public.planted (v int)",
    ]
    # A's application login, and A's owner (what A's migrations run as), reach nothing of B's.
    for session in (lambda: connect(a), lambda: as_owner(stack.admin_dsn(), "tenant_iso_a")):
        with session() as conn:
            for statement in forbidden:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
            # Listing B's tables through the catalog shows nothing of B's.
            visible = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'tenant_iso_b'"
            ).fetchone()
            assert visible == (0,)


def test_suspend_and_resume(stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    provision(cluster, namespace, "sleepy")
    uri = cluster.secret_data(namespace, "sleepy-db")["uri"]
    open_session = connect(uri)
    cluster.patch(PLURAL, namespace, "sleepy", {"spec": {"state": "Suspended"}})
    obj = cluster.wait_condition(PLURAL, namespace, "sleepy", reason="Suspended")
    assert obj["status"]["phase"] == "Suspended"
    with pytest.raises(psycopg.OperationalError):
        connect(uri)
    with pytest.raises(psycopg.OperationalError):  # its open session was ended
        open_session.execute("SELECT 1")
    assert (
        sql_value(
            stack.admin_dsn(), "SELECT state FROM tenancy.tenants WHERE namespace = %s AND name = 'sleepy'", [namespace]
        )
        == "suspended"
    )
    cluster.wait_event(namespace, "sleepy", "Suspended")

    cluster.patch(PLURAL, namespace, "sleepy", {"spec": {"state": "Active"}})
    cluster.wait_condition(PLURAL, namespace, "sleepy", reason="Provisioned")
    with connect(uri) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    cluster.wait_event(namespace, "sleepy", "Resumed")


def test_rotation_sets_new_password_and_ends_old_sessions(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "rotor", credentials={"gracePeriod": "2s"})
    old = cluster.secret_data(namespace, "rotor-db")
    session = connect(old["uri"])
    cluster.patch(PLURAL, namespace, "rotor", {"metadata": {"annotations": {"tenancy.dev/rotate-credentials": "r1"}}})
    new = eventually(
        lambda: (d := cluster.secret_data(namespace, "rotor-db"))["password"] != old["password"] and d,
        what="Secret holds a new password",
    )
    assert new["user"] != old["user"]  # role swap: the Secret names the other login

    def old_login_refused() -> bool:
        try:
            connect(old["uri"]).close()
        except psycopg.OperationalError:
            return True
        return False

    def old_session_ended() -> bool:
        try:
            session.execute("SELECT 1")
        except psycopg.OperationalError:
            return True
        return False

    # After the grace period the old login is retired and its sessions are ended.
    eventually(old_login_refused, timeout=60, what="old password refused after the grace period")
    eventually(old_session_ended, timeout=30, what="old session ended")
    with connect(new["uri"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    cluster.wait_event(namespace, "rotor", "CredentialsRotated")
    # Same value again: nothing rotates.
    cluster.patch(PLURAL, namespace, "rotor", {"metadata": {"labels": {"touched": "yes"}}})
    cluster.wait_condition(PLURAL, namespace, "rotor")
    assert cluster.secret_data(namespace, "rotor-db")["password"] == new["password"]


def test_migrations_from_template_and_checksum_mismatch(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    def template(data: dict[str, str]) -> None:
        body = {"metadata": {"name": "shop-schema"}, "data": data}
        try:
            cluster.core.replace_namespaced_config_map("shop-schema", namespace, body)
        except Exception:
            cluster.core.create_namespaced_config_map(namespace, body)

    template({"0001_init.sql": "CREATE TABLE products (id int PRIMARY KEY, name text);"})
    obj = provision(cluster, namespace, "shop", schemaTemplate="shop-schema")
    assert obj["status"]["schemaVersion"] == "0001_init"
    uri = cluster.secret_data(namespace, "shop-db")["uri"]
    with connect(uri) as conn:
        conn.execute("INSERT INTO products VALUES (1, 'kettle')")

    # A new migration is applied once, as the tenant.
    template(
        {
            "0001_init.sql": "CREATE TABLE products (id int PRIMARY KEY, name text);",
            "0002_price.sql": "ALTER TABLE products ADD COLUMN price numeric;",
        }
    )
    cluster.patch(PLURAL, namespace, "shop", {"metadata": {"annotations": {"example.com/nudge": "1"}}})
    eventually(
        lambda: cluster.get(PLURAL, namespace, "shop")["status"].get("schemaVersion") == "0002_price",
        what="schemaVersion 0002_price",
    )
    with connect(uri) as conn:
        assert conn.execute("SELECT name, price FROM products").fetchall() == [("kettle", None)]

    # An applied migration whose text changed is an error, never re-run.
    template(
        {
            "0001_init.sql": "CREATE TABLE products (id int PRIMARY KEY, name text, evil bool);",
            "0002_price.sql": "ALTER TABLE products ADD COLUMN price numeric;",
        }
    )
    cluster.patch(PLURAL, namespace, "shop", {"metadata": {"annotations": {"example.com/nudge": "2"}}})
    cluster.wait_condition(PLURAL, namespace, "shop", status="False", reason="MigrationChecksumMismatch")
    cluster.wait_event(namespace, "shop", "MigrationChecksumMismatch", "Warning")
    with connect(uri) as conn:
        assert conn.execute("SELECT name FROM products").fetchall() == [("kettle",)]


def test_migration_cannot_escalate_to_operator_rights(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A template runs as the tenant login: RESET ROLE cannot reach the operator's privileges."""
    cluster.core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {"name": "evil-schema"},
            "data": {"0001_evil.sql": "RESET ROLE; CREATE TABLE tenancy.stolen (v int);"},
        },
    )
    cluster.create(PLURAL, namespace, tenant("evil", schemaTemplate="evil-schema"))
    cluster.wait_condition(PLURAL, namespace, "evil", status="False", reason="MigrationFailed")
    assert sql_value(stack.admin_dsn(), "SELECT to_regclass('tenancy.stolen') IS NULL") is True


def test_same_name_in_two_namespaces_conflicts(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "twin")
    other = namespace + "-b"
    stack.kubectl("create", "namespace", other)
    try:
        cluster.create(PLURAL, other, tenant("twin"))
        obj = cluster.wait_condition(PLURAL, other, "twin", status="False", reason="Conflict")
        assert namespace in next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]
        assert cluster.condition(PLURAL, other, "twin", "Stalled")["status"] == "True"
        # Deleting the loser must not touch the winner's data.
        cluster.delete(PLURAL, other, "twin")
        eventually(lambda: cluster.gone(PLURAL, other, "twin"), what="conflicting tenant deleted")
        with connect(cluster.secret_data(namespace, "twin-db")["uri"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stack.kubectl("delete", "namespace", other, "--wait=false")


def test_unknown_database_and_second_target(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, tenant("lost", database="nowhere"))
    obj = cluster.wait_condition(PLURAL, namespace, "lost", status="False", reason="UnknownDatabase")
    assert "nowhere" in next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]

    obj = provision(cluster, namespace, "far-away", database="second")
    assert obj["status"]["database"] == "second"
    exists = "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_far_away'"
    assert sql_value(stack.admin_dsn("second"), exists) == 1
    assert sql_value(stack.admin_dsn("default"), exists) == 0
    with connect(cluster.secret_data(namespace, "far-away-db")["uri"]) as conn:
        assert conn.execute("SELECT current_database(), current_schema()").fetchone() == ("tenancy", "tenant_far_away")


@pytest.mark.parametrize(
    ("damage", "repaired", "object_label"),
    [
        (
            "DROP OWNED BY tenant_drift_0; DROP ROLE tenant_drift_0",
            "SELECT count(*) = 1 FROM pg_roles WHERE rolname = 'tenant_drift_0'",
            "role",
        ),
        (
            "REVOKE ALL ON SCHEMA tenant_drift_1 FROM tenant_drift_1",
            "SELECT has_schema_privilege('tenant_drift_1', 'tenant_drift_1', 'CREATE')",
            "grants",
        ),
        (
            "ALTER ROLE tenant_drift_2 SET search_path = public",
            "SELECT 'search_path=tenant_drift_2' = ANY(rolconfig) FROM pg_roles WHERE rolname = 'tenant_drift_2'",
            "search-path",
        ),
    ],
)
def test_catalog_drift_is_repaired(
    stack: LocalStack,
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    damage: str,
    repaired: str,
    object_label: str,
) -> None:
    name = "drift-" + {"role": "0", "grants": "1", "search-path": "2"}[object_label]
    provision(cluster, namespace, name)
    before = operator.metric("drift_repairs_total", kind="Tenant", object=object_label)
    dba_execute(stack.admin_dsn(), damage)
    eventually(lambda: sql_value(stack.admin_dsn(), repaired) is True, timeout=30, what=f"{object_label} repaired")
    eventually(
        lambda: operator.metric("drift_repairs_total", kind="Tenant", object=object_label) > before,
        timeout=30,
        what="drift_repairs_total counted the repair",
    )
    cluster.wait_event(namespace, name, "DriftRepaired")
    cluster.wait_condition(PLURAL, namespace, name)
    with as_owner(stack.admin_dsn(), f"tenant_drift_{name[-1]}") as owner:  # migrations still work
        owner.execute("CREATE TABLE still_works (v int)")
    with connect(cluster.secret_data(namespace, f"{name}-db")["uri"]) as conn:  # and so does the application
        conn.execute("INSERT INTO still_works VALUES (1)")
        assert conn.execute("SELECT v FROM still_works").fetchall() == [(1,)]


def test_deleted_secret_and_reenabled_login_are_repaired(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "keeper")
    cluster.core.delete_namespaced_secret("keeper-db", namespace)
    creds = eventually(lambda: cluster.secret_data(namespace, "keeper-db"), timeout=30, what="Secret re-created")
    with connect(creds["uri"]) as conn:  # the re-created Secret holds a password that works
        assert conn.execute("SELECT 1").fetchone() == (1,)

    cluster.patch(PLURAL, namespace, "keeper", {"spec": {"state": "Suspended"}})
    cluster.wait_condition(PLURAL, namespace, "keeper", reason="Suspended")
    login = creds["user"]
    with connect(stack.admin_dsn()) as conn:
        conn.execute(psql.SQL("ALTER ROLE {} LOGIN").format(psql.Identifier(login)))
        conn.execute("ALTER ROLE tenant_keeper LOGIN")  # the owner never logs in, suspended or not
    for role in (login, "tenant_keeper"):
        eventually(
            lambda r=role: (
                sql_value(stack.admin_dsn(), "SELECT NOT rolcanlogin FROM pg_roles WHERE rolname = %s", [r]) is True
            ),
            timeout=30,
            what=f"login of {role} disabled again",
        )


def test_dropped_schema_is_recreated_empty_and_flagged(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "fragile")
    with connect(stack.admin_dsn()) as conn:
        conn.execute("DROP SCHEMA tenant_fragile CASCADE")
    cond = eventually(
        lambda: cluster.condition(PLURAL, namespace, "fragile", "SchemaRecreated"),
        timeout=30,
        what="SchemaRecreated condition",
    )
    assert cond["status"] == "True"
    assert "data is gone" in cond["message"]
    cluster.wait_event(namespace, "fragile", "SchemaRecreated", "Warning")
    assert operator.metric("drift_repairs_total", kind="Tenant", object="schema") >= 1
    assert sql_value(stack.admin_dsn(), "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_fragile'") >= 1
    # A person acknowledges it; the flag goes away.
    cluster.patch(
        PLURAL,
        namespace,
        "fragile",
        {"metadata": {"annotations": {"tenancy.dev/acknowledge-schema-recreated": "restored-from-backup"}}},
    )
    eventually(
        lambda: not cluster.condition(PLURAL, namespace, "fragile", "SchemaRecreated"),
        what="SchemaRecreated cleared after acknowledgement",
    )


def test_retain_deletion_keeps_data_and_reapply_restores_it(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "phoenix")
    admin = stack.admin_dsn()
    creds = cluster.secret_data(namespace, "phoenix-db")
    with as_owner(admin, "tenant_phoenix") as owner:
        owner.execute("CREATE TABLE memories (v text)")
    with connect(creds["uri"]) as conn:
        conn.execute("INSERT INTO memories VALUES ('first'), ('second')")
    cluster.delete(PLURAL, namespace, "phoenix")
    eventually(lambda: cluster.gone(PLURAL, namespace, "phoenix"), what="Tenant deleted")
    assert sql_value(
        admin, "SELECT count(*) FROM pg_roles WHERE rolcanlogin AND rolname IN ('tenant_phoenix', %s)", [creds["user"]]
    ) == 0
    with pytest.raises(psycopg.OperationalError):
        connect(creds["uri"]).close()
    assert (
        sql_value(admin, "SELECT state FROM tenancy.tenants WHERE namespace = %s AND name = 'phoenix'", [namespace])
        == "deleted"
    )
    assert sql_value(admin, "SELECT count(*) FROM tenant_phoenix.memories") == 2

    provision(cluster, namespace, "phoenix")
    with connect(cluster.secret_data(namespace, "phoenix-db")["uri"]) as conn:
        assert conn.execute("SELECT v FROM memories ORDER BY v").fetchall() == [("first",), ("second",)]


def test_delete_policy_drops_schema_and_role(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    provision(cluster, namespace, "ephemeral", deletionPolicy="Delete")
    session = connect(cluster.secret_data(namespace, "ephemeral-db")["uri"])
    cluster.delete(PLURAL, namespace, "ephemeral")
    eventually(lambda: cluster.gone(PLURAL, namespace, "ephemeral"), what="Tenant deleted")
    admin = stack.admin_dsn()
    assert sql_value(admin, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_ephemeral'") == 0
    assert sql_value(admin, "SELECT count(*) FROM pg_roles WHERE rolname = 'tenant_ephemeral'") == 0
    assert (
        sql_value(admin, "SELECT state FROM tenancy.tenants WHERE namespace = %s AND name = 'ephemeral'", [namespace])
        == "dropped"
    )
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")


def test_server_side_apply_twice_causes_no_churn(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    manifest = f"""
apiVersion: tenancy.dev/v1alpha1
kind: Tenant
metadata:
  name: gitops
  namespace: {namespace}
  labels: {{team: payments}}
  annotations: {{owner: platform}}
spec:
  tier: professional
  displayName: GitOps managed
"""
    stack.kubectl("apply", "--server-side", "--field-manager=flux", "-f", "-", input=manifest)
    cluster.wait_condition(PLURAL, namespace, "gitops")

    def reapply_is_a_no_op() -> bool:
        # The operator may write status meanwhile (quota limits); what matters is that the apply
        # itself changes nothing: it returns the version the object had just before.
        before = cluster.get(PLURAL, namespace, "gitops")["metadata"]["resourceVersion"]
        after = stack.kubectl(
            "apply",
            "--server-side",
            "--field-manager=flux",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
            "-f",
            "-",
            input=manifest,
        ).stdout
        return bool(after == before)

    eventually(reapply_is_a_no_op, timeout=30, what="a re-apply of the same manifest changes nothing")
    again = cluster.get(PLURAL, namespace, "gitops")
    assert again["metadata"]["generation"] == 1
    # The operator owns status and its own bookkeeping only; the user's fields stay the user's.
    for entry in again["metadata"]["managedFields"]:
        if entry["manager"] != "flux":
            fields = entry.get("fieldsV1", {})
            assert "f:spec" not in fields
            assert "f:labels" not in fields.get("f:metadata", {})
            user_annotations = set(fields.get("f:metadata", {}).get("f:annotations", {})) - {"."}
            assert all(a.startswith("f:kopf.tenancy.dev/") for a in user_annotations), user_annotations


@pytest.fixture(scope="module")
def hostile_tenant(stack: LocalStack, cluster: Cluster, operator: OperatorProcess) -> Iterator[str]:
    namespace = f"hostile-{uuid.uuid4().hex[:8]}"
    stack.kubectl("create", "namespace", namespace)
    provision(cluster, namespace, "hostile")
    yield namespace
    stack.kubectl("delete", "namespace", namespace, "--wait=false")


# Any text but NUL (Postgres text cannot hold it) and lone surrogates (not valid UTF-8 JSON).
DISPLAY_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=200
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=DISPLAY_TEXT)
def test_hostile_display_name_is_stored_verbatim(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, hostile_tenant: str, text: str
) -> None:
    namespace = hostile_tenant
    text = text + "'; DROP TABLE tenancy.tenants; --"
    cluster.patch(PLURAL, namespace, "hostile", {"spec": {"displayName": text[:256]}})
    eventually(
        lambda: (
            sql_value(
                stack.admin_dsn(),
                "SELECT display_name FROM tenancy.tenants WHERE namespace = %s AND name = 'hostile'",
                [namespace],
            )
            == text[:256]
        ),
        what="displayName stored verbatim",
    )


def test_restart_confirms_converged_tenants_without_writes_and_repairs_drift(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    names = ["calm-0", "calm-1", "calm-2"]
    for n in names:
        provision(cluster, namespace, n)
    # Two that share a template ConfigMap: confirmed from it as well.
    cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "calm-schema"}, "data": {
        "0001_init.sql": "CREATE TABLE notes (id int PRIMARY KEY);", "0002_more.sql": "ALTER TABLE notes ADD x int;"}})
    templated = ["calm-t0", "calm-t1"]
    for n in templated:
        assert provision(cluster, namespace, n, schemaTemplate="calm-schema")["status"]["schemaVersion"] == "0002_more"
    operator.stop()
    # Drift while the operator is down: the fast path must not vouch for this one.
    with connect(stack.admin_dsn()) as conn:
        conn.execute("ALTER ROLE tenant_calm_2 SET search_path = public")
    confirmed = [*names[:2], *templated]
    versions = {n: cluster.get(PLURAL, namespace, n)["metadata"]["resourceVersion"] for n in confirmed}
    catalog = "SELECT xmin::text FROM pg_namespace WHERE nspname = 'tenancy'"  # changes with any DDL/GRANT on it
    before = sql_value(stack.admin_dsn(), catalog)
    operator.start()
    eventually(
        lambda: (
            sql_value(
                stack.admin_dsn(),
                "SELECT 'search_path=tenant_calm_2' = ANY(rolconfig) FROM pg_roles WHERE rolname = 'tenant_calm_2'",
            )
            is True
        ),
        what="drift made while the operator was down is repaired at start-up",
    )
    assert sql_value(stack.admin_dsn(), catalog) == before, "the restart changed the control schema"
    # The converged ones were confirmed, not rewritten: their objects did not change.
    assert {n: cluster.get(PLURAL, namespace, n)["metadata"]["resourceVersion"] for n in confirmed} == versions
