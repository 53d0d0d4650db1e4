"""STUN and TURN attribute types and the codecs of their values (RFC 8489 section 14, RFC 8656
section 18, RFC 8445 section 16.1).

Each ``decode_*`` takes an attribute's value and returns it typed, or raises
``StunProtocolError("bad_attribute", ...)``; each encoder returns the value bytes (the message
codec adds the header and padding).
"""

from __future__ import annotations

import socket
import struct

from dna_stun.errors import StunProtocolError

# Comprehension-required (0x0000-0x7FFF).
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
# Comprehension-optional (0x8000-0xFFFF).
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
ICMP = 0x8004
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

FAMILY_IPV4, FAMILY_IPV6 = 0x01, 0x02
UDP = 17
PASSWORD_MD5, PASSWORD_SHA256 = 0x0001, 0x0002
MAGIC_COOKIE_BYTES = struct.pack("!I", 0x2112A442)
# Longest text values (RFC 8489 section 14: in characters, checked here in bytes as the RFC's
# byte limits say).
MAX_USERNAME_BYTES = 513
MAX_TEXT_BYTES = 763
Addr = tuple[str, int]


def _bad(detail: str) -> StunProtocolError:
    return StunProtocolError("bad_attribute", detail)


# --- addresses -------------------------------------------------------------------------------


def _xor(data: bytes, mask: bytes) -> bytes:
    size = min(len(data), len(mask))
    return (int.from_bytes(data[:size]) ^ int.from_bytes(mask[:size])).to_bytes(size)


# Addresses go through the socket module's text forms rather than ``ipaddress``, which costs a
# relay several microseconds per Data or Send indication; they are also the forms ``recvfrom``
# gives (an IPv4-mapped IPv6 address reads "::ffff:192.0.2.1" here as it does there).


def encode_address(addr: Addr) -> bytes:
    host, port = addr
    family, kind = (socket.AF_INET6, FAMILY_IPV6) if ":" in host else (socket.AF_INET, FAMILY_IPV4)
    try:
        packed = socket.inet_pton(family, host.partition("%")[0])  # without an IPv6 zone
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None
    return struct.pack("!BBH", 0, kind, port) + packed


def decode_address(value: bytes) -> Addr:
    if len(value) < 4:
        raise _bad("address shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    raw = value[4:]
    if family == FAMILY_IPV4 and len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw), port
    if family == FAMILY_IPV6 and len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw), port
    raise _bad(f"address family {family} with {len(raw)} address bytes")


def encode_xor_address(addr: Addr, transaction_id: bytes) -> bytes:
    plain = encode_address(addr)
    port = addr[1] ^ 0x2112
    mask = MAGIC_COOKIE_BYTES + transaction_id
    return plain[:2] + struct.pack("!H", port) + _xor(plain[4:], mask)


def decode_xor_address(value: bytes, transaction_id: bytes) -> Addr:
    if len(value) < 4:
        raise _bad("address shorter than 4 bytes")
    port = struct.unpack_from("!H", value, 2)[0] ^ 0x2112
    raw = _xor(value[4:], MAGIC_COOKIE_BYTES + transaction_id)
    host, _ = decode_address(value[:2] + struct.pack("!H", port) + raw)
    return host, port


# --- numbers, flags and text -----------------------------------------------------------------


def error_code(code: int, reason: str) -> bytes:
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


def address_error_code(family: int, code: int, reason: str) -> bytes:
    """ADDRESS-ERROR-CODE (RFC 8656 section 18.12): the family, then ERROR-CODE's layout."""
    return struct.pack("!BBBB", family, 0, code // 100, code % 100) + reason.encode()


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise _bad("ERROR-CODE shorter than 4 bytes")
    _, klass, number = struct.unpack_from("!HBB", value)
    if not 3 <= klass <= 6 or number > 99:
        raise _bad(f"ERROR-CODE class {klass} number {number}")
    return klass * 100 + number, decode_text(value[4:], MAX_TEXT_BYTES)


def uint32(value: int) -> bytes:
    return struct.pack("!I", value)


def decode_uint32(value: bytes) -> int:
    if len(value) != 4:
        raise _bad(f"expected 4 bytes, got {len(value)}")
    number: int = struct.unpack("!I", value)[0]
    return number


def channel_number(number: int) -> bytes:
    return struct.pack("!HH", number, 0)


def decode_channel_number(value: bytes) -> int:
    if len(value) != 4:
        raise _bad("CHANNEL-NUMBER is not 4 bytes")
    number: int = struct.unpack_from("!H", value)[0]
    return number


def requested_transport(protocol: int = UDP) -> bytes:
    return struct.pack("!B3x", protocol)


def decode_requested_transport(value: bytes) -> int:
    if len(value) != 4:
        raise _bad("REQUESTED-TRANSPORT is not 4 bytes")
    return value[0]


def decode_family(value: bytes) -> int:
    """REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY: 0x01 IPv4, 0x02 IPv6."""
    if len(value) != 4:
        raise _bad("address family attribute is not 4 bytes")
    return value[0]


def decode_even_port(value: bytes) -> bool:
    """EVEN-PORT: whether the R bit asks to reserve the next port as well."""
    if len(value) != 1:
        raise _bad("EVEN-PORT is not 1 byte")
    return bool(value[0] & 0x80)


def decode_reservation_token(value: bytes) -> bytes:
    if len(value) != 8:
        raise _bad("RESERVATION-TOKEN is not 8 bytes")
    return value


def unknown_attributes(kinds: list[int]) -> bytes:
    return b"".join(struct.pack("!H", kind) for kind in kinds)


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise _bad("UNKNOWN-ATTRIBUTES has an odd length")
    return [struct.unpack_from("!H", value, i)[0] for i in range(0, len(value), 2)]


def decode_userhash(value: bytes) -> bytes:
    if len(value) != 32:
        raise _bad("USERHASH is not 32 bytes")
    return value


def decode_password_algorithm(value: bytes) -> int:
    """PASSWORD-ALGORITHM: the algorithm number (its parameters must be empty for MD5 and
    SHA-256, RFC 8489 section 18.5.1)."""
    if len(value) < 4:
        raise _bad("PASSWORD-ALGORITHM shorter than 4 bytes")
    algorithm, length = struct.unpack_from("!HH", value)
    if length != 0 or len(value) != 4:
        raise _bad("PASSWORD-ALGORITHM with parameters")
    return int(algorithm)


def password_algorithms(algorithms: list[int]) -> bytes:
    return b"".join(struct.pack("!HH", a, 0) for a in algorithms)


def decode_text(value: bytes, limit: int) -> str:
    if len(value) > limit:
        raise _bad(f"text longer than {limit} bytes")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise _bad("text is not UTF-8") from None
