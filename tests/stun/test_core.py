"""The sans-I/O STUN/TURN core: Binding, the TURN methods, credentials, quotas, hardening."""

from __future__ import annotations

import os
import struct
from collections import Counter
from pathlib import Path

import pytest
from dna_core.ops.config import ConfigError, load_config
from dna_stun import attributes as attr
from dna_stun.auth import CLOCK_SKEW_S, Credentials, Nonces, auth_secret_password
from dna_stun.config import (
    ENV_PREFIX,
    MAX_NONCE_LIFETIME_S,
    MAX_REALM_BYTES,
    MIN_NONCE_LIFETIME_S,
    UINT32_MAX,
    StunServiceConfig,
)
from dna_stun.core import (
    AUTH_FAILURE_REASONS,
    DIRECTIONS,
    KNOWN_ATTRIBUTES,
    MAX_DATA_PAYLOAD,
    MAX_UNPROVEN_GROWTH,
    REFUSAL_REASONS,
    REQUEST_KINDS,
    Limits,
    Send,
    TransactionIds,
    TurnCore,
)
from dna_stun.message import (
    Class,
    Message,
    Method,
    channel_data,
    check_integrity,
    encode,
    long_term_key,
    parse,
)
from dna_stun.policy import RelayPolicy
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from turn_client import Client, error_code, is_success

NOW = 1_800_000_000.0
SERVER = ("198.51.100.1", 3478)
SERVER6 = "2001:db8::1"  # the relay address for IPv6 allocations, where the core has one
CLIENT = ("203.0.113.5", 40000)
PEER = ("203.0.113.77", 5000)
REALM = "dna"
SECRET = "s3cret"


class Ports:
    """Relay ports as numbers: what the asyncio adapter does with sockets."""

    def __init__(self, free: int = 100) -> None:
        self.next, self.free, self.open_now = 50000, free, set[tuple[str, int]]()

    def open(self, even: bool, family: int) -> tuple[str, int] | None:
        if len(self.open_now) >= self.free:
            return None
        self.next += 2 if even and self.next % 2 == 0 else 1
        if even and self.next % 2:
            self.next += 1
        relay = (SERVER6 if family == attr.FAMILY_IPV6 else SERVER[0], self.next)
        self.open_now.add(relay)
        return relay

    def close(self, relay: tuple[str, int]) -> None:
        self.open_now.remove(relay)


USERS = {"alice": "pw", "bob": "pw2"}  # make_core's long-term users


def make_core(
    limits: Limits | None = None, allowed: tuple[str, ...] = (), free: int = 100,
    families: frozenset[int] = frozenset({attr.FAMILY_IPV4}),
) -> TurnCore:  # fmt: skip
    policy = RelayPolicy(allowed=allowed)
    policy.add_own_endpoint(SERVER)
    return TurnCore(
        credentials=Credentials(REALM, USERS, [SECRET]),
        nonces=Nonces(600.0, key=b"k" * 32),
        policy=policy,
        ports=Ports(free),
        limits=limits or Limits(),
        relay_families=families,
        unix_time=lambda: NOW,  # the tests' monotonic clock reads Unix time too
    )


def assert_counted_under_known_labels(core: TurnCore) -> None:
    """The service exports the known label values from the start (at 0): a reason counted
    outside them would still be exported, but missing from the docs and the zero series."""
    stats = core.stats
    assert set(stats.refusals) <= set(REFUSAL_REASONS), stats.refusals
    assert set(stats.auth_failures) <= set(AUTH_FAILURE_REASONS), stats.auth_failures
    assert set(stats.requests) <= set(REQUEST_KINDS), stats.requests
    assert set(stats.relayed_packets) | set(stats.relayed_bytes) <= set(DIRECTIONS)


def one(out: list[Send], to: tuple[str, int] = CLIENT) -> bytes:
    assert len(out) == 1 and out[0].via is None and out[0].to == to
    return out[0].data


def ask(core: TurnCore, client: Client, data: bytes, now: float = NOW, src=CLIENT):  # type: ignore[no-untyped-def]
    return client.learn(one(core.on_client_datagram(data, src, now), src))


def allocate_reply(core: TurnCore, client: Client, now: float, src: tuple[str, int]) -> Message:
    """The answer to an Allocate from ``src``, signed after its 401."""
    first = client.request(Method.ALLOCATE, client.allocate_attrs())
    client.learn(core.on_client_datagram(first, src, now)[0].data)
    signed = client.request(Method.ALLOCATE, client.allocate_attrs())
    return client.learn(core.on_client_datagram(signed, src, now)[0].data)


def allocate(
    core: TurnCore, client: Client, now: float = NOW, extra: list[tuple[int, bytes]] | None = None,
    src: tuple[str, int] = CLIENT,
) -> tuple[str, int]:  # fmt: skip
    attrs = client.allocate_attrs() + (extra or [])
    first = ask(core, client, client.request(Method.ALLOCATE, attrs), now, src)
    assert error_code(first) == 401
    response = ask(core, client, client.request(Method.ALLOCATE, attrs), now, src)
    assert is_success(response, Method.ALLOCATE), error_code(response)
    assert check_integrity(response, client.key)
    value = response.get(attr.XOR_RELAYED_ADDRESS)
    assert value is not None
    return attr.decode_xor_address(value, response.transaction_id)


def test_binding_answers_the_reflexive_address_with_a_fingerprint() -> None:
    core, tid = make_core(), b"t" * 12
    response = parse(
        one(core.on_client_datagram(encode(Method.BINDING, Class.REQUEST, tid), CLIENT, NOW))
    )
    assert is_success(response, Method.BINDING)
    assert attr.decode_xor_address(response.get(attr.XOR_MAPPED_ADDRESS) or b"", tid) == CLIENT
    assert response.attributes[-1].type == attr.FINGERPRINT  # parse checked its value


@pytest.mark.parametrize("sha256", [False, True])
def test_authenticated_binding_is_signed_with_the_requests_algorithm(sha256: bool) -> None:
    core, client = make_core(), Client("alice", "pw", sha256=sha256)
    assert (
        error_code(ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs())))
        == 401
    )
    response = ask(core, client, client.request(Method.BINDING))
    assert is_success(response, Method.BINDING)
    wanted = attr.MESSAGE_INTEGRITY_SHA256 if sha256 else attr.MESSAGE_INTEGRITY
    assert response.find(wanted) is not None and check_integrity(response, client.key)
    client.password = "wrong"
    refused = ask(core, client, client.request(Method.BINDING))
    assert error_code(refused) == 401 and core.stats.auth_failures["bad_integrity"] == 1


def test_relay_both_ways_over_channels_and_indications() -> None:
    core, client = make_core(), Client("alice", "pw")
    relay = allocate(core, client)
    assert relay in core.by_relay
    # Before a permission, nothing flows either way.
    assert core.on_peer_datagram(b"early", relay, PEER, NOW) == []
    assert core.stats.refusals["no_permission"] == 1
    ok = ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER,)))
    assert is_success(ok, Method.CREATE_PERMISSION) and check_integrity(ok, client.key)
    peer_attr = (attr.XOR_PEER_ADDRESS, attr.encode_xor_address(PEER, b"i" * 12))
    send = encode(Method.SEND, Class.INDICATION, b"i" * 12, [peer_attr, (attr.DATA, b"hello")])
    assert core.on_client_datagram(send, CLIENT, NOW) == [Send(relay, b"hello", PEER)]
    [back] = core.on_peer_datagram(b"hi there", relay, PEER, NOW)
    data = parse(back.data)
    assert (data.method, data.cls, back.to) == (Method.DATA, Class.INDICATION, CLIENT)
    assert data.get(attr.DATA) == b"hi there"
    assert (
        attr.decode_xor_address(data.get(attr.XOR_PEER_ADDRESS) or b"", data.transaction_id) == PEER
    )
    number = [(attr.CHANNEL_NUMBER, attr.channel_number(0x4001))]
    bound = ask(core, client, client.request(Method.CHANNEL_BIND, number, peers=(PEER,)))
    assert is_success(bound, Method.CHANNEL_BIND)
    assert core.on_client_datagram(channel_data(0x4001, b"x" * 120), CLIENT, NOW) == [
        Send(relay, b"x" * 120, PEER)
    ]
    [back] = core.on_peer_datagram(b"y" * 7, relay, PEER, NOW)
    assert back.data == struct.pack("!HH", 0x4001, 7) + b"y" * 7
    assert core.stats.relayed_packets == {"client_to_peer": 2, "peer_to_client": 2}
    assert core.stats.relayed_bytes["client_to_peer"] == 125
    # An unbound channel, and a channel after its binding expired, are dropped.
    assert core.on_client_datagram(channel_data(0x4002, b"z"), CLIENT, NOW) == []
    assert core.on_client_datagram(channel_data(0x4001, b"z"), CLIENT, NOW + 601) == []
    assert core.stats.refusals["unknown_channel"] == 1


