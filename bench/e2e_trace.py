"""Where an end-to-end message's time goes: ``bench.e2e --trace DIR``'s events, joined.

``uv run python -m bench.e2e_trace DIR [--slowest 0.05]`` (``bench.e2e --trace`` prints
the same at the end of its run).

Every process of the run wrote ``DIR/<pid>.trace`` (`dna_core.trace`): the sender's
``send.*`` events, each storage node's ``node.*`` and ``sqlite.*`` ones, the recipient's
``peer.*`` ones, keyed by blob ID, on the machine's one monotonic clock. A message's way
is cut into consecutive segments that add up to its total (send start to the recipient's
``progress`` callback, which is what the bench counts as delivered):

``seal`` (send start to sealed), ``lookup`` (to the proof of work's start: replica
lookup), ``pow``, ``to_node`` (to the first pushing replica's receipt of the put: the
client batcher and the stream), ``admit`` (its checks, the proof's verification),
``to_write`` (to the write's start), ``write`` (the backend call: SQLite's writer queue,
the transaction, the ``fsync``'d commit), ``wake`` (stored to the pushed page read),
``push_out`` (to the page written on the stream), ``to_peer`` (to the first copy's
arrival in the recipient), ``queued`` (to the round that takes it: the recipient busy
with earlier blobs or other work), ``open`` (decrypt, verify, plan), ``apply`` (the cache
writes, to ``Peer.on_message``: decrypted, what ``bench.e2e`` counts), ``commit`` (the
transaction's ``fsync``'d commit), ``progress`` (to the progress callback).

"The first pushing replica" is the one whose page was written first. For a message the
report also gives that node's SQLite commit (``fsync``) and run times of the group it
was in, and the garbage collections of 0.2 ms or more in any process during its way.

Printed: the latency histogram, and per segment the p50 / p90 / p99 over all messages
and the mean over the slowest ``--slowest`` (5%) and over the rest, per phase
(``rt``, ``seq``, ``c10``; ``bench.e2e`` marks when each of its phases starts).
"""

from __future__ import annotations

import argparse
import json
import sys
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEGMENTS = (  # (name, the event it ends at); each starts where the one before ended
    ("seal", "send.sealed"),
    ("lookup", "send.pow_start"),
    ("pow", "send.pow_done"),
    ("to_node", "node.recv"),
    ("admit", "node.admitted"),
    ("to_write", "node.write"),
    ("write", "node.stored"),
    ("wake", "node.push_read"),
    ("push_out", "node.push_written"),
    ("to_peer", "peer.arrived"),
    ("queued", "peer.taken"),
    ("open", "peer.opened"),
    ("apply", "peer.told"),
    ("commit", "peer.committed"),
    ("progress", "peer.progress"),
)
NODE_EVENTS = ("node.recv", "node.admitted", "node.write", "node.stored", "node.push_read",
               "node.push_written")  # fmt: skip
HISTOGRAM_MS = (5, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300, 500)
PHASE = "phase"


