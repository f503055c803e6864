"""The committed docs/api.md is what the models generate (like crds/, test_crds_fresh.py), and it
covers every field of every kind's spec and status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tenancy_operator.api import RESOURCES
from tenancy_operator.api.apidocs import HEADER, render_api_docs, write_api_docs
from tenancy_operator.api.crdgen import crd_schema

API_DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_committed_api_docs_are_fresh(tmp_path: Path) -> None:
    fresh = write_api_docs(tmp_path / "api.md")
    assert API_DOCS.exists(), f"{API_DOCS} is missing; regenerate with `tenancy-operator api-docs`"
    assert API_DOCS.read_bytes() == fresh.read_bytes(), (
        f"{API_DOCS} is stale: the models in operator/tenancy_operator/api changed; "
        "regenerate with `make crds` (or `tenancy-operator api-docs`) and commit the result"
    )


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = write_api_docs(tmp_path / "a" / "api.md").read_bytes()
    second = write_api_docs(tmp_path / "b" / "api.md").read_bytes()
    assert first == second
    assert first.startswith(HEADER.encode())


def named_fields(node: dict[str, Any], path: str) -> Iterator[str]:
    """Paths of every named field below ``node``, through list items and map values."""
    for name, child in node.get("properties", {}).items():
        yield f"{path}.{name}"
        yield from named_fields(child, f"{path}.{name}")
    if node.get("type") == "array":
        yield from named_fields(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from named_fields(node["additionalProperties"], f"{path}.<key>")


def test_every_field_has_a_row_with_its_description() -> None:
    text = render_api_docs()
    for info in RESOURCES:
        section = text.split(f"\n## {info.kind}\n", 1)[1].split("\n## ", 1)[0]
        schema = crd_schema(info)
        for part in ("spec", "status"):
            paths = list(named_fields(schema["properties"][part], part))
            assert paths
            for path in paths:
                rows = [line for line in section.splitlines() if line.startswith(f"| `{path}` |")]
                assert len(rows) == 1, f"{info.kind}: {path} has {len(rows)} rows"
    tenant = text.split("\n## Tenant\n", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in tenant.splitlines() if line.startswith("| `spec.deletionPolicy` |")]
    assert row.split(" | ")[1:4] == ["string", "`Retain`", "one of `Retain`, `Archive`, `Delete`"]
    assert "What happens to the schema when the Tenant is deleted" in row
