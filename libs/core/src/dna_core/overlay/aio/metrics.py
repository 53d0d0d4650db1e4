"""Prometheus metrics of one overlay node, in the node's own registry
(many nodes run in one process: nothing global)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dna_core.overlay.records import DEFAULT_MAX_GONE, RecordStore


class OverlayMetrics:
    def __init__(self, registry: CollectorRegistry, table_size: Callable[[], int]) -> None:
        self.registry = registry
        self.table_size = Gauge(
            "dna_overlay_routing_table_size", "Contacts in the routing table", registry=registry
        )
        self.table_size.set_function(table_size)
        self.rpcs = Counter(
            "dna_overlay_rpcs",
            "Overlay RPCs by direction, method and outcome",
            ["direction", "method", "outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "dna_overlay_rejected",
            "Datagrams, contacts and records refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.handoffs = Counter(
            "dna_overlay_handoffs",
            "Records handed to nodes new to the routing table (store-on-join), by outcome:"
            " sent (taken), refused (not taken, not retried), dropped (the queue was full);"
            " unplanned counts newcomers over the planning rate, given nothing; recent"
            " those back within a republish interval of their last plan, given nothing",
            ["outcome"],
            registry=registry,
        )
        self.lookup_seconds = Histogram(
            "dna_overlay_lookup_seconds",
            "Iterative lookup latency",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )


class GoneCollector(Collector):
    """The record store's memory of deleted records (`RecordStore.remember`), read at
    scrape time: how many keys it remembers against rollback, and how many it forgot
    early for room (``max_gone``; the source holding the most loses its oldest). A key
    forgotten early can be rolled back to an older,
    still unexpired version, so the counter moving says the bound is reached."""

    def __init__(self, store: RecordStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Any]:
        store = self._store
        yield GaugeMetricFamily(
            "dna_overlay_records_gone",
            "Keys of deleted records remembered against rollback (at most max_gone, "
            f"{DEFAULT_MAX_GONE:,} by default, the source holding the most losing its oldest)",
            store.gone_count,
        )
        yield CounterMetricFamily(
            "dna_overlay_records_gone_dropped",
            "Remembered keys of deleted records forgotten early, the oldest of the source"
            " holding the most first, to stay within the bound (a replay of an older"
            " version is then no longer refused)",
            store.gone_evicted,
        )
