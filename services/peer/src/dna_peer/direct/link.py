"""The asyncio adapter of the direct path: aioice agents carrying a `Channel`.

`IceConfig` says which STUN/TURN servers the agents use. A device that is online keeps a
`Listener`: a controlled agent whose credentials and candidates it publishes in its
presence record (sealed to its contacts), together with the credentials a caller must
use. A contact dials it (`dial`): a controlling agent with those credentials, checks
toward the published candidates (and, with TURN, from a relayed candidate), then the
channel handshake over the selected pair. The listener starts its own half of ICE when
the first authenticated check arrives (the caller's address is then a peer-reflexive
candidate), so no answer has to travel back through the network before the path is up.
A listener serves one caller; the device then publishes a fresh one. With TURN on both
sides the caller first sends its candidates through the relays (an offer) and the
listener checks toward them too, which opens a NAT that drops unsolicited packets.

`DirectLink` moves datagrams between the agent and the channel, retransmits a message
with growing gaps until its ACK arrives or the caller's deadline passes, and hands a
received message to the owner before acknowledging it (an ACK means "stored").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.stun
from aioice.candidate import candidate_foundation, candidate_priority
from dna_core.crypto import Identity, PublicKeySet
from dna_core.errors import DnaError
from dna_core.hostport import host_port
from dna_core.interfaces import interface_addresses
from dna_core.tasks import stop_tasks

from dna_peer.direct import candidates
from dna_peer.direct.candidates import loopback_servers
from dna_peer.direct.channel import (
    Channel,
    Closed,
    Delivered,
    Established,
    Pinned,
    Received,
    Refused,
)

log = logging.getLogger("dna.peer.direct")
FIRST_RTO_S = 0.25
MAX_RTO_S = 2.0
REFUSED_KEPT = 8  # reasons a link keeps for its log line (`DirectService`)
RELAY_PROBE_S = 5.0  # a TURN refresh's round trip, retransmissions included
OnReceived = Callable[[PublicKeySet, bytes, bytes], Awaitable[None]]  # (sender, id, payload)


class DirectError(DnaError):
    """The direct path is not there (ICE failed, handshake refused, or a timeout)."""


class NotTaken(DnaError):  # noqa: N818 (an outcome, like RateLimited)
    """The owner does not take a received message now (a contact over its rate): no ACK,
    so the sender falls back to the mailbox; not logged per message (a flood)."""


@dataclass(frozen=True)
class IceConfig:
    stun: tuple[str, int] | None = None
    turn: tuple[str, int] | None = None
    turn_username: str | None = None
    turn_password: str | None = None
    relay_only: bool = False  # tests and the paranoid: only the TURN-relayed candidate
    # Host candidates only on these networks (CIDRs); empty: every usable address.
    # Keeps container bridges, VPNs and management links out of the pairs.
    host_networks: tuple[str, ...] = ()
    # The STUN server's IPv6 address for IPv6 server-reflexive candidates (aioice asks
    # ``stun`` from IPv4 sockets only); None: ``stun`` itself if it is a name with an
    # AAAA record, else none.
    stun6: tuple[str, int] | None = None

    def host_addresses(self) -> list[str]:
        """The addresses host candidates are gathered on (`candidates.select_host_addresses`:
        no loopback, link-local or mapped address; the temporary IPv6 address of a prefix,
        not its stable one), on ``host_networks`` when set."""
        found = interface_addresses()
        inet6: dict[candidates.IPAddress, candidates.Inet6Entry] | None = None
        with contextlib.suppress(OSError), open(candidates.IF_INET6) as table:  # not Linux: none
            inet6 = candidates.parse_if_inet6(table.read())
        chosen = candidates.select_host_addresses(found, inet6)
        if self.host_networks:
            nets = [ipaddress.ip_network(cidr) for cidr in self.host_networks]
            chosen = [a for a in chosen if any(ipaddress.ip_address(a) in n for n in nets)]
        return chosen

    async def gather(
        self, agent: aioice.Connection, *, reflexive6: bool = False,
        addresses: list[str] | None = None,
    ) -> None:  # fmt: skip
        """Gather ``agent``'s candidates on ``addresses`` (default `host_addresses`; aioice's
        `gather_candidates` with our address choice: its own takes every interface
        address), host candidates ranked IPv6 first (RFC 8421). ``reflexive6``: also ask
        the STUN server over IPv6 (the listener; a caller does not wait for it)."""
        if addresses is None:
            addresses = self.host_addresses()
        if self.relay_only:
            addresses = []
        agent._local_candidates_start = True  # aioice's gathering state, kept as it keeps it
        for component in sorted(agent._components):
            agent._local_candidates += await agent.get_component_candidates(
                component=component, addresses=addresses
            )
        if reflexive6 and not self.relay_only:
            agent._local_candidates += await self._reflexive6(agent)
        _rank_hosts(agent._local_candidates)
        agent._local_candidates_end = True

    async def _reflexive6(self, agent: aioice.Connection) -> list[aioice.Candidate]:
        """IPv6 server-reflexive candidates: a Binding from each IPv6 host socket to the STUN
        server's IPv6 address; kept only where the mapping differs from the host address
        (behind NAT66/NPTv6), as RFC 8445 section 5.1.3 drops redundant candidates."""
        server = await self._stun6_address()
        if server is None:
            return []
        hosts = [p for p in agent._protocols  # aioice keeps its sockets private
                 if p.local_candidate is not None and p.local_candidate.type == "host"
                 and ":" in p.local_candidate.host]  # fmt: skip
        found = await asyncio.gather(*(_reflexive(p, server) for p in hosts))
        return [c for c in found if c is not None]

    async def _stun6_address(self) -> tuple[str, int] | None:
        target = self.stun6 or self.stun
        if target is None:
            return None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                target[0], target[1], family=socket.AF_INET6, type=socket.SOCK_DGRAM
            )
        except OSError:  # no AAAA record, or an IPv4 literal
            return None
        return (str(infos[0][4][0]), int(infos[0][4][1])) if infos else None

    def agent_options(self) -> dict[str, Any]:
        """aioice.Connection's keywords for these servers and this policy (both ends)."""
        return dict(
            stun_server=self.stun, turn_server=self.turn, turn_username=self.turn_username,
            turn_password=self.turn_password,
            transport_policy=(aioice.TransportPolicy.RELAY if self.relay_only
                              else aioice.TransportPolicy.ALL),
        )  # fmt: skip

    def agent(self, *, controlling: bool, **credentials: Any) -> aioice.Connection:
        return aioice.Connection(ice_controlling=controlling, **self.agent_options(), **credentials)


