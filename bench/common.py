"""Helpers shared by every benchmark module (conventions: shared design/BENCH.md).

* ``print_machine()`` prints the machine line (nproc, Python, platform, library
  versions) once per process, before the first figure.
* ``measure()`` times our function and its baselines side by side: a warm-up, then
  several rounds in which they take turns every few calls, keeping the median round.
* ``report()`` prints one figure as one JSON line in BENCH.md's format;
  ``report_comparison()`` prints the throughput and the p50/p99 latency lines of a
  ``measure()`` result.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["throughput", "latency"]
Op = Callable[[], object]

DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3
LIBRARIES: tuple[str, ...] = ("cryptography", "protobuf", "grpcio")
US = "µs"

_machine_printed = False


# ---------------------------------------------------------------------------- machine line


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
        _emit({"machine": machine_info()})


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


def rounds_from(args: argparse.Namespace) -> int:
    rounds: int | None = args.rounds
    if rounds is None:
        rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    return rounds


def n_from(args: argparse.Namespace, default: int, quick: int) -> int:
    """Operations per round for one figure: ``--n`` if given, else its default or quick size."""
    n: int | None = args.n
    if n is None:
        n = quick if args.quick else default
    if n < 1:
        raise SystemExit("--n must be at least 1")
    return n


# ---------------------------------------------------------------------------- measuring


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


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of sorted nanosecond samples."""
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return float(sorted_ns[index])


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
                p50[name].append(_percentile(samples, 0.50) / 1e3)
                p99[name].append(_percentile(samples, 0.99) / 1e3)

    def timing(name: str) -> Timing:
        return Timing(
            ops_per_s=n * 1e9 / statistics.median(wall[name]),
            p50_us=statistics.median(p50[name]) if p50[name] else None,
            p99_us=statistics.median(p99[name]) if p99[name] else None,
            round_ops_per_s=tuple(n * 1e9 / ns for ns in wall[name]),
        )

    return Comparison(timing("ours"), {name: timing(name) for name, _ in contenders[1:]})


# ---------------------------------------------------------------------------- reporting


def _rounded(value: float) -> float:
    """Keep about four significant figures without printing noise digits."""
    if value >= 1000:
        return round(value, 1)
    if value >= 10:
        return round(value, 2)
    return round(value, 3)


def _emit(obj: Mapping[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


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
        "ours": _rounded(ours),
        "baseline": {name: _rounded(value) for name, value in baselines.items()},
        "ratio": round(ratio, 3),
        "n": n,
        "params": dict(params),
    }
    _emit(line)
    return line


def report_operation(
    prefix: str,
    ours: Mapping[str, Any],
    baselines: Mapping[str, Mapping[str, Any] | None],
    n: int,
    params: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """The throughput, p50 and p99 lines of one operation from per-contender figures
    (keys ``ops_per_s``, ``p50_ms``, ``p99_ms``). A baseline without a value is left
    out; a figure with no baseline left (``--skip-baselines``) prints without a ratio."""
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
        line = {"bench": bench, "unit": unit, "ours": _rounded(ours[key]), "baseline": {},
                "ratio": None, "n": n, "params": dict(params)}  # fmt: skip
        _emit(line)
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
    """1 when nothing was measured or any of our figures had failures, else 0."""
    failed = any(line["params"]["failures"].get(ours) for line in lines)
    return 1 if failed or not lines else 0


def run_main(name: str, bench: Callable[[], Coroutine[Any, Any, int]], watchdog_s: float) -> int:
    """Run a benchmark's coroutine as a CLI: SIGTERM and Ctrl-C cancel it (so its clean-ups
    run), a wedged run dumps every stack after ``watchdog_s`` and exits, and OpenDHT runners
    that could not be joined are never destroyed (their destructor joins holding the GIL)."""

    async def cancellable() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench()

    faulthandler.dump_traceback_later(watchdog_s, exit=True)
    try:
        status = asyncio.run(cancellable())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"{name}: interrupted (nodes stopped)", file=sys.stderr)
        status = 130
    finally:
        faulthandler.cancel_dump_traceback_later()
    opendht = sys.modules.get("bench.baselines.opendht_net")
    if opendht is not None and getattr(opendht, "_STUCK", None):
        sys.stdout.flush()
        os._exit(status)
    return status
