"""Signed records over gRPC: the Overlay service (server side) and its client.

Records carry ML-DSA keys and signatures (several KB), too big for a datagram,
so find-value and store ride gRPC; routing stays on UDP. Errors leave as gRPC
statuses carrying the ProtocolError's reason. Both also ride record sessions (one
stream per client and node, `records_session`), served by the same code; the client
uses them, and the unary calls for nodes that serve none.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from dna_core.crypto.records import VerifiedRecord, open_record
from dna_core.errors import (
    ClosedError,
    MalformedError,
    ProtocolError,
    RemoteError,
    UnavailableError,
)
from dna_core.ops.answers import large_answer
from dna_core.overlay.aio.records_session import (
    SESSIONS,
    SESSIONS_PER_SOURCE,
    OverlaySession,
    RecordSession,
    RecordSessionMetrics,
    request_status,
)
from dna_core.overlay.aio.records_session import STALL_S as SESSION_STALL_S
from dna_core.overlay.aio.records_session import WINDOW as SESSION_WINDOW
from dna_core.overlay.codec import contact_from_proto, contact_to_proto
from dna_core.overlay.contact import Contact
from dna_core.overlay.records import (
    DEFAULT_IDENTITY_POW_BITS,
    DEFAULT_NAME_POW_BITS,
    Gone,
    RecordStore,
    StoreResult,
    Verdict,
    check_policy,
    judge_answers,
)
from dna_core.ratelimit import RateLimited, RateLimiter, SiteTier, grpc_peer_ip, source_key
from dna_core.rpc_errors import call
from dna_core.rpc_session import NoSession, SessionPool, status_error
from dna_core.rpc_session_server import SourceCaps
from dna_core.wire import encode_message
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc

# Large enough for a fetch page of envelopes (each up to 256 KiB); pages are cut by bytes.
MAX_GRPC_MESSAGE = 4 * 1024 * 1024
MAX_CHANNELS = 256  # open channels per node; the least recently used is closed first
CLOSE_GRACE_S = 5.0  # calls still on an evicted channel get this long to finish
MAX_RECONNECT_BACKOFF_MS = 2_000  # a failed channel tries its node again this often, at most
KEY_SIZE = 32
Clock = Callable[[], int]
Ctx = grpc.aio.ServicerContext[Any, Any]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def abort_with(context: Ctx, exc: ProtocolError) -> None:
    code = getattr(grpc.StatusCode, exc.grpc_code)
    await context.abort(code, exc.reason)


# Stores per source address: a burst, then a steady rate (`[records]` in the node config).
# A person publishes 2 records per node a few times a day; a node republishing what it
# holds sends the same bytes again, which `RecordStore.holds` lets through uncharged.
DEFAULT_SOURCE_RATE_PER_S = 1.0
DEFAULT_SOURCE_BURST = 30.0
DEFAULT_SOURCE_MAX_KEYS = 65_536


class RecordJournal(Protocol):
    """Where a node keeps its records across restarts (`record_file.RecordFile`)."""

    def save(
        self, raw: bytes, key: bytes, source: str, expires_ms: int,
        evicted: Sequence[tuple[bytes, Gone]] = (),
    ) -> None:  # fmt: skip
        """Write a record about to be held and delete the evicted ones, all or nothing;
        a ProtocolError (nothing written) refuses the store."""


class OverlayService(overlay_pb2_grpc.OverlayServicer):
    """Answers find-value and store from the node's RecordStore, and gRPC ping/find-node.

    A store is charged to its source address (`dna_core.ratelimit`): one token per record
    that has to be verified; a record already held byte for byte costs nothing."""

    def __init__(
        self,
        *,
        store: RecordStore,
        closest: Callable[[bytes, int], list[Contact]],
        local: Callable[[], Contact],
        k: int = 20,
        clock: Clock = wall_ms,
        used_time: Callable[[], int | None] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
        journal: RecordJournal | None = None,
        on_rejected: Callable[[str], None] = lambda reason: None,
        on_evicted: Callable[[int], None] = lambda count: None,
        registry: CollectorRegistry | None = None,
        session_window: int = SESSION_WINDOW,
        session_stall_s: float = SESSION_STALL_S,
        session_caps: SourceCaps | None = None,
    ) -> None:
        self.store, self.closest, self.local, self.k = store, closest, local, k
        self.clock, self.monotonic, self.journal = clock, monotonic, journal
        # The latest time the node's upkeep deleted expired records against (its
        # ExpiryClock's high_ms; None: not yet): what stores are judged by besides the wall.
        self.used_time = used_time
        if limiter is None:
            limiter = RateLimiter(
                DEFAULT_SOURCE_RATE_PER_S,
                DEFAULT_SOURCE_BURST,
                DEFAULT_SOURCE_MAX_KEYS,
                site=SiteTier(),
            )
        self.limiter = limiter
        self.on_rejected, self.on_evicted = on_rejected, on_evicted
        self.session_metrics = RecordSessionMetrics(registry or CollectorRegistry())
        self.session_window, self.session_stall_s = session_window, session_stall_s
        self.session_caps = session_caps or SourceCaps(
            "record session", SESSIONS_PER_SOURCE, SESSIONS
        )
        self.sessions: set[RecordSession] = set()  # open now (what each holds: its queue)

    async def Ping(  # noqa: N802 (gRPC method names)
        self,
        request: overlay_pb2.OverlayPingRequest,
        context: Ctx,
    ) -> overlay_pb2.OverlayPingResponse:
        return overlay_pb2.OverlayPingResponse(responder=contact_to_proto(self.local()))

    async def FindNode(  # noqa: N802
        self,
        request: overlay_pb2.OverlayFindNodeRequest,
        context: Ctx,
    ) -> overlay_pb2.OverlayFindNodeResponse:
        if len(request.target) != KEY_SIZE:
            await self._refuse(context, MalformedError("find-node: target is not 32 bytes"))
        closer = self.closest(request.target, self.k)
        return overlay_pb2.OverlayFindNodeResponse(closer=[contact_to_proto(c) for c in closer])

    @large_answer
    async def FindValue(  # noqa: N802
        self,
        request: overlay_pb2.FindValueRequest,
        context: Ctx,
    ) -> overlay_pb2.FindValueResponse:
        try:
            return self.find_value_one(request)
        except ProtocolError as exc:
            await self._refuse(context, exc)
            raise AssertionError("abort returned") from None  # grpc's abort always raises

    async def Store(  # noqa: N802
        self, request: overlay_pb2.StoreRequest, context: Ctx
    ) -> overlay_pb2.StoreResponse:
        try:
            return self.store_one(request, source_key(grpc_peer_ip(context.peer() or "")))
        except ProtocolError as exc:
            await self._refuse(context, exc)
            raise AssertionError("abort returned") from None

    async def Session(  # type: ignore[override]  # noqa: N802
        self, requests: AsyncIterator[overlay_pb2.OverlaySessionRequest], context: Ctx
    ) -> None:
        """Many stores and find-values on one stream (`records_session`). A coroutine
        writing with ``context.write``, not the generator the stubs type: a write can then
        time out (a client that never reads), which a generator's yield cannot."""
        source = source_key(grpc_peer_ip(context.peer() or ""))
        session = RecordSession(
            self._answer, context, self.session_metrics, source=source,
            window=self.session_window, stall_s=self.session_stall_s, caps=self.session_caps,
        )  # fmt: skip
        self.sessions.add(session)
        try:
            await session.run(requests)
        finally:
            self.sessions.discard(session)

    def _answer(
        self, request: overlay_pb2.OverlaySessionRequest, source: str
    ) -> overlay_pb2.OverlaySessionResponse:
        """One session request, judged as its unary call; a refusal is its status."""
        op = request.WhichOneof("op")
        try:
            if op == "store":
                return overlay_pb2.OverlaySessionResponse(
                    store=self.store_one(request.store, source)
                )
            if op == "find_value":
                return overlay_pb2.OverlaySessionResponse(
                    find_value=self.find_value_one(request.find_value)
                )
            raise MalformedError("session: a request with no operation")
        except ProtocolError as exc:
            self.on_rejected(f"record_{type(exc).__name__}")
            return overlay_pb2.OverlaySessionResponse(error=request_status(exc))

    def find_value_one(
        self, request: overlay_pb2.FindValueRequest
    ) -> overlay_pb2.FindValueResponse:
        """A find-value's answer (unary or on a session); `ProtocolError` to refuse it."""
        if len(request.key) != KEY_SIZE:
            raise MalformedError("find-value: key is not 32 bytes")
        response = overlay_pb2.FindValueResponse()
        held = self.store.get(request.key, self.clock())
        if held is not None and request.kind in (0, held.body.kind):
            response.records.append(common_pb2.SignedRecord.FromString(held.raw))
        else:
            response.closer.extend(contact_to_proto(c) for c in self.closest(request.key, self.k))
        return response

    def store_one(
        self, request: overlay_pb2.StoreRequest, source: str
    ) -> overlay_pb2.StoreResponse:
        """A store's answer from ``source`` (unary or on a session); `ProtocolError` to
        refuse it."""
        result = self._store(encode_message(request.record), source, self.clock())
        return overlay_pb2.StoreResponse(stored_seq=result.seq)

    def _store(self, raw: bytes, source: str, now_ms: int) -> StoreResult:
        fellow = functools.partial(self._fellow_holder, source=source)
        repeated = self.store.repeat(raw, now_ms, fellow, source)
        if repeated is not None:
            return repeated
        now = self.monotonic()
        wait = self.limiter.check(source, now)
        if wait > 0:
            who, rate, burst = self.limiter.budget(self.limiter.refusal(source, now)[1])
            raise RateLimited(
                f"record store: {who} over {rate:g} records/s (burst {burst:g}); "
                f"retry after {wait:.1f} s",
                wait,
            )
        verify_at, expired_by = self._judged_at(now_ms)
        result = self.store.judge(raw, verify_at, source, expiry_ms=expired_by)
        if self.journal is not None and result.record is not None:
            # Written before the store holds it: a write that fails refuses the store and
            # changes nothing. Held first, a restart after a failed write served the older
            # row still in the file, a version older than the one acknowledged.
            evicted = [(key, self.store.goes(key)) for key in result.evicted]
            body = result.record.body
            self.journal.save(raw, body.key, source, body.expires_ms, evicted)
        self.store.commit(result, verify_at, source)
        if result.evicted:
            self.on_evicted(len(result.evicted))
        return result

    def _judged_at(self, wall: int) -> tuple[int, int]:
        """(the time a stored record is verified at, the time what is held has expired
        by), as the load at start judges (`OverlayServer._open_records`). A held record
        stands against replacement until upkeep, which follows a forward step of the wall
        clock at most twice as fast as time passes, has deleted it: judged by a wall clock
        stepped forward, any valid record replaced one the step hid, an older one of its
        signer (a rollback) or another identity's claim of its name. And a record is
        verified at the latest time the node has used: with the clock set back, every
        fresh record was "created in the future" and refused until it was set right."""
        used = self.used_time()
        if used is None:
            return wall, wall
        return max(wall, used), min(wall, used)

    def _fellow_holder(self, key: bytes, source: str) -> bool:
        """Whether ``source`` is the address of one of the k nodes we know closest to
        ``key`` (a node that holds it too, republishing): only its store of bytes we hold
        may count as our republish (`RecordStore.repeat`)."""
        return any(source_key(c.endpoint.ip) == source for c in self.closest(key, self.k))

    async def _refuse(self, context: Ctx, exc: ProtocolError) -> None:
        self.on_rejected(f"record_{type(exc).__name__}")
        await abort_with(context, exc)


