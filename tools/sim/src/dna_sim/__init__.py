"""dna_sim: a seeded, deterministic simulation of the DNA overlay.

Many ``dna_core.overlay`` cores (routing table, lookup iterators, RTT estimator) run in one
process over an in-memory network on a virtual clock; ``dna-sim`` is the command line.
"""

from dna_sim.network import NetConfig, SimNetwork
from dna_sim.node import LookupRun, NodeConfig, SimNode
from dna_sim.scenario import Scenario, Simulation, summary
from dna_sim.world import World, WorldConfig

__all__ = [
    "LookupRun",
    "NetConfig",
    "NodeConfig",
    "Scenario",
    "SimNetwork",
    "SimNode",
    "Simulation",
    "World",
    "WorldConfig",
    "summary",
]
