"""Closing the bus's control connection (router.cluster.control): a reconnect task whose
cancel was lost is cancelled again until it ends, and given up on, with a word, after the bound."""

from __future__ import annotations

import asyncio

from router.cluster.control import end_task


async def _stubborn(lost: int, seen: list[str], running: list[bool]) -> None:
    """Loses its first ``lost`` cancels, as nats-py's reconnect loop does when one lands
    as a connect completes (asyncio.wait_for in Python 3.11), then ends on the next;
    loses every cancel while ``lost`` is negative and ``running`` holds True."""
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancel")
            if (lost >= 0 and len(seen) > lost) or not running[0]:
                raise
            asyncio.current_task().uncancel()


def test_a_task_that_loses_cancels_is_cancelled_until_it_ends():
    async def main():
        seen: list[str] = []
        task = asyncio.ensure_future(_stubborn(2, seen, [True]))
        await asyncio.sleep(0)
        task.cancel()  # the one cancel Client.close() makes
        await asyncio.sleep(0.01)
        assert not task.done()  # lost: it goes on
        assert await end_task(task, 5.0)
        assert task.cancelled() and len(seen) == 3

    asyncio.run(main())


def test_a_task_that_never_ends_is_given_up_on_after_the_bound():
    async def main():
        seen: list[str] = []
        running = [True]
        task = asyncio.ensure_future(_stubborn(-1, seen, running))
        await asyncio.sleep(0)
        assert not await end_task(task, 0.2)
        assert not task.done() and len(seen) >= 2  # cancelled again and again until the bound
        running[0] = False
        task.cancel()
        await asyncio.wait([task], timeout=5)
        assert task.cancelled()

    asyncio.run(main())


def test_a_task_that_already_ended_is_left_alone():
    async def main():
        task = asyncio.ensure_future(asyncio.sleep(0))
        await task
        assert await end_task(task, 0.1)
        assert not task.cancelled()

    asyncio.run(main())
