"""The chart's default image is the one the project builds: values.yaml's image.repository with the
chart's appVersion (image.tag is empty), which is the package's version, and which
hack/build-image.sh tags (tests/integration/test_image.py builds and runs it)."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tenancy-operator"


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]


def test_the_build_tags_the_chart_default_image() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["digest"] == ""
    default = f"{values['repository']}:{values['tag'] or chart['appVersion']}"  # the image helper's rule
    built = subprocess.run(
        [str(ROOT / "hack" / "build-image.sh"), "--print-name"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert built == default
