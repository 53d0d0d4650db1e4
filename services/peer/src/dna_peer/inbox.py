"""Handling one fetched mailbox blob: open, check, apply, in one cache transaction.

A blob that does not open (tampered, wrongly addressed, unverifiable, expired),
replays an envelope already received, or carries a payload its sender may not
send is dropped with a logged reason and recorded as rejected, so it is never
shown and never retried; it is acknowledged like any other blob so the mailbox
is cleaned of it. Lookups that need the network (an unknown sender's keys) run
before the transaction, so the transaction itself never waits on I/O and a
crash leaves each blob either fully applied or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dna_core.crypto import Identity, OpenedMessage, PublicKeySet, ReplayGuard, open_envelope
from dna_core.errors import MalformedError, ProtocolError, ReplayError, VerificationError
from dna_core.wire import decode_message, envelope_pb2

from dna_peer import keyserver
from dna_peer.cache import Contact, Message
from dna_peer.keyserver import now_ms

RECOVERING = "recovering"  # cache state: lost and not yet told the device list

if TYPE_CHECKING:
    from dna_peer.peer import Peer

log = logging.getLogger("dna.peer.inbox")
MAX_PAYLOAD = 192 * 1024
RECEIPT_BATCH_IDS = 4_000  # message IDs per receipt: 72 KB, under the envelope cap
OWN_DEVICE_KINDS = frozenset({"sync", "read", "device", "ack", "history"})
Apply = Callable[[], str]  # the cache writes of one blob; returns its outcome


@dataclass
class SyncReport:
    new_messages: list[Message] = field(default_factory=list)
    receipts: int = 0
    rejected: list[tuple[bytes, str]] = field(default_factory=list)
    held: list[bytes] = field(default_factory=list)  # blobs to acknowledge
    deleted: int = 0
    cleanup_error: str | None = None  # storage nodes refused to delete (the user must know)


class Inbox:
    """One mailbox's blobs: the identity's own, or (``identity`` given) a mailbox it had
    before a rotation, drained for a grace period."""

    def __init__(self, peer: Peer, identity: Identity | None = None) -> None:
        self.peer, self.cache = peer, peer.cache
        self.identity = identity or peer.identity
        self.rotated_to: Identity | None = None  # another device rotated the identity
        self.report = SyncReport()
        self._guard = ReplayGuard()
        self._receipts: dict[bytes, tuple[PublicKeySet, list[bytes]]] = {}
        self.history_wanted = False  # another device lost its cache

    async def handle_blob(self, blob_id: bytes, blob: bytes) -> None:
        if self.cache.blob_outcome(blob_id) is not None:
            return  # handled in an earlier sync (or by another replica's copy)
        try:
            opened = await self._open(blob)
            payload = decode_message(envelope_pb2.Payload, opened.payload, max_size=MAX_PAYLOAD,
                                     what="payload")  # fmt: skip
            apply = await self._plan(opened, payload, blob_id)
        except ProtocolError as err:
            self._reject(blob_id, err.reason)
            return
        with self.cache.transaction():
            outcome = apply()
            self.cache.remember_envelope(opened.message_id, opened.header.timestamp_ms)
            self.cache.record_blob(blob_id, outcome, now_ms())
        if outcome != "ack":
            self.report.held.append(blob_id)

    def _reject(self, blob_id: bytes, reason: str) -> None:
        log.warning("dropped mailbox blob %s: %s", blob_id.hex()[:16], reason)
        self.cache.record_blob(blob_id, f"rejected: {reason}", now_ms())
        self.report.rejected.append((blob_id, reason))
        self.report.held.append(blob_id)

    async def _open(self, blob: bytes) -> OpenedMessage:
        """Decrypt and verify; an unknown sender without keys inside is looked up once."""
        missing: list[bytes] = []

        def resolve(fingerprint: bytes) -> PublicKeySet | None:
            if fingerprint == self.identity.fingerprint:
                return self.identity.public
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
        keys = await keyserver.lookup_keys(self.peer.node, missing[0])
        return self._open_with(blob, lambda fp: keys if keys and fp == keys.fingerprint else None)

    def _open_with(
        self, blob: bytes, resolve: Callable[[bytes], PublicKeySet | None]
    ) -> OpenedMessage:
        return open_envelope(blob, self.identity, now_ms=now_ms(), replay_guard=self._guard,
                             resolve_sender=resolve)  # fmt: skip

    async def _plan(
        self, opened: OpenedMessage, payload: envelope_pb2.Payload, blob_id: bytes
    ) -> Apply:
        kind = payload.WhichOneof("kind")
        own = opened.sender.fingerprint == self.identity.fingerprint
        if own and kind in OWN_DEVICE_KINDS:
            return await self._plan_own(kind, payload, blob_id)
        if kind == "rotation":
            if own:
                return self._plan_own_rotation(payload.rotation)
            return self._plan_contact_rotation(opened.sender, payload.rotation)
        if not own and kind == "text":
            return self._plan_text(opened, payload.text)
        if not own and kind == "receipt":
            return self._plan_receipt(opened.sender.fingerprint, list(payload.receipt.message_ids))
        who = "own device" if own else "another identity"
        raise MalformedError(f"payload: {kind or 'empty'} is not accepted from {who}")

    # -- from contacts -----------------------------------------------------------------

    def _plan_text(self, opened: OpenedMessage, text: envelope_pb2.Text) -> Apply:
        sender = opened.sender

        def apply() -> str:
            contact = self.cache.contact(sender.fingerprint) or self._pin_stranger(sender)
            msg = Message(
                opened.message_id, contact.conversation, sender.fingerprint,
                self.peer.fingerprint, opened.header.timestamp_ms, text.body, outgoing=False,
            )  # fmt: skip
            if self.cache.add_message(msg):
                self.report.new_messages.append(msg)
            self._receipts.setdefault(sender.fingerprint, (sender, []))[1].append(msg.message_id)
            return "message"

        return apply

    def _pin_stranger(self, keys: PublicKeySet) -> Contact:
        """First contact from someone not in the address book: pin the keys (TOFU)."""
        contact = Contact(keys.fingerprint, keys, None, False, now_ms(), keys.fingerprint)
        self.cache.pin(contact)
        return contact

    def _plan_receipt(self, sender: bytes, message_ids: list[bytes]) -> Apply:
        def apply() -> str:
            self.report.receipts += self.cache.mark_delivered(message_ids, recipient=sender)
            return "receipt"

        return apply

    def _plan_contact_rotation(
        self, sender: PublicKeySet, rotation: envelope_pb2.IdentityRotation
    ) -> Apply:
        """A pinned contact rotated: its statement (signed by the pinned key, cross-signed
        by the new one) moves the pin, the name and the conversation, with no warning."""
        if self.cache.contact(sender.fingerprint) is None:
            raise VerificationError("rotation: not from a pinned contact")
        new_keys = keyserver.rotation_statement_target(rotation.statement, sender.fingerprint)

        def apply() -> str:
            pinned = self.cache.contact(sender.fingerprint)
            if pinned is not None and not pinned.replaced_by:
                self.cache.replace_contact(pinned, new_keys, now_ms())
                log.info("%s rotated keys to %s (their statement, signed by the pinned key)",
                         pinned.name, new_keys.fingerprint.hex()[:16])  # fmt: skip
            return "rotation"

        return apply

    def _plan_own_rotation(self, rotation: envelope_pb2.IdentityRotation) -> Apply:
        """Another device rotated this identity: move to the new keys after this sync."""
        new = Identity(rotation.new_seeds) if len(rotation.new_seeds) else None
        target = keyserver.rotation_statement_target(rotation.statement, self.identity.fingerprint)
        if new is None or new.public != target:
            raise VerificationError("rotation: the new keys are not the ones the statement names")

        def apply() -> str:
            if new.fingerprint != self.peer.fingerprint:  # not already there
                self.rotated_to = new
            return "rotation"

        return apply

    async def send_receipts(self) -> None:
        """One delivery receipt per sender for the messages this sync stored."""
        for keys, ids in self._receipts.values():
            for start in range(0, len(ids), RECEIPT_BATCH_IDS):
                batch = ids[start : start + RECEIPT_BATCH_IDS]
                receipt = envelope_pb2.DeliveryReceipt(message_ids=batch)
                payload = envelope_pb2.Payload(receipt=receipt).SerializeToString()
                try:
                    await self.peer.send_payload(
                        keys, payload, with_keys=False, sender=self.identity
                    )  # the keys it was sent to
                except Exception as exc:  # best effort; the message is already held
                    log.warning("delivery receipt to %s failed: %s",
                                keys.fingerprint.hex()[:16], exc)  # fmt: skip

    # -- from the identity's own devices ---------------------------------------------

    async def _plan_own(self, kind: str, payload: envelope_pb2.Payload, blob_id: bytes) -> Apply:
        if kind == "sync":
            return await self._plan_transcripts([payload.sync], [], [], kind)
        if kind == "history":
            return await self._plan_history(payload.history)
        if kind == "read":
            return await self._plan_transcripts([], [payload.read], [], kind)
        if kind == "device":
            return self._plan_hello(payload.device)
        ack = payload.ack

        def apply_ack() -> str:
            self.cache.add_acks(ack.device_id, list(ack.blob_ids), blob_id)
            return "ack"

        return apply_ack

    async def _plan_history(self, history: envelope_pb2.History) -> Apply:
        transcripts = await self._plan_transcripts(
            list(history.messages), list(history.read), list(history.contacts), "history"
        )

        def apply() -> str:
            for hello in history.devices:
                self.cache.add_device(hello.device_id, hello.device_name, now_ms())
            if history.devices:  # the device list is known again: deletes are safe
                self.cache.clear_state(RECOVERING)
            return transcripts()

        return apply

    def _plan_hello(self, hello: envelope_pb2.DeviceHello) -> Apply:
        def apply() -> str:
            self.cache.add_device(hello.device_id, hello.device_name, now_ms())
            if hello.wants_history and hello.device_id != self.peer.device.device_id:
                self.history_wanted = True
            return "device"

        return apply

    async def _plan_transcripts(
        self,
        items: list[envelope_pb2.SyncTranscript],
        read: list[envelope_pb2.ReadMarker],
        cards: list[envelope_pb2.ContactCard],
        outcome: str,
    ) -> Apply:
        contacts = [PublicKeySet.from_proto(card.keys) for card in cards]
        names = {keys.fingerprint: card.name for keys, card in zip(contacts, cards, strict=True)}
        peers = {t.original_sender or t.original_recipient for t in items}
        unknown = {fp for fp in peers if self.cache.contact(fp) is None} - names.keys()
        for fp in unknown:  # keys of a peer only another device knew
            keys = await keyserver.lookup_keys(self.peer.node, fp)
            contacts += [keys] if keys else []
        texts = [
            decode_message(envelope_pb2.Payload, item.payload, max_size=MAX_PAYLOAD,
                           what="transcript payload").text
            for item in items
        ]  # fmt: skip

        def apply() -> str:
            for keys in contacts:
                self._pin_card(keys, names.get(keys.fingerprint) or None)
            for item, text in zip(items, texts, strict=True):
                self._add_transcript(item, text)
            for marker in read:
                self.cache.mark_read(marker.conversation_id, marker.read_up_to_ms)
            return outcome

        return apply

    def _pin_card(self, keys: PublicKeySet, name: str | None) -> None:
        """A contact card from another device of this identity: pin its keys, and its name
        unless this device gave the name to someone else. A contact already pinned without
        a name (its message arrived before this card) takes the card's name too."""
        if name and self.cache.contact_named(name) is not None:
            name = None  # this device pinned the name to someone else: keep its pin
        known = self.cache.contact(keys.fingerprint)
        if known is None:
            self.cache.pin(Contact(keys.fingerprint, keys, name, False, now_ms(),
                                   keys.fingerprint))  # fmt: skip
        elif name and not known.name:
            self.cache.set_contact_name(keys.fingerprint, name)

    def _add_transcript(self, item: envelope_pb2.SyncTranscript, text: envelope_pb2.Text) -> None:
        own = self.peer.fingerprint
        peer = item.original_sender or item.original_recipient
        contact = self.cache.contact(peer)
        conversation = text.conversation_id or (contact.conversation if contact else peer)
        msg = Message(
            item.original_message_id, conversation, item.original_sender or own,
            own if item.original_sender else item.original_recipient,
            item.original_timestamp_ms, text.body, outgoing=not item.original_sender,
        )  # fmt: skip
        if self.cache.add_message(msg):
            self.report.new_messages.append(msg)
