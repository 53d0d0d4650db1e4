"""The datagram protocol (dna_core.overlay.protocol): no amplification to unproven
addresses, only proven requesters enter the table, client mode answers nothing, and
responses match requests by (request ID, address).

Everything goes through real bytes: requests are encoded, decoded by the codec and
answered; replies are decoded again and checked.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from dna_core.crypto.node import NodeIdentity, puzzle_bits
from dna_core.overlay.codec import (
    MAX_DATAGRAM,
    Datagram,
    ErrorReply,
    FindNode,
    Nodes,
    Ping,
    Pong,
    TokenReply,
    decode_datagram,
    encode_datagram,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.kbucket import Admission, RoutingTable
from dna_core.overlay.protocol import (
    AMPLIFICATION_FACTOR,
    FIRST_PING_PADDING,
    FIRST_REQUEST_PADDING,
    Answer,
    RequestTracker,
    Responder,
    request_datagram,
)
from dna_core.overlay.tokens import AddressTokens
from hypothesis import given
from hypothesis import strategies as st

PUZZLE = 8
NOW = 1000.0
TARGET = bytes(range(32))


def node_identity(name: str) -> NodeIdentity:
    for i in range(1 << 20):
        node = NodeIdentity(hashlib.sha256(f"dna-test-node/{name}/{i}".encode()).digest())
        if puzzle_bits(node.node_id) >= PUZZLE:
            return node
    raise AssertionError("no key found")


def member(name: str, *endpoints: Endpoint) -> Contact:
    node = node_identity(name)
    return Contact(node.node_id, node.public_key, endpoints, role=2)


LOCAL = member("local", Endpoint("198.18.0.1", 4000))
REQ_ADDR = ("198.18.5.5", 5000)
REQUESTER = member("requester", Endpoint(*REQ_ADDR))
V4_PEERS = [member(f"peer{i}", Endpoint(f"198.18.{10 + i}.1", 4000)) for i in range(24)]
V6_PEERS = [
    member(f"peer{i}", Endpoint(f"2001:db8:{i + 1:x}::1", 4000), Endpoint(f"198.18.{i}.2", 4000))
    for i in range(24)
]


def decode(data: bytes) -> Datagram:
    return decode_datagram(data, puzzle_bits=PUZZLE)


def fresh_tokens() -> AddressTokens:
    return AddressTokens(b"node secret" * 3)


def responder(peers: list[Contact] = V4_PEERS) -> Responder:
    table = RoutingTable(LOCAL.node_id, subnet_limit=20)
    for p in peers:
        table.observe(p, 0.0)
    return Responder(local=LOCAL, table=table, tokens=fresh_tokens())


def ask(r: Responder, request: bytes, addr: tuple[str, int] = REQ_ADDR) -> Answer:
    """What the adapter does: decode, then answer with the datagram's size."""
    return r.answer(decode(request), addr, len(request), NOW)


def table_ids(r: Responder) -> set[bytes]:
    assert r.table is not None
    return {c.node_id for c in r.table.contacts()}


def tracker_request(body: FindNode | Ping, sender: Contact | None, token: bytes | None) -> bytes:
    pending = RequestTracker(random.Random(7)).start(REQ_ADDR, body, NOW, 1.0)
    return request_datagram(pending, sender, token)


# -- amplification ----------------------------------------------------------------------


@pytest.mark.parametrize("sender", [None, REQUESTER], ids=["client", "member"])
def test_find_node_without_token_or_padding_gets_a_small_token_reply(
    sender: Contact | None,
) -> None:
    r = responder()
    before = table_ids(r)
    request = encode_datagram(Datagram(42, FindNode(TARGET), sender))
    answer = ask(r, request)
    assert answer.outcome == "token_required" and answer.reply is not None
    assert len(answer.reply) <= AMPLIFICATION_FACTOR * len(request)
    reply = decode(answer.reply)
    assert reply.request_id == 42 and isinstance(reply.body, TokenReply)
    assert r.tokens.valid(reply.token, REQ_ADDR, NOW)
    assert answer.observed is None and table_ids(r) == before


@pytest.mark.parametrize("sender", [None, REQUESTER], ids=["client", "member"])
def test_padded_first_find_node_gets_the_full_answer(sender: Contact | None) -> None:
    r = responder()
    request = tracker_request(FindNode(TARGET), sender, None)
    assert decode(request).padding == FIRST_REQUEST_PADDING
    assert AMPLIFICATION_FACTOR * len(request) >= MAX_DATAGRAM  # earns any answer
    answer = ask(r, request)
    assert answer.outcome == "ok" and answer.reply is not None
    reply = decode(answer.reply)
    assert isinstance(reply.body, Nodes)
    assert r.table is not None
    assert list(reply.body.closer) == r.table.closest(TARGET)
    assert r.tokens.valid(reply.token, REQ_ADDR, NOW)
    assert answer.observed is None  # no token: the requester did not prove its address


