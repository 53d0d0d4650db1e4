"""Our replicated mailboxes against OpenDHT and Redis: put and fetch on a loopback network.

``uv run python -m bench.storage [--ops N] [--rounds R] [--pending P] [--redis-n N] [--quick]
[--sections throughput,flood,memory] [--unary] [--fetch-replicas R] [--no-guard]``

Sections (``--sections``, run in the order given; default ``flood,throughput``, ~4 min):

* ``flood``: flood fairness, :mod:`bench.storage_flood` (~1.5 min).
* ``throughput``: this module, below.
* ``memory``: a node holding 1,000,000 small blobs, :mod:`bench.storage_memory` (opt-in,
  ~3 min: ``--sections memory``; ``--memory-blobs``, ``--memory-blob-bytes``).

What the throughput section runs (issue 4, "Benchmarks"; conventions: shared
design/BENCH.md), all in one run:

* **Ours.** 1 bootstrap and 10 ``dna-storage-node`` processes (``LocalNode``, real TOML
  configs) on loopback addresses from the harness's allocator
  (``dna_testnet.harness``), in a temporary directory. Every storage node gets
  ``[admission]`` with ``pow_base_bits = 8`` and rate limits far above what this client
  sends (``ADMISSION_TOML``; reported in ``params``), so that the figures measure the put
  path, not the throttle. The client is a client-mode ``OverlayNode`` (``client_node``)
  with a ``MailboxClient`` (R = 5, W = 3, PoW 8 bits solved per put, as the client does),
  on mailbox sessions (one stream per node), or with ``--unary`` on the unary calls
  (``PutMany``, ``Fetch``, as before sessions):

  - ``put``: ``MailboxClient.put`` of envelopes sealed before any timing (sender Alice, 10
    recipient mailboxes in turn): the mailbox's candidates (a lookup, or the client's 30 s
    cache), then ``Put`` on the 5 replicas (each checks the PoW and stores in SQLite);
    fails unless W replicas stored it.
  With ``--fetch-replicas R`` (1-4) the fetches are made by a second client that reads
  only R replicas, and ``--no-guard`` runs the nodes without the connection guard (the
  relay in front of their gRPC port): what each costs a fetch, for the analysis in
  docs/performance.md, not a configuration to run (R < 3 breaks R + W > N).

  - ``fetch``: ``MailboxClient.fetch`` of one mailbox's pending blobs from a fresh cursor
    (10 other mailboxes, each loaded with ``--pending`` blobs before timing): the
    candidates (lookup or cache), then one signed ``Fetch`` request sent to the 5
    replicas, merged by blob ID; fails unless exactly the pending blobs come back.
* **Baselines**, in the order the goals judge them (issue 15): ``opendht-signed``,
  OpenDHT's authenticated path: 10 C++ OpenDHT nodes in this process, the clients started
  with RSA-4096 identities, ``putSigned`` and gets of signed values
  (:class:`bench.baselines.opendht_net.OpenDhtNet`, ``signed=True``); ``opendht``: the
  same unsigned (``put``/``get``), on a second network of 10 nodes; both with values of
  the envelopes' size, the same op counts, fresh client pairs per (round, mode). ``redis``: a
  ``redis-server`` (no persistence) on a free loopback port, measured with
  ``redis-benchmark -t set,get -n N -d <envelope size> -c <1 or 32> -q --csv``: the ceiling
  of a single in-memory server (no replication, no PoW, no lookups).

Each round runs seq (one op at a time) then c32 (32 in flight); within a mode the
contenders take turns in an order that reverses every round. A figure is the median round:
ops/s and the medians of each round's p50/p99 latency (ms). ``ratio`` is ours / OpenDHT for
ops/s, OpenDHT / ours for latencies (the first baseline: ``opendht-signed``).

Also printed: ``storage.{put,fetch}.cpu``, the CPU ms per op summed over every process
(ours: this client process and the 11 node processes, from ``/proc``; OpenDHT's: this
process, which runs its nodes); ``storage.{put,fetch}.floor``, our p50 beside the floor
of :mod:`bench.floor` (a stream round trip + a durable commit, alone or a 1/32 share);
and one ``{"goal": ...}`` line per goal of issue 15 with ``PASS``/``MISS``.
``{"detail": ...}`` lines give setup and failures.
The whole run is bounded by ``--budget`` (default 170 s); every process is stopped in
``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import functools
import os
import shutil
import socket
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dna_core.crypto import Identity, seal
from dna_core.mailbox import REPLICAS, WRITE_QUORUM, MailboxClient, blob_id
from dna_core.overlay.aio import OverlayNode
from dna_testnet.harness import Cluster, LocalDriver, local_cluster
from dna_testnet.network import client_node
from dna_testnet.topology import NodeSpec, Topology

from bench import floor, harness, storage_flood, storage_memory
from bench.harness import BatchOp, CpuMeter, Deadline, Figure, Goal, LoopbackNet, Rounds, Workload

OURS, OPENDHT, OPENDHT_SIGNED, REDIS = "ours", "opendht", "opendht-signed", "redis"
OPENDHT_NETS = (OPENDHT_SIGNED, OPENDHT)  # the first baseline is the goals' first judge
STORAGE_NODES = 10
MAILBOXES = 10
CONCURRENCY = 32
POW_BITS = 8
PAYLOAD_BYTES = 128  # the sealed envelope is ~4.7 kB (ML-KEM + ML-DSA overhead)
OP_TIMEOUT_S = 5.0
BATCH_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 45.0
BUDGET_S = 170.0
SECTIONS = ("throughput", "flood", "memory")
# Flood first: it measures small latency differences, and the throughput section leaves the
# machine loaded for a while (and may leave OpenDHT threads behind in this process).
DEFAULT_SECTIONS = ("flood", "throughput")  # memory is opt-in: its fill takes minutes
# Sizes: (default, with --quick).
DEFAULT_OPS, QUICK_OPS = 200, 20
DEFAULT_ROUNDS, QUICK_ROUNDS = 5, 1
DEFAULT_WARMUP, QUICK_WARMUP = 20, 5
DEFAULT_REDIS_N, QUICK_REDIS_N = 20_000, 2_000
DEFAULT_MEMORY_BLOBS, QUICK_MEMORY_BLOBS = 1_000_000, 10_000
DEFAULT_MEMORY_BLOB_BYTES = 512

ADMISSION: dict[str, float | int] = {
    "pow_base_bits": POW_BITS,
    "ip_rate_per_s": 1_000_000.0,
    "ip_burst": 1_000_000.0,
    "mailbox_rate_per_s": 1_000_000.0,
    "mailbox_burst": 1_000_000.0,
}
ADMISSION_TOML = "[admission]\n" + "".join(f"{k} = {v}\n" for k, v in ADMISSION.items())

# What a contender's harness.detail line gives of its figure over rounds (Rounds.median).
DETAIL_KEYS = ("ops_per_s", "p50_ms", "p99_ms", "failures", "rounds", "rounds_ops_per_s", "extra")


# ---------------------------------------------------------------------------- our network


class StorageFleet:
    """1 bootstrap + ``count`` storage node processes under ``root``: the harness's local
    cluster, on addresses from its allocator."""

    def __init__(self, root: Path, count: int = STORAGE_NODES, *, guard: bool = True) -> None:
        stores = (NodeSpec(f"store{i}", "storage") for i in range(count))
        topology = Topology((NodeSpec("boot", "bootstrap"), *stores))
        self.cluster: Cluster[LocalDriver] = local_cluster(
            root, topology, storage_toml=ADMISSION_TOML
        )
        self.nodes = self.cluster.driver.nodes
        for node in [] if guard else self.nodes:
            node.connections_toml += "grpc_connection_guard = false\n"
        self.seeds = self.cluster.seeds

    def start(self, timeout_s: float) -> None:
        self.cluster.start(timeout=timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.cluster.kill_all()

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]


class OurClient:
    """The measuring client: ``client_node`` plus a ``MailboxClient`` in this process."""

    def __init__(
        self,
        node: OverlayNode,
        node_pids: Sequence[int] = (),
        *,
        unary: bool = False,
        fetch_replicas: int = REPLICAS,
    ) -> None:
        self.node = node
        self.mailbox = MailboxClient(
            node, pow_bits=POW_BITS, timeout=OP_TIMEOUT_S, sessions=not unary
        )
        self.reader = self.mailbox  # the fetching client: a narrower one for the analysis
        if fetch_replicas != REPLICAS:
            self.reader = MailboxClient(
                node, replicas=fetch_replicas, pow_bits=POW_BITS, timeout=OP_TIMEOUT_S,
                sessions=not unary,
            )  # fmt: skip
        self.errors: Counter[str] = Counter()
        self.cpu = CpuMeter(node_pids)  # this process and every node process

    async def put_batch(
        self, items: Sequence[tuple[bytes, bytes]], concurrency: int, deadline: Deadline
    ) -> Figure:
        async def op(i: int) -> bool:
            fp, env = items[i]
            result = await self.mailbox.put(fp, env)
            return len(result.stored_on) >= WRITE_QUORUM

        return await self._measure("put", op, len(items), concurrency, deadline)

    async def fetch_batch(
        self,
        owners: Sequence[Identity],
        expected: dict[bytes, set[bytes]],
        count: int,
        concurrency: int,
        deadline: Deadline,
    ) -> Figure:
        async def op(i: int) -> bool:
            owner = owners[i % len(owners)]
            blobs, _ = await self.reader.fetch(owner)
            return {b.blob_id for b in blobs} == expected[owner.fingerprint]

        return await self._measure("fetch", op, count, concurrency, deadline)

    async def _measure(
        self, name: str, op: BatchOp, count: int, concurrency: int, deadline: Deadline
    ) -> Figure:
        self.cpu.start()
        res = await harness.run_batch(op, count, concurrency, OP_TIMEOUT_S, deadline, self.errors)
        ok = len(res.succeeded)
        extra = harness.cpu_ms_per_op(self.cpu.stop(), ok)
        if ok:  # where it went: this (client) process, the node processes
            client_s, nodes_s = self.cpu.split
            extra["client_cpu_ms_per_op"] = round(client_s * 1e3 / ok, 3)
            extra["nodes_cpu_ms_per_op"] = round(nodes_s * 1e3 / ok, 3)
        return harness.make_figure(
            OURS, name, concurrency, res.latencies, res.failures, count,
            STORAGE_NODES, res.wall_s, extra=extra, finished_s=res.finished_s,
        )  # fmt: skip


def seal_envelopes(sender: Identity, recipients: Sequence[Identity], count: int) -> list[bytes]:
    """``count`` envelopes, recipient i % len(recipients), distinct payloads."""
    return [
        seal(
            sender,
            recipients[i % len(recipients)].public,
            i.to_bytes(8, "big") + os.urandom(PAYLOAD_BYTES - 8),
            now_ms=harness.now_ms(),
        )
        for i in range(count)
    ]


# ---------------------------------------------------------------------------- redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisCeiling:
    """A throw-away ``redis-server`` (no persistence) measured with ``redis-benchmark``."""

    HOST = "127.0.0.1"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port(self.HOST)
        self.proc: asyncio.subprocess.Process | None = None
        self.bench_bin = shutil.which("redis-benchmark")
        self.server_bin = shutil.which("redis-server") or "/usr/bin/redis-server"

    async def start(self, timeout_s: float = 10.0) -> None:
        if self.bench_bin is None:
            raise RuntimeError("redis-benchmark not found")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            self.server_bin, "--port", str(self.port), "--bind", self.HOST,
            "--save", "", "--appendonly", "no", "--dir", str(self.root),
            "--daemonize", "no", "--protected-mode", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = Deadline(timeout_s)
        while not deadline.expired():
            if await self._command(b"PING\r\n") == b"+PONG\r\n":
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    async def _command(self, raw: bytes) -> bytes:
        try:
            reader, writer = await asyncio.open_connection(self.HOST, self.port)
        except OSError:
            return b""
        try:
            writer.write(raw)
            await writer.drain()
            async with asyncio.timeout(2.0):
                return await reader.readline()
        except (OSError, TimeoutError):
            return b""
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def version(self) -> str:
        return "redis-server (Debian), redis-benchmark " + str(self.bench_bin)

    async def measure(self, n: int, size: int, concurrency: int) -> dict[str, Figure]:
        """One ``redis-benchmark`` run of SET and GET: figures keyed "put"/"fetch"."""
        assert self.bench_bin is not None
        proc = await asyncio.create_subprocess_exec(
            self.bench_bin, "-h", self.HOST, "-p", str(self.port), "-t", "set,get",
            "-n", str(n), "-d", str(size), "-c", str(concurrency), "-q", "--csv",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(BATCH_TIMEOUT_S):
            out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed: {err.decode(errors='replace')}")
        figures: dict[str, Figure] = {}
        header: list[str] = []
        for line in out.decode().splitlines():
            cells = [c.strip('"') for c in line.strip().split(",")]
            if cells and cells[0] == "test":
                header = cells
                continue
            if not header or len(cells) != len(header) or cells[0] not in ("SET", "GET"):
                continue
            row = dict(zip(header, cells, strict=True))
            rps = float(row["rps"])
            figures["put" if cells[0] == "SET" else "fetch"] = Figure(
                baseline=REDIS, op="put" if cells[0] == "SET" else "fetch",
                mode=harness.mode_name(concurrency), ops_per_s=rps,
                p50_ms=float(row["p50_latency_ms"]) if "p50_latency_ms" in row else None,
                p99_ms=float(row["p99_latency_ms"]) if "p99_latency_ms" in row else None,
                failures=0, n=n, nodes=1, requested=n, elapsed_s=n / rps if rps else 0.0,
            )  # fmt: skip
        if set(figures) != {"put", "fetch"}:
            raise RuntimeError(f"unexpected redis-benchmark output: {out[:200]!r}")
        return figures

    async def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        await self._command(b"SHUTDOWN NOSAVE\r\n")
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Config:
    ops: int
    rounds: int
    warmup: int
    pending: int
    redis_n: int
    budget_s: float
    quick: bool
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    memory_blobs: int = DEFAULT_MEMORY_BLOBS
    memory_blob_bytes: int = DEFAULT_MEMORY_BLOB_BYTES
    profile: bool = False  # cProfile the client's first timed batches (--profile)
    unary: bool = False  # our client on the unary calls instead of sessions
    fetch_replicas: int = REPLICAS  # replicas a fetch reads (--fetch-replicas, analysis)
    guard: bool = True  # the nodes' connection guard (--no-guard, analysis)


@dataclass
class Workloads:
    """Everything sealed before timing: put envelopes and the fetch mailboxes' contents."""

    recipients: list[Identity]
    owners: list[Identity]  # fetch mailboxes
    puts: list[tuple[bytes, bytes]]
    fetch_blobs: list[tuple[bytes, bytes]]
    expected: dict[bytes, set[bytes]]
    envelope_bytes: int

    def take(self, count: int) -> list[tuple[bytes, bytes]]:
        items, self.puts = self.puts[:count], self.puts[count:]
        return items


