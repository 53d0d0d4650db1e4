"""The overlay datagram codec (dna_core.overlay.codec): round trips, every documented
refusal, the 1,200-byte budget, and fuzzing (bytes either decode or raise ProtocolError).

Node keys are real Ed25519 keys solving the static puzzle; they are derived from fixed
seeds (searching seeds in order) so every run uses the same keys.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable

import pytest
from dna_core.crypto.node import NodeIdentity, puzzle_bits
from dna_core.errors import MalformedError, ProtocolError, VerificationError
from dna_core.overlay.codec import (
    DATAGRAM_VERSION,
    MAX_CLOSER,
    MAX_DATAGRAM,
    MAX_ENDPOINTS,
    MAX_REASON,
    Body,
    Datagram,
    ErrorReply,
    FindNode,
    Nodes,
    Ping,
    Pong,
    TokenReply,
    contact_to_proto,
    decode_datagram,
    encode_datagram,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.tokens import TOKEN_SIZE
from dna_core.wire import encode_message
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import single_byte_tampers

PUZZLE = 8
MAX_ID = 2**64 - 1
V4_MAX = "255.255.255.255"
V6_MAX = str(ipaddress.IPv6Address(2**128 - 1))


def node_identity(name: str, puzzle: int = PUZZLE) -> NodeIdentity:
    """The first key derived from ``name`` whose ID solves the puzzle (deterministic)."""
    for i in range(1 << 20):
        node = NodeIdentity(hashlib.sha256(f"dna-test-node/{name}/{i}".encode()).digest())
        if puzzle_bits(node.node_id) >= puzzle:
            return node
    raise AssertionError("no key found")


def unsolved_identity() -> NodeIdentity:
    for i in range(1000):
        node = NodeIdentity(hashlib.sha256(f"dna-test-weak/{i}".encode()).digest())
        if puzzle_bits(node.node_id) < PUZZLE:
            return node
    raise AssertionError("no key found")


NODES = [node_identity(f"n{i}") for i in range(MAX_CLOSER + 2)]


def make_contact(node: NodeIdentity, *endpoints: Endpoint, role: int = 2) -> Contact:
    return Contact(
        node.node_id, node.public_key, endpoints or (Endpoint("198.18.0.1", 4000),), role
    )


def largest(node: NodeIdentity, ip: str) -> Contact:
    """A contact whose every field takes its largest encoding."""
    return make_contact(node, Endpoint(ip, 65535, 65535), role=max(common_pb2.NodeRole.values()))


SENDER = make_contact(NODES[-1], Endpoint("198.18.0.9", 4000, 4001))
TOKEN = bytes(range(TOKEN_SIZE))


def decode(data: bytes) -> Datagram:
    return decode_datagram(data, puzzle_bits=PUZZLE)


# -- round trips ---------------------------------------------------------------------

BODIES: list[Body] = [
    Ping(),
    Pong(),
    Pong(Endpoint("203.0.113.5", 61000)),
    Pong(Endpoint("2001:db8::7", 443, 8443)),
    FindNode(bytes(range(32))),
    Nodes(()),
    Nodes(
        tuple(
            make_contact(n, Endpoint(f"198.18.1.{i + 1}", 4000 + i))
            for i, n in enumerate(NODES[:MAX_CLOSER])
        )
    ),
    Nodes(
        (
            make_contact(
                NODES[0], Endpoint("2001:db8::1", 4000), Endpoint("198.18.0.1", 4000, 9000)
            ),
            make_contact(
                NODES[1], *(Endpoint(f"198.18.2.{i}", 4000) for i in range(MAX_ENDPOINTS)), role=0
            ),
        )
    ),
    TokenReply(),
    ErrorReply(8, "slow down"),
    ErrorReply(0, ""),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("sender", [None, SENDER], ids=["client", "member"])
@pytest.mark.parametrize(
    ("request_id", "token", "padding"), [(0, b"", 0), (MAX_ID, TOKEN, 0), (7, b"", 400)]
)
def test_round_trip(
    body: Body, sender: Contact | None, request_id: int, token: bytes, padding: int
) -> None:
    dgram = Datagram(request_id, body, sender, token, padding)
    try:
        data = encode_datagram(dgram)
    except ValueError:
        assert isinstance(body, Nodes) and padding  # 20 contacts + 400 bytes of padding
        return
    assert len(data) <= MAX_DATAGRAM
    assert decode(data) == dgram
    assert decode(data).is_request is isinstance(body, Ping | FindNode)


def test_generated_node_keys_round_trip() -> None:
    node, attempts = NodeIdentity.generate(PUZZLE)
    assert attempts >= 1
    dgram = Datagram(1, Ping(), make_contact(node))
    got = decode(encode_datagram(dgram))
    assert got == dgram and got.sender is not None and got.sender.node_id == node.node_id


def test_long_error_reason_is_truncated() -> None:
    got = decode(encode_datagram(Datagram(1, ErrorReply(3, "x" * 500))))
    assert got.body == ErrorReply(3, "x" * MAX_REASON)


ips = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)
endpoints = st.builds(Endpoint, ips, st.integers(1, 65535), st.integers(0, 65535))
contacts = st.builds(
    make_contact,
    st.sampled_from(NODES),
    endpoints,
    role=st.sampled_from(sorted(common_pb2.NodeRole.values())),
)
bodies: st.SearchStrategy[Body] = st.one_of(
    st.just(Ping()),
    st.builds(Pong, st.none() | endpoints),
    st.builds(FindNode, st.binary(min_size=32, max_size=32)),
    st.builds(Nodes, st.lists(contacts, max_size=MAX_CLOSER).map(tuple)),
    st.just(TokenReply()),
    st.builds(ErrorReply, st.integers(0, 2**32 - 1), st.text(max_size=MAX_REASON)),
)
datagrams = st.builds(
    Datagram,
    st.integers(0, MAX_ID),
    bodies,
    st.none() | contacts,
    st.binary(max_size=40),
    st.integers(0, 300),
)


@given(datagrams)
def test_random_datagrams_round_trip(dgram: Datagram) -> None:
    try:
        data = encode_datagram(dgram)
    except ValueError:
        return  # over the cap: the encoder refuses it
    assert decode(data) == dgram


# -- the size budget ------------------------------------------------------------------


def raw_size(dgram: Datagram) -> int:
    """Encoded size without the encoder's cap (to measure what does not fit)."""
    msg = overlay_pb2.Datagram(
        version=DATAGRAM_VERSION, request_id=dgram.request_id, token=dgram.token
    )
    assert dgram.sender is not None and isinstance(dgram.body, Nodes)
    msg.sender.CopyFrom(contact_to_proto(dgram.sender))
    msg.nodes.closer.extend(contact_to_proto(c) for c in dgram.body.closer)
    return len(encode_message(msg))


