"""asyncio adapters of the overlay: UDP routing, gRPC records, the node that ties them."""

from dna_core.overlay.aio.node import NodeConfig, OverlayNode

__all__ = ["NodeConfig", "OverlayNode"]
