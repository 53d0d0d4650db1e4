"""asyncio adapters of the overlay: UDP routing, gRPC records, the node that ties them."""

from dna_core.overlay.aio.node import RECORD_REPLICAS, NodeConfig, OverlayNode

__all__ = ["RECORD_REPLICAS", "NodeConfig", "OverlayNode"]