def _bound(core: TurnCore, client: Client, number: int = 0x4001) -> tuple[str, int]:
    """An allocation with ``number`` bound to PEER; its relay address."""
    relay = allocate(core, client)
    attrs = [(attr.CHANNEL_NUMBER, attr.channel_number(number))]
    assert is_success(
        ask(core, client, client.request(Method.CHANNEL_BIND, attrs, peers=(PEER,))),
        Method.CHANNEL_BIND,
    )
    return relay


def test_a_batch_from_clients_is_answered_in_order_with_every_refusal_counted() -> None:
    core, client = make_core(), Client("alice", "pw")
    relay = _bound(core, client)
    other, tid = ("203.0.113.6", 40001), b"b" * 12
    binding = encode(Method.BINDING, Class.REQUEST, tid)
    before = Counter(core.stats.refusals)  # the allocation's 401 challenge
    batch = [
        (channel_data(0x4001, b"first"), CLIENT),
        (binding, other),
        (channel_data(0x4002, b"unbound"), CLIENT),
        (channel_data(0x4001, b"cut short")[:7], CLIENT),
        (channel_data(0x4001, b"from a stranger"), other),
        (channel_data(0x4001, b"last"), CLIENT),
    ]
    out = core.on_client_datagrams(batch, NOW)
    assert out == [
        Send(relay, b"first", PEER),
        Send(None, core.on_client_datagram(binding, other, NOW)[0].data, other),
        Send(relay, b"last", PEER),
    ]
    assert all(type(send) is Send for send in out)  # built without Send.__new__, still Sends
    assert core.stats.refusals - before == {
        "unknown_channel": 1,
        "malformed": 1,
        "no_allocation": 1,
    }
    assert core.stats.relayed_packets == {"client_to_peer": 2}
    assert core.stats.relayed_bytes == {"client_to_peer": 9}


def test_a_batch_from_peers_is_relayed_in_order_with_every_refusal_counted() -> None:
    core, client = make_core(), Client("alice", "pw")
    relay = _bound(core, client)
    stranger = ("203.0.113.99", 5000)  # no permission
    before = Counter(core.stats.refusals)  # the allocation's 401 challenge
    out = core.on_peer_datagrams(relay, [(b"one", PEER), (b"x", stranger), (b"two!", PEER)], NOW)
    assert out == [
        Send(None, struct.pack("!HH", 0x4001, 3) + b"one", CLIENT),
        Send(None, struct.pack("!HH", 0x4001, 4) + b"two!", CLIENT),
    ]
    assert core.stats.refusals - before == {"no_permission": 1}
    assert core.stats.relayed_packets == {"peer_to_client": 2}
    assert core.stats.relayed_bytes == {"peer_to_client": 7}
    gone = (relay[0], relay[1] + 1)
    assert core.on_peer_datagrams(gone, [(b"a", PEER), (b"b", PEER)], NOW) == []
    assert core.stats.refusals["no_allocation"] == 2
    assert core.on_peer_datagrams(gone, [], NOW) == [] and core.stats.refusals["no_allocation"] == 2


def test_data_indication_ids_are_random_distinct_and_refilled() -> None:
    ids = TransactionIds(pool_bytes=40)  # three IDs per draw from os.urandom
    drawn = [ids.next() for _ in range(30)]
    assert all(len(tid) == 12 for tid in drawn)
    assert len(set(drawn)) == 30  # ten refills, no ID repeated


def test_permissions_expire_after_five_minutes() -> None:
    core, client = make_core(), Client("alice", "pw")
    relay = allocate(core, client)
    ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER,)))
    assert core.on_peer_datagram(b"a", relay, PEER, NOW + 299)
    assert core.on_peer_datagram(b"a", relay, PEER, NOW + 301) == []


def test_stale_nonce_gets_438_and_a_fresh_nonce() -> None:
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    assert is_success(ask(core, client, client.request(Method.REFRESH), NOW + 300), Method.REFRESH)
    old = client.nonce
    stale = ask(core, client, client.request(Method.REFRESH), NOW + 601)
    assert error_code(stale) == 438 and client.nonce != old
    fresh = ask(core, client, client.request(Method.REFRESH), NOW + 601)
    assert is_success(fresh, Method.REFRESH)
    assert core.stats.refusals["stale_nonce"] == 1


TURN_REQUESTS = {
    Method.ALLOCATE: [(attr.REQUESTED_TRANSPORT, attr.requested_transport())],
    Method.REFRESH: [],
    Method.CREATE_PERMISSION: [(attr.XOR_PEER_ADDRESS, b"")],  # the peer is added per request
    Method.CHANNEL_BIND: [(attr.CHANNEL_NUMBER, attr.channel_number(0x4001))],
}


def turn_request(
    client: Client, method: int, extra: list[tuple[int, bytes]] | None = None, *, auth: bool = True
) -> bytes:
    """A valid request of ``method`` (a TURN method or Binding), and ``extra``."""
    attrs = [a for a in TURN_REQUESTS.get(method, []) if a[0] != attr.XOR_PEER_ADDRESS]
    wants_peer = method in (Method.CREATE_PERMISSION, Method.CHANNEL_BIND)
    peers = (PEER,) if wants_peer else ()
    return client.request(method, attrs + (extra or []), peers=peers, auth=auth)


@pytest.mark.parametrize("method", list(TURN_REQUESTS), ids=lambda m: f"0x{m:03x}")
def test_every_turn_method_runs_the_long_term_credential_mechanism(method: int) -> None:
    # RFC 8489 section 9.2.4 for each TURN request, with an allocation to act on: no
    # credentials is 401 with REALM and NONCE, a stale nonce 438 with a fresh one, a wrong
    # key 401; none changes the allocation. Then the signed request succeeds. A bare Refresh
    # (20 bytes, no attribute) drew no 401 at all: its 64-byte challenge was over 3x.
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client, extra=[(attr.LIFETIME, attr.uint32(3600))])  # alive at NOW + 601
    before = core.by_client[CLIENT].expires
    bare = encode(method, Class.REQUEST, os.urandom(12), [], fingerprint=False)
    for request in (bare, turn_request(client, method, auth=False)):
        challenge = parse(one(core.on_client_datagram(request, CLIENT, NOW + 1)))
        assert error_code(challenge) == 401, request
        assert challenge.get(attr.REALM) == REALM.encode() and challenge.get(attr.NONCE)
    old_nonce = client.nonce
    stale = ask(core, client, turn_request(client, method), NOW + 601)
    assert error_code(stale) == 438 and client.nonce != old_nonce
    impostor = Client("alice", "not her password", realm=client.realm, nonce=client.nonce)
    wrong = ask(core, impostor, turn_request(impostor, method), NOW + 601)
    assert error_code(wrong) == 401 and wrong.get(attr.REALM) and wrong.get(attr.NONCE)
    assert core.by_client[CLIENT].expires == before and len(core.by_client) == 1
    assert core.stats.refusals["unauthenticated"] == 2 + 1  # and the first Allocate's
    assert core.stats.refusals["stale_nonce"] == 1 and core.stats.refusals["auth_failed"] == 1
    if method == Method.ALLOCATE:  # the signed retry meets the allocation the client holds
        assert error_code(ask(core, client, turn_request(client, method), NOW + 601)) == 437
    else:
        assert is_success(ask(core, client, turn_request(client, method), NOW + 601), method)


@pytest.mark.parametrize("method", [Method.BINDING, *TURN_REQUESTS], ids=lambda m: f"0x{m:03x}")
def test_an_unknown_required_attribute_is_judged_after_the_credentials(method: int) -> None:
    # RFC 8489: the credential mechanism runs right after the basic checks, then 420. Before,
    # 420 came first and unsigned, so a client checking integrity dropped the signed request's
    # only answer and retransmitted until it timed out; an unsigned TURN request got 420 too.
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    unknown = [(0x7001, b"x"), (0x8123, b"optional: ignored")]
    request = turn_request(client, method, unknown, auth=False)
    answer = parse(one(core.on_client_datagram(request, CLIENT, NOW)))
    if method == Method.BINDING:  # no credentials asked: its 420 comes first, unsigned
        assert error_code(answer) == 420 and answer.get(attr.MESSAGE_INTEGRITY) is None
    else:
        assert error_code(answer) == 401 and answer.get(attr.NONCE)
    signed = turn_request(client, method, unknown)
    refused = ask(core, client, signed)
    assert error_code(refused) == 420 and check_integrity(refused, client.key)
    assert attr.decode_unknown_attributes(refused.get(attr.UNKNOWN_ATTRIBUTES) or b"") == [0x7001]
    assert core.stats.refusals["unknown_attribute"] == 1 + (method == Method.BINDING)
    assert len(core.by_client) == 1 and not core.by_client[CLIENT].permissions


