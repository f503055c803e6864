"""The Tenant names a burst of flag re-checks uses: one LIST, kept current by the Tenant watch."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from tenancy_operator.handlers.featureflag import FeatureFlagService
from tenancy_operator.reconcilers.errors import Retry


def tenant(name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name}}


class Listing:
    """Stands in for the LIST: returns what the API server held when it answered."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.calls = names, 0
        self.asked, self.answered = asyncio.Event(), asyncio.Event()

    async def __call__(self, namespace: str) -> set[str]:
        self.calls += 1
        self.asked.set()
        await self.answered.wait()
        return set(self.names)


def service(listing: Listing) -> FeatureFlagService:
    ctx = SimpleNamespace(settings=SimpleNamespace(rollout_check_seconds=1.0),
                          status=SimpleNamespace(keep_fresh=lambda plural, cache: None))
    svc = FeatureFlagService(ctx)  # type: ignore[arg-type]
    svc.reconciler = SimpleNamespace(tenant_names=listing)  # type: ignore[assignment]
    return svc


async def test_names_are_listed_once_then_follow_the_watch() -> None:
    listing = Listing({"acme", "globex"})
    listing.answered.set()
    svc = service(listing)
    assert await svc.tenant_names("ns", fresh=False) == {"acme", "globex"}
    svc.tenant_changed("ADDED", tenant("initech"))
    svc.tenant_changed("DELETED", tenant("globex"))
    assert await svc.tenant_names("ns", fresh=False) == {"acme", "initech"}
    assert listing.calls == 1
    assert await svc.tenant_names("ns", fresh=True) == {"acme", "globex"}  # a full sweep reads again
    assert listing.calls == 2


async def test_a_deletion_seen_while_the_list_is_in_flight_is_not_lost() -> None:
    listing = Listing({"acme", "globex"})  # answered before globex's deletion
    svc = service(listing)
    pending = asyncio.ensure_future(svc.tenant_names("ns", fresh=False))
    await listing.asked.wait()  # the LIST is in flight
    svc.tenant_changed("DELETED", tenant("globex"))
    listing.answered.set()
    assert await pending == {"acme"}
    assert await svc.tenant_names("ns", fresh=False) == {"acme"}


async def test_flags_asking_while_a_list_is_in_flight_share_it() -> None:
    listing = Listing({"acme"})
    svc = service(listing)
    asking = [asyncio.ensure_future(svc.tenant_names("ns", fresh=False)) for _ in range(3)]
    await listing.asked.wait()
    await asyncio.sleep(0)  # the others have asked too
    listing.answered.set()
    assert [await a for a in asking] == [{"acme"}] * 3
    assert listing.calls == 1


async def test_a_sweep_asking_while_a_list_is_in_flight_lists_after_it() -> None:
    """A fresh answer is one LISTed after the question: the LIST in flight may predate a change."""
    listing = Listing({"acme"})
    svc = service(listing)
    first = asyncio.ensure_future(svc.tenant_names("ns", fresh=False))
    await listing.asked.wait()
    sweep = asyncio.ensure_future(svc.tenant_names("ns", fresh=True))
    await asyncio.sleep(0)
    listing.answered.set()
    assert await first == await sweep == {"acme"}
    assert listing.calls == 2  # the sweep's own LIST, after the one in flight


async def test_a_cancelled_lister_leaves_the_others_to_list_themselves() -> None:
    listing = Listing({"acme"})
    svc = service(listing)
    first = asyncio.ensure_future(svc.tenant_names("ns", fresh=False))
    await listing.asked.wait()
    second = asyncio.ensure_future(svc.tenant_names("ns", fresh=False))
    await asyncio.sleep(0)  # waiting for the first one's LIST
    first.cancel()
    listing.answered.set()
    assert await second == {"acme"}
    assert first.cancelled() and listing.calls == 2


async def test_a_failed_list_is_tried_again_by_the_next_flag() -> None:
    class Failing(Listing):
        async def __call__(self, namespace: str) -> set[str]:
            self.calls += 1
            self.asked.set()
            await self.answered.wait()
            raise Retry("KubernetesAPI", "listing Tenants failed: 500")

    listing = Failing(set())
    svc = service(listing)
    asking = [asyncio.ensure_future(svc.tenant_names("ns", fresh=False)) for _ in range(2)]
    await listing.asked.wait()
    await asyncio.sleep(0)
    listing.answered.set()
    for a in asking:
        with pytest.raises(Retry):
            await a
    assert listing.calls == 2  # the LIST keeps failing here: each flag reports it


def test_the_names_a_flag_overrides_follow_its_generation() -> None:
    """The Tenant names a flag's overrides mention are kept per generation: an edit is seen."""
    svc = service(Listing(set()))

    def flag(generation: int, tenants: list[str]) -> dict[str, Any]:
        return {"metadata": {"namespace": "ns", "name": "f", "uid": "u1", "generation": generation},
                "spec": {"tenants": [{"tenant": t} for t in tenants],
                         "users": [{"tenant": "hooli", "user": "x"}, "not an override"]}}

    assert svc.names_in(flag(1, ["acme", "globex"])) == {"acme", "globex", "hooli"}
    assert svc.names_in(flag(1, ["acme", "globex"])) == {"acme", "globex", "hooli"}
    assert svc.names_in(flag(2, ["initech"])) == {"initech", "hooli"}
