"""The client side of mailbox sessions (docs/storage.md, "Sessions and push").

One long-lived ``Mailbox.Session`` stream per storage node carries this client's puts,
fetches and deletes, each with an ID, at most the node's window of them unanswered
(a request waits here for room rather than get the session cut), and subscriptions:
the node pushes a mailbox's new blobs, each page with its cursor.

A request answers as the unary call would: a refusal is raised as the same
`RemoteError` (or, for a put, returned as the same `PutOutcome` a ``PutMany`` gives).
A broken session fails what was in flight with `UnavailableError` and the next request
opens a new one. A node that serves no sessions (older versions: UNIMPLEMENTED) is
remembered for ``NO_SESSION_RETRY_S``, and the caller uses the unary calls meanwhile.
That transport, shared with the overlay's record sessions, is `dna_core.rpc_session`;
this module adds the mailbox's operations and subscriptions.

`Subscription` holds a mailbox's subscriptions on its replicas: blobs pushed from any of
them, merged by blob ID (each replica pushes its copy: only the first is kept), and
each node's cursor as of the last page taken. A node whose session broke (a restart, a
network outage) is resubscribed from that cursor: its first page is what was stored
meanwhile, so nothing is missed and nothing already taken comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dna_core import trace
from dna_core.errors import RemoteError
from dna_core.mailbox.codec import StoredBlob, fetched_blob
from dna_core.mailbox.ids import blob_id
from dna_core.rpc_session import (
    NO_SESSION_RETRY_S,
    OPEN_TIMEOUT_S,
    STREAM_GONE,
    Channels,
    NoSession,
    StreamGoneError,
    StreamSession,
    status_error,
)
from dna_core.rpc_session import SessionPool as _SessionPool
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc

__all__ = [
    "NO_SESSION_RETRY_S", "OPEN_TIMEOUT_S", "SEEN_IDS", "NoSession", "NodeSession",
    "SessionPool", "StreamGoneError", "Subscription", "status_error", "subscribe_nodes",
]  # fmt: skip

SEEN_IDS = 65_536  # blob IDs a subscription remembers having handed out (replica copies)

OnPush = Callable[[mailbox_pb2.FetchResponse | None], None]  # None: the session ended


class NodeSession(StreamSession):
    """One open mailbox session to one node (``open``, then requests from any task); the
    transport is `dna_core.rpc_session.StreamSession`'s."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        super().__init__(channel, timeout)
        self._subscribers: dict[int, OnPush] = {}

    def _start_stream(self, channel: grpc.aio.Channel) -> Any:
        return mailbox_pb2_grpc.MailboxStub(channel).Session()

    def _frame(self, request_id: int, op: dict[str, Any]) -> mailbox_pb2.SessionRequest:
        return mailbox_pb2.SessionRequest(id=request_id, **op)

    async def request(self, **op: Any) -> mailbox_pb2.SessionResponse:
        """Send one request (``put=``, ``fetch=``, ``delete=``) and wait for its answer;
        a refusal is raised as `RemoteError` (``status_error``)."""
        response: mailbox_pb2.SessionResponse = await super().request(**op)
        return response

    async def put(self, request: mailbox_pb2.PutRequest) -> mailbox_pb2.PutOutcome:
        """A put's outcome as ``PutMany`` reports it (code 0: stored)."""
        response = await self.exchange({"put": request})
        if response.HasField("error"):
            e = response.error
            return mailbox_pb2.PutOutcome(code=e.code, reason=e.reason,
                                          pow_required=e.pow_required,
                                          retry_after_ms=e.retry_after_ms)  # fmt: skip
        return mailbox_pb2.PutOutcome(
            blob_id=response.put.blob_id, expires_ms=response.put.expires_ms
        )

    async def subscribe(self, fetch: mailbox_pb2.FetchRequest, on_push: OnPush) -> int:
        """Subscribe with ``fetch`` (its cursor is where to start): returns the
        subscription's ID. Its pages, the first one included, go to ``on_push`` in the
        order the node sent them, and None once the session has ended."""
        sub_id = next(self._ids)
        self._subscribers[sub_id] = on_push
        try:
            response = await self.exchange(
                {"subscribe": mailbox_pb2.Subscribe(fetch=fetch)}, sub_id
            )
        except BaseException:
            self._subscribers.pop(sub_id, None)
            raise
        if response.HasField("error"):
            self._subscribers.pop(sub_id, None)
            raise status_error(response.error)
        return sub_id

    async def unsubscribe(self, sub_id: int) -> None:
        if self._subscribers.pop(sub_id, None) is not None and self.closed is None:
            with contextlib.suppress(*STREAM_GONE):
                async with self._writing:
                    await self._call.write(
                        mailbox_pb2.SessionRequest(unsubscribe=mailbox_pb2.Unsubscribe(id=sub_id))
                    )

    async def exchange(
        self, op: dict[str, Any], request_id: int | None = None
    ) -> mailbox_pb2.SessionResponse:
        """Send one request (``op``: its operation's field and message) and return the
        node's answer as it came, a refusal included."""
        response: mailbox_pb2.SessionResponse = await super().exchange(op, request_id)
        return response

    def _deliver(self, response: mailbox_pb2.SessionResponse) -> None:
        if response.HasField("push"):
            on_push = self._subscribers.get(response.id)
            if on_push is not None:
                on_push(response.push)
            return
        super()._deliver(response)

    def _before_answer(self, response: mailbox_pb2.SessionResponse) -> None:
        on_push = self._subscribers.get(response.id)
        if on_push is not None and response.HasField("fetch"):
            on_push(response.fetch)  # a subscription's first page, before any push

    def _ended(self) -> None:
        """Tell the subscribers their session is over."""
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        for on_push in subscribers:
            on_push(None)


