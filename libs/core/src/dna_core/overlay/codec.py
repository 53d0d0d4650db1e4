"""The overlay's wire codec: UDP datagrams and node contacts.

The one place where overlay protobufs become domain objects. Contacts are
admitted only with a valid node-key proof (ID = SHA-256 of the key, plus the
network's static puzzle); datagrams are capped at 1,200 bytes, so they fit the
minimum IPv6 path MTU minus headers and never fragment.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dna_core.crypto.node import verify_node_key
from dna_core.errors import MalformedError
from dna_core.overlay.contact import ID_BYTES, Contact, Endpoint
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2

DATAGRAM_VERSION = 1
MAX_DATAGRAM = 1200
MAX_ENDPOINTS = 4
MAX_CLOSER = 20
MAX_REASON = 200
CHALLENGE_BYTES = 16  # Ping.challenge
PROOF_BYTES = 64  # Pong.proof: an Ed25519 signature
KNOWN_ROLES = frozenset(common_pb2.NodeRole.values())
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Ping:
    challenge: bytes = b""  # asks for a Pong.proof (key possession)


@dataclass(frozen=True, slots=True)
class Pong:
    observed: Endpoint | None = None
    proof: bytes = b""  # node-key signature over the ping's challenge


@dataclass(frozen=True, slots=True)
class FindNode:
    target: bytes


@dataclass(frozen=True, slots=True)
class Nodes:
    closer: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class TokenReply:
    pass  # the token itself rides in Datagram.token


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: int
    reason: str


Body = Ping | Pong | FindNode | Nodes | TokenReply | ErrorReply
REQUESTS = (Ping, FindNode)


@dataclass(frozen=True, slots=True)
class Datagram:
    request_id: int
    body: Body
    sender: Contact | None = None
    token: bytes = b""
    padding: int = 0

    @property
    def is_request(self) -> bool:
        return isinstance(self.body, REQUESTS)


# -- contacts -----------------------------------------------------------------


def endpoint_to_proto(ep: Endpoint) -> common_pb2.Endpoint:
    # inet_aton/inet_ntoa are ~10x faster than ipaddress for the common IPv4 case.
    packed = socket.inet_aton(ep.ip) if ":" not in ep.ip else ipaddress.ip_address(ep.ip).packed
    return common_pb2.Endpoint(ip=packed, udp_port=ep.udp_port, grpc_port=ep.grpc_port)


def endpoint_from_proto(msg: common_pb2.Endpoint) -> Endpoint:
    if len(msg.ip) not in (4, 16):
        raise MalformedError(f"endpoint: IP address of {len(msg.ip)} bytes")
    if not 0 < msg.udp_port < 65536 or msg.grpc_port >= 65536:
        raise MalformedError("endpoint: port out of range")
    ip = socket.inet_ntoa(msg.ip) if len(msg.ip) == 4 else str(ipaddress.ip_address(msg.ip))
    return Endpoint(ip, msg.udp_port, msg.grpc_port)


def contact_to_proto(contact: Contact) -> common_pb2.NodeContact:
    return common_pb2.NodeContact(
        public_key=contact.public_key,
        endpoints=[endpoint_to_proto(e) for e in contact.endpoints],
        role=contact.role,  # type: ignore[arg-type]
    )


def contact_from_proto(msg: common_pb2.NodeContact, puzzle_bits: int) -> Contact:
    """Validate a contact, including its node-key proof; raises a ProtocolError."""
    if not 0 < len(msg.endpoints) <= MAX_ENDPOINTS:
        raise MalformedError(f"contact: {len(msg.endpoints)} endpoints (1..{MAX_ENDPOINTS})")
    if msg.role not in KNOWN_ROLES:
        raise MalformedError(f"contact: unknown role {msg.role}")
    node_id = verify_node_key(msg.public_key, puzzle_bits)
    endpoints = tuple(endpoint_from_proto(e) for e in msg.endpoints)
    return Contact(node_id, msg.public_key, endpoints, msg.role)


class ContactCache:
    """One node's memory of contacts it decoded or encoded before.

    A lookup decodes ~40 answers of up to 20 contacts, mostly the same nodes again;
    validating one (two SHA-256 for the key proof, address parsing) costs ~7 us, and
    a busy node encodes the same contacts in every answer. Contacts are immutable, so
    both directions are cached, bounded (least recently used go first); a contact
    that fails validation is never cached. Per node, not global: many nodes share a
    process in tests and the simulator.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._decoded: OrderedDict[tuple[object, ...], Contact] = OrderedDict()
        self._encoded: OrderedDict[Contact, common_pb2.NodeContact] = OrderedDict()

    def decode(self, msg: common_pb2.NodeContact, puzzle_bits: int) -> Contact:
        key = (
            msg.public_key,
            msg.role,
            puzzle_bits,
            tuple((e.ip, e.udp_port, e.grpc_port) for e in msg.endpoints),
        )
        contact = self._decoded.get(key)
        if contact is None:
            contact = contact_from_proto(msg, puzzle_bits)
            self._remember(self._decoded, key, contact)
        return contact

    def encode(self, contact: Contact) -> common_pb2.NodeContact:
        msg = self._encoded.get(contact)
        if msg is None:
            msg = contact_to_proto(contact)
            self._remember(self._encoded, contact, msg)
        return msg  # callers copy it into their message and never modify it

    def _remember(self, table: OrderedDict[K, V], key: K, value: V) -> None:
        table[key] = value
        if len(table) > self.size:
            table.popitem(last=False)


