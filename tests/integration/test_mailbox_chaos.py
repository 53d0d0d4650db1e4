"""SIGKILL storage nodes in a loop while a client writes, then check every
acknowledged write (Jepsen's set-full idea): each is classified present or lost,
and lost must be 0; every SQLite file passes `PRAGMA integrity_check`.

Which node is killed when is drawn from a seed, printed first and in every failure;
``DNA_TEST_SEED=N`` replays that sequence of victims (the timing is the wall clock's)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import pytest
from cluster import (
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    running,
    storage_network,
    wait_ready,
)
from dna_core.crypto import seal
from dna_core.mailbox.client import MailboxClient, QuorumError
from process_mark import starts_processes
from support import run_seed, seeded_identity

STORAGE = 6
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
WRITE_SECONDS = 12.0
KILL_EVERY_S = 1.5
ALICE = seeded_identity("chaos-alice")
BOBS = [seeded_identity(f"chaos-bob-{i}") for i in range(4)]


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("chaos")
    toml = "repair_interval_s = 1.0\n[admission]\npow_base_bits = 8\n"
    nodes = storage_network(root, STORAGE, toml, ADDRESSES)
    with running(nodes):
        yield nodes


async def _write(acked: dict[bytes, bytes], attempted: list[int]) -> None:
    client = await client_node([SEED])
    mail = MailboxClient(client, pow_bits=8, timeout=2.0)
    deadline = time.monotonic() + WRITE_SECONDS
    i = 0
    while time.monotonic() < deadline:
        bob = BOBS[i % len(BOBS)]
        env = seal(ALICE, bob.public, f"chaos {i}".encode(), now_ms=time.time_ns() // 10**6)
        attempted[0] += 1
        try:
            result = await mail.put(bob.fingerprint, env)
        except QuorumError:
            pass  # not acknowledged: allowed to be absent
        else:
            acked[result.blob_id] = bob.fingerprint
        i += 1
    await client.stop()


async def _kill_loop(stores: list[NodeProcess], rng: random.Random) -> list[str]:
    """Kill and restart one store every KILL_EVERY_S; the victims, in order."""
    victims: list[str] = []
    deadline = time.monotonic() + WRITE_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(KILL_EVERY_S)
        victim = rng.choice(stores)
        victim.kill()
        victims.append(victim.name)
        await asyncio.sleep(0.3)
        victim.start()  # same key and data: it comes back, possibly mid-write
    return victims


def test_no_acknowledged_write_is_lost_under_sigkill_loop(network: list[NodeProcess]) -> None:
    stores = [n for n in network if n.role == "storage"]
    acked: dict[bytes, bytes] = {}
    attempted = [0]
    seed = run_seed()
    replay = f"chaos seed {seed} (replay: DNA_TEST_SEED={seed})"
    print(replay)

    async def chaos() -> list[str]:
        victims, _ = await asyncio.gather(
            _kill_loop(stores, random.Random(seed)), _write(acked, attempted)
        )
        return victims

    victims = asyncio.run(chaos())
    kills = len(victims)
    print(f"killed in turn: {' '.join(victims)}")
    wait_ready(stores)

    async def check() -> dict[str, int]:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8)
        present: set[bytes] = set()
        for bob in BOBS:
            blobs, _ = await mail.fetch(bob)
            present |= {b.blob_id for b in blobs}
        await client.stop()
        return {
            "present": sum(b in present for b in acked),
            "lost": sum(b not in present for b in acked),
        }

    verdict = asyncio.run(check())
    print(f"{kills} kills, {attempted[0]} writes attempted, {len(acked)} acknowledged: {verdict}")
    assert kills >= 5 and len(acked) >= 20, replay
    assert verdict["lost"] == 0, (verdict, replay)

    for store in stores:
        try:
            store.terminate()
        except subprocess.TimeoutExpired:
            pytest.fail(f"{store.name} ignored SIGTERM for 15 s:\n{store.tail(40)}")
        db = store.root / f"{store.name}-data" / "mailboxes.sqlite3"
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",), store.name