def test_a_malformed_attribute_in_a_signed_request_gets_a_signed_400() -> None:
    # Once the key is proved every answer is signed with it (RFC 8489 section 9.2.4): a
    # client checking integrity drops an unsigned one and retransmits until it times out.
    # Before, an attribute that did not decode in a method's handler drew an unsigned 400.
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    channel = (attr.CHANNEL_NUMBER, attr.channel_number(0x4001))
    for method, attrs in (
        (Method.REFRESH, [(attr.LIFETIME, b"\x00\x00\x02")]),
        (Method.REFRESH, [(attr.REQUESTED_ADDRESS_FAMILY, b"\x01\x00")]),
        (Method.CREATE_PERMISSION, [(attr.XOR_PEER_ADDRESS, b"\x00\x01\x00")]),
        (Method.CHANNEL_BIND, [channel, (attr.XOR_PEER_ADDRESS, b"\x00\x01\x00\x00\x01")]),
        (Method.CHANNEL_BIND, [(attr.CHANNEL_NUMBER, b"\x40"), *TURN_REQUESTS[Method.REFRESH]]),
    ):  # fmt: skip
        refused = ask(core, client, client.request(method, attrs))
        assert error_code(refused) == 400 and check_integrity(refused, client.key), attrs
    # PASSWORD-ALGORITHM chooses the key, so its 400 comes before any key is proved: unsigned.
    odd = [(attr.PASSWORD_ALGORITHM, b"\x00\x01")]
    refused = ask(core, client, client.request(Method.REFRESH, odd))
    assert error_code(refused) == 400 and refused.get(attr.MESSAGE_INTEGRITY) is None
    assert core.stats.refusals["bad_request"] == 6


def test_indications_are_never_answered_whatever_their_credentials() -> None:
    # RFC 8489 section 6.3.2: no response to an indication, even one that fails every check.
    core, client = make_core(), Client("alice", "pw")
    for method in (Method.SEND, Method.BINDING, Method.DATA, Method.ALLOCATE, Method.REFRESH):
        for signed in (False, True):
            tid = os.urandom(12)
            attrs = [(attr.XOR_PEER_ADDRESS, attr.encode_xor_address(PEER, tid)),
                     (attr.DATA, b"x"), (0x7123, b"")]  # fmt: skip
            if signed:
                attrs += [(attr.USERNAME, b"alice"), (attr.REALM, b"dna"), (attr.NONCE, b"x")]
            key = b"wrong" if signed else None
            indication = encode(method, Class.INDICATION, tid, attrs, key=key)
            assert core.on_client_datagram(indication, CLIENT, NOW) == []
    allocate(core, client)
    for method in (Method.SEND, Method.BINDING, Method.DATA):
        indication = encode(method, Class.INDICATION, os.urandom(12), [(attr.DATA, b"x")])
        assert core.on_client_datagram(indication, CLIENT, NOW) == []


@pytest.mark.parametrize("lifetime", [MIN_NONCE_LIFETIME_S, 600.0, 70_000.0, MAX_NONCE_LIFETIME_S])
def test_a_nonce_is_valid_for_its_lifetime_and_not_a_second_more(lifetime: float) -> None:
    # The nonce carries 16 bits of its expiry: the checker finds the rest, across a wrap of
    # those bits and for lifetimes longer than 2^16 s.
    nonces = Nonces(lifetime, key=b"k" * 32)
    for issued in (NOW, NOW + 0.5, 65_535.0 * 27_000 + 65_530.25, 123.0):
        nonce = nonces.issue("203.0.113.5", issued)
        assert len(nonce) == 8 and nonce.isascii()
        expiry = int(issued + lifetime)
        for at in (issued, issued + lifetime / 2, expiry - 0.001):
            assert nonces.check(nonce, "203.0.113.5", at), (issued, at)
        for at in (expiry, expiry + 1, expiry + 65_536, issued - 1):
            assert not nonces.check(nonce, "203.0.113.5", at), (issued, at)
        assert not nonces.check(nonce, "203.0.113.6", issued)
        assert not Nonces(lifetime, key=b"j" * 32).check(nonce, "203.0.113.5", issued)
        for bad in (nonce[:7], nonce + "A", "!!!!!!!!", "é" * 8, "AAAA=AAA"):
            assert not nonces.check(bad, "203.0.113.5", issued)


def test_the_shortest_nonce_lifetime_the_config_accepts_still_allocates() -> None:
    # Nonces(0.5) issued nonces already stale (their expiry is whole seconds): every signed
    # request got 438 and the config accepted it (nonce_lifetime_s > 0).
    core = make_core()
    core.nonces = Nonces(MIN_NONCE_LIFETIME_S, key=b"k" * 32)
    client = Client("alice", "pw")
    ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs()), NOW + 0.7)
    late = NOW + 0.7 + MIN_NONCE_LIFETIME_S - 1.5  # a slow client's retry
    reply = ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs()), late)
    assert is_success(reply, Method.ALLOCATE), error_code(reply)


def test_a_nonce_from_another_address_is_stale() -> None:
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    other = ("203.0.113.6", 40000)
    reply = client.learn(
        core.on_client_datagram(client.request(Method.BINDING), other, NOW)[0].data
    )
    assert error_code(reply) == 438


def test_unknown_user_and_wrong_password_are_401_and_counted() -> None:
    core = make_core()
    for client, reason in (
        (Client("mallory", "x"), "unknown_user"),
        (Client("alice", "no"), "bad_integrity"),
    ):
        allocate_request = client.request(Method.ALLOCATE, client.allocate_attrs())
        assert error_code(ask(core, client, allocate_request)) == 401
        assert (
            error_code(ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs())))
            == 401
        )
        assert core.stats.auth_failures[reason] == 1
    assert not core.by_client


def test_time_limited_credentials_work_until_their_expiry() -> None:
    core = make_core()
    username = f"{int(NOW) + 60}:alice"
    client = Client(username, auth_secret_password(SECRET, username))
    allocate(core, client)
    expired_name = f"{int(NOW) - 1}:alice"
    expired = Client(expired_name, auth_secret_password(SECRET, expired_name))
    ask(core, expired, expired.request(Method.BINDING, auth=False))
    expired.learn(
        one(
            core.on_client_datagram(
                expired.request(Method.ALLOCATE, expired.allocate_attrs()), CLIENT, NOW
            )
        )
    )
    reply = ask(core, expired, expired.request(Method.ALLOCATE, expired.allocate_attrs()))
    assert attr.decode_error_code(reply.get(attr.ERROR_CODE) or b"") == (401, "Credential Expired")
    assert core.stats.auth_failures["expired_credential"] == 1
    forged = Client(f"{int(NOW) + 60}:bob", "guessed")
    forged.realm, forged.nonce = client.realm, client.nonce
    assert error_code(ask(core, forged, forged.request(Method.BINDING))) == 401


def test_a_time_limited_username_expiring_past_the_maximum_lifetime_is_refused() -> None:
    # A correctly signed username valid for ten years was accepted: a password nobody could
    # revoke short of rotating the secret. Now its expiry is at most max_lifetime ahead.
    core = make_core()
    core.credentials = Credentials(REALM, {}, [SECRET], max_lifetime=3600)
    # The minting service's clock may run CLOCK_SKEW_S ahead: a credential of exactly the
    # maximum lifetime still works then.
    limit = 3600 + CLOCK_SKEW_S
    for ahead, refused in ((limit, False), (limit + 1, True), (10 * 365 * 86_400, True)):
        username = f"{int(NOW) + ahead}:alice"
        client = Client(username, auth_secret_password(SECRET, username))
        ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs()))  # the 401
        reply = ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs()))
        if not refused:
            assert is_success(reply, Method.ALLOCATE)
            continue
        assert attr.decode_error_code(reply.get(attr.ERROR_CODE) or b"") == (
            401,
            "Credential Lifetime Too Long",
        )
    assert core.stats.auth_failures == Counter({"lifetime_too_long": 2})
    assert len(core.by_client) == 1 and core.per_user == {"alice": 1}


def test_retransmitted_allocate_gets_the_same_answer_and_another_gets_437() -> None:
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    again = core.by_client[CLIENT].allocate_response
    tid = parse(again).transaction_id
    credentials = [
        (attr.USERNAME, b"alice"), (attr.REALM, client.realm.encode()), (attr.NONCE, client.nonce)
    ]  # fmt: skip
    retransmit = encode(
        Method.ALLOCATE, Class.REQUEST, tid, client.allocate_attrs() + credentials, key=client.key
    )
    assert one(core.on_client_datagram(retransmit, CLIENT, NOW)) == again
    second = ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs()))
    assert error_code(second) == 437 and check_integrity(second, client.key)


def test_refresh_to_zero_deletes_and_then_requests_get_437() -> None:
    core, client = make_core(), Client("alice", "pw")
    relay = allocate(core, client)
    gone = ask(core, client, client.request(Method.REFRESH, [(attr.LIFETIME, attr.uint32(0))]))
    assert is_success(gone, Method.REFRESH) and relay not in core.by_relay
    assert relay not in core.ports.open_now  # type: ignore[attr-defined]
    assert error_code(ask(core, client, client.request(Method.REFRESH))) == 437


def test_allocations_expire_and_their_ports_close() -> None:
    core, client = make_core(Limits(default_lifetime=600, max_lifetime=600)), Client("alice", "pw")
    relay = allocate(core, client)
    core.expire(NOW + 599)
    assert relay in core.by_relay
    core.expire(NOW + 601)
    assert relay not in core.by_relay and not core.ports.open_now  # type: ignore[attr-defined]


