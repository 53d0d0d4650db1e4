"""End to end under failure: storage nodes killed while 10 people exchange 1,000
messages, and a `dna sync` process killed in the middle of writing its cache."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dna_core.errors import DnaError
from dna_peer.cache import Cache
from dna_peer.peer import Peer
from dna_testnet.network import LocalNode, Testnet, wait_ready
from peers import PASSPHRASE, People
from support import BIN

PEOPLE, MESSAGES = 10, 1_000
CHURN_PERIOD_S = 1.5  # a storage node goes down (SIGKILL) and comes back this often


def test_a_thousand_messages_while_storage_nodes_die(testnet: Testnet, tmp_path: Path) -> None:
    storage = [n for n in testnet.nodes if n.role == "storage"]
    token = os.urandom(6).hex()  # makes every body unique and findable on disk

    async def scenario() -> tuple[dict[str, Counter[str]], dict[str, set[str]], int]:
        people = People(tmp_path, testnet.seeds)
        peers = [await people.new(f"p{i}") for i in range(PEOPLE)]
        for peer in peers:  # everyone knows everyone by name
            for other in range(PEOPLE):
                if peers[other] is not peer:
                    await peer.add_contact(people.name(f"p{other}"))
        stop, kills_so_far = asyncio.Event(), [0]
        churn = asyncio.create_task(_churn(storage, stop, kills_so_far))
        sent = await _exchange(peers, people, token, kills_so_far)
        kills = await _stop(churn, stop)
        received = await _drain(peers, sent)
        await asyncio.gather(*(p.close() for p in peers))
        return received, sent, kills

    received, sent, kills = asyncio.run(scenario())
    assert kills >= 5, "the churn did not happen"
    expected = sum(len(bodies) for bodies in sent.values())
    assert expected == MESSAGES  # every send was acknowledged (retries included)
    lost = {who: bodies - set(received[who]) for who, bodies in sent.items()}
    assert all(not missing for missing in lost.values()), lost
    duplicated = [b for c in received.values() for b, n in c.items() if n > 1]
    assert duplicated == []
    assert sum(sum(c.values()) for c in received.values()) == MESSAGES
    _assert_no_plaintext(testnet.root, token)


async def _exchange(
    peers: list[Peer], people: People, token: str, kills: list[int]
) -> dict[str, set[str]]:
    """Each person sends MESSAGES/PEOPLE messages to random others, all concurrently,
    syncing now and then; returns the bodies each recipient must end up with. Each
    sync waits for the churn to have killed one more node (at least 5 by the last), so
    the sends span the churn however fast the machine sends."""
    sent: dict[str, set[str]] = {p.fingerprint.hex(): set() for p in peers}
    rng = random.Random(7)

    async def person(i: int) -> None:
        me = peers[i]
        for n in range(MESSAGES // PEOPLE):
            to = peers[rng.choice([j for j in range(PEOPLE) if j != i])]
            body = f"{token} message {n} from p{i}"
            await me.send(me.find_contact(people.name(_name_of(peers, to))), body)
            sent[to.fingerprint.hex()].add(body)
            if n % 25 == 24:
                while kills[0] < n // 25 + 2:
                    await asyncio.sleep(0.1)
                await me.sync()

    await asyncio.gather(*(person(i) for i in range(PEOPLE)))
    return sent


def _name_of(peers: list[Peer], peer: Peer) -> str:
    return f"p{peers.index(peer)}"


async def _drain(peers: list[Peer], sent: dict[str, set[str]]) -> dict[str, Counter[str]]:
    """Sync until everyone holds what was sent to them (bounded)."""
    deadline = time.monotonic() + 90
    while True:
        for peer in peers:
            await peer.sync()
        received = {
            p.fingerprint.hex(): Counter(m.body for m in p.cache.messages() if not m.outgoing)
            for p in peers
        }
        done = all(sent[who] <= set(got) for who, got in received.items())
        if done or time.monotonic() > deadline:
            return received
        await asyncio.sleep(0.5)


async def _churn(storage: list[LocalNode], stop: asyncio.Event, kills: list[int]) -> int:
    """SIGKILL one storage node at a time and restart it (at most 1 of 6 down: never
    more than 4 of any 5-node replica set); ``kills[0]`` counts them as they happen."""
    rng = random.Random(11)
    while not stop.is_set():
        victim = rng.choice(storage)
        victim.kill()
        kills[0] += 1
        await asyncio.sleep(CHURN_PERIOD_S / 2)
        victim.start()
        await asyncio.to_thread(wait_ready, [victim], 30.0)
        await asyncio.sleep(CHURN_PERIOD_S / 2)
    return kills[0]


async def _stop(churn: asyncio.Task[int], stop: asyncio.Event) -> int:
    stop.set()
    return await churn


def _assert_no_plaintext(root: Path, token: str) -> None:
    """Storage nodes only ever held sealed envelopes: no message text in any file."""
    scanned = 0
    for path in root.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"plaintext in {path}"
            scanned += 1
    assert scanned >= 6 * 2  # at least each storage node's database and log


def test_a_sync_killed_mid_write_leaves_a_whole_cache(testnet: Testnet, tmp_path: Path) -> None:
    count = 150

    async def fill() -> People:
        people = People(tmp_path, testnet.seeds)
        alice, bob = await people.new("alice"), await people.new("bob")
        contact = await alice.add_contact(people.name("bob"))
        for n in range(count):
            await alice.send(contact, f"message {n}")
        await asyncio.gather(alice.close(), bob.close())
        return people

    people = asyncio.run(fill())
    bob = people.profile("bob")
    identity = bob.unlock(PASSPHRASE)
    killed_at = []
    for _ in range(3):  # three kills, each at a point where part of the mailbox is written
        held = _kill_sync_midway(bob.home, testnet, lambda: bob.open_cache(identity))
        killed_at.append(held)
        cache = bob.open_cache(identity)
        assert cache.integrity_check() == "ok"
        bodies = [m.body for m in cache.messages()]
        assert len(bodies) == len(set(bodies)) == held
        cache.close()
    assert any(0 < n < count for n in killed_at), killed_at
    finished = _sync(bob.home, testnet)
    finished.wait(60)
    assert finished.returncode == 0
    cache = bob.open_cache(identity)
    assert sorted(m.body for m in cache.messages()) == sorted(f"message {n}" for n in range(count))
    assert cache.integrity_check() == "ok"
    # ...and every blob left the replicas: one handled just before a kill (its commit made,
    # the page's acknowledgements not yet) was never acknowledged, so never deleted
    assert cache.undeleted_blobs() == []


def _count(cache: Cache) -> int:
    try:
        return cache.message_count()
    finally:
        cache.close()


def _sync(home: Path, net: Testnet) -> subprocess.Popen[bytes]:
    seeds = ",".join(f"{h}:{p}" for h, p in net.seeds)
    return subprocess.Popen(
        [str(BIN / "dna"), "--home", str(home), "--bootstrap", seeds, "sync"],
        env={"DNA_PASSPHRASE": PASSPHRASE, "PATH": str(BIN)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _kill_sync_midway(home: Path, net: Testnet, open_cache: Callable[[], Cache]) -> int:
    """Start `dna sync`, SIGKILL it once it has written some messages; returns how many
    the cache holds afterwards. One reader stays open while the sync runs (WAL: each
    count sees the latest commit): opening the cache for every look took longer than a
    sync of the whole mailbox, so the kill came after the last write."""
    watcher = open_cache()
    try:
        before = watcher.message_count()
        proc = _sync(home, net)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if watcher.message_count() > before:
                    break
            except DnaError:
                pass  # the cache is being created or locked: look again
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        watcher.close()
    return _count(open_cache())
