"""Every decoder of network or file bytes, fed random and mutated input.

The rule (after h11): for any input a decoder returns a validated object or
raises our documented ProtocolError (subclasses included), never anything else.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dna_core.crypto import PublicKeySet, ReplayGuard, keystore, open_envelope, open_record, seal
from dna_core.crypto.envelope import MAX_ENVELOPE_BYTES, decode_envelope
from dna_core.crypto.keys import MAX_PUBLIC_KEY_SET_BYTES
from dna_core.crypto.keystore import MAX_KEYSTORE_BYTES, KdfParams
from dna_core.crypto.node import verify_node_key
from dna_core.crypto.pow import Proof
from dna_core.crypto.records import MAX_RECORD_BYTES, sign_record
from dna_core.errors import ProtocolError, WrongPassphraseError
from dna_core.wire import decode_message
from dna_core.wire.gen.dna.v1 import (
    common_pb2,
    envelope_pb2,
    keystore_pb2,
    mailbox_pb2,
    overlay_pb2,
    records_pb2,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import seeded_identity

NOW = 1_780_000_000_000
ALICE, BOB = seeded_identity("alice"), seeded_identity("bob")
FAST = KdfParams(memory_kib=256, iterations=1, lanes=1)

ENVELOPE = seal(ALICE, BOB.public, b"fuzz me", now_ms=NOW, include_sender_keys=True)
RECORD = sign_record(
    ALICE, kind=common_pb2.RECORD_KIND_PRESENCE, key=b"k" * 32, seq=3, now_ms=NOW,
    ttl_ms=60_000, payload=b"presence",
)  # fmt: skip
KEYFILE = keystore.lock(ALICE, "pw", FAST)


def _open(data: bytes) -> object:
    return open_envelope(data, BOB, now_ms=NOW, replay_guard=ReplayGuard())


def _unlock(data: bytes) -> object:
    try:
        return keystore.unlock(data, "pw")
    except WrongPassphraseError:  # the documented outcome for an altered file
        return None


def _proof(data: bytes) -> object:
    msg = decode_message(common_pb2.ProofOfWork, data, max_size=64, what="proof of work")
    return Proof.from_proto(msg)


DECODERS: dict[str, tuple[Callable[[bytes], object], bytes, int]] = {
    "public key set": (PublicKeySet.decode, ALICE.public.encode(), MAX_PUBLIC_KEY_SET_BYTES),
    "envelope header": (decode_envelope, ENVELOPE, MAX_ENVELOPE_BYTES),
    "envelope open": (_open, ENVELOPE, MAX_ENVELOPE_BYTES),
    "signed record": (lambda d: open_record(d, now_ms=NOW), RECORD, MAX_RECORD_BYTES),
    "key file public part": (keystore.read_public, KEYFILE, MAX_KEYSTORE_BYTES),
    "key file unlock": (_unlock, KEYFILE, MAX_KEYSTORE_BYTES),
    "proof of work": (_proof, Proof(8, NOW, 5).to_proto().SerializeToString(), 64),
    "node key": (lambda d: verify_node_key(d, 0), b"\x01" * 32, 32),
}


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """A valid sample with 1-4 random edits: flip, overwrite, insert, delete, truncate, splice."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        elif op == "splice" and data:
            j = draw(st.integers(0, len(data) - 1))
            data[i:i] = data[j : j + draw(st.integers(1, 64))]
    return bytes(data)


def _only_protocol_errors(decode: Callable[[bytes], object], data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError as exc:
        assert exc.reason  # every refusal says why


@pytest.mark.parametrize("name", DECODERS)
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_input_parses_or_raises_protocol_error(name: str, data: st.DataObject) -> None:
    decode, sample, _ = DECODERS[name]
    _only_protocol_errors(decode, data.draw(mutated(sample)))


@pytest.mark.parametrize("name", DECODERS)
@settings(max_examples=150)
@given(blob=st.binary(max_size=4096))
def test_random_input_parses_or_raises_protocol_error(name: str, blob: bytes) -> None:
    _only_protocol_errors(DECODERS[name][0], blob)


@pytest.mark.parametrize("name", DECODERS)
def test_valid_sample_decodes_and_oversize_is_refused(name: str) -> None:
    decode, sample, cap = DECODERS[name]
    assert decode(sample) is not None  # the key file unlocks with its passphrase
    with pytest.raises(ProtocolError):
        decode(sample + b"\0" * (cap + 1 - len(sample)))


ALL_MESSAGES = [
    getattr(module, name)
    for module in (common_pb2, envelope_pb2, keystore_pb2, mailbox_pb2, overlay_pb2, records_pb2)
    for name in module.DESCRIPTOR.message_types_by_name
]


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
@settings(max_examples=60)
@given(blob=st.binary(max_size=512))
def test_every_wire_message_decodes_strictly(cls: type, blob: bytes) -> None:
    _only_protocol_errors(lambda d: decode_message(cls, d, max_size=1024, what="fuzz"), blob)
