"""The overlay behaviour (dna_core.overlay.behaviour) without sockets: events in, commands
out, time advanced by hand (aioquic's tests; trio's MockClock).

Request matching and deadlines, token retries, observe -> liveness check -> keep or
evict, key proofs, lookups (suspects, the grace for late answers, ground truth on a
scripted network) and refresh; and a property: whatever the network does, every request
ends exactly once and every operation ends exactly once.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
from dna_core.crypto.node import NodeIdentity
from dna_core.overlay.behaviour import (
    MAX_KEY_PROOFS_PER_BLOCK,
    PROVEN_KEYS_PER_SUBNET,
    PROVEN_KEYS_SIZE,
    SUSPECT_CACHE_SIZE,
    SUSPECT_SECONDS,
    SUSPECTS_PER_SUBNET,
    TOKEN_CACHE_SIZE,
    TOKENS_PER_SUBNET,
    BehaviourConfig,
    Command,
    ContactAdded,
    Lookup,
    LookupDone,
    OverlayBehaviour,
    PingDone,
    Rejected,
    RequestEnded,
    Send,
    StartTimer,
)
from dna_core.overlay.codec import (
    Body,
    Datagram,
    FindNode,
    Nodes,
    Ping,
    Pong,
    TokenReply,
    encode_datagram,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.kbucket import GOOD_FOR, Admission
from dna_core.overlay.protocol import FIRST_PING_PADDING, PONG_DOMAIN, Addr
from dna_core.overlay.subnet_lru import SubnetLru
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 1000.0
LOCAL_ID = bytes(32)  # every ID below with its top bit set is in bucket 255
TOKEN = b"t" * 16


def far_id(i: int) -> bytes:
    """A node ID in the local node's farthest bucket (255)."""
    digest = hashlib.sha256(f"peer {i}".encode()).digest()
    return bytes([digest[0] | 0x80]) + digest[1:]


def peer(i: int, node_id: bytes | None = None) -> Contact:
    """A minted contact (keys unproven: for behaviours with ``prove_keys=False``), each in
    its own /24."""
    endpoint = Endpoint(f"198.18.{i % 250}.{i // 250 + 1}", 4000)
    return Contact(node_id or hashlib.sha256(f"peer {i}".encode()).digest(), b"", (endpoint,))


def keyed_peer(i: int) -> tuple[Contact, NodeIdentity]:
    identity = NodeIdentity.generate(0)[0]
    endpoint = Endpoint(f"198.19.{i}.1", 4000)
    return Contact(identity.node_id, identity.public_key, (endpoint,)), identity


def behaviour(*, prove_keys: bool = False, seed: int = 1, **config: Any) -> OverlayBehaviour:
    local = Contact(LOCAL_ID, b"", (Endpoint("198.51.100.1", 4000),))
    return OverlayBehaviour(
        LOCAL_ID, BehaviourConfig(prove_keys=prove_keys, **config), random.Random(seed),
        sender=local, entropy=random.Random(seed).randbytes,
    )  # fmt: skip


def of_type(commands: list[Command], kind: type[Any]) -> list[Any]:
    return [c for c in commands if isinstance(c, kind)]


def answer_to(send: Send, body: Body, sender: Contact | None, token: bytes = b"") -> Datagram:
    return Datagram(send.datagram.request_id, body, sender, token)


# -- request matching and deadlines --------------------------------------------------------


def test_a_response_matches_only_its_request_id_at_its_address() -> None:
    b, responder = behaviour(), peer(1)
    op = b.ping(responder.endpoint.udp, NOW)
    [send] = of_type(b.poll(), Send)
    assert send.addr == responder.endpoint.udp and isinstance(send.datagram.body, Ping)
    right = answer_to(send, Pong(), responder)
    wrong_id = Datagram(send.datagram.request_id ^ 1, Pong(), responder)
    b.on_response(right, peer(2).endpoint.udp, NOW + 0.1)  # right ID, another address
    b.on_response(wrong_id, responder.endpoint.udp, NOW + 0.1)
    assert b.poll() == [Rejected("unsolicited_response")] * 2
    assert responder.node_id not in b.table and len(b.tracker) == 1

    b.on_response(right, responder.endpoint.udp, NOW + 0.1)
    out = b.poll()
    assert RequestEnded("ping", "ok") in out and PingDone(op, responder) in out
    assert responder.node_id in b.table and len(b.tracker) == 0
    b.on_response(right, responder.endpoint.udp, NOW + 0.2)  # answered once only
    assert b.poll() == [Rejected("unsolicited_response")]


def test_an_unanswered_request_fails_at_its_hard_deadline_and_a_late_answer_is_refused() -> None:
    b, silent = behaviour(request_timeout=2.0), peer(1)
    op = b.ping(silent.endpoint.udp, NOW)
    out = b.poll()
    [send], [timer] = of_type(out, Send), of_type(out, StartTimer)
    assert timer.when == NOW + 2.0
    b.on_timer(timer.timer, timer.when)
    assert b.poll() == [RequestEnded("ping", "timeout"), PingDone(op, None)]
    b.on_timer(timer.timer, timer.when + 1)  # a timer that fires twice changes nothing
    assert b.poll() == []
    b.on_response(answer_to(send, Pong(), silent), silent.endpoint.udp, NOW + 3)
    assert b.poll() == [Rejected("unsolicited_response")]
    assert silent.node_id not in b.table


def test_a_timer_for_an_answered_request_is_ignored() -> None:
    b, responder = behaviour(), peer(1)
    b.ping(responder.endpoint.udp, NOW)
    out = b.poll()
    [send], [timer] = of_type(out, Send), of_type(out, StartTimer)
    b.on_response(answer_to(send, Pong(), responder), responder.endpoint.udp, NOW + 0.05)
    b.poll()
    b.on_timer(timer.timer, timer.when)
    assert b.poll() == []


def test_a_token_reply_is_answered_by_one_retry_with_the_token_and_a_second_fails() -> None:
    b, responder = behaviour(), peer(1)
    op = b.ping(responder.endpoint.udp, NOW)
    [first] = of_type(b.poll(), Send)
    assert first.datagram.token == b"" and first.datagram.padding == FIRST_PING_PADDING
    b.on_response(answer_to(first, TokenReply(), None, TOKEN), responder.endpoint.udp, NOW)
    out = b.poll()
    [retry] = of_type(out, Send)
    assert of_type(out, PingDone) == []
    assert retry.addr == first.addr and retry.datagram.body == first.datagram.body
    assert retry.datagram.token == TOKEN and retry.datagram.padding == 0
    b.on_response(answer_to(retry, TokenReply(), None, TOKEN), responder.endpoint.udp, NOW)
    assert b.poll() == [RequestEnded("ping", "ok"), PingDone(op, None)]  # no third try
    assert len(b.tracker) == 0


