"""Scenarios: build a world, inject faults between phases, run lookups, summarize.

A phase starts ``lookups`` lookups (random honest, alive origin; random target), one every
``spacing`` virtual seconds, and runs the network until it is quiet. When single-path and
disjoint lookups are compared (``--adversarial``), each (origin, target) pair is looked up
both ways in the same phase, on the same network.

Success means the result is exactly the k alive nodes closest to the target, the origin
excepted (ground truth from the sorted list of all IDs), checked when the lookup ends.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dna_core.overlay import (
    ID_BITS,
    ID_BYTES,
    SUSPECT_SECONDS,
    Lookup,
)

from dna_sim.network import NetConfig
from dna_sim.node import SimNode, node_config
from dna_sim.stats import LookupRecord, summarize
from dna_sim.world import World, WorldConfig
from dna_sim.xor import xor_closest

DEFAULT_DISJOINT = 3  # paths compared with single-path lookups under --adversarial
_WARM_LEAD = 0.5  # virtual s: a lazy world's origin pings its neighbours this much earlier

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Scenario:
    nodes: int = 1000
    lookups: int = 1000
    seed: int = 0
    k: int = 20
    alpha: int = 3
    disjoint: int = 0  # paths; < 2 = single path (DEFAULT_DISJOINT beside it if adversarial)
    adversarial: float = 0.0
    crash: float = 0.0  # crashed before any lookup
    kill_during: float = 0.0  # killed between a healthy phase and a second phase
    partition: float = 0.0  # cut off for a first phase; healed: at once, and settled
    loss: float = 0.0
    latency_ms: float = 20.0
    jitter_ms: float = 5.0
    join: str = "oracle"
    keepalive: int | None = None  # see keepalive_count
    spacing_ms: float = 10.0
    rto_floor_ms: float = 70.0

    def variants(self) -> list[tuple[str, int]]:
        """(name, paths) of the lookup kinds to run in every phase."""
        if self.adversarial > 0:
            return [("single", 1), ("disjoint", max(2, self.disjoint or DEFAULT_DISJOINT))]
        if self.disjoint > 1:
            return [("disjoint", self.disjoint)]
        return [("single", 1)]

    def keepalive_count(self) -> int:
        """Neighbours each live node pings before the lookups (``World.keepalive``).

        By default 3 for RTT samples; after ``--crash``, 3k: the crash is then in the past,
        and the nodes have done the upkeep a running overlay does around itself (a
        neighbour that stopped answering is evicted). With k, 12% of lookups miss one of
        the k closest at 20% crashed (responders' k-contact answers still list dead
        nodes just past their own k closest); with 3k none do. ``--keepalive 0`` = a
        crash just now (``--kill-during`` is that too, measured against a healthy phase).
        """
        if self.keepalive is not None:
            return self.keepalive
        return 3 * self.k if self.crash > 0 else 3

    def world_config(self) -> WorldConfig:
        return WorldConfig(
            nodes=self.nodes,
            adversarial=self.adversarial,
            net=NetConfig(
                base_latency=self.latency_ms / 1000,
                jitter=self.jitter_ms / 1000,
                loss=self.loss,
            ),
            node=node_config(k=self.k, alpha=self.alpha, rto_floor=self.rto_floor_ms / 1000),
        )


class _Nodes:
    """A set of node indices in ID order, with their keys (for ``xor_closest``)."""

    __slots__ = ("indices", "keys")

    def __init__(self, world: World, indices: list[int]) -> None:
        self.indices = indices
        self.keys = [world.keys[i] for i in indices]

    def closest(self, target: int, count: int, *, besides: int) -> list[int]:
        """The keys of the ``count`` members closest to ``target``, ``besides`` excluded
        (a lookup never returns the node that runs it)."""
        found = [self.keys[i] for i in xor_closest(self.keys, target, count + 1)]
        return [key for key in found if key != besides][:count]


@dataclass(slots=True)
class _Truth:
    """Ground truth for one phase: alive nodes, alive honest nodes, and each partition
    side's alive nodes."""

    alive: _Nodes
    honest: _Nodes
    sides: dict[int, _Nodes] = field(default_factory=dict)


