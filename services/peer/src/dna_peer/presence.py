"""Presence: "where is bob?" as a short-lived signed record on the overlay.

A device that is online (`dna watch`) publishes a presence record every
``REFRESH_MS`` with a lifetime of ``PRESENCE_TTL_MS``, and withdraws it (a newer record
saying OFFLINE, with nothing sealed) when it stops. "Offline" is the absence of a fresh
ONLINE record: a device that crashed drops out within the lifetime.

The record is signed by the identity (`sign_record`; overlay nodes verify it and store
it only under the signer's own presence key), so a node can withhold it but not forge
it; a reader checks again that the signer is the key it pinned for the contact and that
the record is fresh, and refuses anything else with the reason logged.

Where the device can be reached (a `Reach`: its ICE credentials and candidates) is
readable only by the owner's contacts, never by the nodes that store the record:
``sealed_candidates`` holds one BODY item (the Reach under a random 256-bit key K,
AES-256-GCM) and one WRAP item per contact (a hybrid KEM encapsulation to the contact's
pinned keys, ML-KEM-768 + X25519, whose secret seals K). A contact finds its WRAP by
trying each (a decapsulation costs ~0.1 ms). An ML-KEM ciphertext is 1,088 bytes and a
record payload at most 8 KiB, so a record carries K for ``MAX_SEALED_CONTACTS``
contacts: the ones written to most recently. Others see the device online and reach it
by store-and-forward.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from dna_core.crypto import Identity, PublicKeySet, kem, sign_record
from dna_core.crypto import primitives as p
from dna_core.crypto.records import MAX_RECORD_PAYLOAD, open_record
from dna_core.errors import (
    ExpiredError,
    MalformedError,
    ProtocolError,
    UnavailableError,
    VerificationError,
)
from dna_core.overlay import OverlayNode, identity_proof, record_key
from dna_core.wire import common_pb2, decode_message, records_pb2

log = logging.getLogger("dna.peer.presence")
PRESENCE = common_pb2.RECORD_KIND_PRESENCE
PRESENCE_TTL_MS = 3 * 60_000  # a device gone without a word drops out within this
REFRESH_MS = 60_000  # an online device signs a new record this often
MAX_PRESENCE_TTL_MS = 10 * 60_000  # a reader refuses longer-lived records as stale by design
MAX_SEALED_CONTACTS = 6  # 6 x 1,169-byte WRAPs + the BODY fit the 8 KiB record payload
BODY, WRAP = 1, 2
_KEY = 32
_NONCE = p.AES_GCM_NONCE
_WRAP_BYTES = 1 + p.ML_KEM_768_CIPHERTEXT + p.X25519_PUBLIC + _KEY + p.AES_GCM_TAG
MAX_REACH_BYTES = 2048
_ZERO_NONCE = bytes(_NONCE)  # each WRAP key seals exactly one K: a fixed nonce is safe


@dataclass(frozen=True)
class Reach:
    """How a contact reaches this device directly: the ICE credentials of the agent
    listening for it, the credentials the caller must use, and the candidates."""

    device_id: bytes
    ufrag: str
    pwd: str
    caller_ufrag: str
    caller_pwd: str
    candidates: tuple[str, ...]  # SDP candidate lines (aioice `Candidate.to_sdp`)

    def encode(self) -> bytes:
        return json.dumps({"d": self.device_id.hex(), "u": self.ufrag, "p": self.pwd,
                           "cu": self.caller_ufrag, "cp": self.caller_pwd,
                           "c": list(self.candidates)}, separators=(",", ":")).encode()  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes) -> Reach:
        try:
            d = json.loads(raw)
            reach = cls(bytes.fromhex(d["d"]), d["u"], d["p"], d["cu"], d["cp"],
                        tuple(str(c) for c in d["c"]))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            raise MalformedError("presence: the sealed reach information is malformed") from None
        if not all(isinstance(v, str) for v in (reach.ufrag, reach.pwd, reach.caller_ufrag,
                                                reach.caller_pwd)):  # fmt: skip
            raise MalformedError("presence: ICE credentials are not text")
        return reach


@dataclass(frozen=True)
class Presence:
    online: bool
    last_seen_ms: int
    reach: Reach | None  # None: online, but nothing sealed to us (or withdrawn)


def presence_key(fingerprint: bytes) -> bytes:
    return record_key(PRESENCE, fingerprint)


def fit_reach(reach: Reach, contacts: int, proof: common_pb2.ProofOfWork) -> Reach:
    """``reach`` with as many of its candidates as fit one record sealed to ``contacts``
    contacts, dropped from the end (the caller lists them most useful first: a device
    with many addresses still publishes, with its best ones). With 6 contacts about
    1,100 bytes of reach fit: some 10 candidates. Raises MalformedError if not even one
    candidate fits."""
    fitted = reach
    while _payload_size(fitted, contacts, proof) > MAX_RECORD_PAYLOAD or (
        len(fitted.encode()) > MAX_REACH_BYTES
    ):
        if len(fitted.candidates) <= 1:
            raise MalformedError("presence: the reach information does not fit a record")
        fitted = replace(fitted, candidates=fitted.candidates[:-1])
    return fitted


def _payload_size(reach: Reach, contacts: int, proof: common_pb2.ProofOfWork) -> int:
    """The PresenceRecord's size with ``reach`` sealed to ``contacts`` contacts (the sealed
    items have fixed overheads: measured with placeholders of their length, no KEM run)."""
    body = bytes(1 + _NONCE + len(reach.encode()) + p.AES_GCM_TAG)
    record = records_pb2.PresenceRecord(
        status=records_pb2.PRESENCE_STATUS_ONLINE, last_seen_ms=2**62,
        sealed_candidates=[body] + [bytes(_WRAP_BYTES)] * contacts,
        pow=proof,
    )  # fmt: skip
    return record.ByteSize()


def presence_record(
    identity: Identity,
    contacts: Sequence[PublicKeySet],
    reach: Reach | None,
    *,
    now_ms: int,
    proof: common_pb2.ProofOfWork | None = None,
) -> bytes:
    """A signed presence record: ONLINE with ``reach`` sealed to ``contacts`` (at most
    ``MAX_SEALED_CONTACTS``), or OFFLINE (``reach`` None: the withdrawal)."""
    if len(contacts) > MAX_SEALED_CONTACTS:
        raise MalformedError(f"presence: at most {MAX_SEALED_CONTACTS} contacts fit a record")
    items = [] if reach is None else _seal_reach(identity.fingerprint, contacts, reach)
    status = (
        records_pb2.PRESENCE_STATUS_OFFLINE if reach is None else records_pb2.PRESENCE_STATUS_ONLINE
    )
    record = records_pb2.PresenceRecord(
        status=status, last_seen_ms=now_ms, sealed_candidates=items,
        pow=proof or identity_proof(identity.fingerprint, now_ms=now_ms),
    )  # fmt: skip
    return sign_record(identity, kind=PRESENCE, key=presence_key(identity.fingerprint),
                       seq=now_ms, now_ms=now_ms, ttl_ms=PRESENCE_TTL_MS,
                       payload=record.SerializeToString())  # fmt: skip


def _seal_reach(owner: bytes, contacts: Sequence[PublicKeySet], reach: Reach) -> list[bytes]:
    key, nonce = os.urandom(_KEY), os.urandom(_NONCE)
    plain = reach.encode()
    if len(plain) > MAX_REACH_BYTES:
        raise MalformedError(f"presence: reach information over {MAX_REACH_BYTES} bytes")
    items = [bytes([BODY]) + nonce + AESGCM(key).encrypt(nonce, plain, owner)]
    for contact in contacts:
        secret, ct_pq, ct_x = kem.encapsulate(contact)
        wrapped = AESGCM(secret).encrypt(_ZERO_NONCE, key, owner + contact.fingerprint)
        items.append(bytes([WRAP]) + ct_pq + ct_x + wrapped)
    return items


def read_presence(raw: bytes, contact: PublicKeySet, me: Identity, *, now_ms: int) -> Presence:
    """Check a presence record of ``contact`` (its pinned keys) and open what it sealed to
    ``me``. Raises a ProtocolError for a forged, misplaced, stale or malformed record."""
    rec = open_record(raw, now_ms=now_ms)  # signature, size, expiry
    body = rec.body
    if body.kind != PRESENCE or body.key != presence_key(contact.fingerprint):
        raise VerificationError("presence: not a presence record of this contact")
    if rec.signer != contact:
        raise VerificationError("presence: not signed by the contact's pinned key (forged)")
    if body.expires_ms - body.created_ms > MAX_PRESENCE_TTL_MS:
        raise ExpiredError("presence: lifetime too long to say anything about now (stale)")
    msg = decode_message(records_pb2.PresenceRecord, body.payload, max_size=8192,
                         what="presence record")  # fmt: skip
    if msg.last_seen_ms + PRESENCE_TTL_MS < now_ms or msg.last_seen_ms > body.expires_ms:
        raise ExpiredError("presence: last seen too long ago (stale)")
    if msg.status != records_pb2.PRESENCE_STATUS_ONLINE:
        return Presence(False, msg.last_seen_ms, None)
    reach = _open_reach(list(msg.sealed_candidates), contact.fingerprint, me)
    return Presence(True, msg.last_seen_ms, reach)


def _open_reach(items: list[bytes], owner: bytes, me: Identity) -> Reach | None:
    bodies = [i for i in items if i[:1] == bytes([BODY])]
    wraps = [i for i in items if i[:1] == bytes([WRAP])]
    if len(bodies) != 1 or len(bodies) + len(wraps) != len(items):
        raise MalformedError("presence: sealed items are not one BODY and WRAPs")
    for wrap in wraps:
        key = _unwrap(wrap, owner, me)
        if key is not None:
            body = bodies[0]
            try:
                plain = AESGCM(key).decrypt(body[1 : 1 + _NONCE], body[1 + _NONCE :], owner)
            except Exception:  # InvalidTag: K does not open the BODY
                raise VerificationError("presence: the sealed BODY does not open") from None
            return Reach.decode(plain)
    return None  # online, but not sealed to us


def _unwrap(wrap: bytes, owner: bytes, me: Identity) -> bytes | None:
    if len(wrap) != _WRAP_BYTES:
        raise MalformedError("presence: a WRAP item has the wrong size")
    ml = p.ML_KEM_768_CIPHERTEXT
    try:
        secret = kem.decapsulate(me, wrap[1 : 1 + ml], wrap[1 + ml : 1 + ml + p.X25519_PUBLIC])
        return AESGCM(secret).decrypt(_ZERO_NONCE, wrap[1 + ml + p.X25519_PUBLIC :],
                                      owner + me.fingerprint)  # fmt: skip
    except ProtocolError:
        return None
    except Exception:  # InvalidTag: this WRAP is for someone else
        return None


async def lookup_presence(
    node: OverlayNode, contact: PublicKeySet, me: Identity, *, now_ms: int
) -> Presence | None:
    """The contact's fresh presence, or None (no fresh record: offline). A record that
    does not check out is refused, with the reason logged, and counts as none."""
    try:
        found = await node.get_record(presence_key(contact.fingerprint))
    except UnavailableError:
        return None  # nobody could say: store-and-forward, as for a contact offline
    if found is None:
        return None
    try:
        presence = read_presence(found.raw, contact, me, now_ms=now_ms)
    except ProtocolError as exc:
        log.warning("presence of %s refused: %s", contact.fingerprint.hex()[:16], exc.reason)
        return None
    return presence if presence.online else None
