"""`dna-sim`: run a seeded overlay simulation; the last stdout line is a JSON summary.

    dna-sim --nodes 10000 --lookups 10000 --seed 7
    dna-sim --nodes 10000 --lookups 10000 --seed 7 --kill-during 0.5
    dna-sim --replay summary.json      # rerun a recorded summary, check it is identical
    dna-sim scale --sizes 1000,10000,100000   # the scaling curve (dna_sim.scale)
    dna-sim durability --replicas 5,8,12,20   # records under churn (dna_sim.durability)
    dna-sim republish --attack-subnets 1      # who republishes a record (dna_sim.republish)

stdout: the seed and the command that replays the run, a line per phase, the JSON summary.
stderr: progress (``--quiet`` silences it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from dna_sim import durability, republish, scale
from dna_sim.scenario import Scenario, Simulation, summary

_FRACTIONS = ("adversarial", "crash", "kill_during", "partition", "loss")
_REPLAY_IGNORED = ("wall_seconds", "cpu_seconds")  # what a replay cannot reproduce


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dna-sim", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=_positive, default=1000)
    p.add_argument("--lookups", type=_positive, default=1000, help="lookups per phase")
    p.add_argument("--seed", type=int, help="default: a random seed, printed")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--alpha", type=int, default=3)
    p.add_argument("--disjoint", type=int, default=0, metavar="D", help="disjoint paths")
    p.add_argument(
        "--adversarial",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="colluding nodes; runs single-path and disjoint lookups side by side",
    )
    p.add_argument(
        "--crash",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="nodes crashed before the lookups (still in routing tables)",
    )
    p.add_argument(
        "--kill-during",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="a healthy phase, then kill FRACTION of the nodes, then a second phase",
    )
    p.add_argument(
        "--partition",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="cut FRACTION of the nodes off for a first phase, then heal: a phase at once "
        "and one once the cut's suspects have cleared",
    )
    p.add_argument("--loss", type=_fraction, default=0.0, metavar="P")
    p.add_argument("--latency-ms", type=float, default=20.0, help="mean one-way pair base")
    p.add_argument("--jitter-ms", type=float, default=5.0, help="per-message ± jitter")
    p.add_argument("--join", choices=("oracle", "real"), default="oracle")
    p.add_argument(
        "--keepalive",
        type=int,
        metavar="N",
        help="each node pings its N closest neighbours before the lookups, after --crash "
        "(default: 3, or 3k with --crash)",
    )
    p.add_argument("--spacing-ms", type=float, default=10.0, help="virtual ms between lookups")
    p.add_argument(
        "--rto-floor-ms",
        type=float,
        default=70.0,
        help="lower bound of the adaptive lookup timeout",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--replay",
        metavar="SUMMARY",
        help="a JSON summary (or a file whose last line is one): rerun it and compare",
    )
    return p


def _scenario_from(args: argparse.Namespace) -> Scenario:
    values = {f.name: getattr(args, f.name) for f in fields(Scenario) if hasattr(args, f.name)}
    if values["seed"] is None:
        values["seed"] = random.SystemRandom().randrange(2**32)
    if args.partition and args.kill_during:
        raise SystemExit("dna-sim: --partition and --kill-during are separate scenarios")
    return Scenario(**values)


def _scenario_from_summary(recorded: dict[str, Any]) -> Scenario:
    values = {f.name: recorded[f.name] for f in fields(Scenario) if f.name in recorded}
    variants: dict[str, int] = recorded.get("variants", {})
    values["disjoint"] = variants.get("disjoint", 0)
    scenario = Scenario(**{**values, "keepalive": None})
    if scenario.keepalive_count() == values.get("keepalive"):
        return scenario  # the default: keep the replay command as short as the original
    return Scenario(**values)


def command_line(scenario: Scenario) -> str:
    """The exact command that replays ``scenario`` (only non-default options)."""
    default = Scenario()
    parts = ["dna-sim", f"--nodes {scenario.nodes}", f"--lookups {scenario.lookups}"]
    parts.append(f"--seed {scenario.seed}")
    for f in fields(Scenario):
        if f.name in ("nodes", "lookups", "seed"):
            continue
        value = getattr(scenario, f.name)
        if value != getattr(default, f.name):
            parts.append(f"--{f.name.replace('_', '-')} {value}")
    return " ".join(parts)


def _load_summary(text: str) -> dict[str, Any]:
    path = Path(text)
    if not text.lstrip().startswith("{") and path.exists():
        text = path.read_text().strip().splitlines()[-1]
    recorded: dict[str, Any] = json.loads(text)
    return recorded


def run(scenario: Scenario, *, quiet: bool = False) -> dict[str, Any]:
    def progress(line: str) -> None:
        if not quiet:
            print(f"progress: {line} (wall {time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    print(f"seed: {scenario.seed}", flush=True)
    print(f"replay: {command_line(scenario)}", flush=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    sim = Simulation(scenario, progress)
    world = sim.build()
    how = "oracle fill (tables filled from the ID list, not by joins)"
    if scenario.join == "real":
        how = "real joins (each node looked up its own ID through a bootstrap)"
    print(f"network: {scenario.nodes} nodes built by {how} in {time.perf_counter() - t0:.1f} s")
    print(f"tables: {sum(len(n.table) for n in world.nodes) / len(world.nodes):.1f} contacts/node")
    sim.run()
    for name, variants in sim.phases.items():
        for variant, m in variants.items():
            print(
                f"phase {name}/{variant}: success {m['success_rate']:.4f}, "
                f"hops median {m['hops_median']}, {m['messages_per_lookup']} msgs/lookup, "
                f"latency p50 {m['latency_ms_p50']} ms p99 {m['latency_ms_p99']} ms"
            )
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"wall: {wall:.1f} s (cpu {cpu:.1f} s)")
    return summary(sim, wall, cpu)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:
        scale.main(argv[1:])
        return
    if argv[:1] == ["durability"]:
        durability.main(argv[1:])
        return
    if argv[:1] == ["republish"]:
        republish.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    recorded = _load_summary(args.replay) if args.replay else None
    scenario = _scenario_from_summary(recorded) if recorded else _scenario_from(args)
    out = run(scenario, quiet=args.quiet)
    if recorded is not None:
        same = _comparable(out) == _comparable(recorded)
        print(f"replay: {'identical' if same else 'DIFFERENT'} to the recorded summary")
    print(json.dumps(out, separators=(",", ":")), flush=True)
    if recorded is not None and not same:
        raise SystemExit(1)


def _comparable(summary_: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary_.items() if k not in _REPLAY_IGNORED}
