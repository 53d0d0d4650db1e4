"""``kademlia`` baseline: N pure-Python ``kademlia.network.Server`` nodes in one asyncio loop.

``python -m bench.baselines.kademlia_net --nodes 50 --ops 2000`` prints the machine line,
one setup line, then one JSON object per figure (put/get x seq/c32).

How the package behaves (kademlia 2.2.3 over rpcudp 5), and what this module does about it:

* Every node is a UDP endpoint in the *same* event loop and thread, so the whole network's
  work (every RPC of every node, msgpack, routing) is Python sharing one core: the figures
  measure the package's CPU cost per op as much as its protocol. The loop must not be
  blocked by anything else while a batch runs.
* ``Server.set(key, value)`` crawls for the k (``ksize``, default 20) closest nodes, then
  STOREs on all of them (and on itself if it is one of them); it returns True whenever the
  crawl found a node, even if every STORE timed out (``any()`` over (ok, value) tuples,
  docs/overlay.md), so the bench cannot count failed puts. ``Server.get(key)`` returns the
  value straight from the node's own storage if it has it, else crawls (alpha=3 RPCs at a
  time) until some node returns it.
  With k=20 of 50 nodes, a node holds ~40% of all keys, so ~40% of gets are local (~20
  us): they stay in the figures (that is what the package does), are counted
  (``local_hits``), and the latency of the others is given too (``remote_p50_ms``/``p99``).
* An RPC that gets no answer costs its 5 s rpcudp timeout, and the peer is then dropped
  from the routing table: that is the known stall once nodes die (not the case here, all
  nodes stay up). But with one loop draining 50 sockets, C=32 puts (each 20 STOREs plus
  its crawl) overflow the OS default receive buffers: hundreds of datagrams dropped, as
  many RPC timeouts, contacts dropped, ops failing at 5 s. A deployment (one node per
  process) would not queue like that, so every socket gets a 4 MiB ``SO_RCVBUF``
  (``rcvbuf_bytes``; 0 keeps the OS default). Each figure reports ``rpc_timeouts``,
  ``contacts_dropped`` and ``udp_drops`` (machine-wide kernel counter).
* The package logs every RPC timeout (ERROR) and dropped contact (WARNING); while a net is
  up they are counted instead of printed. An op taking longer than ``op_timeout_s`` is
  cancelled and fails; rpcudp's own timer then raises ``InvalidStateError`` in the loop's
  exception handler (it sets the cancelled future): those are counted
  (``cancelled_rpc_timers``) and swallowed, any other loop error is passed on.
* Puts come from a *writer* node, gets from a different *reader* node, as for OpenDHT
  (same workload and client-pair layout, see :mod:`bench.baselines.opendht_net`).
"""

from __future__ import annotations

import asyncio
import faulthandler
import importlib.metadata
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

from kademlia.network import Server  # type: ignore[import-untyped]
from kademlia.utils import digest  # type: ignore[import-untyped]

from bench.baselines import (
    DEFAULT_CONCURRENCY,
    DEFAULT_NODES,
    DEFAULT_OPS,
    DEFAULT_WARMUP,
    VALUE_MAX,
    VALUE_MIN,
    BaselineRun,
    BatchResult,
    Deadline,
    Figure,
    TableWatch,
    Workload,
    arg_parser,
    make_figure,
    percentile,
    print_run,
    process_stats,
    udp_drops_since,
    udp_rcvbuf_errors,
)
from bench.common import print_machine

NAME = "kademlia"
HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0  # per probe op while waiting for the network to be usable
KEY_BYTES = 20
# SO_RCVBUF per node socket (module docstring); the kernel caps it at net.core.rmem_max.
DEFAULT_RCVBUF = 4 * 1024 * 1024

Item = tuple[bytes, bytes]  # (key, value)
Op = Callable[[int], Awaitable[bool]]


