"""The strict decoding gate: size caps, canonical encoding, one error type."""

from __future__ import annotations

import pytest
from dna_core.errors import MalformedError
from dna_core.wire import decode_extensible, decode_message, encode_message
from dna_core.wire.gen.dna.v1 import common_pb2

POW = common_pb2.ProofOfWork(difficulty=8, timestamp_ms=123, nonce=456)


def test_round_trip() -> None:
    data = encode_message(POW)
    assert decode_message(common_pb2.ProofOfWork, data, max_size=64, what="pow") == POW


def test_over_the_cap_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedError, match="cap"):
        decode_message(common_pb2.ProofOfWork, b"\0" * 65, max_size=64, what="pow")


def test_unknown_fields_are_refused() -> None:
    data = encode_message(POW) + bytes([0x78, 0x01])  # field 15, varint 1
    with pytest.raises(MalformedError, match="unknown fields"):
        decode_message(common_pb2.ProofOfWork, data, max_size=64, what="pow")


def test_repeated_or_reordered_fields_are_refused() -> None:
    data = encode_message(POW)
    for variant in (data + bytes([0x08, 0x09]), data[2:] + data[:2]):  # difficulty again / moved
        with pytest.raises(MalformedError, match="non-canonical"):
            decode_message(common_pb2.ProofOfWork, variant, max_size=64, what="pow")


def test_garbage_and_wrong_types_raise_malformed_only() -> None:
    for junk in (b"\xff", b"\x0a\x05ab", b"\x80" * 11):
        with pytest.raises(MalformedError):
            decode_message(common_pb2.ProofOfWork, junk, max_size=64, what="pow")
    with pytest.raises(MalformedError, match="expected bytes"):
        decode_message(common_pb2.ProofOfWork, "text", max_size=64, what="pow")  # type: ignore[arg-type]


def test_extensible_decoding_takes_fields_after_the_known_ones_and_drops_them() -> None:
    """Signed bytes a newer writer added a field to (docs/protocol.md, forward
    compatibility): accepted, the field dropped; before the known fields, not canonical;
    over the cap, refused before parsing; in a closed type, refused."""
    extra = bytes([0x78, 0x01])  # field 15, varint 1: not in ProofOfWork
    got = decode_extensible(common_pb2.ProofOfWork, encode_message(POW) + extra, max_size=64,
                            what="pow")  # fmt: skip
    assert got == POW and encode_message(got) == encode_message(POW)
    with pytest.raises(MalformedError, match="non-canonical"):
        decode_extensible(common_pb2.ProofOfWork, extra + encode_message(POW), max_size=64,
                          what="pow")  # fmt: skip
    with pytest.raises(MalformedError, match="cap"):
        decode_extensible(common_pb2.ProofOfWork, b"\0" * 65, max_size=64, what="pow")
    closed = frozenset({"dna.v1.ProofOfWork"})
    with pytest.raises(MalformedError, match="ProofOfWork with fields this version does not"):
        decode_extensible(common_pb2.ProofOfWork, encode_message(POW) + extra, max_size=64,
                          what="pow", closed=closed)  # fmt: skip
