"""The overlay's datagram protocol, sans-I/O: answering requests, matching responses.

Rules this module enforces:

* **No amplification.** An answer to an address that has not proved it
  receives (no valid token) is at most 3x the request's bytes (RFC 9000 §8.1);
  a find-node that would earn more gets a small TokenReply instead. Requesters
  either retry with that token or pad their first request.
* **Only proven addresses enter routing tables.** A requester is observed only
  when its token is valid and its source address is one of its contact's
  endpoints; a responder only when it answers a request we sent to that address.
  The address it spoke from becomes its first endpoint, the one the table uses.
* **Only proven keys enter routing tables.** A node ID is a hash of a public key
  anyone can copy, so a contact is observed only once it answered a ping
  challenge from that address with its node key's signature (the Responder's
  ``observe`` hook: ``OverlayBehaviour.observe_requester`` keeps which ID was
  proven at which address). Otherwise anyone with an address could claim a known
  node's ID and move it to that address.
* **Responses match requests** by request ID *and* source address; anything
  else is unsolicited and dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dna_core.overlay.codec import (
    Body,
    ContactCache,
    Datagram,
    FindNode,
    Nodes,
    Ping,
    Pong,
    TokenReply,
    encode_datagram,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.kbucket import Observed, RoutingTable
from dna_core.overlay.tokens import AddressTokens

AMPLIFICATION_FACTOR = 3
FIRST_REQUEST_PADDING = 400  # 3 x (request + padding) >= a full 1,200-byte answer
FIRST_PING_PADDING = 32  # 3 x a padded ping >= a pong that carries a contact

Addr = tuple[str, int]


PONG_DOMAIN = b"overlay-pong"  # what a node signs to answer a ping's challenge


def proven_contact(contact: Contact, addr: Addr) -> Contact | None:
    """``contact`` with the endpoint ``addr`` (the one it spoke from) first, as the one
    routing tables use and count for the subnet limit; None if it does not list it."""
    if contact.endpoints and contact.endpoints[0].udp == addr:
        return contact
    spoke = [ep for ep in contact.endpoints if ep.udp == addr]
    if not spoke:
        return None
    rest = tuple(ep for ep in contact.endpoints if ep.udp != addr)
    return Contact(contact.node_id, contact.public_key, (spoke[0], *rest), contact.role)


@dataclass(frozen=True, slots=True)
class Answer:
    """What to do with an incoming request."""

    reply: bytes | None
    outcome: str  # for metrics: "ok", "token_required", "ignored"
    observed: Observed | None = None


class Responder:
    """Answers ping and find-node for one node (server mode) or none (client mode)."""

    def __init__(
        self,
        *,
        local: Contact | None,
        table: RoutingTable | None,
        tokens: AddressTokens,
        k: int = 20,
        cache: ContactCache | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        observe: Callable[[Contact, Addr, float], Observed | None] | None = None,
    ) -> None:
        self.local, self.table, self.tokens, self.k = local, table, tokens, k
        self.cache = cache
        self.sign = sign  # answers ping challenges (None: challenges go unanswered)
        # A requester whose address is proven; None: straight into the table. The node's
        # behaviour passes its own, which first wants the key proven.
        self.observe = observe

    def answer(self, dgram: Datagram, addr: Addr, size: int, now: float) -> Answer:
        if self.local is None or not dgram.is_request:
            return Answer(None, "ignored")
        proven = self.tokens.valid(dgram.token, addr, now)
        observed = None
        sender, table = dgram.sender, self.table
        contact = proven_contact(sender, addr) if proven and sender is not None else None
        if contact is not None and table is not None:
            if self.observe is None:
                observed = table.observe(contact, now)
            else:
                observed = self.observe(contact, addr, now)
        reply = self._reply(dgram, addr, now)
        if proven or len(reply) <= AMPLIFICATION_FACTOR * size:
            return Answer(reply, "ok", observed)
        # Unproven and too big: a bare token (no contact) if even that stays within 3x.
        token = self.tokens.issue(addr, now)
        reply = encode_datagram(Datagram(dgram.request_id, TokenReply(), None, token))
        if len(reply) > AMPLIFICATION_FACTOR * size:
            return Answer(None, "too_small", observed)
        return Answer(reply, "token_required", observed)

    def _reply(self, dgram: Datagram, addr: Addr, now: float) -> bytes:
        token = self.tokens.issue(addr, now)
        if not isinstance(dgram.body, FindNode) or self.table is None:
            challenge = dgram.body.challenge if isinstance(dgram.body, Ping) else b""
            proof = self.sign(challenge) if challenge and self.sign is not None else b""
            pong = Pong(Endpoint(addr[0], addr[1]), proof)
            return encode_datagram(Datagram(dgram.request_id, pong, self.local, token), self.cache)
        exclude = dgram.sender.node_id if dgram.sender else None
        closer = closer_nodes(self.table, dgram.body.target, exclude, self.k)
        # Contacts with many or IPv6 endpoints may not all fit: drop the farthest.
        while True:
            try:
                return encode_datagram(
                    Datagram(dgram.request_id, Nodes(tuple(closer)), self.local, token), self.cache
                )
            except ValueError:
                closer.pop()


def closer_nodes(
    table: RoutingTable, target: bytes, requester: bytes | None, k: int
) -> list[Contact]:
    """What a find-node for ``target`` is answered with: the ``k`` closest known contacts,
    closest first, the requester left out (it knows itself)."""
    closest = table.closest(target, k + 1)
    return [c for c in closest if c.node_id != requester][:k]


@dataclass(slots=True)
class Pending:
    request_id: int
    addr: Addr
    body: Body
    deadline: float
    sent_at: float
    node_id: bytes | None = None
    retried: bool = False
    context: object = field(default=None, compare=False)


class RequestTracker:
    """Outstanding requests, keyed by (request ID, address)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._pending: dict[tuple[int, Addr], Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def start(
        self, addr: Addr, body: Body, now: float, timeout: float, node_id: bytes | None = None
    ) -> Pending:
        while True:
            request_id = self._rng.getrandbits(64)
            if (request_id, addr) not in self._pending:
                break
        pending = Pending(request_id, addr, body, now + timeout, now, node_id)
        self._pending[(request_id, addr)] = pending
        return pending

    def match(self, dgram: Datagram, addr: Addr) -> Pending | None:
        """The request this response answers, or None (unsolicited or spoofed)."""
        if dgram.is_request:
            return None
        return self._pending.pop((dgram.request_id, addr), None)

    def forget(self, pending: Pending) -> bool:
        """Drop a request that timed out; False if it was answered meanwhile."""
        return self._pending.pop((pending.request_id, pending.addr), None) is not None

    def expire(self, now: float) -> list[Pending]:
        gone = [p for p in self._pending.values() if p.deadline <= now]
        for p in gone:
            del self._pending[(p.request_id, p.addr)]
        return gone

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)


def request_for(pending: Pending, sender: Contact | None, token: bytes | None) -> Datagram:
    """The request datagram; without a token it is padded to earn a full answer at once."""
    if token:
        padding = 0
    else:
        padding = FIRST_PING_PADDING if isinstance(pending.body, Ping) else FIRST_REQUEST_PADDING
    return Datagram(pending.request_id, pending.body, sender, token or b"", padding)


def request_datagram(
    pending: Pending, sender: Contact | None, token: bytes | None, cache: ContactCache | None = None
) -> bytes:
    """``request_for``, encoded."""
    return encode_datagram(request_for(pending, sender, token), cache)
