"""Rules every backend shares, kept in one place so the backends cannot drift apart.

The interface (``base.py``) leaves a few things open; these are the answers both backends
(and the contract suite's reference model) implement:

* **Expired means absent.** A blob or tombstone with ``expires_ms <= now_ms`` is invisible to
  every read and to every write decision, exactly as if ``expire`` had already removed it.
  ``expire`` only reclaims space; it never changes what a read returns.
* **Tombstones outlive what they delete.** A tombstone that drops a live blob is stored with
  ``expires_ms = max(tombstone.expires_ms, blob.expires_ms)``, so the blob cannot come back
  through repair once the tombstone is gone. A tombstone already expired on arrival is ignored
  (it deletes nothing: a live blob would have extended it). Of two tombstones for the same
  blob the one expiring later wins; on a tie the stored one stays.
* **A re-put after expiry is a new store** (new ``seq``): the old copy is absent, and the seq
  counter never goes back, so existing cursors stay valid.
* **GC order** is oldest expiry first, then blobs before tombstones, then mailbox ID, then blob
  ID: the same victims on every backend for the same ``limit``.
* **Digest** framing is fixed here (``mailbox_digest``): replicas on different backends must
  compute equal digests for equal content.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from dna_core.crypto.pow import MAX_PARTS, Proof
from dna_core.errors import CapacityError

from dna_storage.backends.base import MailboxDigest, Tombstone, TombstoneBoundError

D = TypeVar("D")
# ``MailboxBackend.held``: (mailbox, IDs, now_ms) -> (held as blobs, held as tombstones)
HeldReader = Callable[[bytes, Sequence[bytes], int], Awaitable[tuple[set[bytes], set[bytes]]]]
DIGEST_DOMAIN = b"dna-mailbox-digest/v1"
_POW_SIZE = 17  # difficulty (1 byte), timestamp_ms (8), nonce (8); then 8 per more nonce
_MAX_POW_SIZE = _POW_SIZE + 8 * (MAX_PARTS - 1)


def encode_pow(proof: Proof | None) -> bytes | None:
    """A put's proof of work as stored beside its blob (None: none kept)."""
    if proof is None:
        return None
    return (
        bytes([proof.difficulty])
        + proof.timestamp_ms.to_bytes(8, "big")
        + b"".join(nonce.to_bytes(8, "big") for nonce in proof.nonces)
    )


def decode_pow(stored: bytes | None) -> Proof | None:
    if not stored or not _POW_SIZE <= len(stored) <= _MAX_POW_SIZE or (len(stored) - 1) % 8:
        return None
    nonces = [int.from_bytes(stored[i : i + 8], "big") for i in range(9, len(stored), 8)]
    return Proof(stored[0], int.from_bytes(stored[1:9], "big"), nonces[0], tuple(nonces[1:]))


def mailbox_digest(
    mailbox_id: bytes, blob_ids: Iterable[bytes], tombstone_ids: Iterable[bytes]
) -> MailboxDigest:
    """SHA-256 over the sorted blob IDs, then the sorted tombstone IDs.

    Each section starts with its count and each ID with its length, so "blob X" and
    "tombstone X" (or two IDs glued together) never hash alike.
    """
    blobs = sorted(blob_ids)
    tombs = sorted(tombstone_ids)
    h = hashlib.sha256(DIGEST_DOMAIN)
    for section in (blobs, tombs):
        h.update(len(section).to_bytes(4, "big"))
        for item in section:
            h.update(len(item).to_bytes(2, "big"))
            h.update(item)
    return MailboxDigest(mailbox_id, h.digest(), len(blobs), len(tombs))


def in_range(mailbox_id: bytes, start: bytes, end: bytes) -> bool:
    """``start <= mailbox_id < end``; an empty ``end`` means "no upper bound".

    (With 32-byte IDs no ``end`` could otherwise include ``ff..ff``.)
    """
    return mailbox_id >= start and (not end or mailbox_id < end)


def check_limit(limit: int) -> None:
    """A page must hold at least one blob, or a cursor could never advance."""
    if limit < 1:
        raise ValueError(f"fetch limit must be >= 1, got {limit}")


def unique(items: Iterable[bytes]) -> list[bytes]:
    """Items in first-seen order without repeats (``get_blobs`` answers each ID once)."""
    return list(dict.fromkeys(items))


def per_authorization(authorizations: Sequence[bytes], digest: Callable[[bytes], D]) -> list[D]:
    """``digest`` of each authorization, computed once per distinct one: a delete batch's
    tombstones (up to 200) share one ~13 KB signed delete. (A dict keyed by the bytes finds
    a repeat of the same object by identity, without reading it again.)"""
    memo: dict[bytes, D] = {}
    out = []
    for auth in authorizations:
        known = memo.get(auth)
        if known is None:
            known = memo[auth] = digest(auth)
        out.append(known)
    return out


async def delete_steps(
    items: Sequence[tuple[Tombstone, D]], chunk: int, now_ms: int, held: HeldReader | None
) -> list[list[tuple[Tombstone, D]]]:
    """The steps a delete is written in, ``chunk`` tombstones each (one step holds the
    writer, or the Redis server, at a time). With ``held`` (a delete bounded by
    ``TombstoneBounds``, of more than one step), the tombstones for IDs held neither way come
    first, all in one step: the bounds are judged on them at once, so a refusal stores none
    of the delete. They drop no blob, so the step is cheap whatever its size (the chunks are
    for blobs dropped: 1,000 of 60 KB held SQLite's writer 0.4-0.9 s)."""
    if held is None or len(items) <= chunk:
        return [list(items[i : i + chunk]) for i in range(0, len(items), chunk)]
    not_held: set[tuple[bytes, bytes]] = set()
    for box in unique(t.mailbox_id for t, _ in items):
        ids = [t.blob_id for t, _ in items if t.mailbox_id == box]
        blobs, tombs = await held(box, ids, now_ms)
        not_held.update((box, i) for i in ids if i not in blobs and i not in tombs)
    first = [p for p in items if (p[0].mailbox_id, p[0].blob_id) in not_held]
    rest = [p for p in items if (p[0].mailbox_id, p[0].blob_id) not in not_held]
    steps = [rest[i : i + chunk] for i in range(0, len(rest), chunk)]
    return [first, *steps] if first else steps


@contextlib.contextmanager
def refused_at_step(step: int) -> Iterator[None]:
    """Around the write of a delete's ``step`` (0 its first): a refusal by its
    `TombstoneBounds` is raised as `TombstoneBoundError`, saying whether the steps before it
    were applied (then the service keeps what the delete cost spent: a source would get
    the earlier steps' tombstones for free)."""
    try:
        yield
    except CapacityError as exc:
        if exc.kind != "tombstones" or isinstance(exc, TombstoneBoundError):
            raise
        raise TombstoneBoundError(exc.reason, stored_some=step > 0) from exc
