"""OpenDHT baseline: N C++ ``DhtRunner`` nodes on 127.0.0.1 in this process.

``python -m bench.baselines.opendht_net --nodes 50 --ops 2000`` prints the machine line,
one setup line, then one JSON object per figure (put/get x seq/c32).

How the binding behaves (opendht 4.4.2, Cython over libopendht), and what this module does
about it:

* Every ``DhtRunner`` runs its own native threads (two per node); ``put``/``get`` with
  callbacks return at once and the callbacks run later, holding the GIL, on the *calling
  runner's* DHT thread. Several ops in flight are simply several calls before their
  callbacks fire; :func:`_run_batch` keeps C outstanding with a condition variable.
* ``put(key, Value, done_cb)``: ``done_cb(ok, nodes)`` fires once the value is acknowledged
  by the (up to 8, ``TARGET_NODES``) closest good nodes of the key's search.
* ``get(key, get_cb, done_cb)``: ``get_cb(value) -> bool`` per value found, return False to
  stop the search early (done as soon as the value put is seen, like ``aio.getFirst``);
  then ``done_cb(ok, nodes)`` fires once. A get on the node that put the key is answered
  from that node's search cache without any network traffic (~0.1 ms), so gets go from a
  different node (the *reader*) than puts (the *writer*), each key read once.
* A node keeps a search for every key it has put or got (62 minutes), and offers every
  node it hears from to each of them (``trySearchInsert`` -> ``Search::insertNode``, ~70%
  of the client's CPU once it has a few thousand): the cost of an op grows with the keys
  the node touched. Sequential puts from one node fall from ~1,000/s for its first few
  hundred keys to ~150/s past 2,000, while a fresh node next to it still does ~800/s.
  That is OpenDHT's real cost for a client touching many keys, so it stays in the
  figures (``ops_per_s_first10pct``/``_last10pct`` show it); but so that one figure does
  not pay for the keys of the figure before, the seq and the cN figures use their own
  client nodes (``clients`` writer/reader pairs per figure, default one).
* Rate limits are on by default in OpenDHT and count per source IP: on loopback every node
  is 127.0.0.1, so they would throttle the whole network; they are disabled here
  (``rate_limit=False``, as OpenDHT's own benchmarks and tests do).
* ``join()`` holds the GIL while it waits for the node's threads, so a Python callback
  still due on that node deadlocks it (e.g. ``shutdown()`` then ``join()`` right away).
  :meth:`OpenDhtNet.close` waits (bounded) for outstanding callbacks, shuts every node
  down with a callback and waits for those, then joins each node with no callback due;
  any other is kept alive (never destroyed: its destructor joins) and the CLI leaves with
  ``os._exit``. A ``faulthandler`` watchdog ends the CLI if all else hangs.
"""

from __future__ import annotations

import faulthandler
import importlib.metadata
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import opendht as dht  # type: ignore[import-untyped]

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
    print_run,
    process_stats,
    udp_drops_since,
    udp_rcvbuf_errors,
)
from bench.common import print_machine

NAME = "opendht"
HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0  # per probe op while waiting for the network to be usable
NETWORK_ID = 0x444E41  # "DNA": keeps these nodes apart from any other OpenDHT network
TARGET_NODES = 8  # OpenDHT stores each value on the 8 closest nodes
AF_INET = 2

Item = tuple[Any, bytes]  # (opendht.InfoHash, value bytes)
Done = Callable[[bool], None]
Issue = Callable[[int, Done], None]

# Runners that could not be shut down cleanly: kept alive so that their destructor (which
# joins, holding the GIL) never runs while one of their callbacks is still due.
_STUCK: list[Any] = []


def version() -> str:
    try:
        return importlib.metadata.version("opendht")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return str(dht.version())


# ---------------------------------------------------------------------------- batches