class _LibraryNoise(logging.Handler):
    """Counts (and keeps off stderr) the package's per-RPC log lines while a net is up.

    ``rpcudp`` logs an ERROR for every RPC that times out, ``kademlia`` a WARNING for
    every contact it then drops; under load there are thousands, so they are counted.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.rpc_timeouts = 0
        self.contacts_dropped = 0
        self.other = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Did not receive reply"):
            self.rpc_timeouts += 1
        elif message.startswith("no response from"):
            self.contacts_dropped += 1
        else:
            self.other += 1

    def snapshot(self) -> tuple[int, int]:
        return self.rpc_timeouts, self.contacts_dropped


def _is_cancelled_rpc_timeout(context: dict[str, Any]) -> bool:
    """rpcudp's 5 s timer firing for an RPC whose future we cancelled (op timed out)."""
    exc = context.get("exception")
    handle = context.get("handle")
    return isinstance(exc, asyncio.InvalidStateError) and "RPCProtocol._timeout" in repr(handle)


def version() -> str:
    try:
        return importlib.metadata.version("kademlia")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------------- batches


async def _run_batch(
    op: Op, count: int, concurrency: int, op_timeout_s: float, deadline: Deadline
) -> BatchResult:
    """Run ``op(i)`` for i < ``count`` with ``concurrency`` workers; True means success.

    An op not done within ``op_timeout_s`` is cancelled and fails; no op starts after
    ``deadline``, so the batch ends by ``deadline + op_timeout_s``.
    """
    latencies: list[float] = []
    succeeded: list[int] = []
    finished: list[float] = []
    failures = 0
    clock = time.perf_counter
    start = clock()
    last = start
    next_index = 0

    async def worker() -> None:
        nonlocal failures, last, next_index
        while next_index < count and not deadline.expired():
            i = next_index
            next_index += 1
            t0 = clock()
            try:
                async with asyncio.timeout(op_timeout_s):
                    ok = await op(i)
            except Exception:  # TimeoutError included: the op failed, the batch goes on
                ok = False
            now = clock()
            if ok:
                latencies.append(now - t0)
                succeeded.append(i)
                finished.append(now - start)
            else:
                failures += 1
            last = now

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return BatchResult(latencies, failures, max(last - start, 1e-9), sorted(succeeded), finished)


# ---------------------------------------------------------------------------- the network


