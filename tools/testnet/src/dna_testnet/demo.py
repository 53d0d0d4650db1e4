"""`dna-testnet demo`: the store-and-forward flow on a real local network.

3 bootstrap and 6 storage node processes start on 127.0.0.2-10; alice and bob
publish their identity records to the overlay keyserver; bob is offline; alice
looks bob up, seals a message and writes it to the 5 storage nodes closest to
bob's mailbox (done at 3); bob comes online, fetches from every replica,
verifies and decrypts, and deletes what he read. Every step prints its timing.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from dna_core.crypto import Identity, ReplayGuard, open_envelope, seal, sign_record
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.records import record_key
from dna_core.wire.gen.dna.v1 import common_pb2, envelope_pb2, records_pb2

from dna_testnet.network import Testnet, client_node

T = TypeVar("T")
IDENTITY = common_pb2.RECORD_KIND_IDENTITY
DEMO_POW_BITS = 12


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _step(title: str, work: Awaitable[T]) -> T:
    started = time.perf_counter()
    result = await work
    print(f"  {title:<62} {1000 * (time.perf_counter() - started):8.1f} ms", flush=True)
    return result


async def _publish(node: OverlayNode, who: Identity, name: str) -> int:
    payload = records_pb2.IdentityRecord(display_name=name).SerializeToString()
    key = record_key(IDENTITY, who.fingerprint)
    record = sign_record(
        who, kind=IDENTITY, key=key, seq=1, now_ms=_now_ms(), ttl_ms=86_400_000, payload=payload
    )
    return await node.put_record(record, key)


async def _flow(net: Testnet) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    print(f"  alice {alice.fingerprint.hex()[:24]}…  bob {bob.fingerprint.hex()[:24]}…")
    alice_node = await _step(
        "alice's device joins the overlay (client mode)", client_node(net.seeds)
    )
    bob_node = await _step("bob's device joins the overlay", client_node(net.seeds))
    stored = await _step("bob publishes his identity record", _publish(bob_node, bob, "bob"))
    print(f"    signed record held by {stored} nodes")
    await _step("bob goes offline", bob_node.stop())

    found = await _step(
        "alice looks bob up in the DHT keyserver",
        alice_node.get_record(record_key(IDENTITY, bob.fingerprint)),
    )
    assert found is not None and found.signer.fingerprint == bob.fingerprint
    print(f"    found bob's keys, fingerprint checks out: {found.signer == bob.public}")
    text = envelope_pb2.Payload(text=envelope_pb2.Text(body="Hi Bob! Sent while you were away."))
    envelope = seal(
        alice, found.signer, text.SerializeToString(), now_ms=_now_ms(), include_sender_keys=True
    )
    mail = MailboxClient(alice_node, pow_bits=DEMO_POW_BITS)
    put = await _step(
        "alice stores it on bob's mailbox replicas (W=3 of 5)", mail.put(bob.fingerprint, envelope)
    )
    replicas, bits = len(put.stored_on), put.pow_bits
    print(f"    {len(envelope)} bytes on {replicas} storage nodes, {bits}-bit proof of work")
    await alice_node.stop()

    bob_node = await _step("bob comes back online", client_node(net.seeds))
    inbox = MailboxClient(bob_node, pow_bits=DEMO_POW_BITS)
    blobs, _ = await _step("bob fetches his mailbox from every replica", inbox.fetch(bob))
    guard = ReplayGuard()
    for stored_blob in blobs:
        opened = open_envelope(stored_blob.blob, bob, now_ms=_now_ms(), replay_guard=guard)
        body = envelope_pb2.Payload.FromString(opened.payload).text.body
        sender = "alice" if opened.sender == alice.public else opened.sender.fingerprint.hex()[:16]
        print(f"    from {sender}, verified and decrypted: {body!r}")
    deleted = await _step(
        "bob deletes what he read (signed delete)", inbox.delete(bob, [b.blob_id for b in blobs])
    )
    print(f"    tombstoned on {deleted} replicas")
    await bob_node.stop()


def run_demo(root: Path | None = None) -> None:
    print("DNA Messenger v2 demo: store-and-forward on a local decentralized network\n")
    with tempfile.TemporaryDirectory(prefix="dna-testnet-") as tmp:
        net = Testnet(root or Path(tmp))
        started = time.perf_counter()
        try:
            net.up()
            print(
                f"  3 bootstrap + 6 storage nodes up on 127.0.0.2-10"
                f"{'':<21} {1000 * (time.perf_counter() - started):8.1f} ms"
            )
            asyncio.run(_flow(net))
        finally:
            net.down()
    print("\ndemo complete")
