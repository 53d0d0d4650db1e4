"""The Kademlia overlay: what other packages use of it, from one place.

The modules behind this face (``contact``, ``kbucket``, ``lookup``, ``codec``, ``records``,
``rtt``, ...) are sans-I/O cores (docs/overlay.md); ``aio/`` is their asyncio adapter (the
UDP node, the gRPC records service, the node as a service). Services and tools import
from ``dna_core.overlay`` only, never a module path under it, so the modules can be
reshaped without touching them (tests/core/test_package_faces.py keeps to that).

The adapter's names (`OverlayNode`, `OverlayServer`, ...) load on first use: importing the
cores must not bring in asyncio, grpcio or the ops web stack (the simulator runs the
cores alone, and `dna` should not pay for a server it does not run).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dna_core.overlay.behaviour import (
    SUSPECT_SECONDS,
    BehaviourConfig,
    ContactAdded,
    Lookup,
    LookupDone,
    OverlayBehaviour,
    PingDone,
    PingOp,
    Send,
    StartTimer,
)
from dna_core.overlay.codec import (
    Datagram,
    FindNode,
    Nodes,
    Ping,
    Pong,
    contact_from_proto,
    contact_to_proto,
)
from dna_core.overlay.contact import ID_BITS, ID_BYTES, Contact, Endpoint, distance
from dna_core.overlay.handoff import handoff_senders
from dna_core.overlay.kbucket import Admission, Observed, RoutingTable
from dna_core.overlay.lookup import ClosestPeersIter, DisjointLookup, Finished, Query, Wait
from dna_core.overlay.protocol import Addr, closer_nodes, proven_contact
from dna_core.overlay.records import (
    DEFAULT_IDENTITY_POW_BITS,
    DEFAULT_NAME_POW_BITS,
    MAX_CLAIM_BYTES,
    MAX_ROTATION_TTL_MS,
    MAX_SILENCE,
    MAX_TTL_MS,
    NAME_MOVE_DOMAIN,
    REPUBLISH_JITTER,
    ROTATION_ACCEPT_DOMAIN,
    ContestedError,
    RepublishClock,
    identity_payload,
    identity_proof,
    name_key,
    name_move_message,
    name_pow_hash,
    normalize_name,
    record_key,
    rotation_accept_message,
    rotation_target,
)
from dna_core.overlay.rtt import RttEstimator

if TYPE_CHECKING:
    from dna_core.overlay.aio.node import Closest, NodeConfig, OverlayNode
    from dna_core.overlay.aio.seeds import local_host_for, resolve_seeds, seed_family
    from dna_core.overlay.aio.server import OverlayServer, OverlayServiceConfig, config_warnings

# The asyncio adapter: name -> the module that defines it (loaded by __getattr__).
_ADAPTER = {
    "Closest": "dna_core.overlay.aio.node",
    "NodeConfig": "dna_core.overlay.aio.node",
    "OverlayNode": "dna_core.overlay.aio.node",
    "OverlayServer": "dna_core.overlay.aio.server",
    "OverlayServiceConfig": "dna_core.overlay.aio.server",
    "config_warnings": "dna_core.overlay.aio.server",
    "local_host_for": "dna_core.overlay.aio.seeds",
    "resolve_seeds": "dna_core.overlay.aio.seeds",
    "seed_family": "dna_core.overlay.aio.seeds",
}


def __getattr__(name: str) -> Any:
    """PEP 562: an adapter name is imported from its module the first time it is asked for."""
    if name not in _ADAPTER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_ADAPTER[name]), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


__all__ = [
    "DEFAULT_IDENTITY_POW_BITS",
    "DEFAULT_NAME_POW_BITS",
    "ID_BITS",
    "ID_BYTES",
    "MAX_CLAIM_BYTES",
    "MAX_ROTATION_TTL_MS",
    "MAX_SILENCE",
    "MAX_TTL_MS",
    "NAME_MOVE_DOMAIN",
    "REPUBLISH_JITTER",
    "ROTATION_ACCEPT_DOMAIN",
    "SUSPECT_SECONDS",
    "Addr",
    "Admission",
    "BehaviourConfig",
    "Closest",
    "ClosestPeersIter",
    "Contact",
    "ContactAdded",
    "ContestedError",
    "Datagram",
    "DisjointLookup",
    "Endpoint",
    "FindNode",
    "Finished",
    "Lookup",
    "LookupDone",
    "NodeConfig",
    "Nodes",
    "Observed",
    "OverlayBehaviour",
    "OverlayNode",
    "OverlayServer",
    "OverlayServiceConfig",
    "Ping",
    "PingDone",
    "PingOp",
    "Pong",
    "Query",
    "RepublishClock",
    "RoutingTable",
    "RttEstimator",
    "Send",
    "StartTimer",
    "Wait",
    "closer_nodes",
    "config_warnings",
    "contact_from_proto",
    "contact_to_proto",
    "distance",
    "handoff_senders",
    "identity_payload",
    "identity_proof",
    "local_host_for",
    "name_key",
    "name_move_message",
    "name_pow_hash",
    "normalize_name",
    "proven_contact",
    "record_key",
    "resolve_seeds",
    "rotation_accept_message",
    "rotation_target",
    "seed_family",
]