def test_lifetime_is_clamped_between_default_and_max() -> None:
    core, client = make_core(Limits(default_lifetime=600, max_lifetime=3600)), Client("alice", "pw")
    allocate(core, client)
    for asked, granted in ((10, 600), (1200, 1200), (99999, 3600)):
        reply = ask(
            core, client, client.request(Method.REFRESH, [(attr.LIFETIME, attr.uint32(asked))])
        )
        assert attr.decode_uint32(reply.get(attr.LIFETIME) or b"") == granted


def test_a_different_user_on_the_same_five_tuple_gets_441() -> None:
    core, alice = make_core(), Client("alice", "pw")
    allocate(core, alice)
    bob = Client("bob", "pw2")
    bob.realm, bob.nonce = alice.realm, alice.nonce
    assert error_code(ask(core, bob, bob.request(Method.REFRESH))) == 441


def test_per_user_and_total_quotas() -> None:
    core = make_core(Limits(max_allocations_per_user=2, max_allocations=3))
    for i in range(2):
        allocate(core, Client("alice", "pw"), NOW) if i == 0 else None
        if i:
            client = Client("alice", "pw")
            src = ("203.0.113.5", 40001)
            client.learn(
                core.on_client_datagram(
                    client.request(Method.ALLOCATE, client.allocate_attrs()), src, NOW
                )[0].data
            )
            reply = parse(
                core.on_client_datagram(
                    client.request(Method.ALLOCATE, client.allocate_attrs()), src, NOW
                )[0].data
            )
            assert is_success(reply, Method.ALLOCATE)
    third = Client("alice", "pw")
    src = ("203.0.113.5", 40002)
    third.learn(
        core.on_client_datagram(third.request(Method.ALLOCATE, third.allocate_attrs()), src, NOW)[
            0
        ].data
    )
    reply = parse(
        core.on_client_datagram(third.request(Method.ALLOCATE, third.allocate_attrs()), src, NOW)[
            0
        ].data
    )
    assert error_code(reply) == 486 and core.stats.refusals["quota_user"] == 1
    bob = Client("bob", "pw2")
    bob_src = ("203.0.113.9", 1)
    bob.learn(
        core.on_client_datagram(bob.request(Method.ALLOCATE, bob.allocate_attrs()), bob_src, NOW)[
            0
        ].data
    )
    assert is_success(
        parse(
            core.on_client_datagram(
                bob.request(Method.ALLOCATE, bob.allocate_attrs()), bob_src, NOW
            )[0].data
        ),
        Method.ALLOCATE,
    )
    carol_src = ("203.0.113.10", 1)
    bob.learn(
        core.on_client_datagram(bob.request(Method.ALLOCATE, bob.allocate_attrs()), carol_src, NOW)[
            0
        ].data
    )
    reply = parse(
        core.on_client_datagram(bob.request(Method.ALLOCATE, bob.allocate_attrs()), carol_src, NOW)[
            0
        ].data
    )
    assert error_code(reply) == 508 and core.stats.refusals["quota_total"] == 1
    assert len(core.by_client) == 3


def test_bandwidth_cap_drops_what_is_over_the_rate() -> None:
    core, client = make_core(Limits(bandwidth_bytes_per_s=1000)), Client("alice", "pw")
    relay = allocate(core, client)
    ask(
        core,
        client,
        client.request(
            Method.CHANNEL_BIND, [(attr.CHANNEL_NUMBER, attr.channel_number(0x4000))], peers=(PEER,)
        ),
    )
    sent = sum(
        len(core.on_client_datagram(channel_data(0x4000, b"x" * 100), CLIENT, NOW))
        for _ in range(20)
    )
    assert sent == 10 and core.stats.refusals["bandwidth"] == 10
    assert core.on_peer_datagram(b"y" * 100, relay, PEER, NOW + 0.5)  # half a second refills 500


def test_time_going_backwards_neither_starves_nor_refills_the_bandwidth_bucket() -> None:
    # Before, a step back of an hour made the bucket an hour's traffic negative: nothing
    # relayed until the clock caught up again.
    core, client = make_core(Limits(bandwidth_bytes_per_s=1000)), Client("alice", "pw")
    relay = allocate(core, client)
    assert ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER,)))
    assert len(core.on_peer_datagram(b"y" * 600, relay, PEER, NOW)) == 1  # 400 tokens left
    assert len(core.on_peer_datagram(b"y" * 300, relay, PEER, NOW - 3600)) == 1  # 100 left
    assert not core.on_peer_datagram(b"y" * 300, relay, PEER, NOW - 3600)  # nothing refilled
    assert len(core.on_peer_datagram(b"y" * 300, relay, PEER, NOW + 0.2)) == 1  # 0.2 s: +200


FORBIDDEN = [
    "0.0.0.0", "10.1.2.3", "100.64.0.1", "127.0.0.1", "169.254.169.254", "172.16.0.1",
    "192.168.1.1", "198.18.0.1", "224.0.0.1", "255.255.255.255", "::", "::1", "fc00::1",
    "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "2002:7f00:1::",
    "64:ff9b::a00:1", "::ffff:0.0.0.0",
]  # fmt: skip


@pytest.mark.parametrize("host", FORBIDDEN)
def test_relaying_to_forbidden_addresses_is_403(host: str) -> None:
    policy = RelayPolicy()
    assert policy.check(host, 5000) == "forbidden_peer"


def test_forbidden_peer_is_refused_by_the_core_and_counted() -> None:
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    for peer in (("127.0.0.1", 22), ("169.254.169.254", 80), SERVER, (SERVER[0], 22)):
        reply = ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER, peer)))
        assert error_code(reply) == 403
    assert core.stats.refusals["forbidden_peer"] == 4
    assert not core.by_client[CLIENT].permissions  # all or nothing: PEER was not installed


def test_allow_list_opens_a_test_network_but_never_the_listening_port() -> None:
    policy = RelayPolicy(allowed=("127.0.0.0/8",))
    policy.add_own_endpoint(("127.0.0.1", 3478))
    assert policy.check("127.0.0.2", 5000) is None
    assert policy.check("::ffff:127.0.0.2", 5000) is None
    assert policy.check("127.0.0.1", 3478) == "forbidden_peer"
    assert policy.check("::ffff:127.0.0.1", 3478) == "forbidden_peer"
    assert policy.check("127.0.0.1", 22) == "forbidden_peer"  # own address, not a relay port
    assert policy.check("127.0.0.1", 50000) is None  # another allocation's relay
    assert policy.check("10.0.0.1", 5000) == "forbidden_peer"


@pytest.mark.parametrize(
    ("wildcard", "families"), [("0.0.0.0", ("203.0.113.200",)),
                               ("::", ("203.0.113.200", "2001:db8::200"))],
)  # fmt: skip
def test_a_wildcard_listener_is_refused_as_a_peer_on_every_address(
    wildcard: str, families: tuple[str, ...]
) -> None:
    # host = "0.0.0.0" (the container image's setting) listens on addresses no setting names
    # (a second public address of the host): before, relaying to the TURN port there was
    # allowed, a loop through the server itself.
    policy = RelayPolicy()
    policy.add_own_endpoint((wildcard, 3478))
    policy.own_ips.add("198.51.100.9")  # relay_host
    for host in families:
        assert policy.check(host, 3478) == "forbidden_peer"
        assert policy.check(host, 3479) is None
    assert policy.check("::ffff:203.0.113.200", 3478) == "forbidden_peer"


def test_public_peers_are_allowed() -> None:
    policy = RelayPolicy()
    assert policy.check("203.0.113.77", 5000) is None
    assert policy.check("2001:db8::1", 5000) is None


