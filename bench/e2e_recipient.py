"""Recipient process for ``bench.e2e``: peers that receive their mailbox in a loop.

``python -m bench.e2e_recipient --root DIR --seeds IP:PORT,... [--recipients 1]
[--poll [--poll-interval 0]] [--turn IP:PORT --turn-user U --turn-password P]``

It runs apart from the sending benchmark so that, as on a real network, the recipient's
CPU (fetching, opening envelopes, the cache, delivery receipts, signed deletes) is not
the senders' event loop's time, while the machine's cores are still shared by everyone.

Each recipient is a ``dna_peer`` device: a new identity under ``DIR/recipient<i>``,
opened with ``open_peer`` and published (identity record, no name claim). Then every
recipient runs ``Peer.watch()``, as ``dna watch`` does: one sync, then a subscription to
its mailbox on the replicas, which push each blob as they store it (issue 15's "recipient
subscribed"). With ``--poll`` it calls ``Peer.sync()`` in a loop instead,
``--poll-interval`` seconds apart (default 0: back to back), the way it received before
push delivery.

Lines on stdout are JSON objects:

* ``{"ready": {"fingerprints": [hex, ...], "setup_s": s}}`` once every recipient is up;
* ``{"got": [[message_id_hex, decrypted_ns, reported_ns, committed_ns], ...]}`` after
  each round that brought messages: ``decrypted_ns`` is when the peer's ``on_message``
  hook had it (opened and checked, its cache writes made, before their commit),
  ``reported_ns`` when the round returned it, ``committed_ns`` when its cache transaction
  had committed (from the progress callback), all ``time.monotonic_ns()``
  (CLOCK_MONOTONIC, the same clock in every process of the machine);
* one reply per command read on stdin: ``pause`` (polling: no new syncs, replies once the
  running ones are done; push costs nothing while nobody sends), ``resume``, ``stats``,
  ``stop`` (closes the peers, then exits),
  ``direct FINGERPRINT`` (the first recipient pins that sender and goes online for the
  direct path through the ``--turn`` relay, relay-only: it publishes a presence record
  sealed to the sender and takes messages over ICE; each one arriving that way is a
  ``got`` line too, all three times = when the inbox had stored it);
  each reply is ``{"<command>": {stats}}``. End of stdin and SIGTERM stop it too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dna_core.crypto import Identity
from dna_core.ops.heap import freeze_startup_heap
from dna_core.tasks import stop_tasks
from dna_peer.cache import Message
from dna_peer.direct.link import IceConfig
from dna_peer.inbox import SyncReport
from dna_peer.network import parse_seeds
from dna_peer.peer import Peer, open_peer
from dna_peer.profile import Profile

from bench.harness import cpu_s, emit

PASSPHRASE = "bench passphrase"
ERROR_BACKOFF_S = 0.2
WATCH_WAIT_S = 1.0  # a push round waits this long for blobs before its housekeeping


@dataclass
class Stats:
    syncs: int = 0
    sync_errors: int = 0
    sync_s: float = 0.0
    messages: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "syncs": self.syncs,
            "sync_errors": self.sync_errors,
            "sync_s": round(self.sync_s, 3),
            "messages": self.messages,
            "cpu_s": round(cpu_s(), 3),
        }


async def new_recipient(root: Path, index: int, seeds: list[tuple[str, int]]) -> Peer:
    profile = Profile(root / f"recipient{index}")
    profile.create(Identity.generate(), PASSPHRASE)
    peer = await open_peer(profile, PASSPHRASE, seeds)
    await peer.publish(f"Recipient {index}")
    return peer


class DeliveryClock:
    """When each new message of a peer was decrypted (the peer's ``on_message`` hook:
    opened, checked, its cache writes made, before their commit) and when it was committed
    to the cache (the progress callback notes the time and the messages held after each
    handled blob; a round's k-th new message is committed after the first blob after which
    the cache held k + 1 more)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.held = peer.cache.message_count()
        self.progress: list[tuple[int, int]] = []  # (ns, messages held)
        self.decrypted: dict[bytes, int] = {}  # message ID -> ns
        peer.on_message = self.on_message

    def on_message(self, msg: Message) -> None:
        self.decrypted[msg.message_id] = time.monotonic_ns()

    def on_blob(self, _done: int, _total: int) -> None:
        self.progress.append((time.monotonic_ns(), self.peer.cache.message_count()))

    def got(self, report: SyncReport) -> list[list[Any]]:
        """The round's new messages: when each was decrypted, when the round ended, when
        it was committed."""
        returned = time.monotonic_ns()
        got = []
        for k, msg in enumerate(report.new_messages):
            cached = next((ns for ns, held in self.progress if held - self.held > k), returned)
            decrypted = self.decrypted.pop(msg.message_id, cached)
            got.append([msg.message_id.hex(), decrypted, returned, cached])
        self.held = self.peer.cache.message_count()
        self.progress.clear()
        self.decrypted.clear()
        return got


