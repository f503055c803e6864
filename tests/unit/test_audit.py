"""The isolation audit's pure parts: findings from catalog rows, the statements that revoke them."""

from __future__ import annotations

from typing import Any

import pytest

from tenancy_operator.cli import main
from tenancy_operator.conditions import Cond
from tenancy_operator.db.audit import Finding, Kind, Report, acting_as, clean, findings_from_rows, revoke_statement
from tenancy_operator.sweep import _summary, condition_settled

PG15, PG17 = 150018, 170010


def sql_text(f: Finding, version: int = PG15) -> str | None:
    stmt = revoke_statement(f, server_version=version)
    return None if stmt is None else stmt.as_string(None)


def test_rows_become_typed_findings_merged_and_ordered() -> None:
    rows: dict[str, list[dict[str, Any]]] = {
        "attributes": [{"role": "tenant_a", "rolsuper": True, "rolcreaterole": False, "rolcreatedb": True,
                        "rolreplication": False, "rolbypassrls": False},
                       {"role": "tenant_b", "rolsuper": False, "rolcreaterole": False, "rolcreatedb": False,
                        "rolreplication": False, "rolbypassrls": False}],
        "membership": [{"role": "tenant_a", "name": "pg_read_all_data", "grantor": "postgres"}],
        "relation": [{"role": "tenant_a", "schema": "tenant_b", "name": "private", "subkind": "r",
                      "owner": "tenant_b", "privileges": ["SELECT"]},
                     {"role": "tenant_a", "schema": "tenant_b", "name": "private", "subkind": "r",
                      "owner": "tenant_b", "privileges": ["UPDATE (w)"]}],
        "routine": [{"role": "tenant_a", "schema": "tenant_b", "name": "f", "subkind": "f", "owner": "tenant_b",
                     "privileges": ["EXECUTE"], "arg_schemas": ["pg_catalog"], "arg_types": ["int4"]}],
        "ownership": [{"role": "tenant_a", "subkind": "r", "schema": "public", "name": "planted"},
                      {"role": "tenant_a", "subkind": "pf", "schema": "public", "name": "g"}],
    }
    findings = findings_from_rows(rows)
    assert [f.describe() for f in findings] == [
        "member of role pg_read_all_data",
        "role attribute CREATEDB",
        "role attribute SUPERUSER",
        "SELECT, UPDATE (w) on table tenant_b.private",
        "EXECUTE on function tenant_b.f(int4)",
        "owns function public.g",
        "owns table public.planted",
    ]
    assert {f.role for f in findings} == {"tenant_a"}
    assert [f.kind for f in findings][:3] == [Kind.MEMBERSHIP, Kind.ATTRIBUTE, Kind.ATTRIBUTE]


@pytest.mark.parametrize(("finding", "version", "expected"), [
    (Finding("tenant_a", Kind.MEMBERSHIP, "role", "pg_read_all_data", grantor="postgres"), PG15,
     'REVOKE "pg_read_all_data" FROM "tenant_a"'),
    (Finding("tenant_a", Kind.MEMBERSHIP, "role", "pg_read_all_data", grantor="postgres"), PG17,
     'REVOKE "pg_read_all_data" FROM "tenant_a" GRANTED BY "postgres"'),
    (Finding("tenant_a", Kind.ATTRIBUTE, "attribute", "BYPASSRLS"), PG15, 'ALTER ROLE "tenant_a" NOBYPASSRLS'),
    (Finding("tenant_a", Kind.SCHEMA, "schema", "tenancy", privileges=("USAGE",), owner="tenancy_operator"), PG15,
     'REVOKE ALL ON SCHEMA "tenancy" FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.RELATION, "table", 'we"ird', "tenant_b", ("SELECT",), owner="tenant_b"), PG15,
     'REVOKE ALL ON TABLE "tenant_b"."we""ird" FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.RELATION, "sequence", "s", "tenant_b", ("USAGE",)), PG15,
     'REVOKE ALL ON SEQUENCE "tenant_b"."s" FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.ROUTINE, "function", "f", "tenant_b", ("EXECUTE",),
             (("pg_catalog", "int4"), ("pg_catalog", "_text"))), PG15,
     'REVOKE ALL ON ROUTINE "tenant_b"."f"("pg_catalog"."int4", "pg_catalog"."_text") FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.ROUTINE, "procedure", "p", "tenant_b", ("EXECUTE",)), PG15,
     'REVOKE ALL ON ROUTINE "tenant_b"."p"() FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.DATABASE, "database", "tenancy", privileges=("CREATE", "bogus")), PG15,
     'REVOKE CREATE ON DATABASE "tenancy" FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.DATABASE, "tablespace", "fast", privileges=("CREATE",)), PG15,
     'REVOKE ALL ON TABLESPACE "fast" FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.PARAMETER, "parameter", "session_replication_role", privileges=("SET",)), PG15,
     'REVOKE ALL ON PARAMETER "session_replication_role" FROM "tenant_a" CASCADE'),
    (Finding("tenant_a", Kind.OWNERSHIP, "table", "planted", "public"), PG15, None),
])
def test_revoke_statements(finding: Finding, version: int, expected: str | None) -> None:
    assert sql_text(finding, version) == expected


