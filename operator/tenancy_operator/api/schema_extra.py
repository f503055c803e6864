"""What the API server enforces beyond plain JSON schema: CEL rules and list types.

Each is attached to a model or field with pydantic's `json_schema_extra`, so it lives next to the
field it is about; `crdgen` carries it into the CRD.
"""

from __future__ import annotations

import re

from tenancy_operator.api.common import JsonDict


def cel(
    rule: str,
    message: str | None = None,
    *,
    message_expression: str | None = None,
    reason: str | None = None,
    field_path: str | None = None,
) -> JsonDict:
    """One `x-kubernetes-validations` entry (a CEL rule the API server evaluates)."""
    entry: JsonDict = {"rule": rule}
    if message is not None:
        entry["message"] = message
    if message_expression is not None:
        entry["messageExpression"] = message_expression
    if reason is not None:
        entry["reason"] = reason
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def cel_string(value: str) -> str:
    """`value` as a CEL string literal (regex patterns contain backslashes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def validations(*rules: JsonDict) -> JsonDict:
    """`json_schema_extra` carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}


def list_set() -> JsonDict:
    """`json_schema_extra` for a list of unique scalars that server-side apply merges as a set."""
    return {"x-kubernetes-list-type": "set"}


def list_atomic() -> JsonDict:
    """`json_schema_extra` for a list whose order means something: server-side apply replaces it whole."""
    return {"x-kubernetes-list-type": "atomic"}


def list_map(*keys: str) -> JsonDict:
    """`json_schema_extra` for a list of objects keyed by `keys`; SSA merges entries by key and
    the API server rejects two entries with the same key."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


def immutable(what: str) -> JsonDict:
    """`json_schema_extra` for a field that may not change once set (transition rule)."""
    return validations(cel("self == oldSelf", f"{what} is immutable"))


POSITIVE = cel("self.matches('[1-9]')", "must be greater than zero")
"""CEL rule: the quantity or duration string is greater than zero (what `check_positive` tests)."""


def check_positive(value: str) -> str:
    """Return the quantity or duration string `value` if it is greater than zero, else raise ValueError."""
    # A quantity or duration is zero exactly when its number has no non-zero digit (the unit
    # suffixes have no digits); the same test is the CEL rule in the CRD.
    if not re.search(r"[1-9]", value):
        raise ValueError(f"{value!r} must be greater than zero")
    return value
