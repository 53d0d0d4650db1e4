"""dna_testnet: a local DNA network of real node processes on loopback addresses."""

from dna_testnet.network import LocalNode, Testnet, client_node, wait_ready

__all__ = ["LocalNode", "Testnet", "client_node", "wait_ready"]