def build_workloads(cfg: Config) -> Workloads:
    sender = Identity.generate()
    recipients = [Identity.generate() for _ in range(MAILBOXES)]
    owners = [Identity.generate() for _ in range(MAILBOXES)]
    total = 2 * cfg.warmup + 2 * cfg.rounds * cfg.ops
    envs = seal_envelopes(sender, recipients, total)
    puts = [(recipients[i % MAILBOXES].fingerprint, e) for i, e in enumerate(envs)]
    fetch_envs = seal_envelopes(sender, owners, cfg.pending * MAILBOXES)
    fetch_blobs = [(owners[i % MAILBOXES].fingerprint, e) for i, e in enumerate(fetch_envs)]
    expected: dict[bytes, set[bytes]] = {o.fingerprint: set() for o in owners}
    for fp, env in fetch_blobs:
        expected[fp].add(blob_id(env))
    size = round(statistics.median(len(e) for e in envs))
    return Workloads(recipients, owners, puts, fetch_blobs, expected, size)


class Contenders:
    """Our client, OpenDHT and Redis, up for the whole run."""

    def __init__(self, client: OurClient, work: Workloads, cfg: Config) -> None:
        self.client, self.work, self.cfg = client, work, cfg
        self.opendht: dict[str, LoopbackNet[Any]] = {}
        self.redis: RedisCeiling | None = None
        self.names: list[str] = [OURS]
        self.setup: dict[str, Any] = {}
        self.profiled: set[str] = set()  # modes whose first timed batches were profiled

    def _profiler(self, ops: int, concurrency: int) -> cProfile.Profile | None:
        """With ``--profile``: a running cProfile of this (client) process for the first
        timed batches of each mode (warm-ups are smaller than ``--ops``)."""
        mode = harness.mode_name(concurrency)
        if not self.cfg.profile or ops < self.cfg.ops or mode in self.profiled:
            return None
        return harness.cpu_profile()

    async def start_baselines(self, root: Path, timeout_s: float) -> None:
        for name in OPENDHT_NETS:
            new_net = functools.partial(
                opendht_net, self.work.envelope_bytes, signed=name == OPENDHT_SIGNED
            )
            net = await harness.start_baseline(name, new_net, timeout_s, self.setup)
            if net is not None:
                self.opendht[name] = net
                self.names.append(name)
        redis = RedisCeiling(root / "redis")
        try:
            await redis.start()
            self.redis = redis
            self.names.append(REDIS)
            self.setup[REDIS] = {"port": redis.port, "bench": redis.bench_bin}
        except Exception as exc:
            await redis.close()
            self.setup[REDIS] = {"error": repr(exc)}

    async def measure(
        self, name: str, ops: int, concurrency: int, pair: int, deadline: Deadline
    ) -> list[Figure]:
        if name == OURS:
            profiler = self._profiler(ops, concurrency)
            put = await self.client.put_batch(self.work.take(ops), concurrency, deadline)
            if profiler is not None:
                put_stats = harness.profile_summary(profiler, put.n - put.failures, "put")
                profiler = self._profiler(ops, concurrency)
            fetch = await self.client.fetch_batch(
                self.work.owners, self.work.expected, ops, concurrency, deadline
            )
            if profiler is not None:
                fetch_stats = harness.profile_summary(profiler, fetch.n - fetch.failures, "fetch")
                harness.detail({"profile": {"mode": put.mode, "put": put_stats,
                                            "fetch": fetch_stats}})  # fmt: skip
                self.profiled.add(put.mode)
            return [put, fetch]
        if name in self.opendht:
            net = self.opendht[name]
            put, stored = await net.put_batch(ops, concurrency, deadline, pairs=(pair,))
            get, _ = await net.get_batch(stored, concurrency, deadline, pairs=(pair,))
            return [put, dataclasses.replace(get, op="fetch")]  # compared with our fetch
        assert self.redis is not None
        n = self.cfg.redis_n if ops > self.cfg.warmup else max(100, ops)
        figs = await self.redis.measure(n, self.work.envelope_bytes, concurrency)
        return [figs["put"], figs["fetch"]]

    async def close(self) -> None:
        if self.redis is not None:
            redis, self.redis = self.redis, None
            await redis.close()
        nets, self.opendht = self.opendht, {}
        for net in reversed(nets.values()):
            await net.close()


