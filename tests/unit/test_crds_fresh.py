"""The committed crds/ are what the models generate, and they follow the API server's rules for
structural schemas (so a schema mistake fails here, not at install time)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenancy_operator.api import QUOTA, RESOURCES
from tenancy_operator.api.common import ApiModel
from tenancy_operator.api.crdgen import (
    HEADER,
    SchemaError,
    crd_schema,
    field_type,
    generate_crds,
    model_schema,
    write_crds,
)

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
FORBIDDEN_KEYS = {
    "$ref", "$defs", "definitions", "uniqueItems", "title", "const", "anyOf", "oneOf", "allOf",
    "patternProperties", "propertyNames", "examples",
}  # fmt: skip
UNTYPED_OK = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


@pytest.mark.parametrize("command", ["crds", "api-docs"])
def test_generation_refuses_to_run_without_docstrings(tmp_path: Path, command: str) -> None:
    """The image runs the operator with -OO, which drops the docstrings the descriptions come from:
    generating there would write CRDs without them."""
    output = tmp_path / "out"
    done = subprocess.run([sys.executable, "-OO", "-m", "tenancy_operator", command, "--output", str(output)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "run this without it" in done.stderr
    assert not output.exists()


def test_committed_crds_are_fresh(tmp_path: Path) -> None:
    written = write_crds(tmp_path)
    assert [p.name for p in written] == [
        "tenancy.dev_tenants.yaml",
        "tenancy.dev_quotas.yaml",
        "tenancy.dev_featureflags.yaml",
        "tenancy.dev_schemarollouts.yaml",
        "tenancy.dev_tenantarchives.yaml",
    ]
    for fresh in written:
        committed = CRD_DIR / fresh.name
        assert committed.exists(), f"{committed} is missing; regenerate with `tenancy-operator crds`"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale: the models in operator/tenancy_operator/api changed; "
            "regenerate with `tenancy-operator crds` and commit the result"
        )


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = [p.read_bytes() for p in write_crds(tmp_path / "a")]
    second = [p.read_bytes() for p in write_crds(tmp_path / "b")]
    assert first == second
    assert all(text.startswith(HEADER.encode()) for text in first)


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with a readable path."""
    yield path or "<root>", node
    for name, prop in node.get("properties", {}).items():
        yield from schema_nodes(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}.*")


def all_schemas() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for crd in generate_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in schema_nodes(schema):
            yield crd["spec"]["names"]["kind"], path, node


def test_schemas_are_structural() -> None:
    problems = []
    for kind, path, node in all_schemas():
        where = f"{kind} {path}"
        if forbidden := FORBIDDEN_KEYS & node.keys():
            problems.append(f"{where}: forbidden keys {sorted(forbidden)}")
        if node.get("type") == "null" or isinstance(node.get("type"), list):
            problems.append(f"{where}: type must be one name, not null or a list")
        if "type" not in node and not any(node.get(flag) for flag in UNTYPED_OK):
            problems.append(f"{where}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: both properties and additionalProperties")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{where}: boolean additionalProperties")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and not isinstance(node[key], bool):
                problems.append(f"{where}: numeric {key}")
        if node.get("type") == "array" and "x-kubernetes-list-type" not in node:
            problems.append(f"{where}: list without x-kubernetes-list-type (server-side apply)")
        if node.get("x-kubernetes-list-type") == "map":
            keys = node.get("x-kubernetes-list-map-keys", [])
            item = node["items"]
            if not keys or any(
                k not in item.get("required", []) and "default" not in item["properties"][k] for k in keys
            ):
                problems.append(f"{where}: list-map keys must be required fields of the items")
        if "default" in node and path.startswith(".status") and path != ".status":
            problems.append(f"{where}: default in status (only status itself has one, the initial status)")
        if node.get("default", ...) is None:
            problems.append(f"{where}: null default")
    assert problems == []


def test_crd_envelope() -> None:
    for info, crd in zip(RESOURCES, generate_crds(), strict=True):
        spec = crd["spec"]
        assert crd["metadata"]["name"] == info.crd_name
        assert spec["group"] == "tenancy.dev"
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["shortNames"] == list(info.short_names)
        assert spec["names"]["categories"] == ["tenancy"]
        [version] = spec["versions"]
        assert version["name"] == "v1alpha1"
        assert version["served"]
        assert version["storage"]
        assert version["subresources"] == {"status": {}}
        schema = version["schema"]["openAPIV3Schema"]
        assert schema["required"] == ["spec"]
        assert schema["properties"]["metadata"] == {"type": "object"}
        assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
        columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
        assert columns["Age"] == ".metadata.creationTimestamp"
        assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'


def test_printer_columns_point_at_fields_that_exist() -> None:
    for crd in generate_crds():
        [version] = crd["spec"]["versions"]
        schema = version["schema"]["openAPIV3Schema"]
        for column in version["additionalPrinterColumns"]:
            node = schema
            for part in column["jsonPath"].split("[")[0].strip(".").split("."):
                if part == "metadata":
                    break
                assert "properties" in node or "additionalProperties" in node, column
                node = node["properties"][part] if "properties" in node else node["additionalProperties"]


def test_a_column_without_a_type_has_that_of_its_field() -> None:
    schema = crd_schema(QUOTA)
    assert field_type(schema, ".status.load.share") == "number"
    assert field_type(schema, ".status.used.storage") == "string"  # a map's values
    with pytest.raises(SchemaError):
        field_type(schema, ".status.nothing")


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    for crd in generate_crds():
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_optional_fields_are_nullable_and_defaults_stay_in_spec() -> None:
    tenant = generate_crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    spec = tenant["spec"]["properties"]
    assert spec["displayName"]["nullable"] is True
    assert spec["database"]["default"] == "default"
    assert spec["tier"]["default"] == "free"
    assert "default" not in tenant["status"]["properties"]["effectiveLimits"]
    assert tenant["status"]["default"] == {"observedGeneration": 0, "phase": "Provisioning"}
    assert tenant["status"]["properties"]["schema"]["type"] == "string"


class Union(ApiModel):
    """Unions of models cannot be expressed structurally."""

    value: int | str


def test_generator_refuses_unions() -> None:
    with pytest.raises(SchemaError, match="unions are not structural"):
        model_schema(Union)


def test_committed_files_are_valid_yaml_with_header() -> None:
    for path in sorted(CRD_DIR.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith(HEADER)
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"
