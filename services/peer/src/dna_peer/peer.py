"""A person's device on the network: contacts (TOFU), sending, syncing, devices.

`Peer` ties one unlocked identity, its encrypted cache and a client-mode overlay
node together. Sending seals an envelope to the contact's pinned keys and puts
it on the recipient's mailbox replicas (`MailboxClient`: W of 5, proof of work,
hand-off). Syncing fetches the own mailbox from its replicas, and handles each
new blob in one cache transaction (`inbox.handle_blob`): messages, receipts, and
what the identity's other devices post there (sync transcripts, read state,
device announcements, acknowledgements, history). A blob is deleted from the
storage nodes with a signed delete once every known device acknowledged it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dna_core import trace
from dna_core.crypto import Identity, PublicKeySet, ReplayGuard, seal
from dna_core.crypto import primitives as p
from dna_core.crypto.envelope import MAX_PAYLOAD_BYTES, decode_envelope
from dna_core.errors import DnaError, MalformedError, UnavailableError
from dna_core.mailbox import (
    DeleteResult,
    FetchState,
    MailboxClient,
    QuorumError,
    Subscription,
    TooFewNodesError,
    UnreachableError,
    blob_id,
)
from dna_core.overlay import (
    ContestedError,
    OverlayNode,
    normalize_name,
    resolve_seeds,
    seed_family,
)
from dna_core.wire import envelope_pb2

from dna_peer import keyserver
from dna_peer.cache import (
    HISTORY_WANTED,
    MAX_ROTATION_HOPS,
    RECOVERING,
    Cache,
    Contact,
    Message,
    Outgoing,
    cache_key,
)
from dna_peer.direct.link import IceConfig
from dna_peer.direct.service import DirectService
from dna_peer.inbox import MAX_STRANGERS, Inbox, OnMessage, ReceiptDue, SyncReport
from dna_peer.keyserver import now_ms
from dna_peer.network import join_overlay
from dna_peer.presence import Presence, lookup_presence
from dna_peer.profile import Device, Profile
from dna_peer.settle import Settler

log = logging.getLogger("dna.peer")
DAY_MS = 86_400_000
PUBLISHED = "published"  # cache state: what was last published, and when
REPUBLISH_AFTER_MS = 6 * 3_600_000  # well inside the 7-day record lifetime
CHECK_PUBLISHED_MS = 10 * 60_000  # how often a running device looks for its own records
PRUNED = "pruned"  # cache state: when the bookkeeping was last pruned
REPLAY_WINDOW_MS = ReplayGuard().max_age_ms + DAY_MS  # what open_envelope accepts, + a day
BLOB_MEMORY_MS = 32 * DAY_MS  # a deleted blob cannot come back after its TTL (30 days)
RECOVERY_WAIT_MS = 7 * DAY_MS  # a device silent this long after a history request is gone
# Cache state a dna from before `Cache.add_offered` left: devices a link offer registered
# at once (listed, and announced to the other devices), not heard from yet.
OFFERED = "offered-devices"
# Cache state of a device made by `identity link CODE`: the offer it used (the code's
# throwaway identity and the blobs), until the offer is deleted from the replicas.
USED_LINK_OFFER = "used-link-offer"
# A link code works for an hour (link.LINK_TTL_S) and the new device acknowledges what it
# finds at once; a device offered this long ago that never acknowledged anything never came.
OFFER_UNUSED_MS = DAY_MS
WATCH_BACKOFF_S = 5.0
WATCH_FULL_SYNC_S = 300.0  # a watch with live subscriptions still syncs (fetches) this often
DELETE_RETRY_S = 60.0  # after nodes refused a delete: `watch` does not ask every second
SEND_ATTEMPTS = 4  # over about 3.5 s: rides out a replica restarting
REJOIN_EVERY_S = 2.0  # sends failing together after an outage rejoin the overlay once
NAME_MOVE = "name-move"  # cache state: the old keys' signature handing the name over
RETIRED = "retired"  # cache state: identities this one rotated away from, drained until
# A queued message older than this is not sent any more: the recipient would drop its
# envelope as expired (the replay window, 31 days) before long.
OUTBOX_MAX_AGE_MS = 7 * DAY_MS
# Cache state: a `dna identity rotate` begun and not finished here: the new keys' seeds and
# the reason (hex JSON), written before anything is published, so a rotation cut short
# finishes with the keys its statement and notices named, never with others.
ROTATING = "rotating"
RETIRED_GRACE_MS = 30 * DAY_MS  # = the rotation statement's lifetime and a blob's longest TTL
HISTORY_CHUNK_BYTES = 150 * 1024  # a History payload stays under the 192 KiB envelope cap
DISPLAY_PREFIX = 16  # hex digits of a fingerprint the inbox shows for a contact without a name
LIST_ITEM_OVERHEAD = 8  # a repeated field's tag and length prefix, at most
CARDS_PER_POST = 32  # contact cards (3.2 KB of keys each) in one History: ~105 KB
ACK_BATCH_IDS = 2_000  # blob IDs per DeviceAck: 68 KB, under the 192 KiB envelope cap
MAX_RECEIPTS_PER_ROUND = 64  # receipt envelopes one sync round seals and puts, at most
PRESENCE_LOOKUPS_AT_ONCE = 16  # `contacts list --online`: overlay lookups in flight
Progress = Callable[[int, int], None]  # (done, total)
# A text rides in a Payload, to the own devices inside a SyncTranscript, and later in a
# History item (~150 bytes more); all must stay under the envelope's payload cap, so 1 KiB
# is left for their framing.
MAX_TEXT_BYTES = MAX_PAYLOAD_BYTES - 1024


class UnknownContactError(DnaError):
    """No contact, name or fingerprint matches."""


class InvalidMessageError(DnaError):
    """A text that cannot be sent: empty, not UTF-8, or over the size cap."""


def check_text(body: str) -> None:
    """Raise ``InvalidMessageError`` unless ``body`` can be sent as one message."""
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:  # e.g. undecodable command-line bytes, kept as surrogates
        raise InvalidMessageError("the message is not valid UTF-8 text") from None
    if not body.strip():
        raise InvalidMessageError("the message is empty")
    if size > MAX_TEXT_BYTES:
        raise InvalidMessageError(
            f"the message is {size:,} bytes; at most {MAX_TEXT_BYTES:,} fit in one message"
            " (the 192 KiB envelope cap less 1 KiB of framing)"
        )


def check_max_strangers(value: int) -> int:
    """``value`` if it can bound the message requests (`Peer.max_strangers`): at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DnaError(f"max_strangers is {value!r}: the message requests kept, a whole"
                       " number of at least 1")  # fmt: skip
    return value


class KeyChangedError(DnaError):
    """A contact's key changed without a rotation statement signed by the pinned key."""


DIRECT, STORED = "direct", "stored"  # the path a message took


@dataclass(frozen=True)
class SentMessage:
    message_id: bytes
    stored_on: int  # replicas that acknowledged (0: delivered directly)
    path: str = STORED  # DIRECT: the recipient's device acknowledged it over the direct path


