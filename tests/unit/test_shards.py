"""Slices of the fleet for sharded replicas: what each replica owns and the selector it sends."""

from __future__ import annotations

import itertools
import random
import uuid

import pytest

from tenancy_operator.sharding import (
    EXPIRY_MARGIN_SECONDS,
    LOOK_SECONDS,
    SLICES_ANNOTATION,
    Observed,
    lease_safe,
    next_wake,
    slice_count_of,
)
from tenancy_operator.shards import (
    SPACE,
    Member,
    Ownership,
    Slices,
    assign,
    describe,
    fnv1a_64,
    runs,
    selector,
    selector_of,
    sharing,
)


def test_the_hash_is_the_api_servers_fnv1a_64() -> None:
    # FNV-1a 64 reference values (offset basis for the empty string; "a" from the FNV test suite).
    assert fnv1a_64("") == 0xCBF29CE484222325
    assert fnv1a_64("a") == 0xAF63DC4C8601EC8C


def test_slices_cover_the_space_without_gaps_or_overlaps() -> None:
    for count in (1, 2, 3, 7, 16, 1024):
        slices = Slices(count)
        ranges = [slices.range_of(i) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == SPACE
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        for _ in range(50):
            uid = str(uuid.uuid4())
            start, end = slices.range_of(slices.slice_of(uid))
            assert start <= fnv1a_64(uid) < end


def test_live_members_split_the_slices_in_contiguous_blocks_everyone_computes_alike() -> None:
    shares = assign(["b", "a", "c"], 16)
    assert shares == assign(["c", "a", "b", "a"], 16)
    assert sorted(i for s in shares.values() for i in s) == list(range(16))
    assert all(len(runs(s)) == 1 for s in shares.values())
    assert sorted(len(s) for s in shares.values()) == [5, 5, 6]
    # More replicas than slices: some wait with none.
    assert sorted(len(s) for s in assign([str(i) for i in range(5)], 3).values()) == [0, 0, 1, 1, 1]


def holding(shares: dict[str, frozenset[int]]) -> dict[int, str]:
    return {i: m for m, s in shares.items() for i in s}


def test_when_a_replica_dies_the_others_keep_their_slices_and_share_out_its_own() -> None:
    before = assign(["a", "b", "c", "d"], 16)
    survivors = {i: m for i, m in holding(before).items() if m != "b"}
    after = assign(["a", "c", "d"], 16, survivors)
    for m in ("a", "c", "d"):
        assert before[m] <= after[m], m  # nothing of its own moves: its work goes on
    assert sorted(i for s in after.values() for i in s) == list(range(16))
    assert sorted(len(s) for s in after.values()) == [5, 5, 6]
    assert set().union(*(after[m] - before[m] for m in after)) == before["b"]


def test_a_joining_replica_takes_a_share_and_nothing_moves_between_the_others() -> None:
    before = assign(["a", "b", "c"], 16)
    after = assign(["a", "b", "c", "d"], 16, holding(before))
    for m in ("a", "b", "c"):
        assert after[m] <= before[m], m
    assert sorted(len(s) for s in after.values()) == [4, 4, 4, 4]
    assert sorted(i for s in after.values() for i in s) == list(range(16))


def test_no_replica_changes_its_mind_while_slices_change_hands() -> None:
    """From any holding, with the members each releasing what is beyond their share and taking what
    is theirs in any order, every intermediate state gives the same answer as the first: a running
    replica is never told to give up what it was just told to keep (which would restart its work)."""
    rng = random.Random(7)
    for _ in range(300):
        count = rng.choice([4, 7, 16, 32])
        members = rng.sample(["a", "b", "c", "d", "e", "f"], rng.randint(1, 5))
        holding = {i: rng.choice([*members, "gone"]) for i in range(count) if rng.random() < 0.8}
        holding = {i: m for i, m in holding.items() if m in members}
        want = assign(members, count, holding)
        while holding != {i: m for m, s in want.items() for i in s}:
            assert assign(members, count, holding) == want, (members, holding)
            moves = [("release", i) for i, m in holding.items() if i not in want[m]]
            moves += [("take", i) for m, s in want.items() for i in s if i not in holding]
            action, index = rng.choice(moves)
            if action == "release":
                del holding[index]
            else:
                holding[index] = next(m for m, s in want.items() if index in s)
        assert assign(members, count, holding) == want  # and then it stays


def test_the_selector_is_what_the_api_server_accepts() -> None:
    assert selector(0, SPACE) == (
        "shardRange(object.metadata.uid, '0x0000000000000000', '0x10000000000000000')")
    assert selector(0, 1 << 63).endswith("'0x8000000000000000')")
    with pytest.raises(ValueError, match="not a range"):
        selector(5, 5)
    slices = Slices(4)
    # Held slices that are not one run: one range per run, their union.
    assert selector_of(slices, {0, 1, 3}) == (
        "shardRange(object.metadata.uid, '0x0000000000000000', '0x8000000000000000') || "
        "shardRange(object.metadata.uid, '0xc000000000000000', '0x10000000000000000')")
    assert describe(slices, {0, 1, 3}) == "0-1,3" and describe(slices, ()) == "-"


def test_ownership() -> None:
    everything = Ownership()
    assert not everything.sharded and everything.chores and everything.selector() is None
    slices = Slices(2)
    uids = [str(uuid.uuid4()) for _ in range(40)]
    low, high = Ownership(slices, {0}), Ownership(slices, {1})
    bodies = [{"metadata": {"uid": u}} for u in uids]
    assert len(low.mine(bodies)) + len(high.mine(bodies)) == len(bodies)
    assert not set(map(id, low.mine(bodies))) & set(map(id, high.mine(bodies)))
    assert low.chores and not high.chores
    assert everything.mine(bodies) == bodies


def test_quotas_are_watched_by_their_tenants_slice_label() -> None:
    """A replica selects the Quotas labelled with its slices and the unlabelled ones (new, or whose
    Tenant is gone): the label selector leaves out only those of slices other replicas hold."""
    slices = Slices(4)
    low, high, whole = Ownership(slices, {0, 1}), Ownership(slices, {2, 3}), Ownership(slices, range(4))
    assert low.quota_selector() == "tenancy.dev/slice notin (4-2,4-3)"
    assert high.quota_selector() == "tenancy.dev/slice notin (4-0,4-1)"
    assert whole.quota_selector() is None and Ownership().quota_selector() is None  # it sees every Quota
    uid = str(uuid.uuid4())
    label = low.label_for(uid)
    assert label == f"4-{slices.slice_of(uid)}" and label == high.label_for(uid)  # every replica agrees
    assert Ownership().label_for(uid) is None  # unsharded: no label
    quota = {"metadata": {"labels": {"tenancy.dev/slice": label}}}
    assert (low.owns_uid(uid), high.owns_uid(uid)) == (low.labelled_mine(quota), high.labelled_mine(quota))
    # What each selector selects, as the cache of each replica's watch keeps it.
    assert (low.watches_quota(quota), high.watches_quota(quota)) == (low.owns_uid(uid), high.owns_uid(uid))
    for unlabelled in ({"metadata": {}}, {"metadata": {"labels": {"tenancy.dev/slice": "8-5"}}}):
        assert low.watches_quota(unlabelled) and high.watches_quota(unlabelled)
    assert whole.watches_quota(quota) and Ownership().watches_quota(quota)
    # A label set under another slice count names none of this count's slices: every replica selects it.
    stale = {"metadata": {"labels": {"tenancy.dev/slice": "8-1"}}}
    assert not low.labelled_mine(stale) and not high.labelled_mine(stale)
    assert not low.labelled_mine({"metadata": {}})


def test_a_lease_is_expired_when_seen_unchanged_for_its_duration() -> None:
    observed = Observed()
    lease = {"metadata": {"name": "x", "resourceVersion": "1"}, "spec": {"leaseDurationSeconds": 15}}
    assert not observed.expired(lease, 100.0)
    assert not observed.expired(lease, 114.0)
    assert observed.expired(lease, 116.0)
    renewed = {"metadata": {"name": "x", "resourceVersion": "2"}, "spec": {"leaseDurationSeconds": 15}}
    assert not observed.expired(renewed, 117.0)  # renewed: fresh again, whatever the clocks say


def test_the_next_expiry_is_when_the_first_lease_seen_live_runs_out() -> None:
    """A replica looks at the Leases again when the first one it has seen live would expire, so a
    replica that died is noticed then rather than at the next renewal after it."""
    observed = Observed()
    assert observed.next_expiry(100.0) is None
    a = {"metadata": {"name": "a", "resourceVersion": "1"}, "spec": {"leaseDurationSeconds": 15}}
    b = {"metadata": {"name": "b", "resourceVersion": "7"}, "spec": {"leaseDurationSeconds": 15}}
    observed.expired(a, 100.0)
    observed.expired(b, 103.0)
    assert observed.next_expiry(104.0) == 115.0
    observed.expired({**a, "metadata": {"name": "a", "resourceVersion": "2"}}, 105.0)  # a renewed
    assert observed.next_expiry(106.0) == 118.0
    assert observed.expired(b, 118.5) and observed.next_expiry(118.5) == 120.0  # b is past, a is next
    assert observed.next_expiry(121.0) is None


def test_between_renewals_the_peers_leases_are_read_every_look() -> None:
    """A peer's renewal is seen within LOOK_SECONDS, not at this replica's next renewal: one that
    died is noticed at most that long after its Lease ran out."""
    assert next_wake(100.0, renewal=105.0, expiry=None) == LOOK_SECONDS
    assert next_wake(104.5, renewal=105.0, expiry=None) == 0.5  # the renewal comes first
    assert next_wake(100.0, renewal=105.0, expiry=100.4) == pytest.approx(0.4 + EXPIRY_MARGIN_SECONDS)
    assert next_wake(106.0, renewal=105.0, expiry=None) == 0.0  # late: at once


def test_identities_become_lease_names() -> None:
    assert lease_safe("tenancy-operator-7d9f/ABC_1") == "tenancy-operator-7d9f-abc-1"
    assert lease_safe("///") == "replica"


def test_the_oldest_members_slice_count_is_in_force_and_the_others_hold_nothing() -> None:
    old = [Member("b", 16, "2026-12-03T10:00:00Z"), Member("a", 16, "2026-12-03T10:00:05Z")]
    new = Member("c", 32, "2026-12-03T11:00:00Z")
    assert sharing([new, *old]) == (16, frozenset({"a", "b"}))
    # The last replica of the old count leaves: the new count is in force, whatever the order seen.
    assert sharing([new]) == (32, frozenset({"c"}))
    assert sharing([Member("d", 32, "2026-12-03T11:00:00Z"), new]) == (32, frozenset({"c", "d"}))
    # Same second: the identity decides, alike for everyone.
    tie = [Member("y", 8, "2026-12-03T12:00:00Z"), Member("x", 4, "2026-12-03T12:00:00Z")]
    assert sharing(tie) == sharing(list(reversed(tie))) == (4, frozenset({"x"}))
    assert sharing([]) == (None, frozenset())


def test_a_member_lease_says_its_slice_count() -> None:
    assert slice_count_of({"metadata": {"annotations": {SLICES_ANNOTATION: "16"}}}) == 16
    assert slice_count_of({"metadata": {"annotations": {SLICES_ANNOTATION: "many"}}}) is None
    assert slice_count_of({"metadata": {}}) is None
