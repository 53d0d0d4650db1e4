"""OpenDHT baseline: N C++ ``DhtRunner`` nodes on 127.0.0.1 in this process.

``python -m bench.baselines.opendht_net --nodes 50 --ops 2000`` prints the machine line,
one setup line, then one JSON object per figure (put/get x seq/c32).

How the binding behaves (opendht 4.4.2, Cython over libopendht), and what this module does
about it:

* Every ``DhtRunner`` runs its own native threads (two per node); ``put``/``get`` with
  callbacks return at once and the callbacks run later, holding the GIL, on the *calling
  runner's* DHT thread. Several ops in flight are simply several calls before their
  callbacks fire; :func:`_run_batch` keeps C outstanding with a condition variable, on a
  worker thread (``asyncio.to_thread``) so that this adapter's face is async like the
  others' (:class:`bench.harness.LoopbackNet`).
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
* **Authenticated path** (``signed=True``, contender ``opendht-signed``): every client
  node (the ``signed_pairs`` writer/reader pairs, default 4, and the probe nodes 1 and 2)
  is started with its own RSA-4096 identity (~0.5-1 s each to generate, so not the
  storing nodes, which need none)
  (``runner.run(id=dht.Identity.generate(), ...)``: setting it only through
  ``DhtConfig.setIdentity`` is not enough for ``putSigned``), puts are ``putSigned`` and a
  get succeeds only on a value that carries its owner's key (the reader's ``SecureDht``
  drops values whose signature does not verify before they reach the callback).
  :meth:`OpenDhtNet.listen_batch` is the messaging path beside it: the reader ``listen``s
  on an inbox key and the writer ``put``s (or, signed, ``putEncrypted`` to the reader's
  ``PublicKey``, which is how Jami's messages travel) fresh values there; an op is done
  when the reader's listen callback gets the value (decrypted, for the encrypted path).
* Every figure carries ``cpu_ms_per_op``: this process's CPU (user + system, every
  thread, so every node of the network) over the batch, per successful op.
* Rate limits are on by default in OpenDHT and count per source IP: on loopback every node
  is 127.0.0.1, so they would throttle the whole network; they are disabled here
  (``rate_limit=False``, as OpenDHT's own benchmarks and tests do).
* ``join()`` holds the GIL while it waits for the node's threads, so a Python callback
  still due on that node deadlocks it (e.g. ``shutdown()`` then ``join()`` right away).
  :meth:`OpenDhtNet.close` waits (bounded) for outstanding callbacks, shuts every node
  down with a callback and waits for those, then joins each node with no callback due;
  any other is kept alive (never destroyed: its destructor joins) and the command leaves
  with ``os._exit`` (``bench.harness.run_main``). A ``faulthandler`` watchdog ends the
  command if all else hangs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import opendht as dht  # type: ignore[import-untyped]

from bench import harness
from bench.harness import Batch, Deadline, Figure, LoopbackNet, TableWatch, Workload

NAME = "opendht"
SIGNED_NAME = "opendht-signed"  # the same network, its clients with identities
NETWORK_ID = 0x444E41  # "DNA": keeps these nodes apart from any other OpenDHT network
TARGET_NODES = 8  # OpenDHT stores each value on the 8 closest nodes
AF_INET = 2

Item = tuple[Any, bytes]  # (opendht.InfoHash, value bytes)
Done = Callable[[bool], None]
Issue = Callable[[int, Done], None]
NativeDone = Callable[[bool, object], None]  # the binding's done callback: (ok, nodes)


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


class _Lookout:
    """A get's value callback: it stops the search once the value put has been seen
    (``signed``: only a value that carries its owner's key counts)."""

    def __init__(self, data: bytes, *, signed: bool = False) -> None:
        self.data = data
        self.signed = signed
        self.found = False

    def on_value(self, value: Any) -> bool:
        seen = value.data == self.data and (not self.signed or _has_owner(value))
        self.found = self.found or seen
        return not self.found


def _has_owner(value: Any) -> bool:
    """Whether a value carries its owner's public key (a signed one): an unsigned value's
    owner is an uninitialized key, whose ID raises."""
    try:
        value.owner.getId()
    except ValueError:
        return False
    return True


def _run_batch(issue: Issue, batch: Batch[Item]) -> harness.BatchResult:
    """Run the batch's ops from the calling thread, at most ``batch.concurrency`` in flight.

    ``issue(i, done)`` starts op i and arranges for ``done(ok)`` to be called once, from any
    thread. An op not done within ``batch.op_timeout_s`` fails (its late ``done`` is
    ignored); no op is started after the batch's deadline, so the batch ends by then plus
    ``op_timeout_s``.
    """
    count, concurrency, deadline = len(batch.items), batch.concurrency, batch.deadline
    op_timeout_s = batch.op_timeout_s
    cond = threading.Condition()
    inflight: dict[int, float] = {}
    tally = harness.BatchTally()
    clock = time.perf_counter

    def finisher(i: int) -> Done:
        def done(ok: bool) -> None:
            now = clock()
            with cond:
                t0 = inflight.pop(i, None)
                if t0 is None:  # timed out already
                    return
                tally.done(i, ok, t0, now)
                cond.notify()

        return done

    issued = 0
    with cond:
        while True:
            now = clock()
            for i, t0 in [(i, t0) for i, t0 in inflight.items() if now - t0 > op_timeout_s]:
                del inflight[i]
                tally.done(i, False, t0, now)
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
    return tally.result()


# ---------------------------------------------------------------------------- the network


class OpenDhtNet(LoopbackNet[Item]):
    """N ``DhtRunner`` nodes on loopback, bootstrapped to the first, with client pairs
    (layout and workload: :class:`bench.harness.LoopbackNet`)."""

    name = NAME

    def __init__(
        self,
        nodes: int = harness.DEFAULT_NODES,
        *,
        rate_limit: bool = False,
        op_timeout_s: float = 5.0,
        workload: Workload | None = None,
        signed: bool = False,
        signed_pairs: int = 4,
    ) -> None:
        super().__init__(nodes, op_timeout_s=op_timeout_s, workload=workload)
        self.rate_limit = rate_limit
        self.signed = signed
        self.signed_pairs = signed_pairs
        self.name = SIGNED_NAME if signed else NAME
        self._pending = _Pending()
        self._listens: list[Any] = []  # listen tokens, never cancelled (see listen_batch)

    def setup(self) -> dict[str, Any]:
        return {"rate_limit": self.rate_limit, "host": harness.HOST, "signed": self.signed}

    def version(self) -> str:
        return str(importlib.metadata.version(NAME))

    @property
    def max_pairs(self) -> int:
        """Signed: only the pairs with identities are clients (pairs wrap around)."""
        pairs = super().max_pairs
        return max(1, min(pairs, self.signed_pairs)) if self.signed else pairs

    def _has_identity(self, index: int) -> bool:
        """Whether node ``index`` is started with an identity: the probe nodes and the
        client pairs' nodes (the last ``2 * signed_pairs``), when signed."""
        clients = self.size - 2 * self.max_pairs
        return self.signed and (index in (1, 2) or index >= clients)

    # -- lifecycle

    async def _launch(self, deadline: Deadline) -> None:
        # Generating the identities (RSA-4096, seconds on a loaded machine) is not the
        # network coming up: the deadline for that is pushed back by the time it took.
        t0 = time.monotonic()
        identities = await asyncio.to_thread(self._identities)
        deadline.at += time.monotonic() - t0
        await asyncio.to_thread(self._launch_runners, identities)

    def _identities(self) -> dict[int, Any]:
        return {i: dht.Identity.generate() for i in range(self.size) if self._has_identity(i)}

    def _launch_runners(self, identities: dict[int, Any]) -> None:
        config = dht.DhtConfig()
        config.setNetwork(NETWORK_ID)
        if not self.rate_limit:
            config.setRateLimit(-1, -1)
        for i in range(self.size):
            runner = dht.DhtRunner()
            if i in identities:
                runner.run(id=identities[i], port=0, ipv4=harness.HOST, config=config)
            else:
                runner.run(port=0, ipv4=harness.HOST, config=config)
            self.nodes.append(runner)
        port = str(self.nodes[0].getBound().getPort())
        for runner in self.nodes[1:]:
            runner.bootstrap(harness.HOST, port)

    def _table_watch(self) -> TableWatch:
        # Joining nodes know only the bootstrap node for ~4 s, until their first table
        # maintenance fills them: wait for that, not for a few seconds of stillness.
        return TableWatch(min(self.size - 1, TARGET_NODES), floor=2, stable_s=3.0)

    def contacts(self) -> list[int]:
        """Nodes (good or dubious) in each node's IPv4 routing table, from its log dump."""
        return [r.getRoutingTablesLog(AF_INET).count("    Node ") for r in self.nodes]

    async def close(self, timeout_s: float = 8.0) -> None:
        """Shut every node down and join it. One that cannot be is kept alive
        (``harness.KEPT_ALIVE``), so that its destructor (which joins, holding the GIL)
        never runs while one of its callbacks is still due."""
        if self.nodes:
            await asyncio.to_thread(self._close_runners, timeout_s)

    def _close_runners(self, timeout_s: float) -> None:
        deadline = Deadline(timeout_s)
        self._pending.drain(deadline.remaining() / 2)
        events: list[threading.Event] = []
        for runner in self.nodes:
            event = threading.Event()
            events.append(event)
            try:
                runner.shutdown(event.set)
            except Exception:
                event.set()
        stuck = 0
        for runner, event in zip(self.nodes, events, strict=True):
            if event.wait(deadline.remaining()) and not self._pending.due(runner):
                runner.join()
            else:
                harness.KEPT_ALIVE.append(runner)
                stuck += 1
        if stuck:
            print(
                f"opendht: {stuck} node(s) not joined (kept alive), "
                f"{self._pending.count} callback(s) still due",
                file=sys.stderr,
            )
        self.nodes = []

    # -- measuring

    def new_items(self, count: int) -> list[Item]:
        return [(dht.InfoHash.getRandom(), self.workload.value()) for _ in range(count)]

    def _call(self, runner: Any, start: Callable[[NativeDone], None], done: Done) -> None:
        """Start one native op on ``runner`` with ``start(callback)``; its callback is due
        (see :class:`_Pending`) until it fires, then calls ``done(ok)``."""
        pending = self._pending

        def on_done(ok: bool, _nodes: object) -> None:
            pending.done(runner)
            done(bool(ok))

        pending.add(runner)
        try:
            start(on_done)
        except BaseException:
            pending.done(runner)
            raise

    def _put_issue(self, batch: Batch[Item]) -> Issue:
        def issue(i: int, done: Done) -> None:
            key, data = batch.items[i]
            writer = batch.client(i)
            if self.signed:
                self._call(writer, lambda cb: writer.putSigned(key, dht.Value(data), cb), done)
            else:
                self._call(writer, lambda cb: writer.put(key, dht.Value(data), cb), done)

        return issue

    def _get_issue(self, batch: Batch[Item]) -> Issue:
        def issue(i: int, done: Done) -> None:
            key, data = batch.items[i]
            reader = batch.client(i)
            lookout = _Lookout(data, signed=self.signed)

            def start(callback: NativeDone) -> None:
                reader.get(key, lookout.on_value, callback)

            self._call(reader, start, lambda ok: done(ok and lookout.found))

        return issue

    async def _put(self, batch: Batch[Item]) -> tuple[Figure, list[Item]]:
        return await asyncio.to_thread(self._measure, "put", self._put_issue(batch), batch)

    async def _get(self, batch: Batch[Item]) -> tuple[Figure, list[Item]]:
        return await asyncio.to_thread(self._measure, "get", self._get_issue(batch), batch)

    async def listen_batch(
        self, count: int, concurrency: int, deadline: Deadline, *, pair: int = 0
    ) -> tuple[Figure, list[float]]:
        """Messages through ``listen`` (``bench.e2e``'s baseline): pair ``pair``'s reader
        listens on a fresh inbox key, its writer puts ``count`` fresh values there,
        ``concurrency`` in flight; an op is done when the reader's listen callback gets
        its exact value. Unsigned: ``put``; signed: ``putEncrypted`` to the reader's
        public key, so the callback gets the value decrypted. Returns the figure (op
        ``"put_listen"`` or ``"put_encrypted_listen"``) and how long each successful put
        took to be acknowledged (s)."""
        return await asyncio.to_thread(self._listen_batch, count, concurrency, deadline, pair)

    def _listen_batch(
        self, count: int, concurrency: int, deadline: Deadline, pair: int
    ) -> tuple[Figure, list[float]]:
        writer, reader = self.writer(pair), self.reader(pair)
        inbox = dht.InfoHash.getRandom()
        items = [(inbox, data) for _, data in self.new_items(count)]
        waiting: dict[bytes, Done] = {}
        lock = threading.Lock()
        put_s: list[float] = []

        def on_value(value: Any, expired: bool) -> bool:
            with lock:
                done = None if expired else waiting.pop(value.data, None)
            if done is not None:
                done(True)
            return True

        token = reader.listen(inbox, on_value)
        time.sleep(0.2)  # the listen reaches the inbox's nodes before the first put
        to = reader.getPublicKey() if self.signed else None

        def issue(i: int, done: Done) -> None:
            data = items[i][1]
            with lock:
                waiting[data] = done
            t0 = time.perf_counter()

            def put_done(ok: bool) -> None:
                if ok:
                    put_s.append(time.perf_counter() - t0)
                else:
                    with lock:
                        late = waiting.pop(data, None)
                    if late is not None:
                        late(False)

            def start(callback: NativeDone) -> None:
                if to is None:
                    writer.put(inbox, dht.Value(data), callback)
                else:
                    writer.putEncrypted(inbox, dht.Value(data), to, callback)

            self._call(writer, start, put_done)

        op = "put_encrypted_listen" if self.signed else "put_listen"
        batch = Batch(items, [writer], concurrency, deadline, self.op_timeout_s)
        # The listen is never cancelled: in opendht 4.4.2 every ListenToken shares one
        # ``_cb`` dict, so ``cancelListen`` releases the context of the *latest* listen, not
        # this one's, and a later callback then reads freed memory (the run dies). Left
        # alone, each listen keeps its own reference; its inbox gets no more values.
        self._listens.append(token)
        figure = self._measure(op, issue, batch)[0]
        # A value often reaches the listener before its put is acknowledged: wait (bounded)
        # for the acknowledgements, so that every put's time is in ``put_s``.
        self._pending.drain(self.op_timeout_s)
        return figure, list(put_s)

    def _measure(self, op: str, issue: Issue, batch: Batch[Item]) -> tuple[Figure, list[Item]]:
        """One batch on this thread (blocking until it is done): its figure and the items
        of its successful ops, with this process's CPU per successful op."""
        drops = harness.udp_rcvbuf_errors()
        cpu0 = harness.cpu_s()
        res = _run_batch(issue, batch)
        extra = {**harness.udp_drops_since(drops),
                 **harness.cpu_ms_per_op(harness.cpu_s() - cpu0, len(res.succeeded))}  # fmt: skip
        return self._figure(op, res, batch, extra)


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.network_arg_parser(
        "OpenDHT baseline: put/get throughput and latency on loopback."
    )
    parser.add_argument(
        "--rate-limit", action="store_true", help="keep OpenDHT's per-IP rate limits on"
    )
    parser.add_argument(
        "--signed", action="store_true", help="clients with identities: putSigned, signed gets"
    )
    args = parser.parse_args(argv)
    net = OpenDhtNet(
        args.nodes,
        signed=args.signed,
        rate_limit=args.rate_limit,
        op_timeout_s=args.op_timeout,
        workload=Workload(args.value_min, args.value_max, args.seed),
    )
    close_reserve_s = min(8.0, args.budget / 10)
    name = "bench.baselines.opendht_net"
    return harness.network_main(name, net, args, close_reserve_s=close_reserve_s)


if __name__ == "__main__":
    raise SystemExit(main())
