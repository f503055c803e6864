"""Quantities in the API: Kubernetes-style strings such as `10Gi` or `500`, their CRD schema and
CEL rules, parsing and formatting."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, Field

from tenancy_operator.api.schema_extra import POSITIVE, cel, cel_string, check_positive, validations

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
_QUANTITY_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_QUANTITY_MULTIPLIERS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_quantity(value: str | int) -> int:
    """Parse a Kubernetes-style quantity (`10Gi`, `1.5G`, `500`) into whole units (bytes).

    Fractions round up, as Kubernetes' `Quantity.Value()` does, so a limit is never silently
    lowered. Only non-negative quantities with the suffixes above are accepted (no milli, no
    exponents): these are byte sizes and counts.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid quantity {value}: must not be negative")
        return value
    match = _QUANTITY_RE.fullmatch(str(value))
    if not match:
        raise ValueError(f"invalid quantity {value!r}: expected e.g. 500, 1.5Gi, 10G")
    number, suffix = match.groups()
    return math.ceil(Decimal(number) * _QUANTITY_MULTIPLIERS[suffix])


def format_quantity(value: int) -> str:
    """Shortest exact binary-suffixed form of a byte count (`10737418240` -> `10Gi`), for status."""
    if value < 0:
        raise ValueError("quantities are never negative")
    for suffix in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _QUANTITY_MULTIPLIERS[suffix]
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


QUANTITY_MAX = "1024Pi"
"""Largest quantity (2^60, one exbibyte): far beyond any schema, well inside PostgreSQL's bigint."""
QUANTITY_MAX_VALUE = 2**60


def _check_quantity(value: str) -> str:
    if parse_quantity(value) > QUANTITY_MAX_VALUE:
        raise ValueError(f"quantity {value!r} is larger than the maximum {QUANTITY_MAX}")
    return value


def quantity_at_most_cel(expr: str = "self") -> str:
    """CEL: the quantity string `expr` is at most QUANTITY_MAX (exact: Kubernetes' quantity library).
    A string that is no quantity passes here; the pattern reports it."""
    return (
        f"!{expr}.matches({cel_string(QUANTITY_PATTERN)}) || "
        f"quantity({expr}).compareTo(quantity('{QUANTITY_MAX}')) <= 0"
    )


_QUANTITY_AT_MOST = cel(quantity_at_most_cel(), f"must be at most {QUANTITY_MAX}")

Quantity = Annotated[
    str,
    Field(pattern=QUANTITY_PATTERN, max_length=64, json_schema_extra=validations(_QUANTITY_AT_MOST)),
    AfterValidator(_check_quantity),
]
"""A non-negative quantity string (`10Gi`, `500M`, `1.5Gi`, `1000`), at most QUANTITY_MAX."""

PositiveQuantity = Annotated[
    str,
    Field(pattern=QUANTITY_PATTERN, max_length=64, json_schema_extra=validations(POSITIVE, _QUANTITY_AT_MOST)),
    AfterValidator(_check_quantity),
    AfterValidator(check_positive),
]
"""A Quantity greater than zero."""