def opendht_net(value_bytes: int, *, signed: bool = False) -> LoopbackNet[Any]:
    """OpenDHT's nodes, as many as ours, storing values of the envelopes' size
    (``signed``: its authenticated path)."""
    from bench.baselines.opendht_net import OpenDhtNet  # on use: a missing one is reported

    workload = Workload(value_bytes, value_bytes)
    return OpenDhtNet(STORAGE_NODES, op_timeout_s=OP_TIMEOUT_S, workload=workload, signed=signed)


async def preload(client: OurClient, work: Workloads) -> None:
    """Store the fetch mailboxes' pending blobs (not timed)."""
    deadline = Deadline(BATCH_TIMEOUT_S)
    fig = await client.put_batch(work.fetch_blobs, CONCURRENCY, deadline)
    if fig.failures:
        raise RuntimeError(f"preload: {fig.failures} puts failed: {dict(client.errors)}")


async def measure_rounds(con: Contenders, cfg: Config, budget: Deadline) -> Rounds:
    results = Rounds()
    # Warm-up: every contender, both modes, not reported.
    for concurrency in (1, CONCURRENCY):
        for name in con.names:
            await con.measure(name, cfg.warmup, concurrency, 0, budget.sub(BATCH_TIMEOUT_S, 15))
    con.client.errors.clear()
    for r in harness.timed_rounds(cfg.rounds, budget, reserve_s=15.0):
        order = con.names if r % 2 == 0 else con.names[::-1]
        for m, concurrency in enumerate((1, CONCURRENCY)):
            pair = 1 + 2 * r + m  # pair 0 did the warm-up
            for name in order:
                deadline = budget.sub(BATCH_TIMEOUT_S, reserve=15.0)
                for fig in await con.measure(name, cfg.ops, concurrency, pair, deadline):
                    results.add((fig.baseline, fig.op, fig.mode), fig)
    return results