def test_request_errors() -> None:
    core, client = make_core(), Client("alice", "pw")
    allocate(core, Client("alice", "pw"))
    other = Client("alice", "pw")
    src = ("203.0.113.5", 1)

    def reply(data: bytes) -> int | None:
        return error_code(other.learn(core.on_client_datagram(data, src, NOW)[0].data))

    assert reply(other.request(Method.ALLOCATE)) == 401
    assert reply(other.request(Method.ALLOCATE)) == 400  # no REQUESTED-TRANSPORT
    tcp = [(attr.REQUESTED_TRANSPORT, attr.requested_transport(6))]
    assert reply(other.request(Method.ALLOCATE, tcp)) == 442
    v6 = [*other.allocate_attrs(), (attr.REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00")]
    assert reply(other.request(Method.ALLOCATE, v6)) == 440
    dont_fragment = [*other.allocate_attrs(), (attr.DONT_FRAGMENT, b"")]
    refused = other.learn(
        core.on_client_datagram(other.request(Method.ALLOCATE, dont_fragment), src, NOW)[0].data
    )
    assert error_code(refused) == 420
    assert attr.decode_unknown_attributes(refused.get(attr.UNKNOWN_ATTRIBUTES) or b"") == [
        attr.DONT_FRAGMENT
    ]
    token = [*other.allocate_attrs(), (attr.RESERVATION_TOKEN, b"12345678")]
    assert reply(other.request(Method.ALLOCATE, token)) == 508
    assert reply(other.request(Method.CHANNEL_BIND)) == 437
    assert reply(other.request(0x0FF)) == 400  # unknown method
    assert not any(a.client == src for a in core.by_client.values())
    del client


def test_channel_bind_rules() -> None:
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)

    def bind(number: int, peer: tuple[str, int]) -> int | None:
        number_attr = [(attr.CHANNEL_NUMBER, attr.channel_number(number))]
        request = client.request(Method.CHANNEL_BIND, number_attr, peers=(peer,))
        return error_code(ask(core, client, request))

    assert bind(0x3FFF, PEER) == 400
    assert bind(0x4000, PEER) is None
    assert bind(0x4000, PEER) is None  # a refresh of the same binding
    assert bind(0x4001, PEER) == 400  # the peer is bound to another channel
    assert bind(0x4000, ("203.0.113.78", 1)) == 400  # the channel is bound to another peer
    assert bind(0x4002, ("10.0.0.1", 1)) == 403


def test_an_expired_channel_binding_can_be_bound_anew_before_the_sweep() -> None:
    # RFC 8656 section 12: once a binding expires, its number and its peer are free. Before,
    # the unswept leftover answered 400 "channel in use" until the next sweep.
    core = make_core(Limits(default_lifetime=3600))
    client = Client("alice", "pw")
    allocate(core, client)

    def bind(number: int, peer: tuple[str, int], now: float) -> int | None:
        number_attr = [(attr.CHANNEL_NUMBER, attr.channel_number(number))]
        request = client.request(Method.CHANNEL_BIND, number_attr, peers=(peer,))
        reply = ask(core, client, request, now)
        if error_code(reply) == 438:  # a stale nonce: the reply carries a fresh one
            reply = ask(core, client, client.request(Method.CHANNEL_BIND, number_attr,
                                                     peers=(peer,)), now)  # fmt: skip
        return error_code(reply)

    other = ("203.0.113.78", 1)
    assert bind(0x4000, PEER, NOW) is None and bind(0x4001, other, NOW) is None
    later = NOW + 601  # both bindings are over; the sweep has not run
    assert bind(0x4000, other, later) is None  # the number, to another peer
    assert bind(0x4002, PEER, later) is None  # the peer, to another number
    channels = core.by_client[CLIENT].channels
    assert channels == {0x4000: (other, later + 600), 0x4002: (PEER, later + 600)}
    assert core.by_client[CLIENT].peer_channels == {other: 0x4000, PEER: 0x4002}
    assert "channel_in_use" not in core.stats.refusals
    assert bind(0x4001, PEER, later) == 400  # a live binding still holds its peer


# --- bad input never raises and changes no state ----------------------------------------------


def _snapshot(core: TurnCore) -> object:
    return [
        (a.client, a.relay, a.expires, dict(a.permissions), dict(a.channels))
        for a in core.by_client.values()
    ]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 60))
def test_garbage_datagrams_are_dropped_without_state_change(data: bytes, where: int) -> None:
    core, client = make_core(), Client("alice", "pw")
    relay = allocate(core, client)
    before = _snapshot(core)
    valid = client.request(Method.REFRESH)
    mutated = bytearray(valid)
    mutated[where % len(mutated)] ^= 0xFF
    for datagram in (data, bytes(mutated), b"\x40" + data, valid[: where % len(valid)]):
        out = core.on_client_datagram(datagram, CLIENT, NOW)
        assert all(isinstance(s, Send) for s in out)
    core.on_peer_datagram(data, relay, ("203.0.113.99", 1), NOW)
    assert _snapshot(core) == before
    assert_counted_under_known_labels(core)


def test_long_term_key_derivation_matches_the_client() -> None:
    assert Client("alice", "pw", realm=REALM).key == long_term_key("alice", REALM, "pw")


def test_time_limited_usernames_share_their_names_quota() -> None:
    core = make_core(Limits(max_allocations_per_user=1))
    for i, expected in ((1, None), (2, 486)):
        username = f"{int(NOW) + 60 * i}:carol"  # fresh credentials, the same person
        client = Client(username, auth_secret_password(SECRET, username))
        src = ("203.0.113.20", i)
        client.learn(core.on_client_datagram(client.request(Method.ALLOCATE), src, NOW)[0].data)
        reply = core.on_client_datagram(
            client.request(Method.ALLOCATE, client.allocate_attrs()), src, NOW
        )
        assert error_code(parse(reply[0].data)) == expected
    assert core.per_user == {"carol": 1}


def test_binding_indications_are_keepalives_not_refusals() -> None:
    core = make_core()
    keepalive = encode(Method.BINDING, Class.INDICATION, b"k" * 12)
    assert core.on_client_datagram(keepalive, CLIENT, NOW) == []
    assert not core.stats.refusals and core.stats.requests["binding_indication"] == 1
    response = encode(Method.BINDING, Class.SUCCESS, b"k" * 12)
    assert core.on_client_datagram(response, CLIENT, NOW) == []
    assert core.stats.refusals == {"unexpected_message": 1}


IPV4_FAMILY, IPV6_FAMILY = b"\x01\x00\x00\x00", b"\x02\x00\x00\x00"
CLIENT6, PEER6 = ("2001:db8:5::5", 40000), ("2001:db8:77::77", 5000)


def test_binding_from_an_ipv6_client_answers_family_ipv6() -> None:
    core, tid = make_core(), b"6" * 12
    out = core.on_client_datagram(encode(Method.BINDING, Class.REQUEST, tid), CLIENT6, NOW)
    value = parse(out[0].data).get(attr.XOR_MAPPED_ADDRESS) or b""
    assert value[1] == attr.FAMILY_IPV6 and len(value) == 20  # RFC 8489 section 14.2
    assert attr.decode_xor_address(value, tid) == CLIENT6


def _allocate_reply(core: TurnCore, extra: list[tuple[int, bytes]]) -> Message:
    client = Client("alice", "pw")
    ask(core, client, client.request(Method.ALLOCATE, client.allocate_attrs() + extra))
    reply: Message = ask(
        core, client, client.request(Method.ALLOCATE, client.allocate_attrs() + extra)
    )
    return reply


@pytest.mark.parametrize(
    ("families", "extra", "code"),
    [
        # Step 7: without REQUESTED-ADDRESS-FAMILY the relay is IPv4; none here: 440.
        (frozenset({attr.FAMILY_IPV6}), [], 440),
        ({attr.FAMILY_IPV4}, [(attr.REQUESTED_ADDRESS_FAMILY, IPV6_FAMILY)], 440),
        ({attr.FAMILY_IPV6}, [(attr.REQUESTED_ADDRESS_FAMILY, IPV4_FAMILY)], 440),
        # Step 6: both attributes: 400.
        ({attr.FAMILY_IPV4, attr.FAMILY_IPV6},
         [(attr.REQUESTED_ADDRESS_FAMILY, IPV4_FAMILY),
          (attr.ADDITIONAL_ADDRESS_FAMILY, IPV6_FAMILY)], 400),
        # Step 9: ADDITIONAL-ADDRESS-FAMILY may only ask for IPv6.
        ({attr.FAMILY_IPV4, attr.FAMILY_IPV6},
         [(attr.ADDITIONAL_ADDRESS_FAMILY, IPV4_FAMILY)], 400),
    ],
)  # fmt: skip
def test_allocate_refuses_families_as_rfc_8656_section_7_2_says(
    families: frozenset[int], extra: list[tuple[int, bytes]], code: int
) -> None:
    core = make_core(families=frozenset(families))
    assert error_code(_allocate_reply(core, extra)) == code
    assert not core.by_client and core.stats.refusals


def test_an_ipv6_allocation_relays_to_ipv6_peers_only() -> None:
    core = make_core(families=frozenset({attr.FAMILY_IPV4, attr.FAMILY_IPV6}))
    client = Client("alice", "pw")
    relay = allocate(core, client, extra=[(attr.REQUESTED_ADDRESS_FAMILY, IPV6_FAMILY)])
    assert relay[0] == SERVER6
    mismatch = ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER,)))
    assert error_code(mismatch) == 443  # RFC 8656 section 9.1
    assert is_success(
        ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER6,))),
        Method.CREATE_PERMISSION,
    )
    out = core.on_peer_datagram(b"from an ipv6 peer", relay, PEER6, NOW)
    assert len(out) == 1 and out[0].to == CLIENT
    indication = parse(out[0].data)
    peer = attr.decode_xor_address(indication.get(attr.XOR_PEER_ADDRESS) or b"",
                                   indication.transaction_id)  # fmt: skip
    assert peer == PEER6 and indication.get(attr.DATA) == b"from an ipv6 peer"
    plain = _allocate_reply(make_core(families=core.relay_families), [])
    relayed = attr.decode_xor_address(plain.get(attr.XOR_RELAYED_ADDRESS) or b"",
                                      plain.transaction_id)  # fmt: skip
    assert relayed[0] == SERVER[0]  # no REQUESTED-ADDRESS-FAMILY: IPv4, as the RFC says


