"""The lazy world (`dna-sim scale`), the address space past 130,048 nodes, and the record
durability model (`dna-sim durability`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from dna_core.overlay.contact import Scope
from dna_sim import durability, scale
from dna_sim.scenario import Scenario, Simulation
from dna_sim.world import World, WorldConfig, _mint_contacts

BIN = Path(sys.executable).parent


def test_lazy_world_builds_only_the_nodes_lookups_touch() -> None:
    sim = Simulation(Scenario(nodes=3000, lookups=15, seed=5), lazy=True)
    world = sim.build()
    assert world.built == 0  # nothing until a lookup starts
    m = sim.run()["healthy"]["single"]
    assert m["success_rate"] == 1.0 and m["failures"] == 0
    assert 15 < world.built < 3000 // 2
    # every built node has a filled table, as the oracle fill gives an eager world
    assert min(len(node.table) for node in world.nodes) >= 20


def test_lazy_and_eager_worlds_agree_on_the_curve() -> None:
    figures = {}
    for lazy in (False, True):
        sim = Simulation(Scenario(nodes=600, lookups=150, seed=11), lazy=lazy)
        figures[lazy] = sim.run()["healthy"]["single"]
    assert figures[True]["success_rate"] == figures[False]["success_rate"] == 1.0
    assert abs(figures[True]["hops_mean"] - figures[False]["hops_mean"]) < 0.3
    ratio = figures[True]["queries_per_lookup_mean"] / figures[False]["queries_per_lookup_mean"]
    assert 0.9 < ratio < 1.1


def test_real_joins_are_refused_in_a_lazy_world() -> None:
    world = World(WorldConfig(nodes=50), random.Random(1), lazy=True)
    with pytest.raises(ValueError, match="lazy"):
        world.join()
    assert world.built == 0


def test_networks_past_the_benchmark_range_spread_over_a_public_slash_eight() -> None:
    small = _mint_contacts(1000, random.Random(2))
    assert all(c.endpoint.ip.startswith("198.1") for c in small)
    big = _mint_contacts(140_000, random.Random(2))
    assert all(c.endpoint.ip.startswith("11.") for c in big)
    assert all(c.scope is Scope.GLOBAL for c in big)  # private addresses skip the subnet caps
    assert len({c.endpoint.udp for c in big}) == 140_000  # one address each
    subnets = {c.subnet for c in big}
    assert 140_000 / len(subnets) < 254 * 0.8  # /24s about as full as at 100,000 nodes


def test_more_replicas_keep_more_records_through_churn() -> None:
    runs = {
        r: durability.simulate(nodes=400, records=300, rounds=6, churn=0.5, replicas=r, seed=3)
        for r in (2, 12)
    }
    assert runs[2]["lost"] > 0  # half the nodes leaving each hour takes both copies of some
    assert runs[12]["lost"] == 0 and runs[12]["durable_final"] == 1.0
    assert runs[2]["durable_final"] < 1.0
    # a get asking all 12 replicas finds at least what asking the closest 5 does
    assert runs[12]["findable_min"] <= runs[12]["findable_asking_r_min"]


def test_without_churn_every_record_stays_findable() -> None:
    run = durability.simulate(nodes=300, records=100, rounds=3, churn=0.0, replicas=5, seed=1)
    assert run["durable_final"] == run["findable_min"] == 1.0 and run["lost"] == 0


def test_scale_measures_one_size() -> None:
    m = scale.measure(400, 40, seed=2)
    assert m["success_rate"] == 1.0
    assert 0 < m["nodes_built"] <= 400
    assert m["queries_per_lookup_mean"] >= 20 and m["rss_gib"] > 0
    line = scale.bench_line(m)
    assert line["bench"] == "sim.scale" and line["unit"] == "s" and line["n"] == 40
    assert "goals" not in line  # judged at 1,000,000 nodes and 10,000 lookups only
    goal = scale.bench_line({**m, "nodes": scale.GOAL_NODES, "lookups": scale.GOAL_LOOKUPS})
    assert goal["goals"][f"success_ge_{scale.GOAL_SUCCESS}"] is True
    assert goal["goals"]["wall_under_30_min"] is (m["wall_seconds"] < 1800)


@pytest.mark.process
def test_scale_cli_prints_a_bench_line_per_size() -> None:
    done = subprocess.run(
        [str(BIN / "dna-sim"), "scale", "--sizes", "200,300", "--lookups", "20"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["params"]["nodes"] for line in lines] == [200, 300]
    assert all(line["success_rate"] == 1.0 for line in lines)
    assert "| 300 |" in done.stderr  # the table


@pytest.mark.process
@pytest.mark.parametrize("bad", ["1000,x", "1"])
def test_scale_cli_refuses_bad_sizes(bad: str) -> None:
    done = subprocess.run(
        [str(BIN / "dna-sim"), "scale", "--sizes", bad],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "size" in done.stderr
    assert done.stdout == ""
