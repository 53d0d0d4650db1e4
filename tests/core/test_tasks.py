"""stop_tasks: a task that turns its cancellation into an error and carries on still stops."""

from __future__ import annotations

import asyncio
import logging

import pytest
from dna_core.tasks import stop_tasks
from support import SETTLE_S


async def _retrying_loop(cancels_eaten: int, passes: list[int]) -> None:
    """A loop like the storage node's GC: each pass's error is caught and the loop goes
    on. The first ``cancels_eaten`` cancellations are turned into such an error, as a
    client library's error path can do."""
    while True:
        try:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if cancels_eaten == 0:
                    raise
                cancels_eaten -= 1
                raise ConnectionError("the store went away") from None
        except ConnectionError:
            passes.append(1)  # a failed pass, said once; the next one runs


def test_a_task_that_swallows_its_cancel_is_cancelled_again_until_it_ends() -> None:
    asyncio.run(_test_a_task_that_swallows_its_cancel_is_cancelled_again_until_it_ends())


async def _test_a_task_that_swallows_its_cancel_is_cancelled_again_until_it_ends() -> None:
    passes: list[int] = []
    task = asyncio.create_task(_retrying_loop(cancels_eaten=2, passes=passes))
    await asyncio.sleep(0)
    assert await asyncio.wait_for(stop_tasks([task], recancel_s=0.05), 5) == []
    assert task.cancelled()
    assert len(passes) == 2  # both eaten cancels ran a pass; the third ended it


def test_one_cancel_was_not_enough_before() -> None:
    asyncio.run(_test_one_cancel_was_not_enough_before())


async def _test_one_cancel_was_not_enough_before() -> None:
    """The shape every stop path had (cancel once, await): it never returns."""
    task = asyncio.create_task(_retrying_loop(cancels_eaten=1, passes=[]))
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done
    await stop_tasks([task], recancel_s=0.05)
    assert task.cancelled()


def test_failures_are_returned_not_raised_and_none_is_skipped() -> None:
    asyncio.run(_test_failures_are_returned_not_raised_and_none_is_skipped())


async def _test_failures_are_returned_not_raised_and_none_is_skipped() -> None:
    async def fails() -> None:
        raise ValueError("broke")

    failed = asyncio.create_task(fails())
    sleeper = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    failures = await stop_tasks([failed, None, sleeper])
    assert [type(f) for f in failures] == [ValueError]
    assert sleeper.cancelled()


def test_the_callers_own_cancel_is_not_swallowed() -> None:
    asyncio.run(_test_the_callers_own_cancel_is_not_swallowed())


async def _test_the_callers_own_cancel_is_not_swallowed() -> None:
    stubborn = asyncio.create_task(_retrying_loop(cancels_eaten=100, passes=[]))
    stopper = asyncio.create_task(stop_tasks([stubborn], recancel_s=0.05))
    await asyncio.sleep(0.1)
    stopper.cancel()
    done, _ = await asyncio.wait({stopper}, timeout=SETTLE_S)
    assert stopper in done and stopper.cancelled()
    await stop_tasks([stubborn], recancel_s=0.001)
    assert stubborn.cancelled()


def test_a_loop_that_died_is_logged_when_its_owner_stops_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Retrieving the exception silences asyncio's "never retrieved" report, so a stop
    path of long-lived loops passes its logger: the death is said, with its traceback."""

    async def main() -> None:
        async def dies() -> None:
            raise RuntimeError("the GC loop broke")

        loop = asyncio.create_task(dies())
        await asyncio.sleep(0)
        await stop_tasks([loop], failures_to=logging.getLogger("dna.test"))

    with caplog.at_level(logging.ERROR, logger="dna.test"):
        asyncio.run(main())
    [record] = caplog.records
    assert record.getMessage() == "a task had failed before it was stopped"
    assert record.exc_info is not None and "the GC loop broke" in str(record.exc_info[1])
