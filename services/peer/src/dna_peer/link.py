"""Linking a new device with a one-time code.

The existing device makes a random 80-bit code and derives from it (Argon2id,
memory-hard, so guessing codes is slow) a throwaway identity. It seals a
DeviceLink (the identity, locked under the code, and the new device's ID) to
that throwaway identity, signed by the real identity with its keys inside, and
puts it in the throwaway identity's mailbox for an hour. The new device derives
the same throwaway identity from the typed code, fetches and opens the
envelope, checks that the identity inside is the one that signed it, deletes
the blob, starts with that identity and says hello to the other devices: from
then on it is one of the identity's devices. The existing device posts its history
to the own mailbox and tells the other devices of the offer, so the new device
converges and deletions wait for its acknowledgements while the code may be used;
a code never used leaves no device behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from dna_core.crypto import Identity, ReplayGuard, keystore, open_envelope, seal
from dna_core.crypto import primitives as p
from dna_core.crypto.keys import SEEDS_SIZE
from dna_core.errors import DnaError, ProtocolError, VerificationError
from dna_core.mailbox import MailboxClient
from dna_core.wire import envelope_pb2

from dna_peer.cache import OFFER_HOLD_MS, Cache
from dna_peer.inbox import MAX_STRANGERS
from dna_peer.keyserver import now_ms
from dna_peer.network import join_overlay
from dna_peer.payloads import DeviceLink, decode_payload
from dna_peer.peer import USED_LINK_OFFER, Peer, check_max_strangers
from dna_peer.profile import DEVICE_ID_SIZE, Device, Profile

CODE_BYTES = 10  # 80 bits, 16 base32 characters
LINK_TTL_S = 3600
# The offer is on its replicas before the code is shown (the put waits for all of them), so
# a code that finds nothing for a few seconds is wrong, used or expired: no minute-long wait.
LINK_WAIT_S = 10.0
MAX_LINK_PAYLOAD = 256 * 1024  # an offer is a few KB: the locked identity and the device list


class LinkError(DnaError):
    """The code found no link offer, or the offer did not check out."""


@dataclass(frozen=True)
class LinkOffer:
    code: str
    device_id: bytes
    history_chunks: int


def new_code() -> str:
    raw = base64.b32encode(os.urandom(CODE_BYTES)).decode()
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


_BASE32 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")  # RFC 4648: no 0, 1, 8, 9


def normalize_code(code: str) -> str:
    """The 16 characters of a typed code (dashes, spaces and case do not matter); a code
    that cannot be one is refused at once, before any network wait, saying what is wrong."""
    norm = code.replace("-", "").replace(" ", "").upper()
    if len(norm) != CODE_BYTES * 8 // 5:
        raise LinkError("a link code has 16 letters and digits, like ABCD-EFGH-IJKL-MNOP")
    wrong = sorted(set(norm) - _BASE32)
    if wrong:
        raise LinkError(f"a link code has only the letters A-Z and the digits 2-7 (no 0, 1,"
                        f" 8 or 9), not {', '.join(repr(c) for c in wrong)}")  # fmt: skip
    return norm


def link_identity(code: str) -> Identity:
    """The throwaway identity both devices derive from the code."""
    norm = normalize_code(code)
    stretched = keystore.KdfParams().derive(norm, p.sha256(p.label("device-link"))[:16])
    seeds = HKDFExpand(hashes.SHA256(), SEEDS_SIZE, info=p.label("link-identity"))
    return Identity(seeds.derive(stretched))


async def offer_link(peer: Peer, device_name: str) -> LinkOffer:
    """On the existing device: publish a link offer and return its code."""
    code = new_code()
    temp = link_identity(code)
    device_id = os.urandom(DEVICE_ID_SIZE)
    devices = {**peer.cache.devices(), device_id: device_name}
    link = envelope_pb2.DeviceLink(
        encrypted_identity=keystore.lock(peer.identity, code),
        device_name=device_name,
        device_id=device_id,
        devices=[envelope_pb2.DeviceHello(device_id=d, device_name=name)
                 for d, name in devices.items()],
    )  # fmt: skip
    envelope = seal(peer.identity, temp.public, envelope_pb2.Payload(link=link).SerializeToString(),
                    now_ms=now_ms(), include_sender_keys=True)  # fmt: skip
    await peer.mail.put(temp.fingerprint, envelope, ttl_s=LINK_TTL_S)
    # Not a device until it says hello (accept_link): until then only waited for by deletes,
    # here and (the hello below) on the other devices, for as long as the code may be used.
    until = now_ms() + OFFER_HOLD_MS
    peer.cache.add_offered(device_id, until, now_ms())
    await peer.announce()
    hello = envelope_pb2.DeviceHello(device_id=device_id, device_name=device_name,
                                     offered_until_ms=until)  # fmt: skip
    await peer.post_to_devices(envelope_pb2.Payload(device=hello))
    chunks = await peer.send_history()
    return LinkOffer(code, device_id, chunks)


async def accept_link(
    profile: Profile,
    code: str,
    passphrase: str | Callable[[], str],
    seeds: list[tuple[str, int]],
    *,
    timeout: float = LINK_WAIT_S,
    pow_bits: int = 12,
    max_strangers: int = MAX_STRANGERS,
) -> Peer:
    """On the new device: fetch the offer, check it, and create the profile from it.

    ``passphrase`` (for the new profile) may be a function: it is asked only once an
    offer was found, so a wrong or used code fails before anyone types a passphrase.
    ``max_strangers``: `Peer.max_strangers`."""
    check_max_strangers(max_strangers)
    profile.ensure_absent()  # not after a minute of waiting for the offer
    temp = link_identity(code)
    node = await join_overlay(seeds)
    try:
        mail = MailboxClient(node, pow_bits=pow_bits)
        try:
            link, identity, blob_ids = await _receive_offer(mail, temp, code, timeout)
        finally:  # its sessions: the peer made below has its own client
            await mail.close()
        secret = passphrase() if callable(passphrase) else passphrase

        def known_devices(cache: Cache) -> None:  # before the key file: all or nothing
            for known in link.devices:
                cache.add_device(known.device_id, known.device_name, now_ms())
            used = {"seeds": temp.seeds().hex(), "blobs": [b.hex() for b in blob_ids]}
            cache.set_state(USED_LINK_OFFER, json.dumps(used).encode())  # deleted next

        # The profile first, the offer deleted after: a failure or a kill in between leaves
        # the offer for the next try (a profile cut short is cleared by it), never neither.
        device = profile.create(identity, secret, Device(link.device_id, link.device_name),
                                known_devices)  # fmt: skip
        peer = Peer(identity, profile.open_cache(identity), node, device, pow_bits, seeds,
                    max_strangers=max_strangers)  # fmt: skip
        peer.save_identity = lambda new, rekey: profile.replace_identity(new, secret, rekey)
    except BaseException:
        await node.stop()
        raise
    # The device is linked already: a delete that fails is a warning, and the next sync
    # tries again (Peer.delete_used_link_offer); the offer expires within the hour anyway.
    await peer.delete_used_link_offer()
    await peer.announce()
    return peer


async def _receive_offer(
    mail: MailboxClient, temp: Identity, code: str, timeout: float
) -> tuple[DeviceLink, Identity, list[bytes]]:
    deadline = time.monotonic() + timeout
    while True:
        blobs, _ = await mail.fetch(temp)
        for stored in blobs:
            try:
                return (*_open_offer(stored.blob, temp, code), [b.blob_id for b in blobs])
            except ProtocolError:
                continue  # not a valid offer (garbage in the mailbox): keep looking
        if time.monotonic() > deadline:
            raise LinkError(
                "no link offer found for this code: mistyped, already used, or older than"
                " an hour (run `dna identity link` on your other device for a new one)"
            )
        await asyncio.sleep(1.0)


def _open_offer(blob: bytes, temp: Identity, code: str) -> tuple[DeviceLink, Identity]:
    opened = open_envelope(blob, temp, now_ms=now_ms(), replay_guard=ReplayGuard())
    link = decode_payload(opened.payload, max_size=MAX_LINK_PAYLOAD, what="link payload")
    if not isinstance(link, DeviceLink) or len(link.device_id) != DEVICE_ID_SIZE:
        raise VerificationError("link: not a device link")
    try:
        identity = keystore.unlock(link.encrypted_identity, code)
    except DnaError as exc:
        raise VerificationError(f"link: identity does not unlock with the code: {exc}") from None
    if identity.public != opened.sender:
        raise VerificationError("link: the identity inside is not the one that signed the offer")
    return link, identity
