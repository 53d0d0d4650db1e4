"""Sealed-sender envelopes: hybrid KEM to the recipient, AES-256-GCM, signed inside.

Outside (seen by storage nodes): version, suite, recipient fingerprint,
timestamp, random message ID, the two KEM ciphertexts. Inside the AEAD: the
sender's fingerprint (and optionally key set), the payload, and the sender's
hybrid signature over the header transcript, sender and payload. So:

* storage nodes learn neither the plaintext nor the sender;
* changing any header field breaks the AEAD (it is the associated data) and the
  signature (it is signed), so an envelope cannot be re-addressed or re-dated;
* the recipient inside the signature stops a recipient from re-sealing a signed
  message to someone else as if it came from the sender;
* the ReplayGuard refuses an authentic envelope seen before (by message ID within
  the timestamp window).

Byte layouts are in docs/crypto.md.
"""

from __future__ import annotations

import heapq
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from dna_core.crypto import kem, signature
from dna_core.crypto import primitives as p
from dna_core.crypto.keys import MAX_PUBLIC_KEY_SET_BYTES, Identity, PublicKeySet
from dna_core.errors import ExpiredError, MalformedError, ReplayError, VerificationError
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import envelope_pb2

ENVELOPE_VERSION = 1
MESSAGE_ID_SIZE = 16
MAX_PAYLOAD_BYTES = 192 * 1024
MAX_ENVELOPE_BYTES = 256 * 1024
_SEALED_OVERHEAD_CAP = MAX_PUBLIC_KEY_SET_BYTES + p.HYBRID_SIGNATURE_SIZE + 256
HEADER_SIZE = 1 + 2 + p.FINGERPRINT_SIZE + 8 + MESSAGE_ID_SIZE  # 59
_AEAD_INFO = p.label("envelope-aead")
_SIG_DOMAIN = b"envelope"

SenderResolver = Callable[[bytes], PublicKeySet | None]


@dataclass(frozen=True)
class Header:
    """The cleartext, authenticated part of an envelope."""

    recipient: bytes
    timestamp_ms: int
    message_id: bytes
    version: int = ENVELOPE_VERSION
    suite: int = p.SUITE_HYBRID_V1

    def transcript(self) -> bytes:
        """59 bytes: version u8, suite u16, recipient 32, timestamp_ms u64, message_id 16."""
        return (
            struct.pack(">BH", self.version, self.suite)
            + self.recipient
            + p.u64(self.timestamp_ms)
            + self.message_id
        )


@dataclass(frozen=True)
class OpenedMessage:
    """An envelope that decrypted and verified."""

    header: Header
    sender: PublicKeySet
    payload: bytes

    @property
    def message_id(self) -> bytes:
        return self.header.message_id


def _aead_key_nonce(shared_secret: bytes, header: Header) -> tuple[AESGCM, bytes]:
    # The KEM secret is fresh per envelope, so a derived (fixed-per-key) nonce is safe.
    okm = HKDFExpand(hashes.SHA256(), 32 + p.AES_GCM_NONCE, info=_AEAD_INFO + header.transcript())
    material = okm.derive(shared_secret)
    return AESGCM(material[:32]), material[32:]


def _signed_bytes(header: Header, sender_fp: bytes, payload: bytes) -> bytes:
    return header.transcript() + sender_fp + payload