# -- observe -> liveness check -> keep or evict ----------------------------------------------


def full_bucket(b: OverlayBehaviour, at: float = 0.0) -> list[Contact]:
    """Fill bucket 255 (k = 2) at time ``at``, oldest first."""
    members = [peer(i, far_id(i)) for i in range(2)]
    for m in members:
        assert b.table.observe(m, at).admission is Admission.INSERTED
    return members


def newcomer_at(b: OverlayBehaviour, now: float) -> tuple[Contact, list[Command]]:
    newcomer = peer(9, far_id(9))
    b.observe_requester(newcomer, newcomer.endpoint.udp, now)
    return newcomer, b.poll()


def test_a_full_bucket_pings_its_oldest_contact_and_a_silent_one_is_replaced() -> None:
    b = behaviour(k=2)
    oldest, _ = full_bucket(b)
    newcomer, out = newcomer_at(b, GOOD_FOR + 1)
    [check], [deadline] = of_type(out, Send), of_type(out, StartTimer)
    assert check.addr == oldest.endpoint.udp and isinstance(check.datagram.body, Ping)
    assert newcomer.node_id not in b.table  # it waits while the check runs
    b.on_timer(deadline.timer, deadline.when)
    # (and the newcomer entering from the replacement cache is announced: store-on-join)
    assert b.poll() == [RequestEnded("ping", "timeout"), ContactAdded(newcomer)]
    assert oldest.node_id not in b.table and newcomer.node_id in b.table


def test_a_full_bucket_keeps_an_oldest_contact_that_answers_the_check() -> None:
    b = behaviour(k=2)
    oldest, second = full_bucket(b)
    newcomer, out = newcomer_at(b, GOOD_FOR + 1)
    [check] = of_type(out, Send)
    b.on_response(answer_to(check, Pong(), oldest), oldest.endpoint.udp, GOOD_FOR + 1.1)
    b.poll()
    assert oldest.node_id in b.table and newcomer.node_id not in b.table
    # The check made it the most recently seen: the next newcomer's check is the other one.
    later = peer(10, far_id(10))
    b.observe_requester(later, later.endpoint.udp, 2 * GOOD_FOR)
    [next_check] = of_type(b.poll(), Send)
    assert next_check.addr == second.endpoint.udp


def test_a_check_answered_by_another_node_at_the_address_evicts_the_one_checked() -> None:
    """A node replaced on its host (new key, same address: a storage node whose disk was
    wiped) must not keep its old entry alive by the new node's answers (found by the
    resilience suite's kill-wipe scenario: a replica set named one host twice)."""
    b = behaviour(k=2)
    oldest, _ = full_bucket(b)
    newcomer, out = newcomer_at(b, GOOD_FOR + 1)
    [check] = of_type(out, Send)
    # oldest's address, another node ID (in another bucket: it takes no slot of this one)
    replacement = peer(0, b"\x01" + far_id(50)[1:])
    assert replacement.endpoint == oldest.endpoint and replacement.node_id != oldest.node_id
    b.on_response(answer_to(check, Pong(), replacement), oldest.endpoint.udp, GOOD_FOR + 1.1)
    assert Rejected("another_node") in b.poll()
    assert oldest.node_id not in b.table and newcomer.node_id in b.table


def test_a_lookup_does_not_count_a_replaced_node_as_found() -> None:
    everyone, net, h = scripted(30, known=30)
    target = hashlib.sha256(b"target").digest()
    stale = closest_to(target, everyone, 1)[0]
    reborn = Contact(hashlib.sha256(b"reborn").digest(), b"", stale.endpoints)
    net.everyone = [reborn if c is stale else c for c in everyone]
    net.by_addr[stale.endpoint.udp] = reborn
    lookup = h.lookup(target)
    h.run()
    found = {c.node_id for c in lookup.result()}
    assert stale.node_id not in found and reborn.node_id in found
    assert len({c.endpoint for c in lookup.result()}) == len(lookup.result())


def test_a_full_bucket_heard_from_recently_is_not_pinged() -> None:
    b = behaviour(k=2)
    full_bucket(b, at=NOW)
    newcomer, out = newcomer_at(b, NOW + GOOD_FOR - 1)
    assert out == [] and newcomer.node_id not in b.table


# -- key proofs ---------------------------------------------------------------------------


def test_a_requester_enters_the_table_only_after_signing_the_challenge() -> None:
    b = behaviour(prove_keys=True)
    contact, identity = keyed_peer(1)
    addr = contact.endpoint.udp
    assert b.observe_requester(contact, addr, NOW) is None
    assert b.observe_requester(contact, addr, NOW) is None  # one challenge at a time
    [challenge] = of_type(b.poll(), Send)
    ping = challenge.datagram.body
    assert isinstance(ping, Ping) and len(ping.challenge) == 16
    assert contact.node_id not in b.table
    proof = identity.sign(PONG_DOMAIN, ping.challenge)
    b.on_response(answer_to(challenge, Pong(None, proof), contact), addr, NOW + 0.1)
    b.poll()
    assert contact.node_id in b.table
    observed = b.observe_requester(contact, addr, NOW + 1)  # proven: no new challenge
    assert observed is not None and b.poll() == []


def test_a_proof_by_another_key_is_refused_and_the_claim_stays_out() -> None:
    b = behaviour(prove_keys=True)
    victim, _ = keyed_peer(1)
    impostor_key = NodeIdentity.generate(0)[0]
    addr = ("203.0.113.9", 4000)  # the impostor's own address, the victim's ID and key
    claim = Contact(victim.node_id, victim.public_key, (Endpoint(*addr),))
    b.observe_requester(claim, addr, NOW)
    [challenge] = of_type(b.poll(), Send)
    assert isinstance(challenge.datagram.body, Ping)
    forged = impostor_key.sign(PONG_DOMAIN, challenge.datagram.body.challenge)
    b.on_response(answer_to(challenge, Pong(None, forged), claim), addr, NOW + 0.1)
    assert Rejected("key_unproven") in b.poll()
    assert victim.node_id not in b.table
    b.observe_requester(claim, addr, NOW + 1)  # the failed challenge is over: a new one
    assert len(of_type(b.poll(), Send)) == 1