class Receiver:
    """Every recipient receiving: pushed by its replicas (``Peer.watch``) or syncing in a
    loop (``poll_s`` not None); pause/resume for the baselines' turns."""

    def __init__(self, peers: list[Peer], poll_s: float | None) -> None:
        self.peers, self.poll_s = peers, poll_s
        self.stats = Stats()
        self.running = asyncio.Event()
        self.running.set()
        self.active = 0
        self.idle = asyncio.Condition()
        receive = self.watch if poll_s is None else self.poll
        self.tasks = [asyncio.create_task(receive(p)) for p in peers]

    def report(self, clock: DeliveryClock, report: SyncReport) -> None:
        got = clock.got(report)
        if got:
            self.stats.messages += len(got)
            emit({"got": got})

    async def watch(self, peer: Peer) -> None:
        clock = DeliveryClock(peer)

        def on_report(report: SyncReport) -> None:
            self.stats.syncs += 1
            self.report(clock, report)

        await peer.watch(on_report, interval=WATCH_WAIT_S, progress=clock.on_blob)

    async def poll(self, peer: Peer) -> None:
        clock = DeliveryClock(peer)
        while True:
            await self.running.wait()
            self.active += 1
            try:
                await self.sync_once(peer, clock)
            finally:
                self.active -= 1
                async with self.idle:
                    self.idle.notify_all()
            await asyncio.sleep(self.poll_s or 0.0)

    async def sync_once(self, peer: Peer, clock: DeliveryClock) -> None:
        t0 = time.perf_counter()
        try:
            report = await peer.sync(clock.on_blob)
        except Exception as exc:  # a sync that failed is retried; count it, keep going
            self.stats.sync_errors += 1
            logging.getLogger("bench.e2e_recipient").warning("sync failed: %r", exc)
            await asyncio.sleep(ERROR_BACKOFF_S)
            return
        self.stats.syncs += 1
        self.stats.sync_s += time.perf_counter() - t0
        self.report(clock, report)

    async def pause(self) -> None:
        self.running.clear()  # a watch goes on: with nobody sending it only waits
        async with self.idle:
            await self.idle.wait_for(lambda: self.active == 0)

    async def go_direct(self, sender_hex: str, ice: IceConfig) -> None:
        """The first recipient takes ``sender_hex``'s messages over the direct path."""
        peer = self.peers[0]
        await peer.add_contact(sender_hex)  # presence is sealed to pinned contacts only

        def arrived(report: SyncReport) -> None:
            now = time.monotonic_ns()
            if report.new_messages:
                self.stats.messages += len(report.new_messages)
                emit({"got": [[m.message_id.hex(), now, now, now] for m in report.new_messages]})

        peer.on_direct = arrived
        await peer.go_direct(ice, listen=True)

    async def stop(self) -> None:
        await self.pause()
        await stop_tasks(self.tasks)


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(receiver: Receiver, ice: IceConfig | None) -> None:
    """Answer commands until ``stop``, end of stdin or SIGTERM."""
    reader = await stdin_reader()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        line_task = asyncio.ensure_future(reader.readline())
        stop_task = asyncio.ensure_future(stop.wait())
        await asyncio.wait({line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if not line_task.done():
            line_task.cancel()
            break
        command = line_task.result().decode().strip()
        if command in ("", "stop"):
            break
        if command == "pause":
            await receiver.pause()
        elif command.startswith("direct ") and ice is not None:
            await receiver.go_direct(command.split()[1], ice)
            command = "direct"
        elif command == "resume":
            receiver.running.set()
        emit({command: receiver.stats.to_json()})
    await receiver.stop()


async def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    seeds = parse_seeds(args.seeds)
    root = Path(args.root)
    peers = list(
        await asyncio.gather(*(new_recipient(root, i, seeds) for i in range(args.recipients)))
    )
    try:
        emit({"ready": {"fingerprints": [p.fingerprint.hex() for p in peers],
                        "setup_s": round(time.perf_counter() - t0, 3)}})  # fmt: skip
        freeze_startup_heap()  # as `dna watch` does once it is up
        receiver = Receiver(peers, args.poll_interval if args.poll else None)
        await serve(receiver, ice_config(args))
        emit({"stop": receiver.stats.to_json()})
    finally:
        for peer in peers:
            with contextlib.suppress(Exception):
                await peer.close()


def ice_config(args: argparse.Namespace) -> IceConfig | None:
    if not args.turn:
        return None
    return IceConfig(turn=parse_seeds(args.turn)[0], turn_username=args.turn_user,
                     turn_password=args.turn_password, relay_only=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench.e2e's recipient process")
    parser.add_argument("--root", required=True, help="directory for the recipients' profiles")
    parser.add_argument("--seeds", required=True, help="bootstrap nodes, IP:PORT,...")
    parser.add_argument("--recipients", type=int, default=1, help="recipient identities")
    parser.add_argument(
        "--poll", action="store_true", help="sync in a loop instead of subscribing (push)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=0.0, help="s between one's syncs (0: back to back)"
    )
    parser.add_argument("--turn", default="", help="TURN relay IP:PORT of the direct path")
    parser.add_argument("--turn-user", default="", help="its username")
    parser.add_argument("--turn-password", default="", help="its password")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
