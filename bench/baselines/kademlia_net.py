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
  (same workload and client-pair layout: :class:`bench.harness.LoopbackNet`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from kademlia.network import Server  # type: ignore[import-untyped]
from kademlia.utils import digest  # type: ignore[import-untyped]

from bench import harness
from bench.harness import DEFAULT_RCVBUF, HOST, Batch, Deadline, Figure, LoopbackNet, Workload

NAME = "kademlia"
KEY_BYTES = 20

Item = tuple[bytes, bytes]  # (key, value)


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


class KademliaNet(LoopbackNet[Item]):
    """N ``kademlia`` servers on loopback in the running loop, bootstrapped to the first,
    with client pairs (layout and workload: :class:`bench.harness.LoopbackNet`)."""

    name = NAME

    def __init__(
        self,
        nodes: int = harness.DEFAULT_NODES,
        *,
        ksize: int = 20,
        alpha: int = 3,
        op_timeout_s: float = 5.0,
        rcvbuf_bytes: int = DEFAULT_RCVBUF,
        workload: Workload | None = None,
    ) -> None:
        super().__init__(nodes, op_timeout_s=op_timeout_s, workload=workload)
        self.ksize = ksize
        self.alpha = alpha
        self.rcvbuf_bytes = rcvbuf_bytes
        self.noise = _LibraryNoise()
        self.cancelled_rpc_timers = 0
        self._loggers: list[tuple[logging.Logger, bool]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._old_handler: Any = None

    def setup(self) -> dict[str, Any]:
        return {
            "host": HOST,
            "ksize": self.ksize,
            "alpha": self.alpha,
            "rcvbuf_bytes": self.rcvbuf_effective(),
        }

    def after_run(self) -> dict[str, Any]:
        return {
            "cancelled_rpc_timers": self.cancelled_rpc_timers,
            "other_library_warnings": self.noise.other,
        }

    # -- lifecycle

    async def _launch(self, deadline: Deadline) -> None:
        """Each node after the first bootstraps to it in turn (a self-lookup crawl)."""
        self._quiet_library()
        async with asyncio.timeout(deadline.remaining()):
            for _ in range(self.size):
                server = Server(ksize=self.ksize, alpha=self.alpha)
                await server.listen(0, interface=HOST)
                self.nodes.append(server)
                if self.rcvbuf_bytes > 0:
                    sock = server.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
            first = (HOST, self.port(0))
            for server in self.nodes[1:]:
                await server.bootstrap([first])

    def _table_watch(self) -> harness.TableWatch:
        return harness.TableWatch(min(self.size - 1, self.ksize))

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
        if not self.nodes:
            return None
        sock = self.nodes[0].transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def port(self, index: int) -> int:
        return int(self.nodes[index].transport.get_extra_info("sockname")[1])

    def contacts(self) -> list[int]:
        return [
            sum(len(b) for b in s.protocol.router.buckets) if s.protocol else 0 for s in self.nodes
        ]

    async def close(self, timeout_s: float = 8.0) -> None:
        """Stop every node and drop its pending RPCs (their 5 s timers included)."""
        for server in self.nodes:
            server.stop()
            protocol = server.protocol
            if protocol is not None:
                for future, timer in list(protocol._outstanding.values()):
                    timer.cancel()
                    if not future.done():
                        future.cancel()
                protocol._outstanding.clear()
        self.nodes = []
        await asyncio.sleep(0.05)  # let the library's last callbacks run
        self._restore_library()

    # -- measuring

    def new_items(self, count: int) -> list[Item]:
        return [(os.urandom(KEY_BYTES), self.workload.value()) for _ in range(count)]

    async def _put(self, batch: Batch[Item]) -> tuple[Figure, list[Item]]:
        """``set`` returns True whenever its crawl found a node (module docstring): a put
        counts as stored then."""

        async def op(i: int) -> bool:
            key, value = batch.items[i]
            return bool(await batch.client(i).set(key, value))

        return await self._batch("put", op, batch)

    async def _get(self, batch: Batch[Item]) -> tuple[Figure, list[Item]]:
        """The figure's ``local_hits`` counts gets the reader answered from its own
        storage; ``remote_p50_ms``/``remote_p99_ms`` are the latencies of the others."""
        local = 0
        remote: list[float] = []  # latencies of the successful gets that went to the network

        async def op(i: int) -> bool:
            nonlocal local
            key, value = batch.items[i]
            reader = batch.client(i)
            is_local = reader.storage.get(digest(key)) is not None
            local += is_local
            t0 = time.perf_counter()
            ok = bool(await reader.get(key) == value)
            if ok and not is_local:
                remote.append(time.perf_counter() - t0)
            return ok

        def extra() -> dict[str, Any]:
            found: dict[str, Any] = {"local_hits": local}
            if remote:
                remote.sort()
                found["remote_p50_ms"] = round(harness.percentile(remote, 0.50) * 1e3, 3)
                found["remote_p99_ms"] = round(harness.percentile(remote, 0.99) * 1e3, 3)
            return found

        return await self._batch("get", op, batch, extra)

    async def _batch(
        self,
        name: str,
        op: harness.BatchOp,
        batch: Batch[Item],
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> tuple[Figure, list[Item]]:
        """One batch; its figure has ``extra()`` (if given) then the RPC timeouts, contacts
        dropped and UDP drops during the batch."""
        timeouts0, dropped0 = self.noise.snapshot()
        drops0 = harness.udp_rcvbuf_errors()
        res = await harness.run_batch(
            op, len(batch.items), batch.concurrency, batch.op_timeout_s, batch.deadline
        )
        timeouts, dropped = self.noise.snapshot()
        counted = {
            **(extra() if extra is not None else {}),
            "rpc_timeouts": timeouts - timeouts0,
            "contacts_dropped": dropped - dropped0,
            **harness.udp_drops_since(drops0),
        }
        return self._figure(name, res, batch, counted)


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.network_arg_parser(
        "kademlia baseline: put/get throughput and latency on loopback."
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
    net = KademliaNet(
        args.nodes,
        ksize=args.ksize,
        alpha=args.alpha,
        op_timeout_s=args.op_timeout,
        rcvbuf_bytes=args.rcvbuf,
        workload=Workload(args.value_min, args.value_max, args.seed),
    )
    return harness.network_main("bench.baselines.kademlia_net", net, args, close_reserve_s=1.0)


if __name__ == "__main__":
    raise SystemExit(main())
