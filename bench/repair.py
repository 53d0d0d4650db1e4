"""Repair throughput with its sync calls on mailbox sessions, against the unary calls.

``uv run python -m bench.repair [--rounds R] [--n MAILBOXES] [--quick] [--sections ...]``

* **Setup, not timed.** A bootstrap and 5 storage nodes, all in this process (so one
  figure is the whole network's CPU, on one core), on loopback addresses from the
  harness's allocator, ``repair_interval_s`` a day (no pass of their own), proof of work
  at 8 bits. Every storage node is a replica of every mailbox.

  - pass: ``--n`` mailboxes of one small blob each, the same on all 5 nodes, written
    through each node's backend (``put_many``), not through gRPC;
  - refill: one mailbox of ``REFILL_BLOBS`` sealed envelopes (1 KB, each with its proof of
    work), put on all 5 nodes.
* **pass** (``storage.repair.pass``, mailboxes/s): one repair pass of node 0
  (``Repairer.repair_once``: per mailbox a ``SyncList`` with each of the 4 other
  replicas, nothing to move; one lookup serves many mailboxes), its calls on sessions
  (ours) and unary (the baseline, ``Repairer.sessions`` set to None: what every call was
  before sessions), alternating, ``SyncCompare`` off (``Repairer.compare``: with it, a
  pass over mailboxes in sync makes no exchange to time; see burst),
  ``--rounds`` rounds each after a warm-up pass of each; after each pass, a rest (untimed)
  as long as the peers' per-node rate limit (100 calls/s) takes to refill, so no call is
  refused (a run with a failed sync exchange fails).
* **refill** (``storage.repair.refill``, blobs/s): node 1 forgets the refill mailbox
  (``MailboxBackend.forget``), then node 0's pass over that mailbox alone pushes it back
  (offers ahead and 1 MiB ``SyncPush`` pieces), sessions and unary alternating.

* **burst** (``--sections burst``, a detail line, not a figure): one pass of node 0 over
  ``--burst-n`` mailboxes (default 3,000: three times the peers' sync burst of 1,000
  calls) with no rest before it, on sessions: its seconds, mailboxes/s, lookups per
  mailbox (node 0's own, and the 4 peers' authorizing its calls: each node's
  ``dna_overlay_lookup_seconds`` count), how much the process's peak RSS grew during the
  pass (all 5 nodes' memory: a pass must not hold memory per mailbox), exchanges failed by
  reason (rate refusals are RESOURCE_EXHAUSTED) and the waits for the peers' rate limits.
  ``--in-flight`` sets the mailboxes synced at once (1: one at a time, as before), and
  ``--rtt-ms`` makes each of node 0's sync calls (on sessions, unary, ``SyncCompare``
  too) wait that long first: a round trip, which loopback lacks. The mailboxes are the
  same on every node, so a pass is one ``SyncCompare`` per peer, ID slice and 512
  mailboxes (``compared``: mailbox-peer pairs by outcome) and no exchange;
  ``--per-mailbox`` turns the compare off (``Repairer.compare``): every mailbox exchanged
  with every peer, as before it (the baseline). ``--differ D`` adds D mailboxes held by
  node 0 alone: each differs at every peer and is exchanged. ``--compare-ahead`` sets the
  slices planned ahead and compares in flight to a peer (1: about as before they
  overlapped), and ``--one-slice`` puts every mailbox in one ID slice, as a node of a
  large network holds them near its own ID (``repair_lookups``: the repairer's own).

``ratio`` = sessions / unary (above 1.0: repair over sessions is faster). CPU per mailbox
(pass) and per blob (refill) is this process's, which holds every node.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dna_bootstrap.cli import ENV_PREFIX as BOOTSTRAP_ENV
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.mailbox import blob_id, mailbox_id, put_pow_hash
from dna_core.ops.config import load_config
from dna_core.overlay import OverlayServer, OverlayServiceConfig
from dna_core.wire import common_pb2
from dna_storage.backends.base import StoredBlob
from dna_storage.cli import ENV_PREFIX as STORAGE_ENV
from dna_storage.node import StorageNode, StorageNodeConfig
from dna_storage.replication import IN_FLIGHT, SYNC_CALLS_PER_S, Repairer
from dna_testnet.harness import LocalNode, local_cluster
from dna_testnet.topology import NodeSpec, Topology

from bench import harness
from bench.harness import cpu_s, now_ms

STORAGE = 5
REFILL_BLOBS, QUICK_REFILL_BLOBS = 2_000, 200
DEFAULT_MAILBOXES, QUICK_MAILBOXES = 300, 30
BURST_MAILBOXES, QUICK_BURST_MAILBOXES = 3_000, 300
SECTIONS = ("pass", "refill", "burst")
DAY_MS = 86_400_000
STORAGE_TOML = "repair_interval_s = 86400.0\n[admission]\npow_base_bits = 8\n"
WATCHDOG_S = 1_800.0


class Network:
    """A bootstrap and the storage nodes, started in this process from the harness's
    TOML files (``local_cluster`` writes them; no process is started)."""

    def __init__(self, root: Path) -> None:
        stores = (NodeSpec(f"store{i}", "storage") for i in range(STORAGE))
        topology = Topology((NodeSpec("boot", "bootstrap"), *stores))
        self.specs: list[LocalNode] = local_cluster(
            root, topology, storage_toml=STORAGE_TOML
        ).driver.nodes
        self.boot: OverlayServer | None = None
        self.stores: list[StorageNode] = []

    async def start(self) -> None:
        for spec in self.specs:
            spec.root.mkdir(parents=True, exist_ok=True)
            spec.write_config()
        boot, *stores = self.specs
        config = load_config(OverlayServiceConfig, boot.config_path, env_prefix=BOOTSTRAP_ENV,
                             env={})  # fmt: skip
        self.boot = OverlayServer(config, role=common_pb2.NODE_ROLE_BOOTSTRAP)
        await self.boot.start()
        for spec in stores:
            node = StorageNode(
                load_config(StorageNodeConfig, spec.config_path, env_prefix=STORAGE_ENV, env={})
            )
            await node.start()
            self.stores.append(node)
        await self._until_connected()

    async def _until_connected(self, timeout_s: float = 60.0) -> None:
        """Until node 0's lookup finds the 4 other storage nodes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = await self.overlay(0).find_node(hashlib.sha256(b"probe").digest())
            if sum(c.role == common_pb2.NODE_ROLE_STORAGE for c in found) >= STORAGE - 1:
                return
            await asyncio.sleep(0.5)
        raise RuntimeError("the storage nodes did not find each other")

    def overlay(self, index: int) -> Any:
        server = self.stores[index].server
        assert server is not None and server.node is not None
        return server.node

    def repairer(self, index: int) -> Repairer:
        repairer = self.stores[index].repairer
        assert repairer is not None
        return repairer

    async def put_everywhere(self, blobs: Sequence[StoredBlob]) -> None:
        for node in self.stores:
            assert node.backend is not None
            for start in range(0, len(blobs), 500):
                await node.backend.put_many(blobs[start : start + 500], now_ms())

    async def stop(self) -> None:
        for node in self.stores:
            await node.stop()
        if self.boot is not None:
            await self.boot.stop()


