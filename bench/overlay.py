"""Our overlay against OpenDHT and ``kademlia``: store and find-value on N loopback nodes.

``uv run python -m bench.overlay [--nodes 50] [--ops N] [--rounds R] [--quick]
[--skip-baselines] [--unary]``

What runs (issue 3, "Real overlay benchmark"; conventions: shared design/BENCH.md):

* **Ours.** N overlay nodes, each on a loopback address of its own (from the node
  harness's allocator), hosted by ``--workers`` (2)
  subprocesses (:mod:`bench.overlay_nodes`: an ``OverlayNode`` in server mode, puzzle 4
  bits, loopback allowed, plus a ``grpc.aio`` server with the ``OverlayService``), so
  the measuring client has this process to itself. The client is an ``OverlayNode`` in
  client mode that joins through three nodes (its stores and find-values on record
  sessions, one ``Overlay.Session`` stream per node; with ``--unary`` on the unary
  ``Store``/``FindValue`` calls, as before issue 15), then

  - ``put``: stores pre-signed identity records (one identity per record: identity keys
    are bound to their signer; signing happens before any timing, in a process pool).
    Default (``replicas`` 8): ``OverlayNode.put_record`` (a lookup, then
    ``records.store`` on the ``RECORD_REPLICAS`` = 8 closest it found, as OpenDHT stores
    a value on 8 nodes, without signatures); every replica verifies the hybrid
    ML-DSA-65+Ed25519 signature. Variant ``replicas`` 20: ``records.store`` on all k=20
    nodes found (the replica count before issue 15).
    A put fails unless a majority of the replicas it targeted accepted it.
  - ``get``: ``OverlayNode.get_record(key)`` (a lookup, then ``records.find_value`` on
    the 5 closest); it fails unless it returns the record put, byte for byte. The client
    keeps no records of its own, so it reads what it wrote without a local shortcut.

  Each op's lookup time (the client node's ``find_node`` is wrapped) and the rest
  (gRPC calls, verification) are reported apart (``lookup_*_ms``/``rpc_*_ms`` in the
  detail lines), with the UDP queries per op, why ops failed, and the CPU each side
  (client process and its loop thread, node workers) spent per op.
* **Baselines**, the adapters in :mod:`bench.baselines`, in the order the goals judge them
  (issue 15): OpenDHT's authenticated path (``opendht-signed``: ``OpenDhtNet`` with
  ``signed=True``, the clients started with RSA-4096 identities, ``putSigned`` and gets of
  signed values), its unsigned path (``opendht``, a second network; 8 replicas, no
  signatures), both the same node count of C++ nodes in this process's native threads,
  and ``kademlia`` nodes (``KademliaNet``, k=20, one asyncio loop),
  the same number of ops per figure; puts from a writer node, gets of those keys from
  a different reader node (a kademlia get may be answered from the reader's own store:
  ``local_hits``).

All three networks stay up for the whole run and take turns: every round runs, for
``seq`` (one op at a time) and then ``c32`` (32 in flight), each contender's puts then
gets of the keys it stored, in an order that reverses from one round to the next; every
(round, mode) uses fresh baseline client pairs so no figure pays for the keys of the one
before (see ``bench.baselines.opendht_net``). A figure is the median round: ops/s, and
the medians of each round's p50/p99 latency, in ms. ``ratio`` is ours / OpenDHT for ops/s,
OpenDHT / ours for latencies (above 1.0: we are ahead; the first baseline,
``opendht-signed``). ``overlay.{put,get}.cpu`` lines give the CPU ms per op summed over
every process (ours: the client and the node workers; OpenDHT's: this process), and one
``{"goal": ...}`` line per goal of issue 15 (our put/get, seq and c32, ≥ 1.0x OpenDHT's
``putSigned`` and signed get) says ``PASS`` or ``MISS``. Besides the figure lines, a few
``{"detail": ...}`` lines give the setup, failures and the per-op breakdown.

Profiling: with ``DNA_BENCH_PROFILE=DIR`` every process (client and workers) runs
cProfile on its event loop thread during our timed batches only, one stats file per
figure and process (``DIR/put-seq-r20.client.pstats``, ``...w0.pstats``); read them with
``pstats``. Wall clock by default (``bench.overlay_nodes.new_profile``: ``poll`` is idle
time; ``sendto`` includes being preempted by the woken receiver). Time spent in gRPC's
Cython layer shows up as the ``tottime`` of ``Context.run``. Profiling halves throughput.
``DNA_BENCH_PATCH=module:function`` is called in every process before any node starts
(for measuring a candidate optimization; never set in regular runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dna_core.crypto.node import NodeIdentity
from dna_core.hostport import host_port
from dna_core.overlay.aio import RECORD_REPLICAS, NodeConfig, OverlayNode
from dna_core.overlay.contact import Contact
from dna_core.overlay.protocol import Addr
from dna_testnet.harness import LOOPBACK

from bench import harness
from bench.harness import DEFAULT_RCVBUF, BatchOp, Deadline, Figure, Goal, LoopbackNet, Rounds
from bench.overlay_nodes import (
    BENCH_POW_BITS,
    PATCH_ENV,
    PROFILE_ENV,
    Item,
    apply_patch_hook,
    new_profile,
    set_rcvbuf,
    sign_range,
)

DEFAULT_NODES, QUICK_NODES = 50, 12
DEFAULT_OPS, QUICK_OPS = 150, 12
DEFAULT_ROUNDS, QUICK_ROUNDS = 3, 1
DEFAULT_WARMUP, QUICK_WARMUP = 20, 4
CONCURRENCY = 32
K = 20
REPLICAS = (RECORD_REPLICAS, K)  # ours (put_record, as OpenDHT: 8) and all k found
GET_HOLDERS = 5  # OverlayNode.get_record's default
PUZZLE_BITS = 4
OP_TIMEOUT_S = 5.0
BATCH_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 30.0
BUDGET_S = 165.0  # the whole run, start-up and shut-down included, stays under 3 min
OURS, OPENDHT, OPENDHT_SIGNED, KADEMLIA = "ours", "opendht", "opendht-signed", "kademlia"
BASELINES = (OPENDHT_SIGNED, OPENDHT, KADEMLIA)
RPC_METRIC = "dna_overlay_rpcs_total"


# ---------------------------------------------------------------------------- records


class RecordSigner:
    """Signs the run's records in a pool of spawned processes while the networks start."""

    def __init__(self, count: int, processes: int) -> None:
        signed_at = harness.now_ms()
        workers = max(1, processes)
        chunk = max(1, -(-count // workers))
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        loop = asyncio.get_running_loop()
        self._parts = [
            loop.run_in_executor(
                self._pool, sign_range, start, min(chunk, count - start), signed_at
            )
            for start in range(0, count, chunk)
        ]

    async def result(self) -> list[Item]:
        try:
            done = await asyncio.gather(*self._parts)
        finally:
            self.close()
        return [item for part in done for item in part]

    def close(self) -> None:
        for part in self._parts:
            part.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- our network


@dataclass
class _Proc:
    proc: asyncio.subprocess.Process
    index: int
    addrs: list[Addr] = field(default_factory=list)


class OverlayFleet:
    """The benchmark's overlay nodes, in ``workers`` subprocesses (bench.overlay_nodes)."""

    def __init__(
        self, nodes: int, workers: int, *, puzzle_bits: int = PUZZLE_BITS, rcvbuf: int = 0
    ) -> None:
        if nodes < 2:
            raise ValueError("need at least 2 nodes")
        self.nodes = nodes
        self.workers = max(1, min(workers, nodes))
        self.puzzle_bits = puzzle_bits
        self.rcvbuf = rcvbuf
        self.procs: list[_Proc] = []
        self.hosts = LOOPBACK.take(nodes)

    @property
    def addrs(self) -> list[Addr]:
        return [a for p in self.procs for a in p.addrs]

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the workers (the first hosts the seed node), join, then fill the tables."""
        share, extra = divmod(self.nodes, self.workers)
        counts = [share + (w < extra) for w in range(self.workers)]
        async with asyncio.timeout(timeout_s):
            first = 0
            for w, count in enumerate(counts):
                boot = None if w == 0 else self.procs[0].addrs[0]
                await self._spawn(w, first, count, boot)
                first += count
            await asyncio.gather(*(self._await_ready(p) for p in self.procs))
            await self.command_all({"cmd": "refresh"})

    async def _spawn(self, index: int, first: int, count: int, boot: Addr | None) -> None:
        argv = [
            sys.executable, "-m", "bench.overlay_nodes", "--first", str(first),
            "--hosts", ",".join(self.hosts[first : first + count]),
            "--puzzle-bits", str(self.puzzle_bits), "--k", str(K), "--rcvbuf", str(self.rcvbuf),
        ]  # fmt: skip
        if boot is not None:
            argv += ["--bootstrap", host_port(*boot)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
            limit=1 << 20,
        )
        entry = _Proc(proc, index)
        self.procs.append(entry)
        if index == 0:  # the others bootstrap from its seed: wait for it now
            await self._await_ready(entry)

    async def _await_ready(self, entry: _Proc) -> None:
        if entry.addrs:
            return
        reply = await self._read(entry)
        entry.addrs = [(str(ip), int(port)) for ip, port in reply["ready"]]

    async def _read(self, entry: _Proc) -> dict[str, Any]:
        assert entry.proc.stdout is not None
        line = await entry.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"overlay worker {entry.index} exited ({entry.proc.returncode})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"overlay worker {entry.index}: {reply['error']}")
        return reply

    async def command(self, entry: _Proc, cmd: dict[str, Any]) -> dict[str, Any]:
        assert entry.proc.stdin is not None
        entry.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await entry.proc.stdin.drain()
        return await self._read(entry)

    async def command_all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.command(p, cmd) for p in self.procs)))

    async def cpu_s(self) -> float:
        return sum(float(r["cpu_s"]) for r in await self.command_all({"cmd": "stats"}))

    async def close(self, timeout_s: float = 8.0) -> None:
        """Ask every worker to stop; SIGTERM, then SIGKILL, those still running."""
        procs, self.procs = self.procs, []
        for entry in procs:
            stdin = entry.proc.stdin
            if entry.proc.returncode is None and stdin is not None:
                with contextlib.suppress(Exception):
                    stdin.write(b'{"cmd": "stop"}\n')
                    stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            waiting = [e.proc for e in procs if e.proc.returncode is None]
            if not waiting:
                break
            if sig is not None:
                for proc in waiting:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s / 3):
                    await asyncio.gather(*(p.wait() for p in waiting))


# ---------------------------------------------------------------------------- batches


@dataclass
class OpTimes:
    """Per-op split of our ops: the lookup, then the gRPC calls (seconds, successful ops)."""

    lookup: list[float] = field(default_factory=list)
    rpc: list[float] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


def _ms_stats(prefix: str, seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ordered = sorted(seconds)
    return {
        f"{prefix}_mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
        f"{prefix}_p50_ms": round(harness.percentile(ordered, 0.5) * 1e3, 3),
        f"{prefix}_p99_ms": round(harness.percentile(ordered, 0.99) * 1e3, 3),
    }


class OurClient:
    """The measuring client: an OverlayNode in client mode, in this process."""

    def __init__(self, fleet: OverlayFleet, *, unary: bool = False) -> None:
        self.fleet = fleet
        self.node = OverlayNode(
            NodeIdentity.generate(0)[0],
            NodeConfig(
                host="127.0.0.1", puzzle_bits=fleet.puzzle_bits, k=K, client_mode=True,
                allow_loopback=True, identity_pow_bits=BENCH_POW_BITS,
                record_sessions=not unary,
            ),
        )  # fmt: skip
        self.profile_dir = os.environ.get(PROFILE_ENV) or None
        self.rcvbuf = 0
        self._profiles: dict[str, cProfile.Profile] = {}
        self._lookup_s: dict[asyncio.Task[Any] | None, float] = {}  # per op's task
        self._time_lookups()

    async def start(self) -> int:
        await self.node.start()
        self.rcvbuf = set_rcvbuf(self.node, self.fleet.rcvbuf)
        addrs = self.fleet.addrs
        seeds = [addrs[0], addrs[len(addrs) // 2], addrs[-1]]
        size = await self.node.join(seeds)
        if not size:
            raise RuntimeError("the client could not join the overlay")
        # One more lookup of a random ID, so the client's table is past its first crawl.
        await self.node.find_node(os.urandom(32))
        return len(self.node.table)

    async def stop(self) -> None:
        await self.node.stop()

    def _udp_counts(self) -> tuple[float, float]:
        registry = self.node.metrics.registry

        def value(outcome: str) -> float:
            labels = {"direction": "out", "method": "findnode", "outcome": outcome}
            return registry.get_sample_value(RPC_METRIC, labels) or 0.0

        return value("ok"), value("timeout")

    def _time_lookups(self) -> None:
        """Wrap this node's ``find_node`` so each op can tell its lookup time from the rest
        (``put_record``/``get_record`` call it through the instance; ops run one per task)."""
        lookup = self.node.find_node
        spent = self._lookup_s

        async def timed(target: bytes, *, paths: int = 1) -> list[Contact]:
            t0 = time.perf_counter()
            try:
                return await lookup(target, paths=paths)
            finally:
                task = asyncio.current_task()
                spent[task] = spent.get(task, 0.0) + time.perf_counter() - t0

        setattr(self.node, "find_node", timed)  # noqa: B010 - shadows the bound method

    def _split(self, t0: float, times: OpTimes) -> None:
        """Record a successful op's lookup and gRPC parts (everything but the lookup)."""
        lookup = self._lookup_s.pop(asyncio.current_task(), 0.0)
        times.lookup.append(lookup)
        times.rpc.append(time.perf_counter() - t0 - lookup)

    async def put_batch(
        self,
        items: Sequence[Item],
        replicas: int,
        concurrency: int,
        deadline: Deadline,
        tag: str | None,
    ) -> tuple[Figure, list[Item]]:
        node, times = self.node, OpTimes()
        expected = min(replicas, self.fleet.nodes)

        async def op(i: int) -> bool:
            key, raw = items[i]
            self._lookup_s.pop(asyncio.current_task(), None)
            t0 = time.perf_counter()
            if replicas == RECORD_REPLICAS:
                accepted = await node.put_record(raw, key)
            else:
                accepted = await node.records.store(raw, (await node.find_node(key))[:replicas])
            ok = 2 * accepted > expected  # a majority of the replicas it meant to reach
            if ok:
                self._split(t0, times)
                times.accepted.append(accepted)
            return ok

        return await self._batch("put", op, items, concurrency, deadline, tag, times)

    async def get_batch(
        self, items: Sequence[Item], concurrency: int, deadline: Deadline, tag: str | None
    ) -> tuple[Figure, list[Item]]:
        node, times = self.node, OpTimes()

        async def op(i: int) -> bool:
            key, raw = items[i]
            self._lookup_s.pop(asyncio.current_task(), None)
            t0 = time.perf_counter()
            found = await node.get_record(key)
            ok = found is not None and found.raw == raw
            if ok:
                self._split(t0, times)
            return ok

        return await self._batch("get", op, items, concurrency, deadline, tag, times)

    async def _batch(
        self,
        name: str,
        op: BatchOp,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        tag: str | None,
        times: OpTimes,
    ) -> tuple[Figure, list[Item]]:
        profile = tag is not None and self._profile_start(tag)
        if profile:
            await self.fleet.command_all({"cmd": "profile_start", "tag": tag})
        workers_cpu0 = await self.fleet.cpu_s()
        udp0, drops0 = self._udp_counts(), harness.udp_rcvbuf_errors()
        cpu0, loop_cpu0 = time.process_time(), time.thread_time()
        errors: Counter[str] = Counter()
        res = await harness.run_batch(op, len(items), concurrency, OP_TIMEOUT_S, deadline, errors)
        cpu1, loop_cpu1 = time.process_time(), time.thread_time()
        udp1 = self._udp_counts()
        workers_cpu = await self.fleet.cpu_s() - workers_cpu0
        if profile and tag is not None:
            self._profile_stop(tag)
            path = f"{self.profile_dir}/{tag}.w{{w}}.pstats"
            await self.fleet.command_all({"cmd": "profile_stop", "tag": tag, "path": path})
        done = max(1, len(res.latencies) + res.failures)
        extra: dict[str, Any] = {
            **_ms_stats("lookup", times.lookup),
            **_ms_stats("rpc", times.rpc),
            "udp_queries_per_op": round((udp1[0] - udp0[0]) / done, 2),
            "udp_timeouts": int(udp1[1] - udp0[1]),
            "client_cpu_ms_per_op": round((cpu1 - cpu0) * 1e3 / done, 3),
            "client_loop_cpu_ms_per_op": round((loop_cpu1 - loop_cpu0) * 1e3 / done, 3),
            "workers_cpu_ms_per_op": round(workers_cpu * 1e3 / done, 3),
            **harness.cpu_ms_per_op(cpu1 - cpu0 + workers_cpu, len(res.succeeded)),
            **harness.udp_drops_since(drops0),
        }
        extra.update({f"failed_{reason}": n for reason, n in sorted(errors.items())})
        if times.accepted:
            extra["replicas_accepted_mean"] = round(statistics.fmean(times.accepted), 2)
        fig = harness.make_figure(
            OURS, name, concurrency, res.latencies, res.failures, len(items), self.fleet.nodes,
            res.wall_s, extra=extra, finished_s=res.finished_s,
        )  # fmt: skip
        return fig, [items[i] for i in res.succeeded]

    def _profile_start(self, tag: str) -> bool:
        if self.profile_dir is None:
            return False
        if tag not in self._profiles:
            self._profiles[tag] = new_profile()
        self._profiles[tag].enable()
        return True

    def _profile_stop(self, tag: str) -> None:
        profile = self._profiles[tag]
        profile.disable()
        profile.dump_stats(f"{self.profile_dir}/{tag}.client.pstats")


# ---------------------------------------------------------------------------- baselines


class Baselines:
    """OpenDHT and kademlia networks (bench.baselines), up for the whole run."""

    def __init__(self, nodes: int, names: Sequence[str]) -> None:
        self.nodes = nodes
        self.names = list(names)
        self.nets: dict[str, LoopbackNet[Any]] = {}
        self.setup: dict[str, Any] = {}

    async def start(self, timeout_s: float) -> None:
        for name in list(self.names):
            net = await harness.start_baseline(
                name, functools.partial(new_net, name, self.nodes), timeout_s, self.setup
            )
            if net is None:
                self.names.remove(name)
            else:
                self.nets[name] = net

    def max_pairs(self) -> int:
        return max(1, (self.nodes - 1) // 2)

    async def measure(
        self, name: str, ops: int, concurrency: int, pair: int, deadline: Deadline
    ) -> tuple[Figure, Figure]:
        """Puts of ``ops`` fresh keys from pair ``pair``'s writer, then gets by its reader."""
        net, pairs = self.nets[name], (pair % self.max_pairs(),)
        put, stored = await net.put_batch(ops, concurrency, deadline, pairs=pairs)
        get, _ = await net.get_batch(stored, concurrency, deadline, pairs=pairs)
        return put, get

    async def close(self) -> None:
        nets, self.nets = self.nets, {}
        for net in reversed(nets.values()):  # the last started first
            await net.close()


def new_net(name: str, nodes: int) -> LoopbackNet[Any]:
    """A baseline network, imported on use: one whose package is missing is reported."""
    if name in (OPENDHT, OPENDHT_SIGNED):
        from bench.baselines.opendht_net import OpenDhtNet

        return OpenDhtNet(nodes, op_timeout_s=OP_TIMEOUT_S, signed=name == OPENDHT_SIGNED)
    from bench.baselines.kademlia_net import KademliaNet

    return KademliaNet(nodes, op_timeout_s=OP_TIMEOUT_S)


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Config:
    nodes: int
    ops: int
    rounds: int
    warmup: int
    workers: int
    rcvbuf: int
    baselines: tuple[str, ...]
    budget_s: float
    quick: bool
    ready_timeout_s: float = READY_TIMEOUT_S
    unary: bool = False  # our client on the unary Store/FindValue instead of record sessions


async def _ours_round(
    client: OurClient,
    *,
    records: dict[int, list[Item]],
    replicas: int,
    ops: int,
    concurrency: int,
    deadline: Deadline,
    results: Rounds,
) -> None:
    items = records[replicas][:ops]
    del records[replicas][: len(items)]
    mode = harness.mode_name(concurrency)
    contender = f"{OURS}-r{replicas}"
    put, stored = await client.put_batch(
        items, replicas, concurrency, deadline, f"put-{mode}-r{replicas}"
    )
    get, _ = await client.get_batch(stored, concurrency, deadline, f"get-{mode}-r{replicas}")
    results.add((contender, "put", mode), put)
    results.add((contender, "get", mode), get)


async def warm_up(
    client: OurClient, records: dict[int, list[Item]], baselines: Baselines, cfg: Config
) -> None:
    """A few puts and gets of each contender, seq then c32, not reported."""
    deadline = Deadline(BATCH_TIMEOUT_S)
    for concurrency in (1, CONCURRENCY):
        for replicas in REPLICAS:
            items = records[replicas][: cfg.warmup]
            del records[replicas][: len(items)]
            _, stored = await client.put_batch(items, replicas, concurrency, deadline, None)
            await client.get_batch(stored, concurrency, deadline, None)
        for name in baselines.names:
            await baselines.measure(name, cfg.warmup, concurrency, 0, deadline)


async def measure_rounds(
    client: OurClient,
    records: dict[int, list[Item]],
    baselines: Baselines,
    cfg: Config,
    budget: Deadline,
) -> Rounds:
    results = Rounds()
    contenders: list[str] = [*(f"{OURS}-r{r}" for r in REPLICAS), *baselines.names]
    for r in harness.timed_rounds(cfg.rounds, budget, reserve_s=10.0):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for m, concurrency in enumerate((1, CONCURRENCY)):
            pair = 1 + 2 * r + m  # pair 0 did the warm-up
            for contender in order:
                deadline = budget.sub(BATCH_TIMEOUT_S, reserve=10.0)
                if contender.startswith(OURS):
                    replicas = int(contender.rsplit("r", 1)[1])
                    await _ours_round(
                        client, records=records, replicas=replicas, ops=cfg.ops,
                        concurrency=concurrency, deadline=deadline, results=results,
                    )  # fmt: skip
                else:
                    put, get = await baselines.measure(
                        contender, cfg.ops, concurrency, pair, deadline
                    )
                    results.add((contender, "put", put.mode), put)
                    results.add((contender, "get", get.mode), get)
    return results


def report(results: Rounds, cfg: Config, baselines: Sequence[str]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for op in ("put", "get"):
        for concurrency in (1, CONCURRENCY):
            mode = harness.mode_name(concurrency)
            base = {name: results.median((name, op, mode)) for name in baselines}
            for replicas in REPLICAS:
                ours = results.median((f"{OURS}-r{replicas}", op, mode))
                if ours is None:
                    continue
                failures = {OURS: ours["failures"]}
                failures.update({n: b["failures"] for n, b in base.items() if b is not None})
                params = {
                    "nodes": cfg.nodes, "mode": mode, "replicas": replicas,
                    "baseline_replicas": {OPENDHT_SIGNED: 8, OPENDHT: 8, KADEMLIA: K},
                    "rounds": ours["rounds"], "failures": failures,
                }  # fmt: skip
                if op == "get":
                    params["holders"] = GET_HOLDERS
                lines += harness.report_operation(f"overlay.{op}", ours, base, cfg.ops, params)
                cpu = {n: b["extra"].get("cpu_ms_per_op") for n, b in base.items() if b}
                lines += harness.report_cpu(
                    f"overlay.{op}.cpu",
                    ours["extra"].get("cpu_ms_per_op"),
                    cpu,
                    cfg.ops,
                    {**params, "what": "CPU ms per op, every process"},
                )
    return lines


def goals() -> list[Goal]:
    """Issue 15's overlay goals: put and get, seq and c32, ≥ 1.0x OpenDHT's ``putSigned``
    and signed get (judged on our default, k = 20 replicas: the first figure printed)."""
    return [
        Goal(f"overlay.{op}{figure}", OPENDHT_SIGNED, 1.0, harness.mode_name(concurrency))
        for op in ("put", "get")
        for concurrency in (1, CONCURRENCY)
        for figure in ("", ".p50", ".p99")
    ]


def report_details(results: Rounds, contenders: Sequence[str]) -> None:
    for op in ("put", "get"):
        for concurrency in (1, CONCURRENCY):
            mode = harness.mode_name(concurrency)
            for name in contenders:
                med = results.median((name, op, mode))
                if med is None:
                    continue
                summary = {
                    "contender": name, "op": op, "mode": mode,
                    "ops_per_s": round(med["ops_per_s"], 1),
                    "p50_ms": med["p50_ms"] and round(med["p50_ms"], 3),
                    "p99_ms": med["p99_ms"] and round(med["p99_ms"], 3),
                    "failures": med["failures"], "ops": med["ops"],
                    "rounds_ops_per_s": med["rounds_ops_per_s"],
                    **med["extra"],
                }  # fmt: skip
                harness.detail(summary)


async def run(cfg: Config) -> int:
    budget = Deadline(cfg.budget_s)
    t0 = time.perf_counter()
    per_round = cfg.rounds * 2  # modes
    wanted = {r: cfg.warmup * 2 + cfg.ops * per_round for r in REPLICAS}
    signer = RecordSigner(sum(wanted.values()), harness.machine_info()["nproc"] or 1)
    fleet = OverlayFleet(cfg.nodes, cfg.workers, rcvbuf=cfg.rcvbuf)
    baselines = Baselines(cfg.nodes, cfg.baselines)
    client: OurClient | None = None
    lines: list[dict[str, Any]] = []
    try:
        await fleet.start(cfg.ready_timeout_s)
        signed = await signer.result()
        records = {20: signed[: wanted[20]], 8: signed[wanted[20] :]}
        client = OurClient(fleet, unary=cfg.unary)
        table = await client.start()
        setup_s = time.perf_counter() - t0
        await baselines.start(min(cfg.ready_timeout_s, budget.remaining()))
        stats = await fleet.command_all({"cmd": "stats"})
        harness.detail(
            {
                "setup": {
                    "nodes": cfg.nodes, "workers": len(fleet.procs),
                    "worker_pids": [e.proc.pid for e in fleet.procs], "ops": cfg.ops,
                    "rounds": cfg.rounds, "warmup": cfg.warmup, "concurrency": CONCURRENCY,
                    "records_signed": len(signed), "ours_ready_s": round(setup_s, 2),
                    "client_table": table, "rcvbuf_bytes": client.rcvbuf,
                    "node_tables_min": min(t for s in stats for t in s["tables"]),
                    "loadavg": harness.loadavg(),
                    "baselines": baselines.setup,
                    "our_transport": "unary" if cfg.unary else "session",
                    "patch": os.environ.get(PATCH_ENV),
                    "profile_dir": os.environ.get(PROFILE_ENV),
                }
            }
        )  # fmt: skip
        await warm_up(client, records, baselines, cfg)
        results = await measure_rounds(client, records, baselines, cfg, budget)
        lines = report(results, cfg, baselines.names)
        harness.report_goals(lines, goals())
        report_details(results, [f"{OURS}-r{r}" for r in REPLICAS] + baselines.names)
        harness.detail(
            {
                "elapsed_s": round(time.perf_counter() - t0, 1),
                "loadavg": harness.loadavg(),
            }
        )
    finally:
        signer.close()
        if client is not None:
            await client.stop()
        await baselines.close()
        await fleet.close()
    return harness.exit_status(lines, OURS)


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = harness.arg_parser(
        "Our overlay vs OpenDHT and kademlia: store/find-value on loopback."
    )
    parser.add_argument("--nodes", type=int, default=None, help=f"default {DEFAULT_NODES}")
    parser.add_argument(
        "--ops", type=int, default=None, help=f"ops per figure and round (default {DEFAULT_OPS})"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up ops per figure")
    parser.add_argument("--workers", type=int, default=2, help="processes hosting our nodes")
    parser.add_argument(
        "--rcvbuf",
        type=int,
        default=DEFAULT_RCVBUF,
        help="SO_RCVBUF bytes for our UDP sockets, 0: OS default (kademlia baseline: 4 MiB)",
    )
    parser.add_argument("--skip-baselines", action="store_true", help="measure ours only")
    parser.add_argument(
        "--unary", action="store_true",
        help="our client on the unary Store/FindValue calls instead of record sessions",
    )  # fmt: skip
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help="comma-separated: opendht,kademlia"
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="s for the whole run")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_S,
        help="s for each network to come up (raise it on a heavily loaded machine)",
    )
    args: argparse.Namespace = parser.parse_args(argv)
    nodes = harness.sized(args, args.nodes, DEFAULT_NODES, QUICK_NODES)
    ops = harness.sized(args, args.ops or args.n, DEFAULT_OPS, QUICK_OPS)
    rounds = harness.sized(args, args.rounds, DEFAULT_ROUNDS, QUICK_ROUNDS)
    warmup = harness.sized(args, args.warmup, DEFAULT_WARMUP, QUICK_WARMUP)
    if nodes < 3:
        raise SystemExit("--nodes must be at least 3")
    if ops < 1 or rounds < 1 or warmup < 0:
        raise SystemExit("--ops and --rounds must be at least 1, --warmup at least 0")
    names: tuple[str, ...] = ()
    if not args.skip_baselines:
        names = tuple(n for n in args.baselines.split(",") if n)
        if unknown := set(names) - set(BASELINES):
            raise SystemExit(f"unknown baseline(s): {sorted(unknown)}")
    return Config(nodes, ops, rounds, warmup, args.workers, args.rcvbuf, names, args.budget,
                  args.quick, args.ready_timeout, args.unary)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    harness.print_machine()
    apply_patch_hook()
    profile_dir = os.environ.get(PROFILE_ENV)
    if profile_dir:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
    # A wedged run dumps its stacks and exits (the workers see their stdin close and stop).
    return harness.run_main("bench.overlay", lambda: run(cfg), cfg.budget_s + 60)


if __name__ == "__main__":
    raise SystemExit(main())
