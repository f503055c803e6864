"""The database options of the administrator commands resolve as the operator's own targets do."""

from __future__ import annotations

import argparse
import json

import pytest

from tenancy_operator.cli_database import add_database_arguments, database_dsns, one_database


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_database_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TENANCY_DATABASE_TARGETS", "TENANCY_DATABASE_TARGETS_DIR", "TENANCY_DATABASE_URL",
                 "TENANCY_CONTROL_SCHEMA"):
        monkeypatch.delenv(name, raising=False)


def test_dsn_wins() -> None:
    assert database_dsns(parse("--dsn", "postgresql://x")) == {"default": "postgresql://x"}


def test_configured_targets_all_or_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_DATABASE_TARGETS", json.dumps({"default": "postgresql://a", "eu": "postgresql://b"}))
    assert database_dsns(parse()) == {"default": "postgresql://a", "eu": "postgresql://b"}
    assert one_database(parse()) == "postgresql://a"
    assert one_database(parse("--target", "eu")) == "postgresql://b"
    with pytest.raises(ValueError, match="no database target 'us'"):
        database_dsns(parse("--target", "us"))


def test_targets_dir_as_the_chart_mounts_it(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "eu").write_text("postgresql://eu\n")
    (folder / "us").write_text("postgresql://us\n")
    monkeypatch.setenv("TENANCY_DATABASE_TARGETS_DIR", str(folder))
    with pytest.raises(ValueError, match="pass --target"):
        one_database(parse())
    assert one_database(parse("--target", "us")) == "postgresql://us"


def test_url_then_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no database"):
        database_dsns(parse())
    monkeypatch.setenv("TENANCY_DATABASE_URL", "postgresql://u")
    assert one_database(parse()) == "postgresql://u"


def test_control_schema_option_and_its_old_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse().control_schema == "tenancy"
    assert parse("--schema", "ops").control_schema == "ops"
    assert parse("--control-schema", "ops2").control_schema == "ops2"


def test_a_usage_error_exits_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tenancy-operator jobs")
    add_database_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        one_database(parser.parse_args([]), parser)
    assert exited.value.code == 2
    assert "no database" in capsys.readouterr().err