def goals() -> list[Goal]:
    """Issue 15's goals for this bench: every figure ≥ 1.0x OpenDHT's authenticated path;
    against its unsigned path ≥ 0.5x one at a time and ≥ 1.0x 32 in flight; CPU per op
    within 2x of its unsigned path."""
    out = []
    for op in ("put", "fetch"):
        for concurrency in (1, CONCURRENCY):
            mode = harness.mode_name(concurrency)
            for figure in ("", ".p50", ".p99"):
                bench = f"storage.{op}{figure}"
                out.append(Goal(bench, OPENDHT_SIGNED, 1.0, mode))
                out.append(Goal(bench, OPENDHT, 0.5 if concurrency == 1 else 1.0, mode))
            out.append(Goal(f"storage.{op}.cpu", OPENDHT, 0.5, mode))
    return out


def report_floor(results: Rounds, work_floor: dict[str, Any]) -> list[dict[str, Any]]:
    """Our p50 beside the floor (``bench.floor``): ratio = floor / ours."""
    lines = []
    for op in ("put", "fetch"):
        for concurrency in (1, CONCURRENCY):
            mode = harness.mode_name(concurrency)
            ours = results.median((OURS, op, mode))
            if ours is None or ours["p50_ms"] is None:
                continue
            key = "fetch_ms" if op == "fetch" else f"put_{mode}_ms"
            params = {"mode": mode, "floor_parts": work_floor, "what": key,
                      "failures": {OURS: ours["failures"]}}  # fmt: skip
            lines.append(harness.report(f"storage.{op}.floor", "ms", ours["p50_ms"],
                                        {"floor": work_floor[key]}, ours["ops"], params,
                                        kind="latency"))  # fmt: skip
    return lines


