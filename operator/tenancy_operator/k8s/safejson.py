"""JSON from the API server that one deeply nested object cannot turn into an outage.

The API server stores JSON nested up to 10000 levels; Python's `json` gives up with RecursionError
at about 1000. Kopf decodes every watch event and every page of its initial LIST with `json.loads`,
so a single object nested that deep (a FeatureFlag variant value, stored before the CRD bounded
its depth) would end the watch of its whole kind, and at every restart end it again: no object of
the kind would be reconciled any more.

`loads` decodes as `json.loads` does (with orjson first: decoding the fleet is much of a
replica's work at a start, and orjson does it faster); only when that runs out of recursion
does it decode again with every list or object nested deeper than MAX_DEPTH replaced by
`null`. The object still arrives with its metadata, and its handler reports it as invalid (its
spec no longer fits the model); every other object is unaffected. `install_in_kopf` puts `loads`
where Kopf decodes.
"""

from __future__ import annotations

import json
import re
import types
from typing import Any

import aiohttp
import orjson
from kopf._cogs.clients import api as kopf_api  # Kopf's private API client: checked in install_in_kopf

MAX_DEPTH = 128
"""Lists and objects nested deeper than this are replaced when the plain decode fails. Far above
any valid object of ours (a FeatureFlag's variant value sits at depth 5 and nests at most 8 more),
far below the interpreter's recursion limit."""

# A JSON string (escapes included) or one bracket; everything else is skipped by the regex engine.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def prune(text: str, max_depth: int = MAX_DEPTH) -> str:
    """`text` (JSON) with every list or object that opens deeper than `max_depth` replaced by
    `null`. Iterative: the input may be nested any depth."""
    pieces: list[str] = []
    depth = 0
    last = 0
    skip_from = -1
    for token in _TOKEN.finditer(text):
        char = token.group()[0]
        if char == '"':
            continue
        if char in "[{":
            depth += 1
            if depth == max_depth + 1:
                skip_from = token.start()
        else:
            if depth == max_depth + 1 and skip_from >= 0:
                pieces += [text[last:skip_from], "null"]
                last = token.end()
                skip_from = -1
            depth -= 1
    pieces.append(text[last:])
    return "".join(pieces)


def loads(data: str | bytes | bytearray, **kwargs: Any) -> Any:
    """`json.loads`, falling back to `prune` when the document is nested too deep to decode.

    orjson first: for what it accepts it returns what `json.loads` does, except integers beyond
    64 bits (a float, as the API server stores them). Anything it refuses (nesting past 1024,
    a lone surrogate escape, NaN) goes through `json.loads`, so the result never depends on it."""
    if not kwargs:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(prune(text), **kwargs)


def install_in_kopf() -> None:
    """Make Kopf decode API responses with `loads`: its watch stream (`json.loads` in its API
    client module) and its LISTs and PATCH responses (aiohttp's `ClientResponse.json`, whose
    default decoder is bound at import). Raises RuntimeError if Kopf's internals moved, so an
    upgrade of Kopf cannot silently drop the protection (tests/unit/test_safejson.py)."""
    if getattr(kopf_api, "json", None) is not json and not _installed(kopf_api):
        raise RuntimeError("kopf._cogs.clients.api no longer decodes with the json module; review safejson")
    setattr(kopf_api, "json", types.SimpleNamespace(loads=loads, dumps=json.dumps))  # noqa: B010 - private
    defaults = aiohttp.ClientResponse.json.__kwdefaults__
    if not defaults or "loads" not in defaults:
        raise RuntimeError("aiohttp's ClientResponse.json has no `loads` default any more; review safejson")
    defaults["loads"] = loads


def _installed(module: Any) -> bool:
    return getattr(getattr(module, "json", None), "loads", None) is loads
