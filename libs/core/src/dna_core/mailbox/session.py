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

`Subscription` holds a mailbox's subscriptions on its replicas: blobs pushed from any of
them, merged by blob ID (each replica pushes its copy: only the first is kept), and
each node's cursor as of the last page taken. A node whose session broke (a restart, a
network outage) is resubscribed from that cursor: its first page is what was stored
meanwhile, so nothing is missed and nothing already taken comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from dna_core.errors import RefusedError, RemoteError, UnavailableError
from dna_core.mailbox.codec import StoredBlob, fetched_blob
from dna_core.mailbox.ids import blob_id
from dna_core.rpc_errors import UNAVAILABLE_CODES, remote_error
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc

NO_SESSION_RETRY_S = 300.0  # how long a node that serves no sessions is asked unary
OPEN_TIMEOUT_S = 5.0  # for the node's hello
SEEN_IDS = 65_536  # blob IDs a subscription remembers having handed out (replica copies)

T = TypeVar("T")
Channels = Callable[[str], grpc.aio.Channel]
OnPush = Callable[[mailbox_pb2.FetchResponse | None], None]  # None: the session ended


class StreamGoneError(UnavailableError):
    """The session's stream had ended before the request could be sent: the node never
    saw it, so it may be sent again on a new session."""


class NoSession(Exception):  # noqa: N818 (a signal, not an error: use the unary call)
    """The node serves no sessions."""


