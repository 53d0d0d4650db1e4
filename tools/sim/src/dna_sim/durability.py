"""`dna-sim durability`: how many overlay records survive churn, per replica count.

    dna-sim durability --nodes 5000 --records 2000 --rounds 24 --churn 0.1,0.3,0.5 \\
        --replicas 5,8,12,20 --seed 7
    dna-sim durability --crowd 0.1 --sybils 8 --placement spread,closest --replicas 8
    dna-sim durability --replicas 8 --sybils 2 --suppress --store-on-join

The model follows what the nodes do (``docs/overlay.md``, records), with the nodes'
own choice of holders (``PLACEMENTS``: the functions ``dna_core`` calls, not copies):

* a put looks up the k (20) nodes closest to its key and stores the record on R of them:
  ``spread`` (what ``OverlayNode.put_record`` does: ``spread_over_subnets``, the closest,
  at most 2 of one /24 while other subnets are left; a mailbox's ``replica_set`` is the
  same function) or ``closest`` (the R closest, as before the spread, for comparison);
* a round is one republish interval (an hour): first ``churn`` of the online honest
  nodes leave for good (with the records they held) and as many new nodes, minted with
  the world and offline until then, come online holding nothing; then every online node
  holding a record puts it again (the server's upkeep, ``republish_due``, calls
  ``put_record``): the same choice among the k now closest;
* with ``store_on_join``, right after the churn each newcomer that is now one of a
  record's R gets it from the holders `handoff_senders` names (if one is honest and
  holds it), as ``OverlayNode`` does when a contact enters its table, seconds after it
  joined (the model lumps an hour's joins into one moment, so a newcomer that joined
  and another that left within it are both in it);
* a record is **durable** while an online honest node holds it, and **findable** when
  one of the ``holders`` (5) nodes ``get_record`` asks after its lookup holds it: the
  same choice, of 5, among the k closest (``findable_asking_r``: had it asked all R;
  ``findable_asking_closest``: had it asked the 5 closest, ignoring the spread). All are
  counted after the churn and before the republish, the worst moment of a round.

Addresses (``Subnets``): honest nodes are spread over ``nodes / per_subnet`` /24s at
random (default 10 a /24: the lookup scenarios' 512 /24s at 5,000 nodes, where 3 of one
/24 among a key's 8 closest is rare); ``crowd`` of them (and of the newcomers) sit in
one more /24, a NAT or cloud range; and ``sybils`` IDs of an attacker's /24, ground
nearer each record's key than any honest node (IDs cost 8 puzzle bits), are always
online, accept every store and hold nothing for anyone: a get that asks them finds
nothing there, and they never republish. With ``suppress`` they also send each record's
bytes to its honest holders just before any of their republishes is due: a store from
one of the k closest a node knows postpones its own republish (``RecordStore.repeat``),
as far as the node's `RepublishClock` lets it (``_Clocks``: not twice in a row from one
/24, and never past ``max_silence`` intervals), so without those bounds no honest holder
republished and newcomers near the key never got the record.

Lookups are taken as exact (the k closest online nodes, Sybils included, from the sorted
ID list): the lookup scenarios measure that they are (success 1.000 with 20% crashed
after upkeep, ``docs/performance.md``); churn acts here through what it does to replica
sets. Owners' devices republishing their own records (every 6 h) are left out: they
would bring lost records back, so the figures are the network's durability on its own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dna_core.mailbox import replica_set
from dna_core.overlay import (
    ID_BITS,
    ID_BYTES,
    MAX_SILENCE,
    REPUBLISH_JITTER,
    BehaviourConfig,
    Contact,
    Endpoint,
    RepublishClock,
    handoff_senders,
)

from dna_sim.xor import xor_closest

GET_HOLDERS = 5  # OverlayNode.get_record(holders=5): nodes asked after the lookup
K = BehaviourConfig().k  # a lookup's result: the nodes a put's and a get's choice is among
PER_SUBNET = 10  # honest nodes per /24: 5,000 over ~512 /24s, as the lookup scenarios
_SYBIL_PREFIX = 32  # bits a Sybil ID shares with its key: nearer than any honest node
_PORT = 4433
SYBIL_SUBNET = "13.0.0"  # the attacker's /24 (`_mint_sybils`)
INTERVAL_MS = 3_600_000  # a round: republish_interval
# The Sybils send their copy this often: just before any honest clock can be due.
ATTACK_GAP_MS = round(INTERVAL_MS * (1 - REPUBLISH_JITTER)) - 60_000

Placement = Callable[[Sequence[Contact], int], list[Contact]]


def _spread(found: Sequence[Contact], count: int) -> list[Contact]:
    """The nodes' choice: ``replica_set`` is ``spread_over_subnets`` (the function
    ``OverlayNode._spread`` calls for records), the one the overlay's face does not export;
    the addresses are public, so nothing is exempt."""
    return replica_set(found, count, loopback_exempt=False)


def _closest(found: Sequence[Contact], count: int) -> list[Contact]:
    return list(found[:count])


PLACEMENTS: dict[str, Placement] = {"spread": _spread, "closest": _closest}


@dataclass(frozen=True, slots=True)
class Subnets:
    """Where the nodes' addresses are (module docstring)."""

    per_subnet: int = PER_SUBNET  # honest nodes per ordinary /24, on average
    crowd: float = 0.0  # share of honest nodes in one crowded /24 (NAT, cloud)
    sybils: int = 0  # attacker IDs in one /24, ground nearer each key than anyone
    suppress: bool = False  # the Sybils store each record on its holders every interval


