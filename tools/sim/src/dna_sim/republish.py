"""`dna-sim republish`: how often a record's holders republish it, honest or suppressed.

    dna-sim republish --holders 8 --max-silence 8,12,16
    dna-sim republish --attack-subnets 1 --per-subnet 2

One record, ``holders`` nodes holding it from the start (one put), each with the node's
own republish clock (`dna_core.overlay.records.RepublishClock`: the code ``RecordStore``
runs, not a copy), ``per_subnet`` of them in each /24 (the spread allows 2). Each node's
upkeep looks every minute (``TICK_MS``, at its own phase) whether its clock is due; when
it is, it republishes: it stores the record on the other holders, whose copies arrive
``DELAY_MS`` later (`RepublishClock.postpone`: a fellow holder's copy). With
``attack_subnets`` a fellow holder in that many /24s (IDs ground near the key; the spread
gives their /24 the bytes) sends the bytes to every honest holder just before any of
their clocks can be due (every ``1 - REPUBLISH_JITTER`` of an interval less a minute),
from each /24 in turn, and never republishes. Counted: republishes per interval (each a
lookup and R stores) and the longest any holder went without one (in intervals).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from typing import Any

from dna_core.overlay import MAX_SILENCE, REPUBLISH_JITTER, RepublishClock

INTERVAL_MS = 3_600_000  # republish_interval
TICK_MS = 60_000  # the server's upkeep (UPKEEP_S)
DELAY_MS = 500  # a Store's way to a fellow holder


def simulate(
    *, holders: int = 8, intervals: int = 500, max_silence: int = MAX_SILENCE,
    attack_subnets: int = 0, per_subnet: int = 1, seed: int = 7,
) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(seed)
    clocks = [RepublishClock.start(0, rng) for _ in range(holders)]
    last = [0.0] * holders  # each one's latest own republish
    silence = 0.0
    fires = 0
    events: list[tuple[float, int, int]] = []  # (time, kind, holder): 1 a tick, -1-s a copy from s
    for h in range(holders):
        heapq.heappush(events, (rng.random() * TICK_MS, 1, h))
    attack_every = INTERVAL_MS * (1 - REPUBLISH_JITTER) - TICK_MS
    next_attack = attack_every if attack_subnets else float("inf")
    sent = 0
    end = intervals * INTERVAL_MS
    while events and events[0][0] < end:
        if next_attack <= events[0][0]:
            for clock in clocks:
                clock.postpone(next_attack, rng, f"sybil{sent % attack_subnets}")
            sent += 1
            next_attack += attack_every
            continue
        at, kind, h = heapq.heappop(events)
        if kind < 0:
            clocks[h].postpone(at, rng, f"honest{(-kind - 1) // per_subnet}")
            continue
        heapq.heappush(events, (at + TICK_MS, 1, h))
        if clocks[h].due(at, INTERVAL_MS, max_silence=max_silence):
            clocks[h].republished(at, rng)
            fires += 1
            silence = max(silence, at - last[h])
            last[h] = at
            for other in range(holders):
                if other != h:
                    heapq.heappush(events, (at + DELAY_MS, -1 - h, other))
    silence = max(silence, *(end - t for t in last))
    return {
        "holders": holders,
        "intervals": intervals,
        "max_silence": max_silence,
        "attack_subnets": attack_subnets,
        "per_subnet": per_subnet,
        "seed": seed,
        "republishes_per_interval": round(fires / intervals, 4),
        "longest_silence": round(silence / INTERVAL_MS, 2),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dna-sim republish", description=__doc__.split("\n")[0])
    p.add_argument("--holders", type=int, default=8)
    p.add_argument("--intervals", type=int, default=500)
    p.add_argument("--max-silence", default=str(MAX_SILENCE), help="comma-separated")
    p.add_argument("--attack-subnets", type=int, default=0,
                   help="/24s of a fellow holder that suppresses (0: none)")  # fmt: skip
    p.add_argument("--per-subnet", type=int, default=1, help="honest holders per /24")
    p.add_argument("--seed", type=int, default=7)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        silences = [int(x) for x in args.max_silence.split(",")]
    except ValueError:
        raise SystemExit("dna-sim republish: --max-silence is a comma-separated list") from None
    if min(args.holders, args.intervals, args.per_subnet, *silences) < 1 or (
        args.attack_subnets < 0
    ):
        raise SystemExit(f"dna-sim republish: bad arguments {vars(args)}")
    for max_silence in silences:
        row = simulate(
            holders=args.holders, intervals=args.intervals, max_silence=max_silence,
            attack_subnets=args.attack_subnets, per_subnet=args.per_subnet, seed=args.seed,
        )  # fmt: skip
        print(json.dumps({"bench": "sim.republish", **row}, separators=(",", ":")), flush=True)
        print(
            f"max_silence {max_silence}: {row['republishes_per_interval']} republishes an "
            f"interval, longest silence {row['longest_silence']} intervals",
            file=sys.stderr,
        )