def test_largest_ipv4_nodes_datagram_fits(capsys: pytest.CaptureFixture[str]) -> None:
    closer = tuple(largest(n, V4_MAX) for n in NODES[:MAX_CLOSER])
    dgram = Datagram(MAX_ID, Nodes(closer), largest(NODES[-1], V4_MAX), TOKEN)
    data = encode_datagram(dgram)
    assert raw_size(dgram) == len(data) <= MAX_DATAGRAM
    assert decode(data) == dgram
    with capsys.disabled():
        print(f"\nlargest Nodes datagram, 20 IPv4 contacts: {len(data)} bytes")


def test_twenty_ipv6_contacts_do_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    """Documents the budget: with IPv6 (or several endpoints) 20 contacts are too many;
    see test_protocol.py for what the responder must do about it."""
    sizes = {}
    for label, ip, port, grpc in (
        ("max", V6_MAX, 65535, 65535),
        ("typical", "2001:db8::1", 4000, 0),
    ):
        sender = make_contact(NODES[-1], Endpoint(ip, port, grpc))
        closer = tuple(make_contact(n, Endpoint(ip, port, grpc)) for n in NODES[:MAX_CLOSER])
        dgram = Datagram(MAX_ID, Nodes(closer), sender, TOKEN)
        sizes[label] = raw_size(dgram)
        with pytest.raises(ValueError, match="exceeds"):
            encode_datagram(dgram)
        fits = max(
            n
            for n in range(MAX_CLOSER + 1)
            if raw_size(Datagram(MAX_ID, Nodes(closer[:n]), sender, TOKEN)) <= MAX_DATAGRAM
        )
        sizes[f"{label}_fit"] = fits
    assert sizes["max"] > MAX_DATAGRAM and sizes["typical"] > MAX_DATAGRAM
    with capsys.disabled():
        print(f"\n20 IPv6 contacts: {sizes} (bytes; *_fit = contacts that fit)")