def test_find_node_with_a_valid_token_gets_nodes_and_the_requester_is_inserted() -> None:
    r = responder()
    token = r.tokens.issue(REQ_ADDR, NOW - 5)
    request = tracker_request(FindNode(TARGET), REQUESTER, token)
    assert decode(request).padding == 0 and decode(request).token == token
    answer = ask(r, request)
    assert answer.outcome == "ok" and answer.reply is not None
    reply = decode(answer.reply)
    assert isinstance(reply.body, Nodes) and len(reply.body.closer) == r.k
    assert REQUESTER.node_id not in {c.node_id for c in reply.body.closer}
    assert answer.observed is not None and answer.observed.admission is Admission.INSERTED
    assert REQUESTER.node_id in table_ids(r)
    # asked again: the requester is in the table now, but never handed back to itself
    reply = decode(
        ask(r, tracker_request(FindNode(REQUESTER.node_id), REQUESTER, token)).reply or b""
    )
    assert isinstance(reply.body, Nodes) and len(reply.body.closer) == r.k
    assert REQUESTER.node_id not in {c.node_id for c in reply.body.closer}


@pytest.mark.parametrize("token", [False, True], ids=["first", "with_token"])
def test_ping_gets_a_pong_with_the_observed_endpoint_and_a_token(token: bool) -> None:
    r = responder()
    request = tracker_request(Ping(), REQUESTER, r.tokens.issue(REQ_ADDR, NOW) if token else None)
    assert decode(request).padding == (0 if token else FIRST_PING_PADDING)
    answer = ask(r, request)
    assert answer.outcome == "ok" and answer.reply is not None
    reply = decode(answer.reply)
    assert reply.body == Pong(Endpoint(*REQ_ADDR))
    assert reply.sender == LOCAL
    assert r.tokens.valid(reply.token, REQ_ADDR, NOW)
    if not token:  # an unproven address: the answer is bounded (the with_token case is not)
        assert len(answer.reply) <= AMPLIFICATION_FACTOR * len(request)


@given(
    body=st.sampled_from([Ping(), FindNode(TARGET)]),
    sender=st.sampled_from([None, REQUESTER]),
    request_id=st.sampled_from([0, 1, 300, 2**40, 2**64 - 1]),
    padding=st.integers(0, 40),
    token=st.sampled_from([b"", b"x" * 16, b"short"]),
)
def test_no_answer_to_an_unproven_address_exceeds_three_times_the_request(
    body: Ping | FindNode, sender: Contact | None, request_id: int, padding: int, token: bytes
) -> None:
    """RFC 9000 §8.1 / the module docstring: whatever is sent back, TokenReply included."""
    r = responder()
    request = encode_datagram(Datagram(request_id, body, sender, token, padding))
    answer = ask(r, request)
    if answer.reply is not None:
        assert len(answer.reply) <= AMPLIFICATION_FACTOR * len(request), (
            f"{len(request)}-byte {type(body).__name__} earned {len(answer.reply)} bytes"
        )


def test_smallest_request_is_not_amplified() -> None:
    request = encode_datagram(Datagram(0, Ping()))  # 4 bytes: version and an empty ping
    answer = ask(responder(), request)
    size = 0 if answer.reply is None else len(answer.reply)
    assert size <= AMPLIFICATION_FACTOR * len(request), f"{len(request)} bytes in, {size} out"


# -- who enters the routing table ---------------------------------------------------------

OTHER_ADDR = ("198.18.6.6", 6000)
PONG = Pong()


@pytest.mark.parametrize(
    ("sender", "source", "token_for", "token_at", "inserted"),
    [
        (REQUESTER, REQ_ADDR, REQ_ADDR, NOW, True),
        (REQUESTER, REQ_ADDR, REQ_ADDR, NOW - 300, True),  # previous epoch
        (REQUESTER, REQ_ADDR, None, NOW, False),  # no token
        (REQUESTER, REQ_ADDR, REQ_ADDR, NOW - 600, False),  # expired token
        (REQUESTER, REQ_ADDR, OTHER_ADDR, NOW, False),  # a token for another address
        (REQUESTER, OTHER_ADDR, OTHER_ADDR, NOW, False),  # proven, but not its endpoint
        (
            member("multi", Endpoint(*OTHER_ADDR), Endpoint(*REQ_ADDR)),
            REQ_ADDR,
            REQ_ADDR,
            NOW,
            True,  # its second endpoint
        ),
        (
            member("port", Endpoint(REQ_ADDR[0], REQ_ADDR[1] + 1)),
            REQ_ADDR,
            REQ_ADDR,
            NOW,
            False,  # same IP, other port
        ),
    ],
)
def test_requester_is_inserted_only_with_a_valid_token_from_one_of_its_endpoints(
    sender: Contact,
    source: tuple[str, int],
    token_for: tuple[str, int] | None,
    token_at: float,
    inserted: bool,
) -> None:
    for body in (Ping(), FindNode(TARGET)):
        r = responder()
        before = table_ids(r)
        token = r.tokens.issue(token_for, token_at) if token_for else b""
        request = encode_datagram(Datagram(9, body, sender, token, FIRST_REQUEST_PADDING))
        answer = ask(r, request, source)
        assert answer.reply is not None
        if inserted:
            assert answer.observed is not None
            assert table_ids(r) == before | {sender.node_id}
        else:
            assert answer.observed is None
            assert table_ids(r) == before