@dataclass
class Peer:
    identity: Identity
    cache: Cache
    node: OverlayNode
    device: Device
    pow_bits: int = 12
    seeds: list[tuple[str, int]] = field(default_factory=list)  # to rejoin after an outage
    # Mailbox sessions (one stream per replica, push): for a device that stays online.
    # A one-shot command (`dna send`) makes one or two calls per replica: unary is enough.
    sessions: bool = True
    # Message requests (strangers' conversations) kept at most (`inbox.MAX_STRANGERS`).
    max_strangers: int = MAX_STRANGERS
    mail: MailboxClient = field(init=False)
    _checked_ms: int = field(default=0, init=False)  # when the own records were last looked up
    _deletes_refused_until: float = field(init=False, default=0.0)  # monotonic
    _rejoined_at: float = field(init=False, default=float("-inf"))  # monotonic, see `_rejoin`
    direct: DirectService | None = field(default=None, init=False)  # see `go_direct`
    on_direct: Callable[[SyncReport], None] | None = field(default=None, init=False, repr=False)
    # Hears each new message (from the mailbox or the direct path) as soon as it is opened
    # and checked, before its cache commit is durable (`Inbox._tell_new`: nothing is lost).
    on_message: OnMessage | None = field(default=None, init=False, repr=False)
    _mirrors: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    # Message IDs a send or a sync of this process has on the way now: another send of the
    # same text is another message, and a sync does not deliver the same one beside it.
    _delivering: set[bytes] = field(default_factory=set, init=False, repr=False)
    # The mailbox clients of identities this device rotated away from while running, by
    # their fingerprint: idle (the live `mail` drains their old mailboxes, as it does after
    # a restart), kept until their grace period ends so that what they still had on the way
    # (writes past their quorum, a watch's subscription) ends cleanly; then closed
    # (`_close_retired_mail`), so a long `dna watch` keeps no sessions of a rotation past it.
    _retired_mail: dict[bytes, MailboxClient] = field(init=False, default_factory=dict)
    # Writes a new identity to the profile's key file (set by open_peer, which holds the
    # passphrase); without it this device cannot follow a rotation.
    save_identity: Callable[[Identity, Callable[[], None]], None] | None = field(
        default=None, repr=False
    )  # (new identity, re-encrypt the cache): Profile.replace_identity

    def __post_init__(self) -> None:
        check_max_strangers(self.max_strangers)
        self.mail = MailboxClient(self.node, pow_bits=self.pow_bits, sessions=self.sessions)
        if self.cache.add_device(self.device.device_id, self.device.name, now_ms()):
            log.info("device %s registered in its cache", self.device.device_id.hex()[:8])

    async def close(self) -> None:
        if self.direct is not None:
            await self.direct.stop()  # withdraws the presence record, if it published one
        if self._mirrors:
            await asyncio.gather(*self._mirrors, return_exceptions=True)
        for mail in (self.mail, *self._retired_mail.values()):
            await mail.drain()  # let writes past their quorum reach the other replicas
            await mail.close()  # their sessions
        await self.node.stop()
        self.cache.close()

    @property
    def fingerprint(self) -> bytes:
        return self.identity.fingerprint

    # -- identity and contacts -------------------------------------------------------

    async def publish(self, display_name: str, name: str | None = None) -> int:
        """Publish the identity record (and claim ``name``); returns overlay copies stored."""
        moved_from, moved_by = self._name_move(name)
        if name is not None:  # before anything is published: a taken name changes nothing
            await keyserver.check_name_free(self.node, name, self.fingerprint,
                                            moved_from=moved_from)  # fmt: skip
        stored = await keyserver.publish_identity(self.node, self.identity, display_name)
        if name is not None and not await keyserver.claim_name(
            self.node, self.identity, name, moved_by=moved_by
        ):
            await keyserver.check_name_free(
                self.node, name, self.fingerprint, moved_from=moved_from
            )  # lost a race; fmt: skip
            raise DnaError(f"no overlay node took the claim of {name!r}: try again")
        # stored nowhere (the network is away): due again at the next sync
        published_ms = now_ms() if stored else 0
        published = json.dumps({"display_name": display_name, "name": name, "ms": published_ms})
        self.cache.set_state(PUBLISHED, published.encode())
        return stored

    def _name_move(self, name: str | None) -> tuple[bytes | None, bytes]:
        """(old fingerprint, its signature) handing ``name`` to this identity, if it
        rotated while holding it: the claim carries it so it replaces the old one."""
        raw = self.cache.get_state(NAME_MOVE)
        move = json.loads(raw) if raw else None
        if name is None or move is None or move["name"] != normalize_name(name):
            return None, b""
        return bytes.fromhex(move["from"]), bytes.fromhex(move["signature"])

    async def daily_upkeep(self) -> None:
        """Republish the records and prune the cache's bookkeeping, once a day (and delete
        the link offer this device was made from, if that is still to do); close the
        mailbox clients of retired identities whose grace period ended, every time."""
        await self._close_retired_mail()
        await self.delete_used_link_offer()
        await self.republish_if_due()
        last = int(self.cache.get_state(PRUNED) or b"0")
        if now_ms() - last >= DAY_MS:
            now = self.cache.pruning_now_ms(now_ms(), slack_ms=DAY_MS)  # (a clock step ahead)
            self.cache.prune(envelopes_before_ms=now - REPLAY_WINDOW_MS,
                             deleted_blobs_before_ms=now - BLOB_MEMORY_MS)  # fmt: skip
            self.cache.forget_strangers(keep=self.max_strangers,
                                        idle_before_ms=now - REPLAY_WINDOW_MS)  # fmt: skip
            self.cache.drop_expired_offers(now_ms())
            self.cache.set_state(PRUNED, str(now_ms()).encode())

    async def republish_if_due(self) -> bool:
        """Records expire (7 days) unless their owner signs them again: the device that
        published them does (its cache remembers what and when), every 6 hours, and at
        once when its records are missing from the network: looked up at the first sync
        after the device (re)connects and every 10 minutes while it runs (a node wiped or
        replaced loses what it held)."""
        raw = self.cache.get_state(PUBLISHED)
        if raw is None:
            return False
        last = json.loads(raw)
        due = now_ms() - last["ms"] >= REPUBLISH_AFTER_MS
        if not due and now_ms() - self._checked_ms >= CHECK_PUBLISHED_MS:
            self._checked_ms = now_ms()
            due = not await self._own_records_found(last["name"])
        if not due:
            return False
        try:
            await self.publish(last["display_name"], last["name"])
        except keyserver.NameTakenError as exc:  # it expired and someone else took it
            log.warning("%s; republishing the identity without it", exc)
            await self.publish(last["display_name"], None)
        return True

    async def lookup_keys(self, fingerprint: bytes) -> PublicKeySet | None:
        """The key set published for ``fingerprint`` (None: not published)."""
        return await keyserver.lookup_keys(self.node, fingerprint)

    def former_keys(self) -> dict[bytes, PublicKeySet]:
        """The keys this identity rotated away from, within their grace period (`retired`):
        the inbox refuses what they sign in the current mailbox (`Inbox._plan`)."""
        return {old.fingerprint: old.public for old in self.retired()}

    async def _own_records_found(self, name: str | None) -> bool:
        try:
            if await self.lookup_keys(self.fingerprint) != self.identity.public:
                return False
            return name is None or await keyserver.lookup_name(self.node, name) == self.fingerprint
        except (UnavailableError, ContestedError):
            # nobody could say, or the name's holders are split: publish them again, as
            # when missing (holders that lost the claim take it back)
            return False

    async def add_contact(self, query: str) -> Contact:
        """Pin a contact found by name or fingerprint (hex, or the 16-hex prefix the inbox
        shows for someone already pinned); idempotent; TOFU on names. The identity's other
        devices get the contact card (keys and name) too."""
        contact = await self._add_contact(query)
        if self._has_other_devices():
            card = _contact_card(contact)
            await self.post_to_devices(envelope_pb2.Payload(
                history=envelope_pb2.History(contacts=[card])))  # fmt: skip
        return contact

    async def _add_contact(self, query: str) -> Contact:
        fingerprint = _parse_fingerprint(query) or _pinned_prefix(self.cache, query, DISPLAY_PREFIX)
        name = None if fingerprint else _contact_name(query)
        if name is not None:
            fingerprint = await keyserver.lookup_name(self.node, name)
            if fingerprint is None:
                raise UnknownContactError(f"nobody has claimed the name {name!r}")
            pinned = self.cache.contact_named(name)
            if pinned is not None and pinned.fingerprint != fingerprint:
                if self.cache.current_contact(fingerprint) == pinned:
                    return pinned  # the name still points at the key that rotated to this one
                followed = await self.refresh_contact(pinned)  # maybe several rotations
                if followed.fingerprint == fingerprint:
                    return followed
                return await self._follow_rotation(followed, fingerprint)  # KEY CHANGED
        assert fingerprint is not None
        if fingerprint == self.fingerprint:
            raise UnknownContactError("that is you: your own devices sync through `dna sync`")
        known = self.cache.current_contact(fingerprint)
        if known is None:
            return await self.refresh_contact(await self._pin_new(fingerprint, name))
        if name and known.name != name:
            self.cache.set_contact_name(known.fingerprint, name)
        self.cache.choose(known.fingerprint)  # maybe a stranger who wrote first
        return self.cache.contact(known.fingerprint) or known

    async def _pin_new(self, fingerprint: bytes, name: str | None) -> Contact:
        keys = await keyserver.lookup_keys(self.node, fingerprint)
        if keys is None:
            raise UnknownContactError(f"no identity record for {fingerprint.hex()[:16]}…")
        contact = Contact(fingerprint, keys, name, False, now_ms(), fingerprint, chosen=True)
        self.cache.pin(contact)
        return contact

    async def _follow_rotation(self, pinned: Contact, claimed: bytes) -> Contact:
        """Accept a changed key only through a rotation statement signed by the pinned key."""
        new_keys = await keyserver.lookup_rotation(self.node, pinned.keys)
        if new_keys is None or new_keys.fingerprint != claimed:
            log.warning(
                "KEY CHANGED for %s: pinned %s, network says %s, no rotation signed by the"
                " pinned key; refusing", pinned.name, pinned.fingerprint.hex(), claimed.hex()
            )  # fmt: skip
            raise KeyChangedError(
                f"the key of {pinned.name!r} changed from {pinned.fingerprint.hex()[:16]}… to"
                f" {claimed.hex()[:16]}… without a rotation signed by the old key; refusing"
                " (verify with them out of band, then `dna contacts forget` and add again)"
            )
        log.warning("%s rotated keys to %s (signed by the pinned key)", pinned.name, claimed.hex())
        return self.cache.replace_contact(pinned, new_keys, now_ms())

    async def refresh_contact(self, contact: Contact) -> Contact:
        """Follow the rotations the contact published, each signed by the keys before it
        (a contact may have rotated more than once while we were away)."""
        for _ in range(MAX_ROTATION_HOPS):
            new_keys = await keyserver.lookup_rotation(self.node, contact.keys)
            if new_keys is None or new_keys.fingerprint == contact.fingerprint:
                return contact
            contact = await self._follow_rotation(contact, new_keys.fingerprint)
        return contact

    def find_contact(self, query: str) -> Contact:
        """A pinned contact by name, fingerprint or fingerprint prefix (hex)."""
        return find_contact(self.cache, query)

    def safety_number(self, contact: Contact) -> str:
        return keyserver.safety_number(self.fingerprint, contact.fingerprint)

    # -- sending ---------------------------------------------------------------------

    async def send(self, contact: Contact, body: str) -> SentMessage:
        """Seal once, then deliver: over the direct path if the contact is present and a
        pair comes up in time, else (any failure or the deadline) the same envelope, with
        the same message ID, to the contact's mailbox; a copy arriving both ways is
        dropped by the recipient as a replay of an ID it holds.

        The envelope is queued in the cache (the outbox) before it leaves and unqueued
        once it is stored, in the history and told to the other devices. A send that
        failed or was killed on the way is finished by the next `sync`, or by sending the
        same text to the same contact again, which takes the queued envelope: one message
        ID, so the recipient shows it once however often it arrives."""
        started_ns = time.monotonic_ns()
        check_text(body)
        queued = next((q for q in self.cache.outgoing(contact.fingerprint)
                       if q.body == body and q.message_id not in self._delivering
                       and not q.under_way_elsewhere()), None)  # fmt: skip
        if queued is None:
            # Our key set (3.2 KB) rides along until the contact showed it has it; after
            # that a recipient without it (a lost cache) finds it in the keyserver.
            with_keys = not self.cache.has_our_keys(contact.fingerprint)
            envelope = seal(self.identity, contact.keys, _text_payload(body), now_ms=now_ms(),
                            include_sender_keys=with_keys)  # fmt: skip
            queued = Outgoing(decode_envelope(envelope).message_id, contact.fingerprint, body,
                              envelope, now_ms(), os.getpid())  # fmt: skip
            self.cache.queue_outgoing(queued)
        if trace.enabled():
            trace.mark("send.start", blob_id(queued.envelope), started_ns)
            trace.mark("send.sealed", blob_id(queued.envelope))
        return await self._deliver(contact, queued, first_try=True)

    async def _deliver(self, contact: Contact, out: Outgoing, *, first_try: bool
                       ) -> SentMessage:  # fmt: skip
        """Put a queued message on its way to the end: direct or stored, the history, the
        transcript for the other devices; then off the queue. Each step may run again. A
        ``first_try`` (a send) tries the direct path and retries the put; from the queue
        (a sync) one stored attempt, so a message that cannot go yet (the recipient's
        mailbox full) does not hold every sync up for the seconds of the retries."""
        self._delivering.add(out.message_id)
        try:
            return await self._deliver_once(contact, out, first_try=first_try)
        finally:
            self._delivering.discard(out.message_id)

    async def _deliver_once(self, contact: Contact, out: Outgoing, *, first_try: bool
                            ) -> SentMessage:  # fmt: skip
        header = decode_envelope(out.envelope)
        direct = (first_try and self.direct is not None
                  and await self.direct.send(contact, header.message_id, out.envelope))  # fmt: skip
        attempts = SEND_ATTEMPTS if first_try else 1  # a sync does not wait on the queue
        stored_on = (
            0 if direct else (await self._put(out.recipient, out.envelope, attempts)).stored_on
        )
        others = self._has_other_devices()
        with self.cache.transaction():  # one commit (fsync) with one device
            self.cache.add_message(Message(
                header.message_id, contact.conversation, self.fingerprint, out.recipient,
                header.timestamp_ms, out.body, outgoing=True,
            ))  # fmt: skip
            if direct:  # the ACK says the contact's device stored it: that is the receipt
                self.cache.mark_delivered([header.message_id], recipient=out.recipient)
            if not others:
                self.cache.unqueue_outgoing(header.message_id)
        if trace.enabled():
            trace.mark("send.cached", blob_id(out.envelope))
        if others:
            transcript = envelope_pb2.SyncTranscript(
                original_recipient=out.recipient, original_message_id=header.message_id,
                original_timestamp_ms=header.timestamp_ms, payload=_text_payload(out.body),
            )  # fmt: skip
            await self.post_to_devices(envelope_pb2.Payload(sync=transcript))
            self.cache.unqueue_outgoing(header.message_id)
        return SentMessage(header.message_id, stored_on, DIRECT if direct else STORED)

    async def send_queued(self) -> int:
        """Finish the sends a failure or a kill cut short (stored, so no direct attempt);
        returns how many went. One that fails stays queued for the next sync."""
        sent = 0
        for out in self.cache.outgoing():
            if out.message_id in self._delivering:  # a send of this process has it
                continue
            contact = self.cache.contact(out.recipient)
            to = out.recipient.hex()[:16]
            if contact is None or now_ms() - out.queued_ms > OUTBOX_MAX_AGE_MS:
                why = "no such contact any more" if contact is None else "queued too long ago"
                log.warning("not sending a queued message to %s…: %s", to, why)
                self.cache.unqueue_outgoing(out.message_id)
                continue
            try:
                await self._deliver(contact, out, first_try=False)
            except DnaError as exc:
                log.warning("a queued message to %s… stays queued: %s", to, exc)
                continue
            sent += 1
        return sent

    # -- the direct path ----------------------------------------------------------------

    async def go_direct(self, config: IceConfig, *, listen: bool) -> DirectService:
        """Send over the direct path when a contact is present; with ``listen`` (this
        device stays online: `dna watch`) also publish presence and accept contacts."""
        self.direct = DirectService(self, config, self._receive_direct)
        if listen:
            await self.direct.start()
        return self.direct

    async def presence_of(self, contact: Contact) -> Presence | None:
        """The contact's fresh presence record (None: offline)."""
        return await lookup_presence(self.node, contact.keys, self.identity, now_ms=now_ms())

    async def presence_of_all(self, contacts: Sequence[Contact]) -> list[Presence | None]:
        """`presence_of` each contact, PRESENCE_LOOKUPS_AT_ONCE at a time: the contacts may
        be thousands (anyone who writes is pinned), and a lookup each at once would open
        that many overlay queries together."""
        room = asyncio.Semaphore(PRESENCE_LOOKUPS_AT_ONCE)

        async def one(contact: Contact) -> Presence | None:
            async with room:
                return await self.presence_of(contact)

        return list(await asyncio.gather(*(one(c) for c in contacts)))

    async def _receive_direct(
        self, sender: PublicKeySet, message_id: bytes, envelope: bytes
    ) -> None:
        """A message that came over the direct path: handled by the inbox like a mailbox
        blob (same checks, same replay memory), then mirrored to this identity's other
        devices. Returning means stored (the channel then acknowledges); raising, not."""
        if decode_envelope(envelope).message_id != message_id:
            raise InvalidMessageError("direct: the frame's message ID is not the envelope's")
        inbox = self._inbox()
        # Not the mailbox blob ID: if the same envelope also reaches the mailbox (the
        # sender fell back after a lost ACK), that copy is dropped as a replay and deleted.
        blob_id = p.sha256(p.label("direct-blob"), envelope)
        await inbox.handle_blob(blob_id, envelope)
        # No replica holds it: nothing to delete, and the daily prune forgets its row (kept
        # forever before, named to the replicas by every clean-up that deletes all held).
        self.cache.mark_deleted([blob_id])
        report = inbox.report
        if report.new_messages and self._has_other_devices():
            task = asyncio.create_task(self._mirror(report.new_messages))
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)
        if (report.new_messages or report.receipts) and self.on_direct is not None:
            self.on_direct(report)

    async def mirrored(self) -> None:
        """Wait until the directly received messages so far are mirrored to this identity's
        other devices (they were posted to its mailbox, or the posting failed and was logged)."""
        while self._mirrors:
            await asyncio.gather(*self._mirrors, return_exceptions=True)

    async def _mirror(self, messages: list[Message]) -> None:
        """Sync transcripts of directly received messages, for the other devices (the
        mailbox copy, which they would have read, never existed)."""
        for msg in messages:
            text = envelope_pb2.Text(body=msg.body, conversation_id=msg.conversation)
            transcript = envelope_pb2.SyncTranscript(
                original_recipient=msg.recipient, original_message_id=msg.message_id,
                original_timestamp_ms=msg.timestamp_ms, original_sender=msg.sender,
                payload=envelope_pb2.Payload(text=text).SerializeToString(),
            )  # fmt: skip
            try:
                await self.post_to_devices(envelope_pb2.Payload(sync=transcript))
            except DnaError as exc:
                log.warning("mirroring direct message %s failed: %s", msg.message_id.hex(), exc)

    async def send_payload(
        self, to: PublicKeySet, payload: bytes, *, with_keys: bool, sender: Identity | None = None
    ) -> _Sent:
        """Seal and put; ``sender`` signs instead of this identity (a receipt for what
        reached a mailbox this identity rotated away from)."""
        envelope = seal(sender or self.identity, to, payload, now_ms=now_ms(),
                        include_sender_keys=with_keys)  # fmt: skip
        return await self._put(to.fingerprint, envelope)

    async def _put(self, to: bytes, envelope: bytes, attempts: int = SEND_ATTEMPTS) -> _Sent:
        """Put a sealed envelope on ``to``'s mailbox replicas (retrying, see below)."""
        for attempt in range(attempts):
            try:
                put = await self.mail.put(to, envelope, return_at_quorum=True)
                return _Sent(envelope, len(put.stored_on))
            except QuorumError as exc:
                # Retry the same envelope: a partial write then merges with it (same
                # blob, same message ID) instead of arriving as a second copy.
                if attempt == attempts - 1:
                    raise
                log.info("send retry %d after: %s", attempt + 1, exc)
                # None found: the way to the network is lost. Only then: a rejoin opens new
                # channels, failing the other puts in flight on the old ones (a lookup
                # under load may come back short; the retry looks up again anyway).
                if isinstance(exc, TooFewNodesError) and exc.found == 0:
                    await self._rejoin()
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def post_to_devices(self, payload: envelope_pb2.Payload) -> None:
        """Put a payload in the own mailbox, for this identity's other devices."""
        await self.send_payload(self.identity.public, payload.SerializeToString(), with_keys=False)

    def _has_other_devices(self) -> bool:
        """Another device, or one a live link offer may make (linked, it reads the own
        mailbox from its start: what this device sent meanwhile must be there)."""
        return len(self.cache.devices()) > 1 or self.cache.offers_pending(now_ms())

    async def mark_read(self, contact: Contact) -> bool:
        """Mark a conversation read up to its newest message, on every device."""
        last = self.cache.last_message(contact.conversation)  # not a list: 10k+ messages
        newest = last.timestamp_ms if last else 0
        if not self.cache.mark_read(contact.conversation, newest):
            return False
        if self._has_other_devices():
            marker = envelope_pb2.ReadMarker(
                conversation_id=contact.conversation, read_up_to_ms=newest
            )
            await self.post_to_devices(envelope_pb2.Payload(read=marker))
        return True

    # -- receiving ---------------------------------------------------------------------

    async def sync(self, progress: Progress | None = None) -> SyncReport:
        """Fetch the own mailbox, handle what is new, acknowledge, receipt, clean up; then
        what still arrives at a mailbox this identity rotated away from."""
        await self.daily_upkeep()
        if self.rotation_cut_short():
            log.warning("a `dna identity rotate` was cut short: run it again to finish it (your"
                        " contacts may already follow the new keys)")  # fmt: skip
        await self.send_queued()  # what a failed or killed send left on its way
        try:
            report = await self._sync_own(progress)
        except UnreachableError:
            if not await self._rejoin():
                raise
            report = await self._sync_own(progress)  # each blob is handled once: safe again
        if report.rotated_to is not None:  # another device rotated: move over, read the new mailbox
            self._adopt(report.rotated_to)
            _merge(report, await self._sync_own(progress))
        for old in self.retired():
            _merge(report, await self._drain_retired(old))
        await self.post_cards_due()
        return report

    async def post_cards_due(self) -> None:
        """The contact cards this device owes its other devices (a verification confirmed
        here: `Cache.confirm_verified`), CARDS_PER_POST to a post; best effort, what fails
        stays due for the next sync."""
        due = self.cache.cards_due()
        if due and not self._has_other_devices():
            self.cache.cards_posted(due)  # nobody to tell; a linked device gets the history
            return
        for batch in _batches(due, CARDS_PER_POST):
            cards = [_contact_card(c) for fp in batch if (c := self.cache.contact(fp))]
            try:
                await self.post_to_devices(envelope_pb2.Payload(
                    history=envelope_pb2.History(contacts=cards)))  # fmt: skip
            except DnaError as exc:
                log.warning("verified contacts not told to the other devices yet: %s", exc)
                return
            self.cache.cards_posted(batch)

    async def _sync_own(
        self, progress: Progress | None, pushed: Subscription | None = None
    ) -> SyncReport:
        """Handle the own mailbox's new blobs, then settle what that owes."""
        report = await self._receive_own(progress, pushed)
        await self._settle(report)
        return report

    async def _receive_own(
        self, progress: Progress | None, pushed: Subscription | None = None
    ) -> SyncReport:
        """Handle the own mailbox's new blobs: fetched from the saved cursors, or (with
        ``pushed``) those its replicas pushed since the last round, with no fetch. The
        blobs handled are acknowledged for this device at once (what lets `_clean_up`
        delete them), so a round whose settling never ran leaks nothing."""
        inbox = self._inbox(acknowledge=True)  # each blob's ack with its commit
        start = FetchState(cursors=self.cache.cursors())

        def save(state: FetchState) -> None:
            # One commit (an fsync, on the loop) for where a page or a pushed round got to.
            self.cache.save_cursors(state.cursors)

        await self._read_mailbox(inbox, start, save, progress, pushed)
        return inbox.report

    async def _settle(self, report: SyncReport) -> None:
        """What handled blobs owe: delivery receipts, the history another device asked
        for, acknowledgements to the other devices, and deletes."""
        await self._send_receipts(report.receipts_due)
        try:
            if report.history_wanted:
                await self.send_history()
            await self._post_acks(report.held)
        except QuorumError as exc:
            if not exc.full:
                raise
            await self._make_room(exc)
        report.deleted, report.cleanup_error = await self._clean_up()

    async def _make_room(self, full: QuorumError) -> None:
        """The own mailbox is at its quota: no device can post the acknowledgements a
        delete waits for, so each would wait for the others forever while every sender is
        refused. Delete what this device handled without waiting, then post the history,
        so the other devices get every message from it instead of from the blobs."""
        log.warning("own mailbox full (%s): deleting what this device holds, then posting"
                    " the history to the other devices", full)  # fmt: skip
        result = await self._delete(self.cache.undeleted_blobs())
        if result.deleted:
            await self.send_history()

    def _inbox(self, identity: Identity | None = None, *, acknowledge: bool = False) -> Inbox:
        """An inbox for the own mailbox, or for ``identity``'s (one this identity rotated
        away from); with ``acknowledge``, it notes this device's acknowledgement of each
        blob it holds with the blob (the own mailbox's blobs, which deletes wait for)."""
        return Inbox(self.cache, self, clock=now_ms, identity=identity,
                     on_message=self.on_message, acknowledge=acknowledge,
                     max_strangers=self.max_strangers)  # fmt: skip

    async def _send_receipts(self, receipts: Sequence[ReceiptDue]) -> None:
        """The delivery receipts a sync owes, best effort: the messages are already held,
        and a lost receipt only leaves them undelivered in the sender's view. At most
        MAX_RECEIPTS_PER_ROUND, to the contacts this identity knows first (named, or
        written to): each receipt is a sealed, signed put with proof of work (~35 ms), and
        anyone can fill a mailbox with messages from as many throwaway identities, which
        made a sync seal and put one receipt each, to mailboxes they chose."""
        if not receipts:
            return
        written = self.cache.last_written()

        def stranger(due: ReceiptDue) -> bool:
            contact = self.cache.current_contact(due.to.fingerprint)
            return contact is None or not (contact.name or contact.conversation in written)

        ordered = sorted(receipts, key=stranger)  # stable: the known first, in their order
        if len(ordered) > MAX_RECEIPTS_PER_ROUND:
            log.warning("%d delivery receipts not sent: more than %d are due in one round"
                        " (their senders see the messages undelivered)",
                        len(ordered) - MAX_RECEIPTS_PER_ROUND, MAX_RECEIPTS_PER_ROUND)  # fmt: skip
        for due in ordered[:MAX_RECEIPTS_PER_ROUND]:
            receipt = envelope_pb2.DeliveryReceipt(message_ids=due.message_ids)
            payload = envelope_pb2.Payload(receipt=receipt).SerializeToString()
            try:  # sealed by the identity the messages reached, to the keys that sent them
                await self.send_payload(due.to, payload, with_keys=False, sender=due.signer)
            except Exception as exc:  # any failure: no later sync retries it
                log.warning("delivery receipt to %s failed: %s",
                            due.to.fingerprint.hex()[:16], exc)  # fmt: skip

    # -- rotation ------------------------------------------------------------------------

    async def rotate(self, reason: str = "") -> Identity:
        """Move this identity to a new key set: publish a rotation statement (signed by the
        old keys, cross-signed by the new) and the new identity record, tell each contact
        (from the old keys, so their pins follow without a key-change warning) and the
        other devices (the new seeds, through the old own mailbox), then switch this
        device over. The old mailbox is still drained for RETIRED_GRACE_MS."""
        if self.save_identity is None:
            raise DnaError("this device cannot rotate: its key file is not writable here")
        old, (new, reason) = self.identity, self._rotation_keys(reason)
        statement = keyserver.rotation_record(old, new, reason=reason)
        if not await self.node.put_record(statement, keyserver.rotation_key(old.fingerprint)):
            raise DnaError("no overlay node took the rotation statement: nothing changed")
        notice = envelope_pb2.IdentityRotation(statement=statement)
        for contact in self.cache.contacts():
            if contact.replaced_by:
                continue
            try:
                await self.send_payload(contact.keys, envelope_pb2.Payload(
                    rotation=notice).SerializeToString(), with_keys=False)  # fmt: skip
            except DnaError as exc:  # it finds the statement later
                log.warning("rotation notice to %s failed: %s", contact.name, exc)
        own = envelope_pb2.IdentityRotation(statement=statement, new_seeds=new.seeds())
        await self.post_to_devices(envelope_pb2.Payload(rotation=own))
        await self._clean_up()  # deletes still due on the old mailbox, signed by its keys
        # The name's hand-over is kept with the switch itself: a rotation cut short after
        # it (Ctrl-C, the network) still moves the name at the next republish, instead of
        # finding it "taken" by its own old keys and publishing without it.
        self._adopt(new, name_move=self._name_move_to(old, new), asked_here=True)
        self.cache.clear_state(ROTATING)
        await self._publish_after_rotation()
        return new

    def _rotation_keys(self, reason: str) -> tuple[Identity, str]:
        """The new keys (and reason) of this rotation: those of one begun and cut short (a
        kill, Ctrl-C, the own mailbox unreachable) after its statement or notices may have
        gone out, else new ones, kept in the cache (ROTATING) before anything is published.
        Drawn afresh at each try, a rotation cut short after notifying some contacts left
        them pinned to keys nobody held: their messages unreadable, and this identity's
        refused as from a key rotated away from."""
        raw = self.cache.get_state(ROTATING)
        if raw is not None:
            begun = json.loads(raw)
            new = Identity(bytes.fromhex(begun["seeds"]))
            if new.fingerprint != self.fingerprint:  # (else: adopted, the mark left behind)
                log.warning("finishing the rotation begun before, to %s (its reason kept)",
                            new.fingerprint.hex()[:16])  # fmt: skip
                return new, str(begun["reason"])
        new = Identity.generate()
        begun = {"seeds": new.seeds().hex(), "reason": reason}
        self.cache.set_state(ROTATING, json.dumps(begun).encode())
        return new, reason

    def rotation_cut_short(self) -> bool:
        """Was a `rotate` begun here and not finished (run it again to finish it)?"""
        raw = self.cache.get_state(ROTATING)
        if raw is None:
            return False
        return Identity(bytes.fromhex(json.loads(raw)["seeds"])).fingerprint != self.fingerprint

    def _adopt(
        self, new: Identity, *, name_move: bytes | None = None, asked_here: bool = False
    ) -> None:
        """Switch this device to ``new``: the old identity is kept (in the cache) to drain
        its mailbox; cache and key file move to the new keys; the new mailbox starts from
        no cursors. ``asked_here``: the user rotated on this device (`dna identity rotate`
        says so itself: an informational line); else another device did, a warning (a
        rotation the user did not make there is someone else holding the keys)."""
        if self.save_identity is None:
            raise DnaError("this device cannot change identity: no key file to write")
        old = self.identity
        retired = json.loads(self.cache.get_state(RETIRED) or b"[]")
        retired.append({"seeds": old.seeds().hex(), "until_ms": now_ms() + RETIRED_GRACE_MS,
                        "cursors": _hex_map(self.cache.cursors())})  # fmt: skip
        with self.cache.transaction():
            self.cache.set_state(RETIRED, json.dumps(retired).encode())
            self.cache.claim_untagged_blobs(old.fingerprint)
            self.cache.clear_cursors()
            if name_move is not None:
                self.cache.set_state(NAME_MOVE, name_move)
        self.save_identity(new, lambda: self.cache.rekey(cache_key(new, self.device.device_id)))
        self.identity = new
        self._retired_mail[old.fingerprint] = self.mail  # closed when its grace period ends
        self.mail = MailboxClient(self.node, pow_bits=self.pow_bits, sessions=self.sessions)
        if asked_here:
            log.info("identity rotated: %s -> %s", old.fingerprint.hex()[:16],
                     new.fingerprint.hex()[:16])  # fmt: skip
        else:
            log.warning("another device of yours rotated this identity: %s -> %s (this device"
                        " follows)", old.fingerprint.hex()[:16],
                        new.fingerprint.hex()[:16])  # fmt: skip

    def _name_move_to(self, old: Identity, new: Identity) -> bytes | None:
        """The old keys' signature handing the published name over to ``new`` (None
        without a name, or where another device publishes this identity)."""
        raw = self.cache.get_state(PUBLISHED)
        last = json.loads(raw) if raw else None
        if last is None or last["name"] is None:
            return None
        return json.dumps({
            "name": normalize_name(last["name"]), "from": old.fingerprint.hex(),
            "signature": keyserver.name_move_signature(old, last["name"], new.fingerprint).hex(),
        }).encode()  # fmt: skip

    async def _publish_after_rotation(self) -> None:
        """The new identity record, and the name moved to it: the claim carries the old
        keys' signature (NAME_MOVE, saved by `_adopt`), which replaces the old claim."""
        raw = self.cache.get_state(PUBLISHED)
        if raw is None:
            return  # another device publishes this identity
        last = json.loads(raw)
        await self.publish(last["display_name"], last["name"])

    def retired(self) -> list[Identity]:
        """Identities this one rotated away from, still inside their grace period."""
        entries = json.loads(self.cache.get_state(RETIRED) or b"[]")
        live = [e for e in entries if e["until_ms"] > now_ms()]
        if len(live) < len(entries):  # past the grace period: forget the old keys
            # ... and what served only their mailbox, in one transaction: a crash part way
            # keeps the old keys' entry, so the next call does it all again (before, the
            # keys went first and a crash left their deferred blobs for good)
            with self.cache.transaction():
                self.cache.set_state(RETIRED, json.dumps(live).encode())
                for gone in (e for e in entries if e not in live):
                    self.cache.forget_mailbox(Identity(bytes.fromhex(gone["seeds"])).fingerprint)
        return [Identity(bytes.fromhex(e["seeds"])) for e in live]

    async def _close_retired_mail(self) -> None:
        """Close the mailbox clients of the identities whose grace period ended (`retired`
        forgets them, whoever called it first). Before, they stayed open until the peer
        closed: a `dna watch` running across rotations kept each one's sessions for good."""
        live = {old.fingerprint for old in self.retired()}
        for fingerprint in [fp for fp in self._retired_mail if fp not in live]:
            mail = self._retired_mail.pop(fingerprint)
            await mail.drain()
            await mail.close()

    async def _drain_retired(self, old: Identity) -> SyncReport:
        """Read what still arrives at an old mailbox. Nothing is deleted there: the blobs
        expire with their TTL, within the grace period."""
        entries = json.loads(self.cache.get_state(RETIRED) or b"[]")
        entry = next(e for e in entries if e["seeds"] == old.seeds().hex())

        def save(state: FetchState) -> None:
            entry["cursors"] = _hex_map(state.cursors)
            self.cache.set_state(RETIRED, json.dumps(entries).encode())

        inbox = self._inbox(old)
        await self._read_mailbox(inbox, FetchState(cursors=_unhex_map(entry["cursors"])), save)
        await self._send_receipts(inbox.report.receipts_due)
        return inbox.report

    async def _read_mailbox(
        self,
        inbox: Inbox,
        state: FetchState,
        save: Callable[[FetchState], None],
        progress: Progress | None = None,
        pushed: Subscription | None = None,
    ) -> None:
        """Fetch the inbox's mailbox from ``state`` round after round (a fetch holds a
        bounded number of bytes: a big mailbox takes several), handing each blob to the
        inbox and saving the cursors after each round; with ``pushed``, one round of what
        the subscription received instead (its cursors are where it got to).

        The new blobs are handled without any lookup: a sender that needs one (unknown,
        no keys inside) is deferred, and the deferred blobs are handled last, their
        senders looked up within the round's budget (`Inbox.retry_deferred`), so a
        flood of such envelopes never delays a contact's message by its lookups."""
        if pushed is not None:
            blobs = pushed.take()
            for stored in blobs:
                trace.mark("peer.taken", stored.blob_id)
            for i, stored in enumerate(blobs, 1):
                await inbox.handle_blob(stored.blob_id, stored.blob, look_up=False,
                                        returned_by=pushed.sources.get(stored.blob_id))  # fmt: skip
                if progress:
                    progress(i, len(blobs))
                trace.mark("peer.progress", stored.blob_id)
            # With no blobs (only the other replicas' copies of blobs handled already) and
            # no deferred one handled: no commit; the next round that handles one saves.
            if await inbox.retry_deferred() or blobs:
                save(FetchState(cursors=state.cursors | pushed.cursors))
            return
        done = 0
        while True:
            blobs, state = await self.mail.fetch(inbox.identity, state)
            for i, stored in enumerate(blobs, 1):
                await inbox.handle_blob(stored.blob_id, stored.blob, look_up=False,
                                        returned_by=state.sources.get(stored.blob_id))  # fmt: skip
                if progress:
                    progress(done + i, done + len(blobs))
            done += len(blobs)
            save(state)
            if not state.more:
                break
        if await inbox.retry_deferred():
            save(state)

    async def _post_acks(self, blob_ids: list[bytes]) -> None:
        """Tell the other devices which blobs this one holds (it noted them itself when it
        handled them)."""
        if blob_ids and self._has_other_devices():
            for batch in _batches(blob_ids, ACK_BATCH_IDS):
                ack = envelope_pb2.DeviceAck(device_id=self.device.device_id, blob_ids=batch)
                await self.post_to_devices(envelope_pb2.Payload(ack=ack))

    async def _clean_up(self) -> tuple[int, str | None]:
        """Signed deletes for what every device holds; returns how many blobs were
        deleted, and why the storage nodes refused the rest if they did.

        A device that lost its cache also lost the list of devices, so it deletes
        nothing until another device's history told it the list again, or a week
        passed with no answer (an identity with one device).
        """
        self._drop_unused_offers()
        recovering_since = self.cache.get_state(RECOVERING)
        if recovering_since is not None:
            if now_ms() - int(recovering_since) < RECOVERY_WAIT_MS:
                return 0, None
            log.warning("no other device answered in a week: assuming this one is alone")
            self.cache.clear_state(RECOVERING)
        deletable = self.cache.deletable_blobs(now_ms())
        if not deletable or time.monotonic() < self._deletes_refused_until:
            return 0, None
        result = await self._delete(deletable)
        if not result.refusals:
            return len(result.deleted), None
        self._deletes_refused_until = time.monotonic() + DELETE_RETRY_S
        error = (
            f"storage nodes refused to delete {len(deletable) - len(result.deleted)} blobs"
            f" from your mailbox ({'; '.join(result.refusals)}); they stay, and count"
            " against its quota, until a delete is accepted"
        )
        log.warning("%s", error)
        return len(result.deleted), error

    async def _delete(self, blob_ids: list[bytes]) -> DeleteResult:
        """Delete held blobs from the own mailbox, and note the deleted ones. A blob that
        verified here (it opened: a real envelope for this mailbox) is deleted on every
        candidate node; one that did not (rejected, or deferred unopened) only on the nodes
        that returned it (`Cache.unverified_blobs`), and nowhere when they are not known: a
        hostile replica makes such blobs up for free, and their deletes everywhere made the
        honest replicas store tombstones for IDs they never held, charged to the owner's
        delete rate and to the mailbox's tombstone bound, until the owner's real deletes
        were refused (docs/storage.md "Deletes"). Refusals of those deletes are logged, not
        the owner's error: a hostile node refusing them must not hold back the clean-up
        (`DELETE_RETRY_S`)."""
        unverified = self.cache.unverified_blobs(blob_ids)
        by_nodes: dict[frozenset[bytes], list[bytes]] = {}
        for blob, nodes in unverified.items():
            by_nodes.setdefault(nodes, []).append(blob)
        verified = [b for b in blob_ids if b not in unverified]
        result = await self.mail.delete(self.identity, verified) if verified else DeleteResult()
        self.cache.mark_deleted(result.deleted)
        self.cache.mark_deleted(by_nodes.pop(frozenset(), []))  # expire on their nodes
        for nodes, blobs in by_nodes.items():
            done = await self.mail.delete(self.identity, blobs, at=nodes)
            self.cache.mark_deleted(done.deleted)
            result.deleted += done.deleted
            if done.refusals:  # their nodes' affair (a hostile one refuses): not the owner's
                log.info("storage nodes refused to delete %d blobs that did not open (%s)",
                         len(blobs), "; ".join(done.refusals))  # fmt: skip
        return result

    async def delete_used_link_offer(self) -> bool:
        """Delete the link offer this device was made from (noted in its cache with the
        profile, `link.accept_link`), so its code cannot make another device; True once
        that is done. A link cut short after the profile was written, or a delete that
        failed, is finished by the next command that syncs."""
        raw = self.cache.get_state(USED_LINK_OFFER)
        if raw is None:
            return True
        used = json.loads(raw)
        blobs = [bytes.fromhex(b) for b in used["blobs"]]
        try:
            result = await self.mail.delete(Identity(bytes.fromhex(used["seeds"])), blobs)
        except DnaError as exc:
            log.warning("the used link offer is not deleted yet (%s): until it is, or it"
                        " expires within the hour, the code still works", exc)  # fmt: skip
            return False
        if len(result.deleted) < len(blobs):
            log.warning("the used link offer is not deleted yet (%s): until it is, or it"
                        " expires within the hour, the code still works",
                        "; ".join(result.refusals) or "too few storage nodes answered")  # fmt: skip
            return False
        self.cache.clear_state(USED_LINK_OFFER)
        return True

    def _drop_unused_offers(self) -> None:
        """A cache from before `Cache.add_offered`: a link offer registered its device at
        once. One that acknowledged something came; one that did not within OFFER_UNUSED_MS
        never came (the code expired unused) and is dropped: deletes waited for its
        acknowledgements forever, so the mailbox filled up."""
        raw = self.cache.get_state(OFFERED)
        if raw is None:
            return
        offered = json.loads(raw)
        for hex_id, offered_ms in list(offered.items()):
            device_id = bytes.fromhex(hex_id)
            if self.cache.acked_by(device_id):
                del offered[hex_id]  # it came: a device like any other from now on
            elif now_ms() - offered_ms >= OFFER_UNUSED_MS:
                log.info("device %s was offered a link that nobody used: not waited for",
                         hex_id[:8])  # fmt: skip
                self.cache.remove_device(device_id)
                del offered[hex_id]
        if offered:
            self.cache.set_state(OFFERED, json.dumps(offered).encode())
        else:
            self.cache.clear_state(OFFERED)

    async def watch(
        self,
        on_report: Callable[[SyncReport], None],
        interval: float = 1.0,
        on_network: Callable[[str], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Receive forever (until cancelled), reporting each round that brought something
        (``progress`` hears each blob as it is handled, before the round's receipts and
        deletes).

        After a sync (which catches up from the saved cursors) the device subscribes to its
        mailbox on the replicas: they push new blobs as they store them, and a round
        handles what arrived, with no fetch. A replica whose subscription dropped (a
        restart) is resubscribed from its cursor, so nothing is missed or handled twice;
        when none takes it (an outage, or nodes serving no sessions) the watch falls back
        to syncing every ``interval``, and a full sync runs every ``WATCH_FULL_SYNC_S``
        regardless (it also drains a mailbox rotated away from).

        What pushed blobs owe (receipts, acknowledgements, deletes: puts and signed calls
        of their own) is settled in the background, one settling at a time, so the next
        pushed message is handled at once instead of waiting behind them.

        A failed sync means the network (or the way to it) is down: ``on_network`` hears
        it once when it goes and once when it comes back, and meanwhile the overlay is
        rejoined through the seeds before each retry, since an outage longer than a few
        lookups empties the routing table and nothing else would ever refill it. Back, a
        device on the direct path republishes its presence record at once."""
        down_since: float | None = None
        pushed: Subscription | None = None
        synced_at = 0.0
        settler = Settler(self._settle)
        try:
            while True:
                try:
                    if pushed is None or time.monotonic() - synced_at >= WATCH_FULL_SYNC_S:
                        report = await self.sync(progress)
                        synced_at = time.monotonic()
                        pushed = await self.subscribe(pushed)
                    else:
                        identity = self.identity
                        report = await self.receive_pushed(
                            pushed, interval, progress, settle=settler.add
                        )
                        if self.identity is not identity:  # rotated: subscribe anew
                            await _unsubscribe(pushed)
                            pushed = None
                except DnaError as exc:  # the network comes and goes
                    await _unsubscribe(pushed)
                    pushed = None
                    self._checked_ms = 0  # back online: look for the own records at once
                    if down_since is None:
                        down_since = time.monotonic()
                        _tell(on_network, f"network unreachable ({exc}); retrying")
                    log.info("sync failed, retrying in %.0f s: %s", WATCH_BACKOFF_S, exc)
                    await asyncio.sleep(WATCH_BACKOFF_S)
                    await self.reconnect()
                    continue
                if down_since is not None:
                    _tell(on_network, f"network back after {time.monotonic() - down_since:.0f} s")
                    down_since = None
                    self._republish_presence()
                if report.new_messages or report.receipts:
                    on_report(report)
                if pushed is None:
                    await asyncio.sleep(interval)
        finally:
            await settler.close()
            await _unsubscribe(pushed)

    def _republish_presence(self) -> None:
        """Back online: the presence record (refreshed every minute, its puts failing
        meanwhile) is signed and put now, on a listener gathered anew if the outage took the
        addresses or the TURN allocation, not at the next refresh up to a minute later,
        while contacts found the device offline or dialled where it no longer is."""
        if self.direct is not None and self.direct.listening:
            self.direct.republish()

    async def subscribe(self, old: Subscription | None = None) -> Subscription | None:
        """A subscription to the own mailbox from the saved cursors (ending ``old``), or
        None when no replica takes one (then poll with `sync`). `receive_pushed` handles
        what it brings."""
        await _unsubscribe(old)
        try:
            return await self.mail.subscribe(self.identity, FetchState(self.cache.cursors()))
        except DnaError as exc:
            log.info("no subscription, polling: %s", exc)
            return None

    async def receive_pushed(
        self,
        pushed: Subscription,
        wait_s: float,
        progress: Progress | None = None,
        *,
        settle: Callable[[SyncReport], None] | None = None,
    ) -> SyncReport:
        """One round of push: wait up to ``wait_s`` for blobs, resubscribe the replicas
        that dropped, and handle what arrived as a sync would (acknowledge, receipt,
        clean up; with ``settle``, that is handed to it instead of done here).
        `UnreachableError` when no replica's subscription is live."""
        identity = self.identity
        await pushed.wait(wait_s)
        if pushed.dropped() and len(await self.mail.resubscribe(identity, pushed)) == len(
            pushed.feeds
        ):
            raise UnreachableError("no replica of the mailbox takes the subscription")
        await self.daily_upkeep()
        if settle is None:
            report = await self._sync_own(progress, pushed)
        else:
            report = await self._receive_own(progress, pushed)
            settle(report)
        if report.rotated_to is not None:  # the next round syncs and subscribes anew
            self._adopt(report.rotated_to)
            _merge(report, await self._sync_own(progress))
        return report

    async def _rejoin(self) -> bool:
        """`reconnect`, unless done within ``REJOIN_EVERY_S``: a device that stayed up
        through an outage of the network has an empty routing table (every node failed
        its checks), and its lookups find no storage node until it asks the seeds again.
        True if it rejoined."""
        if time.monotonic() - self._rejoined_at < REJOIN_EVERY_S:
            return False
        self._rejoined_at = time.monotonic()
        return await self.reconnect()

    async def reconnect(self) -> bool:
        """Rejoin the overlay through the seeds, with fresh connections: after an outage
        the routing table may be empty (every node failed its checks), the cached replica
        sets name nodes that may have moved, and gRPC channels that failed sit in their
        reconnect backoff (up to two minutes) refusing calls. True if a seed answered."""
        self.mail.replica_sets.clear()
        await self.node.channels.reset()  # the pool opens new channels on the next call
        addrs, _ = await resolve_seeds(self.seeds, seed_family(self.seeds))
        if not addrs or not await self.node.join(addrs):
            return False
        await self.node.refresh(0)
        return True

    # -- history, for a newly linked device --------------------------------------------

    async def announce(self, *, wants_history: bool = False) -> None:
        """Tell the other devices about this one (and, after a lost cache, ask for history)."""
        hello = envelope_pb2.DeviceHello(device_id=self.device.device_id,
                                         device_name=self.device.name,
                                         wants_history=wants_history)  # fmt: skip
        await self.post_to_devices(envelope_pb2.Payload(device=hello))

    async def send_history(self) -> int:
        """Post the whole cache (messages, read state, contacts) to the own mailbox."""
        posted = 0
        for chunk in history_chunks(self.cache, self.fingerprint):  # one in memory at a time
            await self.post_to_devices(envelope_pb2.Payload(history=chunk))
            posted += 1
        return posted


@dataclass(frozen=True)
class _Sent:
    envelope: bytes
    stored_on: int


def _tell(listener: Callable[[str], None] | None, text: str) -> None:
    log.info("%s", text)
    if listener is not None:
        listener(text)


def _merge(into: SyncReport, more: SyncReport) -> None:
    into.new_messages += more.new_messages
    into.receipts += more.receipts
    into.rejected += more.rejected
    into.deferred += more.deferred
    into.unpinned_rotations += more.unpinned_rotations
    into.deleted += more.deleted
    into.cleanup_error = into.cleanup_error or more.cleanup_error


def _hex_map(cursors: dict[bytes, bytes]) -> dict[str, str]:
    return {k.hex(): v.hex() for k, v in cursors.items()}


def _unhex_map(cursors: dict[str, str]) -> dict[bytes, bytes]:
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in cursors.items()}


def _text_payload(body: str) -> bytes:
    return envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()


def find_contact(cache: Cache, query: str) -> Contact:
    """A pinned contact by name (written any way that normalizes to it), fingerprint or
    fingerprint prefix (hex, at least 8 digits); from the cache alone."""
    found = cache.contact_named(_as_name(query))
    if found is not None:
        return found
    fingerprint = _pinned_prefix(cache, query, 8)
    found = cache.contact(fingerprint) if fingerprint else None
    if found is not None:
        return found
    if _is_own_name(cache, query):  # `contacts add` refuses it: do not send the user there
        raise UnknownContactError(f"{query!r} is you: your own devices sync through `dna sync`")
    raise UnknownContactError(f"no contact {query!r}: add one with `dna contacts add NAME`")


def _is_own_name(cache: Cache, query: str) -> bool:
    """Whether ``query`` is the name this identity last published (from the cache)."""
    raw = cache.get_state(PUBLISHED)
    name = json.loads(raw).get("name") if raw else None
    return name is not None and name == _as_name(query)


def _pinned_prefix(cache: Cache, query: str, shortest: int) -> bytes | None:
    """The one pinned contact whose fingerprint starts with ``query`` (hex, any case, at
    least ``shortest`` digits), else None."""
    prefix = query.strip().lower()
    if not shortest <= len(prefix) <= 64 or prefix.strip("0123456789abcdef"):
        return None
    matches = [c for c in cache.contacts() if c.fingerprint.hex().startswith(prefix)]
    return matches[0].fingerprint if len(matches) == 1 else None


def _as_name(query: str) -> str:
    """How a pinned contact's name is written (NFKC-casefolded), or the query as it is."""
    try:
        return normalize_name(query)
    except MalformedError:
        return query


def _contact_name(query: str) -> str:
    """``query`` as a name to look up; what is neither a name nor a fingerprint is refused
    saying so (a fingerprint one digit short is not "a bad name")."""
    try:
        return normalize_name(query)
    except MalformedError as exc:
        digits = query.strip()
        if digits and not digits.lower().strip("0123456789abcdef"):  # all hex: too long a name
            raise MalformedError(f"a fingerprint has 64 hex digits, this one {len(digits)}"
                                 ) from None  # fmt: skip
        raise MalformedError(f"{query!r} is neither a name nor a fingerprint (64 hex digits):"
                             f" a {exc}") from None  # fmt: skip


def _parse_fingerprint(query: str) -> bytes | None:
    if len(query) == 64:
        try:
            return bytes.fromhex(query)
        except ValueError:
            return None
    return None


def _contact_card(contact: Contact) -> envelope_pb2.ContactCard:
    return envelope_pb2.ContactCard(keys=contact.keys.to_proto(), name=contact.name or "",
                                    verified=contact.verified)  # fmt: skip


def history_chunks(cache: Cache, own: bytes) -> Iterator[envelope_pb2.History]:
    """The cache as History payloads of at most ``HISTORY_CHUNK_BYTES`` each: the device
    list first (it lets the receiver delete again), then contacts (3.2 KB of keys each),
    read state and messages, each list split wherever a chunk fills. Made as they are
    taken, the messages read from the cache as they go: a history of any length is posted
    in the memory of one chunk."""
    chunk = envelope_pb2.History(devices=[
        envelope_pb2.DeviceHello(device_id=d, device_name=name)
        for d, name in cache.devices().items()
    ])  # fmt: skip
    size = chunk.ByteSize()
    for field_name, item in _history_items(cache, own):
        item_size = item.ByteSize() + LIST_ITEM_OVERHEAD
        if size and size + item_size > HISTORY_CHUNK_BYTES:
            yield chunk
            chunk, size = envelope_pb2.History(), 0
        getattr(chunk, field_name).append(item)
        size += item_size
    yield chunk


def _history_items(cache: Cache, own: bytes) -> Iterator[tuple[str, Any]]:
    """(History field, item) for every contact, read marker and message, in that order."""
    for c in cache.contacts():
        yield "contacts", _contact_card(c)
    for conv, ms in cache.read_state().items():
        yield "read", envelope_pb2.ReadMarker(conversation_id=conv, read_up_to_ms=ms)
    for msg in cache.iter_messages():  # all of them, oldest first, streamed
        yield "messages", envelope_pb2.SyncTranscript(
            original_recipient=msg.recipient, original_message_id=msg.message_id,
            original_timestamp_ms=msg.timestamp_ms,
            payload=envelope_pb2.Payload(text=envelope_pb2.Text(
                body=msg.body, conversation_id=msg.conversation)).SerializeToString(),
            original_sender=b"" if msg.sender == own else msg.sender,
        )  # fmt: skip


def _batches(items: Sequence[bytes], size: int) -> list[list[bytes]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


async def open_peer(
    profile: Profile,
    passphrase: str,
    seeds: list[tuple[str, int]],
    *,
    pow_bits: int = 12,
    sessions: bool = True,
    check: Callable[[Cache], object] | None = None,
    max_strangers: int = MAX_STRANGERS,
) -> Peer:
    """Unlock the profile's identity and cache, run ``check`` on the cache (what can be
    refused from this device's data alone, such as an unknown contact, is refused before
    any wait for the network), and join the overlay. ``max_strangers``: `Peer.max_strangers`
    (`dna`: $DNA_MAX_STRANGERS)."""
    check_max_strangers(max_strangers)  # before the passphrase is tried or the network joined
    identity = profile.unlock(passphrase)
    cache = profile.open_cache(identity)
    try:
        if check is not None:
            check(cache)
        node = await join_overlay(seeds)
    except BaseException:
        cache.close()
        raise
    peer = Peer(identity, cache, node, profile.device(), pow_bits, seeds, sessions, max_strangers)
    peer.save_identity = lambda new, rekey: profile.replace_identity(new, passphrase, rekey)
    if cache.get_state(HISTORY_WANTED) is not None:  # a lost cache (Profile.open_cache):
        try:  # the other devices post their history; unsent, it is asked at the next open
            await peer.announce(wants_history=True)
        except BaseException:
            await peer.close()
            raise
        cache.clear_state(HISTORY_WANTED)
    return peer


async def _unsubscribe(pushed: Subscription | None) -> None:
    """End a watch's subscription (best effort: its sessions may be gone already)."""
    if pushed is not None:
        await pushed.close()