# -- refusals --------------------------------------------------------------------------


def wire(**fields: object) -> overlay_pb2.Datagram:
    msg = overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=1)
    msg.ping.SetInParent()
    for name, value in fields.items():
        if name == "sender":
            assert isinstance(value, common_pb2.NodeContact)
            msg.sender.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def proto_contact(
    key: bytes | None = None,
    endpoints: list[common_pb2.Endpoint] | None = None,
    role: int = 2,
) -> common_pb2.NodeContact:
    if endpoints is None:
        endpoints = [common_pb2.Endpoint(ip=bytes([198, 18, 0, 1]), udp_port=4000)]
    return common_pb2.NodeContact(
        public_key=NODES[0].public_key if key is None else key,
        endpoints=endpoints,
        role=role,  # type: ignore[arg-type]
    )


def ep(ip: bytes = bytes([198, 18, 0, 1]), udp: int = 4000, grpc: int = 0) -> common_pb2.Endpoint:
    return common_pb2.Endpoint(ip=ip, udp_port=udp, grpc_port=grpc)


def as_sender(c: common_pb2.NodeContact) -> bytes:
    return encode_message(wire(sender=c))


def as_closer(c: common_pb2.NodeContact) -> bytes:
    msg = overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=1)
    msg.nodes.closer.append(c)
    return encode_message(msg)


def find_node(target: bytes) -> bytes:
    msg = overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=1)
    msg.find_node.target = target
    return encode_message(msg)


def nodes_of(count: int) -> bytes:
    msg = overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=1)
    msg.nodes.closer.extend(
        proto_contact(key=NODES[i % len(NODES)].public_key) for i in range(count)
    )
    return encode_message(msg)


def pong_observing(endpoint: common_pb2.Endpoint) -> bytes:
    msg = overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=1)
    msg.pong.observed.CopyFrom(endpoint)
    return encode_message(msg)


def no_body() -> bytes:
    return encode_message(overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=1))


def over_cap() -> bytes:
    base = len(encode_message(wire(padding=b"\0" * 1000)))
    data = encode_message(wire(padding=b"\0" * (1000 + MAX_DATAGRAM + 1 - base)))
    assert len(data) == MAX_DATAGRAM + 1
    return data