# -- datagrams ----------------------------------------------------------------


def encode_datagram(dgram: Datagram, cache: ContactCache | None = None) -> bytes:
    encode = cache.encode if cache is not None else contact_to_proto
    msg = overlay_pb2.Datagram(version=DATAGRAM_VERSION, request_id=dgram.request_id)
    if dgram.sender is not None:
        msg.sender.CopyFrom(encode(dgram.sender))
    msg.token = dgram.token
    msg.padding = bytes(dgram.padding)
    _set_body(msg, dgram.body, encode)
    data = encode_message(msg)
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def _set_body(
    msg: overlay_pb2.Datagram,
    body: Body,
    encode: Callable[[Contact], common_pb2.NodeContact],
) -> None:
    match body:
        case Ping(challenge):
            msg.ping.SetInParent()
            msg.ping.challenge = challenge
        case Pong(observed, proof):
            msg.pong.SetInParent()
            msg.pong.proof = proof
            if observed is not None:
                msg.pong.observed.CopyFrom(endpoint_to_proto(observed))
        case FindNode(target):
            msg.find_node.target = target
        case Nodes(closer):
            msg.nodes.closer.extend(encode(c) for c in closer)
        case TokenReply():
            msg.token_reply.SetInParent()
        case ErrorReply(code, reason):
            msg.error.code, msg.error.reason = code, reason


def decode_datagram(
    data: bytes, *, puzzle_bits: int, cache: ContactCache | None = None
) -> Datagram:
    """Validate a datagram from the network; raises a ProtocolError subclass."""
    msg = decode_message(overlay_pb2.Datagram, data, max_size=MAX_DATAGRAM, what="datagram")
    if msg.version != DATAGRAM_VERSION:
        raise MalformedError(f"datagram: unknown version {msg.version}")
    if msg.padding.strip(b"\0"):
        raise MalformedError("datagram: padding must be zeros")
    decode = cache.decode if cache is not None else contact_from_proto
    sender = decode(msg.sender, puzzle_bits) if msg.HasField("sender") else None
    body = _body(msg, lambda c: decode(c, puzzle_bits))
    return Datagram(msg.request_id, body, sender, msg.token, len(msg.padding))


def _body(msg: overlay_pb2.Datagram, decode: Callable[[common_pb2.NodeContact], Contact]) -> Body:
    kind = msg.WhichOneof("kind")
    if kind == "ping":
        if len(msg.ping.challenge) not in (0, CHALLENGE_BYTES):
            raise MalformedError(f"ping: a challenge is {CHALLENGE_BYTES} bytes")
        return Ping(msg.ping.challenge)
    if kind == "pong":
        if len(msg.pong.proof) not in (0, PROOF_BYTES):
            raise MalformedError(f"pong: a proof is {PROOF_BYTES} bytes")
        observed = msg.pong.observed
        endpoint = endpoint_from_proto(observed) if msg.pong.HasField("observed") else None
        return Pong(endpoint, msg.pong.proof)
    if kind == "find_node":
        if len(msg.find_node.target) != ID_BYTES:
            raise MalformedError("find-node: target is not 32 bytes")
        return FindNode(msg.find_node.target)
    if kind == "nodes":
        if len(msg.nodes.closer) > MAX_CLOSER:
            raise MalformedError(f"nodes: more than {MAX_CLOSER} contacts")
        return Nodes(tuple(decode(c) for c in msg.nodes.closer))
    if kind == "token_reply":
        return TokenReply()
    if kind == "error":
        return ErrorReply(msg.error.code, msg.error.reason[:MAX_REASON])
    raise MalformedError("datagram: no body")


def _whole_answer() -> int:
    """How many contacts a find-node answer always carries whole: the largest count of the
    largest contacts (``MAX_ENDPOINTS`` IPv6 endpoints each) that fits one datagram beside
    the largest sender, token and request ID. An answer cut to fit (``Responder._reply``
    drops the farthest) holds more than this, so one holding fewer was not cut."""
    ep = Endpoint("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 65535)
    big = Contact(b"\xff" * ID_BYTES, b"\xff" * 32, (ep,) * MAX_ENDPOINTS, max(KNOWN_ROLES))
    count = 0
    while count < MAX_CLOSER:
        nodes = Nodes((big,) * (count + 1))
        try:
            encode_datagram(Datagram((1 << 64) - 1, nodes, big, b"\xff" * 64))
        except ValueError:
            break
        count += 1
    return count


WHOLE_ANSWER = _whole_answer()
