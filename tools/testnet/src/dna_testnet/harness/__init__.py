"""The one harness that starts nodes: an address allocator and a `Driver` per way of
running them (local processes, compose containers, Kubernetes pods), behind `Cluster`.
docs/architecture.md, "Starting nodes: the harness", describes them."""

from dna_testnet.harness.addresses import LOOPBACK, AddressesExhaustedError, LoopbackAllocator
from dna_testnet.harness.driver import Cluster, Driver, NodeAddress, NotReadyError
from dna_testnet.harness.local import LocalDriver, LocalNode, local_cluster, wait_ready

__all__ = [
    "LOOPBACK",
    "AddressesExhaustedError",
    "Cluster",
    "Driver",
    "LocalDriver",
    "LocalNode",
    "LoopbackAllocator",
    "NodeAddress",
    "NotReadyError",
    "local_cluster",
    "wait_ready",
]
