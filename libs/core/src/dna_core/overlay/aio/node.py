"""An overlay node on asyncio: a UDP socket for routing, gRPC for records.

This is the thin I/O shell around the sans-I/O cores: datagrams go through the codec,
requests to the Responder, responses and timers to the OverlayBehaviour (which matches
them, drives lookups, runs the liveness checks the routing table asks for, proves
contacts' keys and refreshes buckets); the shell carries out what the behaviour asks for
(send, start a timer) and hands the ends of pings and lookups to whoever awaits them.
The simulator (``dna_sim``) drives the same behaviour. Peers run the node in client
mode: they query but never answer, so they never enter anyone's routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from dna_core.crypto.node import NodeIdentity
from dna_core.crypto.records import VerifiedRecord
from dna_core.errors import ProtocolError, UnavailableError
from dna_core.overlay.behaviour import (
    BehaviourConfig,
    Command,
    ContactAdded,
    Lookup,
    LookupDone,
    OverlayBehaviour,
    PingDone,
    PingOp,
    Rejected,
    RequestEnded,
    Send,
    StartTimer,
)
from dna_core.overlay.codec import ContactCache, Datagram, decode_datagram, encode_datagram
from dna_core.overlay.contact import Contact, Endpoint, closest_first, spread_over_subnets
from dna_core.overlay.handoff import Handoff, HandoffQueue, PlanBudget, RecentlyPlanned
from dna_core.overlay.handoff import plan as plan_handoffs
from dna_core.overlay.protocol import PONG_DOMAIN, Addr, Responder
from dna_core.overlay.records import (
    DEFAULT_IDENTITY_POW_BITS,
    DEFAULT_NAME_POW_BITS,
    RecordStore,
    Verdict,
    signers_compete,
)
from dna_core.overlay.tokens import AddressTokens
from dna_core.ratelimit import SITE_TIER, RateLimiter, SiteTier, source_key
from dna_core.tasks import stop_tasks
from dna_core.wire.gen.dna.v1 import common_pb2

from .metrics import OverlayMetrics
from .records_rpc import ChannelPool, RecordClient, wall_ms

log = logging.getLogger("dna.overlay")
HandleT = TypeVar("HandleT", bound=Hashable)
ResultT = TypeVar("ResultT")


# Nodes a record is stored on. 8 (OpenDHT's count) instead of k = 20: `dna-sim
# durability` loses no record over a day of hourly republishes with up to 30% of the
# nodes replaced every hour, at 8 as at 20 (docs/overlay.md, "Replica count"); a put
# costs 8 verifications instead of 20.
RECORD_REPLICAS = 8


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
    record_replicas: int = RECORD_REPLICAS  # put_record stores on this many closest nodes
    republish_interval: float = 3600.0  # store-on-join plans for a newcomer once in this
    name_pow_bits: int = DEFAULT_NAME_POW_BITS  # readers check name claims as stores do
    identity_pow_bits: int = DEFAULT_IDENTITY_POW_BITS  # and identity records' proofs
    record_sessions: bool = True  # stores and find-values on record sessions, else unary
    # Datagrams taken from one source address (IPv6: its /64) before decoding: every
    # request costs a decode, an answer and maybe a signature, and nothing else bounded
    # what one address could make a node spend. A node sends a peer a few a second.
    datagram_rate_per_s: float = 500.0
    datagram_burst: float = 2000.0
    datagram_sources_max: int = 65536  # source addresses remembered by that limiter


@dataclass(frozen=True)
class Closest:
    """A lookup's result: the (up to) k closest nodes that answered, closest first;
    whether they are every node reachable from here (``ClosestPeersIter.exhaustive``); and
    how many nodes it asked that never answered, closer than its last (``missed``)."""

    contacts: list[Contact]
    exhaustive: bool
    missed: int = 0


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
        self.behaviour = OverlayBehaviour(
            self.node_id,
            BehaviourConfig(
                k=config.k, alpha=config.alpha, request_timeout=config.request_timeout,
                allow_loopback=config.allow_loopback,
            ),
            self.rng,
        )  # fmt: skip
        self.table = self.behaviour.table
        self.store = store
        self.tokens = AddressTokens(os.urandom(32))
        self.contacts = ContactCache()
        self.datagram_limit = RateLimiter(
            config.datagram_rate_per_s,
            config.datagram_burst,
            config.datagram_sources_max,
            site=SiteTier(),
        )
        self.metrics = OverlayMetrics(registry or CollectorRegistry(), lambda: len(self.table))
        self.contact: Contact | None = None
        self.responder: Responder | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._timers: dict[int, asyncio.TimerHandle] = {}  # by id() of the behaviour's timer
        self._pings: dict[PingOp, asyncio.Future[Contact | None]] = {}
        self._lookups: dict[Lookup, asyncio.Future[Closest]] = {}
        # Store-on-join: records owed to nodes new to the table, paced (`handoff.py`).
        self.handoffs = HandoffQueue()
        self.handoff_plans = PlanBudget()
        self.handoffs_planned = RecentlyPlanned(config.republish_interval)
        self._handoffs_queued = asyncio.Event()
        self._handoff_sender: asyncio.Task[object] | None = None
        # Closed until this node's own table is filled (`join`'s lookup of its own ID, or
        # a seed's start): before, every contact met is new to it, and a table that sparse
        # makes each look like a replica of every key it holds (a restart would hand its
        # first contacts records they are no replica of).
        self.handoffs_open = False
        self.channels = ChannelPool()
        self.records = RecordClient(
            self.channels, puzzle_bits=config.puzzle_bits, timeout=config.rpc_timeout,
            name_pow_bits=config.name_pow_bits, identity_pow_bits=config.identity_pow_bits,
            sessions=config.record_sessions,
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
        self.behaviour.sender = local
        self.responder = Responder(
            local=local, table=self.table, tokens=self.tokens, k=self.config.k,
            cache=self.contacts, sign=lambda challenge: self.identity.sign(PONG_DOMAIN, challenge),
            observe=self.behaviour.observe_requester,
        )  # fmt: skip

    async def stop(self) -> None:
        await stop_tasks(list(self._tasks))
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for ping in self._pings.values():
            ping.cancel()
        for lookup in self._lookups.values():
            lookup.cancel()
        self._pings.clear()
        self._lookups.clear()
        if self._transport is not None:
            self._transport.close()
        await self.records.close()
        await self.channels.close()

    @property
    def udp_addr(self) -> Addr:
        assert self.contact is not None, "node not started"
        return self.contact.endpoint.udp

    def spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        """Forget the task; log what it raised (nobody awaits a spawned task, and asyncio
        reports an exception never retrieved only when the task is garbage-collected)."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a node task failed", exc_info=exc)

    # -- datagram I/O ---------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        now = time.monotonic()
        source = source_key(addr[0])
        if self.datagram_limit.check(source, now):
            # before any decoding: a flood costs the node a bucket check each
            tier = self.datagram_limit.refusal(source, now)[1]
            reason = "datagram_site_rate" if tier == SITE_TIER else "datagram_rate"
            self.metrics.rejected.labels(reason=reason).inc()
            return
        try:
            dgram = decode_datagram(data, puzzle_bits=self.config.puzzle_bits, cache=self.contacts)
        except ProtocolError as exc:
            self.metrics.rejected.labels(reason=f"datagram_{type(exc).__name__}").inc()
            log.debug("refused datagram from %s: %s", addr, exc.reason)
            return
        if dgram.is_request:
            self._answer(dgram, addr, len(data), now)
        else:
            self.behaviour.on_response(dgram, addr, now)
        self._flush()

    def _answer(self, dgram: Datagram, addr: Addr, size: int, now: float) -> None:
        assert self.responder is not None and self._transport is not None
        answer = self.responder.answer(dgram, addr, size, now)
        method = type(dgram.body).__name__.lower()
        self.metrics.rpcs.labels(direction="in", method=method, outcome=answer.outcome).inc()
        if answer.reply is not None:
            self._transport.sendto(answer.reply, addr)

    # -- the behaviour's commands ---------------------------------------------

    def _flush(self) -> None:
        """Carry out what the behaviour queued."""
        for command in self.behaviour.poll():
            self._carry_out(command)

    def _carry_out(self, command: Command) -> None:
        if isinstance(command, Send):
            assert self._transport is not None, "node not started"
            self._transport.sendto(encode_datagram(command.datagram, self.contacts), command.addr)
        elif isinstance(command, StartTimer):
            delay = max(0.0, command.when - time.monotonic())
            handle = asyncio.get_running_loop().call_later(delay, self._on_timer, command.timer)
            self._timers[id(command.timer)] = handle  # (the handle keeps the timer alive)
        elif isinstance(command, PingDone):
            _resolve(self._pings, command.ping, command.contact)
        elif isinstance(command, LookupDone):
            lookup = command.lookup
            self.metrics.lookup_seconds.observe(lookup.ended - lookup.started)
            found = Closest(lookup.result(), lookup.exhaustive, lookup.missed)
            _resolve(self._lookups, lookup, found)
        elif isinstance(command, ContactAdded):
            self._contact_added(command.contact)
        elif isinstance(command, RequestEnded):
            self.metrics.rpcs.labels(
                direction="out", method=command.method, outcome=command.outcome
            ).inc()
        elif isinstance(command, Rejected):
            self.metrics.rejected.labels(reason=command.reason).inc()

    # -- store-on-join ----------------------------------------------------------

    def _contact_added(self, contact: Contact) -> None:
        """Queue the records ``contact``, new to the table, is now a replica of and this
        node hands it (`handoff.plan`); the queue paces and bounds them."""
        store, local = self.store, self.contact
        if store is None or local is None or self.config.client_mode or not len(store):
            return
        if not self.handoffs_open:
            return
        now = time.monotonic()
        if self.handoffs_planned.recent(contact.node_id, now):
            self.metrics.handoffs.labels(outcome="recent").inc()
            return  # back within an interval of its last plan: the republish brings the rest
        if not self.handoff_plans.allow(now):
            self.metrics.handoffs.labels(outcome="unplanned").inc()
            return
        self.handoffs_planned.planned(contact.node_id, now)
        keys = plan_handoffs(
            local, contact, store.keys(), self.table.closest, k=self.config.k,
            replicas=self.config.record_replicas, loopback_exempt=self.config.allow_loopback,
        )  # fmt: skip
        if not keys:
            return
        dropped = self.handoffs.offer(contact, keys, now)
        if dropped:
            self.metrics.handoffs.labels(outcome="dropped").inc(dropped)
        self._handoffs_queued.set()
        if self._handoff_sender is None or self._handoff_sender.done():
            self._handoff_sender = self.spawn(self._send_handoffs())

    async def _send_handoffs(self) -> None:
        """Send what the queue lets out, until it is empty."""
        while True:
            self._handoffs_queued.clear()
            now = time.monotonic()
            for handoff in self.handoffs.take(now):
                self.spawn(self._hand_off(handoff))
            due = self.handoffs.next_due(now)
            if due is None:
                return
            with contextlib.suppress(TimeoutError):  # (or a newcomer was queued meanwhile)
                async with asyncio.timeout(max(0.0, due - now)):
                    await self._handoffs_queued.wait()

    async def _hand_off(self, handoff: Handoff) -> None:
        """An ordinary store of the record to the newcomer; a refusal (its rate limit, its
        store full) or no answer is counted, not retried: the republish is the backstop."""
        assert self.store is not None
        record = self.store.get(handoff.key, wall_ms())
        if record is None:
            return  # expired or gone meanwhile
        taken = await self.records.store(record.raw, [handoff.newcomer])
        self.metrics.handoffs.labels(outcome="sent" if taken else "refused").inc()

    def _on_timer(self, timer: object) -> None:
        self._timers.pop(id(timer), None)
        self.behaviour.on_timer(timer, time.monotonic())
        self._flush()

    def _awaiting(
        self, waiting: dict[HandleT, asyncio.Future[ResultT]], handle: HandleT
    ) -> asyncio.Future[ResultT]:
        """A future for the end of ``handle``; register it before the next flush, which
        may already carry that end."""
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        waiting[handle] = future
        return future

    # -- overlay operations ---------------------------------------------------

    async def ping(self, addr: Addr, timeout: float | None = None) -> Contact | None:
        """The responder's contact once it proved its node key (it signed our challenge)
        and entered the routing table, or None if it did not answer or could not prove."""
        op = self.behaviour.ping(addr, time.monotonic(), timeout=timeout)
        future = self._awaiting(self._pings, op)
        self._flush()
        return await future

    async def join(self, bootstraps: Iterable[Addr]) -> int:
        """Enter the overlay through ``bootstraps``; returns the routing table size."""
        answers = await asyncio.gather(*(self.ping(addr) for addr in bootstraps))
        if not any(answers):
            return 0
        await self.find_node(self.node_id)
        self.handoffs_open = True
        return len(self.table)

    async def find_node(self, target: bytes, *, paths: int = 1) -> list[Contact]:
        """Iterative lookup of the k closest nodes to ``target``."""
        return (await self.find_closest(target, paths=paths)).contacts

    async def find_closest(self, target: bytes, *, paths: int = 1) -> Closest:
        """``find_node``, saying whether its result holds every node reachable (then it is
        the same for any target: ``ClosestPeersIter.exhaustive``)."""
        lookup = self.behaviour.lookup(target, time.monotonic(), paths=paths)
        future = self._awaiting(self._lookups, lookup)
        self._flush()
        return await future

    async def put_record(self, record: bytes, key: bytes) -> int:
        """Store a signed record on the ``record_replicas`` nodes closest to its key (the
        first of the lookup's k); returns acceptances. A lookup that found fewer while
        nodes it asked never answered (loaded nodes answer past its deadline) is made once
        more and the answers merged, so the record does not land on too few."""
        replicas = self.config.record_replicas
        found = await find_enough(self, key, lambda contacts: len(contacts) >= replicas)
        return await self.records.store(record, self._spread(found.contacts, replicas))

    async def get_record(self, key: bytes, *, holders: int = 5) -> VerifiedRecord | None:
        """The best verified record for ``key``.

        First from the ``fast_holders`` nodes this node already knows closest, of distinct
        subnets (`first_asked`): they usually hold it, and asking them costs no lookup (OpenDHT and
        the kademlia package also stop at the first holder). Only when none of them
        answers with a valid record, or they disagree on whose it is (a name claimed by two
        identities: `records.judge_answers`), or the record is of a kind whose key other
        signers can claim (a name: `records.signers_compete`) and not every fast holder
        answered with its signer, are the k closest looked up and ``holders`` asked.
        None: the holders that answered hold none; `UnavailableError`: none answered;
        `ContestedError`: as many of them answered with one signer's record as with
        another's (a name; no sequence number settles that).
        """
        known = self.first_asked(key)
        if known:
            with contextlib.suppress(UnavailableError):  # the lookup's holders may answer
                verdict = await self.records.judge(key, known)
                if self._believed_fast(verdict):
                    return verdict.best
        closest = await self.find_node(key)
        return await self.records.find_value(key, self._spread(closest, holders))

    def _believed_fast(self, verdict: Verdict) -> bool:
        """Whether the fast holders' verdict stands without a lookup. A name's claim only
        when every one of the ``fast_holders`` answered with its signer: otherwise one
        squatting holder answering alone (the other down, slow, or not holding it yet) was
        believed, uncontested, by every reader that asked it."""
        best = verdict.best
        if best is None or verdict.contested:
            return False
        return not signers_compete(best.body.kind) or verdict.backers >= self.config.fast_holders

    def first_asked(self, key: bytes) -> list[Contact]:
        """The ``fast_holders`` a get asks before any lookup: of the k closest known (not
        suspect), the closest, then the closest of each other subnet. All are holders
        (a put's spread takes the closest of a subnet not yet full), and two of one subnet
        only when no other is known: the spread lets one subnet hold 2 replicas, and the 2 closest
        answering with an older version of the record was a rollback nobody else was
        asked about (IDs cost 8 puzzle bits to grind near a key)."""
        known = self.behaviour.trusted(self.table.closest(key, self.config.k), time.monotonic())
        return spread_over_subnets(
            known, self.config.fast_holders, per_subnet=1,
            loopback_exempt=self.config.allow_loopback,
        )  # fmt: skip

    def _spread(self, contacts: list[Contact], count: int) -> list[Contact]:
        """The ``count`` a record is stored on or asked from: the closest, at most 2 of one
        subnet while others are left (`spread_over_subnets`), as puts and gets agree."""
        return spread_over_subnets(contacts, count, loopback_exempt=self.config.allow_loopback)

    async def refresh(self, interval: float | None = None) -> int:
        """Look up a random ID in every stale bucket; returns how many lookups ran."""
        interval = self.config.refresh_interval if interval is None else interval
        lookups = self.behaviour.refresh(time.monotonic(), interval)
        futures = [self._awaiting(self._lookups, lookup) for lookup in lookups]
        self._flush()
        await asyncio.gather(*futures)
        return len(lookups)

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval * (0.5 + self.rng.random() / 2))
            await self.refresh()


async def find_enough(
    node: OverlayNode, target: bytes, enough: Callable[[list[Contact]], bool]
) -> Closest:
    """``node.find_closest(target)``, made once more when its answer is not ``enough`` while
    nodes it asked never answered (loaded nodes answer past the lookup's adaptive deadline,
    so a lookup can end short in a network that has more): the two answers merged, with
    the second's ``missed``. For a write, which must not land on too few nodes."""
    found = await node.find_closest(target)
    if not found.missed or enough(found.contacts):
        return found
    again = await node.find_closest(target)
    return Closest(closest_first(target, found.contacts, again.contacts), False, again.missed)


def _resolve(
    waiting: dict[HandleT, asyncio.Future[ResultT]], handle: HandleT, result: ResultT
) -> None:
    future = waiting.pop(handle, None)
    if future is not None and not future.done():  # (its awaiter may have been cancelled)
        future.set_result(result)
