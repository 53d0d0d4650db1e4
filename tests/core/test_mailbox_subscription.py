"""A `Subscription` (dna_core.mailbox.session) without a network: what its replicas push
is handed out once, in order, with each node's cursor moved to its last page; a node whose
session ended is listed as dropped until it is subscribed again."""

from __future__ import annotations

import asyncio
import hashlib

from dna_core.errors import UnavailableError
from dna_core.mailbox import Subscription
from dna_core.mailbox.session import _NodeFeed, status_error
from dna_core.wire.gen.dna.v1 import mailbox_pb2

A, B = b"a" * 32, b"b" * 32
BOX = b"m" * 32  # the mailbox ID


def stored(body: bytes, ms: int) -> mailbox_pb2.StoredBlob:
    return mailbox_pb2.StoredBlob(blob_id=hashlib.sha256(body).digest(), blob=body, stored_ms=ms)


def page(cursor: bytes, *blobs: mailbox_pb2.StoredBlob) -> mailbox_pb2.FetchResponse:
    return mailbox_pb2.FetchResponse(blobs=blobs, next_cursor=cursor)


def subscription() -> Subscription:
    sub = Subscription(BOX, cursors={})
    sub.feeds = {A: _NodeFeed("a:1", live=True), B: _NodeFeed("b:1", live=True)}
    return sub


def test_each_blob_is_handed_out_once_whichever_replica_pushed_it() -> None:
    sub = subscription()
    one, two = stored(b"one", 1), stored(b"two", 2)
    sub.page_arrived(A, page(b"a1", one))
    sub.page_arrived(B, page(b"b1", one, two))
    assert [b.blob for b in sub.take()] == [b"one", b"two"]
    # who pushed each (a blob one node alone returned is that node's word: dna_peer.inbox)
    assert sub.sources == {one.blob_id: {A, B}, two.blob_id: {B}}
    sub.page_arrived(A, page(b"a2", two))  # A's copy of what B brought first
    assert sub.take() == [] and sub.sources == {}
    assert sub.cursors == {A: b"a2", B: b"b1"}
    assert sub.copies == 4


def test_a_blob_altered_by_a_replica_is_dropped() -> None:
    sub = subscription()
    forged = mailbox_pb2.StoredBlob(blob_id=hashlib.sha256(b"x").digest(), blob=b"y")
    sub.page_arrived(A, page(b"a1", forged))
    assert sub.take() == []
    assert sub.cursors == {A: b"a1"}  # the page was read: its cursor holds


def test_a_node_whose_session_ended_is_dropped_and_wakes_the_waiter() -> None:
    async def go() -> None:
        sub = subscription()
        assert not await sub.wait(0.01)  # nothing came
        waiting = asyncio.create_task(sub.wait(5))
        await asyncio.sleep(0)
        sub.page_arrived(B, None)
        assert await waiting
        assert sub.dropped() == [B]

    asyncio.run(go())


def test_a_refusal_on_a_session_is_raised_as_the_unary_call_would_be() -> None:
    denied = status_error(mailbox_pb2.RequestStatus(code=7, reason="no"))
    busy = status_error(mailbox_pb2.RequestStatus(code=8, reason="slow down"))
    assert (type(denied).__name__, denied.grpc_code, denied.details) == (
        "RefusedError",
        "PERMISSION_DENIED",
        "no",
    )
    # An UnavailableError as the unary call's, marked answered: not re-sent as a unary call
    # (the node spent its nonce; the replay it would refuse hid why).
    assert (type(busy).__name__, busy.grpc_code) == (
        "AnsweredUnavailableError",
        "RESOURCE_EXHAUSTED",
    )
    assert isinstance(busy, UnavailableError)