def test_a_refresh_asking_another_family_than_its_allocations_is_443_and_changes_nothing() -> None:
    # RFC 8656 section 7.3; coturn answers 443 as well. Before, the family was ignored and
    # the Refresh (even one deleting with LIFETIME 0) succeeded.
    core = make_core(families=frozenset({attr.FAMILY_IPV4, attr.FAMILY_IPV6}))
    v4, v6 = Client("alice", "pw"), Client("bob", "pw2")
    allocate(core, v4)
    v6_src = ("203.0.113.5", 40001)
    allocate(core, v6, extra=[(attr.REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00")], src=v6_src)
    for client, src, other in ((v4, CLIENT, 2), (v6, v6_src, 1), (v4, CLIENT, 3)):
        before = core.by_client[src].expires
        for lifetime in (0, 3600):
            asked = [(attr.REQUESTED_ADDRESS_FAMILY, bytes([other, 0, 0, 0])),
                     (attr.LIFETIME, attr.uint32(lifetime))]  # fmt: skip
            refused = ask(core, client, client.request(Method.REFRESH, asked), NOW + 1, src)
            assert error_code(refused) == 443 and check_integrity(refused, client.key)
            assert core.by_client[src].expires == before
    same = [(attr.REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00")]
    assert is_success(
        ask(core, v6, v6.request(Method.REFRESH, same), NOW + 1, v6_src), Method.REFRESH
    )
    assert core.stats.refusals["family"] == 6


def test_a_dual_allocation_request_gets_ipv4_and_says_why_not_ipv6() -> None:
    """This server gives one relayed address per allocation: a dual request (RFC 8656
    ADDITIONAL-ADDRESS-FAMILY) gets the IPv4 one and ADDRESS-ERROR-CODE 440 for IPv6."""
    core = make_core(families=frozenset({attr.FAMILY_IPV4, attr.FAMILY_IPV6}))
    response = _allocate_reply(core, [(attr.ADDITIONAL_ADDRESS_FAMILY, IPV6_FAMILY)])
    assert is_success(response, Method.ALLOCATE)
    relays = response.get_all(attr.XOR_RELAYED_ADDRESS)
    assert [attr.decode_xor_address(r, response.transaction_id)[0] for r in relays] == [SERVER[0]]
    assert response.get(attr.ADDRESS_ERROR_CODE) == b"\x02\x00\x04\x28" + (
        b"Address Family not Supported"
    )


def _signed_request_as(core: TurnCore, username: str) -> bytes:
    """An Allocate signed under ``username`` with a nonce the core issued: every check before
    the key lookup passes, so the username itself is what the core must judge."""
    client = Client(username, "pw")
    client.learn(one(core.on_client_datagram(client.request(Method.ALLOCATE), CLIENT, NOW)))
    return client.request(Method.ALLOCATE, client.allocate_attrs())


@pytest.mark.parametrize(
    "username",
    ["²:alice", "١٢٣:alice", "1234567890123:alice", "-1:alice", "+9999999999:alice", ":alice"],
)
def test_usernames_that_only_look_time_limited_are_unknown_users(username: str) -> None:
    # "²".isdigit() is True and int("²") raises: before, one such request (no password
    # needed, a nonce is free) raised out of the core, an internal error and a traceback.
    core = make_core()
    reply = parse(one(core.on_client_datagram(_signed_request_as(core, username), CLIENT, NOW)))
    assert error_code(reply) == 401
    assert core.stats.auth_failures == Counter({"unknown_user": 1})
    assert not core.by_client


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_signed_username_is_answered_never_raised(username: str) -> None:
    assume(username not in USERS)  # "alice" with alice's password is rightly allocated
    core = make_core()
    if len(username.encode()) > attr.MAX_USERNAME_BYTES:
        return
    reply = parse(one(core.on_client_datagram(_signed_request_as(core, username), CLIENT, NOW)))
    assert error_code(reply) in (400, 401)
    assert not core.by_client


def test_permissions_are_capped_per_allocation_counted_before_any_peer_is_judged() -> None:
    core, client = make_core(Limits(max_permissions=4)), Client("alice", "pw")
    allocate(core, client)
    peers = tuple((f"203.0.113.{i}", 9) for i in range(1, 4))
    assert is_success(
        ask(core, client, client.request(Method.CREATE_PERMISSION, peers=peers)),
        Method.CREATE_PERMISSION,
    )
    two_more = (("198.51.100.7", 9), ("198.51.100.8", 9))
    refused = ask(core, client, client.request(Method.CREATE_PERMISSION, peers=two_more))
    assert error_code(refused) == 508 and core.stats.refusals["quota_permissions"] == 1
    # More peers in one request than an allocation may hold: refused by their number, before
    # each is decoded and checked against the policy (the last one here would not decode).
    undecodable = (attr.XOR_PEER_ADDRESS, b"\x00\x01\x00\x09\x01")
    many = client.request(Method.CREATE_PERMISSION, [undecodable] * 5)
    assert error_code(ask(core, client, many)) == 508
    assert core.stats.refusals["quota_permissions"] == 2 and not core.stats.refusals["bad_request"]
    assert set(core.by_client[CLIENT].permissions) == {ip for ip, _ in peers}


def test_a_request_of_thousands_of_unknown_attributes_is_dropped_unanswered() -> None:
    # 16,000 comprehension-required unknowns in one 64 KB datagram: before, parsed (20 ms) and
    # then listed by a quadratic scan (about a second of CPU) into a 32 KB 420 answer.
    core = make_core()
    flood = [(0x4000 + i, b"") for i in range(16_000)]
    datagram = encode(Method.BINDING, Class.REQUEST, b"u" * 12, flood, fingerprint=False)
    assert core.on_client_datagram(datagram, CLIENT, NOW) == []
    assert core.stats.refusals == Counter({"malformed": 1})


def test_an_expired_allocation_replaced_before_the_sweep_closes_and_frees_its_quota() -> None:
    # The sweep runs every few seconds; a client allocating again on the same 5-tuple just
    # after its allocation expired replaced it unswept. Before, the old one was then out of
    # every sweep's reach: its relay port (a socket) open and its user quota held for good.
    core = make_core(Limits(default_lifetime=600, max_lifetime=600, max_allocations_per_user=1))
    ports: Ports = core.ports  # type: ignore[assignment]
    old = allocate(core, Client("alice", "pw"))
    new = allocate(core, Client("alice", "pw"), NOW + 601)
    assert new != old and ports.open_now == {new} and core.per_user == {"alice": 1}
    core.expire(NOW + 602)
    assert set(core.by_relay) == {new} and ports.open_now == {new}
    core.expire(NOW + 601 + 601)
    assert not core.by_relay and not ports.open_now and not core.per_user


@pytest.mark.parametrize("quota", ["user", "total"])
def test_allocations_expired_since_the_sweep_count_against_no_quota(quota: str) -> None:
    # The sweep runs every 5 s; an expired allocation is gone (RFC 8656 section 3.1). Before,
    # it still held its user's and the relay's quota until then: a client allocating anew,
    # from another port, just after its allocations expired got 486 (or 508).
    per_user, total = (2, 100) if quota == "user" else (100, 2)
    core = make_core(Limits(max_allocations_per_user=per_user, max_allocations=total))
    for port in (40001, 40002):
        allocate(core, Client("alice", "pw"), NOW, src=("203.0.113.5", port))
    refused = allocate_reply(core, Client("alice", "pw"), NOW + 1, ("203.0.113.5", 40003))
    assert error_code(refused) == (486 if quota == "user" else 508)
    later = NOW + Limits().default_lifetime + 1  # both expired, not swept
    relay = allocate(core, Client("alice", "pw"), later, src=("203.0.113.5", 40003))
    assert set(core.by_relay) == {relay} and core.ports.open_now == {relay}  # type: ignore[attr-defined]
    assert core.per_user == {"alice": 1}


def test_the_largest_settings_the_config_accepts_still_encode_every_answer() -> None:
    # The config refuses what would not fit on the wire; what it accepts must serve.
    core = make_core(Limits(default_lifetime=UINT32_MAX, max_lifetime=UINT32_MAX))
    realm = "𝄞" * (MAX_REALM_BYTES // 4)  # four bytes a character
    core.credentials = Credentials(realm, {"alice": "pw"})
    client = Client("alice", "pw")
    allocate(core, client)  # its first Allocate is 36 bytes, as aioice's, pion's
    assert client.realm == realm
    reply = ask(core, client, client.request(Method.REFRESH, [(attr.LIFETIME, attr.uint32(5))]))
    assert attr.decode_uint32(reply.get(attr.LIFETIME) or b"") == UINT32_MAX
    assert set(core.stats.refusals) == {"unauthenticated"}  # the first 401, nothing else


def test_channel_bindings_are_capped_per_allocation() -> None:
    # RFC 8656 allows 4,096 channels an allocation, ~300 bytes each in the relay: before, one
    # user's ten allocations bound 40,960 and grew the process by 12 MB (1.2 GB at the
    # default 1,000 allocations). Refreshes of live bindings do not count; expired ones free.
    core = make_core(Limits(max_channels=3, default_lifetime=3600))
    client = Client("alice", "pw")
    allocate(core, client)

    def bind(number: int, port: int, now: float = NOW) -> int | None:
        number_attr = [(attr.CHANNEL_NUMBER, attr.channel_number(number))]
        request = client.request(Method.CHANNEL_BIND, number_attr, peers=((PEER[0], port),))
        return error_code(ask(core, client, request, now))

    assert [bind(0x4000 + n, 5000 + n) for n in range(3)] == [None, None, None]
    assert bind(0x4003, 5003) == 508 and core.stats.refusals["quota_channels"] == 1
    assert 0x4003 not in core.by_client[CLIENT].channels
    assert bind(0x4001, 5001) is None  # a refresh of a live binding
    later = NOW + 601  # the channels' 10 minutes are over; not swept yet
    assert bind(0x4003, 5003, later) == 438  # the nonce is stale too: the 438 has a fresh one
    assert bind(0x4003, 5003, later) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=20))
def test_any_nonce_and_realm_a_request_signs_are_answered_never_raised(
    nonce: bytes, realm: bytes
) -> None:
    # A NONCE "1.é" reached hmac.compare_digest as non-ASCII text, which raises TypeError:
    # before, one such request (no password needed) raised out of the core.
    core, client = make_core(), Client("alice", "pw")
    client.learn(one(core.on_client_datagram(client.request(Method.ALLOCATE), CLIENT, NOW)))
    client.nonce, client.realm = nonce, realm.decode(errors="replace")
    reply = parse(one(core.on_client_datagram(
        client.request(Method.ALLOCATE, client.allocate_attrs()), CLIENT, NOW)))  # fmt: skip
    assert error_code(reply) in (400, 401, 438)
    assert not core.by_client


def test_a_nonce_of_other_text_than_ascii_is_stale() -> None:
    core, client = make_core(), Client("alice", "pw")
    client.learn(one(core.on_client_datagram(client.request(Method.ALLOCATE), CLIENT, NOW)))
    client.nonce = b"1." + "é".encode()
    reply = parse(one(core.on_client_datagram(
        client.request(Method.ALLOCATE, client.allocate_attrs()), CLIENT, NOW)))  # fmt: skip
    assert error_code(reply) == 438 and core.stats.refusals["stale_nonce"] == 1


def _send_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    tid = os.urandom(12)
    peer_attr = (attr.XOR_PEER_ADDRESS, attr.encode_xor_address(peer, tid))
    return encode(Method.SEND, Class.INDICATION, tid, [peer_attr, (attr.DATA, payload)])


def test_a_permission_for_the_servers_own_address_reaches_only_its_relay_ports() -> None:
    # Permissions are per IP. One for the server's own address is granted for another
    # allocation's relay port (two clients behind symmetric NATs); before, a Send indication
    # then reached any port of that address: the TURN port itself, and whatever else of the
    # relay's host listens on UDP there (DNS, SNMP, ...), past the relay policy.
    core, client = make_core(), Client("alice", "pw")
    relay = allocate(core, client)
    other_relay = (SERVER[0], 50077)
    ok = ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(other_relay,)))
    assert is_success(ok, Method.CREATE_PERMISSION)
    assert core.on_client_datagram(_send_indication(other_relay, b"hi"), CLIENT, NOW) == [
        Send(relay, b"hi", other_relay)
    ]
    for port in (SERVER[1], 53, 161, 7480):
        assert core.on_client_datagram(_send_indication((SERVER[0], port), b"x"), CLIENT, NOW) == []
    assert core.stats.refusals["forbidden_peer"] == 4
    assert core.stats.relayed_packets["client_to_peer"] == 1


# --- no amplification toward unproven sources ---------------------------------------------------

METHODS = [Method.BINDING, Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION,
           Method.CHANNEL_BIND, 0x0FF]  # fmt: skip
ATTRIBUTE_KINDS = [*sorted(KNOWN_ATTRIBUTES), 0x7000, 0x8123]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(METHODS),
    st.lists(st.tuples(st.sampled_from(ATTRIBUTE_KINDS), st.binary(max_size=24)), max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_no_answer_to_an_unproven_request_is_over_three_times_its_size(
    method: int, attrs: list[tuple[int, bytes]], signed: bool, fingerprint: bool
) -> None:
    # The source of a request that proves no key may be a forged victim's. Before, a bare
    # 20-byte Allocate drew a 96-byte 401 (4.8x), and with a long realm up to ~30x.
    core = make_core()
    key = b"not the key" if signed else None
    request = encode(method, Class.REQUEST, os.urandom(12), attrs, key=key, fingerprint=fingerprint)
    for send in core.on_client_datagram(request, CLIENT, NOW):
        assert len(send.data) <= MAX_UNPROVEN_GROWTH * len(request)
    assert not core.by_client
    assert_counted_under_known_labels(core)


def test_a_challenge_too_large_for_its_request_drops_its_reason_phrase_then_itself() -> None:
    tid = b"c" * 12
    transport = [(attr.REQUESTED_TRANSPORT, attr.requested_transport())]
    aioice = [(attr.LIFETIME, attr.uint32(600)), *transport]  # aioice's first Allocate
    bare_refresh = encode(Method.REFRESH, Class.REQUEST, tid, fingerprint=False)  # 20 bytes
    for realm, request, wanted in (
        ("dna", encode(Method.ALLOCATE, Class.REQUEST, tid, aioice), "Unauthorized"),
        ("dna", bare_refresh, "Unauthorized"),  # 60 bytes: 60
        ("dna.example.org", bare_refresh, ""),  # 60 bytes without the phrase
        ("r" * (MAX_REALM_BYTES + 1), bare_refresh, None),  # a realm the config refuses
    ):  # fmt: skip
        core = make_core()
        core.credentials = Credentials(realm, {"alice": "pw"})
        out = core.on_client_datagram(request, CLIENT, NOW)
        assert core.stats.refusals["unauthenticated"] == 1
        if wanted is None:
            assert out == [] and core.stats.refusals["amplification"] == 1
            continue
        answer = parse(one(out))
        assert attr.decode_error_code(answer.get(attr.ERROR_CODE) or b"") == (401, wanted)
        assert answer.get(attr.REALM) == realm.encode() and answer.get(attr.NONCE)
        assert len(one(out)) <= MAX_UNPROVEN_GROWTH * len(request)
        # FINGERPRINT as the request: a client that sends none does not demultiplex by it.
        request_fingerprint = parse(request).find(attr.FINGERPRINT) is not None
        assert (answer.find(attr.FINGERPRINT) is not None) == request_fingerprint


LONGEST_REALM = "r" * MAX_REALM_BYTES
TID = b"m" * 12
TRANSPORT = (attr.REQUESTED_TRANSPORT, attr.requested_transport())
IPV4_PEER = (attr.XOR_PEER_ADDRESS, attr.encode_xor_address(PEER, TID))
CHANNEL = (attr.CHANNEL_NUMBER, attr.channel_number(0x4000))


def smallest(method: int, *attrs: tuple[int, bytes], key: bytes | None = None) -> bytes:
    return encode(method, Class.REQUEST, TID, attrs, key=key, fingerprint=False)


def signed_by(realm: str, nonce: bytes, username: bytes = b"") -> list[tuple[int, bytes]]:
    return [(attr.USERNAME, username), (attr.REALM, realm.encode()), (attr.NONCE, nonce)]


# The smallest request a client may send that draws each answer to an unproven request, and
# that answer's code. A first Allocate of 28 bytes (REQUESTED-TRANSPORT alone) got no 401 at
# all with a realm of 17-32 bytes, which the config accepted; a bare Refresh of 20 bytes none
# with any realm (a 24-character nonce, and FINGERPRINT whether the request had one or not).
SMALLEST_UNPROVEN = [
    ("401 bare refresh", smallest(Method.REFRESH), 401),  # RFC 8656 asks for no attribute
    ("401 bare allocate", smallest(Method.ALLOCATE), 401),  # authentication comes first
    ("401 bare create_permission", smallest(Method.CREATE_PERMISSION), 401),
    ("401 bare channel_bind", smallest(Method.CHANNEL_BIND), 401),
    ("401 allocate", smallest(Method.ALLOCATE, TRANSPORT), 401),
    ("401 refresh", smallest(Method.REFRESH, (attr.LIFETIME, attr.uint32(600))), 401),
    ("401 create_permission", smallest(Method.CREATE_PERMISSION, IPV4_PEER), 401),
    ("401 channel_bind", smallest(Method.CHANNEL_BIND, CHANNEL, IPV4_PEER), 401),
    ("401 wrong realm", smallest(Method.ALLOCATE, *signed_by("", b""), key=b"k"), 401),
    ("438", smallest(Method.ALLOCATE, *signed_by(LONGEST_REALM, b"x"), key=b"k"), 438),
    ("400 binding", smallest(Method.BINDING, key=b"k"), 400),
    ("400 unknown method", smallest(0x0FF), 400),
    ("420", smallest(Method.BINDING, (0x7000, b"")), 420),
]


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [case[1:] for case in SMALLEST_UNPROVEN],
    ids=[case[0] for case in SMALLEST_UNPROVEN],
)
def test_the_smallest_request_for_each_unproven_answer_is_answered_with_the_longest_realm(
    request_bytes: bytes, code: int
) -> None:
    core = make_core()
    core.credentials = Credentials(LONGEST_REALM, {"alice": "pw"})
    answer = one(core.on_client_datagram(request_bytes, CLIENT, NOW))
    assert error_code(parse(answer)) == code
    assert len(answer) <= MAX_UNPROVEN_GROWTH * len(request_bytes)
    assert "amplification" not in core.stats.refusals


def test_the_config_accepts_no_realm_that_would_leave_the_smallest_allocate_unanswered(
    tmp_path: Path,
) -> None:
    # Every realm length the config takes, in characters of 1 to 4 bytes, challenges the
    # 28-byte Allocate; one byte more is refused at load, with what to do.
    request = smallest(Method.ALLOCATE, TRANSPORT)
    for char in ("r", "é", "€", "𝄞"):
        for count in range(1, MAX_REALM_BYTES // len(char.encode()) + 1):
            realm = char * count
            core = make_core()
            core.credentials = Credentials(realm, {"alice": "pw"})
            answer = parse(one(core.on_client_datagram(request, CLIENT, NOW)))
            assert answer.get(attr.REALM) == realm.encode()
    (tmp_path / "stun.toml").write_text(f'[auth]\nrealm = "{"r" * (MAX_REALM_BYTES + 1)}"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(StunServiceConfig, tmp_path / "stun.toml", env_prefix=ENV_PREFIX, env={})
    assert refused.value.key == "auth.realm"
    assert "choose a shorter realm" in str(refused.value)


def test_a_peer_datagram_too_large_for_a_data_indication_is_dropped_not_raised() -> None:
    # An IPv6 datagram may carry 65,527 bytes; a Data indication with an IPv6 peer address
    # holds 65,504. Before, the encoder raised on the first such datagram: the whole batch
    # failed, an internal error, and a traceback per datagram for any permitted peer.
    core = make_core(families=frozenset({attr.FAMILY_IPV6}))
    client = Client("alice", "pw")
    relay = allocate(core, client, extra=[(attr.REQUESTED_ADDRESS_FAMILY, IPV6_FAMILY)])
    permit = client.request(Method.CREATE_PERMISSION, peers=(PEER6,))
    assert is_success(ask(core, client, permit), Method.CREATE_PERMISSION)
    sizes = [10, 65_527, MAX_DATA_PAYLOAD + 1, MAX_DATA_PAYLOAD, 20]
    out = core.on_peer_datagrams(relay, [(b"p" * n, PEER6) for n in sizes], NOW)
    carried = [parse(send.data).get(attr.DATA) for send in out]
    assert [len(data or b"") for data in carried] == [10, MAX_DATA_PAYLOAD, 20]
    assert core.stats.refusals["too_large"] == 2
    # Over a channel the four-byte header holds any datagram a peer can send.
    number = [(attr.CHANNEL_NUMBER, attr.channel_number(0x4000))]
    bind = client.request(Method.CHANNEL_BIND, number, peers=(PEER6,))
    assert is_success(ask(core, client, bind), Method.CHANNEL_BIND)
    [framed] = core.on_peer_datagram(b"p" * 65_527, relay, PEER6, NOW)
    assert framed.data[:4] == struct.pack("!HH", 0x4000, 65_527)


# --- an authenticated client's anything: answered or dropped, never raised, always bounded -------

SIGNED_METHODS = [Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND,
                  Method.BINDING]  # fmt: skip
VALUE = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([attr.encode_xor_address(p, b"\x00" * 12) for p in (PEER, PEER6)]),
    st.builds(attr.channel_number, st.integers(0x3FF0, 0x5010)),
    st.builds(attr.uint32, st.sampled_from([0, 1, 600, 2**32 - 1])),
)
STEP = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(SIGNED_METHODS),
              st.lists(st.tuples(st.sampled_from(ATTRIBUTE_KINDS), VALUE), max_size=5)),
    st.tuples(st.just("channel_data"), st.integers(0x3FFF, 0x4010), st.integers(0, 70_000)),
    st.tuples(st.just("request"), st.just(Method.CREATE_PERMISSION),
              st.just([(attr.XOR_PEER_ADDRESS, attr.encode_xor_address(PEER, bytes(12)))])),
    st.tuples(st.just("peer"), st.sampled_from([PEER, PEER6]),
              st.sampled_from([0, 1, 1200, 65_504, 65_505, 65_507, 65_527])),
    st.tuples(st.just("time"), st.sampled_from([1.0, 301.0, 601.0, -3600.0]), st.just(0)),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, max_size=25))
