"""Sealed-sender envelopes: round trip, tamper, wrong recipient, replay, sender checks."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity, ReplayGuard, open_envelope, seal
from dna_core.crypto.envelope import (
    MAX_PAYLOAD_BYTES,
    Header,
    _aead_key_nonce,
    decode_envelope,
)
from dna_core.crypto.kem import encapsulate
from dna_core.errors import (
    ExpiredError,
    MalformedError,
    ProtocolError,
    ReplayError,
    VerificationError,
)
from dna_core.wire import encode_message
from dna_core.wire.gen.dna.v1 import envelope_pb2
from support import single_byte_tampers

NOW = 1_780_000_000_000
DAY = 86_400_000


def _open(data: bytes, me: Identity, known: Identity | None = None, now: int = NOW) -> bytes:
    resolve = {known.fingerprint: known.public}.get if known else None
    opened = open_envelope(data, me, now_ms=now, replay_guard=ReplayGuard(), resolve_sender=resolve)
    return opened.payload


def test_round_trip_with_sender_keys_inside(alice: Identity, bob: Identity) -> None:
    env = seal(alice, bob.public, b"hi bob", now_ms=NOW, include_sender_keys=True)
    opened = open_envelope(env, bob, now_ms=NOW, replay_guard=ReplayGuard())
    assert opened.payload == b"hi bob"
    assert opened.sender == alice.public
    assert opened.header.recipient == bob.fingerprint
    assert opened.header.timestamp_ms == NOW
    assert len(opened.message_id) == 16


def test_round_trip_with_a_known_sender(alice: Identity, bob: Identity) -> None:
    env = seal(alice, bob.public, b"again", now_ms=NOW)
    assert _open(env, bob, known=alice) == b"again"


def test_storage_nodes_see_no_sender_or_plaintext(alice: Identity, bob: Identity) -> None:
    payload = b"a very secret plaintext"
    env = seal(alice, bob.public, payload, now_ms=NOW, include_sender_keys=True)
    assert payload not in env
    assert alice.fingerprint not in env
    assert alice.public.ed25519 not in env
    assert decode_envelope(env).recipient == bob.fingerprint


def test_every_single_byte_tamper_is_detected(alice: Identity, bob: Identity) -> None:
    env = seal(alice, bob.public, b"tamper me", now_ms=NOW)
    count = 0
    for tampered in single_byte_tampers(env):
        with pytest.raises(ProtocolError):
            _open(tampered, bob, known=alice)
        count += 1
    assert count >= len(env)


def test_wrong_recipient_is_detected(alice: Identity, bob: Identity, carol: Identity) -> None:
    env = seal(alice, bob.public, b"for bob", now_ms=NOW)
    with pytest.raises(VerificationError, match="another identity"):
        _open(env, carol, known=alice)


def test_readdressing_the_header_is_detected(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    """Carol rewrites the recipient field to herself: the AEAD (header is AAD) refuses."""
    env = decode_envelope(seal(alice, bob.public, b"for bob", now_ms=NOW))
    env.recipient = carol.fingerprint
    with pytest.raises(VerificationError, match="authentication failed"):
        _open(encode_message(env), carol, known=alice)


def test_replay_is_detected(alice: Identity, bob: Identity) -> None:
    env = seal(alice, bob.public, b"once", now_ms=NOW, include_sender_keys=True)
    guard = ReplayGuard()
    open_envelope(env, bob, now_ms=NOW, replay_guard=guard)
    with pytest.raises(ReplayError):
        open_envelope(env, bob, now_ms=NOW + 1000, replay_guard=guard)
    assert len(guard) == 1


def test_replay_window_bounds_memory_and_refuses_old(alice: Identity, bob: Identity) -> None:
    guard = ReplayGuard(max_age_ms=DAY)
    first = seal(alice, bob.public, b"old", now_ms=NOW, include_sender_keys=True)
    open_envelope(first, bob, now_ms=NOW, replay_guard=guard)
    later = seal(alice, bob.public, b"new", now_ms=NOW + 2 * DAY, include_sender_keys=True)
    open_envelope(later, bob, now_ms=NOW + 2 * DAY, replay_guard=guard)
    assert len(guard) == 1  # the first ID aged out of memory...
    with pytest.raises(ExpiredError):  # ...and its replay is refused by the window instead
        open_envelope(first, bob, now_ms=NOW + 2 * DAY, replay_guard=guard)


def test_future_timestamp_is_refused(alice: Identity, bob: Identity) -> None:
    env = seal(alice, bob.public, b"from the future", now_ms=NOW + DAY, include_sender_keys=True)
    with pytest.raises(ExpiredError, match="future"):
        _open(env, bob)


def test_unknown_sender_cannot_be_verified(alice: Identity, bob: Identity, carol: Identity) -> None:
    env = seal(alice, bob.public, b"who am i", now_ms=NOW)
    with pytest.raises(VerificationError, match="unknown sender"):
        _open(env, bob)
    with pytest.raises(VerificationError, match="unknown sender"):
        _open(env, bob, known=carol)


def test_sender_keys_must_match_the_sender(alice: Identity, bob: Identity, carol: Identity) -> None:
    """Someone who can encrypt to bob claims to be alice but ships carol's keys."""
    inner = envelope_pb2.SealedContent(
        sender=alice.fingerprint, payload=b"x", signature=b"\0" * 3373
    )
    inner.sender_keys.CopyFrom(carol.public.to_proto())
    env = _seal_raw(bob, encode_message(inner))
    with pytest.raises(VerificationError, match="do not match"):
        _open(env, bob)