def report(results: Rounds, cfg: Config, con: Contenders) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    baselines = [n for n in con.names if n != OURS]
    for op in ("put", "fetch"):
        for concurrency in (1, CONCURRENCY):
            mode = harness.mode_name(concurrency)
            ours = results.median((OURS, op, mode))
            if ours is None:
                continue
            base = {n: results.median((n, op, mode)) for n in baselines}
            failures = {OURS: ours["failures"]}
            failures.update({n: b["failures"] for n, b in base.items() if b is not None})
            params: dict[str, Any] = {
                "nodes": STORAGE_NODES, "mode": mode, "replicas": REPLICAS,
                "write_quorum": WRITE_QUORUM, "pow_bits": POW_BITS,
                "envelope_bytes": con.work.envelope_bytes, "mailboxes": MAILBOXES,
                "admission": ADMISSION, "rounds": ours["rounds"], "failures": failures,
                "baseline_ops": {OPENDHT_SIGNED: cfg.ops, OPENDHT: cfg.ops, REDIS: cfg.redis_n},
                "baseline_ops_name": {OPENDHT_SIGNED: "putSigned" if op == "put" else "get",
                                      OPENDHT: "put" if op == "put" else "get",
                                      REDIS: "SET" if op == "put" else "GET"},
            }  # fmt: skip
            if op == "fetch":
                params["pending_blobs"] = cfg.pending
                params["fetch_replicas"] = cfg.fetch_replicas
            params["guard"] = cfg.guard
            lines += harness.report_operation(f"storage.{op}", ours, base, cfg.ops, params)
            cpu = {n: b["extra"].get("cpu_ms_per_op") for n, b in base.items() if b is not None}
            cpu_params = {"mode": mode, "what": "CPU ms per op, every process",
                          "failures": failures}  # fmt: skip
            lines += harness.report_cpu(f"storage.{op}.cpu", ours["extra"].get("cpu_ms_per_op"),
                                        cpu, cfg.ops, cpu_params)  # fmt: skip
    for name in con.names:
        for op in ("put", "fetch"):
            for concurrency in (1, CONCURRENCY):
                mode = harness.mode_name(concurrency)
                med = results.median((name, op, mode))
                if med is not None:
                    summary = {key: med[key] for key in DETAIL_KEYS}
                    harness.detail({"contender": name, "op": op, "mode": mode, **summary})
    return lines


