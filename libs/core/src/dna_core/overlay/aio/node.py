"""An overlay node on asyncio: a UDP socket for routing, gRPC for records.

This is the thin I/O shell around the sans-I/O cores: it feeds datagrams to
the codec and the Responder, matches responses through the RequestTracker,
drives lookup iterators with real timers, runs the liveness checks the
routing table asks for, and refreshes buckets. Peers run it in client mode:
they query but never answer, so they never enter anyone's routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from dna_core.crypto.node import NodeIdentity, verify_node_signature
from dna_core.crypto.records import VerifiedRecord
from dna_core.errors import ProtocolError
from dna_core.overlay.codec import (
    CHALLENGE_BYTES,
    Body,
    ContactCache,
    Datagram,
    FindNode,
    Nodes,
    Ping,
    Pong,
    TokenReply,
    decode_datagram,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.kbucket import Observed, RoutingTable
from dna_core.overlay.lookup import ClosestPeersIter, DisjointLookup, Finished, Query
from dna_core.overlay.protocol import (
    PONG_DOMAIN,
    Addr,
    Pending,
    RequestTracker,
    Responder,
    proven_contact,
    request_datagram,
)
from dna_core.overlay.records import (
    DEFAULT_IDENTITY_POW_BITS,
    DEFAULT_NAME_POW_BITS,
    RecordStore,
)
from dna_core.overlay.rtt import RttEstimator
from dna_core.overlay.tokens import AddressTokens
from dna_core.wire.gen.dna.v1 import common_pb2

from .metrics import OverlayMetrics
from .records_rpc import ChannelPool, RecordClient

log = logging.getLogger("dna.overlay")
TOKEN_CACHE_SIZE = 4096
SUSPECT_SECONDS = 10.0  # a node that just failed us is not asked again for this long
SUSPECT_CACHE_SIZE = 4096
PROVEN_KEYS_SIZE = 8192  # node ID -> the address it proved its key from
MAX_KEY_PROOFS = 256  # challenges in flight at once; beyond, senders wait for the next time


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    udp_port: int = 0
    grpc_port: int = 0
    role: int = common_pb2.NODE_ROLE_BOOTSTRAP
    puzzle_bits: int = 8
    k: int = 20
    alpha: int = 3
    allow_loopback: bool = False  # local testnets: loopback peers skip the /24 limit
    client_mode: bool = False
    refresh_interval: float = 600.0
    request_timeout: float = 2.0  # hard limit per datagram request
    rpc_timeout: float = 3.0  # gRPC deadline
    # The OS default (~208 KB, ~90 full answers) overflows when a busy node has dozens of
    # lookups in flight; drops become timeouts, then suspects. The kernel caps it at
    # net.core.rmem_max. 0 keeps the OS default.
    udp_rcvbuf: int = 4 << 20
    fast_holders: int = 2  # get_record asks this many known closest nodes before a lookup
    name_pow_bits: int = DEFAULT_NAME_POW_BITS  # readers check name claims as stores do
    identity_pow_bits: int = DEFAULT_IDENTITY_POW_BITS  # and identity records' proofs


@dataclass
class _Inflight:
    pending: Pending
    future: asyncio.Future[Datagram]
    timer: asyncio.TimerHandle | None = field(default=None)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Addr], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._on_datagram(data, (str(addr[0]), addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: the timeout handles it
        log.debug("udp error: %s", exc)


class OverlayNode:
    def __init__(
        self,
        identity: NodeIdentity,
        config: NodeConfig,
        *,
        store: RecordStore | None = None,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.identity, self.config = identity, config
        self.node_id = identity.node_id
        self.rng = rng or random.Random()
        self.table = RoutingTable(self.node_id, k=config.k, allow_loopback=config.allow_loopback)
        self.store = store
        self.tracker = RequestTracker(self.rng)
        self.tokens = AddressTokens(os.urandom(32))
        self.contacts = ContactCache()
        self.rtt = RttEstimator(ceiling=config.request_timeout)
        self.metrics = OverlayMetrics(registry or CollectorRegistry(), lambda: len(self.table))
        self.contact: Contact | None = None
        self.responder: Responder | None = None
        self._token_cache: OrderedDict[Addr, bytes] = OrderedDict()
        # Other nodes keep dead contacts until their own checks run; without this memory every
        # lookup would rediscover them from responses and wait out their timeouts again.
        self._suspects: OrderedDict[bytes, float] = OrderedDict()
        self._proven_keys: OrderedDict[bytes, Addr] = OrderedDict()
        self._proving: set[tuple[bytes, Addr]] = set()
        self._inflight: dict[tuple[int, Addr], _Inflight] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.channels = ChannelPool()
        self.records = RecordClient(
            self.channels, puzzle_bits=config.puzzle_bits, timeout=config.rpc_timeout,
            name_pow_bits=config.name_pow_bits, identity_pow_bits=config.identity_pow_bits,
        )  # fmt: skip

    # -- lifecycle ------------------------------------------------------------

    async def start(self, grpc_port: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self._on_datagram),
            local_addr=(self.config.host, self.config.udp_port),
        )
        self._transport = transport
        if self.config.udp_rcvbuf > 0:
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.udp_rcvbuf)
        udp_port = transport.get_extra_info("sockname")[1]
        endpoint = Endpoint(self.config.host, udp_port, grpc_port or self.config.grpc_port)
        self.contact = Contact(
            self.node_id, self.identity.public_key, (endpoint,), self.config.role
        )
        local = None if self.config.client_mode else self.contact
        self.responder = Responder(
            local=local, table=self.table, tokens=self.tokens, k=self.config.k,
            cache=self.contacts, sign=lambda challenge: self.identity.sign(PONG_DOMAIN, challenge),
            key_proven=self._key_proven,
        )  # fmt: skip

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for inflight in self._inflight.values():
            if inflight.timer:
                inflight.timer.cancel()
            if not inflight.future.done():
                inflight.future.cancel()
        self._inflight.clear()
        if self._transport is not None:
            self._transport.close()
        await self.channels.close()

    @property
    def udp_addr(self) -> Addr:
        assert self.contact is not None, "node not started"
        return self.contact.endpoint.udp

    def spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- datagram I/O ---------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        now = time.monotonic()
        try:
            dgram = decode_datagram(data, puzzle_bits=self.config.puzzle_bits, cache=self.contacts)
        except ProtocolError as exc:
            self.metrics.rejected.labels(reason=f"datagram_{type(exc).__name__}").inc()
            log.debug("refused datagram from %s: %s", addr, exc.reason)
            return
        if dgram.is_request:
            self._answer(dgram, addr, len(data), now)
        else:
            self._on_response(dgram, addr, now)

    def _answer(self, dgram: Datagram, addr: Addr, size: int, now: float) -> None:
        assert self.responder is not None and self._transport is not None
        answer = self.responder.answer(dgram, addr, size, now)
        if answer.observed is not None and dgram.sender is not None:
            self._suspects.pop(dgram.sender.node_id, None)  # it is back: it just spoke
        method = type(dgram.body).__name__.lower()
        self.metrics.rpcs.labels(direction="in", method=method, outcome=answer.outcome).inc()
        if answer.reply is not None:
            self._transport.sendto(answer.reply, addr)
        self._follow_up(answer.observed)

    def _on_response(self, dgram: Datagram, addr: Addr, now: float) -> None:
        pending = self.tracker.match(dgram, addr)
        inflight = self._inflight.pop((dgram.request_id, addr), None)
        if pending is None or inflight is None:
            self.metrics.rejected.labels(reason="unsolicited_response").inc()
            return
        if inflight.timer:
            inflight.timer.cancel()
        self.rtt.sample(now - pending.sent_at)
        if dgram.token:
            self._remember_token(addr, dgram.token)
        sender = dgram.sender
        contact = proven_contact(sender, addr) if sender is not None else None
        if contact is not None:
            self._suspects.pop(contact.node_id, None)
            answers_challenge = isinstance(dgram.body, Pong) and dgram.body.proof
            if not answers_challenge and self._key_proven(contact, addr):
                self._observe(contact)  # (a challenge's answer is judged by `ping`)
        if not inflight.future.done():
            inflight.future.set_result(dgram)

    def _remember_token(self, addr: Addr, token: bytes) -> None:
        self._token_cache[addr] = token
        self._token_cache.move_to_end(addr)
        while len(self._token_cache) > TOKEN_CACHE_SIZE:
            self._token_cache.popitem(last=False)

    def _observe(self, contact: Contact) -> None:
        """Into the routing table (clients too: they route through what answered them);
        a full bucket's oldest contact gets its liveness check, or the bucket would wait
        for it forever."""
        self._follow_up(self.table.observe(contact, time.monotonic()))

    def _key_proven(self, contact: Contact, addr: Addr) -> bool:
        """Whether ``contact`` proved its node key from ``addr``; if not, challenge it
        (once at a time): `ping` observes it when it answers."""
        if self._proven_keys.get(contact.node_id) == addr:
            self._proven_keys.move_to_end(contact.node_id)
            return True
        key = (contact.node_id, addr)
        if key not in self._proving and len(self._proving) < MAX_KEY_PROOFS:
            self._proving.add(key)
            task = self.spawn(self.ping(addr))
            task.add_done_callback(lambda _: self._proving.discard(key))
        return False

    def _follow_up(self, observed: Observed | None) -> None:
        if observed is not None and observed.check is not None:
            self.spawn(self._liveness_check(observed.check))

    async def _liveness_check(self, contact: Contact) -> None:
        alive = await self.ping(contact.endpoint.udp) is not None
        self.table.on_check_result(contact.node_id, alive, time.monotonic())

    async def request(
        self, addr: Addr, body: Body, *, node_id: bytes | None = None, timeout: float | None = None
    ) -> Datagram:
        """Send a request and await its response; retries once with a token when asked."""
        for _ in range(2):
            dgram = await self._request_once(addr, body, node_id, timeout)
            if not isinstance(dgram.body, TokenReply):
                return dgram
        raise ProtocolError(f"{addr} keeps asking for an address token")

    async def _request_once(
        self, addr: Addr, body: Body, node_id: bytes | None, timeout: float | None
    ) -> Datagram:
        assert self._transport is not None, "node not started"
        loop = asyncio.get_running_loop()
        timeout = timeout or self.config.request_timeout
        pending = self.tracker.start(addr, body, time.monotonic(), timeout, node_id)
        sender = None if self.config.client_mode else self.contact
        data = request_datagram(pending, sender, self._token_cache.get(addr), self.contacts)
        key = (pending.request_id, addr)
        inflight = _Inflight(pending, loop.create_future())
        inflight.timer = loop.call_later(timeout, self._timed_out, key)
        self._inflight[key] = inflight
        self._transport.sendto(data, addr)
        method = type(body).__name__.lower()
        try:
            result = await inflight.future
        except TimeoutError:
            self.metrics.rpcs.labels(direction="out", method=method, outcome="timeout").inc()
            raise
        self.metrics.rpcs.labels(direction="out", method=method, outcome="ok").inc()
        return result

    def _timed_out(self, key: tuple[int, Addr]) -> None:
        inflight = self._inflight.pop(key, None)
        if inflight is None:
            return
        self.tracker.forget(inflight.pending)
        if not inflight.future.done():
            inflight.future.set_exception(TimeoutError())

    # -- overlay operations ---------------------------------------------------

    async def ping(self, addr: Addr, timeout: float | None = None) -> Contact | None:
        """The responder's contact once it proved its node key (it signed our challenge)
        and entered the routing table, or None if it did not answer or could not prove."""
        challenge = os.urandom(CHALLENGE_BYTES)
        try:
            dgram = await self.request(addr, Ping(challenge), timeout=timeout)
        except (TimeoutError, ProtocolError):
            return None
        contact = proven_contact(dgram.sender, addr) if dgram.sender is not None else None
        try:
            if contact is None or not isinstance(dgram.body, Pong):
                raise ProtocolError("ping: the answer carries no contact for its address")
            verify_node_signature(contact.public_key, PONG_DOMAIN, challenge, dgram.body.proof)
        except ProtocolError:
            self.metrics.rejected.labels(reason="key_unproven").inc()
            return None
        self._proven_keys[contact.node_id] = addr
        self._proven_keys.move_to_end(contact.node_id)
        while len(self._proven_keys) > PROVEN_KEYS_SIZE:
            self._proven_keys.popitem(last=False)
        self._observe(contact)
        return contact

    async def join(self, bootstraps: Iterable[Addr]) -> int:
        """Enter the overlay through ``bootstraps``; returns the routing table size."""
        answers = await asyncio.gather(*(self.ping(addr) for addr in bootstraps))
        if not any(answers):
            return 0
        await self.find_node(self.node_id)
        return len(self.table)

    async def find_node(self, target: bytes, *, paths: int = 1) -> list[Contact]:
        """Iterative lookup of the k closest nodes to ``target``."""
        started = time.monotonic()
        seeds = self._trusted(self.table.closest(target, self.config.k * paths))
        it: ClosestPeersIter | DisjointLookup
        if paths > 1:
            it = DisjointLookup(
                target, seeds, paths=paths, k=self.config.k, alpha=self.config.alpha,
                timeout=self.rtt.timeout, local_id=self.node_id,
            )  # fmt: skip
        else:
            it = ClosestPeersIter(
                target, seeds, k=self.config.k, alpha=self.config.alpha,
                timeout=self.rtt.timeout, local_id=self.node_id,
            )  # fmt: skip
        wake = asyncio.Event()
        queries: list[asyncio.Task[object]] = []
        while True:
            it.timeout = self.rtt.timeout
            step = it.next(time.monotonic())
            if isinstance(step, Query):
                queries.append(self.spawn(self._query_peer(it, step, target, wake)))
                continue
            if isinstance(step, Finished):
                break
            wake.clear()
            delay = None if step.until is None else max(0.0, step.until - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
        late = [q for q in queries if not q.done()]
        if late and len(it.result()) < self.config.k:
            # The iterator gave up on peers past their adaptive deadline but their requests
            # are still open: under load that deadline is often just too short, and a put
            # would land on 3 replicas instead of k. One more timeout for them (a late
            # answer still counts: on_response accepts unresponsive peers).
            await asyncio.wait(late, timeout=self.rtt.timeout)
        self.table.mark_refreshed(target, time.monotonic())
        self.metrics.lookup_seconds.observe(time.monotonic() - started)
        return it.result()

    async def _query_peer(
        self,
        it: ClosestPeersIter | DisjointLookup,
        query: Query,
        target: bytes,
        wake: asyncio.Event,
    ) -> None:
        peer = query.contact
        try:
            dgram = await self.request(peer.endpoint.udp, FindNode(target), node_id=peer.node_id)
        except (TimeoutError, ProtocolError):
            it.on_failure(peer.node_id)
            self._suspect(peer.node_id)
        else:
            if isinstance(dgram.body, Nodes):
                closer = [c for c in dgram.body.closer if c.node_id != self.node_id]
                it.on_response(peer.node_id, self._trusted(closer))
            else:
                it.on_failure(peer.node_id)
        wake.set()

    async def put_record(self, record: bytes, key: bytes) -> int:
        """Store a signed record on the k nodes closest to its key; returns acceptances."""
        return await self.records.store(record, await self.find_node(key))

    async def get_record(self, key: bytes, *, holders: int = 5) -> VerifiedRecord | None:
        """The best verified record for ``key``.

        First from the ``fast_holders`` closest nodes this node already knows: with k
        replicas they usually hold it, and asking them costs no lookup (OpenDHT and
        the kademlia package also stop at the first holder). Only when none of them
        answers with a valid record are the k closest looked up and ``holders`` asked.
        """
        known = self._trusted(self.table.closest(key, self.config.fast_holders))
        if known:
            found = await self.records.find_value(key, known)
            if found is not None:
                return found
        closest = await self.find_node(key)
        return await self.records.find_value(key, closest[:holders])

    def _suspect(self, node_id: bytes) -> None:
        now = time.monotonic()
        self.table.on_failure(node_id, now)
        self._suspects[node_id] = now + SUSPECT_SECONDS
        self._suspects.move_to_end(node_id)
        while len(self._suspects) > SUSPECT_CACHE_SIZE:
            self._suspects.popitem(last=False)

    def _trusted(self, contacts: list[Contact]) -> list[Contact]:
        if not self._suspects:
            return contacts
        now = time.monotonic()
        trusted = [c for c in contacts if self._suspects.get(c.node_id, 0.0) <= now]
        # Timeouts from our own overload (a full socket buffer, a busy loop) make everyone
        # suspect at once; asking suspects beats failing every lookup until they clear.
        return trusted if len(trusted) >= min(len(contacts), self.config.alpha) else contacts

    async def refresh(self, interval: float | None = None) -> int:
        """Look up a random ID in every stale bucket; returns how many lookups ran."""
        interval = self.config.refresh_interval if interval is None else interval
        targets = self.table.refresh_targets(time.monotonic(), interval, self.rng)
        await asyncio.gather(*(self.find_node(t) for t in targets))
        return len(targets)

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval * (0.5 + self.rng.random() / 2))
            await self.refresh()
