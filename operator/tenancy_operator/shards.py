"""Which objects this replica owns when several replicas share the fleet (pure; no I/O).

The 64-bit hash space of ``metadata.uid`` is cut into ``count`` equal slices. The live replicas
share the slices (``assign``: even shares, moving as few slices as possible), and a server-side
``shardSelector`` (KEP-5866) of the slices it holds gives a replica exactly its objects.
Which replica holds a slice is decided by that slice's Lease (sharding.py); this module only
computes. Unsharded, one Ownership owns everything.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenancy_operator.api.names import SLICE_LABEL

SPACE = 1 << 64
B = TypeVar("B", bound=Mapping[str, Any])
FIELD = "object.metadata.uid"


def fnv1a_64(text: str) -> int:
    """The hash the API server applies to the selected field (k8s.io/apimachinery/pkg/sharding)."""
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def bound(value: int) -> str:
    """A range bound as the API server wants it: quoted, 0x and exactly 16 hex digits, or 2^64
    (the whole space's exclusive end) as 0x1 followed by 16 zeros. The short form '0x0' is refused."""
    return f"'0x{value:016x}'"


def selector(start: int, end: int) -> str:
    """The shardSelector of the uids hashing into [start, end)."""
    if not 0 <= start < end <= SPACE:
        raise ValueError(f"not a range of the hash space: [{start:#x}, {end:#x})")
    return f"shardRange({FIELD}, {bound(start)}, {bound(end)})"


@dataclass(frozen=True)
class Slices:
    """The hash space cut into ``count`` slices of (almost) equal width."""

    count: int
    starts: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 1024:
            raise ValueError(f"slice count must be 1..1024, not {self.count}")
        object.__setattr__(self, "starts", tuple(i * SPACE // self.count for i in range(self.count)))

    def range_of(self, index: int) -> tuple[int, int]:
        end = self.starts[index + 1] if index + 1 < self.count else SPACE
        return self.starts[index], end

    def slice_of(self, uid: str) -> int:
        return bisect.bisect_right(self.starts, fnv1a_64(uid)) - 1

    def label(self, index: int) -> str:
        """The value of SLICE_LABEL for slice ``index``: the count too, so a label set under
        another slice count names no slice of this one (every replica sees it, and it is set anew)."""
        return f"{self.count}-{index}"


def assign(members: Iterable[str], count: int,
           holders: Mapping[int, str] | None = None) -> dict[str, frozenset[int]]:
    """Each live member's slices, sizes differing by at most one, moving as few slices as possible.

    ``holders`` is who holds which slice now (slice Leases of live members only). Each member keeps
    what it holds up to its share; the members holding more than the smaller share get the larger
    ones; the slices left over (free, a departed member's, or a member's beyond its share) go to
    the members short of their share, lowest slice to the first such member in sorted order. So
    when a replica dies the others only gain (their own work goes on unmoved), and one that joins
    takes a share from the others without moving anything between them. With nothing held this is
    contiguous blocks in the members' sorted order. Every replica that sees the same Leases
    computes the same answer.
    """
    ordered = sorted(set(members))
    if not ordered:
        return {}
    held: dict[str, list[int]] = {m: [] for m in ordered}
    for index, holder in sorted((holders or {}).items()):
        if holder in held and 0 <= index < count:
            held[holder].append(index)
    base, extra = divmod(count, len(ordered))
    # Only holding more than ``base`` earns a larger share (then by name): while slices change
    # hands no one's share changes, however far the others have got.
    by_holding = sorted(ordered, key=lambda m: (len(held[m]) <= base, m))
    share = {m: base + (1 if rank < extra else 0) for rank, m in enumerate(by_holding)}
    kept = {m: held[m][:share[m]] for m in ordered}
    taken = {i for slices in kept.values() for i in slices}
    left = iter(i for i in range(count) if i not in taken)
    for m in ordered:
        kept[m] += [next(left) for _ in range(share[m] - len(kept[m]))]
    return {m: frozenset(kept[m]) for m in ordered}


@dataclass(frozen=True)
class Member:
    """A live replica as its member Lease shows it: the slice count it cuts the space into, and
    when its Lease was created (RFC 3339, second precision: sorts as text)."""

    identity: str
    slice_count: int | None
    since: str


def sharing(members: Iterable[Member]) -> tuple[int | None, frozenset[str]]:
    """The slice count in force and the members that share the slices under it.

    Replicas that cut the space differently would each own objects the others own too, so only one
    count is in force: that of the oldest live member (ties broken by identity). Members with
    another count hold nothing until every member of the count in force is gone; a rolling change
    of the count thus hands the fleet over once the last replica of the old count has left."""
    ordered = sorted(members, key=lambda m: (m.since, m.identity))
    if not ordered:
        return None, frozenset()
    count = ordered[0].slice_count
    return count, frozenset(m.identity for m in ordered if m.slice_count == count)


def describe(slices: Slices, indices: Iterable[int]) -> str:
    """Slices for logs and metrics: '4-7' or '0,2' or '-'."""
    ordered = sorted(set(indices))
    if not ordered:
        return "-"
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs(ordered))


class Ownership:
    """What this replica may reconcile: everything when unsharded, else the objects whose uid falls
    in a slice it holds. Held slices change only while Kopf is stopped (runtime.py), so a reconcile
    never sees its object change hands under it; the check is a client-side second line behind the
    server's selector."""

    def __init__(self, slices: Slices | None = None, held: Iterable[int] = ()) -> None:
        self.slices = slices
        self.held: frozenset[int] = frozenset(held)
        self.held_labels = frozenset(slices.label(i) for i in self.held) if slices is not None else frozenset()
        self.others_labels = (frozenset(slices.label(i) for i in range(slices.count) if i not in self.held)
                              if slices is not None else frozenset())

    @property
    def sharded(self) -> bool:
        return self.slices is not None

    @property
    def whole(self) -> bool:
        """This replica holds every slice (or is unsharded): its watches bring every object."""
        return self.slices is None or len(self.held) == self.slices.count

    @property
    def chores(self) -> bool:
        """Whether this replica does the fleet-wide work that belongs to no one object (each target's
        isolation audit, archive catalog, dropping moved copies): the holder of slice 0."""
        return self.slices is None or 0 in self.held

    def owns_uid(self, uid: str) -> bool:
        return self.slices is None or self.slices.slice_of(uid) in self.held

    def owns(self, body: Mapping[str, Any]) -> bool:
        return self.owns_uid(str(body["metadata"].get("uid") or ""))

    def label_for(self, uid: str) -> str | None:
        """The SLICE_LABEL value of the Quotas naming a Tenant of this uid; None unsharded."""
        return None if self.slices is None else self.slices.label(self.slices.slice_of(uid))

    def labelled_mine(self, body: Mapping[str, Any]) -> bool:
        """The object carries the SLICE_LABEL of a slice this replica holds."""
        return ((body.get("metadata") or {}).get("labels") or {}).get(SLICE_LABEL) in self.held_labels

    def watches_quota(self, body: Mapping[str, Any]) -> bool:
        """The Quota is one ``quota_selector`` selects: not labelled with another replica's slice."""
        return ((body.get("metadata") or {}).get("labels") or {}).get(SLICE_LABEL) not in self.others_labels

    def quota_selector(self) -> str | None:
        """The label selector of the Quotas this replica watches: those of its slices and those
        without a slice (new ones; their Tenant's holder labels them), i.e. not labelled with a
        slice another replica holds. None when it holds every slice (or is unsharded): it sees all."""
        if self.slices is None or self.whole:
            return None
        others = sorted(set(range(self.slices.count)) - self.held)
        return f"{SLICE_LABEL} notin ({','.join(self.slices.label(i) for i in others)})"

    def mine(self, bodies: Sequence[B]) -> list[B]:
        return list(bodies) if self.slices is None else [b for b in bodies if self.owns(b)]

    def selector(self) -> str | None:
        """The shardSelector of the held slices: one shardRange per contiguous run, joined with
        ``||`` (the server answers their union); None unsharded."""
        if self.slices is None:
            return None
        return selector_of(self.slices, self.held)

    def others_selector(self) -> str | None:
        """The shardSelector of the slices other replicas hold; None when this one holds every
        slice (or is unsharded)."""
        if self.slices is None or self.whole:
            return None
        return selector_of(self.slices, set(range(self.slices.count)) - self.held)


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indices as inclusive runs of consecutive values: {0, 1, 2, 5} -> [(0, 2), (5, 5)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] + 1 == i:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def selector_of(slices: Slices, indices: Iterable[int]) -> str:
    parts = [selector(slices.range_of(a)[0], slices.range_of(b)[1]) for a, b in runs(indices)]
    if not parts:
        raise ValueError("no slices held: nothing to select")
    return " || ".join(parts)