def test_one_subnet_claiming_many_ids_cannot_hold_every_key_challenge() -> None:
    """An address that proved it receives sends requests under hundreds of fresh node IDs
    (cheap at 8 puzzle bits) and never answers their challenges, again as each times out:
    it used to hold all 256 challenges in flight, so no other node could prove its key and
    enter the table, as requester or as responder, for as long as it kept on."""
    b = behaviour(prove_keys=True)
    flooder_addr = ("203.0.113.9", 4000)
    for i in range(300):
        claim = Contact(far_id(1000 + i), b"", (Endpoint(*flooder_addr),))
        assert b.observe_requester(claim, flooder_addr, NOW) is None
    neighbour_addr = ("203.0.113.10", 4000)  # the same /24: it shares the flooder's share
    neighbour = Contact(far_id(2000), b"", (Endpoint(*neighbour_addr),))
    b.observe_requester(neighbour, neighbour_addr, NOW)
    out = b.poll()
    flooded = of_type(out, Send)
    assert len(flooded) == 8  # the subnet's share of the challenges in flight
    honest, identity = keyed_peer(3)  # another subnet
    addr = honest.endpoint.udp
    assert b.observe_requester(honest, addr, NOW) is None
    [challenge] = of_type(b.poll(), Send)  # its challenge goes out all the same
    assert challenge.addr == addr and isinstance(challenge.datagram.body, Ping)
    proof = identity.sign(PONG_DOMAIN, challenge.datagram.body.challenge)
    b.on_response(answer_to(challenge, Pong(None, proof), honest), addr, NOW + 0.1)
    b.poll()
    assert honest.node_id in b.table

    for timer in of_type(out, StartTimer):  # the flooder's challenges time out...
        b.on_timer(timer.timer, timer.when)
    b.poll()
    b.observe_requester(neighbour, neighbour_addr, NOW + 3)  # ...and its subnet has room
    assert [s.addr for s in of_type(b.poll(), Send)] == [neighbour_addr]


def prove(b: OverlayBehaviour, contact: Contact, identity: NodeIdentity, now: float) -> None:
    """``contact`` sends a request from its address and answers the challenge it gets."""
    addr = contact.endpoint.udp
    assert b.observe_requester(contact, addr, now) is None
    [challenge] = of_type(b.poll(), Send)
    assert isinstance(challenge.datagram.body, Ping)
    proof = identity.sign(PONG_DOMAIN, challenge.datagram.body.challenge)
    b.on_response(answer_to(challenge, Pong(None, proof), contact), addr, now + 0.01)
    b.poll()


def test_one_subnet_proving_many_ids_cannot_flush_other_nodes_proofs() -> None:
    """Keys proven are remembered for 8,192 IDs; one subnet proving more than that (fresh
    IDs cost 8 puzzle bits, a proof one round trip) used to push every other node's proof
    out: each was challenged again when it next spoke, and a lookup's end waited for it or
    left it out. Now a subnet beyond its share replaces only its own."""
    b = behaviour(prove_keys=True)
    honest, honest_key = keyed_peer(1)
    prove(b, honest, honest_key, NOW)
    flooder = ("203.0.113.9", 4000)
    for i in range(PROVEN_KEYS_SIZE + 10):
        identity = NodeIdentity.generate(0)[0]
        claim = Contact(identity.node_id, identity.public_key, (Endpoint(*flooder),))
        prove(b, claim, identity, NOW + 1 + i * 0.02)
    assert b._proven_keys.of_subnet("203.0.113") == PROVEN_KEYS_PER_SUBNET
    later = NOW + 1000
    assert b.observe_requester(honest, honest.endpoint.udp, later) is not None
    assert of_type(b.poll(), Send) == []  # still proven: no new challenge


def test_a_subnet_lru_replaces_its_own_subnets_least_recently_used() -> None:
    keys = SubnetLru[bytes, Addr](size=4, per_subnet=2)
    a, b, c, d = (bytes([i]) * 32 for i in range(4))
    keys.remember(a, ("10.0.0.1", 1), "10.0.0")
    keys.remember(b, ("10.0.0.2", 1), "10.0.0")
    keys.touch(a)  # b is now its subnet's least recently used
    keys.remember(c, ("10.0.0.3", 1), "10.0.0")
    assert (keys.get(a), keys.get(b), keys.get(c)) == (("10.0.0.1", 1), None, ("10.0.0.3", 1))
    keys.remember(a, ("10.9.0.1", 1), "10.9.0")  # proved again elsewhere: counted there
    assert (keys.of_subnet("10.0.0"), keys.of_subnet("10.9.0")) == (1, 1)
    keys.remember(d, ("127.0.0.1", 1), None)  # uncounted (loopback on a testnet)
    keys.remember(b, ("10.1.0.1", 1), "10.1.0")
    keys.remember(b"e" * 32, ("10.2.0.1", 1), "10.2.0")  # 5 > size: the oldest (c) goes
    assert keys.get(c) is None and len(keys) == 4 and keys.of_subnet("10.0.0") == 0
    keys.forget(b)
    keys.forget(b)  # (forgetting what is not there changes nothing)
    assert keys.get(b, ("0.0.0.0", 0)) == ("0.0.0.0", 0) and keys.of_subnet("10.1.0") == 0
    assert len(keys) == 3


def test_one_ipv6_32_cannot_flush_a_subnet_lru_from_many_48s() -> None:
    """A /32 holds 65,536 /48s: with a share per /48 alone, its holder flushed a memory of
    4,096 entries from 128 of them (the proofs, tokens and suspects of every other node).
    Now the /32 holds twice a /48's share, replacing its own least recently used."""
    keys = SubnetLru[bytes, Addr](size=4096, per_subnet=32)
    honest = [bytes([1, i]) * 16 for i in range(100)]
    for n, key in enumerate(honest):
        keys.remember(key, (f"198.18.{n}.1", 1), f"198.18.{n}")
    for n in range(10_000):  # one entry from each of 10,000 /48s of one /32
        keys.remember(n.to_bytes(32, "big"), (f"2001:db8:{n:x}::1", 1), f"2001:db8:{n:x}::/48")
    assert all(keys.get(key) is not None for key in honest)
    assert keys.of_block("2001:db8::/32") == 64 and len(keys) == 164
    keys.forget((10_000 - 1).to_bytes(32, "big"))
    assert keys.of_block("2001:db8::/32") == 63