def small_mailboxes(
    count: int, name: bytes = b"bench", first: int | None = None
) -> list[StoredBlob]:
    """``count`` mailboxes of one 200-byte blob each (never pushed: no proof needed), IDs
    spread over the whole ID space, or all starting with the byte ``first`` (one slice of
    a pass: what a node of a large network holds, near its own ID)."""
    now = now_ms()
    out = []
    for i in range(count):
        data = hashlib.sha256(b"blob %d" % i).digest() * 7
        box = hashlib.sha256(b"%s mailbox %d" % (name, i)).digest()
        if first is not None:
            box = bytes([first]) + box[1:]
        out.append(StoredBlob(box, blob_id(data), data, now, now + DAY_MS))
    return out


def proven_mailboxes(count: int) -> list[StoredBlob]:
    """``count`` owners' mailboxes of one sealed envelope each, with its put's proof of
    work (pushed to the peers, each judged as a put)."""
    sender, now = Identity.generate(), now_ms()
    out = []
    for i in range(count):
        owner = Identity.generate()
        box = mailbox_id(owner.fingerprint)
        blob = seal(sender, owner.public, b"message %d" % i, now_ms=now)
        proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now)
        out.append(StoredBlob(box, blob_id(blob), blob, now, now + DAY_MS, pow=proof))
    return out