def seal(
    sender: Identity,
    recipient: PublicKeySet,
    payload: bytes,
    *,
    now_ms: int,
    include_sender_keys: bool = False,
) -> bytes:
    """Encrypt and sign ``payload`` for ``recipient``; returns the Envelope bytes."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    header = Header(recipient.fingerprint, now_ms, os.urandom(MESSAGE_ID_SIZE))
    shared, ct_pq, ct_classic = kem.encapsulate(recipient)
    inner = envelope_pb2.SealedContent(
        sender=sender.fingerprint,
        payload=payload,
        signature=signature.sign(
            sender, _SIG_DOMAIN, _signed_bytes(header, sender.fingerprint, payload)
        ),
    )
    if include_sender_keys:
        inner.sender_keys.CopyFrom(sender.public.to_proto())
    aead, nonce = _aead_key_nonce(shared, header)
    return encode_message(
        envelope_pb2.Envelope(
            version=header.version,
            suite=header.suite,  # type: ignore[arg-type]
            recipient=header.recipient,
            timestamp_ms=header.timestamp_ms,
            message_id=header.message_id,
            kem_ciphertext=ct_pq,
            ephemeral_x25519=ct_classic,
            ciphertext=aead.encrypt(nonce, encode_message(inner), header.transcript()),
        )
    )


def decode_envelope(data: bytes) -> envelope_pb2.Envelope:
    """Parse and size-check an envelope without decrypting it (what storage nodes may do)."""
    env = decode_message(envelope_pb2.Envelope, data, max_size=MAX_ENVELOPE_BYTES, what="envelope")
    if env.version != ENVELOPE_VERSION:
        raise MalformedError(f"envelope: unknown version {env.version}")
    if env.suite != p.SUITE_HYBRID_V1:
        raise MalformedError(f"envelope: unknown suite {env.suite}")
    for name, value, size in (
        ("recipient", env.recipient, p.FINGERPRINT_SIZE),
        ("message_id", env.message_id, MESSAGE_ID_SIZE),
        ("kem_ciphertext", env.kem_ciphertext, p.ML_KEM_768_CIPHERTEXT),
        ("ephemeral_x25519", env.ephemeral_x25519, p.X25519_PUBLIC),
    ):
        if len(value) != size:
            raise MalformedError(f"envelope: {name} is {len(value)} bytes, not {size}")
    if len(env.ciphertext) < p.AES_GCM_TAG:
        raise MalformedError("envelope: ciphertext shorter than its tag")
    return env


def open_envelope(
    data: bytes,
    recipient: Identity,
    *,
    now_ms: int,
    replay_guard: ReplayGuard,
    resolve_sender: SenderResolver | None = None,
) -> OpenedMessage:
    """Decrypt, verify and replay-check an envelope; raises a ProtocolError subclass."""
    env = decode_envelope(data)
    header = Header(env.recipient, env.timestamp_ms, env.message_id, env.version, env.suite)
    if header.recipient != recipient.fingerprint:
        raise VerificationError("envelope: addressed to another identity")
    replay_guard.check_window(header.timestamp_ms, now_ms)
    shared = kem.decapsulate(recipient, env.kem_ciphertext, env.ephemeral_x25519)
    aead, nonce = _aead_key_nonce(shared, header)
    try:
        plaintext = aead.decrypt(nonce, env.ciphertext, header.transcript())
    except InvalidTag:
        raise VerificationError(
            "envelope: authentication failed (tampered or not for us)"
        ) from None
    inner = decode_message(
        envelope_pb2.SealedContent,
        plaintext,
        max_size=MAX_PAYLOAD_BYTES + _SEALED_OVERHEAD_CAP,
        what="sealed content",
    )
    sender = _resolve(inner, resolve_sender)
    signature.verify(
        sender, _SIG_DOMAIN, _signed_bytes(header, inner.sender, inner.payload), inner.signature
    )
    replay_guard.remember(header.message_id, header.timestamp_ms, now_ms)
    return OpenedMessage(header, sender, inner.payload)


def _resolve(inner: envelope_pb2.SealedContent, resolve: SenderResolver | None) -> PublicKeySet:
    if len(inner.sender) != p.FINGERPRINT_SIZE:
        raise MalformedError("sealed content: sender fingerprint has the wrong size")
    if inner.HasField("sender_keys"):
        keys = PublicKeySet.from_proto(inner.sender_keys)
        if keys.fingerprint != inner.sender:
            raise VerificationError("sealed content: sender keys do not match the sender")
        return keys
    found = resolve(inner.sender) if resolve else None
    if found is None or found.fingerprint != inner.sender:
        raise VerificationError("sealed content: unknown sender, cannot verify")
    return found


class ReplayGuard:
    """Remembers message IDs of opened envelopes within a timestamp window.

    An envelope timestamped before ``now - max_age`` or after ``now + max_skew`` is
    refused outright, so IDs older than the window can be forgotten safely: the
    memory is bounded by the window, not by history. The default age covers a
    mailbox's 30-day TTL plus a day of slack.
    """

    def __init__(self, *, max_age_ms: int = 31 * 86_400_000, max_skew_ms: int = 5 * 60_000) -> None:
        self.max_age_ms = max_age_ms
        self.max_skew_ms = max_skew_ms
        self._seen: set[bytes] = set()
        self._by_time: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check_window(self, timestamp_ms: int, now_ms: int) -> None:
        if timestamp_ms < now_ms - self.max_age_ms:
            raise ExpiredError("envelope: older than the replay window")
        if timestamp_ms > now_ms + self.max_skew_ms:
            raise ExpiredError("envelope: timestamped in the future")

    def remember(self, message_id: bytes, timestamp_ms: int, now_ms: int) -> None:
        """Record an authentic envelope; raise ReplayError if it was seen before."""
        self._forget_before(now_ms - self.max_age_ms)
        if message_id in self._seen:
            raise ReplayError("envelope: message ID already received (replay)")
        self._seen.add(message_id)
        heapq.heappush(self._by_time, (timestamp_ms, message_id))

    def _forget_before(self, cutoff_ms: int) -> None:
        while self._by_time and self._by_time[0][0] < cutoff_ms:
            _, old = heapq.heappop(self._by_time)
            self._seen.discard(old)
