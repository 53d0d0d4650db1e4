"""Third-party DHT baselines for the overlay benchmark (conventions: shared BENCH.md).

Each baseline starts N nodes on loopback in this process, waits until the network answers,
then measures put and get from client nodes: ops/s, p50/p99 latency and failures, one op
at a time (``"seq"``) and with C operations in flight (``"c32"`` for C=32):

* :mod:`bench.baselines.opendht_net` - C++ OpenDHT nodes (PyPI ``opendht``), one
  ``DhtRunner`` (two native threads) per node; sync API (:class:`~.opendht_net.OpenDhtNet`,
  :func:`~.opendht_net.run_opendht`).
* :mod:`bench.baselines.kademlia_net` - the pure-Python ``kademlia`` package, every node in
  one asyncio loop; async API (:class:`~.kademlia_net.KademliaNet`,
  :func:`~.kademlia_net.run_kademlia_async`) and a sync wrapper.

Both use the same workload, defined here: distinct random keys, random values of
``value_min``..``value_max`` bytes, puts issued by a *writer* node, gets of those keys by a
different *reader* node (a get on the node that put the key is answered from its local
cache, see the modules). A get fails unless it returns exactly the bytes put. Everything is
bounded in time: per-operation and per-batch timeouts, and a budget for the whole run.

This package only measures the baselines; the comparison module imports it and puts our
overlay's figures beside these in the same run. Standalone, each module prints one JSON
object per figure (``python -m bench.baselines.opendht_net --nodes 50 --ops 2000``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_NODES = 50
DEFAULT_OPS = 2000
DEFAULT_CONCURRENCY = 32
DEFAULT_WARMUP = 50
VALUE_MIN = 100
VALUE_MAX = 200
DRIFT_MIN_OPS = 100


def mode_name(concurrency: int) -> str:
    """``"seq"`` for one op at a time, else ``"c<C>"`` (``"c32"``)."""
    return "seq" if concurrency <= 1 else f"c{concurrency}"


# ---------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class BatchResult:
    """What one batch of ops gave, before summarizing (see :func:`make_figure`)."""

    latencies: list[float]  # seconds, successful ops only
    failures: int
    wall_s: float  # first op issued to last op finished
    succeeded: list[int]  # indices of the successful ops, ascending
    finished_s: list[float]  # when each successful op finished, from the batch's start


@dataclass(frozen=True)
class Figure:
    """One measured figure of one baseline.

    ``n`` ops were issued (``requested`` were asked for; fewer when the batch ran out of
    time). ``failures`` counts issued ops that failed, timed out or (gets) did not return
    the value put. ``ops_per_s`` is successful ops over the batch's wall time; latencies
    are over successful ops only (None if there were none).
    """

    baseline: str
    op: str
    mode: str
    ops_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    failures: int
    n: int
    nodes: int
    requested: int
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON line's object: the figure keys first, then ``requested``/extras."""
        line: dict[str, Any] = {
            "baseline": self.baseline,
            "op": self.op,
            "mode": self.mode,
            "ops_per_s": _round(self.ops_per_s),
            "p50_ms": None if self.p50_ms is None else _round(self.p50_ms),
            "p99_ms": None if self.p99_ms is None else _round(self.p99_ms),
            "failures": self.failures,
            "n": self.n,
            "nodes": self.nodes,
        }
        if self.requested != self.n:
            line["requested"] = self.requested
        line.update(self.extra)
        return line


