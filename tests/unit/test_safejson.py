"""k8s/safejson.py: JSON nested deeper than Python's json can decode still decodes, with the too
deep part replaced, and Kopf decodes with it once installed."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenancy_operator.k8s import safejson


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def depth_of(value: Any) -> int:
    """How many lists and objects enclose the deepest point (`[]` is 1, `1` is 0)."""
    depth, todo = 0, [(value, 0)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, level + 1)
            todo += [(v, level + 1) for v in (node.values() if isinstance(node, dict) else node)]
    return depth


def deep_event(depth: int) -> str:
    """A watch event line as the API server sends it, with one value nested `depth` deep."""
    inner = "[" * depth + '"x"' + "]" * depth
    return (
        '{"type":"ADDED","object":{"apiVersion":"tenancy.dev/v1alpha1","kind":"FeatureFlag",'
        '"metadata":{"name":"deep","namespace":"ns","uid":"u1"},'
        '"spec":{"variants":{"on":{"value":' + inner + '},"off":{"value":"[{\\"not\\": \\"a bracket\\"}"}}}}}'
    )


def test_plain_json_decodes_as_json_loads() -> None:
    text = json.dumps({"a": [1, 2, {"b": "c]}{["}], "d": None, "e": "\\\"["})
    assert safejson.loads(text) == json.loads(text)
    assert safejson.loads(text.encode()) == json.loads(text)


def test_json_nested_thousands_deep_decodes_with_the_deep_part_replaced() -> None:
    line = deep_event(5000)
    with pytest.raises(RecursionError):
        json.loads(line)
    event = safejson.loads(line.encode())
    assert event["type"] == "ADDED"
    assert event["object"]["metadata"] == {"name": "deep", "namespace": "ns", "uid": "u1"}
    spec = event["object"]["spec"]
    # Strings that look like brackets are not brackets.
    assert spec["variants"]["off"]["value"] == '[{"not": "a bracket"}'
    value = spec["variants"]["on"]["value"]
    assert depth_of(event) == safejson.MAX_DEPTH
    assert depth_of(value) == safejson.MAX_DEPTH - 5  # five levels of envelope above it


@given(st.recursive(st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)))
def test_decodes_what_json_loads_decodes(value: Any) -> None:
    # orjson decodes first: it must give what json.loads gives, for every value the API server can
    # send (its integers fit in 64 bits), as text and as bytes.
    text = json.dumps(value)
    assert safejson.loads(text) == json.loads(text)
    assert safejson.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", ['"\\ud800"', '{"v": NaN}', '[1e400]', '{"a": 1, "a": 2}'])
def test_what_orjson_refuses_decodes_as_json_loads(text: str) -> None:
    decoded, expected = safejson.loads(text), json.loads(text)
    assert repr(decoded) == repr(expected)  # repr: NaN is not equal to itself


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)),
       st.integers(min_value=0, max_value=6))
def test_prune_keeps_what_is_shallow_enough_and_nulls_the_rest(value: Any, max_depth: int) -> None:
    pruned = json.loads(safejson.prune(json.dumps(value), max_depth))
    assert depth_of(pruned) <= max_depth
    if depth_of(value) <= max_depth:
        assert pruned == value


def test_installed_in_kopf_for_the_watch_stream_and_lists() -> None:
    from kopf._cogs.clients import api as kopf_api

    defaults = aiohttp.ClientResponse.json.__kwdefaults__
    assert defaults is not None
    saved_json, saved_loads = getattr(kopf_api, "json"), defaults["loads"]  # noqa: B009 - not exported
    try:
        safejson.install_in_kopf()
        safejson.install_in_kopf()  # idempotent
        assert getattr(kopf_api, "json").loads is safejson.loads  # noqa: B009
        assert defaults["loads"] is safejson.loads
        assert getattr(kopf_api, "json").loads(deep_event(3000))["object"]["metadata"]["name"] == "deep"  # noqa: B009
    finally:
        setattr(kopf_api, "json", saved_json)  # noqa: B010
        defaults["loads"] = saved_loads
