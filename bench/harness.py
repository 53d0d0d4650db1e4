"""The one harness every benchmark module runs on (conventions: shared design/BENCH.md).

* **Output.** ``print_machine()`` prints the machine line (nproc, Python, platform,
  library versions) once per process, before the first figure. ``report()`` prints one
  figure as one JSON line in BENCH.md's format; ``report_operation()`` the throughput and
  p50/p99 lines of one operation measured over rounds, ``report_comparison()`` those of a
  ``measure()`` result. ``detail()`` prints a ``{"detail": ...}`` line (setup, failures,
  breakdowns), which is not a figure. Every number goes through ``rounded()``.
* **Command line.** ``arg_parser()`` has the options every module accepts (``python -m
  bench`` passes them to all); ``run_main()`` runs a module's coroutine as a command
  (signals cancel it, a watchdog ends a wedged run).
* **In-process timing** (``bench.crypto``): ``measure()`` times our function and its
  baselines side by side: a warm-up, then rounds in which they take turns every few calls,
  keeping the median round.
* **Network batches** (``bench.overlay``, ``bench.storage``, ``bench.e2e`` and the
  baseline adapters): ``run_batch()`` runs N ops, C in flight, under a deadline;
  ``make_figure()`` sums a batch up as a ``Figure`` (ops/s, p50/p99 ms, failures);
  ``Rounds`` keeps each contender's figure per round and gives the median round;
  ``timed_rounds()`` stops the rounds before a time budget runs out. A mode is named by
  ``mode_name()``: ``"seq"`` (one op at a time) or ``"c32"`` (32 in flight).
* **Baseline networks.** ``LoopbackNet`` is what the adapters in ``bench.baselines``
  (OpenDHT, ``kademlia``) share: N nodes on loopback, started once usable, writer/reader
  client pairs, put and get batches. ``start_baseline()`` starts one beside our system;
  ``network_main()`` runs one on its own (``python -m bench.baselines.opendht_net``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import faulthandler
import gc
import importlib.metadata
import json
import os
import platform
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

Kind = Literal["throughput", "latency"]
Op = Callable[[], object]  # one call, timed by measure()
BatchOp = Callable[[int], Awaitable[bool]]  # op i of a batch; True when it succeeded
Pairs = Sequence[int]  # client pairs of a baseline network (LoopbackNet)

DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3
LIBRARIES: tuple[str, ...] = ("cryptography", "protobuf", "grpcio")
US = "µs"
HOST = "127.0.0.1"

# The baseline networks' defaults (their own command line, see network_arg_parser).
DEFAULT_NODES = 50
DEFAULT_OPS = 2000
DEFAULT_CONCURRENCY = 32
DEFAULT_WARMUP = 50
VALUE_MIN = 100  # value sizes, bytes: the workload of every overlay-like comparison
VALUE_MAX = 200
DRIFT_MIN_OPS = 100  # fewer successful ops: no first/last-tenth ops/s in a figure
# SO_RCVBUF for every UDP node socket of a network bench (ours and kademlia's): the OS
# default (~208 KB, ~90 full datagrams) overflows under 32 lookups in flight.
DEFAULT_RCVBUF = 4 * 1024 * 1024

_machine_printed = False

# Objects that must never be destroyed, as their destructor would hang (an OpenDHT runner
# that could not be joined joins in its destructor, holding the GIL): with any here, a
# benchmark command leaves through os._exit rather than a normal interpreter exit.
KEPT_ALIVE: list[Any] = []


# ---------------------------------------------------------------------------- output


def emit(obj: Mapping[str, Any]) -> None:
    """One JSON object on its own line of stdout, flushed (figures, details, and the line
    protocols between a benchmark and its helper processes)."""
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def detail(obj: Mapping[str, Any]) -> None:
    """A ``{"detail": ...}`` line: setup and breakdowns, not a BENCH.md figure."""
    emit({"detail": obj})


def rounded(value: float) -> float:
    """Keep about four significant figures without printing noise digits."""
    if value >= 1000:
        return round(value, 1)
    if value >= 10:
        return round(value, 2)
    return round(value, 3)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPUs usable by this process, Python, libraries."""
    try:
        nproc = len(os.sched_getaffinity(0))  # what `nproc` prints
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count() or 0
    info: dict[str, Any] = {
        "nproc": nproc,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    for name in LIBRARIES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def print_machine() -> None:
    """Print ``{"machine": {...}}`` once per process (``python -m bench`` runs many modules)."""
    global _machine_printed  # noqa: PLW0603 - one flag for the whole process
    if not _machine_printed:
        _machine_printed = True
        emit({"machine": machine_info()})


# ---------------------------------------------------------------------------- time and modes


def now_ms() -> int:
    """Wall-clock milliseconds, as records, envelopes and proofs of work carry them."""
    return time.time_ns() // 1_000_000


def cpu_s() -> float:
    """CPU seconds (user + system, every thread) this process has used so far, to the
    nanosecond (``os.times`` counts 10 ms ticks: too coarse for a few ops of OpenDHT's)."""
    return time.process_time()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of any process so far, every thread (0 once it is gone);
    in 10 ms ticks, fine for node processes over a batch."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": fields from "state" on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by this process plus ``pids`` (e.g. every node process) between
    :meth:`start` and :meth:`stop`: the CPU an operation costs summed over every process."""

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self._t0 = (0.0, 0.0)
        self.split = (0.0, 0.0)  # the last measure: (this process, the others)

    def now(self) -> tuple[float, float]:
        return cpu_s(), sum(process_cpu_s(pid) for pid in self.pids)

    def start(self) -> None:
        self._t0 = self.now()

    def stop(self) -> float:
        """CPU seconds since :meth:`start`, every process (``split`` keeps the two parts)."""
        ours, others = self.now()
        self.split = (ours - self._t0[0], others - self._t0[1])
        return sum(self.split)


def cpu_ms_per_op(cpu_used_s: float, ops: int) -> dict[str, float]:
    """``{"cpu_ms_per_op": ...}`` for a figure's extras (empty with no successful op)."""
    return {"cpu_ms_per_op": round(cpu_used_s * 1e3 / ops, 3)} if ops else {}


def mode_name(concurrency: int) -> str:
    """``"seq"`` for one op at a time, else ``"c<C>"`` (``"c32"``)."""
    return "seq" if concurrency <= 1 else f"c{concurrency}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of already sorted samples."""
    if not sorted_values:
        raise ValueError("no samples")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


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


def timed_rounds(rounds: int, budget: Deadline, reserve_s: float) -> Iterator[int]:
    """Round numbers ``0 .. rounds-1``; stops early (and says so in a detail line) when the
    budget would not hold another round as long as the last one, plus ``reserve_s``."""
    last_round_s = 0.0
    for r in range(rounds):
        if r and budget.remaining() < last_round_s * 1.2 + reserve_s:
            detail({"warning": f"time budget: stopped after {r} of {rounds} rounds"})
            return
        started = time.perf_counter()
        yield r
        last_round_s = time.perf_counter() - started


# ---------------------------------------------------------------------------- command line


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark module accepts (``python -m bench`` passes them to all)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds per figure; the median is reported (default {DEFAULT_ROUNDS}, "
        f"--quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="operations per round for every figure (default: sized per figure)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run, figures are not meaningful"
    )
    return parser


def sized(args: argparse.Namespace, given: int | None, default: int, quick: int) -> int:
    """A size option's value: ``given`` if set, else ``default`` (``quick`` with --quick)."""
    if given is not None:
        return given
    return quick if args.quick else default


def rounds_from(args: argparse.Namespace) -> int:
    """Timed rounds: ``--rounds`` if given, else the default or quick count."""
    return _at_least_one(sized(args, args.rounds, DEFAULT_ROUNDS, QUICK_ROUNDS), "--rounds")


def n_from(args: argparse.Namespace, default: int, quick: int) -> int:
    """Operations per round for one figure: ``--n`` if given, else its default or quick size."""
    return _at_least_one(sized(args, args.n, default, quick), "--n")


def _at_least_one(value: int, option: str) -> int:
    if value < 1:
        raise SystemExit(f"{option} must be at least 1")
    return value


@contextlib.contextmanager
def scratch_dir(bench: str) -> Iterator[Path]:
    """A fresh temporary directory for one run's nodes and files, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"dna-bench-{bench}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_in_scratch(bench: str, run: Callable[[Path], Coroutine[Any, Any, None]]) -> None:
    """``run`` in a fresh `scratch_dir`, for the benches driven from the command line alone."""
    with scratch_dir(bench) as root:
        asyncio.run(run(root))


def stop_fleet(nodes: Iterable[Any], redis: subprocess.Popen[bytes] | None = None) -> None:
    """Kill the nodes still running (testnet `LocalNode`s) and the Redis server, if any."""
    for node in nodes:
        if node.alive():
            node.kill()
    if redis is not None:
        redis.kill()
        redis.wait()


def run_main(name: str, bench: Callable[[], Coroutine[Any, Any, int]], watchdog_s: float) -> int:
    """Run a benchmark's coroutine as a CLI: SIGTERM and Ctrl-C cancel it (so its clean-ups
    run), a wedged run dumps every stack after ``watchdog_s`` and exits, and what is in
    ``KEPT_ALIVE`` is never destroyed."""

    async def cancellable() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench()

    faulthandler.enable()  # a crash in a native baseline prints every thread's stack
    faulthandler.dump_traceback_later(watchdog_s, exit=True)
    try:
        status = asyncio.run(cancellable())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"{name}: interrupted (nodes stopped)", file=sys.stderr)
        status = 130
    finally:
        faulthandler.cancel_dump_traceback_later()
    if KEPT_ALIVE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


# ---------------------------------------------------------------------------- in-process timing


@dataclass(frozen=True)
class Timing:
    """One function's figures: throughput of the median round and per-call latencies.

    ``p50_us``/``p99_us`` are the medians over rounds of each round's percentile, or
    None when calls were not timed one by one (``per_call=False``).
    """

    ops_per_s: float
    p50_us: float | None
    p99_us: float | None
    round_ops_per_s: tuple[float, ...]


@dataclass(frozen=True)
class Comparison:
    ours: Timing
    baselines: dict[str, Timing]


def _time_chunk(fn: Op, k: int, samples: list[int] | None) -> int:
    """Run ``fn`` k times; return the elapsed ns, appending each call's ns to ``samples``."""
    clock = time.perf_counter_ns
    if samples is None:
        start = clock()
        for _ in range(k):
            fn()
        return clock() - start
    start = clock()
    for _ in range(k):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return clock() - start


