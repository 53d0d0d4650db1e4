"""Signed records: what the overlay stores for the keyserver and presence.

A SignedRecord carries the exact serialized RecordBody that was signed, the
signer's public key set and a hybrid signature. Sequence number and expiry live
in the signed body, so neither can be changed by anyone but the signer. Which
record wins for a key (highest seq) is store policy, in the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass

from dna_core.crypto import primitives as p
from dna_core.crypto import signature
from dna_core.crypto.keys import Identity, PublicKeySet
from dna_core.errors import ExpiredError, MalformedError, VerificationError
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import common_pb2

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
MAX_RECORD_PAYLOAD = 8 * 1024
MAX_CLOCK_SKEW_MS = 5 * 60_000
_SIG_DOMAIN = b"record"
KNOWN_KINDS = frozenset(
    {
        common_pb2.RECORD_KIND_IDENTITY,
        common_pb2.RECORD_KIND_NAME_CLAIM,
        common_pb2.RECORD_KIND_PRESENCE,
        common_pb2.RECORD_KIND_KEY_ROTATION,
    }
)


@dataclass(frozen=True)
class RecordBody:
    kind: int
    key: bytes
    seq: int
    created_ms: int
    expires_ms: int
    signer_fingerprint: bytes
    payload: bytes
    version: int = RECORD_VERSION

    def encode(self) -> bytes:
        return encode_message(
            common_pb2.RecordBody(
                version=self.version,
                kind=self.kind,  # type: ignore[arg-type]
                key=self.key,
                seq=self.seq,
                created_ms=self.created_ms,
                expires_ms=self.expires_ms,
                signer_fingerprint=self.signer_fingerprint,
                payload=self.payload,
            )
        )


@dataclass(frozen=True)
class VerifiedRecord:
    """A record whose signature, signer and validity window checked out."""

    body: RecordBody
    signer: PublicKeySet
    raw: bytes  # the SignedRecord bytes, to store and forward unchanged


def sign_record(
    identity: Identity, *, kind: int, key: bytes, seq: int, now_ms: int, ttl_ms: int, payload: bytes
) -> bytes:
    """Make a SignedRecord valid from ``now_ms`` for ``ttl_ms``."""
    body = RecordBody(kind, key, seq, now_ms, now_ms + ttl_ms, identity.fingerprint, payload)
    _check_body(body)
    signed = body.encode()
    return encode_message(
        common_pb2.SignedRecord(
            body=signed,
            signer=identity.public.to_proto(),
            signature=signature.sign(identity, _SIG_DOMAIN, signed),
        )
    )


def open_record(
    data: bytes, *, now_ms: int, key: bytes | None = None, expiry_ms: int | None = None
) -> VerifiedRecord:
    """Decode and verify a SignedRecord (stored at ``key``, when given); raises a
    ProtocolError subclass. The cheap checks come first: a record for another key, expired
    or from the future costs its sender's reader no signature check (~0.3 ms). ``expiry_ms``
    (default ``now_ms``) is the time it must not have expired by: a node reloading its
    record file judges expiry by its protected clock (`dna_core.expiry`), not a wall clock
    that may have stepped forward."""
    rec = decode_message(common_pb2.SignedRecord, data, max_size=MAX_RECORD_BYTES, what="record")
    msg = decode_message(
        common_pb2.RecordBody, rec.body, max_size=MAX_RECORD_BYTES, what="record body"
    )
    body = RecordBody(
        msg.kind, msg.key, msg.seq, msg.created_ms, msg.expires_ms,
        msg.signer_fingerprint, msg.payload, msg.version,
    )  # fmt: skip
    _check_body(body)
    if key is not None and body.key != key:
        raise VerificationError("record: stored at another key")
    if body.expires_ms <= (now_ms if expiry_ms is None else expiry_ms):
        raise ExpiredError("record: expired")
    if body.created_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise ExpiredError("record: created in the future")
    signer = PublicKeySet.from_proto(rec.signer)
    if signer.fingerprint != body.signer_fingerprint:
        raise VerificationError("record: signer keys do not match the signer fingerprint")
    signature.verify(signer, _SIG_DOMAIN, rec.body, rec.signature)
    return VerifiedRecord(body, signer, bytes(data))


def _check_body(body: RecordBody) -> None:
    if body.version != RECORD_VERSION:
        raise MalformedError(f"record: unknown version {body.version}")
    if body.kind not in KNOWN_KINDS:
        raise MalformedError(f"record: unknown kind {body.kind}")
    if len(body.key) != 32 or len(body.signer_fingerprint) != p.FINGERPRINT_SIZE:
        raise MalformedError("record: key or signer fingerprint is not 32 bytes")
    if body.expires_ms <= body.created_ms:
        raise MalformedError("record: expires before it is created")
    if len(body.payload) > MAX_RECORD_PAYLOAD:
        raise MalformedError(f"record: payload over {MAX_RECORD_PAYLOAD} bytes")
