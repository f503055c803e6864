"""Durations in the API: strings such as `1h30m` or `30d`, their CRD schema and CEL rules, and parsing."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from tenancy_operator.api.common import JsonDict
from tenancy_operator.api.schema_extra import POSITIVE, cel, cel_string, check_positive, validations

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
DURATION_MAX_LENGTH = 32
"""Longest duration string accepted: `1d2h3m4s5ms` fits many times over; the bound keeps the CEL
rules on durations cheap and the numbers far from any overflow."""
_DURATION_PART_PATTERN = r"[0-9]+(\.[0-9]+)?(ms|s|m|h|d)"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_RE = re.compile(DURATION_PATTERN)
_MICROSECONDS = {
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
}


@lru_cache(maxsize=1024)  # a fleet's Quotas repeat a few durations; parsing each in Decimal is not free
def _duration_micros(value: str) -> Decimal:
    if not _DURATION_RE.fullmatch(value):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 30s, 5m, 1h30m, 30d")
    return sum(
        (Decimal(number) * _MICROSECONDS[unit] for number, unit in _DURATION_PART.findall(value)),
        Decimal(0),
    )


@lru_cache(maxsize=1024)  # every quota pass parses each tenant's windows; timedelta is immutable
def parse_duration(value: str) -> timedelta:
    """Parse `1h30m`, `30d`, `1.5s`, `250ms` into a timedelta (exact to the microsecond).

    Go's `time.ParseDuration` has no days; retention periods are naturally said in days, so `d`
    (24h) is added. Raises ValueError on anything the CRD pattern would reject, and on a duration
    longer than a timedelta holds (999999999 days).
    """
    micros = _duration_micros(value)
    try:
        return timedelta(microseconds=int(micros.to_integral_value()))
    except OverflowError:
        raise ValueError(f"duration {value!r} is too long") from None


def duration_millis_cel(expr: str = "self") -> str:
    """CEL for the duration string `expr` in milliseconds, as a double (what `parse_duration` reads:
    the sum of its `<number><unit>` parts). Kubernetes' CEL `duration()` has no `d` unit."""
    unit = (
        "(p.endsWith('ms') ? 1.0 : p.endsWith('s') ? 1000.0 : p.endsWith('m') ? 60000.0 : "
        "p.endsWith('h') ? 3600000.0 : 86400000.0)"
    )
    number = cel_string(r"^[0-9]+(\.[0-9]+)?")
    return f"{expr}.findAll({cel_string(_DURATION_PART_PATTERN)}).map(p, double(p.find({number})) * {unit}).sum()"


def duration_at_most_rule(maximum: str, expr: str = "self", what: str = "duration") -> JsonDict:
    """CEL rule: the duration string `expr` is at most `maximum`."""
    millis = float(_duration_micros(maximum) / 1000)
    return cel(f"{duration_millis_cel(expr)} <= {millis!r}", f"{what} must be at most {maximum}")


def check_duration_at_most(value: str, maximum: str) -> str:
    """Return `value` if it is a duration of at most `maximum`, else raise ValueError."""
    if _duration_micros(value) > _duration_micros(maximum):
        raise ValueError(f"duration {value!r} is longer than the maximum {maximum}")
    return value


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


def _at_most(maximum: str) -> AfterValidator:
    return AfterValidator(lambda value: check_duration_at_most(value, maximum))


def duration_field(maximum: str, *rules: JsonDict, positive: bool = False, what: str = "duration") -> Any:
    """The Field of a duration string in the CRD: its syntax, greater than zero if ``positive``, at
    most ``maximum``, and further CEL ``rules``."""
    bounds = (POSITIVE,) if positive else ()
    return Field(pattern=DURATION_PATTERN, max_length=DURATION_MAX_LENGTH,
                 json_schema_extra=validations(*bounds, duration_at_most_rule(maximum, what=what), *rules))


ARCHIVE_RETENTION_MAX = "3650d"
"""Longest archive retention (about ten years): `now() + interval` stays far inside PostgreSQL's
timestamps (up to the year 294276) and Python's datetime (up to 9999)."""

STATEMENT_TIMEOUT_MAX = "2147483647ms"
"""PostgreSQL's statement_timeout is an int4 of milliseconds (about 24.8 days)."""

Duration = Annotated[
    str,
    duration_field(ARCHIVE_RETENTION_MAX),
    AfterValidator(_check_duration),
    _at_most(ARCHIVE_RETENTION_MAX),
]
"""A duration string: one or more `<number><unit>` with units ms, s, m, h, d (e.g. `1h30m`), at
most ARCHIVE_RETENTION_MAX."""

PositiveDuration = Annotated[
    str,
    duration_field(STATEMENT_TIMEOUT_MAX, positive=True),
    AfterValidator(_check_duration),
    AfterValidator(check_positive),
    _at_most(STATEMENT_TIMEOUT_MAX),
]
"""A Duration greater than zero and at most STATEMENT_TIMEOUT_MAX (the timeouts PostgreSQL takes)."""