def test_client_requests_are_answered_but_never_inserted() -> None:
    r = responder()
    before = table_ids(r)
    token = r.tokens.issue(REQ_ADDR, NOW)
    answer = ask(r, tracker_request(FindNode(TARGET), None, token))
    assert answer.outcome == "ok" and answer.observed is None and table_ids(r) == before


def test_client_mode_answers_nothing() -> None:
    table = RoutingTable(node_identity("client").node_id)
    r = Responder(local=None, table=table, tokens=fresh_tokens())
    token = r.tokens.issue(REQ_ADDR, NOW)
    for body in (Ping(), FindNode(TARGET)):
        request = tracker_request(body, REQUESTER, token)
        assert ask(r, request) == Answer(None, "ignored")
    assert len(table) == 0


@pytest.mark.parametrize(
    "body", [Pong(), Nodes(()), TokenReply(), ErrorReply(3, "no")], ids=lambda b: type(b).__name__
)
def test_responses_are_not_answered(body: Pong | Nodes | TokenReply | ErrorReply) -> None:
    r = responder()
    before = table_ids(r)
    token = r.tokens.issue(REQ_ADDR, NOW)
    answer = ask(r, encode_datagram(Datagram(5, body, REQUESTER, token)))
    assert answer == Answer(None, "ignored") and table_ids(r) == before


# Five nodes (cheap: an 8-bit puzzle) that each proved one address and list four long
# IPv6 endpoints: every answer that includes them would exceed 1,200 bytes.
LONG_V6 = tuple(Endpoint(f"2001:db8:ffff:{j + 1:x}::ffff", 65535, 65535) for j in range(3))
BULKY = [member(f"bulky{i}", Endpoint(f"198.18.{100 + i}.1", 4000), *LONG_V6) for i in range(5)]


@pytest.mark.parametrize(
    "peers", [V6_PEERS, V4_PEERS[:15] + BULKY], ids=["dual_stack", "bulky_contacts"]
)
def test_find_node_answer_fits_a_datagram(peers: list[Contact]) -> None:
    """20 dual-stack contacts need ~1,550 bytes, and a few contacts listing four IPv6
    endpoints are enough to overflow an answer: the responder must send the closest
    contacts that fit, not raise out of answer() (which leaves the requester unanswered)."""
    r = responder(peers)
    token = r.tokens.issue(REQ_ADDR, NOW)
    answer = ask(r, tracker_request(FindNode(TARGET), REQUESTER, token))
    assert answer.reply is not None and len(answer.reply) <= MAX_DATAGRAM
    reply = decode(answer.reply)
    assert isinstance(reply.body, Nodes) and reply.body.closer
    assert r.table is not None  # the requester proved its address: it is in the table now
    closest = [c for c in r.table.closest(TARGET, 21) if c.node_id != REQUESTER.node_id]
    assert list(reply.body.closer) == closest[: len(reply.body.closer)]


# -- matching responses --------------------------------------------------------------------


def response(request_id: int, body: Pong | Nodes | TokenReply = PONG) -> Datagram:
    return decode(encode_datagram(Datagram(request_id, body, LOCAL, b"t" * 16)))


def test_responses_match_by_request_id_and_address() -> None:
    tracker = RequestTracker(random.Random(1))
    a = tracker.start(REQ_ADDR, FindNode(TARGET), NOW, 1.0, node_id=REQUESTER.node_id)
    b = tracker.start(OTHER_ADDR, Ping(), NOW, 2.0)
    assert a.request_id != b.request_id and len(tracker) == 2
    assert tracker.match(response(a.request_id), OTHER_ADDR) is None  # right ID, wrong address
    assert tracker.match(response(a.request_id), ("198.18.5.5", 5001)) is None  # wrong port
    assert tracker.match(response(a.request_id ^ 1), REQ_ADDR) is None  # unknown ID
    assert tracker.match(decode(encode_datagram(Datagram(a.request_id, Ping()))), REQ_ADDR) is None
    assert len(tracker) == 2  # none of that disturbed the real request
    assert tracker.match(response(a.request_id), REQ_ADDR) is a
    assert tracker.match(response(a.request_id), REQ_ADDR) is None  # answered once only
    assert not tracker.forget(a)
    assert tracker.forget(b) and len(tracker) == 0


