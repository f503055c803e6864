"""/healthz of a sharded replica between its Kopf runs.

Kopf serves the liveness endpoint only while it runs. A sharded replica also spends time without a
run: waiting for its slices' Leases to expire or be released, or holding none while another slice
count is in force (sharding.py). Then the kubelet would see no answer and restart a replica that is
doing what it should. This endpoint answers on the same address in those gaps: 200 while the
replica keeps its Leases renewed, 500 once it could not for longer than a lease (``alive``).
It is stopped before Kopf binds the address again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def waiting_health(host: str, port: int, state: Callable[[], Mapping[str, Any]],
                         alive: Callable[[], bool]) -> AsyncIterator[None]:
    """Serve /healthz at host:port for the duration of the block."""

    async def healthz(_: web.Request) -> web.Response:
        body = json.dumps({"sharding": dict(state())})
        return web.Response(status=200 if alive() else 500, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()