class _Pending:
    """Native callbacks still due, per runner (whether or not the batch gave up on the op).

    Callbacks run on the thread of the runner the op was issued on: a runner with none due
    can be joined safely.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, int] = {}  # id(runner) -> callbacks due

    def add(self, runner: object) -> None:
        with self._cond:
            self._due[id(runner)] = self._due.get(id(runner), 0) + 1

    def done(self, runner: object) -> None:
        with self._cond:
            self._due[id(runner)] -= 1
            if not self.count:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        return sum(self._due.values())

    def due(self, runner: object) -> int:
        with self._cond:
            return self._due.get(id(runner), 0)

    def drain(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self.count, timeout=timeout_s)


def _run_batch(
    issue: Issue, count: int, concurrency: int, op_timeout_s: float, deadline: Deadline
) -> BatchResult:
    """Run ``count`` ops, at most ``concurrency`` in flight, from the calling thread.

    ``issue(i, done)`` starts op i and arranges for ``done(ok)`` to be called once, from any
    thread. An op not done within ``op_timeout_s`` fails (its late ``done`` is ignored); no
    op is started after ``deadline``, so the batch ends by ``deadline + op_timeout_s``.
    """
    cond = threading.Condition()
    inflight: dict[int, float] = {}
    latencies: list[float] = []
    succeeded: list[int] = []
    finished: list[float] = []
    failures = 0
    clock = time.perf_counter
    start = clock()
    last = start

    def finisher(i: int) -> Done:
        def done(ok: bool) -> None:
            nonlocal failures, last
            now = clock()
            with cond:
                t0 = inflight.pop(i, None)
                if t0 is None:  # timed out already
                    return
                if ok:
                    latencies.append(now - t0)
                    succeeded.append(i)
                    finished.append(now - start)
                else:
                    failures += 1
                last = now
                cond.notify()

        return done

    issued = 0
    with cond:
        while True:
            now = clock()
            for i in [i for i, t0 in inflight.items() if now - t0 > op_timeout_s]:
                del inflight[i]
                failures += 1
                last = now
            if issued < count and len(inflight) < concurrency and not deadline.expired():
                i = issued
                issued += 1
                done = finisher(i)
                inflight[i] = clock()
                cond.release()
                try:
                    issue(i, done)
                except Exception:
                    done(False)
                finally:
                    cond.acquire()
                continue
            if not inflight:
                break
            oldest = min(inflight.values())
            cond.wait(timeout=max(0.001, min(0.05, oldest + op_timeout_s - now)))
    return BatchResult(latencies, failures, max(last - start, 1e-9), sorted(succeeded), finished)


# ---------------------------------------------------------------------------- the network


class OpenDhtNet:
    """N ``DhtRunner`` nodes on loopback, bootstrapped to the first, with client pairs.

    Use as a context manager (``with OpenDhtNet(50) as net: ...``) or call :meth:`start`
    and :meth:`close`. Client pair j is a writer and a reader taken from the end of the
    node list (pair 0: the last node writes, the one before it reads); the bootstrap node
    is never a client. Batches take the pairs to use (default pair 0) and spread their ops
    over them round-robin.
    """

    def __init__(
        self,
        nodes: int = DEFAULT_NODES,
        *,
        rate_limit: bool = False,
        op_timeout_s: float = 5.0,
        workload: Workload | None = None,
    ) -> None:
        if nodes < 3:
            raise ValueError("need at least 3 nodes (bootstrap, writer, reader)")
        self.size = nodes
        self.rate_limit = rate_limit
        self.op_timeout_s = op_timeout_s
        self.workload = workload or Workload()
        self.runners: list[Any] = []
        self.converge_s = 0.0
        self._pending = _Pending()

    # -- lifecycle

    def start(self, ready_timeout_s: float = 15.0, probes: int = 5) -> float:
        """Start the nodes; return once the network is usable (seconds it took).

        Usable: every node has ``min(N - 1, 8)`` nodes in its routing table (or at least 2,
        and no table changed for 3 s: :class:`~bench.baselines.TableWatch`), then
        ``probes`` fresh keys in a row can be put by one node and read by another (nodes 1
        and 2, not client pair 0 unless N is tiny).
        Raises ``TimeoutError`` (after closing the nodes) past ``ready_timeout_s``.
        """
        deadline = Deadline(ready_timeout_s)
        t0 = time.perf_counter()
        config = dht.DhtConfig()
        config.setNetwork(NETWORK_ID)
        if not self.rate_limit:
            config.setRateLimit(-1, -1)
        try:
            for _ in range(self.size):
                runner = dht.DhtRunner()
                runner.run(port=0, ipv4=HOST, config=config)
                self.runners.append(runner)
            port = str(self.runners[0].getBound().getPort())
            for runner in self.runners[1:]:
                runner.bootstrap(HOST, port)
            self._wait_ready(deadline, probes)
        except BaseException:
            self.close()
            raise
        self.converge_s = time.perf_counter() - t0
        return self.converge_s

    def _wait_ready(self, deadline: Deadline, probes: int) -> None:
        # Joining nodes know only the bootstrap node for ~4 s, until their first table
        # maintenance fills them: wait for that, not for a few seconds of stillness.
        watch = TableWatch(min(self.size - 1, TARGET_NODES), floor=2, stable_s=3.0)
        while not watch.settled(self.contacts()):
            if deadline.expired():
                raise TimeoutError(f"routing tables not filled: {sorted(self.contacts())[:5]}")
            time.sleep(0.05)
        streak = 0
        while streak < probes:
            if deadline.expired():
                raise TimeoutError("probe puts/gets still failing")
            items = [(dht.InfoHash.getRandom(), self.workload.value())]
            writer, reader = self.runners[1], self.runners[2]
            _, stored = self._put(items, [writer], 1, deadline, PROBE_TIMEOUT_S)
            _, read = self._get(stored, [reader], 1, deadline, PROBE_TIMEOUT_S)
            streak = streak + 1 if len(read) == 1 else 0

    def contacts(self) -> list[int]:
        """Nodes (good or dubious) in each node's IPv4 routing table, from its log dump."""
        return [r.getRoutingTablesLog(AF_INET).count("    Node ") for r in self.runners]

    def close(self, timeout_s: float = 8.0) -> bool:
        """Shut every node down and join it; False if some could not be (kept alive)."""
        if not self.runners:
            return True
        deadline = Deadline(timeout_s)
        self._pending.drain(deadline.remaining() / 2)
        events: list[threading.Event] = []
        for runner in self.runners:
            event = threading.Event()
            events.append(event)
            try:
                runner.shutdown(event.set)
            except Exception:
                event.set()
        stuck = 0
        for runner, event in zip(self.runners, events, strict=True):
            if event.wait(deadline.remaining()) and not self._pending.due(runner):
                runner.join()
            else:
                _STUCK.append(runner)
                stuck += 1
        if stuck:
            print(
                f"opendht: {stuck} node(s) not joined (kept alive), "
                f"{self._pending.count} callback(s) still due",
                file=sys.stderr,
            )
        self.runners = []
        return not stuck

    def __enter__(self) -> OpenDhtNet:
        if not self.runners:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    @property
    def max_pairs(self) -> int:
        """Disjoint client pairs available (the bootstrap node is not a client)."""
        return (self.size - 1) // 2

    def writer(self, pair: int = 0) -> Any:
        return self.runners[-1 - 2 * (pair % self.max_pairs)]

    def reader(self, pair: int = 0) -> Any:
        return self.runners[-2 - 2 * (pair % self.max_pairs)]

    # -- measuring

    def new_items(self, count: int) -> list[Item]:
        """Distinct random keys with fresh random values."""
        return [(dht.InfoHash.getRandom(), self.workload.value()) for _ in range(count)]

    def put_batch(
        self,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        *,
        pairs: Sequence[int] = (0,),
        op_timeout_s: float | None = None,
    ) -> tuple[Figure, list[Item]]:
        """The writers of ``pairs`` put every item, ``concurrency`` in flight in all.

        Returns the figure and the items stored (put done with ok).
        """
        timeout = self.op_timeout_s if op_timeout_s is None else op_timeout_s
        writers = [self.writer(j) for j in pairs]
        return self._put(items, writers, concurrency, deadline, timeout)

    def get_batch(
        self,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        *,
        pairs: Sequence[int] = (0,),
        op_timeout_s: float | None = None,
    ) -> tuple[Figure, list[Item]]:
        """The readers of ``pairs`` get every key, ``concurrency`` in flight in all.

        A get succeeds once it has seen the exact value put. Returns the figure and the
        items read back.
        """
        timeout = self.op_timeout_s if op_timeout_s is None else op_timeout_s
        readers = [self.reader(j) for j in pairs]
        return self._get(items, readers, concurrency, deadline, timeout)

    def _put(
        self,
        items: Sequence[Item],
        writers: Sequence[Any],
        concurrency: int,
        deadline: Deadline,
        op_timeout_s: float,
    ) -> tuple[Figure, list[Item]]:
        pending = self._pending

        def issue(i: int, done: Done) -> None:
            key, data = items[i]
            writer = writers[i % len(writers)]

            def on_done(ok: bool, _nodes: object) -> None:
                pending.done(writer)
                done(bool(ok))

            pending.add(writer)
            try:
                writer.put(key, dht.Value(data), on_done)
            except BaseException:
                pending.done(writer)
                raise

        return self._batch("put", issue, items, concurrency, deadline, op_timeout_s)

    def _get(
        self,
        items: Sequence[Item],
        readers: Sequence[Any],
        concurrency: int,
        deadline: Deadline,
        op_timeout_s: float,
    ) -> tuple[Figure, list[Item]]:
        pending = self._pending

        def issue(i: int, done: Done) -> None:
            key, data = items[i]
            reader = readers[i % len(readers)]
            found = False

            def on_value(value: Any) -> bool:
                nonlocal found
                if value.data == data:
                    found = True
                    return False  # stop the search: we have what we came for
                return True

            def on_done(ok: bool, _nodes: object) -> None:
                pending.done(reader)
                done(bool(ok) and found)

            pending.add(reader)
            try:
                reader.get(key, on_value, on_done)
            except BaseException:
                pending.done(reader)
                raise

        return self._batch("get", issue, items, concurrency, deadline, op_timeout_s)

    def round_trip_batch(
        self,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        *,
        pair: int = 0,
        op_timeout_s: float | None = None,
    ) -> tuple[Figure, list[float]]:
        """Put-then-get round trips (``bench.e2e``'s baseline), ``concurrency`` in flight.

        Pair ``pair``'s writer puts an item; once the put is acknowledged, the pair's reader
        gets it; the op succeeds when the reader sees the exact value. Returns the figure
        (op ``"put_get"``) and the put part of every round trip whose put succeeded (s).

        The gets are issued from a plain thread rather than from inside the put's callback
        (which runs on the writer's native thread, holding the GIL).
        """
        timeout = self.op_timeout_s if op_timeout_s is None else op_timeout_s
        writer, reader = self.writer(pair), self.reader(pair)
        pending = self._pending
        put_s: list[float] = []
        gets: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

        def issue_gets() -> None:
            while (get := gets.get()) is not None:
                get()

        def issue(i: int, done: Done) -> None:
            key, data = items[i]
            t0 = time.perf_counter()
            found = False

            def on_value(value: Any) -> bool:
                nonlocal found
                found = found or value.data == data
                return not found  # stop the search once the value is seen

            def on_get_done(ok: bool, _nodes: object) -> None:
                pending.done(reader)
                done(bool(ok) and found)

            def get() -> None:
                pending.add(reader)
                try:
                    reader.get(key, on_value, on_get_done)
                except BaseException:
                    pending.done(reader)
                    done(False)

            def on_put_done(ok: bool, _nodes: object) -> None:
                pending.done(writer)
                if ok:
                    put_s.append(time.perf_counter() - t0)
                    gets.put(get)
                else:
                    done(False)

            pending.add(writer)
            try:
                writer.put(key, dht.Value(data), on_put_done)
            except BaseException:
                pending.done(writer)
                raise

        getter = threading.Thread(target=issue_gets, name="opendht-gets", daemon=True)
        getter.start()
        try:
            fig, _ = self._batch("put_get", issue, items, concurrency, deadline, timeout)
        finally:
            gets.put(None)
            getter.join()
        return fig, put_s

    def _batch(
        self,
        op: str,
        issue: Issue,
        items: Sequence[Item],
        concurrency: int,
        deadline: Deadline,
        op_timeout_s: float,
    ) -> tuple[Figure, list[Item]]:
        drops = udp_rcvbuf_errors()
        res = _run_batch(issue, len(items), concurrency, op_timeout_s, deadline)
        extra = udp_drops_since(drops)
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


