"""The caps every stream session of a node shares (``dna_core.rpc_session_server``): sessions
per address and in all (``SourceCaps``), page slots per address and in all (``SharedSlots``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from dna_core.rpc_session_server import ServerSession, SharedSlots, SourceCaps
from prometheus_client import CollectorRegistry, Counter, Gauge
from support import SETTLE_S


def test_source_caps_refuse_over_the_address_cap_then_over_the_node_cap_and_give_back() -> None:
    caps = SourceCaps("session", per_source=2, total=3)
    assert caps.take("a") is None and caps.take("a") is None
    refused = caps.take("a")
    assert refused is not None and refused.kind == "source_limit"
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.reason == "session: 2 open from this address (the limit)"
    assert caps.take("b") is None
    full = caps.take("c")
    assert full is not None and full.kind == "node_limit"
    assert full.reason == "session: 3 open on this node (the limit)"
    caps.give("a")
    assert caps.take("c") is None  # a place given back is taken again
    for source in ("a", "b", "c"):
        caps.give(source)
    assert (caps.count, caps.live.by_source()) == (0, {})


def test_shared_slots_wait_for_room_per_address_and_in_all() -> None:
    async def scenario() -> None:
        slots = SharedSlots(per_source=2, total=3)
        await slots.acquire("a")
        await slots.acquire("a")
        third_a = asyncio.create_task(slots.acquire("a"))
        await asyncio.sleep(0)
        assert not third_a.done()  # over the address's share: waits
        await slots.acquire("b")  # another address is not held back by it
        second_b = asyncio.create_task(slots.acquire("b"))
        await asyncio.sleep(0)
        assert not second_b.done()  # the node's 3 are taken
        slots.release("a")  # room for "a" again: its waiter takes it, the node is full
        await asyncio.wait_for(third_a, SETTLE_S)
        await asyncio.sleep(0)
        assert not second_b.done()
        assert (slots.count, slots.held.by_source()) == (3, {"a": 2, "b": 1})
        slots.release("a", 2)
        await asyncio.wait_for(second_b, SETTLE_S)
        assert (slots.count, slots.held.by_source()) == (2, {"b": 2})
        slots.release("b", 2)
        assert (slots.count, slots.held.by_source()) == (0, {})

    asyncio.run(scenario())


class _SlowToStop(ServerSession):
    """A session whose one piece of work takes a while to stop once cancelled (a backend
    call finishing): what its close waits for."""

    def _hello(self) -> object:
        return "hello"

    def _take(self, request: object) -> None:
        self.spawn(self._work())

    async def _work(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # ends, later than its cancel
            raise


class _Context:
    async def write(self, response: object) -> None:
        return None


def test_a_session_s_place_is_given_back_with_its_gauge_when_its_close_has_ended() -> None:
    """The close runs in a task of its own, to its end even if the handler is cancelled
    (`ServerSession._close`); the address's place must go back in the same step as the
    gauge, at the close's end. Given back by the handler instead, a handler cancelled
    twice (the client gone, then the server stopping) freed it while the session's work
    still ran, and the place lagged the gauge by a step (a client that saw the session
    gone and opened another was refused meanwhile). Fails without the fix (checked)."""

    async def scenario() -> None:
        caps = SourceCaps("session", per_source=1, total=10)
        registry = CollectorRegistry()
        opened = Gauge("open", "", registry=registry)
        session = _SlowToStop(
            cast(Any, _Context()), window=4, stall_s=5.0, caps=caps, source="a",
            opened=opened, cuts=Counter("cuts", "", ["reason"], registry=registry),
        )  # fmt: skip
        requests: asyncio.Queue[object] = asyncio.Queue()

        async def stream() -> AsyncIterator[object]:
            while True:
                yield await requests.get()

        handler = asyncio.create_task(session.run(stream()))
        requests.put_nowait("work")
        await asyncio.sleep(0.05)
        handler.cancel()  # the client went away: the close starts, its work stopping
        await asyncio.sleep(0.05)
        handler.cancel()  # and once more (the server stopping)
        with contextlib.suppress(asyncio.CancelledError):
            await handler
        assert session.closing is not None and not session.closing.done()
        assert (caps.count, registry.get_sample_value("open")) == (1, 1)  # until the close ends
        await asyncio.wait_for(asyncio.shield(session.closing), SETTLE_S)
        assert (caps.count, registry.get_sample_value("open")) == (0, 0)

    asyncio.run(scenario())
