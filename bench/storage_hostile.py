"""Hostile session clients against one storage node: what each costs the node in memory, how
each ends, and what an honest client on the same node sees meanwhile.

``uv run python -m bench.storage_hostile --attack fetch --sessions 32 --sources 8``

* **Node.** One ``dna-storage-node`` (SQLite), admission limits raised, 8-bit proof of work,
  the default session settings (window 64, stall 30 s, page slots 4) unless given.
* **Honest client** (its own source address): a put then a fetch of its own mailbox every
  ``HONEST_PERIOD_S``, unary; every latency is a sample.
* **Attack** (``--sessions`` raw sessions spread over ``--sources`` source addresses, each
  through a :class:`TcpRelay` leaving from its own 127.x address; none ever reads):

  - ``fetch``: its window of signed fetches of a ~2 MiB mailbox (each answer a full page);
  - ``batches``: 4 such fetches, then its window of ~3.9 MiB ``PutMany`` frames;
  - ``subscribe``: 8 subscriptions to the ~2 MiB mailbox, while the honest client keeps
    putting to that mailbox too (pushes pile up unread).

One JSON line: the node's RSS before, its peak (``VmHWM``) during the attack and RSS after,
peak growth per hostile session, sessions refused at opening and cut (by reason), and the
honest client's p50/p99 before and during the attack, and its failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_fetch
from dna_core.ops.relay import TcpRelay
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_testnet.harness import LOOPBACK
from dna_testnet.network import GRPC_PORT, HTTP_PORT, LocalNode, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import memory_mb, now_ms

NODE_IP, HONEST_IP = LOOPBACK.take(2)
SESSION = "/dna.v1.Mailbox/Session"
HONEST_PERIOD_S = 0.2
MIB = 1024 * 1024
NODE_TOML = (
    "repair_interval_s = 3600.0\n"
    "[admission]\npow_base_bits = 8\nip_rate_per_s = 100000.0\nip_burst = 100000.0\n"
    "mailbox_rate_per_s = 100000.0\nmailbox_burst = 100000.0\n"
    "pow_target_puts_per_s = 100000.0\nquota_max_bytes = 1073741824\n"
)


def reset_peak(pid: int) -> None:
    """Start ``VmHWM`` again from the current RSS (Linux: write 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def metrics(node: LocalNode, name: str) -> dict[str, float]:
    text = httpx.get(f"http://{node.ip}:{HTTP_PORT}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get("reason", "")] = sample.value
    return out


def put(owner: Identity, sender: Identity, size: int) -> mailbox_pb2.PutRequest:
    box = mailbox_id(owner.fingerprint)
    blob = seal(sender, owner.public, os.urandom(size), now_ms=now_ms())
    proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now_ms())
    return mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())


def fetch(owner: Identity, cursor: bytes = b"") -> mailbox_pb2.FetchRequest:
    raw = sign_fetch(owner, cursor=cursor, limit=100, now_ms=now_ms())
    return mailbox_pb2.FetchRequest.FromString(raw)


def frames(
    kind: str, owner: Identity, batch: list[mailbox_pb2.PutRequest], window: int
) -> list[bytes]:
    if kind == "subscribe":
        return [mailbox_pb2.SessionRequest(id=i + 1, subscribe=mailbox_pb2.Subscribe(
            fetch=fetch(owner))).SerializeToString() for i in range(8)]  # fmt: skip
    fetches = window if kind == "fetch" else 4
    out = [mailbox_pb2.SessionRequest(id=i + 1, fetch=fetch(owner)).SerializeToString()
           for i in range(fetches)]  # fmt: skip
    if kind == "batches":
        many = mailbox_pb2.PutManyRequest(puts=batch)
        out += [mailbox_pb2.SessionRequest(id=100 + i, put_many=many).SerializeToString()
                for i in range(window - 4)]  # fmt: skip
    return out