def status_error(status: mailbox_pb2.RequestStatus) -> RemoteError:
    """A request's refusal on a session, as the unary call's failure would be raised."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    if code in UNAVAILABLE_CODES:
        return UnavailableError(code.name, status.reason)
    return RefusedError(code.name, status.reason)


_CODES = {code.value[0]: code for code in grpc.StatusCode}
# What a write on a stream that has ended raises: its status, or (the call finished before
# the reader saw it: a node killed mid-session) grpc's InvalidStateError.
_STREAM_GONE = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


class NodeSession:
    """One open session to one node (``open``, then requests from any task)."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = mailbox_pb2_grpc.MailboxStub(channel)
        self.timeout = timeout
        self._call: Any = None
        self._room: asyncio.Semaphore | None = None
        self._window = 0
        self._writing = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[mailbox_pb2.SessionResponse]] = {}
        self._subscribers: dict[int, OnPush] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed: RemoteError | None = None

    async def open(self) -> None:
        """Start the stream and read the node's hello (its window); `NoSession` when the
        node serves no sessions, `RemoteError` when it cannot be reached."""
        self._call = self._stub.Session()
        try:
            hello = await asyncio.wait_for(self._call.read(), OPEN_TIMEOUT_S)
        except TimeoutError:
            self._call.cancel()
            raise UnavailableError("DEADLINE_EXCEEDED", "session: no hello from the node") from None
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise NoSession from err
            raise remote_error(err) from err
        if hello is grpc.aio.EOF or not hello.HasField("hello") or hello.hello.window < 1:
            self._call.cancel()
            raise UnavailableError("UNKNOWN", "session: the node did not say hello")
        self._window = hello.hello.window
        self._room = asyncio.Semaphore(self._window)
        self._reader = asyncio.create_task(self._read())

    async def request(self, **op: Any) -> mailbox_pb2.SessionResponse:
        """Send one request (``put=``, ``fetch=``, ``delete=``) and wait for its answer;
        a refusal is raised as `RemoteError` (``status_error``)."""
        response = await self.exchange(op)
        if response.HasField("error"):
            raise status_error(response.error)
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
            with contextlib.suppress(*_STREAM_GONE):
                async with self._writing:
                    await self._call.write(
                        mailbox_pb2.SessionRequest(unsubscribe=mailbox_pb2.Unsubscribe(id=sub_id))
                    )

    async def exchange(
        self, op: dict[str, Any], request_id: int | None = None
    ) -> mailbox_pb2.SessionResponse:
        """Send one request (``op``: its operation's field and message) and return the
        node's answer as it came, a refusal included."""
        if self.closed is not None:
            raise StreamGoneError(self.closed.grpc_code, self.closed.details)
        assert self._room is not None, "open the session first"
        await self._room.acquire()  # released when the answer arrives, not on a timeout
        if self.closed is not None:  # it ended while this request waited for room
            self._room.release()
            raise StreamGoneError(self.closed.grpc_code, self.closed.details)
        request_id = next(self._ids) if request_id is None else request_id
        future: asyncio.Future[mailbox_pb2.SessionResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = future
        try:
            async with self._writing:  # grpc takes one write at a time on a stream
                await self._call.write(mailbox_pb2.SessionRequest(id=request_id, **op))
        except _STREAM_GONE as err:
            self._end(err)
            assert self.closed is not None
            raise StreamGoneError(self.closed.grpc_code, self.closed.details) from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise UnavailableError("DEADLINE_EXCEEDED", "session: no answer in time") from None

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._end(None)
                    return
                self._deliver(response)
        except grpc.aio.AioRpcError as err:
            self._end(err)
        except asyncio.CancelledError:
            self._end(None)
            raise

    def _deliver(self, response: mailbox_pb2.SessionResponse) -> None:
        if response.HasField("push"):
            on_push = self._subscribers.get(response.id)
            if on_push is not None:
                on_push(response.push)
            return
        future = self._pending.pop(response.id, None)
        if future is None:
            return  # an answer to a request this client no longer knows: ignore
        assert self._room is not None
        self._room.release()
        on_push = self._subscribers.get(response.id)
        if on_push is not None and response.HasField("fetch"):
            on_push(response.fetch)  # a subscription's first page, before any push
        if not future.done():
            future.set_result(response)

    def _end(self, err: BaseException | None) -> None:
        """The stream is over: fail what waits, tell the subscribers."""
        if self.closed is None:
            if isinstance(err, grpc.aio.AioRpcError):
                self.closed = remote_error(err)
            else:
                self.closed = UnavailableError("UNAVAILABLE", "session: the stream ended")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self.closed)
                future.exception()  # retrieved: a waiter that gave up must not log it
        self._pending.clear()
        if self._room is not None:  # wake every request waiting for room: they fail now
            for _ in range(self._window):
                self._room.release()
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        for on_push in subscribers:
            on_push(None)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class SessionPool:
    """A client's sessions, one per node (by gRPC target), opened on first use."""

    def __init__(
        self, channels: Channels, timeout: float, discard: Callable[[str], None] | None = None
    ) -> None:
        self._channels, self.timeout = channels, timeout
        self._discard = discard  # drops a target's channel: the next one connects afresh
        self._sessions: dict[str, NodeSession] = {}
        self._opening: dict[str, asyncio.Task[NodeSession]] = {}
        self._unsupported: dict[str, float] = {}  # target -> monotonic time to try again

    async def get(self, target: str) -> NodeSession:
        """The open session to ``target``; `NoSession` when it serves none (recently)."""
        if time.monotonic() < self._unsupported.get(target, 0.0):
            raise NoSession
        session = self._sessions.get(target)
        if session is not None and session.closed is None:
            return session
        opening = self._opening.get(target)
        if opening is None:
            opening = asyncio.create_task(self._open(target))
            self._opening[target] = opening
            opening.add_done_callback(lambda _: self._opening.pop(target, None))
        return await asyncio.shield(opening)

    async def call(self, target: str, work: Callable[[NodeSession], Awaitable[T]]) -> T:
        """``work`` on the session to ``target``, once more on a new session if the old
        one's stream turned out to be gone (the node restarted since: the request never
        left). `NoSession`: use the unary call."""
        for attempt in range(2):
            session = await self.get(target)
            try:
                return await work(session)
            except StreamGoneError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _open(self, target: str) -> NodeSession:
        try:
            session = await self._start(target)
        except UnavailableError:
            # A channel whose node went away fails fast until its reconnect backoff ends,
            # even once the node is back: a stream's open, unlike a unary call on an idle
            # channel, meets that. Try once more on a fresh channel (a node still down
            # refuses it at once).
            if self._discard is None:
                raise
            self._discard(target)
            session = await self._start(target)
        old = self._sessions.pop(target, None)
        if old is not None:
            await old.close()
        self._sessions[target] = session
        return session

    async def _start(self, target: str) -> NodeSession:
        session = NodeSession(self._channels(target), self.timeout)
        try:
            await session.open()
        except NoSession:
            self._unsupported[target] = time.monotonic() + NO_SESSION_RETRY_S
            raise
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


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

    def page_arrived(self, node_id: bytes, page: mailbox_pb2.FetchResponse | None) -> None:
        if page is None:  # the node's session ended
            self.feeds[node_id].live = False
        else:
            self._pages.append((node_id, page))
            self.copies += len(page.blobs)
        self._changed.set()

    def dropped(self) -> list[bytes]:
        """The nodes whose subscription is not live (resubscribe them)."""
        return [node_id for node_id, feed in self.feeds.items() if not feed.live]

    async def wait(self, timeout: float) -> bool:
        """Until blobs arrived or a node's subscription dropped (True), or ``timeout``."""
        if not self._pages and not self.dropped():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()
        return bool(self._pages) or bool(self.dropped())

    def take(self) -> list[StoredBlob]:
        """The blobs pushed since the last take, each once (a replica's copy of a blob
        already handed out is dropped); ``cursors`` move past them."""
        pages, self._pages = self._pages, []
        blobs: list[StoredBlob] = []
        for node_id, page in pages:
            for stored in page.blobs:
                if blob_id(stored.blob) != stored.blob_id or stored.blob_id in self._seen:
                    continue  # altered by the replica, or another replica's copy
                self._seen[stored.blob_id] = None
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