def test_whatever_an_authenticated_client_and_its_peers_send_the_core_stays_bounded(
    steps: list[tuple[str, object, object]],
) -> None:
    limits = Limits(max_permissions=3, max_channels=2, bandwidth_bytes_per_s=100_000)
    core, client = make_core(limits), Client("alice", "pw")
    relay, now = allocate(core, client), NOW
    ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER,)))  # peers get in
    for kind, first, second in steps:
        out: list[Send] = []
        if kind == "request":
            assert isinstance(first, int) and isinstance(second, list)
            out = core.on_client_datagram(client.request(first, second), CLIENT, now)
            for send in out:
                client.learn(send.data)  # a 438 brings a fresh nonce
        elif kind == "channel_data":
            assert isinstance(first, int) and isinstance(second, int)
            framed = struct.pack("!HH", first, min(second, 65_535)) + b"d" * (second % 1500)
            out = core.on_client_datagram(framed, CLIENT, now)
        elif kind == "peer":
            assert isinstance(first, tuple) and isinstance(second, int)
            out = core.on_peer_datagram(b"p" * second, relay, first, now)
        else:
            assert isinstance(first, float)
            now += first
            core.expire(now)
        assert all(isinstance(send, Send) for send in out)
        for alloc in core.by_relay.values():
            assert sum(1 for u in alloc.permissions.values() if u > now) <= limits.max_permissions
            assert sum(1 for _, u in alloc.channels.values() if u > now) <= limits.max_channels
    assert len(core.by_relay) <= 1
    assert_counted_under_known_labels(core)