REFLEXIVE6_TIMEOUT_S = 1.0  # a STUN server unreachable over IPv6 delays going online this much


async def _reflexive(protocol: Any, server: tuple[str, int]) -> aioice.Candidate | None:
    """The reflexive candidate of one host socket, None if redundant or unanswered."""
    host = protocol.local_candidate
    request = aioice.stun.Message(message_method=aioice.stun.Method.BINDING,
                                  message_class=aioice.stun.Class.REQUEST)  # fmt: skip
    try:
        async with asyncio.timeout(REFLEXIVE6_TIMEOUT_S):
            response, _ = await protocol.request(request, server)
        mapped_host, mapped_port = response.attributes["XOR-MAPPED-ADDRESS"]
    except (TimeoutError, OSError, KeyError, aioice.stun.TransactionError):
        return None
    if ipaddress.ip_address(mapped_host) == ipaddress.ip_address(host.host) and (
        mapped_port == host.port
    ):
        return None
    return aioice.Candidate(
        foundation=candidate_foundation("srflx", "udp", host.host), component=host.component,
        transport="udp", priority=candidate_priority(host.component, "srflx"),
        host=mapped_host, port=mapped_port, type="srflx",
        related_address=host.host, related_port=host.port,
    )  # fmt: skip


def publish_order(gathered: list[aioice.Candidate]) -> list[aioice.Candidate]:
    """See `Listener.candidates`."""
    hosts = sorted((c for c in gathered if c.type == "host"), key=lambda c: -c.priority)
    best = [next(c for c in hosts if (":" in c.host) == v6)
            for v6 in (True, False) if any((":" in c.host) == v6 for c in hosts)]  # fmt: skip
    servers = sorted((c for c in gathered if c.type != "host"), key=lambda c: -c.priority)
    return best + servers + [c for c in hosts if c not in best]


