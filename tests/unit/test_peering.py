"""The standby rule for our own loops must be Kopf's: pause while a live peer has priority >= ours."""

from __future__ import annotations

import datetime

from tenancy_operator.peering import leads, own_deadline

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float = 1, lifetime: int = 60) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - datetime.timedelta(seconds=seconds_ago)).isoformat()}


def test_alone_or_without_peering_object_we_lead() -> None:
    assert leads([], "me", 5, NOW)
    assert leads([{}], "me", 5, NOW)
    assert leads([{"me": peer(5)}], "me", 5, NOW)


def test_a_live_peer_with_higher_or_equal_priority_pauses_us() -> None:
    assert not leads([{"me": peer(5), "other": peer(9)}], "me", 5, NOW)
    assert not leads([{"me": peer(5), "other": peer(5)}], "me", 5, NOW)  # Kopf pauses both on a tie
    assert leads([{"me": peer(5), "other": peer(4)}], "me", 5, NOW)


def test_dead_peers_do_not_count() -> None:
    assert leads([{"other": peer(9, seconds_ago=61)}], "me", 5, NOW)
    assert not leads([{"other": peer(9, seconds_ago=59)}], "me", 5, NOW)
    assert leads([{"other": peer(9, seconds_ago=0, lifetime=0)}], "me", 5, NOW)  # a peer that left


def test_any_namespace_with_a_stronger_peer_pauses_us() -> None:
    assert not leads([{"other": peer(1)}, {"other": peer(9)}], "me", 5, NOW)


def test_kopf_timestamp_format_and_garbage() -> None:
    status = {"other": {"priority": 9, "lifetime": 60, "lastseen": "2026-01-01T11:59:59.123456+00:00"},
              "broken": {"priority": 99}, "weird": "x"}
    assert not leads([status], "me", 5, NOW)
    assert leads([{"broken": {"priority": 99}}], "me", 5, NOW)


def test_own_deadline_is_the_earliest_record_and_none_where_one_is_missing() -> None:
    assert own_deadline([{"me": peer(5, seconds_ago=10)}], "me") == NOW + datetime.timedelta(seconds=50)
    assert own_deadline([{"me": peer(5, seconds_ago=10)}, {"me": peer(5, seconds_ago=30)}], "me") == \
        NOW + datetime.timedelta(seconds=30)
    assert own_deadline([{"me": peer(5)}, {"other": peer(9)}], "me") is None  # removed from one object
    assert own_deadline([{"me": {"priority": 5}}], "me") is None
    assert own_deadline([], "me") is None
