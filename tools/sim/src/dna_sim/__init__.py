"""dna_sim: a seeded, deterministic simulation of the DNA overlay.

Many overlay nodes run in one process over an in-memory network on a virtual clock, each
the nodes' own ``dna_core.overlay.behaviour.OverlayBehaviour`` (routing table, lookups,
liveness checks, request matching) behind a simulated network; ``dna-sim`` is the command
line.
"""

from dna_sim.network import NetConfig, SimNetwork
from dna_sim.node import SimNode, node_config
from dna_sim.scenario import Scenario, Simulation, summary
from dna_sim.world import World, WorldConfig

__all__ = [
    "NetConfig",
    "Scenario",
    "SimNetwork",
    "SimNode",
    "Simulation",
    "World",
    "WorldConfig",
    "node_config",
    "summary",
]
