"""Handling one fetched mailbox blob: open, check, apply, in one cache transaction.

A blob that does not open (tampered, wrongly addressed, unverifiable, expired),
replays an envelope already received, or carries a payload its sender may not
send is dropped with a logged reason and recorded as rejected, so it is never
shown and never retried; it is acknowledged like any other blob so the mailbox
is cleaned of it. Lookups that need the network (an unknown sender's keys) run
before the transaction, so the transaction itself never waits on I/O and a
crash leaves each blob either fully applied or not at all. They are bounded per
round and made after the round's new blobs: a blob whose sender needs one is
deferred (kept in the cache and acknowledged: the cache holds it, the replicas need not)
and handled by `retry_deferred`, first in first out, in this round or a later one; only
past the deferred blobs' bound in all, or past the replay window, is one dropped.

The inbox sends nothing: what a sync owes others (delivery receipts, the history
another device asked for, the move to keys another device rotated to) is left in
its `SyncReport` for the peer to act on. It knows the device it works for only
through `Owner` (identity, device, key lookup) and reads the time from an
injected clock, so it runs without a network (tests/peer/test_inbox.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from dna_core import trace
from dna_core.crypto import Identity, OpenedMessage, PublicKeySet, ReplayGuard, open_envelope
from dna_core.errors import (
    MalformedError,
    ProtocolError,
    ReplayError,
    UnavailableError,
    VerificationError,
)

from dna_peer import keyserver
from dna_peer.cache import DEFERRED, DEFERRED_EVICTED, RECOVERING, Cache, Contact, Message
from dna_peer.deferral import DeferredRoom, Limits
from dna_peer.payloads import (
    ContactCard,
    DeviceAck,
    DeviceHello,
    Empty,
    History,
    Payload,
    ReadMarker,
    Receipt,
    Rotation,
    Text,
    Transcript,
    decode_payload,
)
from dna_peer.profile import Device

log = logging.getLogger("dna.peer.inbox")
RECEIPT_BATCH_IDS = 4_000  # message IDs per receipt: 72 KB, under the envelope cap
# Unknown senders (no keys inside the envelope) looked up per round; an honest one is a
# contact whose keys a lost cache forgot, and several of its envelopes share one lookup.
# An envelope beyond it is deferred to a later round (kept in the cache, acknowledged).
MAX_SENDER_LOOKUPS = 64
# Peers the own devices' transcripts name without a card, looked up per round: a budget of
# their own, so a long own history never takes the lookups strangers' mail needs.
MAX_PEER_LOOKUPS = 64
# Blobs waiting for their sender's lookup (`deferred_blobs`), every mailbox together: the
# default mailbox quota (docs/storage.md), what honest replicas could hold of it at once.
DEFERRED_MAX_BLOBS = 10_000
DEFERRED_MAX_BYTES = 64 * 1024 * 1024
# Of those, the blobs counted against one storage node (each against the one, among those
# that returned it, holding the least: a fetch's or a take's `sources`), per node: a fifth (a
# mailbox has 5 replicas). A hostile node can make envelopes up, each naming a new sender;
# bounded by its own share (hostile nodes returning the same ones: by theirs), it cannot
# fill the deferred blobs, and the senders' turns are taken from each source in turn
# (`Cache.deferred_blobs`), so it cannot take a round's lookups either. A lone node's blob
# beyond its share is left on the nodes.
DEFERRED_NODE_BLOBS = DEFERRED_MAX_BLOBS // 5
DEFERRED_NODE_BYTES = DEFERRED_MAX_BYTES // 5
# Message requests (conversations of strangers: pinned because they wrote first, never
# added nor written to) kept at most; pinning one more forgets the tenth idle longest, with
# their messages (`Cache.forget_strangers`). Each costs its sender a put with proof of work, so
# without a bound anyone could grow the contacts and conversations tables without end.
MAX_STRANGERS = 2_000
# A blob's outcome: a rotation statement from someone not pinned here (nothing to move).
UNPINNED_ROTATION = "rotation: not a contact here, nothing to move"
Apply = Callable[[], str]  # the cache writes of one blob; returns its outcome
Clock = Callable[[], int]  # wall-clock milliseconds
OnMessage = Callable[[Message], None]  # a new message, opened, before its commit is durable


class Owner(Protocol):
    """The device an inbox works for (a `Peer`): its current identity (whose mailbox the
    inbox reads, unless given an older one to drain), the keys it rotated away from, this
    device, and the keyserver."""

    @property
    def identity(self) -> Identity: ...

    @property
    def fingerprint(self) -> bytes: ...

    @property
    def device(self) -> Device: ...

    async def lookup_keys(self, fingerprint: bytes) -> PublicKeySet | None:
        """The published key set behind ``fingerprint`` (None: not published)."""
        ...

    def former_keys(self) -> dict[bytes, PublicKeySet]:
        """The keys this identity rotated away from, by fingerprint, for as long as it
        remembers them (the grace period it drains their mailboxes)."""
        ...


class _NotLookedUpError(Exception):
    """An unknown sender the round has no lookup left for, or whose lookup no node
    answered: the blob waits for a later round."""

    def __init__(self, sender: bytes) -> None:
        super().__init__(sender.hex())
        self.sender = sender


@dataclass
class ReceiptDue:
    """A delivery receipt a sync owes: ``message_ids`` (at most ``RECEIPT_BATCH_IDS``)
    to the keys that sent them, sealed by the identity they reached (a retired one, for
    what arrived at a mailbox it rotated away from)."""

    to: PublicKeySet
    signer: Identity
    message_ids: list[bytes] = field(default_factory=list)


@dataclass
class SyncReport:
    new_messages: list[Message] = field(default_factory=list)
    receipts: int = 0
    rejected: list[tuple[bytes, str]] = field(default_factory=list)
    deferred: int = 0  # blobs that waited for a sender lookup (at the round's end, or later)
    left: int = 0  # blobs past their nodes' shares of the deferred: left on the nodes
    held: list[bytes] = field(default_factory=list)  # blobs to acknowledge
    deleted: int = 0
    cleanup_error: str | None = None  # storage nodes refused to delete (the user must know)
    # What the peer does after handling a mailbox's blobs:
    receipts_due: list[ReceiptDue] = field(default_factory=list)  # best effort
    history_wanted: bool = False  # another device lost its cache: post the history
    rotated_to: Identity | None = None  # another device rotated the identity: move over
    # Rotations from identities this device has no pin for (none to move: a restored device)
    unpinned_rotations: int = 0


class Inbox:
    """One mailbox's blobs: the identity's own, or (``identity`` given) a mailbox it had
    before a rotation, drained for a grace period."""

    def __init__(
        self,
        cache: Cache,
        owner: Owner,
        *,
        clock: Clock,
        identity: Identity | None = None,
        on_message: OnMessage | None = None,
        acknowledge: bool = False,
        max_strangers: int = MAX_STRANGERS,
    ) -> None:
        self.cache, self.owner, self.clock = cache, owner, clock
        self.identity = identity or owner.identity
        self.acknowledge = acknowledge  # note this device's acks with each blob's commit
        self.on_message = on_message
        self.max_strangers = max(1, max_strangers)
        self._strangers: int | None = None  # message requests in the cache, once counted
        self.report = SyncReport()
        self._guard = ReplayGuard()
        self._receipts: dict[bytes, ReceiptDue] = {}  # per sender: the batch being filled
        self._looked_up: dict[bytes, PublicKeySet | None] = {}  # unknown keys, this round
        self._sender_lookups = self._peer_lookups = 0  # each within its own budget
        self._formers: dict[bytes, PublicKeySet] | None = None  # owner.former_keys(), once
        self._may_look_up = True  # handle_blob's look_up
        self._room: DeferredRoom | None = None  # the deferred blobs by source, once read

    async def handle_blob(
        self,
        blob_id: bytes,
        blob: bytes,
        *,
        look_up: bool = True,
        returned_by: Collection[bytes] | None = None,
    ) -> None:
        """Open, check and apply one blob. Without ``look_up`` a sender that needs a lookup
        is not looked up here: its blob joins the deferred ones, which `retry_deferred`
        takes after the round's new blobs, so no lookup delays a contact's message.
        ``returned_by``: the storage nodes that returned it (None: not from a mailbox
        fetch, or not known); a blob is deferred within the share (DEFERRED_NODE_BLOBS)
        of one node that returned it (`_defer`)."""
        known = self.cache.blob_outcome(blob_id)
        if known is not None and (known != DEFERRED or not look_up):
            return  # handled in an earlier sync (or by another replica's copy), or waiting
        was_deferred = known == DEFERRED  # acknowledged already, when it was deferred
        self._may_look_up = look_up
        try:
            opened = await self._open(blob)
            apply = await self._plan(opened, decode_payload(opened.payload), blob_id)
        except ProtocolError as err:
            self._reject(blob_id, err.reason, acknowledged=was_deferred, returned_by=returned_by)
            return
        except _NotLookedUpError as over:
            if not was_deferred:
                self._defer(blob_id, blob, over.sender, returned_by)
            return
        trace.mark("peer.opened", blob_id)
        new = len(self.report.new_messages)
        with self.cache.transaction():
            outcome = apply()
            self.cache.remember_envelope(opened.message_id, opened.header.timestamp_ms)
            self.cache.record_blob(blob_id, outcome, self.clock(), self.identity.fingerprint)
            if outcome != "ack" and not was_deferred:
                self._hold(blob_id)
            self._tell_new(self.report.new_messages[new:])
            trace.mark("peer.told", blob_id)
        self._handled(blob_id)
        trace.mark("peer.committed", blob_id)

    def _tell_new(self, messages: list[Message]) -> None:
        """``on_message`` for each new message, once its writes are made and before their
        commit (an ``fsync``) returns: the commit is then off the message's way to the
        user. Nothing is lost if the commit never happens (a crash, a full disk): the
        round's cursors are saved and its blobs acknowledged only after their commits, and
        a blob leaves the replicas only by a delete after that, so the next sync receives
        the message again and it is shown again (at least once, never lost). A hook that
        fails is logged; it does not undo the blob."""
        if self.on_message is None:
            return
        for msg in messages:
            try:
                self.on_message(msg)
            except Exception:
                log.exception("on_message failed for %s", msg.message_id.hex()[:16])

    async def retry_deferred(self) -> int:
        """The deferred blobs (earlier rounds', and this round's that needed a lookup) of
        the MAX_SENDER_LOOKUPS senders deferred longest ago (first in, first out), so each
        is handled within a bounded number of rounds (the deferred senders ahead of it /
        MAX_SENDER_LOOKUPS + 1) and a round makes MAX_SENDER_LOOKUPS lookups at most;
        returns how many were handled."""
        handled = 0
        for blob_id, blob in self.cache.deferred_blobs(self.identity.fingerprint,
                                                       MAX_SENDER_LOOKUPS):  # fmt: skip
            await self.handle_blob(blob_id, blob)
            handled += self.cache.blob_outcome(blob_id) not in (None, DEFERRED)
        return handled

    def _defer(
        self, blob_id: bytes, blob: bytes, sender: bytes, returned_by: Collection[bytes] | None
    ) -> None:
        """Keep the blob for a later round, here: recorded as deferred and acknowledged
        (this device holds it, so the replicas may delete it: it holds no mailbox quota),
        handled by `retry_deferred` once its sender's turn comes. The sender is not
        authenticated yet (its keys are what is missing), so anyone who can seal to this
        identity, or a storage node making envelopes up, can name a new one with every
        blob: what is deferred is bounded in all (DEFERRED_MAX_BLOBS, DEFERRED_MAX_BYTES),
        and shared fairly between the sources (`deferral`): when full, a newcomer evicts
        the oldest blob of the source holding the most, if it holds two more than the
        newcomer's, else the newcomer is refused: dropped, as it was before deferring. A
        blob is counted against one node that returned it, the one holding the least
        (`DeferredRoom.place`), within that node's share of the bound; a blob that one node
        alone returned is that node's word only, and when refused left on the nodes (not
        recorded, not acknowledged: another replica that holds it returns it, and it is
        deferred then), as is one whose nodes all hold their shares, so hostile nodes,
        alone or colluding, hold their fair shares and lose nobody's message the rest
        would hold."""
        room = self._deferral_room()
        placed = room.place(returned_by, len(blob))
        if placed is None:
            self._refuse_deferral(blob_id, len(blob), sender, returned_by or (), room)
            return
        log.info("mailbox blob %s deferred: unknown sender %s, looked up in its turn (%d"
                 " senders a round)", blob_id.hex()[:16], sender.hex()[:16],
                 MAX_SENDER_LOOKUPS)  # fmt: skip
        source, victims = placed
        with self.cache.transaction():
            for victim in victims:
                self.cache.evict_deferred(victim)
            self.cache.defer_blob(self.identity.fingerprint, blob_id, blob, sender, self.clock(),
                                  source)  # fmt: skip
            self.cache.record_sources(blob_id, returned_by or ())  # its delete: there only
            self._hold(blob_id)
        for victim in victims:
            log.warning("dropped mailbox blob %s: %s", victim.hex()[:16], DEFERRED_EVICTED)
            room.remove(victim)
            self.report.rejected.append((victim, DEFERRED_EVICTED))
        room.add(source, blob_id, len(blob))
        self.report.deferred += 1

    def _refuse_deferral(
        self, blob_id: bytes, size: int, sender: bytes, returned_by: Collection[bytes],
        room: DeferredRoom,
    ) -> None:  # fmt: skip
        """A blob `_defer` has no room for: left on the nodes (not recorded, not
        acknowledged) when one node alone returned it, or each node that did holds its
        share: a replica that has not returned it yet (one down now) returns it later, and
        colluding nodes' made-up blobs leave no row behind; else dropped (recorded with the
        reason, and acknowledged), as at the bound before deferring."""
        if len(returned_by) == 1 or (
            returned_by and all(room.share_full(node, size) for node in returned_by)
        ):
            log.info("mailbox blob %s left on the nodes: unknown sender %s, returned by %d"
                     " node(s), each holding its share of the deferred blobs",
                     blob_id.hex()[:16], sender.hex()[:16], len(returned_by))  # fmt: skip
            self.report.left += 1
            return
        self._reject(blob_id, f"unknown sender {sender.hex()[:16]}, not looked up: the blobs"
                     f" waiting for a lookup are at their limit ({room.count} blobs,"
                     f" {room.size} bytes)", returned_by=returned_by)  # fmt: skip

    def _deferral_room(self) -> DeferredRoom:
        """The deferred blobs by source (`deferral`), read once a round."""
        if self._room is None:
            limits = Limits(DEFERRED_MAX_BLOBS, DEFERRED_MAX_BYTES, DEFERRED_NODE_BLOBS,
                            DEFERRED_NODE_BYTES)  # fmt: skip
            self._room = DeferredRoom(limits, self.cache.deferred_rows())
        return self._room

    def _handled(self, blob_id: bytes) -> None:
        """The blob is no longer deferred (handled or refused), for the room's count."""
        if self._room is not None:
            self._room.remove(blob_id)

    def _reject(
        self, blob_id: bytes, reason: str, *, acknowledged: bool = False,
        returned_by: Collection[bytes] | None = None,
    ) -> None:  # fmt: skip
        """Drop the blob for good: recorded with ``reason``, acknowledged like any other,
        and the nodes that returned it noted: its delete goes to them only (unverified, it
        is only their word: `Cache.unverified_blobs`)."""
        log.warning("dropped mailbox blob %s: %s", blob_id.hex()[:16], reason)
        with self.cache.transaction():
            self.cache.record_blob(blob_id, f"rejected: {reason}", self.clock(),
                                   self.identity.fingerprint)  # fmt: skip
            self.cache.record_sources(blob_id, returned_by or ())
            if not acknowledged:
                self._hold(blob_id)
        self._handled(blob_id)
        self.report.rejected.append((blob_id, reason))

    def _hold(self, blob_id: bytes) -> None:
        """This device holds the blob (handled, refused or deferred): a sync acknowledges it
        (`SyncReport.held`), and with ``acknowledge`` its own acknowledgement is noted in the
        cache now, in the blob's transaction. Noted at the end of the fetched page instead,
        a process killed in between (a page is up to 16 MiB of blobs) left blobs recorded
        but never acknowledged by this device: the next fetch skips them as handled, so no
        device ever deleted them and they held the mailbox's quota until their TTL."""
        if self.acknowledge:
            self.cache.add_acks(self.owner.device.device_id, [blob_id], None)
        self.report.held.append(blob_id)

    async def _open(self, blob: bytes) -> OpenedMessage:
        """Decrypt and verify; an unknown sender without keys inside is looked up once."""
        missing: list[bytes] = []

        def resolve(fingerprint: bytes) -> PublicKeySet | None:
            if fingerprint == self.identity.fingerprint:
                return self.identity.public
            if fingerprint in self._former_keys():  # opened to be refused by name (_plan)
                return self._former_keys()[fingerprint]
            contact = self.cache.contact(fingerprint)
            if contact is None:
                missing.append(fingerprint)
                return None
            return contact.keys

        opened = await self._try_open(blob, resolve, missing)
        if self.cache.seen_envelope(opened.message_id):
            raise ReplayError("envelope: message ID already received (replay)")
        return opened

    async def _try_open(
        self, blob: bytes, resolve: Callable[[bytes], PublicKeySet | None], missing: list[bytes]
    ) -> OpenedMessage:
        try:
            return self._open_with(blob, resolve)
        except VerificationError:
            if not missing:
                raise
        keys = await self._lookup_sender(missing[0])
        return self._open_with(blob, lambda fp: keys if keys and fp == keys.fingerprint else None)

    def _former_keys(self) -> dict[bytes, PublicKeySet]:
        if self._formers is None:
            self._formers = self.owner.former_keys()
        return self._formers

    async def _lookup_sender(self, fingerprint: bytes) -> PublicKeySet | None:
        """An unknown sender's published keys, looked up once per round, and for at most
        MAX_SENDER_LOOKUPS senders: anyone can fill a mailbox (10,000 blobs) with envelopes
        naming a different unpublished sender each, and every lookup is a DHT query (34 ms
        on a local testnet: a sync of minutes, or hours over the internet). Beyond that,
        `_NotLookedUpError`: the blob is deferred to a later round, not dropped (an honest
        sender's message among a flood arrives late, never not at all)."""
        if fingerprint not in self._looked_up:
            if not self._may_look_up or self._sender_lookups >= MAX_SENDER_LOOKUPS:
                raise _NotLookedUpError(fingerprint)
            self._sender_lookups += 1
        try:
            return await self._lookup(fingerprint)
        except UnavailableError:  # nobody could say: not "unpublished", so not refused
            raise _NotLookedUpError(fingerprint) from None

    async def _lookup_peer(self, fingerprint: bytes) -> PublicKeySet | None:
        """A transcript's peer that no card named: looked up within the round's
        MAX_PEER_LOOKUPS, else not (None). A history chunk (150 KiB) can name a thousand
        peers, each a DHT query; the transcript is kept either way, and the peer is pinned
        by its next message or card. A budget apart from the senders': an own history,
        however long, never leaves a stranger's envelope waiting."""
        if fingerprint not in self._looked_up:
            if self._peer_lookups >= MAX_PEER_LOOKUPS:
                return None
            self._peer_lookups += 1
        try:
            return await self._lookup(fingerprint)
        except UnavailableError:
            return None  # pinned by its next message or card, as beyond the budget

    async def _lookup(self, fingerprint: bytes) -> PublicKeySet | None:
        """Keys not in the cache, from the keyserver, once per round whoever asks."""
        if fingerprint not in self._looked_up:
            self._looked_up[fingerprint] = await self.owner.lookup_keys(fingerprint)
        return self._looked_up[fingerprint]

    def _open_with(
        self, blob: bytes, resolve: Callable[[bytes], PublicKeySet | None]
    ) -> OpenedMessage:
        return open_envelope(blob, self.identity, now_ms=self.clock(), replay_guard=self._guard,
                             resolve_sender=resolve)  # fmt: skip

    async def _plan(self, opened: OpenedMessage, payload: Payload, blob_id: bytes) -> Apply:
        """Who may send what: contacts texts, receipts and their rotations; the identity's
        own devices transcripts, read state, announcements, acks, history and rotations."""
        own = opened.sender.fingerprint == self.identity.fingerprint
        if not own and opened.sender.fingerprint in self._former_keys():
            raise VerificationError(
                "sender: this identity's own former key (rotated away from; its other devices"
                " write to the mailbox of the keys they hold): refused"
            )
        if isinstance(payload, Empty):
            raise MalformedError("payload: no kind this version knows (none set, or one a"
                                 " newer dna added)")  # fmt: skip
        if isinstance(payload, Rotation):
            if own:
                return self._plan_own_rotation(payload)
            return self._plan_contact_rotation(opened.sender, payload)
        plan = (
            await self._plan_own(payload, blob_id) if own else self._plan_contact(opened, payload)
        )
        if plan is None:
            who = "own device" if own else "another identity"
            raise MalformedError(f"payload: {payload.kind} is not accepted from {who}")
        return plan

    # -- from contacts -----------------------------------------------------------------

    def _plan_contact(self, opened: OpenedMessage, payload: Payload) -> Apply | None:
        match payload:
            case Text():
                return self._plan_text(opened, payload)
            case Receipt():
                return self._plan_receipt(opened.sender.fingerprint, list(payload.message_ids))
        return None

    def _plan_text(self, opened: OpenedMessage, text: Text) -> Apply:
        sender = opened.sender
        self._refuse_rotated_away(sender.fingerprint)

        def apply() -> str:
            contact = self.cache.contact(sender.fingerprint) or self._pin_stranger(sender)
            msg = Message(
                opened.message_id, contact.conversation, sender.fingerprint,
                self.owner.fingerprint, opened.header.timestamp_ms, text.body, outgoing=False,
            )  # fmt: skip
            if self.cache.add_message(msg):
                self.report.new_messages.append(msg)
            self.owe_receipt(sender, msg.message_id)
            return "message"

        return apply

    def _refuse_rotated_away(self, fingerprint: bytes) -> None:
        """A key its contact rotated away from writes no more messages, once this device
        saw the rotation (the safe rule: the envelope's time is signed by that same key, so
        a message "sent before the rotation" cannot be told from one backdated by whoever
        holds the old key now: a stolen device, a leaked backup). A message the contact sent
        just before rotating and that arrives after the rotation is refused too. Receipts
        from the old key stay accepted: they only mark delivered what was sent to that key,
        and the contact's devices drain the old mailbox for 30 days (docs/peer.md)."""
        pinned = self.cache.contact(fingerprint)
        if pinned is not None and pinned.replaced_by:
            raise VerificationError(
                "sender: a key its owner rotated away from"
                f" (now {pinned.replaced_by.hex()[:16]}): refused"
            )

    def owe_receipt(self, sender: PublicKeySet, message_id: bytes) -> None:
        """Add ``message_id`` to the receipts due to ``sender`` (one per sender per sync,
        split every ``RECEIPT_BATCH_IDS`` IDs so none outgrows an envelope)."""
        due = self._receipts.get(sender.fingerprint)
        if due is None or len(due.message_ids) >= RECEIPT_BATCH_IDS:
            due = ReceiptDue(sender, self.identity)
            self._receipts[sender.fingerprint] = due
            self.report.receipts_due.append(due)
        due.message_ids.append(message_id)

    def _pin_stranger(self, keys: PublicKeySet) -> Contact:
        """First contact from someone not in the address book: pin the keys (TOFU), as a
        message request; at ``max_strangers`` of them the tenth idle longest is forgotten
        first (pins, conversations and messages: their next message is a request again),
        so the scans that takes are made once per tenth of the bound, not per stranger."""
        if self._strangers is None:
            self._strangers = self.cache.strangers()  # once a round: a scan (29 ms at 2,500)
        if self._strangers >= self.max_strangers:
            keep = self.max_strangers - max(1, self.max_strangers // 10)  # room for a tenth
            gone = self.cache.forget_strangers(keep=keep, idle_before_ms=0)
            self._strangers -= gone
            log.info("forgot %d message request(s) idle longest (%d kept at most)", gone,
                     self.max_strangers)  # fmt: skip
        self._strangers += 1
        contact = Contact(keys.fingerprint, keys, None, False, self.clock(), keys.fingerprint)
        self.cache.pin(contact)
        return contact

    def _plan_receipt(self, sender: bytes, message_ids: list[bytes]) -> Apply:
        def apply() -> str:
            self.report.receipts += self.cache.mark_delivered(message_ids, recipient=sender)
            return "receipt"

        return apply

    def _plan_contact_rotation(self, sender: PublicKeySet, rotation: Rotation) -> Apply:
        """A pinned contact rotated: its statement (signed by the pinned key, cross-signed
        by the new one) moves the pin, the name and the conversation, with no warning.

        From someone this device has no pin for, there is nothing to move: handled as
        such (counted in `SyncReport.unpinned_rotations`, not refused with a warning per
        blob). That is the normal case on a device restored with `dna identity import` (an
        empty cache: no pins yet), and for a rotation sent to all of a contact's
        correspondents. It is acknowledged like every blob, so it leaves the replicas only
        once every device of this identity acknowledged it too: a device that has the pin
        still moves it. Adding the contact later finds its current keys (the name, or
        `refresh_contact` following the published rotation)."""
        if self.cache.contact(sender.fingerprint) is None:
            return self._plan_unpinned_rotation(sender)
        new_keys = keyserver.rotation_statement_target(
            rotation.statement, sender.fingerprint, now_ms=self.clock()
        )

        def apply() -> str:
            pinned = self.cache.contact(sender.fingerprint)
            if pinned is not None and not pinned.replaced_by:
                self.cache.replace_contact(pinned, new_keys, self.clock())
                log.info("%s rotated keys to %s (their statement, signed by the pinned key)",
                         pinned.name, new_keys.fingerprint.hex()[:16])  # fmt: skip
            return "rotation"

        return apply

    def _plan_unpinned_rotation(self, sender: PublicKeySet) -> Apply:
        def apply() -> str:
            log.info("%s… rotated keys, but is not a contact on this device: nothing to move",
                     sender.fingerprint.hex()[:16])  # fmt: skip
            self.report.unpinned_rotations += 1
            return UNPINNED_ROTATION

        return apply

    def _plan_own_rotation(self, rotation: Rotation) -> Apply:
        """Another device rotated this identity: move to the new keys after this sync."""
        new = Identity(rotation.new_seeds) if len(rotation.new_seeds) else None
        target = keyserver.rotation_statement_target(
            rotation.statement, self.identity.fingerprint, now_ms=self.clock()
        )
        if new is None or new.public != target:
            raise VerificationError("rotation: the new keys are not the ones the statement names")

        def apply() -> str:
            if new.fingerprint != self.owner.fingerprint:  # not already there
                self.report.rotated_to = new
            return "rotation"

        return apply

    # -- from the identity's own devices ---------------------------------------------

    async def _plan_own(self, payload: Payload, blob_id: bytes) -> Apply | None:
        match payload:
            case Transcript():
                return await self._plan_transcripts([payload], [], [], "sync")
            case ReadMarker():
                return await self._plan_transcripts([], [payload], [], "read")
            case History():
                return await self._plan_history(payload)
            case DeviceHello():
                return self._plan_hello(payload)
            case DeviceAck():
                return self._plan_ack(payload, blob_id)
        return None

    def _plan_ack(self, ack: DeviceAck, blob_id: bytes) -> Apply:
        def apply() -> str:
            self.cache.add_acks(ack.device_id, list(ack.blob_ids), blob_id)
            return "ack"

        return apply

    async def _plan_history(self, history: History) -> Apply:
        transcripts = await self._plan_transcripts(
            list(history.messages), list(history.read), list(history.contacts), "history"
        )

        def apply() -> str:
            for hello in history.devices:
                self.cache.add_device(hello.device_id, hello.device_name, self.clock())
            if history.devices:  # the device list is known again: deletes are safe
                self.cache.clear_state(RECOVERING)
            return transcripts()

        return apply

    def _plan_hello(self, hello: DeviceHello) -> Apply:
        """A device of this identity says hello (it is one from now on); or a link offer
        names the device its code would make: waited for by deletes, not a device yet (a
        code never used leaves none behind)."""

        def apply() -> str:
            if hello.offered_until_ms:
                self.cache.add_offered(hello.device_id, hello.offered_until_ms, self.clock())
                return "device"
            self.cache.add_device(hello.device_id, hello.device_name, self.clock())
            if hello.wants_history and hello.device_id != self.owner.device.device_id:
                self.report.history_wanted = True
            return "device"

        return apply

    async def _plan_transcripts(
        self,
        items: list[Transcript],
        read: list[ReadMarker],
        cards: list[ContactCard],
        outcome: str,
    ) -> Apply:
        contacts = [card.keys for card in cards]
        names = {card.keys.fingerprint: card.name for card in cards}
        verified = {card.keys.fingerprint for card in cards if card.verified}
        peers = {t.original_sender or t.original_recipient for t in items}
        unknown = {fp for fp in peers if self.cache.contact(fp) is None} - names.keys()
        for fp in unknown:  # keys of a peer only another device knew
            keys = await self._lookup_peer(fp)
            contacts += [keys] if keys else []

        def apply() -> str:
            for keys in contacts:
                fp = keys.fingerprint
                self._pin_card(keys, names.get(fp) or None, verified=fp in verified)
            for item in items:
                self._add_transcript(item)
            for marker in read:
                self.cache.mark_read(marker.conversation_id, marker.read_up_to_ms)
            return outcome

        return apply

    def _pin_card(self, keys: PublicKeySet, name: str | None, *, verified: bool) -> None:
        """A contact card from another device of this identity: pin its keys, and its name
        unless this device gave the name to someone else. A contact already pinned without
        a name (its message arrived before this card) takes the card's name too. A card
        that says verified verifies these keys here too (the safety number belongs to the
        fingerprint, the hash of the keys); one that does not never un-verifies: cards
        arrive in any order, and only the user's own confirmation (or a key change, which
        is another fingerprint) decides."""
        if name and self.cache.contact_named(name) is not None:
            name = None  # this device pinned the name to someone else: keep its pin
        known = self.cache.contact(keys.fingerprint)
        if known is None:
            self.cache.pin(Contact(keys.fingerprint, keys, name, verified, self.clock(),
                                   keys.fingerprint, chosen=True))  # fmt: skip
            return
        if name and not known.name:
            self.cache.set_contact_name(keys.fingerprint, name)
        if verified and not known.verified:
            self.cache.set_verified(keys.fingerprint, True)
        self.cache.choose(keys.fingerprint)  # added on another device of ours

    def _add_transcript(self, item: Transcript) -> None:
        own = self.owner.fingerprint
        peer = item.original_sender or item.original_recipient
        contact = self.cache.contact(peer)
        text = item.text
        conversation = text.conversation_id or (contact.conversation if contact else peer)
        msg = Message(
            item.original_message_id, conversation, item.original_sender or own,
            own if item.original_sender else item.original_recipient,
            item.original_timestamp_ms, text.body, outgoing=not item.original_sender,
        )  # fmt: skip
        if self.cache.add_message(msg):
            self.report.new_messages.append(msg)
