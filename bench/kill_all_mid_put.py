"""Every storage node SIGKILLed while puts are in flight, then restarted from its data:
no acknowledged put lost, nothing fetched twice.

``python -m bench.kill_all_mid_put --backend sqlite`` (or ``redis``: one ``redis-server``
with AOF ``appendfsync always``, a database per node, SIGKILLed with them).

A bootstrap and 5 storage node processes; ``WRITERS`` puts in flight from one
``MailboxClient`` (``return_at_quorum=True``, as peers send) to one mailbox; after
``--kill-after`` seconds every storage node (and the ``redis-server``) is SIGKILLed at
once. A put that returned is acknowledged: W = 3 replicas said it was durable. Then
everything restarts and the owner fetches the mailbox from no cursor until nothing is
left. One JSON line: puts tried, acknowledged, acknowledged but not fetched, fetched
twice within one fetch call, fetched but never acknowledged (in flight at the kill).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

from dna_core.crypto import Identity, seal
from dna_core.errors import DnaError
from dna_core.mailbox import FetchState, MailboxClient, blob_id
from dna_testnet.harness import LocalNode, local_cluster, wait_ready
from dna_testnet.network import UDP_PORT, client_node
from dna_testnet.topology import NodeSpec, Topology

from bench.harness import now_ms, run_in_scratch, stop_fleet
from bench.storage_size import start_redis

WRITERS = 32
TOML = (
    "repair_interval_s = 3600.0\n[admission]\npow_base_bits = 8\nip_rate_per_s = 100000.0\n"
    "ip_burst = 100000.0\nmailbox_rate_per_s = 100000.0\nmailbox_burst = 100000.0\n"
    "pow_target_puts_per_s = 100000.0\nquota_max_blobs = 100000\n"
)


async def put_until(
    mail: MailboxClient, owner: Identity, sender: Identity, stop: asyncio.Event,
    acked: set[bytes], tried: list[bytes],
) -> None:  # fmt: skip
    while not stop.is_set():
        blob = seal(sender, owner.public, b"put %d" % len(tried), now_ms=now_ms())
        tried.append(blob_id(blob))
        with contextlib.suppress(DnaError, asyncio.TimeoutError):
            result = await mail.put(owner.fingerprint, blob, return_at_quorum=True)
            acked.add(result.blob_id)


async def fetch_all(mail: MailboxClient, owner: Identity) -> tuple[set[bytes], int]:
    state, seen, twice = FetchState(), set(), 0
    while True:
        got, state = await mail.fetch(owner, state, limit=1000)
        ids = [b.blob_id for b in got]
        twice += len(ids) - len(set(ids))
        seen |= set(ids)
        if not state.more:
            return seen, twice


async def run(args: argparse.Namespace, root: Path) -> None:
    redis: subprocess.Popen[bytes] | None = None
    topology = Topology((NodeSpec("boot", "bootstrap"),
                         *(NodeSpec(f"store{i}", "storage") for i in range(5))))  # fmt: skip
    nodes = local_cluster(root, topology, storage_toml=TOML).driver.nodes
    stores: list[LocalNode] = nodes[1:]
    if args.backend == "redis":
        redis, url = start_redis(root)
        for i, node in enumerate(stores):
            node.extra_toml = f'backend = "redis"\nredis_url = "{url[:-1]}{i}"\n' + TOML
    try:
        for node in nodes:
            node.start()
        await asyncio.to_thread(wait_ready, nodes, 120)
        owner, sender = Identity.generate(), Identity.generate()
        client = await client_node([(nodes[0].ip, UDP_PORT)])
        mail = MailboxClient(client, pow_bits=8, timeout=5.0)
        acked: set[bytes] = set()
        tried: list[bytes] = []
        stop = asyncio.Event()
        writers = [asyncio.create_task(put_until(mail, owner, sender, stop, acked, tried))
                   for _ in range(WRITERS)]  # fmt: skip
        await asyncio.sleep(args.kill_after)
        for node in stores:  # as close to at once as a loop gets
            assert node.proc is not None
            node.proc.send_signal(signal.SIGKILL)
        if redis is not None:
            redis.send_signal(signal.SIGKILL)
        acked_at_kill = set(acked)
        stop.set()
        await asyncio.gather(*writers)
        late = acked - acked_at_kill  # returned after the kill: quorum reached before it
        for node in stores:
            node.kill()  # reaps the process
        await mail.close()
        await client.stop()
        if redis is not None:
            redis.wait()
            redis, _ = start_redis(root, port=int(url.rsplit(":", 1)[1].split("/")[0]))
        t0 = time.monotonic()
        for node in stores:
            node.start()
        await asyncio.to_thread(wait_ready, stores, 120)
        ready_s = round(time.monotonic() - t0, 1)
        client = await client_node([(nodes[0].ip, UDP_PORT)])
        mail = MailboxClient(client, pow_bits=8, timeout=10.0)
        fetched, twice = await fetch_all(mail, owner)
        await mail.close()
        await client.stop()
        print(json.dumps({
            "backend": args.backend, "tried": len(tried), "acked": len(acked),
            "acked_after_kill": len(late), "lost": len(acked - fetched),
            "fetched": len(fetched), "twice_in_a_call": twice,
            "fetched_not_acked": len(fetched - acked), "ready_s": ready_s,
        }), flush=True)  # fmt: skip
    finally:
        stop_fleet(nodes, redis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--kill-after", type=float, default=4.0)
    args = parser.parse_args()
    run_in_scratch("kill-all", lambda root: run(args, root))


if __name__ == "__main__":
    main()
