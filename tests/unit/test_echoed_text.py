"""Text a tenant or namespace user wrote, echoed in status, Events and the jobs CLI: bounded and
without control characters (observability/text.py, and the places that apply it)."""

from __future__ import annotations

import datetime
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tenancy_operator.conditions import Cond, merge
from tenancy_operator.jobs_cli import render
from tenancy_operator.observability.text import ELLIPSIS, MESSAGE_MAX, clean_message

HOSTILE = (
    "boom\x1b[2J\x1b]0;pwned\x07"  # clear the screen, set the terminal title
    "\rspoofed\x00\x7f\x9b"  # carriage return, NUL, DEL, a C1 CSI
    "\u202eevil\u2066\u200b\ufeff"  # bidi override and isolate, zero-width space, BOM
    "\U000e0041\ue000"  # a tag character, a private-use one
    "\nline2\tcol\u2028next"  # newline, tab, line separator
)


def test_plain_text_is_kept_as_is() -> None:
    for text in ("", "migration 0002_x.sql failed: relation \"t\" does not exist", "Zürich, 東京 ✓"):
        assert clean_message(text) == text


def test_control_and_format_characters_are_dropped_whitespace_becomes_spaces() -> None:
    assert clean_message(HOSTILE) == "boom[2J]0;pwned spoofedevil line2 col next"


def test_long_text_is_cut_with_an_ellipsis() -> None:
    cleaned = clean_message("x" * 100_000)
    assert len(cleaned) == MESSAGE_MAX
    assert cleaned.endswith(ELLIPSIS)
    assert clean_message("abcdef", limit=4) == "abc" + ELLIPSIS
    assert clean_message("abcd", limit=4) == "abcd"


def test_a_huge_run_of_dropped_characters_is_not_scanned_to_the_end() -> None:
    cleaned = clean_message("\x00" * 10_000_000 + "tail")
    assert cleaned == ELLIPSIS


@given(st.text(), st.integers(min_value=1, max_value=64))
def test_result_is_bounded_printable_and_stable(text: str, limit: int) -> None:
    cleaned = clean_message(text, limit)
    assert len(cleaned) <= limit
    assert cleaned.isprintable()
    assert clean_message(cleaned, limit) == cleaned


def test_condition_messages_are_cleaned_where_conditions_are_built() -> None:
    [ready] = merge(None, [Cond("Ready", "False", "MigrationFailed", HOSTILE + "y" * 5000)], 1)
    assert ready["message"].isprintable()
    assert len(ready["message"]) == MESSAGE_MAX
    # Rebuilding from what is stored gives the same message: no status write per reconcile.
    again = merge([ready], [Cond("Ready", "False", "MigrationFailed", HOSTILE + "y" * 5000)], 1)
    assert again == [ready]


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "started_at": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), "finished_at": None,
        "kind": "migrate", "state": "failed", "attempt": 1, "generation": 3,
        "detail": "0002_evil.sql", "note": None, "error": HOSTILE + "z" * 5000,
    }  # fmt: skip
    return {**base, **overrides}


def test_jobs_cli_table_prints_tenant_text_cleaned() -> None:
    out = render([row()])
    lines = out.splitlines()
    assert len(lines) == 2, "a newline in an error must not start a new table row"
    assert all(line.isprintable() for line in lines)
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert lines[1].endswith(ELLIPSIS)
    assert len(lines[1]) < 2 * MESSAGE_MAX


def test_jobs_cli_json_prints_tenant_text_cleaned() -> None:
    [printed] = json.loads(render([row()], "json"))
    assert printed["error"] == clean_message(HOSTILE + "z" * 5000)
    assert printed["detail"] == "0002_evil.sql"
    assert printed["attempt"] == 1


def test_a_cond_compares_equal_to_what_is_stored() -> None:
    cond = Cond("Isolated", "False", "PrivilegesRevoked", "grants: " + "x" * 3000 + "\x1b[0m")
    [stored] = merge(None, [cond], 1)
    assert cond.message == stored["message"]
