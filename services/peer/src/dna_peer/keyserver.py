"""The DHT keyserver: identity records, name claims and key rotations on the overlay.

Everything here is a signed record (`dna_core.crypto.records`) that overlay nodes
verify before storing (`dna_core.overlay.records`) and that we verify again after
fetching, so a lying node can withhold a record but not forge one. Sequence
numbers are the creation time in ms, so any device of an identity can republish
without coordinating a counter.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata

from dna_core.crypto import Identity, PublicKeySet, sign_record, signature
from dna_core.crypto import pow as pow_
from dna_core.crypto import primitives as p
from dna_core.crypto.records import open_record
from dna_core.errors import DnaError, MalformedError, UnavailableError, VerificationError
from dna_core.overlay import (
    DEFAULT_NAME_POW_BITS,
    MAX_CLAIM_BYTES,
    MAX_ROTATION_TTL_MS,
    MAX_TTL_MS,
    NAME_MOVE_DOMAIN,
    ROTATION_ACCEPT_DOMAIN,
    ContestedError,
    OverlayNode,
    identity_payload,
    identity_proof,
    name_key,
    name_move_message,
    name_pow_hash,
    normalize_name,
    record_key,
    rotation_accept_message,
    rotation_target,
)
from dna_core.wire import common_pb2, decode_message, records_pb2

IDENTITY = common_pb2.RECORD_KIND_IDENTITY
NAME_CLAIM = common_pb2.RECORD_KIND_NAME_CLAIM
ROTATION = common_pb2.RECORD_KIND_KEY_ROTATION
RECORD_TTL_MS = MAX_TTL_MS  # 7 days; the devices republish every few hours (peer.py)
NAME_POW_BITS = DEFAULT_NAME_POW_BITS  # what overlay nodes require by default


DISPLAY_NAME_MAX = 64


class NameTakenError(DnaError):
    """The name is claimed by another identity (first come, first served)."""


class NameContestedError(ContestedError):
    """As many of the name's holders answered with one identity's claim as with another's:
    the name resolves to neither (a claim's sequence number, its signer's choice, cannot
    settle it). Add the contact by fingerprint, or ask again later."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_display_name(text: str) -> str:
    """A display name: 1-64 characters, none of them control or format characters (they
    would reach other people's terminals)."""
    if not 1 <= len(text) <= DISPLAY_NAME_MAX:
        raise MalformedError(f"display name must be 1-{DISPLAY_NAME_MAX} characters")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise MalformedError("display name must not contain control characters")
    return text


async def check_name_free(
    node: OverlayNode, name: str, fingerprint: bytes | None, *, moved_from: bytes | None = None
) -> None:
    """Raise `NameTakenError` if ``name`` is claimed by an identity other than
    ``fingerprint`` (None: anyone's claim counts) or ``moved_from`` (the keys it rotated
    away from, whose claim it may replace)."""
    owner = await lookup_name(node, name)
    if owner is not None and owner not in (fingerprint, moved_from):
        raise NameTakenError(
            f"the name {normalize_name(name)!r} is taken by another identity"
            f" ({owner.hex()[:16]}…): choose another"
        )


async def publish_identity(node: OverlayNode, identity: Identity, display_name: str) -> int:
    """Store the identity record; returns how many overlay nodes took it."""
    payload = identity_payload(identity.fingerprint, display_name, now_ms=now_ms())
    return await _publish(node, identity, IDENTITY, record_key(IDENTITY, identity.fingerprint),
                          payload)  # fmt: skip


async def claim_name(
    node: OverlayNode, identity: Identity, name: str, *, pow_bits: int = NAME_POW_BITS,
    moved_by: bytes = b"",
) -> int:  # fmt: skip
    """Claim ``name`` for this identity (first come, first served; costs proof of work).
    ``moved_by`` (`name_move_signature`) lets it replace the claim of the keys it rotated
    away from."""
    norm = normalize_name(name)
    proof, _ = pow_.solve(name_pow_hash(norm, identity.fingerprint), pow_bits, now_ms=now_ms())
    claim = records_pb2.NameClaim(name=norm, fingerprint=identity.fingerprint,
                                  pow=proof.to_proto(), moved_by=moved_by)  # fmt: skip
    return await _publish(node, identity, NAME_CLAIM, name_key(norm), claim.SerializeToString())


async def _publish(
    node: OverlayNode, identity: Identity, kind: int, key: bytes, payload: bytes
) -> int:
    created = now_ms()
    record = sign_record(identity, kind=kind, key=key, seq=created, now_ms=created,
                         ttl_ms=RECORD_TTL_MS, payload=payload)  # fmt: skip
    return await node.put_record(record, key)