def test_a_send_indication_with_an_unknown_required_attribute_is_discarded() -> None:
    # RFC 8489 section 6.3.2; before, it was relayed, DONT-FRAGMENT ignored.
    core, client = make_core(), Client("alice", "pw")
    allocate(core, client)
    assert ask(core, client, client.request(Method.CREATE_PERMISSION, peers=(PEER,)))
    tid = os.urandom(12)
    peer_attr = (attr.XOR_PEER_ADDRESS, attr.encode_xor_address(PEER, tid))
    for extra in ((attr.DONT_FRAGMENT, b""), (0x7ABC, b"x")):
        send = encode(Method.SEND, Class.INDICATION, tid, [peer_attr, (attr.DATA, b"d"), extra])
        assert core.on_client_datagram(send, CLIENT, NOW) == []
    assert core.stats.refusals["unknown_attribute"] == 2
    optional = encode(Method.SEND, Class.INDICATION, tid, [peer_attr, (attr.DATA, b"d"),
                                                           (attr.SOFTWARE, b"x")])  # fmt: skip
    assert len(core.on_client_datagram(optional, CLIENT, NOW)) == 1


def test_attributes_after_message_integrity_change_nothing() -> None:
    # RFC 8489 section 14.5: whoever appends attributes to a signed request (LIFETIME 0 to
    # deallocate, another peer to permit) after its MESSAGE-INTEGRITY is not heard.
    core, client = make_core(), Client("alice", "pw")
    relay = allocate(core, client)
    appended = attr_appended(client.request(Method.REFRESH), attr.LIFETIME, attr.uint32(0))
    reply = parse(one(core.on_client_datagram(appended, CLIENT, NOW)))
    assert is_success(reply, Method.REFRESH) and relay in core.by_relay
    assert attr.decode_uint32(reply.get(attr.LIFETIME) or b"") == 600  # the default
    permit = client.request(Method.CREATE_PERMISSION, peers=(PEER,))
    extra = attr.encode_xor_address(("203.0.113.99", 1), client.last_tid)
    reply = parse(one(core.on_client_datagram(
        attr_appended(permit, attr.XOR_PEER_ADDRESS, extra), CLIENT, NOW)))  # fmt: skip
    assert is_success(reply, Method.CREATE_PERMISSION)
    assert set(core.by_client[CLIENT].permissions) == {PEER[0]}


def attr_appended(signed: bytes, kind: int, value: bytes) -> bytes:
    """``signed`` (ending in FINGERPRINT) with an attribute put after its MESSAGE-INTEGRITY,
    the header's length grown to cover it, and no FINGERPRINT (which would have to be last)."""
    body = signed[:-8] + struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)
    return body[:2] + struct.pack("!H", len(body) - 20) + body[4:]
