"""Flood fairness: one source floods puts at 10x its rate limit; how much do others notice?

``uv run python -m bench.storage --sections flood`` (part of the default run, ~1.5 min).

* **Node.** One ``dna-storage-node`` process (SQLite, ``synchronous=FULL``) on a loopback
  address of its own (``NODE_IP``, from the harness's allocator) with the default admission
  limits (puts: 20/s burst 40 per source address, 10/s burst 50 per mailbox) and an 8-bit
  proof of work.
* **Clients** (``CLIENTS``, in this process): each from its own source address
  (``CLIENT_IPS``, from the same allocator, through a :class:`dna_core.ops.relay.TcpRelay`:
  gRPC cannot bind a source address) and to its own mailbox, ``CYCLES_PER_S`` cycles a
  second, open loop: a put (envelope sealed and proof solved before timing) then a fetch
  from the client's last cursor (signed before timing). Every put and fetch latency is one
  sample.
* **Flooder**: a separate process (``python -m bench.storage_flood --target ...``) sending
  valid puts of distinct envelopes, spread over ``FLOOD_MAILBOXES`` mailboxes of its own
  (so the per-source limit is the one that binds), at ``FLOOD_FACTOR`` x the per-source
  limit, open loop, from 127.0.0.1: after its burst, all but 20 a second are refused
  (RESOURCE_EXHAUSTED, ``retry-after-ms``) and it does not back off.

Phases alternate, unloaded then flood, ``--rounds`` times ``PHASE_S`` seconds (after a
warm-up). A figure is the median over rounds of the clients' pooled p50/p99 latency in
that kind of phase; ``ratio`` = unloaded / flood (BENCH.md's latency rule), and
``params.slowdown`` = flood / unloaded, target <= 1.5 (issue 4, "Bad input").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.errors import RemoteError
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_fetch
from dna_core.ops.relay import TcpRelay
from dna_core.rpc_errors import call
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_testnet.harness import LOOPBACK
from dna_testnet.network import GRPC_PORT, LocalNode, wait_ready

from bench import harness
from bench.harness import now_ms, percentile

NODE_IP, *_clients = LOOPBACK.take(5)  # the node, then one source address per client
CLIENT_IPS = tuple(_clients)
CLIENTS = len(CLIENT_IPS)
CYCLES_PER_S = 5.0  # per client: 5 puts and 5 fetches a second, well under its limits
IP_RATE_PER_S = 20.0  # the node's default per-source put limit (AdmissionConfig)
FLOOD_FACTOR = 10
POW_BITS = 8
PHASE_S, QUICK_PHASE_S = 8.0, 2.0
WARMUP_S = 2.0
SETTLE_S = 1.0  # between phases: the flood's in-flight calls drain
FLOOD_ENVELOPES = 600  # distinct blobs the flooder cycles through (~20/s are admitted)
FLOOD_MAILBOXES = 30  # spread, so that the per-source limit binds, not the per-mailbox one
MAX_IN_FLIGHT = 256
OP_TIMEOUT_S = 5.0
NODE_TOML = f"[admission]\npow_base_bits = {POW_BITS}\n"
TARGET_SLOWDOWN = 1.5


def put_request(sender: Identity, owner: Identity, payload: bytes) -> mailbox_pb2.PutRequest:
    """A valid put: an envelope for ``owner`` with its proof of work solved."""
    box = mailbox_id(owner.fingerprint)
    env = seal(sender, owner.public, payload, now_ms=now_ms())
    proof, _ = pow_.solve(put_pow_hash(box, env), POW_BITS, now_ms=now_ms())
    return mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=env, pow=proof.to_proto())


# ---------------------------------------------------------------------------- the flooder


async def flood(target: str, rate: float) -> None:
    """The flooder process: "on" starts the flood, "off" stops it and prints what it got."""
    owners, sender = [Identity.generate() for _ in range(FLOOD_MAILBOXES)], Identity.generate()
    requests = [
        put_request(sender, owners[i % FLOOD_MAILBOXES], os.urandom(64))
        for i in range(FLOOD_ENVELOPES)
    ]
    stub = mailbox_pb2_grpc.MailboxStub(grpc.aio.insecure_channel(target))
    counts: Counter[str] = Counter()
    in_flight: set[asyncio.Task[None]] = set()

    async def one(request: mailbox_pb2.PutRequest) -> None:
        try:
            await call(stub.Put(request, timeout=OP_TIMEOUT_S))
            counts["ok"] += 1
        except RemoteError as err:
            counts[err.grpc_code] += 1

    async def pump(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start, i = loop.time(), 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            if len(in_flight) < MAX_IN_FLIGHT:
                task = asyncio.create_task(one(requests[i % len(requests)]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                counts["sent"] += 1
            else:
                counts["skipped"] += 1
            i += 1

    print("ready", flush=True)
    stop, running, started = asyncio.Event(), None, 0.0
    while (command := (await asyncio.to_thread(sys.stdin.readline)).strip()) != "quit":
        if command == "on":
            counts.clear()
            stop.clear()
            started = time.monotonic()
            running = asyncio.create_task(pump(stop))
        elif command == "off" and running is not None:
            stop.set()
            await running
            await asyncio.gather(*in_flight)
            print(
                json.dumps({**counts, "seconds": round(time.monotonic() - started, 2)}), flush=True
            )


class Flooder:
    """The flooder subprocess, driven over its stdin."""

    def __init__(self, target: str, rate: float) -> None:
        self.target, self.rate = target, rate
        self.proc: asyncio.subprocess.Process | None = None
        self.phases: list[dict[str, Any]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.storage_flood", "--target", self.target,
            "--rate", str(self.rate), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        if await self._line() != "ready":
            raise RuntimeError("the flooder did not start")

    async def _send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(60.0):
            line = await self.proc.stdout.readline()
        return line.decode().strip()

    async def on(self) -> None:
        await self._send("on")

    async def off(self) -> None:
        await self._send("off")
        self.phases.append(json.loads(await self._line()))

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        await self._send("quit")
        try:
            async with asyncio.timeout(10.0):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# ---------------------------------------------------------------------------- the clients


@dataclass
class Client:
    """One well-behaved client: its own source address and mailbox."""

    source_ip: str
    target: tuple[str, int]
    puts: list[mailbox_pb2.PutRequest]
    owner: Identity
    cursor: bytes = b""
    errors: Counter[str] = field(default_factory=Counter)
    proxy: TcpRelay | None = None
    stub: Any = None

    async def start(self) -> None:
        self.proxy = TcpRelay(self.target, upstream_source=self.source_ip)
        await self.proxy.start()
        self.stub = mailbox_pb2_grpc.MailboxStub(grpc.aio.insecure_channel(self.proxy.address))

    async def cycle(self, samples: list[float]) -> None:
        """A put then a fetch of what is new; each latency is one sample."""
        try:
            t0 = time.perf_counter()
            await call(self.stub.Put(self.puts.pop(), timeout=OP_TIMEOUT_S))
            samples.append(time.perf_counter() - t0)
            raw = sign_fetch(self.owner, cursor=self.cursor, limit=100, now_ms=now_ms())
            request = mailbox_pb2.FetchRequest.FromString(raw)
            t0 = time.perf_counter()
            page = await call(self.stub.Fetch(request, timeout=OP_TIMEOUT_S))
            samples.append(time.perf_counter() - t0)
            self.cursor = page.next_cursor
        except RemoteError as err:
            self.errors[err.grpc_code] += 1

    async def run(self, seconds: float, samples: list[float]) -> None:
        """Cycles on a fixed schedule (open loop: a slow answer does not delay the next)."""
        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for i in range(int(seconds * CYCLES_PER_S)):
            await asyncio.sleep(max(0.0, start + i / CYCLES_PER_S - loop.time()))
            tasks.append(asyncio.create_task(self.cycle(samples)))
        await asyncio.gather(*tasks)

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()


def build_clients(cycles: int) -> list[Client]:
    sender = Identity.generate()
    clients = []
    for ip in CLIENT_IPS:
        owner = Identity.generate()
        puts = [put_request(sender, owner, os.urandom(128)) for _ in range(cycles)]
        clients.append(Client(ip, (NODE_IP, GRPC_PORT), puts, owner))
    return clients


async def phase(clients: Sequence[Client], seconds: float) -> list[float]:
    samples: list[float] = []
    await asyncio.gather(*(c.run(seconds, samples) for c in clients))
    return sorted(samples)


# ---------------------------------------------------------------------------- the section


@dataclass(frozen=True)
class FloodConfig:
    rounds: int
    phase_s: float


async def measure(clients: Sequence[Client], flooder: Flooder, cfg: FloodConfig) -> dict[str, Any]:
    """Alternate unloaded and flood phases; per phase kind, the p50/p99 of each round."""
    await phase(clients, WARMUP_S)
    figures: dict[str, dict[str, list[float]]] = {
        kind: {"p50": [], "p99": [], "n": []} for kind in ("unloaded", "flood")
    }
    for _ in range(cfg.rounds):
        for kind in ("unloaded", "flood"):
            if kind == "flood":
                await flooder.on()
            samples = await phase(clients, cfg.phase_s)
            if kind == "flood":
                await flooder.off()
            figures[kind]["p50"].append(percentile(samples, 0.50) * 1000)
            figures[kind]["p99"].append(percentile(samples, 0.99) * 1000)
            figures[kind]["n"].append(len(samples))
            await asyncio.sleep(SETTLE_S)
    return figures


def report(
    figures: dict[str, Any], flooder: Flooder, clients: Sequence[Client], cfg: FloodConfig
) -> int:
    flood_totals: Counter[str] = Counter()
    for counts in flooder.phases:
        flood_totals.update({k: v for k, v in counts.items() if k != "seconds"})
    seconds = sum(p["seconds"] for p in flooder.phases)
    errors = sum((c.errors for c in clients), Counter())
    params = {
        "node": "1 dna-storage-node (SQLite), default admission limits, pow 8 bits",
        "clients": CLIENTS, "client_cycles_per_s": CYCLES_PER_S, "cycle": "put + fetch",
        "phase_s": cfg.phase_s, "rounds": cfg.rounds, "ip_rate_limit_per_s": IP_RATE_PER_S,
        "flood_offered_per_s": flooder.rate,
        "flood_sent_per_s": round(flood_totals["sent"] / seconds, 1) if seconds else None,
        "flood_outcomes": dict(flood_totals), "client_errors": dict(errors),
        "samples_per_phase": statistics.median(figures["flood"]["n"]),
        "round_p99_ms": {k: [round(x, 2) for x in v["p99"]] for k, v in figures.items()},
    }  # fmt: skip
    for pct in ("p50", "p99"):
        loaded = statistics.median(figures["flood"][pct])
        unloaded = statistics.median(figures["unloaded"][pct])
        line = {
            **params,
            "slowdown": round(loaded / unloaded, 3),
            "target_slowdown": TARGET_SLOWDOWN,
        }
        n = int(params["samples_per_phase"])
        harness.report(f"storage.flood.{pct}", "ms", loaded, {"unloaded": unloaded}, n, line,
                       kind="latency")  # fmt: skip
    return 1 if errors else 0


async def run(root: Path, cfg: FloodConfig) -> int:
    node = LocalNode("flood-node", NODE_IP, root, [], command="dna-storage-node",
                     extra_toml=NODE_TOML)  # fmt: skip
    cycles_needed = int((WARMUP_S + 2 * cfg.rounds * cfg.phase_s) * CYCLES_PER_S) + CLIENTS
    clients = await asyncio.to_thread(build_clients, cycles_needed)
    flooder = Flooder(f"{NODE_IP}:{GRPC_PORT}", FLOOD_FACTOR * IP_RATE_PER_S)
    try:
        node.start()
        await asyncio.to_thread(wait_ready, [node], 45.0)
        await flooder.start()
        for client in clients:
            await client.start()
        figures = await measure(clients, flooder, cfg)
        return report(figures, flooder, clients, cfg)
    finally:
        await flooder.close()
        for client in clients:
            await client.close()
        if node.alive():
            node.kill()


def flooder_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The flooding client of bench.storage_flood.")
    parser.add_argument("--target", required=True, help="host:port of the storage node")
    parser.add_argument("--rate", type=float, required=True, help="puts offered per second")
    args = parser.parse_args(argv)
    asyncio.run(flood(args.target, args.rate))


if __name__ == "__main__":
    flooder_main()
