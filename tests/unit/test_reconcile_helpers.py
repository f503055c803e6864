"""Pure helpers of the reconcile: conditions, migration planning, drift detection, configuration."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenancy_operator.api.tenant import TENANT, TenantSpec
from tenancy_operator.archive import pg_env
from tenancy_operator.conditions import Cond, merge, reported, status_patch
from tenancy_operator.config import Settings
from tenancy_operator.db.logins import LoginObserved, login_role
from tenancy_operator.db.registry import CredentialsRow, RegistryRow
from tenancy_operator.db.role_sql import scram_sha256_verifier
from tenancy_operator.db.tenant_migrations import ChecksumMismatch, Migration, migrations_from_data, pending
from tenancy_operator.db.tenants import Observed
from tenancy_operator.handlers.common import backoff
from tenancy_operator.reconcilers.drift import drifted
from tenancy_operator.reconcilers.tenant_base import SecretClaim, first_login_set


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    first = merge(None, [Cond("Ready", "False", "Provisioning", "working")], 1)
    again = merge(first, [Cond("Ready", "False", "DatabaseUnavailable", "down")], 2)
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert again[0]["reason"] == "DatabaseUnavailable"
    assert again[0]["observedGeneration"] == 2
    flipped = merge([{**again[0], "lastTransitionTime": "2000-01-01T00:00:00Z"}], [Cond("Ready", "True", "Ok")], 2)
    assert flipped[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_conditions_one_per_type_ready_first_and_dropped_types_gone() -> None:
    conds = merge(
        None, [Cond("Stalled", "True", "X"), Cond("Ready", "False", "X"), Cond("Reconciling", "True", "Y")], 1
    )
    assert [c["type"] for c in conds] == ["Ready", "Reconciling", "Stalled"]
    after = merge(conds, [Cond("Ready", "True", "Ok")], 1, drop=["Reconciling", "Stalled"])
    assert [c["type"] for c in after] == ["Ready"]


def test_identical_status_is_not_written_again() -> None:
    conds = merge(None, [Cond("Ready", "True", "Provisioned")], 3)
    current = {"observedGeneration": 3, "phase": "Active", "conditions": conds, "extra": "kept"}
    desired = {
        "observedGeneration": 3,
        "phase": "Active",
        "conditions": merge(conds, [Cond("Ready", "True", "Provisioned")], 3),
    }
    assert not status_patch(current, desired)
    assert status_patch(current, {**desired, "phase": "Suspended"})


def test_migrations_run_in_key_order_and_ignore_other_keys() -> None:
    data = {"0002_b.sql": "b", "README": "not sql", "0001_a.sql": "a", "0010_c.sql": "c"}
    assert [m.version for m in migrations_from_data(data)] == ["0001_a", "0002_b", "0010_c"]


def test_pending_skips_applied_and_refuses_changed_text() -> None:
    wanted = [Migration("0001_a", "a"), Migration("0002_b", "b")]
    assert pending(wanted, {"0001_a": Migration("0001_a", "a").checksum}) == [wanted[1]]
    with pytest.raises(ChecksumMismatch, match="0001_a"):
        pending(wanted, {"0001_a": Migration("0001_a", "a changed").checksum})


def test_scram_verifier_matches_rfc_7677_derivation() -> None:
    verifier = scram_sha256_verifier("pencil")
    method, rest = verifier.split("$", 1)
    iterations, salt_b64 = rest.split("$")[0].split(":")
    stored_b64, server_b64 = rest.split("$")[1].split(":")
    assert method == "SCRAM-SHA-256"
    assert iterations == "4096"
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", base64.b64decode(salt_b64), 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert base64.b64decode(stored_b64) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_b64) == hmac.new(salted, b"Server Key", "sha256").digest()
    assert "pencil" not in verifier
    assert scram_sha256_verifier("pencil") != verifier  # a fresh salt every time


GOOD = Observed(
    role_exists=True,
    can_login=True,
    search_path="tenant_x",
    schema_exists=True,
    schema_owned=True,
    schema_privileges=True,
    operator_member=False,
)


LOGINS = {
    "a": LoginObserved(exists=True, can_login=True, marker=None, search_path="tenant_x", grants_ok=True),
    "b": LoginObserved(exists=True, can_login=False, marker=None, search_path="tenant_x", grants_ok=True),
    "r": LoginObserved(exists=True, can_login=False, marker=None, search_path="tenant_x", grants_ok=True),
}
CREDS = CredentialsRow(login_slot="a", retiring_role=None, retire_at=None, rotated_at=None)


def test_drift_detection_names_what_differs() -> None:
    active = TenantSpec.model_validate({})
    suspended = TenantSpec.model_validate({"state": "Suspended"})
    owner = dataclasses.replace(GOOD, can_login=False)  # converted: the owner never logs in
    assert drifted(active, "tenant_x", owner) == []
    assert drifted(active, "tenant_x", owner, LOGINS, CREDS) == []
    # Suspended: the login the Secret names may not log in.
    assert drifted(suspended, "tenant_x", owner, LOGINS, CREDS) == ["login"]
    # The owner of a converted tenant logging in is drift in any state.
    assert drifted(active, "tenant_x", GOOD, LOGINS, CREDS) == ["login"]
    # Not converted yet (no slot recorded): the owner is still the application's login.
    legacy = {s: dataclasses.replace(lo, exists=False, can_login=False) for s, lo in LOGINS.items()}
    assert drifted(active, "tenant_x", GOOD, legacy, None) == ["login-role"]
    # During a grace period the previous login may log in; another idle login may not.
    retiring = dataclasses.replace(CREDS, retiring_role=login_role("tenant_x", "b"))
    both = {**LOGINS, "b": dataclasses.replace(LOGINS["b"], can_login=True)}
    assert drifted(active, "tenant_x", owner, both, retiring) == []
    assert drifted(active, "tenant_x", owner, both, CREDS) == ["login"]
    # Missing grants of a login role; a missing read-only login only when the spec asks for one.
    assert drifted(active, "tenant_x", owner, {**LOGINS, "b": dataclasses.replace(LOGINS["b"], grants_ok=False)},
                   CREDS) == ["login-grants"]
    no_ro = {**LOGINS, "r": dataclasses.replace(LOGINS["r"], exists=False, can_login=False)}
    assert drifted(active, "tenant_x", owner, no_ro, CREDS) == []
    read_only = TenantSpec.model_validate({"credentials": {"readOnlyLogin": True}})
    assert drifted(read_only, "tenant_x", owner, no_ro, CREDS) == ["login-role"]
    assert drifted(read_only, "tenant_x", owner, {**LOGINS, "r": dataclasses.replace(LOGINS["r"], can_login=True)},
                   CREDS) == []
    broken = Observed(
        role_exists=False,
        can_login=False,
        search_path=None,
        schema_exists=False,
        schema_owned=False,
        schema_privileges=False,
        operator_member=False,
    )
    assert drifted(active, "tenant_x", broken) == [
        "role",
        "schema",
        "schema-owner",
        "grants",
        "search-path",
    ]


def test_a_standing_membership_is_not_drift() -> None:
    """Earlier versions kept one in every tenant role; a reconcile revokes it, the sweep does not
    call it a repair (an upgrade would otherwise report every tenant as drifted)."""
    assert drifted(TenantSpec.model_validate({}), "tenant_x", dataclasses.replace(GOOD, operator_member=True)) == []


def test_targets_from_json_and_directory(tmp_path: Path) -> None:
    (tmp_path / "second").write_text("postgresql://b\n")
    (tmp_path / ".hidden").write_text("ignored")
    s = Settings(database_targets='{"default": "postgresql://a"}', database_targets_dir=tmp_path)
    assert s.targets == {"default": "postgresql://a", "second": "postgresql://b"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "JSON object"),
        ('{"Bad Name": "x"}', "not a valid target name"),
    ],
)
def test_bad_target_configuration_is_a_clear_error(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _ = Settings(database_targets=raw).targets


def test_pg_env_carries_credentials_in_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-the-outside")
    env = pg_env({"host": "db", "port": 5433, "user": "op", "password": "s3cret", "dbname": "app"})
    assert env["PGHOST"] == "db"
    assert env["PGPORT"] == "5433"
    assert env["PGPASSWORD"] == "s3cret"
    assert env["PGDATABASE"] == "app"
    assert "from-the-outside" not in env.values()


@given(st.integers(min_value=0, max_value=1000))
def test_backoff_grows_and_is_capped(retry: int) -> None:
    delay = backoff(retry)
    assert 0.8 <= delay <= 72.0
    assert delay <= min(60.0, 2.0 ** min(retry, 6)) * 1.2


def test_the_crd_default_status_is_not_a_report() -> None:
    assert not reported({"metadata": {}})
    assert not reported({"status": TENANT.initial_status})
    assert not reported({"status": {"effectiveLimits": {"connections": "5"}}})  # the quota service's, alone
    assert reported({"status": {"observedGeneration": 1, "phase": "Provisioning"}})


def test_a_tenant_stored_before_a_bound_is_still_deletable() -> None:
    from tenancy_operator.reconcilers.tenant_base import spec_for_deletion

    body = {"spec": {"database": "second", "deletionPolicy": "Delete", "archiveRetention": "1000000000d"}}
    spec = spec_for_deletion(body)
    assert (spec.database, str(getattr(spec.deletion_policy, "value", spec.deletion_policy))) == ("second", "Delete")
    guessed = spec_for_deletion({"spec": {"database": "x" * 100, "deletionPolicy": "Shred"}})
    assert guessed.database == ""
    assert str(getattr(guessed.deletion_policy, "value", guessed.deletion_policy)) == "Retain"


def test_templates_out_of_bounds_are_refused() -> None:
    from tenancy_operator.db.tenant_migrations import MAX_MIGRATIONS, InvalidTemplate, check_template

    check_template(migrations_from_data({"0001_init.sql": "SELECT 1", "0002_more.sql": "SELECT 2"}))
    with pytest.raises(InvalidTemplate, match="at most"):
        check_template(migrations_from_data({f"{i:05d}.sql": "SELECT 1" for i in range(MAX_MIGRATIONS + 1)}))
    with pytest.raises(InvalidTemplate, match="version"):
        check_template(migrations_from_data({"0001 drop everything;.sql": "SELECT 1"}))


def test_the_secret_carries_the_targets_tls_settings(tmp_path: Path) -> None:
    import urllib.parse

    from tenancy_operator.reconcilers.tenant_base import connection_keys

    ca = tmp_path / "root.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    info = {"host": "db.internal", "port": 5433, "dbname": "app", "sslmode": "verify-full", "sslrootcert": str(ca)}
    keys = connection_keys(info, None, "/etc/tenant-ca/ca.crt", user="tl_acme_a_0123abcd", password="p@ss/w:rd",
                           schema="tenant_acme")
    assert keys["sslmode"] == "verify-full" and keys["ca.crt"] == ca.read_text()
    assert keys["sslrootcert"] == "/etc/tenant-ca/ca.crt"  # where the application mounts the ca.crt key
    uri = urllib.parse.urlsplit(keys["uri"])
    assert (uri.hostname, uri.port, uri.username, urllib.parse.unquote(uri.password or "")) == \
        ("db.internal", 5433, "tl_acme_a_0123abcd", "p@ss/w:rd")
    assert dict(urllib.parse.parse_qsl(uri.query)) == {"sslmode": "verify-full", "sslrootcert": "/etc/tenant-ca/ca.crt"}
    jdbc = urllib.parse.urlsplit(keys["jdbcUrl"].removeprefix("jdbc:"))
    assert dict(urllib.parse.parse_qsl(jdbc.query)) == {
        "user": "tl_acme_a_0123abcd", "password": "p@ss/w:rd", "currentSchema": "tenant_acme",
        "sslmode": "verify-full", "sslrootcert": "/etc/tenant-ca/ca.crt"}
    plain = connection_keys({"host": "h", "dbname": "app"}, None, None, user="u", password="p", schema="s")
    assert set(keys) - set(plain) == {"sslrootcert", "ca.crt"} and plain["sslmode"] == "prefer"


def test_a_first_login_counts_as_set_only_for_this_tenant_with_its_secrets_password() -> None:
    """An earlier attempt of this Tenant's first provisioning set the password the Secret holds;
    anything else (another Tenant's row, no record, no login, a new or rotated password) sets it."""
    row = RegistryRow("id", "ns", "t", "tenant_t", "tenant_t", "provisioning", None, None, None, k8s_uid="uid-1",
                      login_slot="a", rotated_at=datetime(2026, 1, 1, tzinfo=UTC))
    login = LoginObserved(exists=True, can_login=True, marker=None, search_path=None, grants_ok=True)
    secret = {"metadata": {}, "data": {"password": base64.b64encode(b"pw").decode()}}
    assert first_login_set(row, "uid-1", login, SecretClaim("pw", secret))
    assert not first_login_set(row, "uid-2", login, SecretClaim("pw", secret))  # a Tenant of the same name before
    assert not first_login_set(dataclasses.replace(row, login_slot=None, rotated_at=None), "uid-1", login,
                               SecretClaim("pw", secret))  # cut off before the password was recorded
    assert not first_login_set(row, "uid-1", None, SecretClaim("pw", secret))
    assert not first_login_set(row, "uid-1", dataclasses.replace(login, exists=False), SecretClaim("pw", secret))
    assert not first_login_set(row, "uid-1", login, SecretClaim("pw", None))  # the Secret created just now
    assert not first_login_set(row, "uid-1", login, SecretClaim("new", secret))  # a rotation asked for meanwhile
