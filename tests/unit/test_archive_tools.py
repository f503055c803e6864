"""Which pg_dump / pg_restore serves a server: its own major's, else the nearest newer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tenancy_operator import archive
from tenancy_operator.archive import ArchiveUnavailable, choose_tool, find_tool, tool_major


def test_the_servers_own_major_wins_over_an_earlier_newer_one() -> None:
    found: list[tuple[str, int | None]] = [("/a/pg_restore", 18), ("/b/pg_restore", 15), ("/c/pg_restore", 17)]
    assert choose_tool("pg_restore", found, 15) == "/b/pg_restore"
    assert choose_tool("pg_restore", found, 17) == "/c/pg_restore"


def test_without_the_servers_major_the_nearest_newer_serves() -> None:
    found: list[tuple[str, int | None]] = [("/a/pg_dump", 18), ("/b/pg_dump", 16), ("/c/pg_dump", None)]
    assert choose_tool("pg_dump", found, 15) == "/b/pg_dump"


def test_a_tool_of_unknown_major_serves_only_when_nothing_known_does() -> None:
    assert choose_tool("pg_dump", [("/x/pg_dump", None), ("/a/pg_dump", 14)], 15) == "/x/pg_dump"


def test_only_older_tools_are_refused_with_what_was_found() -> None:
    with pytest.raises(ArchiveUnavailable, match=r"no pg_dump of PostgreSQL 18 or newer \(found: 15, 17\)"):
        choose_tool("pg_dump", [("/a/pg_dump", 17), ("/b/pg_dump", 15)], 18)


def test_no_tool_at_all_says_the_image_lacks_them() -> None:
    with pytest.raises(ArchiveUnavailable, match="pg_restore not found"):
        choose_tool("pg_restore", [], 15)


def fake_tool(directory: Path, name: str, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {version}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_search_reads_each_tools_version_and_prefers_the_servers_major(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    newest = fake_tool(tmp_path / "18", "pg_restore", "18.6")
    own = fake_tool(tmp_path / "15", "pg_restore", "15.18 (Debian 15.18-0+deb12u1)")
    monkeypatch.setenv("TENANCY_PG_BIN_DIR", os.pathsep.join([str(newest.parent), str(own.parent)]))
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(archive, "DEBIAN_PG_DIRS", tmp_path / "no-debian")
    assert tool_major(str(own)) == 15
    assert find_tool("pg_restore", 15) == str(own)
    assert find_tool("pg_restore", 18) == str(newest)
