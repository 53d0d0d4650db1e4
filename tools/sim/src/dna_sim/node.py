"""A simulated overlay member: the nodes' own ``OverlayBehaviour`` behind a message pump.

``SimNode`` drives ``dna_core.overlay.behaviour.OverlayBehaviour`` as the asyncio node
does, minus the sockets: datagrams travel over ``SimNetwork`` as objects (never encoded),
timers are events on its heap, and the behaviour's commands (``Send``, ``StartTimer``,
the ends of pings and lookups) are carried out there. So matching responses, observing
responders and requesters, the liveness checks a full bucket asks for, lookups with their
adaptive and hard deadlines, suspects and refresh are the code a real node runs.

What the simulator does itself:

* it answers: find-node with the Responder's own choice of contacts (``closer_nodes``),
  ping with a pong, and hands every requester to the behaviour (``observe_requester``).
  No tokens, amplification limits or bytes: that wire work is the Responder's, tested in
  ``tests/core/overlay``;
* node keys are not challenged (``prove_keys=False``): the simulator minted every contact,
  so nobody claims another's ID; nor are a table's subnets counted table-wide
  (``table_subnet_limit=None``, see ``node_config``);
* adversarial nodes answer find-node with the colluding nodes closest to the target only,
  which looks plausible (they are close) but leads a single-path lookup into the coalition.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from dna_core.overlay import (
    Addr,
    Admission,
    BehaviourConfig,
    Contact,
    Datagram,
    FindNode,
    Lookup,
    LookupDone,
    Nodes,
    OverlayBehaviour,
    Ping,
    PingDone,
    PingOp,
    Pong,
    Send,
    StartTimer,
    closer_nodes,
    proven_contact,
)

from dna_sim.network import Message, SimNetwork
from dna_sim.xor import xor_closest

# One estimator per node averages over paths of 15-70 ms RTT (NetConfig defaults), so
# srtt + 4 * rttvar (~85 ms) sometimes dips under a slow path's RTT: with the adapter's
# 50 ms floor, 0.05 live peers per lookup miss their deadline. A floor at the slowest
# path's RTT (70 ms) removes that and costs dead peers nothing extra.
RTO_FLOOR = 0.070

LookupDoneCallback = Callable[["SimNode", Lookup], None]
PingDoneCallback = Callable[["SimNode", Contact | None], None]


def node_config(*, k: int = 20, alpha: int = 3, rto_floor: float = RTO_FLOOR) -> BehaviourConfig:
    """A simulated node's behaviour: a real node's, with the floor above, no key proofs
    (contacts are minted), and no table-wide subnet count: its Counter would add ~6.6 KB to
    each ~23 KB table (a million-node run builds 389,370 of them, docs/performance.md),
    and the synthetic addresses never put 10 of one /24 in a table (per-bucket limits
    still apply)."""
    return BehaviourConfig(
        k=k, alpha=alpha, rto_floor=rto_floor, prove_keys=False, table_subnet_limit=None
    )


class AddressBook:
    """Contacts, their UDP addresses and node indices: how the simulator routes."""

    __slots__ = ("addrs", "contacts", "index_at", "index_of")

    def __init__(self, contacts: Sequence[Contact]) -> None:
        self.contacts = list(contacts)
        self.index_of = {c.node_id: i for i, c in enumerate(self.contacts)}
        self.addrs: list[Addr] = [c.endpoint.udp for c in self.contacts]
        self.index_at = {addr: i for i, addr in enumerate(self.addrs)}


class Coalition:
    """The adversarial nodes, colluding: each knows every member."""

    __slots__ = ("contacts", "keys")

    def __init__(self, members: Sequence[Contact]) -> None:
        ordered = sorted(members, key=lambda c: c.key)
        self.contacts = ordered
        self.keys = [c.key for c in ordered]

    def closest(self, target: bytes, count: int) -> list[Contact]:
        picked = xor_closest(self.keys, int.from_bytes(target, "big"), count)
        return [self.contacts[i] for i in picked]


class SimNode:
    def __init__(
        self,
        index: int,
        contact: Contact,
        net: SimNetwork,
        book: AddressBook,
        *,
        config: BehaviourConfig,
        rng: random.Random,
        coalition: Coalition | None = None,
    ) -> None:
        self.index = index
        self.contact = contact
        self.net = net
        self.book = book
        self.coalition = coalition  # set on adversarial nodes only
        self.behaviour = OverlayBehaviour(contact.node_id, config, rng, sender=contact)
        self.table = self.behaviour.table
        self.maintenance_messages = 0  # pings and pongs this node sent (no lookup traffic)
        self._lookups: dict[Lookup, LookupDoneCallback] = {}
        self._pings: dict[PingOp, PingDoneCallback] = {}

    # -- operations -----------------------------------------------------------------

    def lookup(self, target: bytes, on_done: LookupDoneCallback, *, paths: int = 1) -> Lookup:
        """The behaviour's lookup; ``on_done(node, lookup)`` when it ends."""
        lookup = self.behaviour.lookup(target, self.net.now, paths=paths)
        self._lookups[lookup] = on_done
        self._flush()
        return lookup

    def ping(self, addr: Addr, on_done: PingDoneCallback) -> None:
        """The behaviour's ping; ``on_done(node, contact or None)`` when it ends."""
        self._pings[self.behaviour.ping(addr, self.net.now)] = on_done
        self._flush()

    def refresh(self, interval: float, on_done: LookupDoneCallback) -> None:
        for lookup in self.behaviour.refresh(self.net.now, interval):
            self._lookups[lookup] = on_done
        self._flush()

    def warm_up(self, contacts: Sequence[Contact]) -> None:
        """Liveness checks of ``contacts``: a silent one is evicted."""
        for contact in contacts:
            self.behaviour.check_liveness(contact, self.net.now)
        self._flush()

    def admit(self, contact: Contact) -> bool:
        """Offer ``contact`` to the table (the oracle fill); True if it was inserted."""
        return self.table.observe(contact, self.net.now).admission is Admission.INSERTED

    # -- inbound --------------------------------------------------------------------

    def receive(self, msg: Message) -> None:
        dgram = msg.datagram
        if dgram.is_request:
            self._answer(dgram, msg.src)
        else:
            self.behaviour.on_response(dgram, self.book.addrs[msg.src], self.net.now)
        self._flush()

    def _answer(self, dgram: Datagram, src: int) -> None:
        body = dgram.body
        reply: Nodes | Pong
        if type(body) is FindNode and self.coalition is not None:
            reply = Nodes(tuple(self.coalition.closest(body.target, self.behaviour.config.k)))
        else:
            sender = dgram.sender
            assert sender is not None  # simulated nodes are never clients
            addr = self.book.addrs[src]
            contact = proven_contact(sender, addr)
            if contact is not None:
                self.behaviour.observe_requester(contact, addr, self.net.now)
            if type(body) is FindNode:
                k = self.behaviour.config.k
                reply = Nodes(tuple(closer_nodes(self.table, body.target, sender.node_id, k)))
            else:
                reply = Pong()
                self.maintenance_messages += 1
        self.net.send(Message(self.index, src, Datagram(dgram.request_id, reply, self.contact)))

    # -- the behaviour's commands ---------------------------------------------------------

    def _flush(self) -> None:
        net, index_at = self.net, self.book.index_at
        for command in self.behaviour.poll():
            if isinstance(command, Send):
                if type(command.datagram.body) is Ping:
                    self.maintenance_messages += 1
                net.send(Message(self.index, index_at[command.addr], command.datagram))
            elif isinstance(command, StartTimer):
                net.call_at(command.when, self._on_timer, command.timer)
            elif isinstance(command, LookupDone):
                self._lookups.pop(command.lookup)(self, command.lookup)
            elif isinstance(command, PingDone):
                self._pings.pop(command.ping)(self, command.contact)
            # RequestEnded and Rejected: the summary counts what it needs itself

    def _on_timer(self, timer: object) -> None:
        self.behaviour.on_timer(timer, self.net.now)
        self._flush()
