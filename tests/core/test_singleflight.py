"""``SingleFlight``: one call in flight per key, shared by every caller of that key while
it runs (the mailbox client's replica-set lookups, a storage node's authorization lookups,
session opening)."""

from __future__ import annotations

import asyncio
import gc

import pytest
from dna_core.singleflight import SingleFlight
from support import until_async


class Work:
    """Counts its calls; each one lasts until ``release`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self, value: int = 7) -> int:
        self.calls += 1
        await self.release.wait()
        return value


def test_callers_of_one_key_share_its_call_and_other_keys_get_their_own() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        work = Work()
        waiting = [asyncio.ensure_future(flights.run(key, work)) for key in "aaaab"]
        await asyncio.sleep(0.01)
        assert work.calls == 2 and len(flights) == 2
        work.release.set()
        assert await asyncio.gather(*waiting) == [7] * 5
        assert len(flights) == 0
        await flights.run("a", work)  # ended: nothing kept, the next caller calls again
        assert work.calls == 3

    asyncio.run(scenario())


def test_a_caller_giving_up_leaves_the_call_to_the_others() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        work = Work()
        first = asyncio.ensure_future(flights.run("a", work))
        second = asyncio.ensure_future(flights.run("a", work))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        work.release.set()
        assert await second == 7 and work.calls == 1
        assert first.cancelled()

    asyncio.run(scenario())


def test_a_failure_reaches_every_caller_and_is_not_kept() -> None:
    async def fails() -> int:
        await asyncio.sleep(0)
        raise OSError("lookup failed")

    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        waiting = [asyncio.ensure_future(flights.run("a", fails)) for _ in range(3)]
        for caller in waiting:
            with pytest.raises(OSError, match="lookup failed"):
                await caller
        assert len(flights) == 0
        assert await flights.run("a", _nine) == 9  # the next caller calls again

    asyncio.run(scenario())


async def _nine() -> int:
    return 9


def test_a_failure_nobody_waits_for_any_more_is_retrieved(
    recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> int:
        await asyncio.sleep(0.01)
        raise OSError("nobody listens")

    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        caller = asyncio.ensure_future(flights.run("a", fails))
        await asyncio.sleep(0)
        caller.cancel()
        # polled: after a stall of the process, the sleep's timer and the failure's come due
        # together and the test ran before the flight's cleanup (checked: 1 flight left)
        await until_async(lambda: len(flights) == 0, "the failed flight let go")

    asyncio.run(scenario())
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_settled_waits_for_every_call_in_flight_whatever_its_outcome() -> None:
    async def fails() -> int:
        raise OSError("failed")

    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        work = Work()
        callers = [
            asyncio.ensure_future(flights.run("slow", work)),
            asyncio.ensure_future(flights.run("bad", fails)),
        ]
        await asyncio.sleep(0)
        settled = asyncio.ensure_future(flights.settled())
        await asyncio.sleep(0.01)
        assert not settled.done()  # "slow" still runs
        work.release.set()
        await settled  # does not raise "bad"'s failure: that is its caller's
        assert len(flights) == 0
        assert await callers[0] == 7
        with pytest.raises(OSError):
            await callers[1]
        await flights.settled()  # nothing in flight: at once

    asyncio.run(scenario())
