"""Third-party DHTs as baselines: the adapters that run them on loopback in this process.

* :mod:`bench.baselines.opendht_net` - C++ OpenDHT nodes (PyPI ``opendht``), one
  ``DhtRunner`` (two native threads) per node (:class:`~.opendht_net.OpenDhtNet`).
* :mod:`bench.baselines.kademlia_net` - the pure-Python ``kademlia`` package, every node in
  one asyncio loop (:class:`~.kademlia_net.KademliaNet`).

Both are :class:`bench.harness.LoopbackNet`: the same workload, client-pair layout and
async put/get batches, so the comparison modules (``bench.overlay``, ``bench.storage``,
``bench.e2e``) put our figures beside theirs in the same run. Standalone, each module
prints one JSON object per figure (``python -m bench.baselines.opendht_net --nodes 50
--ops 2000``).
"""