def _run_round(
    contenders: Sequence[tuple[str, Op]], n: int, chunk: int, per_call: bool
) -> dict[str, tuple[int, list[int]]]:
    """One round: n calls of each contender, interleaved chunk by chunk.

    Returns each contender's elapsed ns (its own chunks only) and per-call samples.
    """
    elapsed = dict.fromkeys((name for name, _ in contenders), 0)
    samples: dict[str, list[int]] = {name: [] for name, _ in contenders}
    gc.collect()  # start every round from the same heap state; GC during the round counts
    done = 0
    while done < n:
        k = min(chunk, n - done)
        for name, fn in contenders:
            elapsed[name] += _time_chunk(fn, k, samples[name] if per_call else None)
        done += k
    return {name: (max(elapsed[name], 1), samples[name]) for name, _ in contenders}


def measure(
    fn: Op,
    n: int,
    *,
    baselines: Mapping[str, Op] | None = None,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int | None = None,
    chunk: int | None = None,
    per_call: bool = True,
) -> Comparison:
    """Time ``fn`` (ours) and each baseline: ``rounds`` rounds of ``n`` calls each.

    All functions are warmed up first (``warmup`` calls each, default n // 10, at least 2).
    Within a round the contenders alternate every ``chunk`` calls (default n // 50, so
    ~50 turns a round), and which one goes first alternates from round to round: load
    from other processes on a shared machine then falls on ours and the baselines alike.
    A contender's round time is the sum of its own chunks; the throughput reported is
    that of its median round.

    With ``per_call`` (the default) each call is also timed on its own, for p50/p99
    latencies (medians over rounds of each round's percentile). The two clock reads cost
    ~0.1 µs a call, which only matters for operations under ~10 µs: time those with
    ``per_call=False`` (throughput only).
    """
    if n < 1 or rounds < 1:
        raise ValueError("n and rounds must be at least 1")
    contenders: list[tuple[str, Op]] = [("ours", fn), *(baselines or {}).items()]
    warm = max(2, n // 10) if warmup is None else warmup
    for _ in range(warm):
        for _, f in contenders:
            f()
    step = max(1, n // 50) if chunk is None else max(1, chunk)
    wall: dict[str, list[int]] = {name: [] for name, _ in contenders}
    p50: dict[str, list[float]] = {name: [] for name, _ in contenders}
    p99: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for name, (elapsed, samples) in _run_round(order, n, step, per_call).items():
            wall[name].append(elapsed)
            if samples:
                samples.sort()
                p50[name].append(percentile(samples, 0.50) / 1e3)
                p99[name].append(percentile(samples, 0.99) / 1e3)

    def timing(name: str) -> Timing:
        return Timing(
            ops_per_s=n * 1e9 / statistics.median(wall[name]),
            p50_us=statistics.median(p50[name]) if p50[name] else None,
            p99_us=statistics.median(p99[name]) if p99[name] else None,
            round_ops_per_s=tuple(n * 1e9 / ns for ns in wall[name]),
        )

    return Comparison(timing("ours"), {name: timing(name) for name, _ in contenders[1:]})


# ---------------------------------------------------------------------------- figures


def report(
    bench: str,
    unit: str,
    ours: float,
    baselines: Mapping[str, float],
    n: int,
    params: Mapping[str, Any],
    kind: Kind = "throughput",
) -> dict[str, Any]:
    """Print one figure as a JSON line (BENCH.md format) and return it.

    ``ratio`` compares with the first baseline so that above 1.0 means we are ahead:
    ours / baseline for throughputs, baseline / ours for latencies.
    """
    if kind not in ("throughput", "latency"):
        raise ValueError(f"unknown kind {kind!r}")
    if not baselines:
        raise ValueError("a figure needs at least one baseline")
    first = next(iter(baselines.values()))
    if kind == "throughput":
        ratio = ours / first if first else float("inf")
    else:
        ratio = first / ours if ours else float("inf")
    line: dict[str, Any] = {
        "bench": bench,
        "unit": unit,
        "ours": rounded(ours),
        "baseline": {name: rounded(value) for name, value in baselines.items()},
        "ratio": round(ratio, 3),
        "n": n,
        "params": dict(params),
    }
    emit(line)
    return line


def report_operation(
    prefix: str,
    ours: Mapping[str, Any],
    baselines: Mapping[str, Mapping[str, Any] | None],
    n: int,
    params: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """The throughput, p50 and p99 lines of one operation from per-contender figures
    (keys ``ops_per_s``, ``p50_ms``, ``p99_ms``, as ``Rounds.median`` gives them). A
    baseline without a value is left out; a figure with no baseline left
    (``--skip-baselines``) prints without a ratio."""
    lines = []
    figures: tuple[tuple[str, str, Kind], ...] = (
        ("ops/s", "ops_per_s", "throughput"),
        ("ms", "p50_ms", "latency"),
        ("ms", "p99_ms", "latency"),
    )
    for unit, key, kind in figures:
        if ours[key] is None:
            continue
        bench = prefix if kind == "throughput" else f"{prefix}.{key[:3]}"
        theirs = {name: b[key] for name, b in baselines.items() if b and b[key] is not None}
        if theirs:
            lines.append(report(bench, unit, ours[key], theirs, n, params, kind))
            continue
        line = {"bench": bench, "unit": unit, "ours": rounded(ours[key]), "baseline": {},
                "ratio": None, "n": n, "params": dict(params)}  # fmt: skip
        emit(line)
        lines.append(line)
    return lines


def report_comparison(
    bench: str,
    result: Comparison,
    n: int,
    params: Mapping[str, Any],
    *,
    rounds: int,
    latencies: bool = True,
) -> list[dict[str, Any]]:
    """Print the ops/s line of a ``measure()`` result and, if timed per call, p50 and p99 lines.

    ``n`` in each line is the number of operations per round; ``params`` gets ``rounds``.
    """
    full = {**params, "rounds": rounds}
    lines = [
        report(
            bench,
            "ops/s",
            result.ours.ops_per_s,
            {name: t.ops_per_s for name, t in result.baselines.items()},
            n,
            full,
        )
    ]
    if not latencies:
        return lines
    for pct in ("p50", "p99"):
        ours = getattr(result.ours, f"{pct}_us")
        base = {name: getattr(t, f"{pct}_us") for name, t in result.baselines.items()}
        if ours is None or None in base.values():
            continue
        lines.append(report(f"{bench}.{pct}", US, ours, base, n, full, kind="latency"))
    return lines


def exit_status(lines: Sequence[Mapping[str, Any]], ours: str) -> int:
    """0 for a run that printed its figures with none of our ops failed, else 1."""
    failed = any(line["params"]["failures"].get(ours) for line in lines)
    return 1 if failed or not lines else 0


# ---------------------------------------------------------------------------- network batches


@dataclass(frozen=True)
class BatchResult:
    """What one batch of ops gave, before summarizing (see :func:`make_figure`)."""

    latencies: list[float]  # seconds, successful ops only
    failures: int
    wall_s: float  # first op issued to last op finished
    succeeded: list[int]  # indices of the successful ops, ascending
    finished_s: list[float]  # when each successful op finished, from the batch's start


class BatchTally:
    """A batch's outcomes, op by op as they finish; the batch starts when this is made."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.latencies: list[float] = []
        self.succeeded: list[int] = []
        self.finished: list[float] = []
        self.failures = 0

    def done(self, i: int, ok: bool, t0: float, now: float) -> None:
        """Op ``i``, started at ``t0``, finished at ``now`` (``time.perf_counter``)."""
        if ok:
            self.latencies.append(now - t0)
            self.succeeded.append(i)
            self.finished.append(now - self.start)
        else:
            self.failures += 1
        self.last = now

    def result(self) -> BatchResult:
        wall_s = max(self.last - self.start, 1e-9)
        return BatchResult(self.latencies, self.failures, wall_s, sorted(self.succeeded),
                           self.finished)  # fmt: skip


def failure_reason(exc: BaseException) -> str:
    """Why an op failed, for a figure's error counts: class and the start of the message."""
    return f"{type(exc).__name__}: {exc}"[:160]


async def run_batch(
    op: BatchOp,
    count: int,
    concurrency: int,
    op_timeout_s: float,
    deadline: Deadline,
    errors: Counter[str] | None = None,
) -> BatchResult:
    """``op(i)`` for i < ``count``, ``concurrency`` at a time; True means success.

    An op not done within ``op_timeout_s`` is cancelled and fails; no op starts after
    ``deadline``, so the batch ends by ``deadline + op_timeout_s``. ``errors`` counts why
    ops failed: the exception's class name and message (its first 160 characters: a
    failure in a figure must say why), or ``"refused"`` when the op returned False.
    """
    tally = BatchTally()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and not deadline.expired():
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(op_timeout_s):
                    ok = await op(i)
                reason = "refused"
            except Exception as exc:  # TimeoutError included: the op failed, the batch goes on
                ok, reason = False, failure_reason(exc)
            tally.done(i, ok, t0, time.perf_counter())
            if not ok and errors is not None:
                errors[reason] += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return tally.result()


@dataclass(frozen=True)
class Figure:
    """One contender's figure for one batch of one op in one mode.

    ``n`` ops were issued (``requested`` were asked for; fewer when the batch ran out of
    time). ``failures`` counts issued ops that failed, timed out or (gets) did not return
    the value put. ``ops_per_s`` is successful ops over the batch's wall time; latencies
    are over successful ops only (None if there were none).
    """

    baseline: str  # the contender: "ours" or a baseline's name
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
        """A baseline network's own line: the figure keys first, then ``requested``/extras."""
        line: dict[str, Any] = {
            "baseline": self.baseline,
            "op": self.op,
            "mode": self.mode,
            "ops_per_s": rounded(self.ops_per_s),
            "p50_ms": None if self.p50_ms is None else rounded(self.p50_ms),
            "p99_ms": None if self.p99_ms is None else rounded(self.p99_ms),
            "failures": self.failures,
            "n": self.n,
            "nodes": self.nodes,
        }
        if self.requested != self.n:
            line["requested"] = self.requested
        line.update(self.extra)
        return line


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
    the batch's start) adds the ops/s of its first and last tenth, which shows a contender
    slowing down as it accumulates keys."""
    ordered = sorted(latencies_s)
    ok = len(ordered)
    extra = dict(extra or {})
    if finished_s is not None and len(finished_s) >= DRIFT_MIN_OPS:
        ends = sorted(finished_s)
        tenth = len(ends) // 10
        first = ends[tenth - 1]
        last = ends[-1] - ends[-1 - tenth]
        extra["ops_per_s_first10pct"] = rounded(tenth / first) if first > 0 else None
        extra["ops_per_s_last10pct"] = rounded(tenth / last) if last > 0 else None
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


# Extras that count events: summed over rounds (the others are medians).
COUNTED_EXTRAS = frozenset({"udp_drops", "udp_timeouts", "local_hits", "rpc_timeouts"})


@dataclass
class Rounds:
    """Each contender's figures, one per round, by key (e.g. ``(contender, op, mode)``)."""

    figures: dict[Hashable, list[Figure]] = field(default_factory=dict)

    def add(self, key: Hashable, fig: Figure | None) -> None:
        if fig is not None:
            self.figures.setdefault(key, []).append(fig)

    def median(self, key: Hashable) -> dict[str, Any] | None:
        """The figure over rounds, None if there is none: the median round's ops/s, the
        medians of each round's p50/p99 (ms), failures and ops summed, each round's ops/s,
        and the numeric extras (counters summed, the others' medians)."""
        figs = self.figures.get(key)
        if not figs:
            return None
        p50 = [f.p50_ms for f in figs if f.p50_ms is not None]
        p99 = [f.p99_ms for f in figs if f.p99_ms is not None]
        return {
            "ops_per_s": statistics.median(f.ops_per_s for f in figs),
            "p50_ms": statistics.median(p50) if p50 else None,
            "p99_ms": statistics.median(p99) if p99 else None,
            "failures": sum(f.failures for f in figs),
            "ops": sum(f.n for f in figs),
            "rounds": len(figs),
            "rounds_ops_per_s": [round(f.ops_per_s, 1) for f in figs],
            "extra": _median_extras([f.extra for f in figs]),
        }


def _median_extras(extras: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = {k for e in extras for k, v in e.items() if isinstance(v, int | float)}
    out: dict[str, Any] = {}
    for key in sorted(keys):
        values = [e[key] for e in extras if isinstance(e.get(key), int | float)]
        if key in COUNTED_EXTRAS or key.startswith("failed_"):
            out[key] = sum(values)
        else:
            out[key] = round(statistics.median(values), 3)
    return out


# ---------------------------------------------------------------------------- machine counters


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


def loadavg() -> list[float]:
    """The machine's load averages over 1, 5 and 15 minutes (how busy the others keep it)."""
    return [round(x, 2) for x in os.getloadavg()]


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """A process's ``/proc/<pid>/status`` fields (Linux), e.g. ``VmRSS``: ``"1234 kB"``."""
    lines = Path(f"/proc/{pid}/status").read_text(errors="replace").splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """A process's resident memory now (``VmRSS``) and its peak (``VmHWM``), in MiB."""
    fields = proc_status(pid)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def process_stats() -> dict[str, Any]:
    """This process's resident memory (MB), threads and CPU time so far (Linux)."""
    fields = proc_status()
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "cpu_s": round(cpu_s(), 2),
    }


# ---------------------------------------------------------------------------- baseline networks


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


ItemT = TypeVar("ItemT")


@dataclass(frozen=True)
class Batch(Generic[ItemT]):
    """One batch of a baseline network's ops: every item, by ``clients`` (writers for puts,
    readers for gets) in turn, ``concurrency`` in flight; no op starts after ``deadline``
    and an op fails after ``op_timeout_s``."""

    items: Sequence[ItemT]
    clients: Sequence[Any]
    concurrency: int
    deadline: Deadline
    op_timeout_s: float

    def client(self, i: int) -> Any:
        """The node that does op ``i``."""
        return self.clients[i % len(self.clients)]


class LoopbackNet(ABC, Generic[ItemT]):
    """A third-party DHT as a baseline: N nodes on 127.0.0.1 in this process.

    The workload is the same for every adapter: distinct random keys, values from a
    :class:`Workload`, puts issued by a *writer* node, gets of those keys by a different
    *reader* node (a get on the node that put the key may be answered from its local
    cache). Client pair j writes from node ``N-1-2j`` and reads from node ``N-2-2j``; the
    bootstrap node (node 0) is never a client. Batches take the pairs to use (default
    pair 0) and spread their ops over them round-robin. A get fails unless it returns
    exactly the bytes put. Use as an async context manager or call :meth:`start` and
    :meth:`close`.
    """

    name: str  # also the name of the package measured, for its version
    probe_timeout_s = 2.0  # per probe op while waiting for the network to be usable

    def __init__(self, nodes: int, *, op_timeout_s: float, workload: Workload | None) -> None:
        if nodes < 3:
            raise ValueError("need at least 3 nodes (bootstrap, writer, reader)")
        self.size = nodes
        self.op_timeout_s = op_timeout_s
        self.workload = workload or Workload()
        self.converge_s = 0.0
        self.nodes: list[Any] = []  # the running nodes, the bootstrap node first

    # -- what each adapter provides

    @abstractmethod
    async def _launch(self, deadline: Deadline) -> None:
        """Start the nodes (into ``nodes``), every one after the first bootstrapping to it."""

    @abstractmethod
    def _table_watch(self) -> TableWatch:
        """When the routing tables (see :meth:`contacts`) count as filled."""

    @abstractmethod
    def contacts(self) -> list[int]:
        """Contacts in each node's routing table."""

    @abstractmethod
    def new_items(self, count: int) -> list[ItemT]:
        """Distinct random keys with fresh random values."""

    @abstractmethod
    async def _put(self, batch: Batch[ItemT]) -> tuple[Figure, list[ItemT]]:
        """Put every item: the figure (op ``"put"``) and the items stored."""

    @abstractmethod
    async def _get(self, batch: Batch[ItemT]) -> tuple[Figure, list[ItemT]]:
        """Get every item's key: the figure (op ``"get"``) and the items read back."""

    @abstractmethod
    async def close(self, timeout_s: float = 8.0) -> None:
        """Stop every node (bounded by ``timeout_s`` where stopping can hang)."""

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.name)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            return "unknown"

    def setup(self) -> dict[str, Any]:
        """How the network is set up, for the setup line of a standalone run."""
        return {"host": HOST}

    def after_run(self) -> dict[str, Any]:
        """Counters worth reporting once a standalone run is over."""
        return {}

    # -- lifecycle

    async def start(self, ready_timeout_s: float = 15.0, probes: int = 5) -> float:
        """Start the nodes; return once the network is usable (seconds it took).

        Usable: the routing tables are filled (:meth:`_table_watch`), then ``probes``
        fresh keys in a row can be put by node 1 and read by node 2 (not client pair 0
        unless N is tiny). Raises ``TimeoutError`` (after closing the nodes) past
        ``ready_timeout_s``.
        """
        deadline = Deadline(ready_timeout_s)
        t0 = time.perf_counter()
        try:
            await self._launch(deadline)
            await self._wait_tables(deadline)
            await self._probe(deadline, probes)
        except BaseException:
            await self.close()
            raise
        self.converge_s = time.perf_counter() - t0
        return self.converge_s

    async def _wait_tables(self, deadline: Deadline) -> None:
        watch = self._table_watch()
        while not watch.settled(self.contacts()):
            if deadline.expired():
                raise TimeoutError(f"routing tables not filled: {sorted(self.contacts())[:5]}")
            await asyncio.sleep(0.02)

    async def _probe(self, deadline: Deadline, probes: int) -> None:
        streak = 0
        while streak < probes:
            if deadline.expired():
                raise TimeoutError("probe puts/gets still failing")
            writer, reader, timeout = self.nodes[1], self.nodes[2], self.probe_timeout_s
            _, stored = await self._put(Batch(self.new_items(1), [writer], 1, deadline, timeout))
            _, read = await self._get(Batch(stored, [reader], 1, deadline, timeout))
            streak = streak + 1 if len(read) == 1 else 0

    async def __aenter__(self) -> LoopbackNet[ItemT]:
        if not self.nodes:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        await self.close()

    # -- client pairs

    @property
    def max_pairs(self) -> int:
        """Disjoint client pairs available (the bootstrap node is not a client)."""
        return (self.size - 1) // 2

    def writer(self, pair: int = 0) -> Any:
        return self.nodes[-1 - 2 * (pair % self.max_pairs)]

    def reader(self, pair: int = 0) -> Any:
        return self.nodes[-2 - 2 * (pair % self.max_pairs)]

    # -- measuring

    async def put_batch(
        self, count: int, concurrency: int, deadline: Deadline, *, pairs: Pairs = (0,)
    ) -> tuple[Figure, list[ItemT]]:
        """The writers of ``pairs`` put ``count`` fresh items, ``concurrency`` in flight in
        all: the figure and the items stored."""
        writers = [self.writer(j) for j in pairs]
        items = self.new_items(count)
        return await self._put(Batch(items, writers, concurrency, deadline, self.op_timeout_s))

    async def get_batch(
        self, items: Sequence[ItemT], concurrency: int, deadline: Deadline, *, pairs: Pairs = (0,)
    ) -> tuple[Figure, list[ItemT]]:
        """The readers of ``pairs`` get every item's key, ``concurrency`` in flight in all;
        a get succeeds once it has seen the exact value put. The figure and the items read."""
        batch = Batch(items, [self.reader(j) for j in pairs], concurrency, deadline,
                      self.op_timeout_s)  # fmt: skip
        return await self._get(batch)

    def _figure(
        self, op: str, res: BatchResult, batch: Batch[ItemT], extra: dict[str, Any]
    ) -> tuple[Figure, list[ItemT]]:
        """A batch's figure and the items of its successful ops."""
        items = batch.items
        fig = make_figure(
            self.name, op, batch.concurrency, res.latencies, res.failures, len(items),
            self.size, res.wall_s, extra=extra, finished_s=res.finished_s,
        )  # fmt: skip
        return fig, [items[i] for i in res.succeeded]


NetT = TypeVar("NetT", bound=LoopbackNet[Any])


async def start_baseline(
    name: str, new_net: Callable[[], NetT], timeout_s: float, setup: dict[str, Any]
) -> NetT | None:
    """Start a baseline network beside ours; its version and start-up time go in
    ``setup[name]``. A baseline that cannot start (package missing, network not usable in
    time) is reported there instead, not fatal: None."""
    try:
        net = new_net()  # imports the adapter: that fails too if its package is missing
        converge = await net.start(timeout_s)
    except Exception as exc:
        setup[name] = {"error": repr(exc)}
        return None
    setup[name] = {"version": net.version(), "converge_s": round(converge, 2)}
    return net


# ---------------------------------------------------------------------------- a baseline alone


@dataclass(frozen=True)
class BaselineRun:
    """Everything one standalone run measured, plus how the network came up."""

    baseline: str
    version: str
    nodes: int
    converge_s: float
    figures: tuple[Figure, ...]
    setup: dict[str, Any] = field(default_factory=dict)


def network_arg_parser(description: str) -> argparse.ArgumentParser:
    """The options of a baseline network's own command line (``network_main``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="nodes in the network")
    parser.add_argument("--ops", type=int, default=DEFAULT_OPS, help="ops per figure")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="ops in flight, 'cN' mode"
    )
    parser.add_argument(
        "--clients", type=int, default=1, help="writer/reader pairs sharing each figure's ops"
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


async def run_network(
    net: LoopbackNet[Any],
    args: argparse.Namespace,
    *,
    close_reserve_s: float,
) -> BaselineRun:
    """Start ``net``, measure put/get seq and cN, close it; all within ``args.budget``.

    The seq figures use client pairs ``0..clients-1``, the cN figures the next ``clients``
    pairs (pairs wrap around if N is too small), so that one figure does not pay for the
    keys of the one before. For each: a warm-up (``warmup`` puts and gets, not reported),
    then the puts of ``ops`` fresh keys, then gets of the keys whose put succeeded. Each
    figure stops issuing ops after ``batch_timeout`` s (or when the budget, less
    ``close_reserve_s`` for closing, runs out); an op fails after ``net.op_timeout_s``.
    """
    budget = Deadline(args.budget)
    await net.start(ready_timeout_s=min(args.ready_timeout, budget.remaining()))
    puts: list[Figure] = []
    gets: list[Figure] = []
    setup: dict[str, Any] = {**net.setup(), "clients": args.clients, **process_stats()}

    def window(seconds: float) -> Deadline:
        return budget.sub(seconds, reserve=close_reserve_s + net.op_timeout_s)

    try:
        for k, c in enumerate((1, args.concurrency)):
            pairs = range(k * args.clients, (k + 1) * args.clients)
            if args.warmup > 0:
                warm = window(args.batch_timeout / 4)
                _, stored = await net.put_batch(args.warmup, c, warm, pairs=pairs)
                await net.get_batch(stored, c, warm, pairs=pairs)
            fig, stored = await net.put_batch(args.ops, c, window(args.batch_timeout), pairs=pairs)
            puts.append(fig)
            fig, _ = await net.get_batch(stored, c, window(args.batch_timeout), pairs=pairs)
            gets.append(fig)
        setup.update({f"{k}_after": v for k, v in process_stats().items()})
        setup.update(net.after_run())
    finally:
        await net.close(timeout_s=max(1.0, min(close_reserve_s, budget.remaining())))
    return BaselineRun(net.name, net.version(), net.size, net.converge_s, (*puts, *gets), setup)


def print_run(run: BaselineRun) -> None:
    """One setup line (version, convergence time, memory, threads), then one per figure."""
    setup = {"version": run.version, "converge_s": round(run.converge_s, 3), **run.setup}
    emit({"baseline": run.baseline, "nodes": run.nodes, "setup": setup})
    for fig in run.figures:
        emit(fig.to_json())


def network_main(
    name: str, net: LoopbackNet[Any], args: argparse.Namespace, *, close_reserve_s: float
) -> int:
    """A baseline network's own command line: the machine line, one setup line, then one
    JSON object per figure (put/get x seq/cN); 0 when every op succeeded, else 1."""
    print_machine()

    async def bench() -> int:
        run = await run_network(net, args, close_reserve_s=close_reserve_s)
        print_run(run)
        return 1 if any(f.failures for f in run.figures) else 0

    # The watchdog is the last resort if a native library or the loop hangs.
    return run_main(name, bench, args.budget + 20)


# ---------------------------------------------------------------------------- profiles


def cpu_profile() -> cProfile.Profile:
    """A running cProfile timed on this thread's CPU clock: an event loop's idle waits
    (``epoll``) and other threads' work do not count."""
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    return profiler


def profile_summary(
    profiler: cProfile.Profile, ops: int, what: str, top: int = 12
) -> dict[str, Any]:
    """Stop ``profiler`` and sum it up per successful op (ms): the total time of the profiled
    thread (its CPU with :func:`cpu_profile`) and the ``top`` functions by self time."""
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    per = 1e3 / max(1, ops)
    ranked = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "what": what,
        "ops": ops,
        "cpu_ms_per_op": round(stats.total_tt * per, 3),  # type: ignore[attr-defined]
        "top_self_ms_per_op": {
            f"{Path(f).name}:{line}:{func}": round(v[2] * per, 3) for (f, line, func), v in ranked
        },
    }


# ---------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    """A goal of the issue that set it: the figure ``bench`` (in the mode ``mode``, when its
    params have one) against ``baseline``, ratio at least ``target`` (above 1.0: ahead)."""

    bench: str
    baseline: str
    target: float
    mode: str | None = None

    def ratio(self, line: Mapping[str, Any]) -> float | None:
        """Ours against this goal's baseline in ``line``: ours / theirs for a throughput,
        theirs / ours for a latency or a cost (None when either is missing)."""
        theirs, ours = line["baseline"].get(self.baseline), line["ours"]
        if not theirs or not ours:
            return None
        return float(ours / theirs if line["unit"] == "ops/s" else theirs / ours)

    def matches(self, line: Mapping[str, Any]) -> bool:
        return line.get("bench") == self.bench and (
            self.mode is None or line["params"].get("mode") == self.mode
        )


def report_goals(lines: Sequence[Mapping[str, Any]], goals: Sequence[Goal]) -> list[dict[str, Any]]:
    """One ``{"goal": ...}`` line per goal (the figure, baseline, ratio, target and
    ``PASS``/``MISS``; ``NO DATA`` when the run printed no such figure or baseline), and
    return them. A figure may appear under several params (e.g. our replica counts): the
    first printed is the one judged, the others' ratios are listed beside it."""
    out = []
    for goal in goals:
        found = [line for line in lines if goal.matches(line)]
        ratios = [goal.ratio(line) for line in found]
        ratio = ratios[0] if ratios else None
        status = "NO DATA" if ratio is None else "PASS" if ratio >= goal.target else "MISS"
        entry: dict[str, Any] = {
            "bench": goal.bench, "mode": goal.mode, "baseline": goal.baseline,
            "ratio": None if ratio is None else round(ratio, 3), "target": goal.target,
            "status": status,
        }  # fmt: skip
        if len(ratios) > 1:
            entry["other_ratios"] = [None if r is None else round(r, 3) for r in ratios[1:]]
        emit({"goal": entry})
        out.append(entry)
    return out


def report_cpu(
    bench: str,
    ours: float | None,
    baselines: Mapping[str, float | None],
    n: int,
    params: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """The ``<bench>`` line of CPU ms per op summed over every process (ours: client and
    every node process; an in-process baseline: its process), ratio theirs / ours. Nothing
    when ours was not measured."""
    theirs = {name: v for name, v in baselines.items() if v}
    if not ours:
        return []
    if not theirs:
        line = {"bench": bench, "unit": "ms", "ours": rounded(ours), "baseline": {},
                "ratio": None, "n": n, "params": dict(params)}  # fmt: skip
        emit(line)
        return [line]
    return [report(bench, "ms", ours, theirs, n, params, kind="latency")]
