"""The record durability model's holder choice (`dna-sim durability`): puts, republishes
and gets choose among a lookup's k with the nodes' own function (`spread_over_subnets`),
so a subnet crowded near a key gets 2 replicas where the R closest gave it all."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from dna_core.overlay.contact import Contact, Endpoint, Scope, spread_over_subnets
from dna_sim.durability import PER_SUBNET, PLACEMENTS, Subnets, mint_honest, simulate

BIN = Path(sys.executable).parent


def _run(placement: str, **subnets: Any) -> dict[str, Any]:
    return simulate(
        nodes=400, records=150, rounds=4, churn=0.1, replicas=8, seed=5,
        placement=placement, subnets=Subnets(**subnets),
    )  # fmt: skip


def test_the_model_chooses_as_put_record_and_get_record_do() -> None:
    # A lookup's 20, the 6 closest of one /24: what OverlayNode._spread is given.
    found = [
        Contact(bytes([n]) * 32, b"", (Endpoint(f"11.0.{0 if n < 6 else n}.{n + 1}", 4433),))
        for n in range(20)
    ]
    for count in (5, 8):  # a get's holders, a put's replicas
        chosen = PLACEMENTS["spread"](found, count)
        assert chosen == spread_over_subnets(found, count)
        assert chosen == found[:2] + found[6 : count + 4]  # 2 of the crowded /24
        assert PLACEMENTS["closest"](found, count) == found[:count]


def test_an_attacker_subnet_ground_near_the_keys_gets_two_replicas_not_all_eight() -> None:
    spread, closest = _run("spread", sybils=8), _run("closest", sybils=8)
    # The 8 closest are the attacker's: every record is withheld from the start.
    assert closest["durable_final"] == 0.0 and closest["lost"] == 150
    assert closest["findable_min"] == 0.0
    # The nodes' choice gives it 2 and 6 honest nodes; 10% churn an hour loses nothing.
    assert spread["durable_final"] == 1.0 and spread["lost"] == 0
    assert spread["findable_min"] > 0.95
    assert spread["puts_over_2_of_a_subnet"] == 0.0


def test_a_get_asks_the_spread_not_the_five_closest() -> None:
    run = _run("spread", sybils=8)
    # The 5 closest are all the attacker's: a get blind to the spread finds nothing...
    assert run["findable_asking_closest_min"] == 0.0
    # ...while get_record's 5 (2 of the attacker's, 3 honest) find nearly every record.
    assert run["findable_min"] > 0.95


def test_an_honest_crowded_subnet_holds_at_most_two_replicas_at_no_cost_in_findability() -> None:
    spread, closest = _run("spread", crowd=0.5), _run("closest", crowd=0.5)
    # Half the nodes in one /24: 3 or more of the 8 closest are of it in most puts...
    assert closest["puts_over_2_of_a_subnet"] > 0.5
    # ...and the spread passes over them unless fewer than 6 of the k are elsewhere.
    assert spread["puts_over_2_of_a_subnet"] < 0.02
    for run in (spread, closest):
        assert run["durable_final"] == 1.0 and run["findable_min"] == 1.0


def test_an_attacker_filling_the_whole_lookup_defeats_the_spread_too() -> None:
    # 20 IDs nearer than anyone are all k a lookup returns: the spread fills from them.
    run = _run("spread", sybils=20)
    assert run["durable_final"] == 0.0 and run["findable_min"] == 0.0
    # 16 leave 4 honest nodes in the k, and the spread takes them all.
    assert _run("spread", sybils=16)["durable_final"] > 0.95


def test_sybils_whose_stores_count_as_republishes_no_longer_starve_the_records() -> None:
    def half_a_day(suppress: bool) -> dict[str, Any]:
        return simulate(
            nodes=400, records=150, rounds=12, churn=0.3, replicas=8, seed=5,
            subnets=Subnets(sybils=2, suppress=suppress),
        )  # fmt: skip

    quiet, suppressing = half_a_day(False), half_a_day(True)
    # 2 Sybils take 2 of the 8 replicas; 6 honest holders republishing lose nothing.
    assert quiet["lost"] == 0 and quiet["findable_min"] > 0.9
    # Their copies restarted every holder's republish clock: nobody republished, the
    # holders left one by one (over 100 of the 150 lost, findable under 0.2). Now one
    # /24 cannot postpone a republish twice in a row (`RepublishClock`).
    assert suppressing["lost"] <= 8
    assert suppressing["findable_min"] > 0.85


def test_suppressing_clocks_are_the_nodes_own() -> None:
    """The model's holders decide with `RepublishClock` (the node's code): a longer
    deadline changes nothing against one /24, whose copies alternation already stops."""
    runs = [
        simulate(
            nodes=400, records=100, rounds=8, churn=0.3, replicas=8, seed=5,
            subnets=Subnets(sybils=2, suppress=True), max_silence=silence,
        )["durable_final"]
        for silence in (2, 1000)
    ]  # fmt: skip
    assert runs[0] >= runs[1] > 0.9


def test_the_same_seed_gives_the_same_figures() -> None:
    assert _run("spread", crowd=0.2, sybils=8) == _run("spread", crowd=0.2, sybils=8)


def test_nodes_share_a_24_as_configured_and_count_for_the_spread() -> None:
    nodes = mint_honest(6000, 5000, Subnets(crowd=0.2), random.Random(1))
    assert [c.key for c in nodes] == sorted(c.key for c in nodes)
    assert all(c.scope is Scope.GLOBAL for c in nodes)  # private ones would be exempt
    per_subnet = Counter(c.subnet for c in nodes)
    crowd = per_subnet.pop("12.0.0")
    assert 0.18 < crowd / 6000 < 0.22
    assert len(per_subnet) == 5000 // PER_SUBNET  # the others over online / 10 /24s
    sparse = mint_honest(6000, 5000, Subnets(per_subnet=1), random.Random(1))
    assert len({c.subnet for c in sparse}) > 3000  # 5,000 /24s, drawn at random


@pytest.mark.process
def test_cli_compares_placements_and_refuses_an_unknown_one() -> None:
    args = ["--nodes", "300", "--records", "50", "--rounds", "2", "--churn", "0.1"]
    args += ["--replicas", "8", "--sybils", "8"]
    out = subprocess.run(
        [str(BIN / "dna-sim"), "durability", *args, "--placement", "spread,closest"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["placement"], r["lost"]) for r in rows] == [("spread", 0), ("closest", 50)]
    assert "| closest |" in out.stderr  # the table
    bad = subprocess.run(
        [str(BIN / "dna-sim"), "durability", *args, "--placement", "nearest"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown placement ['nearest']" in bad.stderr
    assert bad.stdout == ""


def _joining(store_on_join: bool, **subnets: Any) -> dict[str, Any]:
    return simulate(
        nodes=400, records=200, rounds=6, churn=0.5, replicas=8, seed=3,
        subnets=Subnets(**subnets), store_on_join=store_on_join,
    )  # fmt: skip


def test_store_on_join_hands_newcomers_their_records_before_the_republish() -> None:
    """With store-on-join, nodes joining among a record's 8 hold it at the worst moment of
    the hour (after the churn, before the republish): more records are findable and
    fewer lost; each newcomer gets a record from 1-2 senders, not from all 8."""
    without, with_ = _joining(False), _joining(True)
    assert without["handoffs_per_record_round"] == 0
    assert with_["findable_min"] > without["findable_min"]
    assert with_["lost"] <= without["lost"]
    # 50% churn: about 4 of 8 replicas new each round, 2 senders each at most
    assert 0 < with_["handoffs_per_record_round"] <= 2 * 8


def test_store_on_join_under_suppression_keeps_what_the_clock_alone_loses() -> None:
    """Sybils near each key suppress republishing; store-on-join does not wait for it."""
    without = _joining(False, sybils=2, suppress=True)
    with_ = _joining(True, sybils=2, suppress=True)
    assert with_["durable_final"] > without["durable_final"]
    assert with_["findable_min"] > without["findable_min"]