def test_one_ipv6_32_cannot_hold_every_key_challenge_from_many_48s() -> None:
    """Challenges in flight to requesters are capped per /48 (8 of 256); a /32 requesting
    under fresh IDs from 40 of its /48s held all 256, and no other node could prove its
    key while it did. Now the /32 holds 16."""
    b = behaviour(prove_keys=True)
    for i in range(300):
        addr = (f"2001:db8:{i % 40:x}::{i // 40 + 1:x}", 4000)
        claim = Contact(far_id(1000 + i), b"", (Endpoint(*addr),))
        assert b.observe_requester(claim, addr, NOW) is None
    assert len(of_type(b.poll(), Send)) == MAX_KEY_PROOFS_PER_BLOCK == 16
    honest, identity = keyed_peer(3)
    addr = honest.endpoint.udp
    assert b.observe_requester(honest, addr, NOW) is None
    [challenge] = of_type(b.poll(), Send)  # its challenge goes out all the same
    proof = identity.sign(PONG_DOMAIN, challenge.datagram.body.challenge)
    b.on_response(answer_to(challenge, Pong(None, proof), honest), addr, NOW + 0.1)
    b.poll()
    assert honest.node_id in b.table


def test_one_subnet_answering_from_many_addresses_cannot_flush_other_nodes_tokens() -> None:
    """Every answer carries a token for the address it came from, and a node keeps the
    latest of 4,096 addresses for its next request there. One subnet requesting from
    4,100 addresses (one ID, a port each: each address gets a key challenge, and the
    challenge's answer brings a token even when its proof fails) pushed every other
    node's token out: our next request to each went without one, padded (400 bytes a
    find-node, 32 a ping) and unproven, so the node did not observe us and a full answer
    cost one more round trip (a TokenReply). Now a subnet beyond its share replaces only
    its own tokens."""
    b = behaviour(prove_keys=True)
    honest, honest_key = keyed_peer(1)
    prove(b, honest, honest_key, NOW)  # (its pong brings no token: a ping answer that does)
    b.ping(honest.endpoint.udp, NOW)
    [send] = of_type(b.poll(), Send)
    proof = honest_key.sign(PONG_DOMAIN, send.datagram.body.challenge)
    b.on_response(answer_to(send, Pong(None, proof), honest, TOKEN), honest.endpoint.udp, NOW)
    b.poll()
    claimer, _ = keyed_peer(2)
    for port in range(TOKEN_CACHE_SIZE + 10):
        addr = ("203.0.113.9", 10000 + port)
        claim = Contact(claimer.node_id, claimer.public_key, (Endpoint(*addr),))
        assert b.observe_requester(claim, addr, NOW + 1) is None
        [challenge] = of_type(b.poll(), Send)
        bad_proof = Pong(None, bytes(64))
        b.on_response(answer_to(challenge, bad_proof, claim, b"f" * 16), addr, NOW + 1)
        assert Rejected("key_unproven") in b.poll()
    b.ping(honest.endpoint.udp, NOW + 2)
    [again] = of_type(b.poll(), Send)
    assert (again.datagram.token, again.datagram.padding) == (TOKEN, 0)
    assert b._tokens.of_subnet("203.0.113") == TOKENS_PER_SUBNET


def test_a_testnet_on_loopback_keeps_every_token() -> None:
    """Nodes of a local testnet share 127.0.0.1: their tokens are not capped per subnet
    there, and are anywhere else."""
    for allow_loopback, kept in ((True, 40), (False, TOKENS_PER_SUBNET)):
        b = behaviour(allow_loopback=allow_loopback)
        for i in range(40):
            addr = ("127.0.0.1", 5000 + i)
            b.ping(addr, NOW)
            [send] = of_type(b.poll(), Send)
            b.on_response(answer_to(send, Pong(), None, TOKEN), addr, NOW)
        assert len(b._tokens) == kept


def test_a_testnet_on_loopback_keeps_every_proof() -> None:
    """On a local testnet every node is on 127.0.0.1: its proofs are not capped per subnet
    there (as the table and the challenge caps exempt it), and are anywhere else."""
    for allow_loopback, kept in ((True, 40), (False, PROVEN_KEYS_PER_SUBNET)):
        b = behaviour(prove_keys=True, allow_loopback=allow_loopback)
        for i in range(40):
            identity = NodeIdentity.generate(0)[0]
            endpoint = Endpoint("127.0.0.1", 5000 + i)
            prove(b, Contact(identity.node_id, identity.public_key, (endpoint,)), identity, NOW)
        assert len(b._proven_keys) == kept


# -- a scripted network for lookups ---------------------------------------------------------


Fate = Callable[[Send, float], list[tuple[float, Datagram, Addr]]]