def refill_mailbox(count: int) -> tuple[bytes, list[StoredBlob]]:
    """One owner's mailbox of ``count`` sealed 1 KB envelopes, each with its put's proof of
    work (a replica checks them as puts when they are pushed)."""
    sender, owner = Identity.generate(), Identity.generate()
    box = mailbox_id(owner.fingerprint)
    now = now_ms()
    out = []
    for i in range(count):
        blob = seal(sender, owner.public, (b"%06d" % i) * 170, now_ms=now)
        proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now)
        out.append(StoredBlob(box, blob_id(blob), blob, now, now + DAY_MS, pow=proof))
    return box, out


async def timed(
    modes: dict[str, Callable[[], Awaitable[None]]], rounds: int, rest_s: float
) -> dict[str, list[tuple[float, float]]]:
    """Each mode's (seconds, CPU seconds) per round, the modes taking turns after a warm-up
    of each, ``rest_s`` (untimed) after each run."""
    for run in modes.values():
        await run()
        await asyncio.sleep(rest_s)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, run in modes.items():
            started, cpu = time.perf_counter(), cpu_s()
            await run()
            results[name].append((time.perf_counter() - started, cpu_s() - cpu))
            await asyncio.sleep(rest_s)
    return results


def failures(repairer: Repairer) -> float:
    """Sync exchanges of the repairer that failed so far (a figure must have none)."""
    return sum(s.value for m in repairer.metrics.failures.collect() for s in m.samples
               if s.name.endswith("_total"))  # fmt: skip


def transports(
    repairer: Repairer, work: Callable[[], Awaitable[Any]]
) -> dict[str, Callable[[], Awaitable[None]]]:
    """``work`` with the repairer's calls on sessions, then unary (no session pool)."""
    pool = repairer.sessions

    async def on_sessions() -> None:
        repairer.sessions = pool
        await work()

    async def unary() -> None:
        repairer.sessions = None
        await work()
        repairer.sessions = pool

    return {"sessions": on_sessions, "unary": unary}


Results = dict[str, list[tuple[float, float]]]  # mode -> (seconds, CPU seconds) per round


def figure(
    bench: str, item: tuple[str, str], per_round: int, results: Results, params: dict[str, Any]
) -> dict[str, Any]:
    """Items (singular, plural) per second of the median round, sessions against unary,
    with CPU per item."""
    rate = {
        name: per_round / statistics.median(s for s, _ in runs) for name, runs in results.items()
    }
    cpu = {name: statistics.median(c for _, c in runs) * 1e3 / per_round
           for name, runs in results.items()}  # fmt: skip
    return harness.report(
        bench, f"{item[1]}/s", rate["sessions"], {"unary": rate["unary"]}, per_round,
        {**params, f"cpu_ms_per_{item[0]}": {k: round(v, 3) for k, v in cpu.items()}},
    )  # fmt: skip


async def bench_pass(net: Network, mailboxes: int, rounds: int) -> dict[str, Any]:
    await net.put_everywhere(small_mailboxes(mailboxes))
    repairer = net.repairer(0)
    repairer.compare = False  # the exchanges are what sessions and unary are compared on
    # A pass makes one call per mailbox to each peer: resting as long as the peers' rate
    # limit takes to refill keeps every pass within it (SYNC_CALLS_PER_S per calling node).
    rest_s = mailboxes / SYNC_CALLS_PER_S
    results = await timed(transports(repairer, repairer.repair_once), rounds, rest_s)
    check_no_failures(repairer)
    return figure("storage.repair.pass", ("mailbox", "mailboxes"), mailboxes, results,
                  {"storage_nodes": STORAGE, "rounds": rounds, "blobs_per_mailbox": 1})  # fmt: skip


