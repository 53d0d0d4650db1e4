"""dna_testnet: a local DNA network of real node processes on loopback addresses."""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: even `typing` takes a moment to import
if TYPE_CHECKING:
    from dna_testnet.network import LocalNode, Testnet, client_node, wait_ready

__all__ = ["LocalNode", "Testnet", "client_node", "wait_ready"]


def __getattr__(name: str) -> object:
    """The exports, loaded on first use (PEP 562): `dna-testnet`'s entry point
    (`dna_testnet.launch`) must be importable in a moment, before Ctrl-C is handled."""
    if name in __all__:
        from dna_testnet import network

        return getattr(network, name)
    raise AttributeError(f"module 'dna_testnet' has no attribute {name!r}")
