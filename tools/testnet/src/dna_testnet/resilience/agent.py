"""The resilience suite's agent: runs INSIDE a peer's container (or pod), fed to its Python
on stdin (`docker exec -i PEER python3 - ARGS`, `kubectl exec -i POD -- python3 - ARGS`),
so it imports only what the peer image has (dna_peer, dna_core, the standard library).

    send CONTACT PREFIX COUNT INTERVAL   send COUNT messages "PREFIX-00001"...; one JSON
                                         line per invoke, ack (message_id) and fail
    replicas CONTACT|self                the mailbox's candidate storage nodes, closest first
    holdings                             per candidate node of the own mailbox: the message
                                         IDs of the blobs it still serves

The profile, passphrase and seeds come from the container's environment (DNA_HOME,
DNA_PASSPHRASE, DNA_BOOTSTRAP), as for the `dna` CLI. Times are wall-clock seconds: the
containers share the host's clock, so they line up with the fault timeline.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from dna_core.crypto.envelope import decode_envelope
from dna_core.mailbox import MailboxClient, mailbox_id, sign_fetch
from dna_core.rpc_errors import call
from dna_core.wire import mailbox_pb2, mailbox_pb2_grpc
from dna_peer.network import default_seeds, join_overlay
from dna_peer.peer import Peer, open_peer
from dna_peer.profile import Profile

FETCH_LIMIT = 200


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _peer() -> Peer:
    return await open_peer(Profile.default(), os.environ["DNA_PASSPHRASE"], default_seeds())


async def send(contact_name: str, prefix: str, count: int, interval: float) -> None:
    """Paced sends (one every ``interval`` s, not after each ack: a slow ack does not slow
    the load); each one's outcome as it completes."""
    peer = await _peer()
    try:
        contact = peer.find_contact(contact_name)
        start = time.monotonic()
        for n in range(1, count + 1):
            await asyncio.sleep(max(0.0, start + (n - 1) * interval - time.monotonic()))
            await _send_one(peer, contact, f"{prefix}-{n:05d}")
    finally:
        await peer.close()  # drains the writes past their quorum
    emit(op="done", t=time.time())


async def _send_one(peer: Peer, contact: Any, ident: str) -> None:
    emit(op="invoke", id=ident, t=time.time())
    try:
        sent = await peer.send(contact, ident)
    except Exception as exc:  # any failure is this send's outcome, not the run's end
        emit(op="fail", id=ident, t=time.time(), error=f"{type(exc).__name__}: {exc}")
        return
    emit(
        op="ack", id=ident, t=time.time(), message_id=sent.message_id.hex(), replicas=sent.stored_on
    )


async def replicas(contact_name: str) -> None:
    peer = await _peer()
    try:
        fingerprint = (
            peer.fingerprint
            if contact_name == "self"
            else peer.find_contact(contact_name).fingerprint
        )
        found = await peer.mail.storage_nodes(mailbox_id(fingerprint), peer.mail.replicas + 4)
        emit(replicas=[{"ip": c.endpoint.ip, "node_id": c.node_id.hex()} for c in found])
    finally:
        await peer.node.stop()
        peer.cache.close()


async def holdings() -> None:
    """Ask each candidate node on its own (one signed fetch naming only it), all pages."""
    identity = Profile.default().unlock(os.environ["DNA_PASSPHRASE"])
    node = await join_overlay(default_seeds())
    try:
        mail = MailboxClient(node)
        found = await mail.storage_nodes(mailbox_id(identity.fingerprint), mail.replicas + 4)
        nodes = {}
        for contact in found:
            nodes[contact.endpoint.ip] = await _held_by(mail, identity, contact)
        emit(t=time.time(), nodes=nodes)
    finally:
        await node.stop()


async def _held_by(mail: MailboxClient, identity: Any, contact: Any) -> list[str] | None:
    """The message IDs (hex) of the blobs ``contact`` serves; None if it did not answer."""
    stub = mailbox_pb2_grpc.MailboxStub(mail.node.channels.get(contact.endpoint.grpc_target))
    held: list[str] = []
    cursor = b""
    while True:
        signed = sign_fetch(
            identity,
            limit=FETCH_LIMIT,
            now_ms=time.time_ns() // 1_000_000,
            node_cursors={contact.node_id: cursor},
        )
        try:
            page = await call(stub.Fetch(mailbox_pb2.FetchRequest.FromString(signed), timeout=10))
        except Exception:
            return None
        held += [decode_envelope(b.blob).message_id.hex() for b in page.blobs]
        if not page.more or page.next_cursor == cursor:
            return held
        cursor = page.next_cursor


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "send":
        asyncio.run(send(args[0], args[1], int(args[2]), float(args[3])))
    elif command == "replicas":
        asyncio.run(replicas(args[0]))
    elif command == "holdings":
        asyncio.run(holdings())
    else:
        sys.exit(f"agent: unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