class SessionPool(_SessionPool[NodeSession]):
    """A client's mailbox sessions, one per node (by gRPC target), opened on first use."""

    def __init__(
        self, channels: Channels, timeout: float, discard: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(channels, timeout, discard, make=NodeSession)


@dataclass
class _NodeFeed:
    target: str
    session: NodeSession | None = None
    sub_id: int = 0
    live: bool = False


@dataclass
class Subscription:
    """A mailbox's subscriptions on its replicas (see the module docstring). ``cursors``
    are the nodes' cursors as of the last page taken (node ID -> cursor)."""

    box: bytes  # the mailbox ID
    cursors: dict[bytes, bytes]
    feeds: dict[bytes, _NodeFeed] = field(default_factory=dict)
    _pages: list[tuple[bytes, mailbox_pb2.FetchResponse]] = field(default_factory=list)
    _seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    copies: int = 0  # blob copies received from every node (each replica sends its own)
    # The nodes that pushed each blob of the last take (a blob only one node returned is
    # only that node's word: dna_peer.inbox bounds what it keeps of such blobs per node).
    sources: dict[bytes, set[bytes]] = field(default_factory=dict)

    def page_arrived(self, node_id: bytes, page: mailbox_pb2.FetchResponse | None) -> None:
        if page is None:  # the node's session ended
            self.feeds[node_id].live = False
        else:
            self._pages.append((node_id, page))
            self.copies += len(page.blobs)
            for stored in page.blobs:
                trace.mark("peer.arrived", stored.blob_id)
        self._changed.set()

    def dropped(self) -> list[bytes]:
        """The nodes whose subscription is not live (resubscribe them)."""
        return [node_id for node_id, feed in self.feeds.items() if not feed.live]

    async def wait(self, timeout: float) -> bool:
        """Until blobs arrived or a node's subscription dropped (True), or ``timeout``."""
        if not self._pages and not self.dropped():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        self._changed.clear()
        return bool(self._pages) or bool(self.dropped())

    def take(self) -> list[StoredBlob]:
        """The blobs pushed since the last take, each once (a replica's copy of a blob
        already handed out is dropped); ``cursors`` move past them."""
        pages, self._pages = self._pages, []
        blobs: list[StoredBlob] = []
        self.sources = {}
        for node_id, page in pages:
            for stored in page.blobs:
                if blob_id(stored.blob) != stored.blob_id:
                    continue  # altered by the replica
                if stored.blob_id in self.sources:  # another replica's copy, this take
                    self.sources[stored.blob_id].add(node_id)
                    continue
                if stored.blob_id in self._seen:
                    continue  # another replica's copy of a blob an earlier take handed out
                self._seen[stored.blob_id] = None
                self.sources[stored.blob_id] = {node_id}
                blobs.append(fetched_blob(self.box, stored))
            self.cursors[node_id] = page.next_cursor
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        return sorted(blobs, key=lambda b: (b.stored_ms, b.blob_id))

    async def close(self) -> None:
        for feed in self.feeds.values():
            if feed.session is not None and feed.live:
                await feed.session.unsubscribe(feed.sub_id)
            feed.live = False


async def subscribe_nodes(
    subscription: Subscription,
    pool: SessionPool,
    nodes: Sequence[tuple[bytes, str]],
    request: Callable[[Sequence[bytes]], mailbox_pb2.FetchRequest],
) -> list[bytes]:
    """Subscribe on ``nodes`` ((node ID, gRPC target), not yet live) with one request
    ``request(node IDs)`` naming them all, each from its cursor; returns the IDs of the
    nodes that refused or could not be reached (`NoSession` counts as not reached)."""
    fetch = request([node_id for node_id, _ in nodes])

    async def one(node_id: bytes, target: str) -> bool:
        feed = subscription.feeds.setdefault(node_id, _NodeFeed(target))
        try:
            feed.session = await pool.get(target)
            feed.live = True  # before the first page: a session ending meanwhile clears it
            feed.sub_id = await feed.session.subscribe(
                fetch, lambda page: subscription.page_arrived(node_id, page)
            )
        except (RemoteError, NoSession):
            feed.live = False
            return False
        return True

    results = await asyncio.gather(*(one(node_id, target) for node_id, target in nodes))
    return [node_id for (node_id, _), ok in zip(nodes, results, strict=True) if not ok]
