"""One version: pyproject.toml's `version`. Everything that states a version follows it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import tenancy_operator

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tenancy-operator"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_package_reports_the_pyproject_version() -> None:
    # importlib.metadata: the installed distribution's; `make venv` reinstalls when pyproject changes.
    assert tenancy_operator.__version__ == VERSION


def test_the_chart_and_its_image_follow_the_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION
    assert chart["version"] == VERSION
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == "", "image.tag must default to the chart's appVersion"


def test_the_changelog_has_an_entry_for_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\]", text, re.MULTILINE)
    assert versions, "CHANGELOG.md has no version entries"
    assert versions[0] == VERSION, f"CHANGELOG.md's newest entry is {versions[0]}, pyproject says {VERSION}"


def test_documented_image_tags_are_the_version() -> None:
    for doc in (ROOT / "docs" / "operations.md", ROOT / "README.md", CHART / "README.md"):
        for tag in re.findall(r"image\.tag=(\d[\w.+-]*)", doc.read_text()):
            assert tag == VERSION, f"{doc.relative_to(ROOT)} installs image tag {tag}, the version is {VERSION}"