def run_opendht(
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
    rate_limit: bool = False,
) -> BaselineRun:
    """Start ``nodes`` OpenDHT nodes, measure put/get seq and cN, close; all in ``budget_s``.

    The seq figures use client pairs ``0..clients-1``, the cN figures the next ``clients``
    pairs (pairs wrap around if N is too small). For each: a warm-up (``warmup`` puts and
    gets, not reported), then the puts of ``ops`` fresh keys, then gets of the keys whose
    put succeeded. Each figure stops issuing ops after ``batch_timeout_s`` (or when the
    budget, less the time kept for closing, runs out); an op fails after ``op_timeout_s``.
    """
    budget = Deadline(budget_s)
    close_reserve = min(8.0, budget_s / 10)
    net = OpenDhtNet(
        nodes,
        rate_limit=rate_limit,
        op_timeout_s=op_timeout_s,
        workload=Workload(value_min, value_max, seed),
    )
    net.start(ready_timeout_s=min(ready_timeout_s, budget.remaining()))
    puts: list[Figure] = []
    gets: list[Figure] = []
    setup: dict[str, Any] = {
        "rate_limit": rate_limit,
        "host": HOST,
        "clients": clients,
        **process_stats(),
    }
    try:

        def window(seconds: float) -> Deadline:
            return budget.sub(seconds, reserve=close_reserve + op_timeout_s)

        for k, c in enumerate((1, concurrency)):
            pairs = range(k * clients, (k + 1) * clients)
            if warmup > 0:
                warm = window(batch_timeout_s / 4)
                _, stored = net.put_batch(net.new_items(warmup), c, warm, pairs=pairs)
                net.get_batch(stored, c, warm, pairs=pairs)
            fig, stored = net.put_batch(net.new_items(ops), c, window(batch_timeout_s), pairs=pairs)
            puts.append(fig)
            gets.append(net.get_batch(stored, c, window(batch_timeout_s), pairs=pairs)[0])
        setup.update({f"{k}_after": v for k, v in process_stats().items()})
    finally:
        net.close(timeout_s=max(1.0, min(close_reserve, budget.remaining())))
    return BaselineRun(NAME, version(), nodes, net.converge_s, (*puts, *gets), setup)


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("OpenDHT baseline: put/get throughput and latency on loopback.")
    parser.add_argument(
        "--rate-limit", action="store_true", help="keep OpenDHT's per-IP rate limits on"
    )
    parser.add_argument(
        "--clients", type=int, default=1, help="writer/reader pairs sharing each figure's ops"
    )
    args = parser.parse_args(argv)
    # Last resort if the native library hangs (e.g. a join deadlock): dump and exit.
    faulthandler.dump_traceback_later(args.budget + 20, exit=True)
    print_machine()
    try:
        run = run_opendht(
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
            rate_limit=args.rate_limit,
        )
        print_run(run)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if _STUCK:  # their destructors would join (GIL held) at exit: leave without running them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    failures = sum(f.failures for f in run.figures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