class ChannelPool:
    """One gRPC channel per target, reused (a new channel costs a TCP+HTTP/2 handshake),
    at most ``size`` of them: the least recently used is closed (calls still on it get
    ``CLOSE_GRACE_S`` to finish), so a long-lived client that meets thousands of nodes
    does not keep a connection to each.

    `reset` drops every channel and the pool stays in use; `close` ends it for good: a
    channel a later `get` opened would stay open, since nothing closes the pool again, so
    such a `get` raises `ClosedError` instead."""

    def __init__(self, size: int = MAX_CHANNELS) -> None:
        self.size = size
        self.closed = False
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, target: str) -> grpc.aio.Channel:
        if self.closed:
            raise ClosedError("channel pool: used after its close (no channel opened)")
        channel = self._channels.get(target)
        if channel is not None:
            self._channels.move_to_end(target)
            return channel
        channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
                # gRPC's default backoff grows to 120 s, and a fail-fast call during it is
                # refused without trying: a node back from a restart would be unreachable
                # for up to two minutes through a channel that had failed.
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
                # Without this, every channel of the process to one target shares a
                # connection (gRPC's global subchannel pool), backoff included: a new
                # channel to a node back from a restart, or a discarded one's successor,
                # would fail fast just like the channel that saw the node go down.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self._channels[target] = channel
        while len(self._channels) > self.size:
            _, oldest = self._channels.popitem(last=False)
            self._close_later(oldest)
        return channel

    def discard(self, target: str) -> None:
        """Close ``target``'s channel (calls on it get ``CLOSE_GRACE_S``); the next `get`
        makes a fresh one, which connects at once instead of waiting out the old one's
        reconnect backoff (a node back from a restart answers right away)."""
        channel = self._channels.pop(target, None)
        if channel is not None:
            self._close_later(channel)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        """Close ``channel`` in the background; calls on it get ``CLOSE_GRACE_S``."""
        task = asyncio.get_running_loop().create_task(channel.close(grace=CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def reset(self) -> None:
        """Close every channel now (calls on them fail) and stay usable: the next `get`
        of a target opens a fresh channel, out of any reconnect backoff the old one was
        in."""
        channels, self._channels = list(self._channels.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in channels), *self._closing)

    async def close(self) -> None:
        """Close every channel; the pool is closed for good (`get` raises `ClosedError`)."""
        self.closed = True
        await self.reset()


class RecordClient:
    """Store and fetch signed records on the nodes a lookup found.

    Each store and find-value goes over the record session to its node (`OverlaySession`,
    one per node, opened on first use over the channel pool), or as the unary call when
    the node serves no sessions (an older node) or its session broke other than by a
    deadline (the unary call then gets its own chance; a deadline is not tried twice)."""

    def __init__(
        self,
        pool: ChannelPool,
        *,
        puzzle_bits: int,
        name_pow_bits: int = DEFAULT_NAME_POW_BITS,
        identity_pow_bits: int = DEFAULT_IDENTITY_POW_BITS,
        timeout: float = 3.0,
        clock: Clock = wall_ms,
        sessions: bool = True,
    ) -> None:
        self.pool, self.puzzle_bits, self.timeout, self.clock = pool, puzzle_bits, timeout, clock
        self.name_pow_bits, self.identity_pow_bits = name_pow_bits, identity_pow_bits
        self.sessions: SessionPool[OverlaySession] | None = None
        if sessions:
            self.sessions = SessionPool(
                pool.get, timeout, pool.discard,
                make=lambda channel, t: OverlaySession(channel, t, open_timeout=t),
                max_sessions=pool.size,  # a session lives on its channel: as many
            )  # fmt: skip
        self.unary_calls = 0  # requests that went as unary calls (no session to the node)
        self.closed = False  # after `close`, store and find-value raise ClosedError at once

    def _stub(self, contact: Contact) -> overlay_pb2_grpc.OverlayAsyncStub:
        return overlay_pb2_grpc.OverlayStub(self.pool.get(contact.endpoint.grpc_target))

    async def _ask(self, contact: Contact, op: str, request: Message) -> Any:
        """``request`` (the unary message of ``op``: "store", "find_value") to ``contact``,
        on its session if it has one: the answer, or the unary call's `RemoteError`."""
        self._check_open()  # a request racing the close: not the unary call instead
        target = contact.endpoint.grpc_target
        if self.sessions is not None:
            try:
                response = await self.sessions.call(target, lambda s: s.exchange({op: request}))
            except NoSession:
                pass
            except UnavailableError as err:
                if err.grpc_code == "DEADLINE_EXCEEDED":
                    raise
            else:
                if response.HasField("error"):
                    raise status_error(response.error)
                return getattr(response, op)
        self.unary_calls += 1
        stub = self._stub(contact)
        if isinstance(request, overlay_pb2.StoreRequest):
            return await call(stub.Store(request, timeout=self.timeout))
        assert isinstance(request, overlay_pb2.FindValueRequest)
        return await call(stub.FindValue(request, timeout=self.timeout))

    async def close(self) -> None:
        """End the record sessions; the client is closed for good (`ClosedError`)."""
        self.closed = True
        if self.sessions is not None:
            await self.sessions.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("record client: used after its close")

    async def store(self, record: bytes, replicas: Sequence[Contact]) -> int:
        """Send ``record`` to every replica; returns how many accepted it."""
        self._check_open()
        msg = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(record))
        results = await asyncio.gather(
            *(self._ask(c, "store", msg) for c in replicas), return_exceptions=True
        )
        return sum(isinstance(r, overlay_pb2.StoreResponse) for r in results)

    async def find_value(self, key: bytes, holders: Sequence[Contact]) -> VerifiedRecord | None:
        """Ask ``holders`` in parallel; verify every answer and keep the one to believe
        (`judge`). None: those that answered hold no valid record. `UnavailableError`
        when none answered (or there was none to ask): "not published" and "nobody could
        say" are different answers, and a reader that took the second for the first
        refused an honest sender's message. `ContestedError` when as many answered with
        one signer's record as with another's (a name: `Verdict.tied`)."""
        return (await self.judge(key, holders)).believed(key)

    async def judge(self, key: bytes, holders: Sequence[Contact]) -> Verdict:
        """`find_value`, saying too whether the holders disagreed on whose record it is
        (`records.judge_answers`)."""
        self._check_open()
        msg = overlay_pb2.FindValueRequest(key=key)
        answers = await asyncio.gather(
            *(self._ask(c, "find_value", msg) for c in holders), return_exceptions=True
        )
        if not any(isinstance(a, overlay_pb2.FindValueResponse) for a in answers):
            raise UnavailableError(
                "UNAVAILABLE", f"find-value: none of the {len(holders)} nodes asked answered"
            )
        # Holders mostly return the same bytes: verify them once.
        verified: dict[bytes, VerifiedRecord | None] = {}
        per_holder = []
        for answer in answers:
            if not isinstance(answer, overlay_pb2.FindValueResponse):
                continue
            held = []
            for rec in answer.records[:4]:
                raw = encode_message(rec)
                if raw not in verified:
                    verified[raw] = self._verify(raw, key)
                if (good := verified[raw]) is not None:
                    held.append(good)
            per_holder.append(held)
        return judge_answers(per_holder)

    def _verify(self, raw: bytes, key: bytes) -> VerifiedRecord | None:
        """The record if an honest node could hold it at ``key`` (signature, size, expiry
        and the store's per-record rules), else None: a node served a bad record, and
        others may be honest."""
        try:
            rec = open_record(raw, now_ms=self.clock(), key=key)
            check_policy(rec, name_pow_bits=self.name_pow_bits,
                         identity_pow_bits=self.identity_pow_bits)  # fmt: skip
        except ProtocolError:
            return None
        return rec

    async def ping(self, contact: Contact) -> Contact | None:
        self._check_open()
        try:
            resp = await call(
                self._stub(contact).Ping(overlay_pb2.OverlayPingRequest(), timeout=self.timeout)
            )
            return contact_from_proto(resp.responder, self.puzzle_bits)
        except (RemoteError, ProtocolError):
            return None
