"""The direct channel between two identities over a datagram path (sans-I/O).

Handshake (the ICE controlling side, which dials, is the initiator I; the other is R):

    HELLO   I -> R: version | fp(I) | fp(R) | nonce_I | eph(I) | KEM(R static) | sig(I)
    WELCOME R -> I: version | nonce_R | KEM(I static) | KEM(eph(I)) | sig(R)

``eph(I)`` is a fresh hybrid key set (ML-KEM-768 + X25519) made for this session and
forgotten once it is established, so the session keys are forward secret; the two static
encapsulations bind both identities' KEM keys; each side signs the transcript (hybrid
ML-DSA-65 + Ed25519) with its identity. Only pinned keys count: a HELLO from a
fingerprint the responder has not pinned, or a WELCOME not signed by the key the
initiator pinned, is refused with the reason logged. The session keys are HKDF over the
three KEM secrets, salted and bound to the transcript hash, one key per direction.

After the handshake every unit is a record: ``counter (8) | AES-256-GCM(frame)`` with
the counter as nonce and associated data. A counter seen before is a replay and is
refused (logged); a sender that retransmits seals the frame again under a new counter.
Frames are MESSAGE (message ID, payload: a sealed envelope), ACK (message ID) and
CLOSE (no ID: the other end is leaving, so messages to it go by store-and-forward at
once instead of after a retransmission timeout). A MESSAGE is handed up as `Received`
and acknowledged only once the owner says it stored it (`stored`); a message ID stored
already is acknowledged again but not handed up twice. A CLOSE is authenticated like
any record, so only the other end can end the link.

Nothing here does I/O: ``receive`` takes a datagram and returns what to send and what
happened; the asyncio adapter (`dna_peer.direct.link`) moves the bytes and keeps time.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dna_core.crypto import Identity, PublicKeySet, kem, signature
from dna_core.crypto import primitives as p
from dna_core.errors import MalformedError, ProtocolError, ReplayError, VerificationError

from dna_peer.direct.frames import HELLO, RECORD, WELCOME, Reassembler, fragment

log = logging.getLogger("dna.peer.direct")
VERSION = 1
NONCE = 16
KEYSET = 2 + p.ML_DSA_65_PUBLIC + p.ED25519_PUBLIC + p.ML_KEM_768_PUBLIC + p.X25519_PUBLIC
KEM_CT = p.ML_KEM_768_CIPHERTEXT + p.X25519_PUBLIC
SIG = p.HYBRID_SIGNATURE_SIZE
HELLO_BODY = 1 + 32 + 32 + NONCE + KEYSET + KEM_CT
WELCOME_BODY = 1 + NONCE + 2 * KEM_CT
HELLO_DOMAIN, WELCOME_DOMAIN = b"direct-hello", b"direct-welcome"
_SESSION_SALT = p.label("direct-session")
MESSAGE, ACK, CLOSE = 1, 2, 3
REPLAY_WINDOW = 4096  # counters remembered below the highest seen
SEEN_IDS = 4096  # message IDs remembered to acknowledge duplicates without handing them up
LOGGED_REFUSALS = 8  # refused inputs logged per channel; the rest are only counted
_COUNTER = struct.Struct(">Q")


@dataclass(frozen=True)
class Established:
    peer: PublicKeySet


@dataclass(frozen=True)
class Received:
    message_id: bytes
    payload: bytes


@dataclass(frozen=True)
class Delivered:
    message_id: bytes


@dataclass(frozen=True)
class Closed:
    """The other end closed the link (its authenticated CLOSE)."""


@dataclass(frozen=True)
class Refused:
    reason: str


Event = Established | Received | Delivered | Closed | Refused


@dataclass
class Step:
    """What one datagram caused: datagrams to send back, and events for the owner."""

    send: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


Pinned = Callable[[bytes], PublicKeySet | None]  # fingerprint -> the pinned key set


class Channel:
    """One session with one peer. Make it with `initiate` or `respond`."""

    def __init__(self, identity: Identity, pinned: Pinned, peer: PublicKeySet | None) -> None:
        self.identity, self.pinned, self.peer = identity, pinned, peer
        self.established = False
        self._frames = Reassembler()
        self._ephemeral: Identity | None = None
        self._hello: bytes | None = None
        self._welcome: list[bytes] = []  # the responder's answer, sent again to a repeated HELLO
        self._send_key = self._recv_key = b""
        self._next_counter = 0
        self._highest = -1
        self._seen_counters: set[int] = set()
        self._seen_ids: OrderedDict[bytes, None] = OrderedDict()
        self._transfer = int.from_bytes(os.urandom(4), "big")
        self.refusals = 0  # inputs refused so far

    @classmethod
    def initiate(cls, identity: Identity, peer: PublicKeySet) -> tuple[Channel, list[bytes]]:
        """A channel to the pinned ``peer`` and the HELLO datagrams to send (again, until
        the WELCOME arrives)."""
        channel = cls(identity, lambda fp: peer if fp == peer.fingerprint else None, peer)
        return channel, channel._make_hello()

    @classmethod
    def respond(cls, identity: Identity, pinned: Pinned) -> Channel:
        """A channel that waits for a HELLO from any pinned contact."""
        return cls(identity, pinned, None)

    # -- handshake -------------------------------------------------------------------

    def _make_hello(self) -> list[bytes]:
        assert self.peer is not None
        self._ephemeral = Identity.generate()
        self._ss_static, ct_pq, ct_x = kem.encapsulate(self.peer)
        ephemeral = self._ephemeral.public.canonical()
        body = (bytes([VERSION]) + self.identity.fingerprint + self.peer.fingerprint
                + os.urandom(NONCE) + ephemeral + ct_pq + ct_x)  # fmt: skip
        self._hello = body + signature.sign(self.identity, HELLO_DOMAIN, body)
        return fragment(HELLO, self._transfer, self._hello)

    def hello_datagrams(self) -> list[bytes]:
        """The HELLO again (the initiator resends it until the WELCOME arrives)."""
        assert self._hello is not None
        return fragment(HELLO, self._transfer, self._hello)

    def _on_hello(self, transfer: int, hello: bytes) -> Step:
        if self.peer is not None and hello != self._hello:  # we dialled, or a second session
            raise VerificationError("direct: unexpected HELLO on this channel")
        if hello == self._hello and self._welcome:
            return Step(send=list(self._welcome))  # our WELCOME was lost: the same again
        if len(hello) != HELLO_BODY + SIG or hello[0] != VERSION:
            raise MalformedError("direct: HELLO of the wrong size or version")
        body, sig = hello[:HELLO_BODY], hello[HELLO_BODY:]
        sender_fp, to_fp = body[1:33], body[33:65]
        if to_fp != self.identity.fingerprint:
            raise VerificationError("direct: HELLO addressed to another identity")
        keys = self.pinned(sender_fp)
        if keys is None:
            raise VerificationError(f"direct: HELLO from unpinned key {sender_fp.hex()[:16]}…")
        signature.verify(keys, HELLO_DOMAIN, body, sig)
        at = 65 + NONCE
        ephemeral = _keys_from_canonical(body[at : at + KEYSET])
        at += KEYSET
        ss_static_r = kem.decapsulate(self.identity, body[at : at + p.ML_KEM_768_CIPHERTEXT],
                                      body[at + p.ML_KEM_768_CIPHERTEXT : at + KEM_CT])  # fmt: skip
        ss_static_i, ct1_pq, ct1_x = kem.encapsulate(keys)
        ss_eph, ct2_pq, ct2_x = kem.encapsulate(ephemeral)
        welcome = bytes([VERSION]) + os.urandom(NONCE) + ct1_pq + ct1_x + ct2_pq + ct2_x
        signed = p.sha256(hello) + welcome
        welcome += signature.sign(self.identity, WELCOME_DOMAIN, signed)
        self.peer, self._hello = keys, hello
        self._keys(ss_static_r + ss_static_i + ss_eph, hello, welcome, initiator=False)
        self._welcome = fragment(WELCOME, transfer, welcome)
        return Step(send=list(self._welcome), events=[Established(keys)])

    def _on_welcome(self, welcome: bytes) -> Step:
        if self.established:
            return Step()  # a resent WELCOME to our resent HELLO
        if self._ephemeral is None or self.peer is None or self._hello is None:
            raise VerificationError("direct: WELCOME without a HELLO of ours")
        if len(welcome) != WELCOME_BODY + SIG or welcome[0] != VERSION:
            raise MalformedError("direct: WELCOME of the wrong size or version")
        body, sig = welcome[:WELCOME_BODY], welcome[WELCOME_BODY:]
        signature.verify(self.peer, WELCOME_DOMAIN, p.sha256(self._hello) + body, sig)
        at, ml = 1 + NONCE, p.ML_KEM_768_CIPHERTEXT
        ss_static_i = kem.decapsulate(
            self.identity, body[at : at + ml], body[at + ml : at + KEM_CT]
        )
        at += KEM_CT
        ss_eph = kem.decapsulate(self._ephemeral, body[at : at + ml], body[at + ml : at + KEM_CT])
        self._keys(self._ss_static + ss_static_i + ss_eph, self._hello, welcome, initiator=True)
        self._ephemeral = None  # forward secrecy: the session keys cannot be derived again
        return Step(events=[Established(self.peer)])

    def _keys(self, secrets: bytes, hello: bytes, welcome: bytes, *, initiator: bool) -> None:
        info = p.sha256(hello, welcome)
        okm = HKDF(hashes.SHA256(), 64, salt=_SESSION_SALT, info=info).derive(secrets)
        i_to_r, r_to_i = okm[:32], okm[32:]
        self._send_key, self._recv_key = (i_to_r, r_to_i) if initiator else (r_to_i, i_to_r)
        self.established = True

    # -- records -----------------------------------------------------------------------

    def seal_message(self, message_id: bytes, payload: bytes) -> list[bytes]:
        """A MESSAGE as datagrams, under a fresh counter (call again to retransmit)."""
        return self._seal(bytes([MESSAGE, len(message_id)]) + message_id + payload)

    def seal_close(self) -> list[bytes]:
        """A CLOSE as datagrams: this end is leaving."""
        return self._seal(bytes([CLOSE, 0]))

    def _seal(self, frame: bytes) -> list[bytes]:
        if not self.established:
            raise VerificationError("direct: channel not established")
        counter = self._next_counter
        self._next_counter += 1
        head = _COUNTER.pack(counter)
        sealed = AESGCM(self._send_key).encrypt(b"\0\0\0\0" + head, frame, head)
        return fragment(RECORD, counter & 0xFFFFFFFF, head + sealed)

    def _on_record(self, record: bytes) -> Step:
        if not self.established or len(record) < _COUNTER.size + p.AES_GCM_TAG:
            raise MalformedError("direct: record before the handshake, or too short")
        head = record[: _COUNTER.size]
        (counter,) = _COUNTER.unpack(head)
        if counter in self._seen_counters or counter <= self._highest - REPLAY_WINDOW:
            raise ReplayError(f"direct: record {counter} replayed")
        try:
            frame = AESGCM(self._recv_key).decrypt(b"\0\0\0\0" + head, record[_COUNTER.size :],
                                                   head)  # fmt: skip
        except Exception:  # InvalidTag: forged, or not from this session
            raise VerificationError("direct: record does not authenticate") from None
        self._remember_counter(counter)
        return self._on_frame(frame)

    def _remember_counter(self, counter: int) -> None:
        self._seen_counters.add(counter)
        if counter > self._highest:
            self._highest = counter
            floor = counter - REPLAY_WINDOW
            self._seen_counters = {c for c in self._seen_counters if c > floor}

    def _on_frame(self, frame: bytes) -> Step:
        if len(frame) < 2 or frame[0] not in (MESSAGE, ACK, CLOSE) or len(frame) < 2 + frame[1]:
            raise MalformedError("direct: unknown or truncated frame")
        if frame[0] == CLOSE:
            return Step(events=[Closed()])
        message_id, rest = frame[2 : 2 + frame[1]], frame[2 + frame[1] :]
        if frame[0] == ACK:
            return Step(events=[Delivered(message_id)])
        if message_id in self._seen_ids:  # stored; a retransmission whose ACK was lost
            return Step(send=self._seal(bytes([ACK, len(message_id)]) + message_id))
        return Step(events=[Received(message_id, rest)])  # the ACK once it is stored

    def stored(self, message_id: bytes) -> list[bytes]:
        """The owner stored a `Received` message: the ACK datagrams to send, and the ID
        remembered, so a retransmission is acknowledged without being handed up again. A
        message the owner could not store gets no ACK, now or on a retransmission (the
        retransmission is handed up again): an ACK means stored, or the sender would
        count a message nobody kept as delivered."""
        self._seen_ids[message_id] = None
        self._seen_ids.move_to_end(message_id)
        if len(self._seen_ids) > SEEN_IDS:
            self._seen_ids.popitem(last=False)
        return self._seal(bytes([ACK, len(message_id)]) + message_id)

    # -- input -------------------------------------------------------------------------

    def receive(self, datagram: bytes) -> Step:
        """Handle one datagram. Bad input changes nothing and comes back as a `Refused`
        event, its reason logged."""
        try:
            unit = self._frames.add(datagram)
            if unit is None:
                return Step()
            if unit.kind == HELLO:
                return self._on_hello(unit.transfer, unit.data)
            if unit.kind == WELCOME:
                return self._on_welcome(unit.data)
            return self._on_record(unit.data)
        except ProtocolError as exc:
            self._log_refusal(exc.reason)
            return Step(events=[Refused(exc.reason)])

    def _log_refusal(self, reason: str) -> None:
        """The first LOGGED_REFUSALS refusals of a channel are logged, then one line says
        the rest are not: a peer sending garbage at line rate must not flood the log."""
        self.refusals += 1
        if self.refusals <= LOGGED_REFUSALS:
            log.warning("direct channel refused input: %s", reason)
        elif self.refusals == LOGGED_REFUSALS + 1:
            log.warning("direct channel refused input again (%s); further refusals on this"
                        " channel are not logged", reason)  # fmt: skip


def _keys_from_canonical(raw: bytes) -> PublicKeySet:
    """A key set from its fixed canonical layout (`PublicKeySet.canonical`)."""
    if len(raw) != KEYSET or int.from_bytes(raw[:2], "big") != p.SUITE_HYBRID_V1:
        raise MalformedError("direct: ephemeral key set of the wrong size or suite")
    a = 2 + p.ML_DSA_65_PUBLIC
    b = a + p.ED25519_PUBLIC
    c = b + p.ML_KEM_768_PUBLIC
    return PublicKeySet(raw[2:a], raw[a:b], raw[b:c], raw[c:])