def test_same_id_to_two_addresses_is_two_requests() -> None:
    class Fixed(random.Random):
        def getrandbits(self, k: int) -> int:
            return 77

    tracker = RequestTracker(Fixed())
    a = tracker.start(REQ_ADDR, Ping(), NOW, 1.0)
    b = tracker.start(OTHER_ADDR, Ping(), NOW, 1.0)
    assert a.request_id == b.request_id == 77
    assert tracker.match(response(77), OTHER_ADDR) is b
    assert tracker.match(response(77), REQ_ADDR) is a


def test_request_ids_are_unpredictable_and_not_reused() -> None:
    tracker = RequestTracker(random.Random(3))
    ids = [tracker.start(REQ_ADDR, Ping(), NOW, 1.0).request_id for _ in range(500)]
    assert len(set(ids)) == 500
    assert max(ids) > 2**32  # 64 random bits, not a counter


def test_expire_returns_requests_past_their_deadline() -> None:
    tracker = RequestTracker(random.Random(2))
    assert tracker.next_deadline() is None
    early = tracker.start(REQ_ADDR, Ping(), NOW, 1.0)
    late = tracker.start(OTHER_ADDR, FindNode(TARGET), NOW, 3.0)
    assert tracker.next_deadline() == NOW + 1.0
    assert tracker.expire(NOW + 0.5) == []
    assert tracker.expire(NOW + 1.0) == [early]  # at the deadline
    assert tracker.match(response(early.request_id), REQ_ADDR) is None  # too late now
    assert tracker.next_deadline() == NOW + 3.0
    assert tracker.expire(NOW + 10) == [late]
    assert len(tracker) == 0 and tracker.next_deadline() is None


def test_request_datagram_pads_only_first_requests() -> None:
    token = b"t" * 16
    cases: list[tuple[FindNode | Ping, bytes | None, int]] = [
        (FindNode(TARGET), None, FIRST_REQUEST_PADDING),
        (FindNode(TARGET), token, 0),
        (Ping(), None, FIRST_PING_PADDING),
        (Ping(), token, 0),
    ]
    for body, tok, padding in cases:
        got = decode(tracker_request(body, REQUESTER, tok))
        assert got.padding == padding and got.token == (tok or b"") and got.body == body
        assert got.sender == REQUESTER and got.is_request


# -- unproven requests --------------------------------------------------------------------

# Tokens that do not prove REQ_ADDR now: random bytes, a real token with one bit flipped,
# one for another address, one from two epochs ago. (Garbage that does not even decode is
# the codec's: tests/core/overlay/test_datagram_codec.py.)
_ISSUER = fresh_tokens()  # the same secret as every responder() here
_VALID = _ISSUER.issue(REQ_ADDR, NOW)
FORGED_TOKENS = (
    st.binary(max_size=40)
    | st.builds(
        lambda i, bit: bytes(b ^ (1 << bit) if j == i else b for j, b in enumerate(_VALID)),
        st.integers(0, len(_VALID) - 1),
        st.integers(0, 7),
    )
    | st.just(_ISSUER.issue(("198.18.6.6", 6000), NOW))
    | st.just(_ISSUER.issue(REQ_ADDR, NOW - 600))
)


@given(
    body=st.sampled_from([Ping(), FindNode(TARGET)]),
    sender=st.sampled_from([REQUESTER, member("other", Endpoint(*REQ_ADDR))]),
    token=FORGED_TOKENS,
    padding=st.sampled_from([0, FIRST_PING_PADDING, FIRST_REQUEST_PADDING]),
    request_id=st.integers(0, 2**64 - 1),
)
def test_a_request_without_a_valid_token_never_enters_the_table(
    body: Ping | FindNode, sender: Contact, token: bytes, padding: int, request_id: int
) -> None:
    """Whatever it claims and however it is padded, a request from an address that did
    not prove it receives (no valid token) is answered at most, never observed."""
    r = responder()
    assert not r.tokens.valid(token, REQ_ADDR, NOW)  # a forged token, as the strategy means
    before = table_ids(r)
    answer = ask(r, encode_datagram(Datagram(request_id, body, sender, token, padding)))
    assert answer.observed is None
    assert table_ids(r) == before
