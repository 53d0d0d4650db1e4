"""`dna-testnet resilience`: run scenarios, print each one's figures, exit 1 if any lost or
duplicated a message.

On the compose testnet (default) it brings docker-compose.yml up from scratch (the
images must exist: `make images`), runs the scenarios one after the other on that one
network, and brings it down with its volumes. With ``--driver kubectl`` it runs against a
cluster running the dna chart and deploy/chaos/peers.yaml (deploy/chaos/run.sh; NOT RUN
HERE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

from dna_testnet.resilience.driver import (
    ClusterDriver,
    ComposeFaults,
    KubernetesFaults,
    compose_down,
    compose_up,
)
from dna_testnet.resilience.runner import Outcome, report, run_scenario
from dna_testnet.resilience.scenarios import SCENARIOS, SHORT, SHORT_MESSAGES, Scenario, by_name

DEFAULT_PROJECT = "dnaresil"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("resilience")
    group.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"run this scenario (repeatable; default all: {', '.join(s.name for s in SCENARIOS)})",
    )
    group.add_argument(
        "--seed",
        type=int,
        help="seed of the first scenario (default: random,"
        " printed); the next ones take seed+1, seed+2...",
    )
    group.add_argument(
        "--short",
        action="store_true",
        help=f"the short suite of `make test`: {', '.join(SHORT)}, {SHORT_MESSAGES} messages each",
    )
    group.add_argument("--driver", choices=["compose", "kubectl"], default="compose")
    group.add_argument(
        "--project",
        default=DEFAULT_PROJECT,
        help=f"compose project name (default {DEFAULT_PROJECT})",
    )
    group.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="the repository (its docker-compose.yml; default .)",
    )
    group.add_argument(
        "--running",
        action="store_true",
        help="use the compose project already up (neither up nor down): for trying things",
    )
    group.add_argument("--release", help="kubectl: the dna chart's release")
    group.add_argument("--namespace", help="kubectl: its namespace")


def chosen(args: argparse.Namespace) -> list[Scenario]:
    if args.short and args.scenario:
        raise ValueError("--short and --scenario: choose one")
    if args.short:
        return [by_name(name).small(SHORT_MESSAGES) for name in SHORT]
    return [by_name(name) for name in args.scenario] if args.scenario else list(SCENARIOS)


def run_suite(args: argparse.Namespace) -> list[Outcome]:
    """Run, print the progress and each scenario's report (on stderr under --json, where
    stdout has only the JSON figures), then the summary."""
    progress = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with progress:
        outcomes, seconds = _run(args)
    _summary(outcomes, seconds, as_json=args.json)
    return outcomes


def _run(args: argparse.Namespace) -> tuple[list[Outcome], float]:
    try:
        scenarios = chosen(args)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    start = time.monotonic()
    if args.driver == "kubectl":
        if not (args.release and args.namespace):
            raise RuntimeError("--driver kubectl needs --release and --namespace")
        outcomes = _run_all(KubernetesFaults(args.release, args.namespace), scenarios, seed)
    else:
        root = args.root.resolve()
        if not (root / "docker-compose.yml").exists():
            raise RuntimeError(f"no docker-compose.yml in {root}: give the repository with --root")
        if args.running:
            outcomes = _run_all(ComposeFaults(args.project, root), scenarios, seed)
        else:
            driver = compose_up(root, args.project)
            print(f"compose testnet up and healthy after {time.monotonic() - start:.0f} s")
            try:
                outcomes = _run_all(driver, scenarios, seed)
            finally:
                compose_down(root, args.project)
    return outcomes, time.monotonic() - start


def _run_all(driver: ClusterDriver, scenarios: list[Scenario], seed: int) -> list[Outcome]:
    outcomes = []
    for offset, scenario in enumerate(scenarios):
        outcome = run_scenario(driver, scenario, seed + offset)
        print(report(outcome), flush=True)
        outcomes.append(outcome)
    return outcomes


def _summary(outcomes: list[Outcome], seconds: float, *, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"scenarios": [o.figures() for o in outcomes], "duration_s": round(seconds, 1)}
            )
        )
        return
    print(
        f"\n{'scenario':<20} {'seed':>7} {'acked':>6} {'lost':>5} {'dups':>5} {'failed':>6}"
        f" {'stale':>6} {'time s':>7}  result"
    )
    for o in outcomes:
        f = o.figures()
        print(
            f"{f['scenario']:<20} {f['seed']:>7} {f['acked']:>6} {f['lost']:>5}"
            f" {f['duplicates']:>5} {f['failed']:>6} {f['stale']:>6} {f['duration_s']:>7}"
            f"  {'PASS' if o.passed else 'FAIL'}"
        )
    print(f"total {seconds:.0f} s")
