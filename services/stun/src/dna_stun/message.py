"""The STUN message codec (RFC 8489 section 5, 14, 15; TURN's ChannelData, RFC 8656 section 12).

Sans-I/O: bytes in, a ``Message`` out; a ``Message``'s parts in, bytes out. Every attribute is
kept, known or not, in wire order with its offset, because MESSAGE-INTEGRITY covers the message
only up to itself and the server must name unknown comprehension-required attributes in a 420.
Anything that is not a well-formed STUN message raises ``StunProtocolError`` and nothing else.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dna_stun import attributes as attr
from dna_stun.errors import StunProtocolError

__all__ = [
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "MAGIC_COOKIE",
    "Attribute",
    "Class",
    "Message",
    "Method",
    "StunProtocolError",
    "channel_data",
    "encode",
    "is_channel_data",
    "long_term_key",
    "parse",
    "parse_channel_data",
]

MAGIC_COOKIE = 0x2112A442
HEADER = struct.Struct("!HHI12s")
ATTR_HEADER = struct.Struct("!HH")
FINGERPRINT_XOR = 0x5354554E
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF
MAX_MESSAGE = 65535 + 20
# A request carries about ten attributes (an ICE check: USERNAME, PRIORITY, ICE-CONTROLLING,
# USE-CANDIDATE, the integrities, FINGERPRINT, SOFTWARE), a CreatePermission one per peer.
# Without a cap a 64 KB datagram holds 16,000 empty attributes: about 20 ms of parsing,
# 4,000 times what a real message costs, for whoever sends it (no credentials needed).
MAX_ATTRIBUTES = 128


class Method:
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Class:
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


@dataclass(frozen=True, slots=True)
class Attribute:
    type: int
    value: bytes
    offset: int  # of the attribute's header in the message


@dataclass(frozen=True, slots=True)
class Message:
    method: int
    cls: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...]
    raw: bytes = b""  # the bytes it was parsed from (integrity covers them)

    def get(self, kind: int) -> bytes | None:
        """The first attribute of ``kind`` (RFC 8489 section 14: later duplicates are ignored)."""
        for a in self.attributes:
            if a.type == kind:
                return a.value
        return None

    def get_all(self, kind: int) -> list[bytes]:
        return [a.value for a in self.attributes if a.type == kind]

    def find(self, kind: int) -> Attribute | None:
        for a in self.attributes:
            if a.type == kind:
                return a
        return None

    def unknown_required(self, known: frozenset[int]) -> list[int]:
        """Comprehension-required types (0x0000-0x7FFF) this server does not understand."""
        seen = dict.fromkeys(
            a.type for a in self.attributes if a.type < 0x8000 and a.type not in known
        )  # a dict, not a list: each type once, in wire order, without a quadratic scan
        return list(seen)


def _message_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 1) << 4)
        | ((cls & 2) << 7)
    )


def _split_type(kind: int) -> tuple[int, int]:
    method = (kind & 0x000F) | ((kind >> 1) & 0x0070) | ((kind >> 2) & 0x0F80)
    cls = ((kind >> 4) & 1) | ((kind >> 7) & 2)
    return method, cls


def _padded(length: int) -> int:
    return (length + 3) & ~3


def parse(data: bytes) -> Message:
    """A STUN message from one datagram; ``StunProtocolError`` if it is not one."""
    if len(data) < HEADER.size:
        raise StunProtocolError("malformed", f"{len(data)} bytes is shorter than a header")
    kind, length, cookie, tid = HEADER.unpack_from(data)
    if kind & 0xC000:
        raise StunProtocolError("malformed", "the first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunProtocolError("malformed", "no magic cookie (RFC 3489 messages unsupported)")
    if length % 4 or HEADER.size + length != len(data):
        raise StunProtocolError("malformed", f"length {length} does not match {len(data)} bytes")
    method, cls = _split_type(kind)
    return Message(method, cls, tid, _parse_attributes(data), bytes(data))


def _parse_attributes(data: bytes) -> tuple[Attribute, ...]:
    found: list[Attribute] = []
    offset, end = HEADER.size, len(data)
    after_integrity = False
    for count in range(MAX_ATTRIBUTES + 1):  # those after MESSAGE-INTEGRITY count too
        if offset >= end:
            break
        if count == MAX_ATTRIBUTES:
            raise StunProtocolError("malformed", f"more than {MAX_ATTRIBUTES} attributes")
        if end - offset < ATTR_HEADER.size:
            raise StunProtocolError("malformed", f"truncated attribute header at {offset}")
        kind, length = ATTR_HEADER.unpack_from(data, offset)
        start = offset + ATTR_HEADER.size
        if start + _padded(length) > end:
            raise StunProtocolError("malformed", f"attribute 0x{kind:04x} overruns the message")
        if found and found[-1].type == attr.FINGERPRINT:
            raise StunProtocolError("malformed", "an attribute follows FINGERPRINT")
        item = Attribute(kind, bytes(data[start : start + length]), offset)
        # After MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT count (RFC 8489
        # section 14.5); the rest is not covered by the integrity check, so it is dropped.
        if not after_integrity or kind in (attr.MESSAGE_INTEGRITY_SHA256, attr.FINGERPRINT):
            found.append(item)
        after_integrity |= kind in (attr.MESSAGE_INTEGRITY, attr.MESSAGE_INTEGRITY_SHA256)
        offset = start + _padded(length)
    if found and found[-1].type == attr.FINGERPRINT:
        _check_fingerprint(data, found[-1])
    return tuple(found)


def _check_fingerprint(data: bytes, fingerprint: Attribute) -> None:
    if len(fingerprint.value) != 4:
        raise StunProtocolError("malformed", "FINGERPRINT is not 4 bytes")
    if struct.unpack("!I", fingerprint.value)[0] != _crc(data[: fingerprint.offset]):
        raise StunProtocolError("bad_fingerprint", "FINGERPRINT does not match")


def _crc(prefix: bytes) -> int:
    return (binascii.crc32(prefix) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _with_length(prefix: bytes, length: int) -> bytes:
    """``prefix`` (a message up to some attribute) with its header's length set to ``length``."""
    return prefix[:2] + struct.pack("!H", length) + prefix[4:]


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key: MD5(username ":" realm ":" password) (RFC 8489 9.2.2)."""
    text = f"{username}:{realm}:{password}".encode()
    return hashlib.md5(text, usedforsecurity=False).digest()


def integrity_of(message: Message) -> Attribute | None:
    """The integrity attribute to check: MESSAGE-INTEGRITY-SHA256 wins over MESSAGE-INTEGRITY."""
    return message.find(attr.MESSAGE_INTEGRITY_SHA256) or message.find(attr.MESSAGE_INTEGRITY)


def check_integrity(message: Message, key: bytes) -> bool:
    """Whether the message's integrity attribute (see ``integrity_of``) verifies under ``key``."""
    found = integrity_of(message)
    if found is None:
        return False
    covered = _with_length(message.raw[: found.offset], found.offset + 4 + len(found.value) - 20)
    if found.type == attr.MESSAGE_INTEGRITY:
        if len(found.value) != 20:
            return False
        return hmac.compare_digest(hmac.new(key, covered, hashlib.sha1).digest(), found.value)
    # SHA256 may be truncated to 16..32 bytes, a multiple of four (RFC 8489 section 14.6).
    if not 16 <= len(found.value) <= 32 or len(found.value) % 4:
        return False
    mac = hmac.new(key, covered, hashlib.sha256).digest()[: len(found.value)]
    return hmac.compare_digest(mac, found.value)