@dataclass(frozen=True)
class BaselineRun:
    """Everything one :func:`run_*` call measured, plus how the network came up."""

    baseline: str
    version: str
    nodes: int
    converge_s: float
    figures: tuple[Figure, ...]
    setup: dict[str, Any] = field(default_factory=dict)

    def figure(self, op: str, mode: str) -> Figure:
        for fig in self.figures:
            if fig.op == op and fig.mode == mode:
                return fig
        raise KeyError((op, mode))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _round(value: float) -> float:
    if value >= 100:
        return round(value, 1)
    if value >= 1:
        return round(value, 2)
    return round(value, 4)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of already sorted samples."""
    if not sorted_values:
        raise ValueError("no samples")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def make_figure(
    baseline: str,
    op: str,
    concurrency: int,
    latencies_s: Sequence[float],
    failures: int,
    requested: int,
    nodes: int,
    elapsed_s: float,
    extra: dict[str, Any] | None = None,
    finished_s: Sequence[float] | None = None,
) -> Figure:
    """Summarize one batch; ``finished_s`` (when each successful op finished, seconds from
    the batch's start) adds the ops/s of its first and last tenth, which shows a baseline
    slowing down as it accumulates keys."""
    ordered = sorted(latencies_s)
    ok = len(ordered)
    extra = dict(extra or {})
    if finished_s is not None and len(finished_s) >= DRIFT_MIN_OPS:
        ends = sorted(finished_s)
        tenth = len(ends) // 10
        first = ends[tenth - 1]
        last = ends[-1] - ends[-1 - tenth]
        extra["ops_per_s_first10pct"] = _round(tenth / first) if first > 0 else None
        extra["ops_per_s_last10pct"] = _round(tenth / last) if last > 0 else None
    return Figure(
        baseline=baseline,
        op=op,
        mode=mode_name(concurrency),
        ops_per_s=ok / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=percentile(ordered, 0.50) * 1e3 if ordered else None,
        p99_ms=percentile(ordered, 0.99) * 1e3 if ordered else None,
        failures=failures,
        n=ok + failures,
        nodes=nodes,
        requested=requested,
        elapsed_s=elapsed_s,
        extra=extra,
    )


# ---------------------------------------------------------------------------- workload


class Workload:
    """Random values of ``value_min``..``value_max`` bytes (sizes from a seeded RNG)."""

    def __init__(self, value_min: int = VALUE_MIN, value_max: int = VALUE_MAX, seed: int = 1):
        if not 1 <= value_min <= value_max:
            raise ValueError("need 1 <= value_min <= value_max")
        self.value_min = value_min
        self.value_max = value_max
        self._rng = random.Random(seed)

    def value(self) -> bytes:
        return os.urandom(self._rng.randint(self.value_min, self.value_max))


class Deadline:
    """A point in time on the monotonic clock; ``remaining()`` is never negative."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def sub(self, seconds: float, reserve: float = 0.0) -> Deadline:
        """A deadline ``seconds`` from now, but at least ``reserve`` s before this one."""
        child = Deadline(0.0)
        child.at = min(time.monotonic() + seconds, self.at - reserve)
        return child


class TableWatch:
    """Decides when routing tables have settled, from per-node contact counts.

    Settled: every node has ``want`` contacts, or every node has at least ``floor`` and
    no count has changed for ``stable_s`` (small networks, where some tables stay short).
    """

    def __init__(self, want: int, *, floor: int = 1, stable_s: float = 2.0) -> None:
        self.want = want
        self.floor = min(floor, want)
        self.stable_s = stable_s
        self._last: list[int] | None = None
        self._since = time.monotonic()

    def settled(self, counts: list[int]) -> bool:
        now = time.monotonic()
        if counts != self._last:
            self._last, self._since = list(counts), now
        if not counts:
            return False
        if min(counts) >= self.want:
            return True
        return min(counts) >= self.floor and now - self._since >= self.stable_s


# ---------------------------------------------------------------------------- command line


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="nodes in the network")
    parser.add_argument("--ops", type=int, default=DEFAULT_OPS, help="ops per figure")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="ops in flight, 'cN' mode"
    )
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="warm-up puts+gets")
    parser.add_argument("--value-min", type=int, default=VALUE_MIN, help="value size, bytes")
    parser.add_argument("--value-max", type=int, default=VALUE_MAX, help="value size, bytes")
    parser.add_argument("--op-timeout", type=float, default=5.0, help="s before an op fails")
    parser.add_argument(
        "--batch-timeout", type=float, default=12.0, help="s for one figure's ops at most"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=15.0, help="s for the network to come up"
    )
    parser.add_argument("--budget", type=float, default=80.0, help="s for the whole run")
    parser.add_argument("--seed", type=int, default=1, help="seed for value sizes")
    return parser


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def print_run(run: BaselineRun) -> None:
    """One setup line (version, convergence time, memory, threads), then one per figure."""
    setup = {"version": run.version, "converge_s": round(run.converge_s, 3), **run.setup}
    emit({"baseline": run.baseline, "nodes": run.nodes, "setup": setup})
    for fig in run.figures:
        emit(fig.to_json())


def udp_rcvbuf_errors() -> int | None:
    """Datagrams the kernel dropped for a full receive buffer, machine-wide (Linux).

    Counts every process's sockets, so a delta over a batch is an upper bound on ours.
    """
    try:
        with open("/proc/net/snmp", encoding="ascii") as snmp:
            rows = [line.split() for line in snmp if line.startswith("Udp:")]
        header, values = rows[0], rows[1]
        return int(values[header.index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def udp_drops_since(before: int | None) -> dict[str, int]:
    """``{"udp_drops": n}``: receive-buffer drops since ``before`` (empty if unknown)."""
    after = udp_rcvbuf_errors()
    if before is None or after is None:
        return {}
    return {"udp_drops": after - before}


def process_stats() -> dict[str, Any]:
    """This process's resident memory (MB), threads and CPU time so far (Linux)."""
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    times = os.times()
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "cpu_s": round(times.user + times.system, 2),
    }
