"""Worker process for ``bench.overlay``: hosts a slice of the benchmark's overlay nodes.

``python -m bench.overlay_nodes --first I --hosts IP,IP,.. [--bootstrap IP:PORT]`` starts
nodes ``I ..``, one on each loopback address given (the parent takes them from the node
harness's allocator), each wired as ``dna_core.overlay.aio.server``
wires a member (an ``OverlayNode`` in server mode and a ``grpc.aio`` server with the
``OverlayService`` over the node's ``RecordStore``), without the HTTP ops server, health,
reflection or the background refresh/republish loops (the benchmark is short). Ports are
ephemeral. Without ``--bootstrap`` node I is the seed and the others join it.

The parent talks to it in JSON lines: the worker prints ``{"ready": [[ip, udp_port], ...]}``
once its nodes have joined, then answers one line per command read on stdin:

* ``{"cmd": "refresh"}``: every node looks up a random ID in each of its buckets
  (``OverlayNode.refresh(0)``), so routing tables fill once every worker is up;
* ``{"cmd": "stats"}``: CPU seconds used so far, records held, routing-table sizes;
* ``{"cmd": "profile_start", "tag": T}`` / ``{"cmd": "profile_stop", "tag": T, "path": P}``:
  with the ``DNA_BENCH_PROFILE`` environment variable set, run tag T's cProfile (see
  :func:`new_profile`) in between, accumulating over calls, and write its stats to ``P``,
  ``{w}`` replaced by the index of the worker's first node (no-ops otherwise);
* ``{"cmd": "stop"}``: stop the gRPC servers and the nodes, reply, exit.

SIGTERM, SIGINT and end of stdin (the parent is gone) stop it the same way.
``DNA_BENCH_PATCH=module:function`` calls that function before any node starts (an
experiment hook: monkeypatch a candidate optimization into every process of a run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import importlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from dna_core.crypto import Identity, sign_record
from dna_core.crypto.keys import SEEDS_SIZE
from dna_core.crypto.node import NodeIdentity
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.overlay.aio import NodeConfig, OverlayNode
from dna_core.overlay.aio.records_rpc import MAX_GRPC_MESSAGE, OverlayService
from dna_core.overlay.aio.server import OVERLAY_DESCRIPTOR
from dna_core.overlay.contact import Contact
from dna_core.overlay.protocol import Addr
from dna_core.overlay.records import RecordStore, identity_payload, record_key
from dna_core.ratelimit import RateLimiter
from dna_core.wire.gen.dna.v1 import common_pb2

from bench.harness import DEFAULT_RCVBUF, VALUE_MAX, VALUE_MIN, cpu_s, emit

PROFILE_ENV = "DNA_BENCH_PROFILE"
PROFILE_CLOCK_ENV = "DNA_BENCH_PROFILE_CLOCK"  # "wall" (default) or "cpu"
PATCH_ENV = "DNA_BENCH_PATCH"
JOIN_CONCURRENCY = 8
STOP_GRACE_S = 0.5
RECORD_TTL_MS = 3_600_000
# The bench measures the overlay, not proof-of-work solving or per-source limits: its
# records carry a 0-bit identity proof and its nodes take any rate from the one client.
BENCH_POW_BITS = 0
BENCH_LIMITER = (1e9, 1e9, 1024)  # rate, burst, sources
IDENTITY = common_pb2.RECORD_KIND_IDENTITY

Item = tuple[bytes, bytes]  # (record key, SignedRecord bytes)


def apply_patch_hook() -> None:
    """Call ``DNA_BENCH_PATCH=module:function`` if set (experiments only)."""
    spec = os.environ.get(PATCH_ENV)
    if not spec:
        return
    module, _, name = spec.partition(":")
    hook: Callable[[], object] = getattr(importlib.import_module(module), name or "apply")
    hook()


def sign_range(start: int, count: int, now_ms: int) -> list[Item]:
    """Identity records ``start .. start+count-1`` for the benchmark's puts, signed now.

    One seeded identity per record: an identity record's key is bound to its signer.
    Payloads are random, of the baselines' value sizes. (Here, not in bench.overlay, so
    that a process pool can import it by name.)
    """
    out: list[Item] = []
    for i in range(start, start + count):
        seed = hashlib.shake_256(f"dna-bench-overlay/{i}".encode()).digest(SEEDS_SIZE)
        who = Identity(seed)
        key = record_key(IDENTITY, who.fingerprint)
        size = random.Random(i).randint(VALUE_MIN, VALUE_MAX)  # the baselines' value sizes
        payload = identity_payload(
            who.fingerprint, os.urandom(size).hex()[:size], pow_bits=BENCH_POW_BITS, now_ms=now_ms
        )
        raw = sign_record(
            who, kind=IDENTITY, key=key, seq=1, now_ms=now_ms, ttl_ms=RECORD_TTL_MS,
            payload=payload,
        )  # fmt: skip
        out.append((key, raw))
    return out


def set_rcvbuf(node: OverlayNode, size: int) -> int:
    """Ask for a ``size``-byte UDP receive buffer (0: keep the OS default); return the
    size the kernel granted (it doubles the request, capped by net.core.rmem_max)."""
    transport = node._transport
    assert transport is not None, "node not started"
    sock: socket.socket = transport.get_extra_info("socket")
    if size > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def new_profile() -> cProfile.Profile:
    """A cProfile on the wall clock: ``poll`` is idle time, and a ``sendto`` on loopback
    also counts the time the receiver it woke up held the CPU. ``DNA_BENCH_PROFILE_CLOCK=cpu``
    profiles this thread's CPU time instead, but its Python-level timer slows everything
    ~6x: lookups then time out and the figures mean nothing."""
    if os.environ.get(PROFILE_CLOCK_ENV, "wall") == "cpu":
        return cProfile.Profile(time.thread_time)
    return cProfile.Profile()


@dataclass
class BenchNode:
    node: OverlayNode
    server: grpc.aio.Server
    store: RecordStore


async def start_node(host: str, *, puzzle_bits: int, k: int, rcvbuf: int) -> BenchNode:
    """One member as ``OverlayServer.start`` builds it: node, record store, gRPC service."""
    identity, _ = NodeIdentity.generate(puzzle_bits)
    store = RecordStore(identity_pow_bits=BENCH_POW_BITS, max_records=10**7, max_bytes=1 << 40)
    config = NodeConfig(
        host=host,
        role=common_pb2.NODE_ROLE_STORAGE,
        puzzle_bits=puzzle_bits,
        k=k,
        allow_loopback=True,
        identity_pow_bits=BENCH_POW_BITS,
    )
    node = OverlayNode(identity, config, store=store)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ]
    )

    def local() -> Contact:
        assert node.contact is not None, "node not started"
        return node.contact

    service = OverlayService(
        store=store,
        closest=node.table.closest,
        local=local,
        k=k,
        limiter=RateLimiter(*BENCH_LIMITER),
        on_rejected=lambda reason: node.metrics.rejected.labels(reason=reason).inc(),
    )
    # Behind the same gate as a real node, so the figures include strict decoding.
    GrpcGate(max_message=MAX_GRPC_MESSAGE).add(server, service, OVERLAY_DESCRIPTOR)
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise OSError(f"cannot bind gRPC on {host}")
    await server.start()
    await node.start(grpc_port=port)
    set_rcvbuf(node, rcvbuf)
    return BenchNode(node, server, store)


async def stop_nodes(nodes: Sequence[BenchNode]) -> None:
    await asyncio.gather(*(n.server.stop(STOP_GRACE_S) for n in nodes), return_exceptions=True)
    await asyncio.gather(*(n.node.stop() for n in nodes), return_exceptions=True)


async def join_all(nodes: Sequence[BenchNode], seeds: list[Addr]) -> None:
    """Every node joins through ``seeds`` (a few at a time); raises if one cannot."""
    gate = asyncio.Semaphore(JOIN_CONCURRENCY)

    async def join(bench_node: BenchNode) -> None:
        node = bench_node.node
        targets = [a for a in seeds if a != node.udp_addr]
        if not targets:
            return
        async with gate:
            for _ in range(3):
                if await node.join(targets):
                    return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{node.udp_addr} could not join through {targets}")

    await asyncio.gather(*(join(n) for n in nodes))


class Worker:
    def __init__(self, nodes: list[BenchNode], index: int) -> None:
        self.nodes, self.index = nodes, index
        self.profiling = bool(os.environ.get(PROFILE_ENV))
        self._profiles: dict[str, cProfile.Profile] = {}  # by tag, accumulated

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("cmd")
        if name == "refresh":
            t0 = time.perf_counter()
            await asyncio.gather(*(n.node.refresh(0) for n in self.nodes))
            return {"ok": name, "s": round(time.perf_counter() - t0, 3), **self.stats()}
        if name == "stats":
            return {"ok": name, **self.stats()}
        if name == "profile_start":
            if self.profiling:
                tag = str(cmd["tag"])
                if tag not in self._profiles:
                    self._profiles[tag] = new_profile()
                self._profiles[tag].enable()
            return {"ok": name, "profiling": self.profiling}
        if name == "profile_stop":
            profile = self._profiles.get(str(cmd["tag"]))
            if profile is not None:
                profile.disable()
                profile.dump_stats(str(cmd["path"]).replace("{w}", str(self.index)))
            return {"ok": name}
        return {"error": f"unknown command {name!r}"}

    def stats(self) -> dict[str, Any]:
        return {
            "cpu_s": round(cpu_s(), 3),
            "records": sum(len(n.store) for n in self.nodes),
            "tables": [len(n.node.table) for n in self.nodes],
        }


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(
    first: int, hosts: list[str], bootstrap: Addr | None, puzzle_bits: int, k: int, rcvbuf: int
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    nodes: list[BenchNode] = []
    try:
        for host in hosts:
            nodes.append(await start_node(host, puzzle_bits=puzzle_bits, k=k, rcvbuf=rcvbuf))
        seeds = [bootstrap] if bootstrap is not None else [nodes[0].node.udp_addr]
        await join_all(nodes, seeds)
        worker = Worker(nodes, first)
        emit({"ready": [list(n.node.udp_addr) for n in nodes], "pid": os.getpid()})
        reader = await _stdin_lines()
        while not stopping.is_set():
            line_task = asyncio.ensure_future(reader.readline())
            stop_task = asyncio.ensure_future(stopping.wait())
            done, _ = await asyncio.wait(
                {line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (line_task, stop_task):
                if task not in done:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if line_task not in done:
                break
            line = line_task.result()
            if not line:  # the parent closed our stdin: it is gone or done
                break
            cmd = json.loads(line)
            if cmd.get("cmd") == "stop":
                break
            emit(await worker.handle(cmd))
    finally:
        await stop_nodes(nodes)
    emit({"ok": "stop"})


def _parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="host overlay nodes for bench.overlay")
    parser.add_argument("--first", type=int, required=True, help="index of the first node")
    parser.add_argument(
        "--hosts", type=lambda text: text.split(","), required=True,
        help="one loopback address per node to host, comma-separated",
    )  # fmt: skip
    parser.add_argument("--bootstrap", type=_parse_addr, default=None, help="IP:UDP_PORT")
    parser.add_argument("--puzzle-bits", type=int, default=4)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rcvbuf", type=int, default=DEFAULT_RCVBUF, help="0: OS default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    apply_patch_hook()
    asyncio.run(
        serve(args.first, args.hosts, args.bootstrap, args.puzzle_bits, args.k, args.rcvbuf)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
