"""Text the operator echoes back to people: bounded and without control characters.

Status messages, Events and the `jobs` CLI repeat text that tenants and namespace users wrote: a
PostgreSQL error raised by a tenant's migration or function, a ConfigMap's key, an override's
reason. Shown by kubectl or a terminal, such text could carry escape sequences (ESC), carriage
returns that overwrite what came before, bidirectional overrides that reorder what is displayed,
or invisible characters; and it could be as long as the tenant likes. `clean_message` is the one
filter every such message goes through.
"""

from __future__ import annotations

MESSAGE_MAX = 1024
"""Characters of one echoed message (status condition, job summary, Event, CLI cell)."""
ELLIPSIS = "\u2026"
SCAN_MAX = 8
"""At most SCAN_MAX x limit characters of the input are looked at."""


def clean_message(text: object, limit: int = MESSAGE_MAX) -> str:
    """`text` as one printable line of at most `limit` characters.

    Whitespace of any kind (newlines, tabs, carriage returns, Unicode line separators, no-break
    spaces) becomes a plain space; every other character Python does not deem printable (C0 and C1
    controls such as ESC and DEL, format characters such as bidirectional overrides, zero-width
    characters and tag characters, surrogates, private-use and unassigned code points) is dropped.
    A longer result is cut and ends with an ellipsis. Idempotent: cleaning a cleaned message
    changes nothing, so a status compared with what is stored does not flap.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    text = str(text)
    if len(text) <= limit and text.isprintable():
        return text
    kept: list[str] = []
    cut = False
    for i, c in enumerate(text):
        if len(kept) > limit or i >= SCAN_MAX * limit:
            cut = True  # a huge message costs no more than a short one
            break
        if c.isprintable():
            kept.append(c)
        elif c.isspace():
            kept.append(" ")
    if cut or len(kept) > limit:
        return "".join(kept[: limit - 1]) + ELLIPSIS
    return "".join(kept)
