"""A device's direct messaging: its presence, its listener, and its links to contacts.

`DirectService` runs beside a `Peer` while the device is online (`dna watch`): it keeps a
`Listener` published in a presence record (sealed to the contacts written to most
recently), refreshes the record every ``REFRESH_MS``, answers a contact that dials the
listener (then publishes a fresh listener), and withdraws the record on `stop`. `send`
is the sender's side: use a link that is up, or look up the contact's presence, dial
it and handshake (also once after a link from before got no ACK); any failure or the
deadline returns False and the caller falls back to store-and-forward with the same
envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from dna_core.crypto import Identity, PublicKeySet
from dna_core.errors import DnaError
from dna_core.overlay import OverlayNode, identity_proof
from dna_core.ratelimit import RateLimiter
from dna_core.tasks import stop_tasks
from dna_core.wire import common_pb2

from dna_peer.cache import Cache, Contact
from dna_peer.direct.link import (
    DirectError,
    DirectLink,
    IceConfig,
    Listener,
    NotTaken,
    answer,
    dial,
)
from dna_peer.keyserver import now_ms
from dna_peer.presence import (
    MAX_SEALED_CONTACTS,
    REFRESH_MS,
    Reach,
    fit_reach,
    lookup_presence,
    presence_key,
    presence_record,
)
from dna_peer.profile import Device

log = logging.getLogger("dna.peer.direct")
DIRECT_TIMEOUT_S = 4.0  # ICE, handshake and ACK together; then store-and-forward
# An ACK over a link that is up takes a round trip; a link from before silent this long
# (three transmissions) is taken for dead and the contact dialled again in the rest.
OLD_LINK_S = 1.5
# Messages taken from one contact over the direct path, which has no proof of work and no
# quota; past this, no ACK: the sender's message takes the mailbox. Twice a storage node's
# rate into a whole mailbox and a burst of 200: an online device is where a burst belongs
# (bench.direct_path sends 50 back to back), and a flood still has a bound.
DIRECT_RATE_PER_S, DIRECT_BURST, DIRECT_MAX_CONTACTS = 20.0, 200.0, 1024
PROOF_REUSE_MS = 30 * 60_000  # a presence proof of work stays valid for the kind's hour
Deliver = Callable[[PublicKeySet, bytes, bytes], Awaitable[None]]  # (sender, id, envelope)


class Owner(Protocol):
    @property
    def identity(self) -> Identity: ...

    @property
    def cache(self) -> Cache: ...

    @property
    def node(self) -> OverlayNode: ...

    @property
    def device(self) -> Device: ...


@dataclass
class DirectService:
    owner: Owner
    config: IceConfig
    deliver: Deliver  # store a received envelope (the peer's inbox); raises if it cannot
    timeout_s: float = DIRECT_TIMEOUT_S
    refresh_s: float = REFRESH_MS / 1000  # how often the record is signed again
    links: dict[bytes, DirectLink] = field(default_factory=dict)  # contact fingerprint ->
    listener: Listener | None = None
    _refresher: asyncio.Task[None] | None = None
    _proof: tuple[int, common_pb2.ProofOfWork] | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _republish: asyncio.Event = field(default_factory=asyncio.Event)
    listening: bool = False  # published a presence record (so `stop` withdraws it)
    clock: Callable[[], float] = time.monotonic  # for the rate of messages taken
    _taken: RateLimiter = field(
        default_factory=lambda: RateLimiter(DIRECT_RATE_PER_S, DIRECT_BURST, DIRECT_MAX_CONTACTS)
    )

    async def take(self, sender: PublicKeySet, message_id: bytes, envelope: bytes) -> None:
        """A message a link received: stored (`deliver`), unless its sender is over
        DIRECT_RATE_PER_S (NotTaken: no ACK, the sender falls back to the mailbox)."""
        if self._taken.check(sender.fingerprint, self.clock()) > 0:
            raise NotTaken(f"over {DIRECT_RATE_PER_S:g} direct messages a second from"
                           f" {sender.fingerprint.hex()[:16]}…")  # fmt: skip
        await self.deliver(sender, message_id, envelope)

    # -- being reachable -------------------------------------------------------------

    async def start(self) -> None:
        """Publish a listener in a presence record and keep it fresh until `stop`."""
        await self._new_listener()
        self.listening = True
        try:
            await self.publish()
        except DnaError as exc:  # the network is away: the refresher tries again
            log.warning("presence not published: %s", exc)
        self._refresher = asyncio.create_task(self._refresh())

    async def stop(self) -> None:
        """Withdraw the presence record and close everything."""
        await stop_tasks([self._refresher, *self._tasks])
        if self.listening:  # a send-only process must not withdraw its identity's presence
            try:
                await self._put(None)
            except DnaError as exc:  # it expires within its lifetime anyway
                log.warning("presence withdrawal failed: %s", exc)
        for link in list(self.links.values()):
            await link.close()
        self.links.clear()
        if self.listener is not None:
            await self.listener.close()

    async def publish(self) -> int:
        """Sign and put the presence record for the current listener."""
        assert self.listener is not None
        reach = Reach(self.owner.device.device_id, self.listener.agent.local_username,
                      self.listener.agent.local_password, self.listener.caller_ufrag,
                      self.listener.caller_pwd, self.listener.candidates())  # fmt: skip
        return await self._put(reach)

    async def _put(self, reach: Reach | None) -> int:
        contacts, proof = self._sealed_to(), self._proof_of_work()
        if reach is not None:
            fitted = fit_reach(reach, len(contacts), proof)
            if fitted != reach:
                log.info("presence: %d of %d candidates fit the record", len(fitted.candidates),
                         len(reach.candidates))  # fmt: skip
            reach = fitted
        record = presence_record(self.owner.identity, contacts, reach, now_ms=now_ms(),
                                 proof=proof)  # fmt: skip
        return await self.owner.node.put_record(
            record, presence_key(self.owner.identity.fingerprint)
        )

    def _sealed_to(self) -> list[PublicKeySet]:
        """The contacts written to most recently (a record holds MAX_SEALED_CONTACTS), then
        the others this identity added (by name or fingerprint: `Contact.chosen`); never
        someone who only wrote to us (a stranger pinned on first contact): the record tells
        those it is sealed to where the device is."""
        written = self.owner.cache.last_written()
        contacts = self.owner.cache.chosen_or_written()  # strangers pinned: none decoded
        contacts.sort(key=lambda c: written.get(c.conversation, 0), reverse=True)
        return [c.keys for c in contacts[:MAX_SEALED_CONTACTS]]

    def _proof_of_work(self) -> common_pb2.ProofOfWork:
        """The identity proof (~0.3 s of hashing), reused while it is young enough."""
        if self._proof is None or now_ms() - self._proof[0] > PROOF_REUSE_MS:
            made = now_ms()
            self._proof = made, identity_proof(self.owner.identity.fingerprint, now_ms=made)
        return self._proof[1]

    async def _refresh(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_s):
                    await self._republish.wait()
            self._republish.clear()
            await self._replace_stale_listener()
            try:
                await self.publish()
            except DnaError as exc:
                log.warning("presence refresh failed: %s", exc)

    async def _new_listener(self) -> None:
        self.listener = await self._gathered_listener()

    async def _gathered_listener(self) -> Listener:
        listener = Listener(self.config, self._called)
        try:
            await listener.gather()
        except BaseException:  # cancelled (`stop`): no sockets or allocation left behind
            await listener.close()
            raise
        return listener

    async def _replace_stale_listener(self) -> None:
        """Before a refresh: a listener gathered on addresses the device no longer has, or
        without ones it has now (another network; a temporary IPv6 address rotated out, a
        new one in), or whose TURN allocation is gone (the relay restarted: before, the
        record named the dead allocation for as long as the device stayed online, and every
        contact's send failed ICE, then took the mailbox) is replaced, so the record says
        where the device is. A caller that read the old record and dials the old listener
        now fails ICE and takes the mailbox."""
        old = self.listener
        if old is None or old.called:
            return
        moved = self.config.host_addresses() != old.addresses
        if not moved and not await old.relay_lost():
            return
        fresh = await self._gathered_listener()
        if old.called or self.listener is not old:  # a caller came: its answer made one
            await fresh.close()
            return
        log.info("%s: a new listener",
                 f"addresses changed ({old.addresses} -> {fresh.addresses})" if moved
                 else "TURN allocation lost")  # fmt: skip
        self.listener = fresh
        await old.close()

    def _called(self, listener: Listener) -> None:
        """A contact dialled the published listener: answer it, publish a new one."""
        self._spawn(self._answer(listener))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace_listener(self) -> None:
        await self._new_listener()
        self.republish()

    def republish(self) -> None:
        """Sign and put the record now rather than at the next refresh (after a call, or
        when the device's network changed: the refresh first gathers on the new addresses)."""
        self._republish.set()

    async def _answer(self, listener: Listener) -> None:
        # The next listener is gathered while this caller is answered, not before: its
        # TURN allocation and IPv6 STUN query take round trips the caller would wait for.
        self._spawn(self._replace_listener())
        try:
            await answer(listener.agent, timeout=self.timeout_s)
        except DirectError as exc:
            log.info("a caller's ICE did not complete: %s", exc)
            await listener.close()
            return
        link = DirectLink.accept(listener.agent, self.owner.identity, self._pinned, self.take)
        try:
            async with asyncio.timeout(self.timeout_s):
                await link.established.wait()
        except TimeoutError:
            log.warning("direct channel not established: %s", "; ".join(link.refused) or "no HELLO")
            await link.close()
            return
        assert link.peer is not None
        self._keep(link.peer.fingerprint, link)

    def _pinned(self, fingerprint: bytes) -> PublicKeySet | None:
        contact = self.owner.cache.contact(fingerprint)
        return contact.keys if contact is not None and not contact.replaced_by else None

    def _keep(self, fingerprint: bytes, link: DirectLink) -> None:
        old = self.links.get(fingerprint)
        self.links[fingerprint] = link
        link.on_closed = lambda closed: self._forget(fingerprint, closed)
        if old is not None and old is not link:
            self._spawn(old.close())

    def _forget(self, fingerprint: bytes, link: DirectLink) -> None:
        if self.links.get(fingerprint) is link:
            del self.links[fingerprint]

    # -- sending -------------------------------------------------------------------------

    def route_to(self, fingerprint: bytes) -> str | None:
        """The candidate types of the pair the link to a contact runs on ("host->srflx",
        "relay->host", ...), None without a link: which way a direct message went."""
        link = self.links.get(fingerprint)
        return link.route() if link is not None else None

    def route_ip_to(self, fingerprint: bytes) -> str | None:
        """The IP version of that pair ("IPv4", "IPv6"), None without a link."""
        link = self.links.get(fingerprint)
        return link.route_ip() if link is not None else None

    async def send(self, contact: Contact, message_id: bytes, envelope: bytes) -> bool:
        """Deliver ``envelope`` over the direct path within the deadline: True once the
        contact's device acknowledged it (stored), False if there is no path now.

        A link from before that gets no ACK within ``OLD_LINK_S`` is dropped and the
        contact dialled once more from its presence record as it is now, in what is left
        of the deadline: its end may have moved (a restart, a new address, a relay that
        restarted and lost both ends' allocations), and before, that send took the mailbox
        though the contact was online at the new record. The redial carries the same
        message ID: a copy the old link did deliver (its ACK lost) is acknowledged again
        by the contact's device and not shown twice (the channel's and the inbox's replay
        memory)."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        old = self.links.get(contact.fingerprint)
        if old is not None and not old.closed:
            if await old.send(message_id, envelope, timeout=min(OLD_LINK_S, self._left(deadline))):
                return True
            log.info("direct link to %s lost; dialling its presence again",
                     contact.fingerprint.hex()[:16])  # fmt: skip
            await self._drop(contact.fingerprint, old)
        try:
            async with asyncio.timeout(self._left(deadline)):
                link = await self._dial(contact)
        except (DnaError, TimeoutError, OSError) as exc:  # DirectError, a network error, ...
            log.info("no direct path to %s: %s", contact.fingerprint.hex()[:16], exc)
            return False
        if link is None:
            return False
        if await link.send(message_id, envelope, timeout=max(0.1, self._left(deadline))):
            return True
        # The contact's end went away: the next message dials again instead of waiting
        # on this link.
        log.info("direct link to %s lost; falling back", contact.fingerprint.hex()[:16])
        await self._drop(contact.fingerprint, link)
        return False

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def _drop(self, fingerprint: bytes, link: DirectLink) -> None:
        self._forget(fingerprint, link)
        await link.close()

    async def _dial(self, contact: Contact) -> DirectLink | None:
        """A new link from the contact's presence record, None when it has none to dial."""
        presence = await lookup_presence(self.owner.node, contact.keys, self.owner.identity,
                                         now_ms=now_ms())  # fmt: skip
        if presence is None or presence.reach is None or not presence.reach.candidates:
            return None  # offline, its record is not sealed to us, or nowhere to dial
        r = presence.reach
        agent = await dial(self.config, r.ufrag, r.pwd, r.caller_ufrag, r.caller_pwd,
                           r.candidates, timeout=self.timeout_s)  # fmt: skip
        link = await DirectLink.open(agent, self.owner.identity, contact.keys, self.take,
                                     timeout=self.timeout_s)  # fmt: skip
        self._keep(contact.fingerprint, link)
        return link
