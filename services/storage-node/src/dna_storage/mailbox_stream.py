"""Mailbox sessions: one long-lived bidirectional gRPC stream per client carrying many
puts, fetches and deletes, and subscriptions with push delivery (docs/storage.md,
"Sessions and push").

Each request carries the client's ID and is judged by the same handlers as the unary
call of the same name (``MailboxService.put_one``, ``fetch_one``, ``delete_one``, and for
storage nodes' replica sync ``sync_list_one``, ``sync_pull_one``, ``sync_push_one``): the same
admission, authentication, proof of work, and a refusal is that request's `RequestStatus`
with the unary call's code, reason, and retry hints; the session goes on.

The session itself is cut, with a status saying why, when the client breaks its rules:
more than ``window`` requests unanswered (RESOURCE_EXHAUSTED), an ID still in use
(INVALID_ARGUMENT), a frame that does not decode or is over the message limit (the gRPC
gate's INVALID_ARGUMENT, grpc's RESOURCE_EXHAUSTED), or responses left unread for
``stall_s`` (RESOURCE_EXHAUSTED). So a session holds at most ``window`` requests and their
responses (a put's blob is within the node's blob limit) and at most ``PAGES_HELD`` fetch
or push pages, batches of puts and sync messages, from reading one until it is answered: bounded
memory, whatever the client does. Every cut is counted by reason.

A subscription is authenticated as a fetch is (the owner's signature, or a fetch
session), so nobody subscribes to a mailbox that is not theirs. Its pump reads the mailbox
from the subscription's cursor whenever a put stores a blob there (any path: a client's
put, a replica's push, repair: `NotifyingBackend`), and sends each page with its cursor
after the last one was written: a slow reader slows its own pushes, and cursors make a
resubscription after a reconnect resume exactly where the pushes stopped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from dna_core import trace
from dna_core.errors import CapacityError, MalformedError, ProtocolError
from dna_core.ratelimit import source_key
from dna_core.rpc_session_server import ServerSession, SharedSlots, SourceCaps
from dna_core.wire import mailbox_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dna_storage.backends.base import MailboxBackend, PutOutcome, Quota, StoredBlob
from dna_storage.mailbox_service import Ctx, MailboxService, peer_ip, request_status

log = logging.getLogger("dna.storage.session")
WINDOW = 64  # unanswered requests a session may have
STALL_S = 30.0  # how long a response may wait for the client to read it (a busy client is slow)
MAX_SUBSCRIPTIONS = 8  # per session: a device has one mailbox, plus retired ones
SESSIONS_PER_SOURCE = 32  # a NAT's devices, and a storage node's repair, share an address
SESSIONS = 4096
SUBSCRIPTIONS_PER_SOURCE = 64
NODE_PAGES_PER_SOURCE = 8  # page slots the sessions of one address hold together
NODE_PAGES = 64  # and all sessions of the node: ~5 MiB each (a page, or a 4 MiB batch)
PAGES_HELD = 4  # pages and put batches (up to 2, 4 MiB) a session holds, read or queued
MAX_GROUP = 64  # session puts written in one backend call
PUSH_RETRY_S = 1.0  # a subscription's page whose read failed is read again this much later
PUSH_LIMIT = 200  # blobs per pushed page
SYNC_OPS = frozenset({"sync_list", "sync_pull", "sync_push"})  # between storage nodes
# Requests or answers of up to a page (2 MiB) or a message: each holds one of PAGES_HELD.
PAGED_OPS = frozenset({"fetch", "subscribe", "put_many"}) | SYNC_OPS


class SessionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("dna_storage_sessions_open", "Mailbox sessions open", registry=registry)
        self.requests = Counter(
            "dna_storage_session_requests",
            "Requests received on mailbox sessions, by operation (put, put_many, fetch, "
            "delete, subscribe, unsubscribe, sync_list, sync_pull, sync_push; none)",
            ["op"],
            registry=registry,
        )
        self.per_session = Histogram(
            "dna_storage_session_requests_per_session",
            "Requests a mailbox session carried, observed when it ends",
            buckets=(1, 10, 100, 1_000, 10_000, 100_000, float("inf")),
            registry=registry,
        )
        self.refusals = Counter(
            "dna_storage_session_refusals",
            "Sessions cut (window, duplicate_id, malformed, stalled), refused at opening "
            "(source_limit, site_limit: the source's IPv6 /48, node_limit) and subscriptions "
            "refused (subscribe_denied, subscriptions: over 8 on a session, "
            "subscriptions_source_limit, subscriptions_site_limit, subscriptions_node_limit), "
            "by reason",
            ["reason"],
            registry=registry,
        )
        self.subscriptions = Gauge(
            "dna_storage_subscriptions", "Mailbox subscriptions live", registry=registry
        )
        self.pushes = Counter(
            "dna_storage_pushed_blobs", "Blobs pushed to subscribers", registry=registry
        )


class Subscribers:
    """Per mailbox, the subscriptions to wake when a blob is stored there."""

    def __init__(self) -> None:
        self._waiting: dict[bytes, set[asyncio.Event]] = {}

    def add(self, box: bytes, wake: asyncio.Event) -> None:
        self._waiting.setdefault(box, set()).add(wake)

    def remove(self, box: bytes, wake: asyncio.Event) -> None:
        waiting = self._waiting.get(box)
        if waiting is not None:
            waiting.discard(wake)
            if not waiting:
                del self._waiting[box]

    def notify(self, boxes: set[bytes]) -> None:
        for box in boxes:
            for wake in self._waiting.get(box, ()):
                wake.set()


class NotifyingBackend:
    """The backend, waking a mailbox's subscriptions after a write stored a blob there."""

    def __init__(self, backend: MailboxBackend, subscribers: Subscribers) -> None:
        self._backend, self._subscribers = backend, subscribers

    async def put_many(
        self, blobs: Sequence[StoredBlob], now_ms: int, quota: Quota | None = None
    ) -> list[PutOutcome]:
        for blob in blobs:
            trace.mark("node.write", blob.blob_id)
        outcomes = await self._backend.put_many(blobs, now_ms, quota)
        stored = {b.mailbox_id for b, o in zip(blobs, outcomes, strict=True)
                  if o is PutOutcome.STORED}  # fmt: skip
        for blob in blobs:
            trace.mark("node.stored", blob.blob_id)
        self._subscribers.notify(stored)
        return outcomes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class GroupWriter:
    """Session puts, written in groups with no timer: a put that finds no write in flight
    goes at once, the ones admitted meanwhile together when it returns (SQLite commits a
    group as one transaction, as it does a PutMany). Each judged against ``quota`` where it
    is written (``MailboxBackend.put_many``)."""

    def __init__(self, backend: MailboxBackend, quota: Quota) -> None:
        self._backend, self._quota = backend, quota
        self._waiting: list[tuple[StoredBlob, int, asyncio.Future[PutOutcome]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def store(self, blob: StoredBlob, now_ms: int) -> PutOutcome:
        future: asyncio.Future[PutOutcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((blob, now_ms, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                now_ms = max(now for _, now, _ in group)
                try:
                    blobs = [b for b, _, _ in group]
                    outcomes = await self._backend.put_many(blobs, now_ms, self._quota)
                except Exception as exc:  # each put answers it (a full disk, a bug)
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), outcome in zip(group, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._writer = None


@dataclass
class Subscription:
    box: bytes
    cursor: int  # the seq the last page ended at
    limit: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task[None] | None = None


class SessionRules:
    """What every session of a node shares: its handlers, writer, subscribers, limits."""

    def __init__(
        self,
        service: MailboxService,
        subscribers: Subscribers,
        metrics: SessionMetrics,
        *,
        window: int = WINDOW,
        stall_s: float = STALL_S,
        sessions: SourceCaps | None = None,
        subscriptions: SourceCaps | None = None,
        ipv6_prefix_len: int = 64,
        node_pages: SharedSlots | None = None,
    ) -> None:
        self.service, self.subscribers, self.metrics = service, subscribers, metrics
        self.writer = GroupWriter(service.backend, service.admission.quota)
        self.window, self.stall_s = window, stall_s
        self.sessions = sessions or SourceCaps("session", SESSIONS_PER_SOURCE, SESSIONS)
        self.subscriptions = subscriptions or SourceCaps(
            "subscriptions", SUBSCRIPTIONS_PER_SOURCE, SESSIONS * MAX_SUBSCRIPTIONS
        )
        self.ipv6_prefix_len = ipv6_prefix_len
        self.node_pages = node_pages or SharedSlots(NODE_PAGES_PER_SOURCE, NODE_PAGES)


class MailboxSession(ServerSession):
    """One client's session: reads requests, serves them concurrently, writes responses
    and pushes in one stream (module docstring; the loop and its rules:
    `dna_core.rpc_session_server`)."""

    def __init__(self, rules: SessionRules, context: Ctx) -> None:
        source_ip = peer_ip(context)
        super().__init__(
            context, window=rules.window, stall_s=rules.stall_s,
            opened=rules.metrics.open, cuts=rules.metrics.refusals, caps=rules.sessions,
            source=source_key(source_ip, ipv6_prefix_len=rules.ipv6_prefix_len),
        )  # fmt: skip
        self.rules, self.service, self.metrics = rules, rules.service, rules.metrics
        self.source_ip = source_ip
        self.subscriptions: dict[int, Subscription] = {}
        self.pages = SharedSlots(PAGES_HELD, PAGES_HELD)  # this session's own
        self.paged: mailbox_pb2.SessionRequest | None = None  # read, waiting for a slot
        self.node_pages_held = 0  # of the node's shared slots, given back when it ends
        self.received = 0

    def _hello(self) -> mailbox_pb2.SessionResponse:
        return mailbox_pb2.SessionResponse(hello=mailbox_pb2.SessionHello(window=self.window))

    def _ending(self) -> None:
        self._end_subscriptions()

    def _ended(self) -> None:
        self.rules.node_pages.release(self.source, self.node_pages_held)
        self.node_pages_held = 0
        self.metrics.per_session.observe(self.received)

    async def _take_page(self) -> None:
        """One of this session's page slots, then one of the node's (``SharedSlots``)."""
        await self.pages.acquire("")
        try:
            await self.rules.node_pages.acquire(self.source)
        except BaseException:
            self.pages.release("")
            raise
        self.node_pages_held += 1

    def _give_page(self) -> None:
        self.pages.release("")
        self.node_pages_held -= 1
        self.rules.node_pages.release(self.source)

    def _take(self, request: mailbox_pb2.SessionRequest) -> None:
        self.received += 1
        op = request.WhichOneof("op") or "none"
        self.metrics.requests.labels(op=op).inc()
        if op == "unsubscribe":
            self._unsubscribe(request.unsubscribe.id)
            return
        self.claim(request.id, self.subscriptions)
        if op in PAGED_OPS:
            self.paged = request  # served once it has a page slot (``_room``)
        else:
            self.spawn(self._serve(request, paged=False))

    async def _room(self) -> None:
        # A page (up to 2 MiB), or a batch of puts or a sync message (up to the 4 MiB
        # message limit), holds a slot from before the next frame is read until its answer
        # is written: a session holds at most PAGES_HELD of them, read or not. (Waiting
        # for the slot after reading on, a session sending 4 MiB batches held its window
        # of them: 64 x 4 MiB.)
        request, self.paged = self.paged, None
        if request is not None:
            await self._take_page()
            self.spawn(self._serve(request, paged=True))
        # Nor is the next frame read while no slot is free, here or node-wide: read, a
        # batch would wait in memory for one (4 MiB a session); unread, it waits in the
        # client, HTTP/2 flow control holding it back.
        await self.pages.until_free("")
        await self.rules.node_pages.until_free(self.source)

    # -- serving -----------------------------------------------------------------------

    async def _serve(self, request: mailbox_pb2.SessionRequest, *, paged: bool) -> None:
        """Answer one request; a ``paged`` one came with its page slot (``_room``)."""
        subscription: Subscription | None = None
        try:
            response, subscription = await self._answer(request)
        except ProtocolError as exc:
            response = mailbox_pb2.SessionResponse(error=request_status(exc))
        except Exception:  # a bug answers this request, not the session
            log.exception("session request failed")
            response = mailbox_pb2.SessionResponse(error=mailbox_pb2.RequestStatus(
                code=grpc.StatusCode.INTERNAL.value[0], reason="session: internal error"
            ))  # fmt: skip
        response.id = request.id

        def written() -> None:
            if paged:
                self._give_page()

        await self.out.put((response, written, request.id))
        if subscription is not None:  # its pushes only after its first page
            subscription.pump = self.spawn(self._pump(request.id, subscription))

    async def _answer(
        self, request: mailbox_pb2.SessionRequest
    ) -> tuple[mailbox_pb2.SessionResponse, Subscription | None]:
        now_ms = self.service.wall_ms()
        op = request.WhichOneof("op")
        if op == "put":
            put = await self.service.put_one(
                request.put, self.source_ip, now_ms, store=self.rules.writer.store
            )
            return mailbox_pb2.SessionResponse(put=put), None
        if op == "put_many":
            many = await self.service.put_many_one(request.put_many, self.source_ip, now_ms)
            return mailbox_pb2.SessionResponse(put_many=many), None
        if op == "fetch":
            fetched = await self.service.fetch_one(request.fetch, now_ms)
            return mailbox_pb2.SessionResponse(fetch=fetched), None
        if op == "delete":
            deleted = await self.service.delete_one(request.delete, self.source_ip, now_ms)
            return mailbox_pb2.SessionResponse(delete=deleted), None
        if op == "subscribe":
            return await self._subscribe(request.id, request.subscribe.fetch, now_ms)
        if op in SYNC_OPS:
            return await self._sync(request, now_ms), None
        raise MalformedError("session: a request with no operation", kind="malformed")

    async def _sync(
        self, request: mailbox_pb2.SessionRequest, now_ms: int
    ) -> mailbox_pb2.SessionResponse:
        """Replica sync from another storage node, by the unary calls' own handlers."""
        service, source = self.service, self.source_ip
        if request.HasField("sync_list"):
            listed = await service.sync_list_one(request.sync_list, source, now_ms)
            return mailbox_pb2.SessionResponse(sync_list=listed)
        if request.HasField("sync_pull"):
            pulled = await service.sync_pull_one(request.sync_pull, source, now_ms)
            return mailbox_pb2.SessionResponse(sync_pull=pulled)
        pushed = await service.sync_push_one(request.sync_push, source, now_ms)
        return mailbox_pb2.SessionResponse(sync_push=pushed)

    async def _subscribe(
        self, sub_id: int, fetch: mailbox_pb2.FetchRequest, now_ms: int
    ) -> tuple[mailbox_pb2.SessionResponse, Subscription]:
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            self.metrics.refusals.labels(reason="subscriptions").inc()
            raise CapacityError(f"session: at most {MAX_SUBSCRIPTIONS} subscriptions")
        try:
            owner, body, cursor = await self.service.verify_fetch(fetch, now_ms, method="subscribe")
        except ProtocolError:
            self.metrics.refusals.labels(reason="subscribe_denied").inc()
            raise
        if (refused := self.rules.subscriptions.take(self.source)) is not None:
            self.metrics.refusals.labels(reason=f"subscriptions_{refused.kind}").inc()
            raise CapacityError(refused.reason)
        subscription = Subscription(owner.mailbox_id, cursor, min(body.limit, PUSH_LIMIT))
        # Listen before reading: a blob stored meanwhile wakes the pump, nothing is missed.
        self.rules.subscribers.add(subscription.box, subscription.wake)
        self.subscriptions[sub_id] = subscription
        self.metrics.subscriptions.inc()
        page = await self._next_page(subscription, now_ms)
        self.service.on_outcome("subscribe", "ok")
        if body.open_session:
            page.session.CopyFrom(self.service.sessions.grant(owner.owner, now_ms))
        return mailbox_pb2.SessionResponse(fetch=page), subscription

    async def _next_page(
        self, subscription: Subscription, now_ms: int
    ) -> mailbox_pb2.FetchResponse:
        page = await self.service.read_page(
            subscription.box, subscription.cursor, subscription.limit, now_ms
        )
        subscription.cursor = int.from_bytes(page.next_cursor[-8:], "big")
        if page.more:
            subscription.wake.set()  # the rest right after this page
        return page

    async def _pump(self, sub_id: int, subscription: Subscription) -> None:
        """Push what the mailbox gains, a page at a time, each after the last was written."""
        while True:
            await subscription.wake.wait()
            subscription.wake.clear()
            await self._take_page()
            try:
                page = await self._next_page(subscription, self.service.wall_ms())
            except ProtocolError as exc:  # the store: unavailable, damaged (said by the node)
                self._give_page()
                await self._read_again_later(subscription, exc)
                continue
            except BaseException:
                self._give_page()
                raise
            if self.subscriptions.get(sub_id) is not subscription:  # unsubscribed meanwhile
                self._give_page()  # and its cancel lost (redis-py can drop one): end here
                return
            if not page.blobs:
                self._give_page()
                continue
            for stored in page.blobs:
                trace.mark("node.push_read", stored.blob_id)
            written = asyncio.Event()
            done = functools.partial(self._page_written, written, page)
            await self.out.put((mailbox_pb2.SessionResponse(id=sub_id, push=page), done, None))
            self.metrics.pushes.inc(len(page.blobs))
            await written.wait()

    async def _read_again_later(self, subscription: Subscription, exc: ProtocolError) -> None:
        """A push whose read failed (the store was unavailable a moment: Redis restarting
        right after the write that woke it) is read again after ``PUSH_RETRY_S``, from the
        same cursor: before, the pump ended there, and the subscription stayed open and
        never pushed again."""
        log.debug("push read failed, reading again in %g s: %s", PUSH_RETRY_S, exc.reason)
        await asyncio.sleep(PUSH_RETRY_S)
        subscription.wake.set()

    def _page_written(self, written: asyncio.Event, page: mailbox_pb2.FetchResponse) -> None:
        for stored in page.blobs:
            trace.mark("node.push_written", stored.blob_id)
        self._give_page()
        written.set()

    def _unsubscribe(self, sub_id: int) -> None:
        subscription = self.subscriptions.pop(sub_id, None)
        if subscription is None:
            return
        self.rules.subscribers.remove(subscription.box, subscription.wake)
        self.rules.subscriptions.give(self.source)
        self.metrics.subscriptions.dec()
        if subscription.pump is not None:
            subscription.pump.cancel()

    def _end_subscriptions(self) -> None:
        for sub_id in list(self.subscriptions):
            self._unsubscribe(sub_id)


class MailboxSessionService(MailboxService):
    """The Mailbox service with sessions (the storage node serves this one)."""

    session_rules: SessionRules | None = None  # set by the node once its metrics exist

    # A coroutine writing with ``context.write``, not the generator the stubs type: a write
    # can then time out (a client that never reads), which a generator's yield cannot.
    async def Session(  # type: ignore[override]  # noqa: N802
        self, requests: AsyncIterator[mailbox_pb2.SessionRequest], context: Ctx
    ) -> None:
        if self.session_rules is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "session: not ready")
            return
        await MailboxSession(self.session_rules, context).run(requests)