class Simulation:
    def __init__(
        self, scenario: Scenario, progress: Progress | None = None, *, lazy: bool = False
    ) -> None:
        self.scenario = scenario
        self.lazy = lazy  # build nodes on first use (World): for networks of a million
        self.progress = progress or _silent
        self.rng = random.Random(scenario.seed)
        self.world: World | None = None
        self.phases: dict[str, dict[str, dict[str, float]]] = {}

    # -- building -----------------------------------------------------------------

    def build(self) -> World:
        scenario = self.scenario
        with _gc_paused():
            world = World(scenario.world_config(), self.rng, lazy=self.lazy)
            if scenario.join == "real":
                world.join()
            else:
                world.oracle_fill()
            if scenario.crash > 0:
                world.crash(scenario.crash)
            if scenario.keepalive_count() > 0:
                world.keepalive(scenario.keepalive_count())
        self.world = world
        return world

    # -- phases -------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, dict[str, float]]]:
        world = self.world or self.build()
        scenario = self.scenario
        if scenario.partition > 0:
            world.partition(scenario.partition)
            self.run_phase("partitioned")
            world.net.heal()
            # Nodes skip peers that just failed them (suspects) unless that leaves fewer
            # than alpha: right after the heal the other side is still avoided...
            self.run_phase("healing")
            # ...until the suspicions the cut raised have run out.
            world.net.run(until=world.net.now + SUSPECT_SECONDS)
            self.run_phase("healed")
        elif scenario.kill_during > 0:
            self.run_phase("healthy" if scenario.crash == 0 else "crashed")
            world.crash(scenario.kill_during)
            self.run_phase("killed")
        else:
            self.run_phase("healthy" if scenario.crash == 0 else "crashed")
        return self.phases

    def run_phase(self, name: str) -> dict[str, dict[str, float]]:
        world = self.world or self.build()
        phase = _Phase(self, world, name)
        with _gc_young_only():
            records = phase.run()
        partitioned = world.net.group is not None
        self.phases[name] = {
            variant: summarize(recs, partitioned=partitioned) for variant, recs in records.items()
        }
        return self.phases[name]