def test_unknown_attribute_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown role attribute"):
        revoke_statement(Finding("tenant_a", Kind.ATTRIBUTE, "attribute", "SUPERUSER; DROP"), server_version=PG15)


def test_revocation_acts_only_as_a_tenant_owner() -> None:
    roles = {"tenant_a", "tenant_b"}
    other_tenants_table = Finding("tenant_a", Kind.RELATION, "table", "t", "tenant_b", ("SELECT",), owner="tenant_b")
    control_table = Finding("tenant_a", Kind.RELATION, "table", "t", "tenancy", ("SELECT",), owner="tenancy_operator")
    admins_schema = Finding("tenant_a", Kind.SCHEMA, "schema", "public", owner="pg_database_owner")
    membership = Finding("tenant_a", Kind.MEMBERSHIP, "role", "tenant_b", owner="tenant_b")
    assert acting_as(other_tenants_table, roles) == "tenant_b"
    assert acting_as(control_table, roles) is None
    assert acting_as(admins_schema, roles) is None
    assert acting_as(membership, roles) is None


def test_names_are_made_printable_and_short() -> None:
    f = Finding("tenant_a", Kind.RELATION, "table", "evil\nname\x1b[31m" + "x" * 200, "tenant_b", ("SELECT",))
    text = f.describe()
    assert "\n" not in text and "\x1b" not in text
    assert len(text) < 120
    assert clean("ok") == "ok"


def test_summary_says_what_was_revoked_and_what_was_not() -> None:
    a = Finding("tenant_a", Kind.MEMBERSHIP, "role", "pg_read_all_data")
    b = Finding("tenant_a", Kind.DATABASE, "database", "tenancy", privileges=("CREATE",))
    report = Report({}, [a, b], fixed=True, revoked={a.key}, not_revoked={b.key: "InsufficientPrivilege (42501)"})
    assert report.remaining() == [b]
    assert _summary("tenant_a", report, [a, b]) == (
        "role tenant_a held 2 privilege(s) beyond its schema: member of role pg_read_all_data: revoked;"
        " CREATE on database tenancy: not revoked: InsufficientPrivilege (42501)")
    long = [Finding("tenant_a", Kind.RELATION, "table", f"t{i:03}", "tenant_b", ("SELECT",)) for i in range(100)]
    assert len(_summary("tenant_a", Report({}, long), long)) <= 900


def test_cli_needs_a_database(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("TENANCY_DATABASE_TARGETS", "TENANCY_DATABASE_TARGETS_DIR", "TENANCY_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exited:  # a usage error, as argparse reports one
        main(["audit"])
    assert exited.value.code == 2
    assert "no database" in capsys.readouterr().err
    monkeypatch.setenv("TENANCY_DATABASE_TARGETS", '{"default": "postgresql://x@127.0.0.1:1/x"}')
    with pytest.raises(SystemExit) as exited:
        main(["audit", "--target", "other"])
    assert exited.value.code == 2
    assert "no database target 'other'" in capsys.readouterr().err


def test_the_breach_condition_is_written_only_where_the_listed_status_differs() -> None:
    """The sweep reads a Tenant afresh (and writes) only when its listed status does not already
    say what the audit found: an audit that finds nothing leaves unbreached Tenants alone."""
    clear = Cond("IsolationBreach", "False", "NoneFound", "nothing")
    held = Cond("IsolationBreach", "True", "PrivilegesHeld", "role x held y")
    assert condition_settled([], clear)
    assert condition_settled([{"type": "Ready", "status": "True"}], clear)
    assert not condition_settled([], held)
    shown = {"type": "IsolationBreach", "status": "True", "reason": "PrivilegesHeld", "message": "role x held y"}
    assert condition_settled([shown], held)
    assert not condition_settled([shown], clear)  # a breach shown must be cleared
    assert not condition_settled([{**shown, "message": "role x held z"}], held)