async def hostile(target: str, payload: list[bytes]) -> None:
    """One session that sends ``payload`` and never reads (a small receive window)."""
    channel = grpc.aio.insecure_channel(
        target, options=[("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    )
    call: Any = channel.stream_stream(SESSION)()
    try:
        for frame in payload:
            await call.write(frame)
        await call.code()  # until the node ends it
    except Exception:  # grpc fails a write on an ended call in several ways
        pass
    finally:
        await channel.close()


async def honest(target: str, owner: Identity, stop: asyncio.Event, samples: list[float],
                 failures: list[str]) -> None:  # fmt: skip
    sender = Identity.generate()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = mailbox_pb2_grpc.MailboxStub(channel)
        cursor = b""
        while not stop.is_set():
            request = put(owner, sender, 2_000)
            page_request = fetch(owner, cursor)
            t0 = time.perf_counter()
            try:
                await stub.Put(request, timeout=10)
                page = await stub.Fetch(page_request, timeout=10)
                cursor = page.next_cursor
                samples.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code().name)
            await asyncio.sleep(HONEST_PERIOD_S)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else 0.0


async def relays_from(ips: list[str]) -> list[TcpRelay]:
    """A relay per address: connections to the node leave from that address."""
    out = []
    for ip in ips:
        relay = TcpRelay((NODE_IP, GRPC_PORT), upstream_source=ip)
        await relay.start()
        out.append(relay)
    return out


async def attack_rounds(
    args: argparse.Namespace, pid: int, targets: list[str], victim: Identity, batch: list[Any]
) -> list[float]:
    """``args.rounds`` attacks, each until the node ended every session (or a deadline);
    the node's RSS after each."""
    after = []
    for _ in range(args.rounds):
        payloads = [frames(args.attack, victim, batch, args.window)  # fresh nonces each
                    for _ in range(args.sessions)]  # fmt: skip
        attack = [asyncio.create_task(hostile(targets[i % len(targets)], payloads[i]))
                  for i in range(args.sessions)]  # fmt: skip
        await asyncio.wait(attack, timeout=args.stall_s * 3 + 30)
        for task in attack:
            task.cancel()
        await asyncio.sleep(1)
        after.append(memory_mb(pid)["VmRSS"])
    return after


def latency(samples: list[float]) -> dict[str, float]:
    return {"p50": pct(samples, 0.5), "p99": pct(samples, 0.99), "max": pct(samples, 1.0),
            "n": len(samples)}  # fmt: skip


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    toml = f"session_window = {args.window}\nsession_stall_s = {args.stall_s}\n" + NODE_TOML
    node = LocalNode("hostile", NODE_IP, root, [], command="dna-storage-node", extra_toml=toml)
    node.start()
    relays: list[TcpRelay] = []
    try:
        await asyncio.to_thread(wait_ready, [node], 60)
        assert node.proc is not None
        pid, target = node.proc.pid, f"{NODE_IP}:{GRPC_PORT}"
        victim, sender = Identity.generate(), Identity.generate()
        async with grpc.aio.insecure_channel(target) as channel:  # ~2 MiB: full pages
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            for _ in range(12):
                await stub.Put(put(victim, sender, 180_000), timeout=10)
        batch = [put(victim, sender, 60_000) for _ in range(64)]
        honest_owner = victim if args.attack == "subscribe" else Identity.generate()
        relays = await relays_from([HONEST_IP, *LOOPBACK.take(args.sources)])
        before: list[float] = []
        during: list[float] = []
        failures: list[str] = []
        stop = asyncio.Event()
        quiet = asyncio.create_task(honest(relays[0].address, honest_owner, stop, before, failures))
        await asyncio.sleep(4)
        stop.set()
        await quiet
        base = memory_mb(pid)
        reset_peak(pid)
        stop.clear()
        loud = asyncio.create_task(honest(relays[0].address, honest_owner, stop, during, failures))
        t0 = time.perf_counter()
        targets = [r.address for r in relays[1:]]
        after_rounds = await attack_rounds(args, pid, targets, victim, batch)
        attack_s = time.perf_counter() - t0
        peak = memory_mb(pid)
        stop.set()
        await loud
        return {
            "attack": args.attack, "sessions": args.sessions, "sources": args.sources,
            "window": args.window, "stall_s": args.stall_s,
            "rss_before": base["VmRSS"], "peak_during": peak["VmHWM"],
            "rss_after_rounds": after_rounds,
            "peak_growth_per_session_mib": round(
                (peak["VmHWM"] - base["VmRSS"]) / max(1, args.sessions), 2
            ),
            "attack_s": round(attack_s, 1),
            "refusals": metrics(node, "dna_storage_session_refusals_total"),
            "honest_before_ms": latency(before), "honest_during_ms": latency(during),
            "honest_failures": {f: failures.count(f) for f in set(failures)},
        }  # fmt: skip
    finally:
        for relay in relays:
            await relay.close()
        node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attack", choices=("fetch", "batches", "subscribe"), default="fetch")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--sources", type=int, default=1)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--stall-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dna-hostile-"))
    try:
        print(json.dumps(asyncio.run(run(args, root))), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
