"""What a move's verification reports when the two sides differ (db/fingerprints.py)."""

from __future__ import annotations

from tenancy_operator.db.fingerprints import differences


def test_the_same_tables_and_rows_are_no_difference() -> None:
    same = {"orders": (3, "abc"), "items": (0, "d41d")}
    assert differences(same, dict(same)) == []


def test_each_kind_of_difference_is_named() -> None:
    source = {"orders": (3, "abc"), "items": (5, "x"), "gone": (1, "y")}
    destination = {"orders": (2, "abd"), "items": (5, "z"), "new": (0, "")}
    assert differences(source, destination) == [
        "gone: only on the source",
        "items: same row count (5), different contents",
        "new: only on the destination",
        "orders: 3 rows on the source, 2 on the destination",
    ]