def _rank_hosts(gathered: list[aioice.Candidate]) -> None:
    """Host and server-reflexive candidates get the local preference of their host address
    (`candidates.local_preferences`: IPv6 first, the families interleaved)."""
    prefs = candidates.local_preferences(
        dict.fromkeys(c.host for c in gathered if c.type == "host")
    )
    for c in gathered:
        base = c.host if c.type == "host" else c.related_address
        if c.type in ("host", "srflx") and base in prefs:
            c.priority = candidate_priority(c.component, c.type, prefs[base])


OFFER_TAG = b"DNA-ICE-OFFER1"  # a caller's candidates, sent through the relays first
RELAY_HOLD_S = 1.0  # the caller checks relayed pairs only after this: direct pairs first


OFFER_MAX_BYTES = 1200  # one datagram that needs no IP fragments, TURN headers included


def offer_datagram(candidates: list[aioice.Candidate], listener_pwd: str) -> bytes:
    """The caller's host and reflexive candidates, MACed with the listener's ICE password
    (sealed to its contacts: a stranger cannot make the listener send checks anywhere).
    A caller with many addresses offers the head of `publish_order` that fits."""
    lines = [c.to_sdp() for c in publish_order(candidates)]
    while len(lines) > 1 and len(json.dumps(lines)) > OFFER_MAX_BYTES - len(OFFER_TAG) - 32:
        lines.pop()
    body = json.dumps(lines).encode()
    mac = hmac.new(listener_pwd.encode(), body, hashlib.sha256).digest()
    return OFFER_TAG + mac + body