def test_forwarding_a_signed_message_to_someone_else_fails(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    """Bob re-seals alice's signed content to carol: the signature binds bob as recipient."""
    env = seal(alice, bob.public, b"for bob only", now_ms=NOW)
    header = decode_envelope(env)
    shared_inner = _decrypt_inner(env, bob)
    forwarded = _seal_raw(carol, encode_message(shared_inner), message_id=header.message_id)
    with pytest.raises(VerificationError, match="signature"):
        _open(forwarded, carol, known=alice)


def test_malformed_inner_content_is_refused(bob: Identity) -> None:
    with pytest.raises(MalformedError):
        _open(_seal_raw(bob, b"\xff\xff\xff"), bob)


def test_oversized_payload_is_refused_at_seal(alice: Identity, bob: Identity) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        seal(alice, bob.public, b"\0" * (MAX_PAYLOAD_BYTES + 1), now_ms=NOW)


def test_largest_payload_round_trips(alice: Identity, bob: Identity) -> None:
    big = bytes(range(256)) * (MAX_PAYLOAD_BYTES // 256)
    env = seal(alice, bob.public, big, now_ms=NOW, include_sender_keys=True)
    assert _open(env, bob) == big


def test_signature_covers_the_payload(alice: Identity, bob: Identity) -> None:
    env = seal(alice, bob.public, b"original", now_ms=NOW)
    inner = _decrypt_inner(env, bob)
    inner.payload = b"modified"
    header = decode_envelope(env)
    with pytest.raises(VerificationError, match="signature"):
        _open(_seal_raw(bob, encode_message(inner), message_id=header.message_id), bob, alice)


# A hand-rolled sealer for adversarial content (same layout as envelope.seal).
def _seal_raw(recipient: Identity, inner: bytes, message_id: bytes = b"\x07" * 16) -> bytes:
    header = Header(recipient.fingerprint, NOW, message_id)
    shared, ct_pq, ct_classic = encapsulate(recipient.public)
    aead, nonce = _aead_key_nonce(shared, header)
    return encode_message(
        envelope_pb2.Envelope(
            version=1,
            suite=1,  # type: ignore[arg-type]
            recipient=recipient.fingerprint,
            timestamp_ms=NOW,
            message_id=message_id,
            kem_ciphertext=ct_pq,
            ephemeral_x25519=ct_classic,
            ciphertext=aead.encrypt(nonce, inner, header.transcript()),
        )
    )


def _decrypt_inner(env_bytes: bytes, me: Identity) -> envelope_pb2.SealedContent:
    from dna_core.crypto.kem import decapsulate

    env = decode_envelope(env_bytes)
    header = Header(env.recipient, env.timestamp_ms, env.message_id)
    aead, nonce = _aead_key_nonce(decapsulate(me, env.kem_ciphertext, env.ephemeral_x25519), header)
    return envelope_pb2.SealedContent.FromString(
        aead.decrypt(nonce, env.ciphertext, header.transcript())
    )