async def bench_refill(net: Network, blobs: int, rounds: int) -> dict[str, Any]:
    box, stored = refill_mailbox(blobs)
    await net.put_everywhere(stored)
    repairer = net.repairer(0)
    wiped = net.stores[1].backend
    assert wiped is not None

    async def refill() -> None:
        await wiped.forget(box, [b.blob_id for b in stored], [])
        await repairer.sync_mailbox(box)
        held, _ = await wiped.held(box, [b.blob_id for b in stored], now_ms())
        if len(held) != len(stored):
            raise RuntimeError(f"refill left {len(stored) - len(held)} blobs missing")

    results = await timed(transports(repairer, refill), rounds, rest_s=1.0)
    check_no_failures(repairer)
    params = {"storage_nodes": STORAGE, "rounds": rounds, "blob_bytes": len(stored[0].blob)}
    return figure("storage.repair.refill", ("blob", "blobs"), blobs, results, params)


def lookups(node: Any) -> float:
    """Lookups the overlay node has run so far (its lookup latency histogram's count)."""
    return float(sum(s.value for m in node.metrics.lookup_seconds.collect() for s in m.samples
                     if s.name.endswith("_count")))  # fmt: skip


def failures_by_reason(repairer: Repairer) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in repairer.metrics.failures.collect()
            for s in m.samples if s.name.endswith("_total") and s.value}  # fmt: skip


def rate_waits(repairer: Repairer) -> dict[str, float]:
    """The repairer's waits for peers' sync rate limits, by cause (none where it does not
    pace: before it did)."""
    waits = getattr(repairer.metrics, "rate_waits", None)
    if waits is None:
        return {}
    return {s.labels["cause"]: s.value for m in waits.collect() for s in m.samples
            if s.name.endswith("_total") and s.value}  # fmt: skip


def counted(counter: Any, label: str) -> dict[str, float]:
    """A labelled counter's values by ``label`` (those above 0)."""
    return {s.labels[label]: s.value for m in counter.collect() for s in m.samples
            if s.name.endswith("_total") and s.value}  # fmt: skip


def with_latency(repairer: Repairer, rtt_s: float) -> None:
    """Every sync call of ``repairer`` waits ``rtt_s`` first, on a session or unary,
    ``SyncCompare`` included (each attempt, after the pace let it go): a network's round
    trip, which loopback does not have (and this kernel has no netem to add)."""
    paced = repairer._paced

    async def delayed(peer: Any, send: Callable[[], Awaitable[Any]]) -> Any:
        async def after_a_round_trip() -> Any:
            await asyncio.sleep(rtt_s)
            return await send()

        return await paced(peer, after_a_round_trip)

    setattr(repairer, "_paced", delayed)  # noqa: B010 (mypy: assigning a method)