@dataclass
class Harness:
    """The test's driver: a virtual clock and a heap of timers and deliveries. ``fate``
    says what the network does with each request sent: (when, datagram, from address)."""

    b: OverlayBehaviour
    fate: Fate
    now: float = NOW
    sent: list[Send] = field(default_factory=list)
    ended: list[RequestEnded] = field(default_factory=list)
    done: list[Command] = field(default_factory=list)
    added: list[Contact] = field(default_factory=list)  # announced new to the table
    _heap: list[tuple[float, int, Callable[[float], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def at(self, when: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), action))

    def flush(self) -> None:
        for command in self.b.poll():
            if isinstance(command, Send):
                self.sent.append(command)
                for when, dgram, addr in self.fate(command, self.now):
                    self.at(when, partial(self.b.on_response, dgram, addr))
            elif isinstance(command, StartTimer):
                self.at(command.when, partial(self.b.on_timer, command.timer))
            elif isinstance(command, RequestEnded):
                self.ended.append(command)
            elif isinstance(command, LookupDone | PingDone):
                self.done.append(command)
            elif isinstance(command, ContactAdded):
                self.added.append(command.contact)

    def run(self, until: float | None = None) -> None:
        self.flush()
        while self._heap and (until is None or self._heap[0][0] <= until):
            when, _, action = heapq.heappop(self._heap)
            self.now = when
            action(when)
            self.flush()

    def lookup(self, target: bytes, **options: Any) -> Lookup:
        lookup = self.b.lookup(target, self.now, **options)
        self.flush()
        return lookup

    def lookups_done(self) -> list[Lookup]:
        return [c.lookup for c in self.done if isinstance(c, LookupDone)]


def closest_to(target: bytes, contacts: list[Contact], count: int) -> list[Contact]:
    key = int.from_bytes(target, "big")
    return sorted(contacts, key=lambda c: c.key ^ key)[:count]


class Network:
    """Everyone answers find-node with the true k closest (as full tables would), after
    ``rtt`` seconds, unless it is in ``dead``."""

    def __init__(self, everyone: list[Contact], k: int = 20, rtt: float = 0.02) -> None:
        self.everyone, self.k, self.rtt = everyone, k, rtt
        self.by_addr = {c.endpoint.udp: c for c in everyone}
        self.dead: set[Addr] = set()
        self.late: dict[Addr, float] = {}  # answers only after this many seconds

    def __call__(self, send: Send, now: float) -> list[tuple[float, Datagram, Addr]]:
        me = self.by_addr.get(send.addr)
        if me is None or send.addr in self.dead:
            return []
        body = send.datagram.body
        if isinstance(body, FindNode):
            others = [c for c in self.everyone if c.node_id != me.node_id]
            reply: Body = Nodes(tuple(closest_to(body.target, others, self.k)))
        else:
            reply = Pong()
        delay = self.late.get(send.addr, self.rtt)
        return [(now + delay, answer_to(send, reply, me), send.addr)]


def scripted(size: int, known: int, **config: Any) -> tuple[list[Contact], Network, Harness]:
    """A network of ``size`` peers and a behaviour (``config``) that knows ``known`` of them."""
    everyone = [peer(i) for i in range(size)]
    net = Network(everyone)
    b = behaviour(**config)
    for c in everyone[:known]:
        b.table.observe(c, NOW)
    return everyone, net, Harness(b, net)


def answers_with(h: Harness, net: Network, answerer: Contact, listed: Sequence[Contact]) -> None:
    """``answerer`` joins the scripted network and answers every find-node with ``listed``
    (a hostile node's answer); every other node answers honestly."""
    net.by_addr[answerer.endpoint.udp] = answerer
    honest = net.__call__

    def hostile(send: Send, now: float) -> list[tuple[float, Datagram, Addr]]:
        if send.addr != answerer.endpoint.udp:
            return honest(send, now)
        return [(now + 0.01, answer_to(send, Nodes(tuple(listed)), answerer), send.addr)]

    h.fate = hostile


def test_a_lookup_finds_the_true_k_closest_with_alpha_in_flight() -> None:
    everyone, _, h = scripted(200, known=30)  # a partial table
    target = hashlib.sha256(b"target").digest()
    lookup = h.lookup(target)
    assert len(h.sent) == 3  # alpha queries, then it waits for answers
    h.run()
    assert h.lookups_done() == [lookup]
    assert lookup.result() == closest_to(target, everyone, 20)
    assert lookup.timeouts == 0 and lookup.queries == len(h.sent)
    # each query, and the answers taken before the end (those in flight then come later)
    assert lookup.queries + 20 <= lookup.messages < 2 * lookup.queries
    assert 2 <= lookup.hops(lookup.result()) <= 6
    assert len(h.b.table) > 30  # those that answered were observed


def test_a_peer_that_fails_is_suspect_and_skipped_until_its_suspicion_runs_out() -> None:
    everyone, net, h = scripted(40, known=10, alpha=3)
    target = hashlib.sha256(b"x").digest()
    dead = closest_to(target, everyone[:10], 1)[0]
    net.dead.add(dead.endpoint.udp)
    h.lookup(target)
    h.run()
    assert dead.endpoint.udp in {s.addr for s in h.sent}
    assert dead.node_id in h.b.table  # one failure does not evict (no replacement waits)

    h.sent.clear()
    h.lookup(target)
    h.run()
    assert dead.endpoint.udp not in {s.addr for s in h.sent}  # suspect: skipped

    h.now += SUSPECT_SECONDS
    h.sent.clear()
    h.lookup(target)
    h.run()
    assert dead.endpoint.udp in {s.addr for s in h.sent}  # asked again


def test_a_newcomer_taking_a_failed_contact_s_place_is_announced() -> None:
    """Every way into the table announces the contact (`ContactAdded`, store-on-join): a
    newcomer that waited in the replacement cache (its bucket's contacts heard lately, so
    nobody was pinged) enters when a lookup's query to one of them fails, and is
    announced as one that found room (the liveness check's way: the test above)."""
    b = behaviour(k=2)
    members = full_bucket(b, at=NOW)
    newcomer, out = newcomer_at(b, NOW + 1)
    assert not of_type(out, Send) and newcomer.node_id not in b.table  # waiting, unpinged
    net = Network([*members, newcomer])
    net.dead.add(members[0].endpoint.udp)
    h = Harness(b, net, now=NOW + 2)
    h.lookup(far_id(50))
    h.run()
    assert members[0].endpoint.udp in {s.addr for s in h.sent}
    assert members[0].node_id not in b.table and h.added == [newcomer]
    assert newcomer.node_id in b.table


def test_suspects_are_asked_when_fewer_than_alpha_others_remain() -> None:
    everyone, net, h = scripted(3, known=3, alpha=3)
    net.dead.update(c.endpoint.udp for c in everyone)
    target = hashlib.sha256(b"y").digest()
    h.lookup(target)
    h.run()
    assert len(h.sent) == 3 and len(h.lookups_done()) == 1
    h.sent.clear()
    h.lookup(target)  # all three are suspect: asking them beats asking nobody
    assert len(h.sent) == 3


def test_a_lookup_short_of_k_waits_one_more_timeout_for_a_late_answer() -> None:
    everyone, net, h = scripted(3, known=3, k=3, alpha=3, rto_initial=0.1)
    slow = everyone[0]
    net.late[slow.endpoint.udp] = 0.15  # past its adaptive deadline, before the hard one
    lookup = h.lookup(hashlib.sha256(b"z").digest())
    h.run()
    assert h.lookups_done() == [lookup]
    assert lookup.timeouts == 1  # it missed the adaptive deadline...
    assert slow in lookup.result() and len(lookup.result()) == 3  # ...but its answer counted
    assert lookup.ended == NOW + 0.15


def test_a_lookup_short_of_k_ends_after_the_grace_without_the_silent_peer() -> None:
    everyone, net, h = scripted(3, known=3, k=3, alpha=3, rto_initial=0.1)
    silent = everyone[0]
    net.dead.add(silent.endpoint.udp)
    lookup = h.lookup(hashlib.sha256(b"z").digest())
    h.run(until=NOW + 0.12)
    assert lookup.timeouts == 1
    assert h.lookups_done() == []  # finished, short of k, the silent query still open
    h.run()
    assert h.lookups_done() == [lookup]
    assert silent not in lookup.result() and len(lookup.result()) == 2
    # its deadline (0.1 s), then one more adaptive timeout: 50 ms, the floor, after two
    # 20 ms round trips; not the 2 s hard deadline
    assert lookup.ended == pytest.approx(NOW + 0.1 + 0.05)


def near(target: bytes, i: int) -> bytes:
    """An ID closer to ``target`` than any random one (its first 8 bytes), the ``i``-th."""
    return target[:8] + hashlib.sha256(f"near {i}".encode()).digest()[8:]


@pytest.mark.parametrize(
    ("answerer_ip", "followed", "not_followed"),
    [
        (  # a public node: only public addresses are followed
            "198.18.7.7",
            ["203.0.113.5", "2001:db8::5"],
            ["127.0.0.1", "10.0.0.5", "192.168.1.5", "172.16.0.5", "100.64.0.5",
             "169.254.169.254", "fd00::5", "::1", "0.0.0.0", "255.255.255.255", "224.0.0.251",
             "240.0.0.1", "ff02::1", "fe80::5", "::ffff:127.0.0.1", "::", "198.51.100.1"],
        ),
        (  # a node on our private network: private and public, no loopback
            "10.9.9.9",
            ["10.0.0.5", "192.168.1.5", "fd00::5", "203.0.113.5"],
            ["127.0.0.1", "::1", "0.0.0.0", "224.0.0.251"],
        ),
        (  # a node on our host (a local testnet): anything but martians
            "127.0.0.1",
            ["127.0.0.1", "10.0.0.5", "203.0.113.5"],
            ["0.0.0.0", "255.255.255.255", "ff02::1"],
        ),
    ],
)  # fmt: skip
def test_a_lookup_follows_only_contacts_the_answerer_could_reach_from_where_we_reached_it(
    answerer_ip: str, followed: list[str], not_followed: list[str]
) -> None:
    _, net, h = scripted(30, known=30)
    target = hashlib.sha256(b"martians").digest()
    answerer = Contact(near(target, 0), b"", (Endpoint(answerer_ip, 4009),))
    h.b.table.observe(answerer, NOW)  # the closest we know: asked first
    # (198.51.100.1:4000 is the local node's own address: it would ask itself)
    listed = [
        Contact(near(target, i + 1), b"", (Endpoint(ip, 4000),))
        for i, ip in enumerate(followed + not_followed)
    ]
    answers_with(h, net, answerer, listed)
    h.lookup(target)
    h.run()
    asked = {s.addr for s in h.sent if isinstance(s.datagram.body, FindNode)}
    assert answerer.endpoint.udp in asked
    assert {(ip, 4000) for ip in followed} <= asked
    assert not asked & {(ip, 4000) for ip in not_followed}
    assert len(h.lookups_done()) == 1


@pytest.mark.parametrize(
    ("victim_ip", "address_of"),
    [("192.0.2.80", lambda i: "192.0.2.80"), ("2001:db8:1:2::", lambda i: f"2001:db8:1:2::{i:x}")],
)
def test_a_lookup_asks_at_most_two_contacts_at_one_ip_address(
    victim_ip: str, address_of: Callable[[int], str]
) -> None:
    """A hostile node lists 20 contacts (fresh IDs, closer than anyone) at one victim's
    address, each on another port (or, IPv6, at 20 addresses of its /64): every lookup
    that asked it used to send the victim 20 padded first requests (~9.3 KB for its
    ~1.1 KB answer) and wait out their timeouts. A lookup takes at most 2 contacts at
    one IP address or IPv6 /64 (as a bucket takes 2 of a /24), loopback exempt on a
    local testnet."""
    _, net, h = scripted(30, known=30)
    target = hashlib.sha256(b"reflect").digest()
    answerer = Contact(near(target, 0), b"", (Endpoint("203.0.113.7", 4000),))
    h.b.table.observe(answerer, NOW)
    victim = [Contact(near(target, i + 1), b"", (Endpoint(address_of(i), 1000 + i),))
              for i in range(20)]  # fmt: skip
    answers_with(h, net, answerer, victim)
    h.lookup(target)
    h.run()
    to_victim = [s for s in h.sent if s.addr[0].startswith(victim_ip)]
    sent_bytes = sum(len(encode_datagram(s.datagram)) for s in to_victim)
    print(f"victim got {len(to_victim)} requests, {sent_bytes} bytes")
    assert len(to_victim) == 2
    assert len(h.lookups_done()) == 1


def test_a_hostile_answer_cannot_use_up_an_honest_nodes_share_of_a_lookup() -> None:
    """The cap on contacts at one IP address is per answer: counted over the whole lookup,
    a hostile answer listing two fake IDs at each of the true closest nodes' addresses
    (other ports) used up their share, and the lookup then refused the real nodes when
    honest answers listed them."""
    everyone, net, h = scripted(60, known=20)
    target = hashlib.sha256(b"crowded out").digest()
    truly_closest = closest_to(target, everyone, 20)
    answerer = Contact(near(target, 0), b"", (Endpoint("203.0.113.7", 4000),))
    h.b.table.observe(answerer, NOW)
    fakes = [
        Contact(near(target, 1 + 2 * i + j), b"", (Endpoint(c.endpoint.ip, 6000 + j),))
        for i, c in enumerate(truly_closest[:10])
        for j in range(2)
    ]
    answers_with(h, net, answerer, fakes)
    lookup = h.lookup(target)
    h.run()
    assert lookup.result() == closest_to(target, [*everyone, answerer], 20)


class EverCloser:
    """Hostile nodes (each at an address of its own), each answering a find-node with
    ``fresh`` new contacts closer to the target than any before (IDs one apart, far closer
    than any honest node): the farthest of them another such node, the rest at addresses
    where nobody answers (``dead`` of them). Honest peers answer as ``honest`` does."""

    def __init__(
        self,
        honest: Network,
        target: bytes,
        fresh: int,
        dead: int,
        address: Callable[[int], Endpoint] = lambda i: Endpoint(f"2001:db8::{i + 1:x}", 4000),
    ) -> None:
        self.honest, self.fresh, self.dead, self.address = honest, fresh, dead, address
        self.target = int.from_bytes(target, "big")
        self.made: list[Contact] = []
        self.alive: dict[Addr, Contact] = {}
        self.hostile: set[Addr] = set()
        self.first = self._next(alive=True)

    def _next(self, *, alive: bool) -> Contact:
        i = len(self.made)
        node_id = (self.target ^ (1 << 200) - i).to_bytes(32, "big")
        contact = Contact(node_id, b"", (self.address(i),))
        self.made.append(contact)
        self.hostile.add(contact.endpoint.udp)
        if alive:
            self.alive[contact.endpoint.udp] = contact
        return contact

    def __call__(self, send: Send, now: float) -> list[tuple[float, Datagram, Addr]]:
        me = self.alive.get(send.addr)
        if me is None:
            return [] if send.addr in self.hostile else self.honest(send, now)
        listed = [self._next(alive=i >= self.dead) for i in range(self.fresh)]
        body = Nodes(tuple(reversed(listed)))  # the live one, farthest, first
        return [(now + self.honest.rtt, answer_to(send, body, me), send.addr)]


@pytest.mark.parametrize(("dead", "rtt"), [(0, 0.01), (19, 0.3)])
def test_a_lookup_fed_ever_closer_contacts_ends_within_its_query_cap_and_time_budget(
    dead: int, rtt: float
) -> None:
    """Hostile answers of 20 fresh contacts that all answer in turn: the query cap (8 k
    a lookup) ends it. Of 19 dead and one that answers, each dead one holding a slot for
    an adaptive timeout (~ the round trip, 0.3 s): the time budget (10 s) ends it."""
    _, net, h = scripted(30, known=30)
    net.rtt = rtt
    target = hashlib.sha256(b"ever closer").digest()
    hostile = EverCloser(net, target, fresh=20, dead=dead)
    h.fate = hostile
    h.b.table.observe(hostile.first, NOW)
    lookup = h.lookup(target)
    h.run(until=NOW + 60)
    assert h.lookups_done() == [lookup]
    assert lookup.queries <= 8 * 20
    assert lookup.ended - lookup.started <= h.b.config.lookup_timeout
    assert len(lookup.result()) == 20  # the closest that answered: hostile ones


def test_one_subnet_failing_many_queries_cannot_flush_other_nodes_suspicion() -> None:
    """A node that failed a query is suspect for 10 s, remembered among 4,096. Hostile
    answers from one /24 listing fresh IDs of that /24 that never answer (19 of 20) made
    one node's lookups fail 4,100 queries in a few seconds, which pushed every other
    suspect out: an honest node that had just died was asked again by the next lookup,
    which waited out its timeout. Now a subnet beyond its share replaces only its own
    suspects."""
    everyone, net, h = scripted(30, known=30)
    check = hashlib.sha256(b"check").digest()
    died = closest_to(check, everyone, 1)[0]
    net.dead.add(died.endpoint.udp)
    h.lookup(check)
    h.run(until=NOW + 3)  # (past the hard deadline of its query)
    assert died.endpoint.udp in {s.addr for s in h.sent}
    suspect_until = h.b._suspects.get(died.node_id)
    assert suspect_until is not None

    target = hashlib.sha256(b"flood").digest()
    hostile = EverCloser(
        net, target, fresh=20, dead=19,
        address=lambda i: Endpoint(f"203.0.113.{i % 250 + 1}", 4000 + i // 250),
    )  # fmt: skip
    h.fate = hostile
    h.b.table.observe(hostile.first, h.now)
    h.ended.clear()
    for _ in range(64):  # (each fails ~70 queries)
        h.lookup(target)
    h.run(until=suspect_until - 1)
    failed = h.ended.count(RequestEnded("findnode", "timeout"))
    print(f"{failed} queries of one /24 failed by {h.now - NOW:.1f} s")
    assert failed > SUSPECT_CACHE_SIZE

    h.sent.clear()
    h.lookup(check)
    h.run(until=suspect_until)
    assert died.endpoint.udp not in {s.addr for s in h.sent}  # still suspect: skipped
    assert h.b._suspects.of_subnet("203.0.113") == SUSPECTS_PER_SUBNET


class KeyedNetwork(Network):
    """``Network`` of nodes that hold their keys: a ping's challenge is answered with the
    node key's signature."""

    def __init__(self, keyed: list[tuple[Contact, NodeIdentity]]) -> None:
        super().__init__([c for c, _ in keyed])
        self.keys = {c.node_id: identity for c, identity in keyed}

    def __call__(self, send: Send, now: float) -> list[tuple[float, Datagram, Addr]]:
        me = self.by_addr.get(send.addr)
        body = send.datagram.body
        if me is None or not isinstance(body, Ping) or me.node_id not in self.keys:
            return super().__call__(send, now)
        proof = self.keys[me.node_id].sign(PONG_DOMAIN, body.challenge)
        return [(now + self.rtt, answer_to(send, Pong(None, proof), me), send.addr)]


def test_a_lookup_result_holds_only_nodes_that_proved_their_key_at_their_address() -> None:
    """A node ID is the hash of a public key anyone can copy. Hostile nodes listed the
    true closest nodes' IDs (their public keys) at hostile addresses and answered there
    under those IDs: the lookup counted them as found, so a put would have gone to the
    hostile addresses in the honest nodes' names (an eclipse without grinding any ID).
    They cannot sign a challenge with those keys, so they are not in the result. And a
    node in the result is as it described itself: a gRPC port a third party listed for
    it is not used."""
    keyed = [keyed_peer(i) for i in range(40)]
    net = KeyedNetwork(keyed)
    everyone = [c for c, _ in keyed]
    target = hashlib.sha256(b"impersonated").digest()
    truly_closest = closest_to(target, everyone, 20)
    copies = {}  # hostile address -> the honest contact it poses as
    for i, honest in enumerate(truly_closest[:10]):
        addr = (f"203.0.113.{i // 2 + 1}", 5000 + i % 2)  # 2 an address: the per-IP cap
        copies[addr] = Contact(honest.node_id, honest.public_key, (Endpoint(*addr),))
    liar = Contact(near(target, 99), b"", (Endpoint("203.0.114.1", 4000),))
    # and one honest node listed at its own address with another gRPC port than its own
    misdescribed = truly_closest[10]
    wrong_port = Endpoint(misdescribed.endpoint.ip, misdescribed.endpoint.udp_port, 1)
    listed_wrong = Contact(misdescribed.node_id, misdescribed.public_key, (wrong_port,))

    def hostile(send: Send, now: float) -> list[tuple[float, Datagram, Addr]]:
        body = send.datagram.body
        if send.addr == liar.endpoint.udp and isinstance(body, FindNode):
            listed = Nodes((*copies.values(), listed_wrong))
            return [(now + 0.01, answer_to(send, listed, liar), send.addr)]
        posing = copies.get(send.addr)
        if posing is None:
            return net(send, now)
        if isinstance(body, FindNode):  # answers as the honest node, from its own address
            reply = Nodes(tuple(closest_to(body.target, everyone, 20)))
            return [(now + 0.01, answer_to(send, reply, posing), send.addr)]
        return [(now + 0.01, answer_to(send, Pong(None, bytes(64)), posing), send.addr)]

    b = behaviour(prove_keys=True)
    h = Harness(b, hostile)
    b.table.observe(liar, NOW)  # the closest known: asked first
    for c in everyone[:10]:
        b.table.observe(c, NOW)
    lookup = h.lookup(target)
    h.run()
    assert h.lookups_done() == [lookup]
    result = lookup.result()
    assert not {c.endpoint.udp for c in result} & set(copies)
    assert {c.node_id for c in result} <= {c.node_id for c in everyone}
    assert len(result) >= 10
    assert misdescribed in result  # as it described itself, not as the liar listed it
    assert all(c.endpoint.grpc_port == 0 for c in result)


def test_challenges_held_by_requesters_do_not_keep_the_nodes_we_ask_out() -> None:
    """Requesters from 40 subnets hold every capped key challenge (256, 8 a subnet) and
    never answer. The nodes a lookup of ours asks are challenged all the same (as many
    as our own requests, outside the caps): the lookup's result, which holds only proven
    nodes, would otherwise be empty, and none of them would enter the table."""
    keyed = [keyed_peer(i) for i in range(40)]
    net = KeyedNetwork(keyed)
    everyone = [c for c, _ in keyed]
    b = behaviour(prove_keys=True)
    for i in range(320):  # 40 subnets x 8
        addr = (f"203.0.{i // 8}.9", 4000)
        b.observe_requester(Contact(far_id(5000 + i), b"", (Endpoint(*addr),)), addr, NOW)
    assert len(of_type(b.poll(), Send)) == 256
    h = Harness(b, net)
    for c in everyone[:10]:
        b.table.observe(c, NOW)
    target = hashlib.sha256(b"held").digest()
    lookup = h.lookup(target)
    h.run(until=NOW + 1.5)  # (before the requesters' challenges time out)
    assert h.lookups_done() == [lookup]
    assert lookup.result() == closest_to(target, everyone, 20)


def test_a_disjoint_lookup_never_asks_a_peer_twice() -> None:
    everyone, _, h = scripted(120, known=60)
    target = hashlib.sha256(b"d").digest()
    lookup = h.lookup(target, paths=3)
    h.run()
    asked = [s.addr for s in h.sent]
    assert len(asked) == len(set(asked)) == lookup.queries
    assert lookup.result() == closest_to(target, everyone, 20)


# -- refresh ------------------------------------------------------------------------------


def test_refresh_looks_up_every_stale_bucket_once_per_interval() -> None:
    _, _, h = scripted(100, known=100)
    b = h.b
    lookups = b.refresh(h.now, 600.0)
    h.run()
    low = min(b.table.bucket_sizes())
    assert len(lookups) == 256 - low  # a random ID in every bucket from the closest up
    assert sorted(b.table.bucket_index(lk.target) for lk in lookups) == list(range(low, 256))
    assert set(h.lookups_done()) == set(lookups)
    assert b.refresh(h.now + 1, 600.0) == []  # each lookup marked its bucket refreshed
    assert len(b.refresh(h.now + 601, 600.0)) == len(lookups)


# -- every request and every operation ends exactly once -------------------------------------


FATES = ("answer", "late", "after_deadline", "never", "spoofed", "token", "wrong_body")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_whatever_the_network_does_every_request_and_operation_ends_once(
    data: st.DataObject,
) -> None:
    everyone, truth, h = scripted(30, known=12, alpha=3, rto_initial=0.1)
    b = h.b

    def fate(send: Send, now: float) -> list[tuple[float, Datagram, Addr]]:
        answers = truth(send, now)
        how = data.draw(st.sampled_from(FATES))
        if how == "never" or not answers:
            return []
        when, dgram, addr = answers[0]
        return {
            "answer": [(when, dgram, addr)],
            "late": [(now + 0.5, dgram, addr)],  # past the adaptive deadline
            "after_deadline": [(now + 2.5, dgram, addr)],
            "spoofed": [(when, dgram, ("192.0.2.66", 6666)), (when + 0.3, dgram, addr)],
            "token": [(when, Datagram(dgram.request_id, TokenReply(), None, TOKEN), addr)],
            "wrong_body": [(when, Datagram(dgram.request_id, Pong(), dgram.sender), addr)],
        }[how]

    h.fate = fate
    lookups = [h.lookup(hashlib.sha256(bytes([i])).digest()) for i in range(3)]
    pings = [b.ping(c.endpoint.udp, h.now) for c in everyone[20:23]]
    h.run()
    assert sorted(map(id, h.lookups_done())) == sorted(map(id, lookups))
    ended_pings = [c.ping for c in h.done if isinstance(c, PingDone)]
    assert sorted(map(id, ended_pings)) == sorted(map(id, pings))
    assert len(h.ended) == len(h.sent)  # each request: answered or timed out, once
    assert len(b.tracker) == 0
    answered = {s.addr for s in h.sent}
    for lookup in lookups:
        assert lookup.done and all(c.endpoint.udp in answered for c in lookup.result())