async def run(root: Path, cfg: Config) -> int:
    """The throughput section, its nodes' files under ``root``."""
    budget = Deadline(cfg.budget_s)
    t0 = time.perf_counter()
    fleet = StorageFleet(root, guard=cfg.guard)
    node: OverlayNode | None = None
    con: Contenders | None = None
    lines: list[dict[str, Any]] = []
    try:
        fleet_up = asyncio.create_task(asyncio.to_thread(fleet.start, READY_TIMEOUT_S))
        work = await asyncio.to_thread(build_workloads, cfg)  # seals while the nodes boot
        sealed_s = time.perf_counter() - t0
        await fleet_up
        ready_s = time.perf_counter() - t0
        node = await client_node(fleet.seeds)
        client = OurClient(node, fleet.pids(), unary=cfg.unary, fetch_replicas=cfg.fetch_replicas)
        await preload(client, work)
        con = Contenders(client, work, cfg)
        await con.start_baselines(root, min(40.0, budget.remaining()))
        floor_parts = await floor.measure(
            PAYLOAD_BYTES, n=max(30, min(200, cfg.ops)), sender_keys=False
        )
        harness.detail(
            {
                "setup": {
                    "root": str(root), "node_pids": fleet.pids(), "ops": cfg.ops,
                    "rounds": cfg.rounds, "warmup": cfg.warmup, "concurrency": CONCURRENCY,
                    "pending": cfg.pending, "redis_n": cfg.redis_n,
                    "our_transport": "unary" if cfg.unary else "session",
                    "fetch_replicas": cfg.fetch_replicas, "guard": cfg.guard,
                    "envelope_bytes": work.envelope_bytes, "sealed_s": round(sealed_s, 2),
                    "ours_ready_s": round(ready_s, 2), "baselines": con.setup,
                    "loadavg": harness.loadavg(), "floor": floor_parts,
                }
            }
        )  # fmt: skip
        results = await measure_rounds(con, cfg, budget)
        lines = report(results, cfg, con)
        lines += report_floor(results, floor_parts)
        harness.report_goals(lines, goals())
        harness.detail(
            {
                "elapsed_s": round(time.perf_counter() - t0, 1),
                "our_errors": dict(client.errors),
                "loadavg": harness.loadavg(),
            }
        )
    finally:
        if con is not None:
            await con.close()
        if node is not None:
            with contextlib.suppress(Exception):
                await node.stop()
        fleet.kill()
    return harness.exit_status(lines, OURS)


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = harness.arg_parser("Our mailboxes vs OpenDHT and Redis: put/fetch on loopback.")
    parser.add_argument(
        "--ops", type=int, default=None, help=f"ops per figure and round (default {DEFAULT_OPS})"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up ops per figure")
    parser.add_argument(
        "--pending", type=int, default=1, help="blobs pending in each fetched mailbox"
    )
    parser.add_argument(
        "--redis-n", type=int, default=None, help=f"redis-benchmark -n (default {DEFAULT_REDIS_N})"
    )
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="s for the throughput section"
    )
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument(
        "--memory-blobs", type=int, default=None, help="blobs held by the memory section's node"
    )
    parser.add_argument(
        "--memory-blob-bytes", type=int, default=DEFAULT_MEMORY_BLOB_BYTES, help="their size"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the client over its first timed put and fetch batches of each mode",
    )
    parser.add_argument(
        "--unary", action="store_true",
        help="our client on the unary calls (PutMany, Fetch) instead of mailbox sessions",
    )  # fmt: skip
    parser.add_argument(
        "--fetch-replicas",
        type=int,
        default=REPLICAS,
        choices=range(1, REPLICAS + 1),
        help="replicas our fetches read (analysis: what each replica asked costs)",
    )
    parser.add_argument(
        "--no-guard", dest="guard", action="store_false",
        help="storage nodes without the connection guard (analysis: what the relay costs)",
    )  # fmt: skip
    args: argparse.Namespace = parser.parse_args(argv)
    ops = harness.sized(args, args.ops or args.n, DEFAULT_OPS, QUICK_OPS)
    rounds = harness.sized(args, args.rounds, DEFAULT_ROUNDS, QUICK_ROUNDS)
    warmup = harness.sized(args, args.warmup, DEFAULT_WARMUP, QUICK_WARMUP)
    redis_n = harness.sized(args, args.redis_n, DEFAULT_REDIS_N, QUICK_REDIS_N)
    if ops < 1 or rounds < 1 or warmup < 1 or args.pending < 1 or redis_n < 1:
        raise SystemExit("--ops, --rounds, --warmup, --pending and --redis-n must be >= 1")
    sections = tuple(s for s in args.sections.split(",") if s)
    if not sections or set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections: choose from {', '.join(SECTIONS)}")
    blobs = harness.sized(args, args.memory_blobs, DEFAULT_MEMORY_BLOBS, QUICK_MEMORY_BLOBS)
    return Config(
        ops, rounds, warmup, args.pending, redis_n, args.budget, args.quick,
        sections, blobs, args.memory_blob_bytes, args.profile, args.unary,
        args.fetch_replicas, args.guard,
    )  # fmt: skip


async def run_section(name: str, cfg: Config) -> int:
    """One section, in a temporary directory of its own."""
    with harness.scratch_dir("storage") as root:
        if name == "throughput":
            return await run(root, cfg)
        if name == "flood":
            phase_s = storage_flood.QUICK_PHASE_S if cfg.quick else storage_flood.PHASE_S
            return await storage_flood.run(root, storage_flood.FloodConfig(cfg.rounds, phase_s))
        memory_cfg = storage_memory.MemoryConfig(
            cfg.memory_blobs, cfg.memory_blob_bytes, cfg.ops, cfg.rounds
        )
        return await storage_memory.run(root, memory_cfg)


async def run_sections(cfg: Config) -> int:
    """The sections in turn; the worst status wins."""
    status = 0
    for name in cfg.sections:
        status = max(status, await run_section(name, cfg))
    return status


def watchdog_s(cfg: Config) -> float:
    """When a hung run is stopped (with every thread's traceback): generous per section."""
    allowance = {"throughput": cfg.budget_s + 60, "flood": 600.0, "memory": 3600.0}
    return sum(allowance[name] for name in cfg.sections)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    harness.print_machine()
    return harness.run_main("bench.storage", lambda: run_sections(cfg), watchdog_s(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
