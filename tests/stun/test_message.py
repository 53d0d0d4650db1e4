"""The STUN codec against the RFC 5769 test vectors, and against mutated bytes."""

from __future__ import annotations

import contextlib

import pytest
from dna_stun import attributes as attr
from dna_stun.errors import StunProtocolError
from dna_stun.message import (
    MAX_ATTRIBUTES,
    Class,
    Method,
    check_integrity,
    encode,
    long_term_key,
    parse,
    parse_channel_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SHORT_TERM_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 section 2.1: a Binding request with short-term credentials (padding is spaces).
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010"
    + b"STUN test client".hex()
    + "002400046e0001ff80290008932ff9b151263b36000600096576746a3a683676592020 20".replace(" ", "")
    + "00080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
# Section 2.2: the IPv4 response, 192.0.2.1:32853.
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# Section 2.3: the IPv6 response, [2001:db8:1234:5678:11:2233:4455:6677]:32853.
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
# Section 2.4: long-term credentials, user "マトリックス", realm example.org, password
# "TheMatrIX" (after SASLprep).
LONG_TERM_TID = bytes.fromhex("78ad3433c6ad72c029da412e")
LONG_TERM_USER = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LONG_TERM_NONCE = "f//499k954d6OL34oL9FSTvy64sA"
SAMPLE_LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a442" + LONG_TERM_TID.hex() + "00060012"
    "e3839ee38388e383aae38383e382afe382b90000"
    "0015001c" + LONG_TERM_NONCE.encode().hex() + "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)


def test_sample_request_parses_and_verifies() -> None:
    message = parse(SAMPLE_REQUEST)
    assert (message.method, message.cls, message.transaction_id) == (
        Method.BINDING,
        Class.REQUEST,
        TID,
    )
    assert message.get(attr.SOFTWARE) == b"STUN test client"
    assert message.get(attr.USERNAME) == b"evtj:h6vY"
    assert attr.decode_uint32(message.get(attr.PRIORITY) or b"") == 0x6E0001FF
    assert check_integrity(message, SHORT_TERM_KEY)
    assert not check_integrity(message, b"wrong password")


def test_ipv4_response_decodes_the_mapped_address_and_is_re_encoded_byte_for_byte() -> None:
    message = parse(SAMPLE_IPV4_RESPONSE)
    xor = message.get(attr.XOR_MAPPED_ADDRESS) or b""
    assert attr.decode_xor_address(xor, TID) == ("192.0.2.1", 32853)
    assert check_integrity(message, SHORT_TERM_KEY)
    # The attributes re-encode to the vector's bytes, but for SOFTWARE's padding byte: the
    # vector pads with a space, we with zero (RFC 8489 lets the receiver ignore padding).
    rebuilt = encode(
        Method.BINDING,
        Class.SUCCESS,
        TID,
        [(attr.SOFTWARE, b"test vector"), (attr.XOR_MAPPED_ADDRESS, xor)],
        fingerprint=False,
    )
    expected = bytearray(SAMPLE_IPV4_RESPONSE[:48])
    expected[35] = 0
    assert rebuilt[20:] == expected[20:]
    assert attr.encode_xor_address(("192.0.2.1", 32853), TID) == xor


def test_ipv6_response_decodes_the_mapped_address() -> None:
    message = parse(SAMPLE_IPV6_RESPONSE)
    xor = message.get(attr.XOR_MAPPED_ADDRESS) or b""
    assert attr.decode_xor_address(xor, TID) == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert attr.encode_xor_address(("2001:db8:1234:5678:11:2233:4455:6677", 32853), TID) == xor
    assert check_integrity(message, SHORT_TERM_KEY)


def test_addresses_read_as_recvfrom_gives_them() -> None:
    # Permissions are keyed by the peer's IP text and checked against what recvfrom returns,
    # so an IPv4-mapped IPv6 address must decode to the socket module's form.
    mapped = ("::ffff:192.0.2.1", 4000)
    assert attr.decode_xor_address(attr.encode_xor_address(mapped, TID), TID) == mapped
    assert attr.decode_address(attr.encode_address(("fe80::1%eth0", 1))) == ("fe80::1", 1)
    for bad in ("192.0.2", "256.0.0.1", "01.2.3.4", "host.example", "::1::"):
        with pytest.raises(ValueError, match="not an IP address"):
            attr.encode_address((bad, 1))


def test_long_term_request_verifies_under_the_md5_key() -> None:
    message = parse(SAMPLE_LONG_TERM_REQUEST)
    assert (message.get(attr.USERNAME) or b"").decode() == LONG_TERM_USER
    assert message.get(attr.NONCE) == LONG_TERM_NONCE.encode()
    assert message.get(attr.REALM) == b"example.org"
    key = long_term_key(LONG_TERM_USER, "example.org", "TheMatrIX")
    assert check_integrity(message, key)
    assert not check_integrity(message, long_term_key(LONG_TERM_USER, "example.org", "x"))


def test_encoding_the_long_term_request_gives_the_vector() -> None:
    key = long_term_key(LONG_TERM_USER, "example.org", "TheMatrIX")
    encoded = encode(
        Method.BINDING,
        Class.REQUEST,
        LONG_TERM_TID,
        [
            (attr.USERNAME, LONG_TERM_USER.encode()),
            (attr.NONCE, LONG_TERM_NONCE.encode()),
            (attr.REALM, b"example.org"),
        ],
        key=key,
        fingerprint=False,
    )
    assert encoded == SAMPLE_LONG_TERM_REQUEST


def test_sha256_integrity_round_trips_and_detects_tampering() -> None:
    key = long_term_key("u", "r", "p")
    data = encode(
        Method.ALLOCATE, Class.REQUEST, TID, [(attr.USERNAME, b"u")], key=key, sha256=True
    )
    message = parse(data)
    assert message.get(attr.MESSAGE_INTEGRITY_SHA256) is not None
    assert check_integrity(message, key)
    tampered = bytearray(data)
    tampered[24] ^= 1  # inside USERNAME's value ("u" -> "t"); FINGERPRINT is checked first
    with pytest.raises(StunProtocolError, match="bad_fingerprint"):
        parse(bytes(tampered))
    unfingerprinted = encode(Method.ALLOCATE, Class.REQUEST, TID, [(attr.USERNAME, b"t")])
    assert not check_integrity(parse(unfingerprinted), key)


def test_fingerprint_mismatch_and_trailing_attributes_are_protocol_errors() -> None:
    broken = SAMPLE_REQUEST[:-1] + bytes([SAMPLE_REQUEST[-1] ^ 0xFF])
    with pytest.raises(StunProtocolError, match="bad_fingerprint"):
        parse(broken)
    with pytest.raises(StunProtocolError, match="length"):
        parse(SAMPLE_REQUEST[:-4])


def test_unknown_attributes_are_kept_and_reported() -> None:
    data = encode(Method.BINDING, Class.REQUEST, TID, [(0x7777, b"abc"), (0xC001, b"")])
    message = parse(data)
    assert [(a.type, a.value) for a in message.attributes[:2]] == [(0x7777, b"abc"), (0xC001, b"")]
    assert message.unknown_required(frozenset()) == [0x7777]


def test_a_message_may_carry_max_attributes_and_no_more() -> None:
    # Those after MESSAGE-INTEGRITY, which parse drops, count as well: parsing them is the cost.
    for after_integrity in (False, True):
        head = [(attr.MESSAGE_INTEGRITY, bytes(20))] if after_integrity else []
        fits = head + [(0x7000 + i, b"") for i in range(MAX_ATTRIBUTES - len(head))]
        parse(encode(Method.BINDING, Class.REQUEST, TID, fits, fingerprint=False))
        over = encode(Method.BINDING, Class.REQUEST, TID, [*fits, (0x7FFF, b"")], fingerprint=False)
        with pytest.raises(StunProtocolError, match=f"more than {MAX_ATTRIBUTES} attributes"):
            parse(over)


def test_unknown_attributes_are_reported_once_each_in_wire_order() -> None:
    kinds = [0x7003, 0x7001, 0x7003, 0x8001, 0x7002, 0x7001]
    message = parse(encode(Method.BINDING, Class.REQUEST, TID, [(k, b"") for k in kinds]))
    assert message.unknown_required(frozenset({0x7002})) == [0x7003, 0x7001]


def test_channel_data() -> None:
    assert parse_channel_data(b"\x40\x01\x00\x03abc\x00") == (0x4001, b"abc")
    with pytest.raises(StunProtocolError):
        parse_channel_data(b"\x40\x01\x00\x09abc")
    with pytest.raises(StunProtocolError):
        parse_channel_data(b"\x50\x00\x00\x00")


VECTORS = [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE, SAMPLE_LONG_TERM_REQUEST]


def _decode_all(data: bytes) -> None:
    """Parse, then decode every attribute we have a codec for, as the server would."""
    message = parse(data)
    decoders = {
        attr.XOR_MAPPED_ADDRESS: lambda v: attr.decode_xor_address(v, message.transaction_id),
        attr.XOR_PEER_ADDRESS: lambda v: attr.decode_xor_address(v, message.transaction_id),
        attr.MAPPED_ADDRESS: attr.decode_address,
        attr.ERROR_CODE: attr.decode_error_code,
        attr.LIFETIME: attr.decode_uint32,
        attr.CHANNEL_NUMBER: attr.decode_channel_number,
        attr.EVEN_PORT: attr.decode_even_port,
        attr.UNKNOWN_ATTRIBUTES: attr.decode_unknown_attributes,
        attr.USERNAME: lambda v: attr.decode_text(v, attr.MAX_USERNAME_BYTES),
        attr.PASSWORD_ALGORITHM: attr.decode_password_algorithm,
    }
    for item in message.attributes:
        decode = decoders.get(item.type)
        if decode is not None:
            decode(item.value)
    check_integrity(message, SHORT_TERM_KEY)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(VECTORS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
    st.integers(0, 200),
)
def test_mutated_messages_parse_or_raise_a_protocol_error(
    vector: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(vector)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    data = data[: max(0, len(data) - cut % 24)] if cut % 3 == 0 else data
    with contextlib.suppress(StunProtocolError):
        _decode_all(bytes(data))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_raise_a_protocol_error(data: bytes) -> None:
    # A STUN header in front makes the fuzzing reach the attribute walk.
    header = b"\x00\x01" + len(data).to_bytes(2, "big") + bytes.fromhex("2112a442") + bytes(12)
    for candidate in (data, header + data):
        with contextlib.suppress(StunProtocolError):
            _decode_all(candidate)
        with contextlib.suppress(StunProtocolError):
            parse_channel_data(candidate)