class _ListeningAgent(aioice.Connection):
    """A controlled agent that notices the first authenticated check from its caller,
    or the caller's offer (its candidates, through the relays)."""

    def __init__(self, on_call: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_call: Callable[[], None] | None = on_call
        self._offer_task: asyncio.Task[None] | None = None

    def request_received(self, message: Any, addr: tuple[str, int], protocol: Any) -> None:
        super().request_received(message, addr, protocol)
        username = message.attributes.get("USERNAME", "")
        if (
            self._on_call is not None
            and username == f"{self.local_username}:{self.remote_username}"
            and message.check_message_integrity(self.local_password.encode())
        ):
            self._called()

    def _called(self) -> None:
        if self._on_call is not None:
            on_call, self._on_call = self._on_call, None
            on_call()

    def data_received(self, data: bytes, component: int) -> None:
        if not data:  # our own permission opener, relayed back to us (see `Listener`)
            return
        if not data.startswith(OFFER_TAG):
            super().data_received(data, component)
            return
        mac, body = data[len(OFFER_TAG) : len(OFFER_TAG) + 32], data[len(OFFER_TAG) + 32 :]
        good = hmac.new(self.local_password.encode(), body, hashlib.sha256).digest()
        if self._offer_task is None and hmac.compare_digest(mac, good):
            self._offer_task = asyncio.create_task(self._take_offer(body))

    async def _take_offer(self, body: bytes) -> None:
        """Check toward the caller's candidates too: our sending opens our NAT for its
        checks (a NAT that filters lets in only replies)."""
        try:
            lines = json.loads(body)
            if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
                raise TypeError("not a list of candidate lines")
            local = loopback_servers(self.stun_server, self.turn_server)
            for candidate in remote_candidates(lines, local):
                await self.add_remote_candidate(candidate)
        except (ValueError, TypeError, DirectError) as exc:
            log.info("a caller's offer was unreadable: %s", exc)
            return
        self._called()


class Listener:
    """A published listening agent (see the module docstring)."""

    def __init__(self, config: IceConfig, on_call: Callable[[Listener], None]) -> None:
        self.config = config
        self.agent = _ListeningAgent(
            lambda: self._called(on_call), ice_controlling=False, **config.agent_options()
        )
        self.called = False  # a caller reached it: the owner answers, then replaces it
        self.addresses: list[str] = []  # what its host candidates were gathered on
        caller = aioice.Connection(ice_controlling=True)  # only to draw random credentials
        self.caller_ufrag, self.caller_pwd = caller.local_username, caller.local_password
        self.agent.remote_username, self.agent.remote_password = self.caller_ufrag, self.caller_pwd

    def _called(self, on_call: Callable[[Listener], None]) -> None:
        self.called = True
        on_call(self)

    async def gather(self) -> None:
        self.addresses = self.config.host_addresses()
        await self.config.gather(self.agent, reflexive6=True, addresses=self.addresses)
        self._open_relay_to_its_server()

    def _open_relay_to_its_server(self) -> None:
        """Let a caller that relays through the same TURN server reach our relayed
        candidate: a permission for the server's own address (TURN permits by IP, so
        every allocation on it). Behind a NAT that drops unsolicited packets our host
        and reflexive candidates open only once we send toward the caller, and we learn
        nothing of the caller before its first check: a check through the relay arrives
        (ICE authenticates it; strangers' datagrams are dropped by the agent)."""
        for protocol in self.agent._protocols:  # aioice keeps its sockets private
            local = protocol.local_candidate
            if local is not None and local.type == "relay":
                protocol.transport.sendto(b"", (local.host, local.port))  # binds a channel

    async def relay_lost(self, timeout: float = RELAY_PROBE_S) -> bool:
        """Whether the TURN allocation this listener publishes is gone (the relay restarted,
        or was away when the listener gathered), so a caller can never reach its relayed
        candidate: each open one is asked to refresh (one round trip; a relay that lost it
        answers 437, a relay that is down does not answer). False without TURN."""
        if self.config.turn is None:
            return False
        relays = [_turn_client(protocol) for protocol in self.agent._protocols
                  if protocol.local_candidate is not None
                  and protocol.local_candidate.type == "relay"]  # fmt: skip
        if not relays:
            return True  # gathered without its relay: try again
        for client in relays:
            if client is None or client.transport.is_closing():  # its own refresh failed
                return True
            refresh = aioice.stun.Message(message_method=aioice.stun.Method.REFRESH,
                                          message_class=aioice.stun.Class.REQUEST)  # fmt: skip
            refresh.attributes["LIFETIME"] = client.lifetime
            try:
                async with asyncio.timeout(timeout):
                    await client.request_with_retry(refresh)
            except (aioice.stun.TransactionError, ConnectionError, OSError, TimeoutError) as exc:
                log.info("TURN allocation %s lost: %s", client.relayed_address, exc)
                return True
        return False

    def candidates(self) -> tuple[str, ...]:
        """The candidates to publish, most useful first (a record that cannot hold them
        all keeps the head: `presence.fit_reach`): the best host candidate of each family,
        the reflexive and relayed ones, then the other host candidates."""
        return tuple(c.to_sdp() for c in publish_order(self.agent.local_candidates))

    async def close(self) -> None:
        await self.agent.close()


def _turn_client(protocol: Any) -> Any:
    """The TURN client (aioice's `TurnClientMixin`) under a relayed candidate's transport,
    None if aioice no longer keeps it where 0.13 does (then the allocation counts as
    lost: a new listener is gathered, never a dead one kept)."""
    return getattr(protocol.transport, "_TurnTransport__inner_protocol", None)


async def dial(
    config: IceConfig, ufrag: str, pwd: str, caller_ufrag: str, caller_pwd: str,
    candidates: tuple[str, ...], *, timeout: float,
) -> aioice.Connection:  # fmt: skip
    """A controlling agent connected to a published listener; raises `DirectError`."""
    agent = config.agent(controlling=True, local_username=caller_ufrag, local_password=caller_pwd)
    agent.remote_username, agent.remote_password = ufrag, pwd
    try:
        local = loopback_servers(config.stun, config.turn)
        remote = remote_candidates(candidates, local)  # before any socket: maybe nothing to dial
        async with asyncio.timeout(timeout):
            await config.gather(agent)
            _send_offer(agent, remote, pwd)
            await _connect_direct_first(agent, remote)
    except DirectError:
        await agent.close()
        raise
    except (TimeoutError, ConnectionError, ValueError, OSError) as exc:
        await agent.close()
        raise DirectError(f"ICE did not connect: {exc or type(exc).__name__}") from None
    except BaseException:  # cancelled: no sockets left behind
        await agent.close()
        raise
    return agent


MAX_REMOTE_CANDIDATES = 16  # checked per call; an honest record holds about 10


def remote_candidates(
    lines: Iterable[str], local_servers: frozenset[str] = frozenset()
) -> list[aioice.Candidate]:
    """A contact's candidates (SDP lines it wrote) that this device will send checks to:
    parsed, only addresses `candidates.dialable` accepts, at most MAX_REMOTE_CANDIDATES.
    DirectError when none is left (the caller takes the mailbox at once)."""
    chosen: list[aioice.Candidate] = []
    for line in itertools.islice(lines, 4 * MAX_REMOTE_CANDIDATES):
        try:
            candidate = aioice.Candidate.from_sdp(line)
        except (ValueError, IndexError):
            log.info("a contact's candidate is malformed: %r", line[:80])
            continue
        if not candidates.dialable(candidate.host, local_servers) or not 0 < candidate.port < 65536:
            where = host_port(candidate.host, candidate.port)
            log.info("not checking toward a contact's candidate %s", where)
            continue
        chosen.append(candidate)
        if len(chosen) == MAX_REMOTE_CANDIDATES:
            break
    if not chosen:
        raise DirectError("no candidate of the contact's to check toward")
    return chosen


def _send_offer(agent: aioice.Connection, remote: list[aioice.Candidate], pwd: str) -> None:
    """Our host and reflexive candidates to the listener's relayed ones, from our relayed
    candidate (the listener's relay admits its server's address: `Listener`)."""
    ours = [c for c in agent.local_candidates if c.type != "relay"]
    theirs = [(c.host, c.port) for c in remote if c.type == "relay"]
    for protocol in agent._protocols:  # aioice keeps its sockets private
        local = protocol.local_candidate
        if ours and local is not None and local.type == "relay":
            for addr in theirs:
                protocol.transport.sendto(offer_datagram(ours, pwd), addr)


async def _connect_direct_first(agent: aioice.Connection, remote: list[aioice.Candidate]) -> None:
    """Checks toward the listener's host and reflexive candidates first, its relayed ones
    after RELAY_HOLD_S: aioice nominates the first pair that answers, and a relayed pair
    answers before a reflexive one that opens only once the listener took our offer.
    A listener that published only relayed candidates (relay-only) has no direct pair to
    wait for: its relayed ones are checked at once."""
    direct = [c for c in remote if c.type != "relay"]
    for candidate in direct:
        await agent.add_remote_candidate(candidate)
    connecting = asyncio.ensure_future(agent.connect())
    try:
        done, _ = await asyncio.wait({connecting}, timeout=RELAY_HOLD_S if direct else 0)
        if not done:
            for candidate in remote:
                if candidate.type == "relay":
                    await agent.add_remote_candidate(candidate)
            await agent.add_remote_candidate(None)
        await connecting
    finally:
        connecting.cancel()


async def answer(agent: aioice.Connection, *, timeout: float) -> None:
    """The listener's half of ICE, once its caller's first check arrived."""
    try:
        async with asyncio.timeout(timeout):
            await agent.connect()
    except (TimeoutError, ConnectionError) as exc:
        raise DirectError(f"ICE did not connect: {exc or type(exc).__name__}") from None


class DirectLink:
    """One ICE connection and its channel, from either end."""

    def __init__(self, agent: aioice.Connection, channel: Channel, on_received: OnReceived,
                 on_closed: Callable[[DirectLink], None] | None = None) -> None:  # fmt: skip
        self.agent, self.channel, self.on_received = agent, channel, on_received
        self.on_closed = on_closed
        self.established = asyncio.Event()
        # The latest reasons for refused input (bounded: a peer may send garbage forever).
        self.refused: collections.deque[str] = collections.deque(maxlen=REFUSED_KEPT)
        self._acks: dict[bytes, asyncio.Future[bool]] = {}  # True: acknowledged
        self._reader = asyncio.create_task(self._read())
        self.closed = False
        self.closed_by_peer = False  # its CLOSE arrived

    @property
    def peer(self) -> PublicKeySet | None:
        return self.channel.peer if self.channel.established else None

    def route(self) -> str:
        """The candidate types of the selected pair ("host->host", "relay->host", ...)."""
        pair = getattr(self.agent, "_nominated", {}).get(1)  # aioice keeps the pair private
        return f"{pair.local_candidate.type}->{pair.remote_candidate.type}" if pair else "none"

    def route_ip(self) -> str:
        """The IP version of the selected pair's addresses ("IPv4", "IPv6"), "none" without."""
        pair = getattr(self.agent, "_nominated", {}).get(1)
        if pair is None:
            return "none"
        return "IPv6" if ":" in pair.remote_candidate.host else "IPv4"

    @classmethod
    async def open(
        cls, agent: aioice.Connection, identity: Identity, peer: PublicKeySet,
        on_received: OnReceived, *, timeout: float,
    ) -> DirectLink:  # fmt: skip
        """The initiator's side: the handshake, HELLO resent until the WELCOME."""
        channel, hello = Channel.initiate(identity, peer)
        link = cls(agent, channel, on_received)
        deadline = time.monotonic() + timeout
        rto = FIRST_RTO_S
        while not link.established.is_set():
            await link._send(hello)
            left = deadline - time.monotonic()
            if left <= 0 or link.closed:
                await link.close()
                raise DirectError("the direct channel handshake got no answer")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(rto, left)):
                    await link.established.wait()
            hello, rto = channel.hello_datagrams(), min(rto * 2, MAX_RTO_S)
        return link

    @classmethod
    def accept(cls, agent: aioice.Connection, identity: Identity, pinned: Pinned,
               on_received: OnReceived) -> DirectLink:  # fmt: skip
        return cls(agent, Channel.respond(identity, pinned), on_received)

    async def send(self, message_id: bytes, payload: bytes, *, timeout: float) -> bool:
        """Send until acknowledged (True), or ``timeout`` passes or the other end closes
        the link (False)."""
        if self.closed or not self.channel.established:
            return False
        acked = self._acks.setdefault(message_id, asyncio.get_running_loop().create_future())
        deadline, rto = time.monotonic() + timeout, FIRST_RTO_S
        try:
            while not acked.done():
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return False
                await self._send(self.channel.seal_message(message_id, payload))
                await asyncio.wait({acked}, timeout=min(rto, left))
                rto = min(rto * 2, MAX_RTO_S)
            return acked.result()
        finally:
            self._acks.pop(message_id, None)

    async def _send(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            try:
                await self.agent.send(datagram)
            except (ConnectionError, OSError) as exc:
                log.info("direct send failed: %s", exc)
                return

    async def _read(self) -> None:
        try:
            while not self.closed:
                datagram = await self.agent.recv()
                await self._handle(datagram)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug must not leave a half-dead link that swallows messages
            log.exception("direct link reader failed")
        finally:
            self._end()
        if self.closed_by_peer:  # else whoever closed it closes the agent
            await self.agent.close()

    def _end(self) -> None:
        """The link is over: sends waiting for an ACK give up now (False), not at their
        deadline, and the owner forgets the link."""
        self.closed = True
        for acked in self._acks.values():
            if not acked.done():
                acked.set_result(False)
        if self.on_closed is not None:
            self.on_closed(self)

    async def _handle(self, datagram: bytes) -> None:
        step = self.channel.receive(datagram)
        for event in step.events:
            match event:
                case Established():
                    self.established.set()
                case Delivered(message_id):
                    future = self._acks.get(message_id)
                    if future is not None and not future.done():
                        future.set_result(True)
                case Closed():
                    log.info("the other end closed the direct link")
                    self.closed = self.closed_by_peer = True  # the reader stops after this
                case Received(message_id, payload):
                    assert self.channel.peer is not None
                    try:
                        await self.on_received(self.channel.peer, message_id, payload)
                    except NotTaken as exc:  # no ACK: the sender takes the mailbox
                        log.debug("direct message %s not taken: %s", message_id.hex(), exc)
                        return
                    except Exception as exc:  # not stored: no ACK, the sender falls back
                        log.warning("direct message %s not stored: %s", message_id.hex(), exc)
                        return
                    step.send += self.channel.stored(message_id)  # stored: now the ACK
                case Refused(reason):
                    self.refused.append(reason)
        await self._send(step.send)

    async def close(self) -> None:
        """Tell the other end (one CLOSE; if it is lost, the other end's next send times
        out as before), then close."""
        if not self.closed and self.channel.established:
            await self._send(self.channel.seal_close())
        self.closed = True
        await stop_tasks([self._reader])
        await self.agent.close()
