"""Sticky bucketing, bit for bit what flagd's `fractional` computes.

The official OpenFeature flagd provider (openfeature-flagd-core 2.0) buckets a user like this:
the bucketing value is the canonical CBOR encoding of `[flagKey, targetingKey]`; its hash is
MurmurHash3 x86 32-bit, seed 0, unsigned; `bucket = (hash * totalWeight) >> 32`; the first
variant whose cumulative weight exceeds `bucket` wins. We compute exactly that, so an application
reading the exported flagd definition through any flagd provider agrees with our evaluation
(tests/unit/test_flags_flagd.py checks it against the real provider).

The CBOR encoding of an array of two text strings is tiny, so it is written out here instead of
calling a CBOR library on every evaluation; a property test checks it against cbor2.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import mmh3

MAX_TOTAL_WEIGHT = 2_147_483_647
"""flagd refuses a fractional whose weights add up to more than MaxInt32."""


def _cbor_text(value: str) -> bytes:
    data = value.encode("utf-8")
    n = len(data)
    if n < 24:
        head = bytes((0x60 | n,))
    elif n < 0x100:
        head = bytes((0x78, n))
    elif n < 0x10000:
        head = b"\x79" + struct.pack(">H", n)
    elif n < 0x100000000:
        head = b"\x7a" + struct.pack(">I", n)
    else:  # pragma: no cover - a 4 GiB targeting key
        head = b"\x7b" + struct.pack(">Q", n)
    return head + data


def bucketing_bytes(flag_key: str, targeting_key: str) -> bytes:
    """Canonical CBOR of `[flag_key, targeting_key]` (an array of two text strings)."""
    return b"\x82" + _cbor_text(flag_key) + _cbor_text(targeting_key)


def bucket_hash(flag_key: str, targeting_key: str) -> int:
    """The unsigned 32-bit hash flagd uses to place a user; raises UnicodeEncodeError for lone
    surrogates, which flagd cannot encode either."""
    return int(mmh3.hash(bucketing_bytes(flag_key, targeting_key), 0, signed=False))


def pick(fractions: Sequence[tuple[str, int]], hash_value: int) -> str | None:
    """The variant of `fractions` ((variant, weight) in declared order) for a 32-bit hash; None
    when the weights are unusable (sum 0 or above MaxInt32), as flagd returns no variant then."""
    total = sum(max(0, w) for _, w in fractions)
    if total <= 0 or total > MAX_TOTAL_WEIGHT:
        return None
    bucket = (hash_value * total) >> 32
    end = 0
    for variant, weight in fractions:
        end += max(0, weight)
        if bucket < end:
            return variant
    return None  # pragma: no cover - bucket < total always


def fractional(flag_key: str, targeting_key: str | None, fractions: Sequence[tuple[str, int]]) -> str | None:
    """flagd's `fractional` shorthand (bucketing by `[flagKey, targetingKey]`): None without a
    usable targeting key, as the provider does."""
    if not targeting_key:
        return None
    try:
        h = bucket_hash(flag_key, targeting_key)
    except UnicodeEncodeError:
        return None
    return pick(fractions, h)