async def lookup_keys(node: OverlayNode, fingerprint: bytes) -> PublicKeySet | None:
    """The key set behind a fingerprint, from its identity record, or else from the rotation
    statement it signed: an identity that rotated stops republishing its old record, which
    expires in a week, while the statement lives 30 days, and names those same keys as its
    signer (`Peer.refresh_contact` then follows it). None: neither is published."""
    for kind in (IDENTITY, ROTATION):
        found = await node.get_record(record_key(kind, fingerprint))
        if found is not None and found.signer.fingerprint == fingerprint:
            return found.signer
    return None


async def lookup_name(node: OverlayNode, name: str) -> bytes | None:
    """The fingerprint that claimed ``name`` (None: unclaimed). `NameContestedError`: its
    holders answered as often with two identities' claims (`OverlayNode.get_record`), and
    picking one would hand the name to whoever holds half the nodes asked."""
    try:
        found = await node.get_record(name_key(name))
    except ContestedError as exc:
        raise NameContestedError(
            f"the name {normalize_name(name)!r} is claimed by several identities, each"
            " answered by as many of its holders: not resolved (add the contact by"
            " fingerprint, or try again later)"
        ) from exc
    if found is None:
        return None
    claim = decode_message(records_pb2.NameClaim, found.body.payload, max_size=MAX_CLAIM_BYTES,
                           what="name claim")  # fmt: skip
    if claim.fingerprint != found.signer.fingerprint or claim.name != normalize_name(name):
        raise VerificationError("name claim: does not bind this name to its signer")
    return bytes(claim.fingerprint)


def rotation_record(old: Identity, new: Identity, *, reason: str = "") -> bytes:
    """A rotation statement: signed by the old key, cross-signed by the new one."""
    accept = signature.sign(
        new, ROTATION_ACCEPT_DOMAIN, rotation_accept_message(old.fingerprint, new.fingerprint)
    )
    payload = records_pb2.KeyRotation(
        old_fingerprint=old.fingerprint, new_keys=new.public.to_proto(),
        effective_ms=now_ms(), new_key_signature=accept, reason=reason,
        pow=identity_proof(old.fingerprint, now_ms=now_ms()),
    )  # fmt: skip
    created = now_ms()
    return sign_record(old, kind=ROTATION, key=record_key(ROTATION, old.fingerprint), seq=created,
                       now_ms=created, ttl_ms=MAX_ROTATION_TTL_MS,
                       payload=payload.SerializeToString())  # fmt: skip


def name_move_signature(old: Identity, name: str, new_fp: bytes) -> bytes:
    """The old keys hand ``name`` to ``new_fp`` (carried in the new keys' claim)."""
    norm = normalize_name(name)
    return signature.sign(old, NAME_MOVE_DOMAIN, name_move_message(norm, new_fp))


def rotation_key(old: bytes) -> bytes:
    return record_key(ROTATION, old)


async def publish_rotation(node: OverlayNode, old: Identity, new: Identity, reason: str) -> int:
    return await node.put_record(
        rotation_record(old, new, reason=reason), record_key(ROTATION, old.fingerprint)
    )


def rotation_statement_target(statement: bytes, old: bytes, *, now_ms: int) -> PublicKeySet:
    """The keys a rotation statement handed over in a message moves ``old`` to, after the
    same checks as one fetched from the overlay: signed by ``old`` itself, cross-signed by
    the new keys, unexpired at ``now_ms``. Raises a ProtocolError otherwise."""
    rec = open_record(statement, now_ms=now_ms)
    if rec.body.kind != ROTATION or rec.signer.fingerprint != old:
        raise VerificationError("rotation: the statement is not signed by the rotating key")
    return rotation_target(rec)


async def lookup_rotation(node: OverlayNode, old: PublicKeySet) -> PublicKeySet | None:
    """The keys ``old`` rotated to, if a statement signed by ``old`` exists."""
    try:
        found = await node.get_record(record_key(ROTATION, old.fingerprint))
    except UnavailableError:
        return None  # asked again at the next refresh
    if found is None or found.signer != old:
        return None  # only the old key itself may speak for a rotation
    return rotation_target(found)


def safety_number(a: bytes, b: bytes) -> str:
    """60 digits both sides compute from the two fingerprints, to compare out of band.

    Each 5-digit group comes from 5 bytes of SHA-512 (mod 100000, as Signal does),
    so the number has about 199 bits and does not depend on who computes it.
    """
    digest = hashlib.sha512(p.label("safety-number") + b"".join(sorted((a, b)))).digest()
    groups = [int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 60, 5)]
    return " ".join(f"{g:05d}" for g in groups)