class _Phase:
    def __init__(self, sim: Simulation, world: World, name: str) -> None:
        self.sim, self.world, self.name = sim, world, name
        self.scenario = sim.scenario
        self.truth = _truth(world)
        self.records: dict[str, list[LookupRecord]] = {v: [] for v, _ in sim.scenario.variants()}
        self.total = sim.scenario.lookups * len(self.records)
        self.done = 0

    def run(self) -> dict[str, list[LookupRecord]]:
        world, rng = self.world, self.sim.rng
        origins = self.truth.honest.indices
        start = world.net.now + 1.0
        spacing = self.scenario.spacing_ms / 1000
        for n in range(self.scenario.lookups):
            origin = rng.choice(origins)
            target = rng.getrandbits(ID_BITS).to_bytes(ID_BYTES, "big")
            if world.lazy:  # its keepalive, answered well before its lookup starts
                world.net.call_at(start + n * spacing - _WARM_LEAD, world.warm, origin)
            world.net.call_at(start + n * spacing, self._start, (origin, target))
        world.net.run()
        return self.records

    def _start(self, args: tuple[int, bytes]) -> None:
        origin, target = args
        node = self.world.node(origin)
        for variant, paths in self.scenario.variants():
            node.lookup(target, self._on_done_for(variant), paths=paths)

    def _on_done_for(self, variant: str) -> Callable[[SimNode, Lookup], None]:
        return lambda node, lookup: self._on_done(variant, node, lookup)

    def _on_done(self, variant: str, node: SimNode, lookup: Lookup) -> None:
        self.records[variant].append(self._record(node, lookup))
        self.done += 1
        if self.done % max(1, self.total // 10) == 0:
            self.sim.progress(f"{self.name}: {self.done}/{self.total} lookups")

    def _record(self, node: SimNode, lookup: Lookup) -> LookupRecord:
        truth, k, target = self.truth, self.world.k, int.from_bytes(lookup.target, "big")
        origin = node.contact.key
        result = lookup.result()
        got = [c.key for c in result]
        want = truth.alive.closest(target, k, besides=origin)
        best_honest = truth.honest.closest(target, 1, besides=origin)
        same_side, cross_side = got == want, False
        group = self.world.net.group
        if group is not None:
            own = group[node.index]
            same_side = got == truth.sides[own].closest(target, k, besides=origin)
            index_of = self.world.book.index_of
            cross_side = any(group[index_of[c.node_id]] != own for c in result)
        return LookupRecord(
            exact=got == want,
            closest_found=bool(best_honest) and best_honest[0] in got,
            same_side=same_side,
            cross_side=cross_side,
            recall=len(set(got) & set(want)) / max(1, len(want)),
            complete=len(got) >= k,
            hops=lookup.hops(result),
            queries=lookup.queries,
            messages=lookup.messages,
            timeouts=lookup.timeouts,
            latency=lookup.ended - lookup.started,
        )


def _truth(world: World) -> _Truth:
    alive = world.alive()
    honest = [i for i in alive if not world.adversarial[i]]
    truth = _Truth(_Nodes(world, alive), _Nodes(world, honest))
    group = world.net.group
    if group is not None:
        sides: dict[int, list[int]] = {}
        for i in alive:
            sides.setdefault(group[i], []).append(i)
        truth.sides = {g: _Nodes(world, members) for g, members in sides.items()}
    return truth


def _silent(_: str) -> None:
    pass


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building allocates millions of long-lived objects and no garbage: the cyclic
    collector would rescan them again and again as the heap grows (2x the build time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _gc_young_only() -> Iterator[None]:
    """Lookups create short-lived objects only; collecting the older generations (the
    whole world) is pure overhead, so raise their thresholds while running."""
    before = gc.get_threshold()
    gc.set_threshold(before[0], 1_000_000, 1_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def summary(sim: Simulation, wall_seconds: float, cpu_seconds: float) -> dict[str, Any]:
    """The one-line JSON summary: the configuration, the headline figures (last phase,
    its disjoint variant when both ran), every phase, and the issue-3 target checks."""
    scenario, world = sim.scenario, sim.world
    assert world is not None
    phase_name = list(sim.phases)[-1]
    phase = sim.phases[phase_name]
    variant = "disjoint" if "disjoint" in phase else "single"
    out: dict[str, Any] = {
        "seed": scenario.seed,
        "nodes": scenario.nodes,
        "lookups": scenario.lookups,
        "k": scenario.k,
        "alpha": scenario.alpha,
        "join": scenario.join,
        "variants": {name: paths for name, paths in scenario.variants()},
        "adversarial": scenario.adversarial,
        "crash": scenario.crash,
        "kill_during": scenario.kill_during,
        "partition": scenario.partition,
        "loss": scenario.loss,
        "latency_ms": scenario.latency_ms,
        "jitter_ms": scenario.jitter_ms,
        "keepalive": scenario.keepalive_count(),
        "rto_floor_ms": scenario.rto_floor_ms,
        "phase": phase_name,
        "variant": variant,
        **phase[variant],
    }
    if "single" in phase and variant != "single":
        out["single_path_success_rate"] = phase["single"]["success_rate"]
        out["single_path_closest_found_rate"] = phase["single"]["closest_found_rate"]
    if scenario.kill_during > 0:
        before = sim.phases[next(iter(sim.phases))][variant]["latency_ms_p50"]
        out["latency_p50_ratio_killed_vs_healthy"] = round(out["latency_ms_p50"] / before, 3)
    out["targets"] = targets(sim, out)
    out["messages_total"] = world.net.sent
    out["maintenance_messages"] = sum(n.maintenance_messages for n in world.nodes)
    out["dropped"] = dict(sorted(world.net.dropped.items()))
    out["virtual_seconds"] = round(world.net.now, 3)
    out["phases"] = sim.phases
    out["wall_seconds"] = round(wall_seconds, 2)
    out["cpu_seconds"] = round(cpu_seconds, 2)
    return out


def targets(sim: Simulation, out: dict[str, Any]) -> dict[str, bool]:
    """Issue 3's simulation targets that apply to this scenario (wall time is printed
    separately: it is the one figure a replay cannot reproduce)."""
    scenario = sim.scenario
    checks: dict[str, bool] = {}
    first = sim.phases[next(iter(sim.phases))]
    faults = scenario.crash or scenario.adversarial or scenario.loss or scenario.partition
    if not faults:
        healthy = first[out["variant"]]
        checks["healthy_success_ge_0.999"] = healthy["success_rate"] >= 0.999
    if scenario.crash > 0:
        checks["crashed_success_ge_0.99"] = out["success_rate"] >= 0.99
    if scenario.adversarial > 0:
        checks["disjoint_success_ge_0.99"] = out["success_rate"] >= 0.99
    if scenario.kill_during > 0:
        checks["killed_p50_latency_le_3x"] = out["latency_p50_ratio_killed_vs_healthy"] <= 3.0
    return checks