class KademliaNet:
    """N ``kademlia`` servers on loopback in the running loop, bootstrapped to the first.

    Use as an async context manager or call :meth:`start` and :meth:`close`. Client pairs
    are laid out as in :class:`bench.baselines.opendht_net.OpenDhtNet`: pair j writes from
    node ``N-1-2j`` and reads from node ``N-2-2j``; the bootstrap node is never a client.
    """

    def __init__(
        self,
        nodes: int = DEFAULT_NODES,
        *,
        ksize: int = 20,
        alpha: int = 3,
        op_timeout_s: float = 5.0,
        rcvbuf_bytes: int = DEFAULT_RCVBUF,
        workload: Workload | None = None,
    ) -> None:
        if nodes < 3:
            raise ValueError("need at least 3 nodes (bootstrap, writer, reader)")
        self.size = nodes
        self.ksize = ksize
        self.alpha = alpha
        self.op_timeout_s = op_timeout_s
        self.rcvbuf_bytes = rcvbuf_bytes
        self.workload = workload or Workload()
        self.servers: list[Any] = []
        self.converge_s = 0.0
        self.noise = _LibraryNoise()
        self.cancelled_rpc_timers = 0
        self._loggers: list[tuple[logging.Logger, bool]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._old_handler: Any = None

    # -- lifecycle

    async def start(self, ready_timeout_s: float = 15.0, probes: int = 5) -> float:
        """Start the nodes; return once the network is usable (seconds it took).

        Each node after the first bootstraps to it in turn (a self-lookup crawl). Usable:
        every node has ``min(N - 1, ksize)`` contacts (or at least one, and no table changed
        for 2 s: :class:`~bench.baselines.TableWatch`), then ``probes`` fresh keys in a
        row can be put by one node and read by another (nodes 1 and 2). Raises
        ``TimeoutError`` (after closing the nodes) past ``ready_timeout_s``.
        """
        deadline = Deadline(ready_timeout_s)
        t0 = time.perf_counter()
        self._quiet_library()
        try:
            async with asyncio.timeout(ready_timeout_s):
                for _ in range(self.size):
                    server = Server(ksize=self.ksize, alpha=self.alpha)
                    await server.listen(0, interface=HOST)
                    self.servers.append(server)
                    if self.rcvbuf_bytes > 0:
                        sock = server.transport.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
                first = (HOST, self.port(0))
                for server in self.servers[1:]:
                    await server.bootstrap([first])
                await self._wait_ready(deadline, probes)
        except BaseException:
            await self.close()
            raise
        self.converge_s = time.perf_counter() - t0
        return self.converge_s

    async def _wait_ready(self, deadline: Deadline, probes: int) -> None:
        watch = TableWatch(min(self.size - 1, self.ksize))
        while not watch.settled(self.contacts()):
            await asyncio.sleep(0.02)
        streak = 0
        while streak < probes:
            items = self.new_items(1)
            writer, reader = self.servers[1], self.servers[2]
            _, stored = await self._put(items, [writer], 1, deadline, PROBE_TIMEOUT_S)
            _, read = await self._get(stored, [reader], 1, deadline, PROBE_TIMEOUT_S)
            streak = streak + 1 if len(read) == 1 else 0

    def _quiet_library(self) -> None:
        """Route the package's log lines to the counter, and swallow (counting them) the
        ``InvalidStateError`` rpcudp raises when its timer fires for a cancelled RPC."""
        for name in ("rpcudp", "kademlia"):
            logger = logging.getLogger(name)
            logger.addHandler(self.noise)
            self._loggers.append((logger, logger.propagate))
            logger.propagate = False
        loop = asyncio.get_running_loop()
        self._loop, self._old_handler = loop, loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if _is_cancelled_rpc_timeout(context):
                self.cancelled_rpc_timers += 1
            elif self._old_handler is not None:
                self._old_handler(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def _restore_library(self) -> None:
        for logger, propagate in self._loggers:
            logger.removeHandler(self.noise)
            logger.propagate = propagate
        self._loggers = []
        if self._loop is not None:
            self._loop.set_exception_handler(self._old_handler)
            self._loop = None

    def rcvbuf_effective(self) -> int | None:
        """SO_RCVBUF as the kernel reports it for node 0 (it doubles what was asked)."""
        if not self.servers:
            return None
        sock = self.servers[0].transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def port(self, index: int) -> int:
        return int(self.servers[index].transport.get_extra_info("sockname")[1])

    def contacts(self) -> list[int]:
        """Contacts in each node's routing table."""
        return [
            sum(len(b) for b in s.protocol.router.buckets) if s.protocol else 0
            for s in self.servers
        ]

    async def close(self) -> None:
        """Stop every node and drop its pending RPCs (their 5 s timers included)."""
        for server in self.servers:
            server.stop()
            protocol = server.protocol
            if protocol is not None:
                for future, timer in list(protocol._outstanding.values()):
                    timer.cancel()
                    if not future.done():
                        future.cancel()
                protocol._outstanding.clear()
        self.servers = []
        await asyncio.sleep(0.05)  # let the library's last callbacks run
        self._restore_library()

    async def __aenter__(self) -> KademliaNet:
        if not self.servers:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        await self.close()

    @property
    def max_pairs(self) -> int:
        """Disjoint client pairs available (the bootstrap node is not a client)."""
        return (self.size - 1) // 2

    def writer(self, pair: int = 0) -> Any:
        return self.servers[-1 - 2 * (pair % self.max_pairs)]

    def reader(self, pair: int = 0) -> Any:
        return self.servers[-2 - 2 * (pair % self.max_pairs)]

    # -- measuring

    def new_items(self, count: int) -> list[Item]:
        """Distinct random keys with fresh random values."""
        return [(os.urandom(KEY_BYTES), self.workload.value()) for _ in range(count)]

    async def put_batch(
        self,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        *,
        pairs: Sequence[int] = (0,),
        op_timeout_s: float | None = None,
    ) -> tuple[Figure, list[Item]]:
        """The writers of ``pairs`` put every item, ``concurrency`` in flight in all.

        Returns the figure and the items stored (``set`` returned True).
        """
        timeout = self.op_timeout_s if op_timeout_s is None else op_timeout_s
        writers = [self.writer(j) for j in pairs]
        return await self._put(items, writers, concurrency, deadline, timeout)

    async def get_batch(
        self,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        *,
        pairs: Sequence[int] = (0,),
        op_timeout_s: float | None = None,
    ) -> tuple[Figure, list[Item]]:
        """The readers of ``pairs`` get every key, ``concurrency`` in flight in all.

        A get succeeds if it returns exactly the value put. The figure's ``local_hits``
        counts gets the reader answered from its own storage. Returns the figure and the
        items read back.
        """
        timeout = self.op_timeout_s if op_timeout_s is None else op_timeout_s
        readers = [self.reader(j) for j in pairs]
        return await self._get(items, readers, concurrency, deadline, timeout)

    async def _put(
        self,
        items: Sequence[Item],
        writers: Sequence[Any],
        concurrency: int,
        deadline: Deadline,
        op_timeout_s: float,
    ) -> tuple[Figure, list[Item]]:
        async def op(i: int) -> bool:
            key, value = items[i]
            return bool(await writers[i % len(writers)].set(key, value))

        before = self._counters()
        res = await _run_batch(op, len(items), concurrency, op_timeout_s, deadline)
        return self._figure("put", res, items, concurrency, self._counted(before))

    async def _get(
        self,
        items: Sequence[Item],
        readers: Sequence[Any],
        concurrency: int,
        deadline: Deadline,
        op_timeout_s: float,
    ) -> tuple[Figure, list[Item]]:
        local = 0
        remote: list[float] = []  # latencies of the successful gets that went to the network

        async def op(i: int) -> bool:
            nonlocal local
            key, value = items[i]
            reader = readers[i % len(readers)]
            is_local = reader.storage.get(digest(key)) is not None
            local += is_local
            t0 = time.perf_counter()
            ok = bool(await reader.get(key) == value)
            if ok and not is_local:
                remote.append(time.perf_counter() - t0)
            return ok

        before = self._counters()
        res = await _run_batch(op, len(items), concurrency, op_timeout_s, deadline)
        extra: dict[str, Any] = {"local_hits": local}
        if remote:
            remote.sort()
            extra["remote_p50_ms"] = round(percentile(remote, 0.50) * 1e3, 3)
            extra["remote_p99_ms"] = round(percentile(remote, 0.99) * 1e3, 3)
        extra.update(self._counted(before))
        return self._figure("get", res, items, concurrency, extra)

    def _counters(self) -> tuple[int, int, int | None]:
        return (*self.noise.snapshot(), udp_rcvbuf_errors())

    def _counted(self, before: tuple[int, int, int | None]) -> dict[str, int]:
        """RPC timeouts, contacts dropped and UDP drops since ``before``."""
        timeouts, dropped = self.noise.snapshot()
        return {
            "rpc_timeouts": timeouts - before[0],
            "contacts_dropped": dropped - before[1],
            **udp_drops_since(before[2]),
        }

    def _figure(
        self,
        op: str,
        res: BatchResult,
        items: Sequence[Item],
        concurrency: int,
        extra: dict[str, Any],
    ) -> tuple[Figure, list[Item]]:
        fig = make_figure(
            NAME,
            op,
            concurrency,
            res.latencies,
            res.failures,
            len(items),
            self.size,
            res.wall_s,
            extra=extra,
            finished_s=res.finished_s,
        )
        return fig, [items[i] for i in res.succeeded]


# ---------------------------------------------------------------------------- a whole run


async def run_kademlia_async(
    nodes: int = DEFAULT_NODES,
    ops: int = DEFAULT_OPS,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    clients: int = 1,
    warmup: int = DEFAULT_WARMUP,
    value_min: int = VALUE_MIN,
    value_max: int = VALUE_MAX,
    op_timeout_s: float = 5.0,
    batch_timeout_s: float = 12.0,
    ready_timeout_s: float = 15.0,
    budget_s: float = 80.0,
    seed: int = 1,
    ksize: int = 20,
    alpha: int = 3,
    rcvbuf_bytes: int = DEFAULT_RCVBUF,
) -> BaselineRun:
    """Start ``nodes`` kademlia servers, measure put/get seq and cN, close; in ``budget_s``.

    Same schedule as :func:`bench.baselines.opendht_net.run_opendht`: per mode (seq, then
    cN, each on its own ``clients`` client pairs) a warm-up, the puts of ``ops`` fresh
    keys, then gets of the keys whose put succeeded. A figure stops issuing ops after
    ``batch_timeout_s`` (or when the budget, less the time kept for closing, runs out).
    """
    budget = Deadline(budget_s)
    net = KademliaNet(
        nodes,
        ksize=ksize,
        alpha=alpha,
        op_timeout_s=op_timeout_s,
        rcvbuf_bytes=rcvbuf_bytes,
        workload=Workload(value_min, value_max, seed),
    )
    await net.start(ready_timeout_s=min(ready_timeout_s, budget.remaining()))
    puts: list[Figure] = []
    gets: list[Figure] = []
    setup: dict[str, Any] = {
        "host": HOST,
        "clients": clients,
        "ksize": ksize,
        "alpha": alpha,
        "rcvbuf_bytes": net.rcvbuf_effective(),
        **process_stats(),
    }
    try:

        def window(seconds: float) -> Deadline:
            return budget.sub(seconds, reserve=1.0 + op_timeout_s)

        for k, c in enumerate((1, concurrency)):
            pairs = range(k * clients, (k + 1) * clients)
            if warmup > 0:
                warm = window(batch_timeout_s / 4)
                _, stored = await net.put_batch(net.new_items(warmup), c, warm, pairs=pairs)
                await net.get_batch(stored, c, warm, pairs=pairs)
            items = net.new_items(ops)
            fig, stored = await net.put_batch(items, c, window(batch_timeout_s), pairs=pairs)
            puts.append(fig)
            fig, _ = await net.get_batch(stored, c, window(batch_timeout_s), pairs=pairs)
            gets.append(fig)
        setup.update({f"{k}_after": v for k, v in process_stats().items()})
        setup["cancelled_rpc_timers"] = net.cancelled_rpc_timers
        setup["other_library_warnings"] = net.noise.other
    finally:
        await net.close()
    return BaselineRun(NAME, version(), nodes, net.converge_s, (*puts, *gets), setup)


def run_kademlia(nodes: int = DEFAULT_NODES, ops: int = DEFAULT_OPS, **kwargs: Any) -> BaselineRun:
    """:func:`run_kademlia_async` in a fresh event loop (not from inside a running loop)."""
    return asyncio.run(run_kademlia_async(nodes, ops, **kwargs))


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("kademlia baseline: put/get throughput and latency on loopback.")
    parser.add_argument(
        "--clients", type=int, default=1, help="writer/reader pairs sharing each figure's ops"
    )
    parser.add_argument("--ksize", type=int, default=20, help="k: replicas and bucket size")
    parser.add_argument("--alpha", type=int, default=3, help="lookup parallelism")
    parser.add_argument(
        "--rcvbuf",
        type=int,
        default=DEFAULT_RCVBUF,
        help=f"SO_RCVBUF bytes for every node's socket, 0: OS default (default {DEFAULT_RCVBUF})",
    )
    args = parser.parse_args(argv)
    # Last resort if the loop is wedged (a callback that never yields): dump and exit.
    faulthandler.dump_traceback_later(args.budget + 20, exit=True)
    print_machine()
    try:
        run = run_kademlia(
            args.nodes,
            args.ops,
            concurrency=args.concurrency,
            clients=args.clients,
            warmup=args.warmup,
            value_min=args.value_min,
            value_max=args.value_max,
            op_timeout_s=args.op_timeout,
            batch_timeout_s=args.batch_timeout,
            ready_timeout_s=args.ready_timeout,
            budget_s=args.budget,
            seed=args.seed,
            ksize=args.ksize,
            alpha=args.alpha,
            rcvbuf_bytes=args.rcvbuf,
        )
    finally:
        faulthandler.cancel_dump_traceback_later()
    print_run(run)
    sys.stdout.flush()
    return 1 if any(f.failures for f in run.figures) else 0


if __name__ == "__main__":
    raise SystemExit(main())
