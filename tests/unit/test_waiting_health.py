"""The /healthz a sharded replica serves while no Kopf run does: 200 while its Leases are renewed."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from tenancy_operator.observability.health import waiting_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_answers_200_while_renewing_500_after_and_frees_the_port() -> None:
    async def scenario() -> None:
        port, renewing = free_port(), [True]
        url = f"http://127.0.0.1:{port}/healthz"
        async with aiohttp.ClientSession() as http:
            async with waiting_health("127.0.0.1", port, lambda: {"held": "-"}, lambda: renewing[0]):
                async with http.get(url) as r:
                    assert r.status == 200
                    assert json.loads(await r.text()) == {"sharding": {"held": "-"}}
                renewing[0] = False
                async with http.get(url) as r:
                    assert r.status == 500
            # Kopf binds the same address next: it must be free.
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))

    asyncio.run(scenario())