REFUSALS: dict[str, tuple[Callable[[], bytes], type[ProtocolError]]] = {
    "key misses the puzzle": (
        lambda: as_sender(proto_contact(key=unsolved_identity().public_key)),
        VerificationError,
    ),
    "key misses the puzzle (closer)": (
        lambda: as_closer(proto_contact(key=unsolved_identity().public_key)),
        VerificationError,
    ),
    "key of 31 bytes": (lambda: as_sender(proto_contact(key=bytes(31))), MalformedError),
    "key of 33 bytes": (
        lambda: as_sender(proto_contact(key=NODES[0].public_key + b"\0")),
        MalformedError,
    ),
    "no key": (lambda: as_sender(proto_contact(key=b"")), MalformedError),
    "0 endpoints": (lambda: as_sender(proto_contact(endpoints=[])), MalformedError),
    "5 endpoints": (
        lambda: as_sender(proto_contact(endpoints=[ep(bytes([198, 18, 0, i])) for i in range(5)])),
        MalformedError,
    ),
    "ip of 0 bytes": (lambda: as_sender(proto_contact(endpoints=[ep(b"")])), MalformedError),
    "ip of 5 bytes": (lambda: as_sender(proto_contact(endpoints=[ep(bytes(5))])), MalformedError),
    "ip of 15 bytes": (lambda: as_closer(proto_contact(endpoints=[ep(bytes(15))])), MalformedError),
    "udp port 0": (lambda: as_sender(proto_contact(endpoints=[ep(udp=0)])), MalformedError),
    "udp port 65536": (lambda: as_sender(proto_contact(endpoints=[ep(udp=65536)])), MalformedError),
    "grpc port 65536": (
        lambda: as_sender(proto_contact(endpoints=[ep(grpc=65536)])),
        MalformedError,
    ),
    "second endpoint bad": (
        lambda: as_sender(proto_contact(endpoints=[ep(), ep(udp=0)])),
        MalformedError,
    ),
    "unknown role": (lambda: as_sender(proto_contact(role=99)), MalformedError),
    "21 closer contacts": (lambda: nodes_of(MAX_CLOSER + 1), MalformedError),
    "target of 31 bytes": (lambda: find_node(bytes(31)), MalformedError),
    "target of 33 bytes": (lambda: find_node(bytes(33)), MalformedError),
    "empty target": (lambda: find_node(b""), MalformedError),
    "nonzero padding": (lambda: encode_message(wire(padding=b"\0" * 9 + b"\1")), MalformedError),
    "version 0": (lambda: encode_message(wire(version=0)), MalformedError),
    "version 2": (lambda: encode_message(wire(version=2)), MalformedError),
    "1201 bytes": (over_cap, MalformedError),
    "observed port 0": (lambda: pong_observing(ep(udp=0)), MalformedError),
    "observed ip of 3 bytes": (lambda: pong_observing(ep(ip=bytes(3))), MalformedError),
    "no body": (no_body, MalformedError),
    "unknown field": (lambda: encode_message(wire()) + b"\xa0\x06\x01", MalformedError),
    "field repeated (non-canonical)": (
        lambda: encode_message(wire()) + b"\x08\x01",
        MalformedError,
    ),
    "empty input": (lambda: b"", MalformedError),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals(case: str) -> None:
    make, error = REFUSALS[case]
    with pytest.raises(error) as info:
        decode(make())
    assert type(info.value) is error
    assert info.value.reason


def test_limits_are_inclusive() -> None:
    """The largest legal values of what the refusals test just past."""
    four = proto_contact(endpoints=[ep(bytes([198, 18, 0, i]), 65535, 65535) for i in range(4)])
    got = decode(as_sender(four))
    assert got.sender is not None and len(got.sender.endpoints) == MAX_ENDPOINTS
    body = decode(nodes_of(MAX_CLOSER)).body
    assert isinstance(body, Nodes) and len(body.closer) == MAX_CLOSER
    base = len(encode_message(wire(padding=b"\0" * 1000)))
    data = encode_message(wire(padding=b"\0" * (1000 + MAX_DATAGRAM - base)))
    assert len(data) == MAX_DATAGRAM
    assert decode(data).padding == 1000 + MAX_DATAGRAM - base


def test_encoder_refuses_oversized_datagrams() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_datagram(Datagram(1, Ping(), padding=MAX_DATAGRAM))


# -- fuzzing ---------------------------------------------------------------------------

SAMPLES = [
    encode_datagram(Datagram(MAX_ID, body, SENDER, TOKEN))
    for body in BODIES
    if len(encode_datagram(Datagram(0, body))) < 900
]


def decodes_or_refuses(data: bytes) -> None:
    try:
        got = decode(data)
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert isinstance(got, Datagram)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=MAX_DATAGRAM + 10))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=500)
@given(
    st.sampled_from(SAMPLES),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]),
            st.integers(0, 2000),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_datagrams_decode_or_raise_protocol_error(
    sample: bytes, edits: list[tuple[str, int, int]]
) -> None:
    data = bytearray(sample)
    for op, pos, value in edits:
        i = pos % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= value or 1
        elif op == "insert":
            data.insert(i, value)
        elif op == "delete" and i < len(data):
            del data[i]
        elif op == "truncate":
            del data[i:]
    decodes_or_refuses(bytes(data))


def test_every_single_byte_tamper_decodes_or_raises_protocol_error() -> None:
    for sample in SAMPLES:
        for data in single_byte_tampers(sample, limit=150, seed=len(sample)):
            decodes_or_refuses(data)


@given(
    st.builds(
        lambda key, ip, udp, grpc, role: proto_contact(
            key=key, endpoints=[ep(ip, udp, grpc)], role=role
        ),
        st.sampled_from([n.public_key for n in NODES[:3]]) | st.binary(max_size=40),
        st.binary(max_size=17),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**31 - 1),
    )
)
def test_structured_contacts_decode_or_raise_protocol_error(c: common_pb2.NodeContact) -> None:
    decodes_or_refuses(as_sender(c))
    decodes_or_refuses(as_closer(c))
