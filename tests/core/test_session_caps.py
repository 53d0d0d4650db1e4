"""The caps every stream session of a node shares (``dna_core.rpc_session_server``): sessions
per address and in all (``SourceCaps``), page slots per address and in all (``SharedSlots``)."""

from __future__ import annotations

import asyncio

import grpc
from dna_core.rpc_session_server import SharedSlots, SourceCaps
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
