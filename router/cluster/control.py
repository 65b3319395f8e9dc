"""Closing the cluster bus's control connection (nats-py) for good, in bounded time.

nats-py reconnects in a task of its own, and ``Client.close()`` cancels that task
once. A cancel can be lost: in Python 3.11, ``asyncio.wait_for`` returns the
inner result when the inner connect completes as the outer task is cancelled,
and nats-py's reconnect loop then goes on trying, for ever
(``max_reconnect_attempts = -1``), on a client that is closed. Seen in this
project's CI: the reconnect task outliving its closed client at a test's
teardown (and, before teardowns were bounded, most likely the run that hung
there for 20 minutes). So the task is cancelled until it has ended, within the
same bound as the close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("router.cluster.control")

CANCEL_POLL = 0.05  # seconds between two cancels of a task that goes on


async def end_task(task: asyncio.Task, timeout: float) -> bool:
    """Cancel ``task`` until it is done, for at most ``timeout`` seconds; True when it ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(CANCEL_POLL, left))
    return True


async def close(nc: Any, goodbye: tuple[str, bytes] | None, timeout: float) -> None:
    """Publish ``goodbye`` (subject, payload) and drain while connected, then close ``nc``
    and end its reconnect task; each step bounded by ``timeout``: a NATS that is away or
    reconnecting must not hold up the relay's stop."""
    try:
        if goodbye is not None:
            await nc.publish(*goodbye)
            await asyncio.wait_for(nc.drain(), timeout)
    except Exception as exc:  # noqa: BLE001 - stopping must not fail on a broken bus
        log.info("cluster bus: closing the NATS connection: %s", exc or type(exc).__name__)
    if not nc.is_closed:
        try:
            await asyncio.wait_for(nc.close(), timeout)
        except Exception as exc:  # noqa: BLE001
            log.info("cluster bus: the NATS connection did not close in time: %s", exc or type(exc).__name__)
    reconnecting = getattr(nc, "_reconnection_task", None)  # nats-py 2.x keeps it there
    if reconnecting is not None and not await end_task(reconnecting, timeout):
        log.warning("cluster bus: nats-py's reconnect task did not end within %g s of the close", timeout)