def encode(
    method: int,
    cls: int,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    key: bytes | None = None,
    sha256: bool = False,
    fingerprint: bool = True,
) -> bytes:
    """A message: the attributes in order, then MESSAGE-INTEGRITY (or -SHA256 if ``sha256``)
    under ``key`` if given, then FINGERPRINT if asked."""
    if len(transaction_id) != 12:
        raise ValueError("a transaction ID is 12 bytes")
    body = bytearray()
    for kind, value in attributes:
        body += ATTR_HEADER.pack(kind, len(value)) + value + bytes(_padded(len(value)) - len(value))
    message = (
        bytearray(HEADER.pack(_message_type(method, cls), len(body), MAGIC_COOKIE, transaction_id))
        + body
    )
    if key is not None:
        kind, size, digest = (
            (attr.MESSAGE_INTEGRITY_SHA256, 32, hashlib.sha256)
            if sha256
            else (attr.MESSAGE_INTEGRITY, 20, hashlib.sha1)
        )
        covered = _with_length(bytes(message), len(message) - 20 + 4 + size)
        message = bytearray(covered) + ATTR_HEADER.pack(kind, size)
        message += hmac.new(key, covered, digest).digest()
    if fingerprint:
        message[2:4] = struct.pack("!H", len(message) - 20 + 8)
        message += ATTR_HEADER.pack(attr.FINGERPRINT, 4) + struct.pack("!I", _crc(bytes(message)))
    return bytes(message)


def error_response(
    request: Message,
    code: int,
    reason: str,
    extra: Sequence[tuple[int, bytes]] = (),
    *,
    key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    return encode(
        request.method,
        Class.ERROR,
        request.transaction_id,
        [(attr.ERROR_CODE, attr.error_code(code, reason)), *extra],
        key=key,
        fingerprint=fingerprint,
    )


# --- ChannelData (RFC 8656 section 12.4) -----------------------------------------------------


def is_channel_data(data: bytes) -> bool:
    return len(data) >= 4 and (data[0] & 0xC0) == 0x40


def channel_data(channel: int, payload: bytes) -> bytes:
    """ChannelData over UDP: no padding is needed (RFC 8656 section 12.5)."""
    return struct.pack("!HH", channel, len(payload)) + payload


def parse_channel_data(data: bytes) -> tuple[int, bytes]:
    """(channel, payload); bytes past the length are padding and dropped."""
    if len(data) < 4:
        raise StunProtocolError("malformed", "ChannelData shorter than its header")
    channel, length = struct.unpack_from("!HH", data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise StunProtocolError("malformed", f"channel 0x{channel:04x} out of range")
    if 4 + length > len(data):
        raise StunProtocolError("malformed", "ChannelData shorter than its length says")
    return channel, bytes(data[4 : 4 + length])