def simulate(
    *, nodes: int, records: int, rounds: int, churn: float, replicas: int, seed: int,
    placement: str = "spread", subnets: Subnets | None = None, max_silence: int = MAX_SILENCE,
    store_on_join: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One churn run: the durable and findable fractions round by round."""
    subnets = subnets or Subnets()
    rng = random.Random(seed)
    leaving = round(churn * nodes)
    net = _Network(mint_honest(nodes + leaving * rounds, nodes, subnets, rng), nodes, rng)
    keys = [rng.getrandbits(ID_BITS) for _ in range(records)]
    sybils = [_mint_sybils(key, subnets.sybils, rng) for key in keys]
    puts = _Puts(PLACEMENTS[placement], replicas, net.index)
    # A store of the bytes a node holds from one of the k closest it knows counts as its
    # republish (`RecordStore.repeat`): a Sybil among them sending them every interval
    # postpones every honest holder's, as far as its clock lets it (`_Clocks`).
    suppressed = subnets.suppress and subnets.sybils > 0
    clocks = [_Clocks(max_silence, rng) for _ in keys]
    lookup = net.lookup()
    held = [puts(lookup(key, s)) for key, s in zip(keys, sybils, strict=True)]
    durable: list[float] = []
    asked: dict[str, list[float]] = {"get": [], "r": [], "closest": []}
    handed = 0
    for round_ in range(rounds):
        gone, joined = net.churn(leaving)
        for holders in held:
            holders.difference_update(gone)
        lookup = net.lookup()
        found = [lookup(key, s) for key, s in zip(keys, sybils, strict=True)]
        if store_on_join:
            handed += sum(puts.hand_over(f, h, joined) for f, h in zip(found, held, strict=True))
        durable.append(sum(1 for h in held if h) / records)
        for name, figures in asked.items():
            hits = sum(puts.asked(name, f, h) for f, h in zip(found, held, strict=True))
            figures.append(hits / records)
        at = round_ * INTERVAL_MS
        for holders, k_closest, clock in zip(held, found, clocks, strict=True):
            if not holders:
                continue
            if not suppressed:  # every holder puts it again: the same choice
                holders.update(puts(k_closest))
            elif clock.republishes(holders, at):  # one does, despite the Sybils' copies
                holders.update(puts(k_closest))
                clock.got(holders, at + ATTACK_GAP_MS)
    return {
        "nodes": nodes,
        "records": records,
        "rounds": rounds,
        "churn": churn,
        "replicas": replicas,
        "seed": seed,
        "placement": placement,
        "per_subnet": subnets.per_subnet,
        "crowd": subnets.crowd,
        "sybils": subnets.sybils,
        "suppress": subnets.suppress,
        "max_silence": max_silence,
        "store_on_join": store_on_join,
        "handoffs_per_record_round": round(handed / (records * rounds), 4),
        "durable_final": round(durable[-1], 6),
        "findable_min": round(min(asked["get"]), 6),
        "findable_mean": round(sum(asked["get"]) / rounds, 6),
        "findable_asking_r_min": round(min(asked["r"]), 6),
        "findable_asking_closest_min": round(min(asked["closest"]), 6),
        "lost": records - round(durable[-1] * records),
        "puts_over_2_of_a_subnet": round(puts.crowded / puts.made, 6),
    }


class _Clocks:
    """One record's honest holders' republish clocks under suppression: the node's own
    `RepublishClock`. A Sybils' copy reaches every honest holder at the start of a round
    and the next one ``ATTACK_GAP_MS`` later (the most they can wait and still come before
    any honest clock is due); a holder whose clock is due before that (only its deadline,
    ``max_silence`` intervals after its own last republish) republishes. An
    honest republish's copies to the other holders are left out: they only restart clocks
    the Sybils' next copy restarts anyway."""

    __slots__ = ("clocks", "max_silence", "rng")

    def __init__(self, max_silence: int, rng: random.Random) -> None:
        self.clocks: dict[int, RepublishClock] = {}
        self.max_silence = max_silence
        self.rng = rng

    def got(self, holders: set[int], at: float) -> None:
        """Holders new to the record got it at ``at``: their clocks start."""
        for node in holders:
            if node not in self.clocks:
                self.clocks[node] = RepublishClock.start(at, self.rng)

    def republishes(self, holders: set[int], at: float) -> bool:
        """Whether a holder republishes in the round starting at ``at``."""
        for node in [n for n in self.clocks if n not in holders]:
            del self.clocks[node]  # left with the record
        self.got(holders, at)
        end = at + ATTACK_GAP_MS
        firing = False
        for node in sorted(holders):
            clock = self.clocks[node]
            clock.postpone(at, self.rng, SYBIL_SUBNET)
            if clock.due(end, INTERVAL_MS, max_silence=self.max_silence):
                clock.republished(end, self.rng)
                firing = True
        return firing


class _Network:
    """The honest nodes (sorted by ID), which are online, and the order newcomers join."""

    __slots__ = ("honest", "index", "offline", "rng", "up")

    def __init__(self, honest: list[Contact], online: int, rng: random.Random) -> None:
        self.honest = honest
        self.index = {c.key: i for i, c in enumerate(honest)}
        self.rng = rng
        self.up = set(rng.sample(range(len(honest)), online))
        self.offline = sorted(set(range(len(honest))) - self.up)
        rng.shuffle(self.offline)  # the order in which new nodes come online

    def churn(self, leaving: int) -> tuple[set[int], set[int]]:
        """``leaving`` online nodes leave for good, as many new ones join; who left, who
        joined."""
        gone = set(self.rng.sample(sorted(self.up), leaving))
        joined = set(self.offline[:leaving])
        self.up -= gone
        self.up.update(joined)
        self.offline = self.offline[leaving:]
        return gone, joined

    def lookup(self) -> _Lookup:
        return _Lookup(self.honest, self.up)


class _Puts:
    """The holder choice of puts (and republishes) and gets, among a lookup's k."""

    __slots__ = ("crowded", "index", "made", "place", "replicas")

    def __init__(self, place: Placement, replicas: int, index: dict[int, int]) -> None:
        self.place = place
        self.replicas = replicas
        self.index = index  # honest node ID -> its index
        self.made = 0
        self.crowded = 0  # puts that gave one /24 more than 2 replicas

    def __call__(self, found: list[Contact]) -> set[int]:
        """The honest nodes a put of a record stores it on."""
        chosen = self.place(found, self.replicas)
        self.made += 1
        self.crowded += Counter(c.subnet for c in chosen).most_common(1)[0][1] > 2
        return self.holding(chosen)

    def hand_over(self, found: list[Contact], held: set[int], joined: set[int]) -> int:
        """Store-on-join (`handoff.py`): each node that joined this round and is now one
        of the record's R (the put's choice among the k closest) gets it from its
        senders (`handoff_senders`), if one of them is an honest holder (a Sybil sender
        keeps it). Every holder sees the same k (lookups are exact), so exactly the
        senders send; only holders from before this round's joins (newcomers that
        joined in one hour do not pass it on among themselves: conservative). Adds the
        newcomers to ``held``; returns the stores sent."""
        if not held:
            return 0
        chosen = self.place(found, self.replicas)
        before = set(held)  # (a newcomer handed it now sends nothing this round)
        sent = 0
        for newcomer in chosen:
            at = self.index.get(newcomer.key)
            if at is None or at not in joined or at in held:
                continue
            givers = self.holding(handoff_senders(newcomer.node_id, chosen)) & before
            if givers:
                sent += len(givers)
                held.add(at)
        return sent

    def asked(self, get: str, found: list[Contact], held: set[int]) -> bool:
        """Whether a get finds the record: ``get`` is what ``get_record`` asks (the
        placement's 5), ``r`` the placement's R, ``closest`` the 5 closest."""
        if get == "closest":
            chosen = found[:GET_HOLDERS]
        else:
            chosen = self.place(found, GET_HOLDERS if get == "get" else self.replicas)
        return not self.holding(chosen).isdisjoint(held)

    def holding(self, chosen: list[Contact]) -> set[int]:
        """The chosen that hold a record for others: the honest ones (a Sybil accepts
        the store and keeps it to itself)."""
        return {self.index[c.key] for c in chosen if c.key in self.index}


class _Lookup:
    """The k online nodes closest to a key (what an exact lookup returns)."""

    __slots__ = ("contacts", "keys")

    def __init__(self, honest: list[Contact], online: set[int]) -> None:
        self.contacts = [honest[i] for i in sorted(online)]  # honest: sorted by ID
        self.keys = [c.key for c in self.contacts]

    def __call__(self, key: int, sybils: list[Contact]) -> list[Contact]:
        """The k closest of the online honest nodes and the key's own ``sybils``."""
        found = [self.contacts[i] for i in xor_closest(self.keys, key, K)]
        return sorted([*sybils, *found], key=lambda c: c.key ^ key)[:K] if sybils else found


def mint_honest(count: int, online: int, subnets: Subnets, rng: random.Random) -> list[Contact]:
    """``count`` honest contacts with distinct random IDs, sorted by ID: ``crowd`` of them
    in one /24 (12.0.0.0/24, several behind one address as a NAT puts them), the others
    at random in ``online / per_subnet`` /24s of 11.0.0.0/8 (public: the spread counts
    them; private addresses are exempt from it)."""
    ordinary = max(1, round(online / subnets.per_subnet))
    if ordinary > 65_536:
        raise ValueError(f"{ordinary} /24s do not fit 11.0.0.0/8")
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(rng.getrandbits(ID_BITS))
    contacts = []
    for n, key in enumerate(sorted(ids)):
        if rng.random() < subnets.crowd:
            ip = f"12.0.0.{n % 254 + 1}"
        else:
            subnet = rng.randrange(ordinary)
            ip = f"11.{subnet // 256}.{subnet % 256}.{n % 254 + 1}"
        contacts.append(_contact(key, ip, _PORT + n // 254))
    return contacts


def _mint_sybils(key: int, count: int, rng: random.Random) -> list[Contact]:
    """``count`` IDs of the attacker's /24 (13.0.0.0/24) that share their first 32 bits
    with ``key``: nearer than any honest node (of 10^5, one is that near once in 43,000
    keys). Each key's own: an attacker grinds for the few keys it attacks, and the IDs
    it ground for one are, to every other key, as far as anyone's (left out)."""
    free = ID_BITS - _SYBIL_PREFIX
    top = key >> free << free
    return [
        _contact(top | rng.getrandbits(free), f"13.0.0.{n % 254 + 1}", _PORT + n // 254)
        for n in range(count)
    ]


def _contact(key: int, ip: str, port: int) -> Contact:
    return Contact(key.to_bytes(ID_BYTES, "big"), b"", (Endpoint(ip, port),))


def _numbers(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None

    return parse


def _placements(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in PLACEMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown placement {unknown}: {sorted(PLACEMENTS)}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dna-sim durability", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=5000, help="online honest nodes (constant)")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=24, help="republish intervals (hours)")
    p.add_argument("--churn", type=_numbers(float), default=[0.1, 0.3, 0.5])
    p.add_argument("--replicas", type=_numbers(int), default=[5, 8, 12, 20])
    p.add_argument("--placement", type=_placements, default=["spread"],
                   help="holder choice: spread (the nodes'), closest (the R closest)")  # fmt: skip
    p.add_argument("--per-subnet", type=int, default=PER_SUBNET,
                   help="honest nodes per ordinary /24, on average")  # fmt: skip
    p.add_argument("--crowd", type=float, default=0.0,
                   help="share of honest nodes in one /24 (a NAT or cloud range)")  # fmt: skip
    p.add_argument("--sybils", type=int, default=0,
                   help="attacker IDs of one /24 ground nearer each key than anyone")  # fmt: skip
    p.add_argument("--suppress", action="store_true",
                   help="the Sybils' stores stand for the honest holders' republishes")  # fmt: skip
    p.add_argument("--max-silence", type=int, default=MAX_SILENCE,
                   help="intervals a holder goes at most without republishing")  # fmt: skip
    p.add_argument("--store-on-join", action="store_true",
                   help="holders hand a record to a node joining among its R")  # fmt: skip
    p.add_argument("--seed", type=int, default=7)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    bad = [c for c in args.churn if not 0.0 <= c < 1.0] + [r for r in args.replicas if r < 1]
    shape = args.nodes < max(args.replicas) or args.records < 1 or args.rounds < 1
    if (
        bad
        or shape
        or args.max_silence < 1
        or args.per_subnet < 1
        or not 0.0 <= args.crowd < 1.0
        or args.sybils < 0
    ):
        raise SystemExit(f"dna-sim durability: bad arguments {bad or vars(args)}")
    subnets = Subnets(args.per_subnet, args.crowd, args.sybils, args.suppress)
    rows = []
    for churn in args.churn:
        for replicas in args.replicas:
            for placement in args.placement:
                row = simulate(
                    nodes=args.nodes, records=args.records, rounds=args.rounds, churn=churn,
                    replicas=replicas, seed=args.seed, placement=placement, subnets=subnets,
                    max_silence=args.max_silence, store_on_join=args.store_on_join,
                )  # fmt: skip
                rows.append(row)
                line = json.dumps({"bench": "sim.durability", **row}, separators=(",", ":"))
                print(line, flush=True)
    print(_table(rows), file=sys.stderr)


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| churn per round | replicas | placement | durable after all rounds | findable, "
        "worst round (get's 5 / R / 5 closest) | lost |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['churn']:.0%} | {r['replicas']} | {r['placement']} | "
            f"{r['durable_final']:.4f} | {r['findable_min']:.4f} / "
            f"{r['findable_asking_r_min']:.4f} / {r['findable_asking_closest_min']:.4f} | "
            f"{r['lost']} of {r['records']} |"
        )
    return "\n".join(out)