async def bench_burst(
    net: Network,
    mailboxes: int,
    rtt_ms: float,
    in_flight: int,
    *,
    compare: bool = True,
    differ: int = 0,
    compare_ahead: int | None = None,
    one_slice: bool = False,
) -> dict[str, Any]:
    """One pass over more mailboxes than the peers' sync burst, straight after setup."""
    await net.put_everywhere(small_mailboxes(mailboxes, b"burst", 0x42 if one_slice else None))
    alone = net.stores[0].backend
    assert alone is not None
    await alone.put_many(proven_mailboxes(differ), now_ms())
    repairer = net.repairer(0)
    repairer.in_flight = in_flight
    repairer.compare = compare
    if compare_ahead is not None:  # else the repairer's own (also: a build from before it)
        repairer.compare_ahead = compare_ahead
    if rtt_ms:
        with_latency(repairer, rtt_ms / 1000)
    overlays = [net.overlay(i) for i in range(STORAGE)]
    before = [lookups(o) for o in overlays]
    repair_lookups = repairer.metrics.lookups._value.get()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, on Linux
    started, cpu = time.perf_counter(), cpu_s()
    synced = await repairer.repair_once()
    took, cpu = time.perf_counter() - started, cpu_s() - cpu
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    ran = [lookups(o) - b for o, b in zip(overlays, before, strict=True)]
    line = {
        "section": "storage.repair.burst", "mailboxes": synced, "seconds": round(took, 2),
        "rtt_ms": rtt_ms, "in_flight": in_flight, "compare": compare, "differ": differ,
        "mailboxes_per_s": round(synced / took, 1),
        "cpu_ms_per_mailbox": round(cpu * 1e3 / synced, 3),
        "peak_rss_growth_mib": round(grown / 1024, 1),
        "compare_ahead": getattr(repairer, "compare_ahead", None), "one_slice": one_slice,
        "lookups_per_mailbox": round(ran[0] / synced, 4),
        "repair_lookups": repairer.metrics.lookups._value.get() - repair_lookups,
        "peer_lookups_per_mailbox": round(sum(ran[1:]) / synced, 4),
        "failed_exchanges": failures_by_reason(repairer),
        "rate_waits": rate_waits(repairer),
        "compared": counted(repairer.metrics.compared, "outcome"),
        "pushed": repairer.metrics.pushed._value.get(),
    }  # fmt: skip
    harness.detail(line)
    return line


def check_no_failures(repairer: Repairer) -> None:
    if failed := failures(repairer):
        raise RuntimeError(f"{failed:g} sync exchanges failed: the figure would be wrong")


async def run(args: Any) -> int:
    harness.print_machine()
    rounds = harness.rounds_from(args)
    mailboxes = harness.n_from(args, DEFAULT_MAILBOXES, QUICK_MAILBOXES)
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(unknown)}: choose from {SECTIONS}")
    with harness.scratch_dir("repair") as root:
        net = Network(root)
        try:
            await net.start()
            if "burst" in sections:  # first: the peers' buckets are full, as after a rest
                burst = args.burst_n or (QUICK_BURST_MAILBOXES if args.quick else BURST_MAILBOXES)
                await bench_burst(
                    net, burst, args.rtt_ms, args.in_flight,
                    compare=not args.per_mailbox, differ=args.differ,
                    compare_ahead=args.compare_ahead, one_slice=args.one_slice,
                )  # fmt: skip
            if "pass" in sections:
                await bench_pass(net, mailboxes, rounds)
            if "refill" in sections:
                blobs = QUICK_REFILL_BLOBS if args.quick else REFILL_BLOBS
                await bench_refill(net, blobs, rounds)
        finally:
            await net.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.arg_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        default="pass,refill",
        help=f"comma-separated, of {', '.join(SECTIONS)} (default pass,refill)",
    )
    parser.add_argument(
        "--burst-n",
        type=int,
        default=None,
        help=f"mailboxes of the burst pass (default {BURST_MAILBOXES:,})",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="burst: a round trip added before each sync call (default 0)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=IN_FLIGHT,
        help=f"burst: mailboxes synced at once (default {IN_FLIGHT})",
    )
    parser.add_argument(
        "--differ",
        type=int,
        default=0,
        help="burst: mailboxes on node 0 alone, besides those on every node (default 0)",
    )
    parser.add_argument(
        "--compare-ahead",
        type=int,
        default=None,
        help="burst: slices planned ahead, compares in flight to a peer (default the repairer's)",
    )
    parser.add_argument(
        "--one-slice",
        action="store_true",
        help="burst: every mailbox in one ID slice (as a node of a large network holds them)",
    )
    parser.add_argument(
        "--per-mailbox",
        action="store_true",
        help="burst: no SyncCompare, every mailbox exchanged with every peer (the baseline)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    return harness.run_main("bench.repair", lambda: run(args), WATCHDOG_S)


if __name__ == "__main__":
    raise SystemExit(main())
