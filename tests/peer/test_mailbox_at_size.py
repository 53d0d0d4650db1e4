"""A mailbox at size, on real processes (1 bootstrap + 5 storage nodes): several senders
fill an offline recipient's mailbox with thousands of messages (and a few near the blob
size limit), then the recipient comes online with `dna sync` as a process and must hold
every message exactly once. Time and peak RSS of the peer and of the nodes are printed
(`-s`): the figures in docs/performance.md. Slow: run with `-m slow`."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import UDP_PORT, NodeProcess, free_ips, running, storage_network
from dna_core.crypto import PublicKeySet
from dna_core.mailbox import mailbox_id
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_peer.peer import Peer
from peers import PASSPHRASE, People
from process_mark import starts_processes
from support import BIN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ADDRESSES = free_ips(1 + 5)
# Floods from one test process: no rate limits, no adaptive proof of work; default quota.
TOML = (
    "repair_interval_s = 30.0\n[admission]\npow_base_bits = 8\n"
    "ip_rate_per_s = 1e6\nip_burst = 1e6\n"
    "mailbox_rate_per_s = 1e6\nmailbox_burst = 1e6\npow_target_puts_per_s = 1e6\n"
)


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("size")
    with running(storage_network(root, 5, TOML, ADDRESSES)) as nodes:
        yield nodes


def text(body: str) -> bytes:
    return envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()


async def flood(senders: list[Peer], to: PublicKeySet, bodies: list[str]) -> None:
    """``bodies`` sent to ``to``'s mailbox, round robin over ``senders``, 64 in flight,
    each as `Peer.send` puts it (retried on a short quorum)."""
    gate = asyncio.Semaphore(64)

    async def one(i: int, body: str) -> None:
        async with gate:
            await senders[i % len(senders)].send_payload(to, text(body), with_keys=True)

    await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def dna_sync(home: Path) -> tuple[float, float, int, dict]:  # type: ignore[type-arg]
    """`dna --json sync` as a process: wall seconds, CPU seconds, peak RSS in KiB (the
    largest of this test's children so far: run it first), its report."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out = subprocess.run(
        [str(BIN / "dna"), "--home", str(home), "--bootstrap", f"{ADDRESSES[0]}:{UDP_PORT}",
         "--json", "sync"],
        check=False, capture_output=True, text=True, timeout=1200,
        env={"DNA_PASSPHRASE": PASSPHRASE, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return took, cpu, after.ru_maxrss, json.loads(out.stdout)


@pytest.mark.parametrize(("count", "large"), [(5_000, 0), (300, 20)])
def test_an_offline_recipient_gets_a_large_mailbox_once(
    network: list[NodeProcess], tmp_path: Path, count: int, large: int
) -> None:
    who = People(tmp_path, [(ADDRESSES[0], UDP_PORT)])
    bodies = [f"m{i} " + "x" * 200 for i in range(count)]
    bodies += [f"L{i} " + "y" * 190_000 for i in range(large)]

    async def fill() -> None:
        alice = await who.new("alice", publish=False)
        keys = alice.identity.public
        await alice.close()  # offline from here on
        senders = [await who.new(f"s{i}", publish=False) for i in range(4)]
        assert len(await senders[0].mail.candidates(mailbox_id(keys.fingerprint))) == 5
        start = time.monotonic()
        await flood(senders, keys, bodies)
        print(f"\nsent {len(bodies)} in {time.monotonic() - start:.1f} s")
        await asyncio.gather(*(s.close() for s in senders))

    asyncio.run(fill())
    took, cpu, rss, report = dna_sync(who.profile("alice").home)
    nodes = {n.name: peak_rss_kib(n.proc.pid) for n in network if n.proc and n.name != "boot"}
    print(f"dna sync: {took:.1f} s ({cpu:.1f} s CPU), peak RSS {rss / 1024:.0f} MiB: {report}")
    print("node peak RSS MiB:", {k: round(v / 1024) for k, v in nodes.items()})
    assert report["new_messages"] == len(bodies)
    assert report["deleted_from_network"] == len(bodies)

    async def check() -> None:
        alice = await who.open("alice")
        got = [m.body for m in alice.cache.messages()]
        assert len(got) == len(bodies)
        assert sorted(got) == sorted(bodies)
        again = await alice.sync()
        assert again.new_messages == []
        left, _ = await alice.mail.fetch(alice.identity)
        assert left == []  # every blob deleted
        await alice.close()

    asyncio.run(check())


def test_a_watching_recipient_gets_a_flood_pushed_once(
    network: list[NodeProcess], tmp_path: Path
) -> None:
    """`dna watch` (a process, subscribed) while 3,000 messages arrive: each printed once,
    all in the cache once, the mailbox cleaned; its peak RSS and the time printed."""
    who = People(tmp_path, [(ADDRESSES[0], UDP_PORT)])
    bodies = [f"w{i} " + "x" * 200 for i in range(3_000)]
    asyncio.run(_create(who, "alice"))
    watcher = subprocess.Popen(
        [str(BIN / "dna"), "--home", str(who.profile("alice").home), "--bootstrap",
         f"{ADDRESSES[0]}:{UDP_PORT}", "--json", "watch", "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={"DNA_PASSPHRASE": PASSPHRASE, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        time.sleep(5)  # synced and subscribed

        async def send() -> None:
            senders = [await who.new(f"s{i}", publish=False) for i in range(4)]
            alice_keys = await _keys(who, "alice")
            start = time.monotonic()
            await flood(senders, alice_keys, bodies)
            print(f"\nsent {len(bodies)} in {time.monotonic() - start:.1f} s")
            await asyncio.gather(*(s.close() for s in senders))

        start = time.monotonic()
        asyncio.run(send())
        assert watcher.stdout is not None
        printed: list[str] = []
        for line in watcher.stdout:
            printed.append(json.loads(line)["text"])
            if len(printed) == len(bodies):
                break
        took = time.monotonic() - start
        rss = peak_rss_kib(watcher.pid)
        print(f"dna watch: all {len(printed)} within {took:.1f} s of the first send, "
              f"peak RSS {rss / 1024:.0f} MiB")  # fmt: skip
        assert sorted(printed) == sorted(bodies)  # each once
    finally:
        watcher.terminate()
        watcher.wait(20)

    async def check() -> None:
        alice = await who.open("alice")
        assert sorted(m.body for m in alice.cache.messages()) == sorted(bodies)
        await alice.sync()
        assert (await alice.mail.fetch(alice.identity))[0] == []
        await alice.close()

    asyncio.run(check())


async def _create(who: People, name: str) -> None:
    await (await who.new(name, publish=False)).close()


async def _keys(who: People, name: str) -> PublicKeySet:
    peer = await who.open(name)
    try:
        return peer.identity.public
    finally:
        await peer.close()