@dataclass
class Events:
    """Everything the trace files say."""

    # blob -> event -> ns (the first occurrence), for events of one process
    blobs: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    # blob -> pid -> node event -> ns
    nodes: dict[str, dict[int, dict[str, int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    spans: dict[int, list[tuple[int, int, str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # pid -> (end, start, event, size), sorted by end
    gcs: list[tuple[int, int, int]] = field(default_factory=list)  # (end ns, pause ns, pid)
    phases: list[tuple[int, str]] = field(default_factory=list)  # (ns, phase name)


def read(directory: Path) -> Events:
    out = Events()
    for path in sorted(directory.glob("*.trace")):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) != 3:
                continue  # a line cut by a killed process
            event, key, ns_text = parts
            ns = int(ns_text)
            if event.startswith("sqlite."):
                size, start = key.split(":")
                out.spans[pid].append((ns, int(start), event, int(size)))
            elif event.startswith("gc."):
                out.gcs.append((ns, int(key), pid))
            elif event == PHASE:
                out.phases.append((ns, bytes.fromhex(key).decode()))
            elif event in NODE_EVENTS:
                out.nodes[key][pid].setdefault(event, ns)
            else:
                out.blobs[key].setdefault(event, ns)
    for spans in out.spans.values():
        spans.sort()
    out.gcs.sort()
    out.phases.sort()
    return out


@dataclass
class Way:
    """One message's segments (ms) and what its first pushing replica's commit took."""

    blob: str
    phase: str
    total_ms: float
    told_ms: float
    segments: dict[str, float]
    fsync_ms: float | None
    run_ms: float | None
    group: int | None
    gc_ms: float


def ways(events: Events) -> list[Way]:
    phase_ns = [ns for ns, _ in events.phases]
    out = []
    for blob, marks in events.blobs.items():
        pusher = _first_pusher(events.nodes.get(blob, {}))
        if pusher is None or "send.start" not in marks or "peer.progress" not in marks:
            continue  # the direct path's, a receipt, or cut off by the run's end
        pid, node_marks = pusher
        points = {**marks, **node_marks}
        if any(event not in points for _, event in SEGMENTS):
            continue
        segments, at = {}, points["send.start"]
        for name, event in SEGMENTS:
            segments[name] = (points[event] - at) / 1e6
            at = points[event]
        start, end = points["send.start"], points["peer.progress"]
        fsync, run, group = _commit_of(events.spans.get(pid, []), node_marks["node.stored"])
        i = bisect_right(phase_ns, start) - 1
        out.append(Way(
            blob, events.phases[i][1] if i >= 0 else "?", (end - start) / 1e6,
            (points["peer.told"] - start) / 1e6, segments,
            fsync, run, group, _gc_ms(events.gcs, start, end),
        ))  # fmt: skip
    return out


def _first_pusher(nodes: dict[int, dict[str, int]]) -> tuple[int, dict[str, int]] | None:
    pushed = [(m["node.push_written"], pid) for pid, m in nodes.items() if "node.push_written" in m]
    if not pushed:
        return None
    _, pid = min(pushed)
    return pid, nodes[pid]


def _commit_of(
    spans: list[tuple[int, int, str, int]], stored_ns: int
) -> tuple[float | None, float | None, int | None]:
    """The fsync'd commit and the run of the last group committed before ``stored_ns``."""
    fsync = run = None
    group = None
    i = bisect_right(spans, (stored_ns, sys.maxsize)) - 1
    while i >= 0 and (fsync is None or run is None):
        end, start, event, size = spans[i]
        if event == "sqlite.commit" and fsync is None:
            fsync, group = (end - start) / 1e6, size
        elif event == "sqlite.run" and run is None and fsync is not None:
            run = (end - start) / 1e6
        i -= 1
    return fsync, run, group


def _gc_ms(gcs: list[tuple[int, int, int]], start: int, end: int) -> float:
    """Collections (any process) that ended within ``start..end``, in ms."""
    lo = bisect_right(gcs, (start, sys.maxsize, 0))
    hi = bisect_right(gcs, (end, sys.maxsize, 0))
    return sum(pause for _, pause, _ in gcs[lo:hi]) / 1e6


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def breakdown(found: list[Way], slowest: float) -> dict[str, Any]:
    """The histogram and the segments' figures of one phase's messages."""
    found = sorted(found, key=lambda w: w.total_ms)
    cut = max(1, round(len(found) * slowest))
    tail, rest = found[-cut:], found[:-cut]
    hist: dict[str, int] = {}
    lo = 0
    for hi in (*HISTOGRAM_MS, None):
        label = f"{lo}-{hi}" if hi is not None else f">{lo}"
        hist[label] = sum(1 for w in found if lo <= w.total_ms < (hi or float("inf")))
        lo = hi or lo
    extras = {
        "fsync": lambda w: w.fsync_ms, "sqlite_run": lambda w: w.run_ms,
        "group": lambda w: w.group, "gc_any_process": lambda w: w.gc_ms,
    }  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    names = [n for n, _ in SEGMENTS] + list(extras)
    for name in names:
        get = extras.get(name) or (lambda w, n=name: w.segments[n])  # type: ignore[misc]

        def values(ways: list[Way], get: Any = get) -> list[float]:
            return [v for w in ways if (v := get(w)) is not None]

        every = values(found)
        rows[name] = {
            "p50": round(pct(every, 0.5), 2), "p90": round(pct(every, 0.9), 2),
            "p99": round(pct(every, 0.99), 2),
            f"slowest_{len(tail)}_mean": round(mean(values(tail)), 2),
            "rest_mean": round(mean(values(rest)), 2),
        }  # fmt: skip
    totals, told = [w.total_ms for w in found], [w.told_ms for w in found]
    return {
        "messages": len(found),
        "total_ms": {"p50": round(pct(totals, 0.5), 2), "p99": round(pct(totals, 0.99), 2)},
        "told_ms": {"p50": round(pct(told, 0.5), 2), "p99": round(pct(told, 0.99), 2)},
        "histogram_ms": hist,
        "segments_ms": rows,
        "slowest": [{"ms": round(w.total_ms, 1), **{k: round(v, 1) for k, v in
                     w.segments.items() if v >= 2.0}} for w in tail[-5:]],
    }  # fmt: skip


def report(directory: Path, slowest: float = 0.05) -> dict[str, Any]:
    """Per phase (``rt``, ``seq``, ``c10``...; the warm-up's too), the breakdown."""
    by_phase: dict[str, list[Way]] = defaultdict(list)
    for way in ways(read(directory)):
        by_phase[way.phase].append(way)
    return {phase: breakdown(found, slowest) for phase, found in sorted(by_phase.items())}


def render(out: dict[str, Any]) -> str:
    """The breakdown as text tables, one per phase."""
    lines = []
    for phase, b in out.items():
        lines.append(f"== {phase}: {b['messages']} messages, to committed p50 "
                     f"{b['total_ms']['p50']} / p99 {b['total_ms']['p99']} ms, to on_message "
                     f"p50 {b['told_ms']['p50']} / p99 {b['told_ms']['p99']} ms")  # fmt: skip
        lines.append("histogram ms: " + ", ".join(f"{k}: {v}" for k, v in
                                                    b["histogram_ms"].items() if v))  # fmt: skip
        header = list(next(iter(b["segments_ms"].values())))
        lines.append(f"{'segment':16}" + "".join(f"{h:>18}" for h in header))
        for name, row in b["segments_ms"].items():
            lines.append(f"{name:16}" + "".join(f"{row[h]:>18}" for h in header))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench.e2e --trace's per-message breakdown")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--slowest", type=float, default=0.05, help="the tail's share")
    parser.add_argument("--json", action="store_true", help="JSON instead of tables")
    args = parser.parse_args(argv)
    out = report(args.directory, args.slowest)
    print(json.dumps(out) if args.json else render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
