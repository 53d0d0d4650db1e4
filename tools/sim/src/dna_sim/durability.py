"""`dna-sim durability`: how many overlay records survive churn, per replica count.

    dna-sim durability --nodes 5000 --records 2000 --rounds 24 --churn 0.1,0.3,0.5 \\
        --replicas 5,8,12,20 --seed 7

The model follows what the nodes do (``docs/overlay.md``, records):

* a put stores the record on the R nodes closest to its key (``OverlayNode.put_record``
  with its lookup's result cut to R);
* a round is one republish interval (an hour): first ``churn`` of the online nodes leave
  for good (with the records they held) and as many new nodes, minted with the world
  and offline until then, come online holding nothing; then every online node holding
  a record stores it again on the R nodes now closest to its key (the server's upkeep,
  ``republish_due``);
* a record is **durable** while an online node holds it, and **findable** when one of the
  ``holders`` (5) online nodes closest to its key holds it: what ``get_record`` asks after
  its lookup (``findable_asking_r``: if it asked all R). Both are counted after the churn
  and before the republish, the worst moment of a round.

Lookups are taken as exact (the closest online nodes, from the sorted ID list): the
lookup scenarios measure that they are (success 1.000 with 20% crashed after upkeep,
``docs/performance.md``); churn acts here through what it does to replica sets. Owners'
devices republishing their own records (every 6 h) are left out: they would bring lost
records back, so the figures are the network's durability on its own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

from dna_core.overlay import ID_BITS

from dna_sim.world import World, WorldConfig
from dna_sim.xor import xor_closest

GET_HOLDERS = 5  # OverlayNode.get_record(holders=5): nodes asked after the lookup


def simulate(
    *, nodes: int, records: int, rounds: int, churn: float, replicas: int, seed: int
) -> dict[str, Any]:
    """One churn run: the durable and findable fractions round by round."""
    rng = random.Random(seed)
    leaving = round(churn * nodes)
    world = World(WorldConfig(nodes=nodes + leaving * rounds), rng, lazy=True)
    online = sorted(rng.sample(range(len(world.keys)), nodes))
    offline = sorted(set(range(len(world.keys))) - set(online))
    rng.shuffle(offline)  # the order in which new nodes come online
    keys = [rng.getrandbits(ID_BITS) for _ in range(records)]
    up = set(online)
    closest = _Closest(world, online)
    held = [set(closest(key, replicas)) for key in keys]
    durable, findable, findable_r = [], [], []
    for _ in range(rounds):
        gone = set(rng.sample(online, leaving))
        up -= gone
        up.update(offline[:leaving])
        offline = offline[leaving:]
        online = sorted(up)
        for holders in held:
            holders.difference_update(gone)
        closest = _Closest(world, online)
        durable.append(sum(1 for h in held if h) / records)
        findable.append(_found(closest, keys, held, GET_HOLDERS) / records)
        findable_r.append(_found(closest, keys, held, replicas) / records)
        for key, holders in zip(keys, held, strict=True):
            if holders:  # every holder stores it again on the R closest
                holders.update(closest(key, replicas))
    return {
        "nodes": nodes,
        "records": records,
        "rounds": rounds,
        "churn": churn,
        "replicas": replicas,
        "seed": seed,
        "durable_final": round(durable[-1], 6),
        "findable_min": round(min(findable), 6),
        "findable_mean": round(sum(findable) / rounds, 6),
        "findable_asking_r_min": round(min(findable_r), 6),
        "lost": records - round(durable[-1] * records),
    }


def _found(closest: _Closest, keys: list[int], held: list[set[int]], asked: int) -> int:
    """Records held by one of the ``asked`` online nodes closest to their key."""
    return sum(any(i in h for i in closest(key, asked)) for key, h in zip(keys, held, strict=True))


class _Closest:
    """The online nodes closest to a key (what an exact lookup returns)."""

    __slots__ = ("keys", "online")

    def __init__(self, world: World, online: list[int]) -> None:
        self.online = online
        self.keys = [world.keys[i] for i in online]

    def __call__(self, key: int, count: int) -> list[int]:
        return [self.online[i] for i in xor_closest(self.keys, key, count)]


def _numbers(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dna-sim durability", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=5000, help="online nodes (constant)")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=24, help="republish intervals (hours)")
    p.add_argument("--churn", type=_numbers(float), default=[0.1, 0.3, 0.5])
    p.add_argument("--replicas", type=_numbers(int), default=[5, 8, 12, 20])
    p.add_argument("--seed", type=int, default=7)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    bad = [c for c in args.churn if not 0.0 <= c < 1.0] + [r for r in args.replicas if r < 1]
    if bad or args.nodes < max(args.replicas) or args.records < 1 or args.rounds < 1:
        raise SystemExit(f"dna-sim durability: bad arguments {bad or vars(args)}")
    rows = []
    for churn in args.churn:
        for replicas in args.replicas:
            row = simulate(
                nodes=args.nodes, records=args.records, rounds=args.rounds,
                churn=churn, replicas=replicas, seed=args.seed,
            )  # fmt: skip
            rows.append(row)
            print(json.dumps({"bench": "sim.durability", **row}, separators=(",", ":")), flush=True)
    print(_table(rows), file=sys.stderr)


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| churn per round | replicas | durable after all rounds | findable, worst round "
        "(asking 5 / R) | lost |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['churn']:.0%} | {r['replicas']} | {r['durable_final']:.4f} | "
            f"{r['findable_min']:.4f} / {r['findable_asking_r_min']:.4f} | "
            f"{r['lost']} of {r['records']} |"
        )
    return "\n".join(out)
