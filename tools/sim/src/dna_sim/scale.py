"""`dna-sim scale`: the scaling curve, one healthy lazy simulation per network size.

    dna-sim scale --sizes 1000,10000,100000,1000000 --lookups 10000 --seed 7

Each size runs in its own child process (so its peak RSS is its own), bounded by
``--timeout`` and by an address-space limit of ``--max-gib``: a size that would take more
is cut and reported as such instead of pushing the machine into swap. Each size prints
one JSON line in the BENCH.md shape (``bench``, ``unit``, ``ours``, ``n``, ``params``)
with the curve's figures beside it; a table follows on stderr.

The world is lazy (``World(lazy=True)``): a node's table is filled when the node is first
touched, so memory and fill time follow the nodes the lookups reach, not the network size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from dna_sim.scenario import Scenario, Simulation

GOAL_NODES = 1_000_000
GOAL_LOOKUPS = 10_000
GOAL_SECONDS = 30 * 60  # issue 15: 1,000,000 nodes, 10,000 lookups, under 30 minutes...
GOAL_GIB = 16.0  # ...and 16 GiB, with success >= 0.999
GOAL_SUCCESS = 0.999
_GIB = 1 << 30


def measure(nodes: int, lookups: int, seed: int) -> dict[str, Any]:
    """One lazy healthy simulation in this process: the curve's figures for ``nodes``."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    sim = Simulation(Scenario(nodes=nodes, lookups=lookups, seed=seed), lazy=True)
    world = sim.build()
    built_at = time.perf_counter() - t0
    sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    phase = sim.phases["healthy"]["single"]
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {
        "nodes": nodes,
        "lookups": lookups,
        "seed": seed,
        "success_rate": phase["success_rate"],
        "hops_median": phase["hops_median"],
        "hops_mean": phase["hops_mean"],
        "queries_per_lookup_mean": phase["queries_per_lookup_mean"],
        "latency_ms_p50": phase["latency_ms_p50"],
        "nodes_built": world.built,
        "contacts_per_built_node": round(sum(len(n.table) for n in world.nodes) / world.built, 1),
        "build_seconds": round(built_at, 2),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "rss_gib": round(rss_kib / (1 << 20), 3),
    }


def bench_line(m: dict[str, Any]) -> dict[str, Any]:
    """``m`` as a BENCH.md line: the figure is the wall time, the goal its baseline."""
    line: dict[str, Any] = {
        "bench": "sim.scale",
        "unit": "s",
        "ours": m["wall_seconds"],
        "n": m["lookups"],
        "params": {"nodes": m["nodes"], "seed": m["seed"], "k": 20, "alpha": 3},
        **{k: v for k, v in m.items() if k not in ("lookups", "seed")},
    }
    if m["nodes"] == GOAL_NODES and m["lookups"] >= GOAL_LOOKUPS and "error" not in m:
        line["baseline"] = {"goal_seconds": GOAL_SECONDS}
        line["ratio"] = round(GOAL_SECONDS / m["wall_seconds"], 3)
        line["goals"] = {
            f"success_ge_{GOAL_SUCCESS}": m["success_rate"] >= GOAL_SUCCESS,
            "wall_under_30_min": m["wall_seconds"] < GOAL_SECONDS,
            f"rss_under_{GOAL_GIB:g}_gib": m["rss_gib"] < GOAL_GIB,
        }
    return line


def _run_child(
    nodes: int, lookups: int, seed: int, timeout: float, max_gib: float
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dna_sim.scale", "--one", str(nodes)]
    cmd += ["--lookups", str(lookups), "--seed", str(seed), "--max-gib", str(max_gib)]
    failed: dict[str, Any] = {"nodes": nodes, "lookups": lookups, "seed": seed}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"cut after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**failed, "error": f"exit {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of sizes"
        ) from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError("every size must be at least 2 nodes")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dna-sim scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=_sizes, default=[1000, 10_000, 100_000])
    p.add_argument("--lookups", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=GOAL_SECONDS, help="seconds per size")
    p.add_argument("--max-gib", type=float, default=10.0, help="address space per size")
    p.add_argument("--one", type=int, metavar="NODES", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.one is not None:  # the child: one size, bounded, one JSON line
        limit = int(args.max_gib * _GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(measure(args.one, args.lookups, args.seed)), flush=True)
        return
    print(f"machine: {sys.version.split()[0]}, nproc {_nproc()}", file=sys.stderr)
    rows = []
    for nodes in args.sizes:
        m = _run_child(nodes, args.lookups, args.seed, args.timeout, args.max_gib)
        rows.append(m)
        print(json.dumps(bench_line(m), separators=(",", ":")), flush=True)
    print(_table(rows), file=sys.stderr)


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| nodes | success | hops (median / mean) | queries per lookup | built | wall | RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        if "error" in m:
            out.append(f"| {m['nodes']:,} | {m['error']} | | | | | |")
            continue
        out.append(
            f"| {m['nodes']:,} | {m['success_rate']:.4f} | {m['hops_median']} / "
            f"{m['hops_mean']} | {m['queries_per_lookup_mean']} | {m['nodes_built']:,} | "
            f"{m['wall_seconds']:.0f} s | {m['rss_gib']:.2f} GiB |"
        )
    return "\n".join(out)


def _nproc() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
